"""Wan's video diffusion transformer (Wan Team 2025; diffusers' `WanTransformer3DModel`, text-to-video), loaded
from a local diffusers directory (`load_diffusers`: the `transformer/` folder of a Wan 2.1 or 2.2 checkpoint).

Latent clips are cut into tubelets (patch_size, (1, 2, 2): one latent frame x 2 x 2 latent pixels), each a token.
Every block is self-attention over all tokens of the clip (3-D rotary position embedding: a head's features split
into a time, a height and a width part; queries and keys RMS-normalised across heads), cross-attention to the
text, and a GELU feed-forward; the self-attention and feed-forward are modulated (shift, scale, gate) by the
time embedding plus the block's learnt table, as in DiT's adaLN. The text (UMT5's embeddings, `text_dim` wide) is
projected to the model width once; the cross-attention attends to every text position, as Wan's pipelines do
(they zero the embeddings after the prompt's last token, which `__call__` does from the mask).

Call: x [batch, frames, h, w, in_channels] (latent clips; frames, h and w divisible by patch_size), timestep
[batch] (Wan's: 1000 sigma on the flow path x = (1 - sigma) x0 + sigma eps), or [batch, frames / patch_size[0]]
one per frame of tokens (Wan 2.2 TI2V's image-to-video mode: a clean first frame's at 0), text [batch, tokens,
text_dim], text_mask [batch, tokens] bool -> [batch, frames, h, w, out_channels] float32, Wan's prediction of the
velocity eps - x0. `dtype` (model.dtype) is that of its matrix products and attention (parameters, norms,
modulation and the residual stream stay float32, as diffusers keeps them); `remat_policy` (layers.REMAT_POLICIES)
recomputes each block in the backward pass; `attention` (model.attention) picks the attention's implementation
(models/attention.py: cuDNN's flash attention on recent NVIDIA GPUs in bfloat16).

An image-to-video model (Wan 2.1 I2V and Wan 2.2 I2V A14B: in_channels = 2 out_channels + 4) reads, beside each
noisy latent clip, a condition of as many frames (`image_condition`): a mask of the frames given (the first) and
the latents of the clip that is the image followed by zero frames, concatenated after the clip's channels. Wan
2.1's (`image_dim`) also read the image's CLIP tokens (`image` [batch, tokens, image_dim]: the penultimate layer's
states of its image encoder, models/clip.py): embedded once, then attended to by every block's cross-attention
beside the text, with projections of their own (`add_k_proj`, `add_v_proj`), the two attentions' outputs added.

A first-last-frame model (Wan 2.1 FLF2V: `pos_embed_seq_len`) is such a Wan 2.1 model whose clips end at a given
image too: it reads the CLIP tokens of both images, the first's then the last's, with a learnt position embedding
added before they are embedded.

Not supported (config_problems refuses them): other query-key norms than `rms_norm_across_heads`.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax import objectives, sharding
from diffusion_jax.models import attention, diffusers_directory, layers

CLASS_NAME = "WanTransformer3DModel"
DEFAULTS = {"patch_size": [1, 2, 2], "num_attention_heads": 40, "attention_head_dim": 128, "in_channels": 16,
            "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 13824, "num_layers": 40,
            "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": None,
            "added_kv_proj_dim": None, "rope_max_seq_len": 1024, "pos_embed_seq_len": None}


def config_problems(config: dict) -> list[str]:
  """What this module cannot build from a WanTransformer3DModel config.json."""
  c, found = DEFAULTS | config, []
  dim = c["num_attention_heads"] * c["attention_head_dim"]
  if (c["image_dim"] is None) != (c["added_kv_proj_dim"] is None) or c["added_kv_proj_dim"] not in (None, dim):
    found.append(f"image_dim={c['image_dim']}, added_kv_proj_dim={c['added_kv_proj_dim']}: an image-to-video model's "
                 f"image tokens need both, the second the model's width {dim}")
  if c["pos_embed_seq_len"] is not None and c["image_dim"] is None:
    found.append(f"pos_embed_seq_len={c['pos_embed_seq_len']}: a first-last-frame model's image position embedding "
                 "is for the CLIP tokens of its two images; it needs image_dim")
  if c["qk_norm"] != "rms_norm_across_heads":
    found.append(f"qk_norm={c['qk_norm']!r}: only 'rms_norm_across_heads' (every Wan model's) is supported")
  return found


def read_config(path, field: str = "model.wan_path") -> dict:
  """The config.json of a local diffusers WanTransformer3DModel directory, with its class's defaults; a ValueError
  that says what is wrong, naming `field`."""
  return diffusers_directory.read_checked_config(path, field, CLASS_NAME, "transformer",
                                               "the transformer/ folder of a Wan checkpoint",
                                               DEFAULTS, config_problems)


def is_first_last_frame(config: dict) -> bool:
  """Whether a transformer's config.json is a first-last-frame model's (Wan 2.1 FLF2V): it reads the CLIP tokens of
  both images, a position embedding (pos_embed_seq_len) telling them apart."""
  return (DEFAULTS | config)["pos_embed_seq_len"] is not None


def is_image_to_video(config: dict) -> bool:
  """Whether a transformer's config.json is an image-to-video model's: more channels in (the condition's) than out."""
  c = DEFAULTS | config
  return c["in_channels"] > c["out_channels"]


def image_condition(given_latents, mask_channels: int, last_given=None):
  """The condition an image-to-video Wan reads: latents [batch, frames, h, w, c] of the clip that is the image then
  zero frames (and, where last_given [batch] bool, a last image) -> [batch, frames, h, w, mask_channels + c], a
  mask before the latents, 1 where a channel's pixel frame is given (mask_channels = the frames a latent frame
  holds, as diffusers' WanImageToVideoPipeline counts them): every channel of the first latent frame, which holds
  the first image, and the last channel of the last one, the last image's."""
  mask = jnp.zeros(given_latents.shape[:-1] + (mask_channels,), given_latents.dtype)
  if last_given is not None and given_latents.shape[1] > 1:
    last = jnp.broadcast_to(last_given[:, None, None], mask.shape[:1] + mask.shape[2:4])  # [batch, h, w]
    mask = mask.at[:, -1, :, :, -1].set(last.astype(mask.dtype))
  mask = mask.at[:, 0].set(1.0)
  return jnp.concatenate([mask, given_latents], axis=-1)


def timestep(logsnr):
  """Wan's timestep of log-SNRs [batch] on the flow path: 1000 sigma, sigma = sigmoid(-logsnr / 2)."""
  return 1000.0 * jax.nn.sigmoid(-logsnr / 2)


def boundary_logsnr(boundary: float) -> float:
  """The log-SNR of a pair of experts' boundary (model.wan_boundary, a sigma on the flow path): timestep(logsnr) >=
  1000 boundary, the high-noise expert's, where logsnr <= it."""
  return 2.0 * math.log((1.0 - boundary) / boundary)


def rotary_angles(frames: int, height: int, width: int, head_dim: int, theta: float = 10000.0):
  """[frames * height * width, head_dim / 2] rotation angles of each token's feature pairs: the first pairs turn
  with its frame, the next 2 (head_dim // 6) / 2 with its row, the last as many with its column (Wan's split)."""
  space = 2 * (head_dim // 6)
  parts = []
  for axis, (size, dim) in enumerate(((frames, head_dim - 2 * space), (height, space), (width, space))):
    freqs = 1.0 / theta ** (np.arange(0, dim, 2)[:dim // 2] / dim)
    angles = np.arange(size)[:, None] * freqs[None]
    shape = [frames, height, width, dim // 2]
    parts.append(np.broadcast_to(np.expand_dims(angles, [a for a in range(3) if a != axis]), shape))
  return jnp.asarray(np.concatenate(parts, axis=-1).reshape(frames * height * width, -1), jnp.float32)


def rotated(x, angles):
  """x [batch, tokens, heads, head_dim] with each consecutive feature pair (2i, 2i + 1) turned by angles
  [tokens, head_dim / 2]."""
  pairs = x.reshape(x.shape[:-1] + (-1, 2))
  cos, sin = jnp.cos(angles)[:, None], jnp.sin(angles)[:, None]
  first, second = pairs[..., 0], pairs[..., 1]
  return jnp.stack([first * cos - second * sin, first * sin + second * cos], axis=-1).reshape(x.shape)


def dense(in_dim, out_dim, axes, rngs, dtype=jnp.float32):
  return layers.dense(in_dim, out_dim, axes, rngs, dtype)


def layer_norm(dim, eps, rngs, affine=False):
  return nnx.LayerNorm(dim, epsilon=eps, use_bias=affine, use_scale=affine, rngs=rngs,
                       scale_metadata=layers.names("norm"), bias_metadata=layers.names("norm"))


class Attention(nnx.Module):
  """Multi-head attention with biased projections and queries and keys RMS-normalised across heads (diffusers'
  WanAttention): x [batch, n, dim] attends to context [batch, m, dim] (itself when None), rotary angles for
  self-attention. lora_rank: low-rank updates (layers.lora) of the four projections, as `to_q_lora`, `to_k_lora`,
  `to_v_lora` and `to_out_lora[0]`, and of an image-to-video model's image projections (`add_k_proj_lora`,
  `add_v_proj_lora`) (0: none)."""

  def __init__(self, dim, heads, eps, rngs, dtype, implementation, lora_rank=0, image_tokens=False):
    self.heads, self.dtype, self.implementation = heads, dtype, implementation
    if image_tokens:  # a cross-attention that also attends to an image-to-video model's image tokens
      self.add_k_proj, self.add_v_proj = (dense(dim, dim, ("embed", "heads"), rngs, dtype) for _ in range(2))
      self.add_k_proj_lora, self.add_v_proj_lora = (layers.lora(dim, dim, ("embed", "heads"), lora_rank, rngs, dtype)
                                                    for _ in range(2))
      self.norm_added_k = nnx.RMSNorm(dim, epsilon=eps, rngs=rngs, scale_metadata=layers.names("norm"))
    self.to_q, self.to_k, self.to_v = (dense(dim, dim, ("embed", "heads"), rngs, dtype) for _ in range(3))
    self.to_out = nnx.List([dense(dim, dim, ("heads", "embed"), rngs, dtype)])
    self.to_q_lora, self.to_k_lora, self.to_v_lora = (layers.lora(dim, dim, ("embed", "heads"), lora_rank, rngs, dtype)
                                                      for _ in range(3))
    self.to_out_lora = nnx.List([layers.lora(dim, dim, ("heads", "embed"), lora_rank, rngs, dtype)])
    self.norm_q, self.norm_k = (nnx.RMSNorm(dim, epsilon=eps, rngs=rngs, scale_metadata=layers.names("norm"))
                                for _ in range(2))

  def __call__(self, x, context=None, angles=None, image=None):
    """image: an image-to-video model's embedded image tokens [batch, tokens, dim], attended to apart from the
    context, the two outputs added (cross-attention only)."""
    context = x if context is None else context
    split = lambda t: t.reshape(t.shape[:2] + (self.heads, -1))
    normed = lambda norm, t: norm(t.astype(jnp.float32))
    attend = lambda q, k, v: attention.dot_product_attention(q.astype(self.dtype), k.astype(self.dtype), v,
                                                             implementation=self.implementation)
    q = split(normed(self.norm_q, layers.adapted(self, "to_q", x)))
    k = split(normed(self.norm_k, layers.adapted(self, "to_k", context)))
    if angles is not None:
      q, k = rotated(q, angles), rotated(k, angles)
    out = attend(q, k, split(layers.adapted(self, "to_v", context)))
    if image is not None:
      out = out + attend(q, split(normed(self.norm_added_k, layers.adapted(self, "add_k_proj", image))),
                         split(layers.adapted(self, "add_v_proj", image)))
    return layers.adapted_in_list(self, "to_out", 0, out.reshape(x.shape[:2] + (-1,)))


class GeluProjection(nnx.Module):
  """A linear layer (with a low-rank update `proj_lora` of lora_rank, 0: none) and tanh-approximated GELU
  (diffusers' GELU(approximate='tanh'), the feed-forward's first layer; exact: the exact GELU, the image
  embedder's)."""

  def __init__(self, dim, hidden, rngs, dtype, lora_rank=0, exact=False):
    self.exact = exact
    self.proj = dense(dim, hidden, ("embed", "mlp"), rngs, dtype)
    self.proj_lora = layers.lora(dim, hidden, ("embed", "mlp"), lora_rank, rngs, dtype)

  def __call__(self, x):
    return nnx.gelu(layers.adapted(self, "proj", x), approximate=not self.exact)


class Block(nnx.Module):
  """Modulated self-attention, cross-attention to the text, modulated feed-forward: tokens [batch, n, dim].
  lora_rank: low-rank updates of the attentions' projections; ff_lora_rank: of the feed-forward's two layers (the
  second's as `ffn.net_lora[2]`) (0: none)."""

  def __init__(self, c, rngs, dtype, implementation, lora_rank=0, ff_lora_rank=0):
    dim = c["num_attention_heads"] * c["attention_head_dim"]
    self.norm1, self.norm3 = layer_norm(dim, c["eps"], rngs), layer_norm(dim, c["eps"], rngs)
    self.attn1, self.attn2 = (Attention(dim, c["num_attention_heads"], c["eps"], rngs, dtype, implementation,
                                        lora_rank, image_tokens=cross and c["image_dim"] is not None)
                              for cross in (False, True))
    self.norm2 = layer_norm(dim, c["eps"], rngs, affine=True) if c["cross_attn_norm"] else None
    self.ffn = nnx.Module()
    self.ffn.net = nnx.List([GeluProjection(dim, c["ffn_dim"], rngs, dtype, ff_lora_rank), None,
                             dense(c["ffn_dim"], dim, ("mlp", "embed"), rngs, dtype)])
    self.ffn.net_lora = nnx.List([None, None, layers.lora(c["ffn_dim"], dim, ("mlp", "embed"), ff_lora_rank, rngs,
                                                          dtype)])
    self.scale_shift_table = nnx.Param(jax.random.normal(rngs.params(), (1, 6, dim)) / dim ** 0.5,
                                       **layers.names(None, None, "embed"))

  def __call__(self, x, text, modulation, angles, image=None):
    """modulation [batch, 1 or frames, 6, dim]: the time embedding's projection, one per example or per frame of
    tokens; image: embedded image tokens or None."""
    table = self.scale_shift_table[...][:, None]
    shift, scale, gate, ff_shift, ff_scale, ff_gate = jnp.split(table + modulation, 6, axis=2)
    attended = self.attn1(modulated(self.norm1(x), scale, shift), angles=angles).astype(jnp.float32)
    x = x + modulated(attended, gate)
    x = x + self.attn2(x if self.norm2 is None else self.norm2(x), text, image=image).astype(jnp.float32)
    hidden = self.ffn.net[0](modulated(self.norm3(x), ff_scale, ff_shift))
    return x + modulated(layers.adapted_in_list(self.ffn, "net", 2, hidden).astype(jnp.float32), ff_gate)


def modulated(x, scale, shift=None):
  """Tokens x [batch, n, dim] (frame-major) times `scale` (plus 1 where there is a shift) plus `shift`, each
  [batch, 1 or frames, 1, dim]: one per example, or per frame of tokens."""
  b, n, dim = x.shape
  frames = x.reshape(b, scale.shape[1], -1, dim)
  frames = frames * scale if shift is None else frames * (1 + scale) + shift
  return frames.reshape(b, n, dim)


class WanTransformer(nnx.Module):
  """diffusers' WanTransformer3DModel (text-to-video) of a config.json (read_config); lora_rank, ff_lora_rank: a
  LoRA's low-rank updates of every block's attention projections and feed-forward layers (0: none)."""

  def __init__(self, config: dict, *, rngs: nnx.Rngs, dtype="float32", remat_policy=None, attention="auto",
               lora_rank=0, ff_lora_rank=0):
    c, dtype = DEFAULTS | config, jnp.dtype(dtype)
    dim, self.patch = c["num_attention_heads"] * c["attention_head_dim"], tuple(c["patch_size"])
    self.head_dim, self.freq_dim, self.out_channels = c["attention_head_dim"], c["freq_dim"], c["out_channels"]
    self.remat_policy = remat_policy
    self.patch_embedding = layers.conv(c["in_channels"], dim, self.patch, rngs, dtype, stride=self.patch,
                                       padding="VALID")
    self.condition_embedder = nnx.Module()
    embedder = self.condition_embedder
    embedder.time_embedder = nnx.Module()
    embedder.time_embedder.linear_1 = dense(c["freq_dim"], dim, (None, "embed"), rngs)
    embedder.time_embedder.linear_2 = dense(dim, dim, ("embed", "embed"), rngs)
    embedder.time_proj = dense(dim, 6 * dim, ("embed", None), rngs)
    embedder.text_embedder = nnx.Module()
    embedder.text_embedder.linear_1 = dense(c["text_dim"], dim, ("text_embed", "embed"), rngs)
    embedder.text_embedder.linear_2 = dense(dim, dim, ("embed", "embed"), rngs)
    if (image_dim := c["image_dim"]) is not None:  # Wan 2.1 image-to-video: CLIP's tokens to the model width
      embedder.image_embedder = nnx.Module()
      embedder.image_embedder.norm1 = layer_norm(image_dim, 1e-5, rngs, affine=True)
      embedder.image_embedder.ff = nnx.Module()
      embedder.image_embedder.ff.net = nnx.List([GeluProjection(image_dim, image_dim, rngs, jnp.float32, exact=True),
                                                 None, dense(image_dim, dim, (None, "embed"), rngs)])
      embedder.image_embedder.norm2 = layer_norm(dim, 1e-5, rngs, affine=True)
      if (tokens := c["pos_embed_seq_len"]) is not None:  # first-last-frame: which image each token is of
        embedder.image_embedder.pos_embed = nnx.Param(jnp.zeros((1, tokens, image_dim)),
                                                      **layers.names(None, None, None))
    self.blocks = nnx.List([Block(c, rngs, dtype, attention, lora_rank, ff_lora_rank)
                            for _ in range(c["num_layers"])])
    self.norm_out = layer_norm(dim, c["eps"], rngs)
    self.proj_out = dense(dim, c["out_channels"] * math.prod(self.patch), ("embed", None), rngs)
    self.scale_shift_table = nnx.Param(jax.random.normal(rngs.params(), (1, 2, dim)) / dim ** 0.5,
                                       **layers.names(None, None, "embed"))

  def __call__(self, x, timestep, text, text_mask, image=None):
    """image: Wan 2.1 image-to-video's CLIP tokens of the image [batch, tokens, image_dim] (a first-last-frame
    model's: the first image's then the last's, pos_embed_seq_len in all; None otherwise)."""
    b, f, h, w, _ = x.shape
    (pt, ph, pw), grid = self.patch, (f // self.patch[0], h // self.patch[1], w // self.patch[2])
    tokens = self.patch_embedding(x.astype(jnp.float32)).astype(jnp.float32)
    # frame-major tokens, split over the mesh's `sequence` axis under sequence parallelism
    tokens = sharding.constrain(tokens.reshape(b, -1, tokens.shape[-1]), ("batch", "tokens", None))
    e = self.condition_embedder
    sinusoids = layers.sinusoidal_embedding(timestep.reshape(-1).astype(jnp.float32), self.freq_dim)
    sinusoids = jnp.concatenate([sinusoids[:, self.freq_dim // 2:], sinusoids[:, :self.freq_dim // 2]], axis=-1)
    time = e.time_embedder.linear_2(nnx.silu(e.time_embedder.linear_1(sinusoids)))
    time = time.reshape(b, -1, time.shape[-1])  # [batch, 1 or frames, dim]
    modulation = e.time_proj(nnx.silu(time)).reshape(time.shape[:2] + (6, -1))
    text = jnp.where(text_mask[..., None], text.astype(jnp.float32), 0.0)
    text = e.text_embedder.linear_2(nnx.gelu(e.text_embedder.linear_1(text), approximate=True))
    if image is not None:
      embed, image = e.image_embedder, image.astype(jnp.float32)
      image = image + embed.pos_embed[...] if hasattr(embed, "pos_embed") else image
      image = embed.norm2(embed.ff.net[2](embed.ff.net[0](embed.norm1(image))))
    angles = rotary_angles(*grid, self.head_dim)
    run = lambda block, *args: block(*args)
    run = layers.rematerialised(run, self.remat_policy) if self.remat_policy else run
    for block in self.blocks:
      tokens = run(block, tokens, text, modulation, angles, image)
    shift, scale = jnp.split(self.scale_shift_table[...][:, None] + time[:, :, None], 2, axis=2)
    out = self.proj_out(modulated(self.norm_out(tokens), scale, shift))
    out = out.reshape(b, *grid, pt, ph, pw, self.out_channels).transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return out.reshape(b, f, h, w, self.out_channels)


def experts(high, low, boundary, x, timestep, text, text_mask, image=None):
  """Wan 2.2 A14B's pair of experts: each example denoised by `high` where its timestep is >= `boundary` (Wan's
  boundary_ratio x 1000), else by `low`. A batch at one noise level (sampling's) runs one expert; a mixed one
  (training's with mixed batches) runs both and takes each example's."""
  run = lambda expert: lambda: expert(x, timestep, text, text_mask, image)
  return objectives.per_example_switch(timestep >= boundary, run(high), run(low))


def load_diffusers(path, field: str = "model.wan_path") -> WanTransformer:
  """A WanTransformer with the weights of a local diffusers directory (config.json and its safetensors, one file or
  the shards its index lists)."""
  return diffusers_directory.load(path, WanTransformer, read_config(path, field))
