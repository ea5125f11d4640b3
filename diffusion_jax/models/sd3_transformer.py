"""Stable Diffusion 3's multimodal diffusion transformer, MMDiT (Esser et al. 2024; diffusers'
`SD3Transformer2DModel`: SD 3 Medium, SD 3.5 Medium / Large), loaded from a local diffusers directory
(`load_diffusers`: the `transformer/` folder of an SD3 checkpoint).

Latent images are cut into patch_size x patch_size patches, each a token, plus the centred crop of a 2-D sinusoidal
position table pos_embed_max_size patches a side (the checkpoint's, a `PositionTable`: not trained). The text
tokens (the three encoders' states, joint_attention_dim wide: models/sd3_text.py) are projected to the model width
once. Every block runs one attention over the image and text tokens together, each stream with its own projections
(`to_q`.. for the image, `add_q_proj`.. for the text; queries and keys RMS-normalised per head with qk_norm
'rms_norm', SD 3.5's), then a GELU feed-forward per stream; each stream's attention and feed-forward are modulated
(shift, scale, gate) by the embedding of the timestep plus the pooled text embedding (adaLN-Zero). The last block
updates the image tokens only. SD 3.5 Medium's first blocks (dual_attention_layers) also run a second
self-attention of the image tokens alone, with its own modulation.

Call: x [batch, h, w, in_channels] (latent images; h and w divisible by patch_size, at most pos_embed_max_size
patches a side), timestep [batch] (1000 sigma on the flow path x = (1 - sigma) x0 + sigma eps), text [batch, tokens,
joint_attention_dim], pooled [batch, pooled_projection_dim] -> [batch, h, w, out_channels] float32, the prediction of
the velocity eps - x0. `dtype` is that of its matrix products and attention (parameters, norms, modulation and the
residual streams stay float32); `remat_policy` (layers.REMAT_POLICIES) recomputes each block in the backward pass;
`attention` picks the attention's implementation (models/attention.py); lora_rank, ff_lora_rank: a LoRA's low-rank
updates of every attention projection and feed-forward layer (0: none).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models import attention, diffusers_directory, layers, sd_unet
from diffusion_jax.models.wan_transformer import GeluProjection, rotated

CLASS_NAME = "SD3Transformer2DModel"
DEFAULTS = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 18, "attention_head_dim": 64,
            "num_attention_heads": 18, "joint_attention_dim": 4096, "caption_projection_dim": 1152,
            "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 96,
            "dual_attention_layers": (), "qk_norm": None}
EPS = 1e-6  # every norm's (diffusers' SD3 blocks)


def config_problems(config: dict) -> list[str]:
  """What this module cannot build from an SD3Transformer2DModel config.json."""
  c, found = DEFAULTS | config, []
  dim = c["num_attention_heads"] * c["attention_head_dim"]
  if c["caption_projection_dim"] != dim:
    found.append(f"caption_projection_dim={c['caption_projection_dim']}: the text tokens join the image tokens' "
                 f"attention, so it must be the model width (num_attention_heads x attention_head_dim = {dim})")
  if c["qk_norm"] not in (None, "rms_norm"):
    found.append(f"qk_norm={c['qk_norm']!r}: only None (SD 3) and 'rms_norm' (SD 3.5) are supported")
  if not c["pos_embed_max_size"]:
    found.append("pos_embed_max_size is empty: SD3's position table is cropped from a pos_embed_max_size square")
  return found


def read_config(path, field: str = "model.sd3_path") -> dict:
  """The config.json of a local diffusers SD3Transformer2DModel directory, with its class's defaults; a ValueError
  that says what is wrong, naming `field`."""
  return diffusers_directory.read_checked_config(path, field, CLASS_NAME, "transformer",
                                               "the transformer/ folder of a Stable Diffusion 3 checkpoint",
                                               DEFAULTS, config_problems)


class PositionTable(nnx.Variable):
  """A fixed position table read from the checkpoint (a PyTorch buffer): not an nnx.Param, so never trained."""


def position_table(dim: int, grid: int, base_size: int):
  """The 2-D sinusoidal position table [grid * grid, dim] float32 (row-major patches): the first half of each row the
  features of the patch's column, the second of its row, each [sin, cos] at frequencies 10000^(-i / (dim / 4)), at
  positions in units of grid / base_size patches (diffusers' get_2d_sincos_pos_embed). Computed with jnp, so that
  an abstract model (eval_shape) does not compute it (SD 3.5 Medium's is 384^2 x 1536)."""
  positions = jnp.arange(grid, dtype=jnp.float32) / (grid / base_size)
  column, row = jnp.meshgrid(positions, positions)
  quarter = dim // 4
  freqs = 1.0 / 10000 ** (jnp.arange(quarter, dtype=jnp.float32) / quarter)
  features = lambda p: jnp.concatenate([jnp.sin(jnp.outer(p.reshape(-1), freqs)),
                                        jnp.cos(jnp.outer(p.reshape(-1), freqs))], axis=1)
  return jnp.concatenate([features(column), features(row)], axis=1)


def modulated(x, shift, scale):
  """Normed tokens x [batch, n, dim] scaled by (1 + scale) and shifted, each [batch, dim]."""
  return x * (1 + scale[:, None]) + shift[:, None]


def modulation(dim, chunks, rngs):
  """adaLN's projection of the conditioning embedding into `chunks` shifts, scales and gates (diffusers'
  AdaLayerNormZero's `linear`, SiLU first)."""
  module = nnx.Module()
  module.linear = layers.dense(dim, chunks * dim, ("embed", None), rngs, jnp.float32)
  return module


def feed_forward(dim, rngs, dtype, lora_rank):
  """diffusers' FeedForward(activation_fn='gelu-approximate'): net[0] a 4x-wide tanh-GELU projection, net[2] back."""
  ff = nnx.Module()
  ff.net = nnx.List([GeluProjection(dim, 4 * dim, rngs, dtype, lora_rank), None,
                     layers.dense(4 * dim, dim, ("mlp", "embed"), rngs, dtype)])
  ff.net_lora = nnx.List([None, None, layers.lora(4 * dim, dim, ("mlp", "embed"), lora_rank, rngs, dtype)])
  return ff


def run_feed_forward(ff, x):
  return layers.adapted_in_list(ff, "net", 2, ff.net[0](x)).astype(jnp.float32)


class Attention(nnx.Module):
  """Attention over image tokens [batch, n, dim] and, when `joint`, text tokens [batch, m, dim] together (diffusers'
  Attention with JointAttnProcessor2_0, and FluxAttention): each stream's queries, keys and values by its own
  projections, every token attending to all. `context_out`: the text stream's output projection (`to_add_out`; not
  in SD3's last block, whose text output is unused); `out`: the output projection (`to_out`; not in Flux's single
  blocks, which project the attention beside their MLP). lora_rank: low-rank updates of every projection (0:
  none)."""

  def __init__(self, dim, heads, qk_norm, rngs, dtype, implementation, lora_rank=0, joint=True, context_out=True,
               out=True):
    self.heads, self.dtype, self.implementation = heads, dtype, implementation
    head_dim = dim // heads
    norm = lambda: nnx.RMSNorm(head_dim, epsilon=EPS, rngs=rngs, scale_metadata=layers.names("norm"))
    projection = lambda axes: layers.dense(dim, dim, axes, rngs, dtype)
    update = lambda axes: layers.lora(dim, dim, axes, lora_rank, rngs, dtype)
    self.to_q, self.to_k, self.to_v = (projection(("embed", "heads")) for _ in range(3))
    self.to_q_lora, self.to_k_lora, self.to_v_lora = (update(("embed", "heads")) for _ in range(3))
    if out:
      self.to_out = nnx.List([projection(("heads", "embed"))])
      self.to_out_lora = nnx.List([update(("heads", "embed"))])
    self.norm_q, self.norm_k = (norm(), norm()) if qk_norm else (None, None)
    if joint:
      self.add_q_proj, self.add_k_proj, self.add_v_proj = (projection(("embed", "heads")) for _ in range(3))
      self.add_q_proj_lora, self.add_k_proj_lora, self.add_v_proj_lora = (update(("embed", "heads")) for _ in range(3))
      self.norm_added_q, self.norm_added_k = (norm(), norm()) if qk_norm else (None, None)
      self.to_add_out = projection(("heads", "embed")) if context_out else None
      self.to_add_out_lora = update(("heads", "embed")) if context_out else None

  def _heads(self, x, names):
    """x's queries, keys and values [batch, n, heads, head_dim] by projections `names` (and their norms)."""
    q_name, k_name, v_name, q_norm, k_norm = names
    split = lambda t: t.reshape(t.shape[:2] + (self.heads, -1))
    normed = lambda norm, t: t if norm is None else norm(t.astype(jnp.float32))
    return (normed(getattr(self, q_norm), split(layers.adapted(self, q_name, x))),
            normed(getattr(self, k_norm), split(layers.adapted(self, k_name, x))),
            split(layers.adapted(self, v_name, x)))

  def __call__(self, x, context=None, angles=None, text_first=False):
    """-> the image tokens' output [batch, n, dim] (and, with context, the text tokens' [batch, m, dim] or None).
    text_first: the joint sequence is the text's tokens then the image's (Flux's; SD3's is the image's first);
    angles: rotary angles [tokens, head_dim / 2] of the joint sequence's queries and keys (Flux's), or None."""
    q, k, v = self._heads(x, ("to_q", "to_k", "to_v", "norm_q", "norm_k"))
    if context is not None:
      added = self._heads(context, ("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k"))
      q, k, v = (jnp.concatenate([b.astype(a.dtype), a] if text_first else [a, b.astype(a.dtype)], axis=1)
                 for a, b in zip((q, k, v), added))
    if angles is not None:
      q, k = rotated(q, angles), rotated(k, angles)
    out = attention.dot_product_attention(q.astype(self.dtype), k.astype(self.dtype), v.astype(self.dtype),
                                          implementation=self.implementation)
    out = out.reshape(out.shape[:2] + (-1,))
    if context is None:
      return layers.adapted_in_list(self, "to_out", 0, out).astype(jnp.float32) if hasattr(self, "to_out") else out
    image, text = (out[:, context.shape[1]:], out[:, :context.shape[1]]) if text_first else (
        out[:, :x.shape[1]], out[:, x.shape[1]:])
    image = layers.adapted_in_list(self, "to_out", 0, image).astype(jnp.float32)
    text = None if self.to_add_out is None else layers.adapted(self, "to_add_out", text)
    return image, None if text is None else text.astype(jnp.float32)


class JointBlock(nnx.Module):
  """diffusers' JointTransformerBlock: the image and text streams' joint attention and feed-forwards, modulated by
  the conditioning embedding. `last`: only the text tokens' attention inputs are modulated (AdaLayerNormContinuous)
  and their stream ends; `dual`: a second, image-only self-attention (SD 3.5's SD35AdaLayerNormZeroX)."""

  def __init__(self, dim, heads, qk_norm, rngs, dtype, implementation, last, dual, lora_rank=0, ff_lora_rank=0):
    self.last, self.dual = last, dual
    self.norm1 = modulation(dim, 9 if dual else 6, rngs)
    self.norm1_context = modulation(dim, 2 if last else 6, rngs)
    self.attn = Attention(dim, heads, qk_norm, rngs, dtype, implementation, lora_rank, context_out=not last)
    self.attn2 = (Attention(dim, heads, qk_norm, rngs, dtype, implementation, lora_rank, joint=False) if dual
                  else None)
    self.ff = feed_forward(dim, rngs, dtype, ff_lora_rank)
    self.ff_context = None if last else feed_forward(dim, rngs, dtype, ff_lora_rank)

  def __call__(self, x, context, embedding, angles=None, text_first=False):
    """x [batch, n, dim], context [batch, m, dim], embedding [batch, dim] -> (x, context; None after the last);
    angles, text_first: the joint attention's (Flux's double-stream blocks)."""
    chunks = jnp.split(self.norm1.linear(nnx.silu(embedding)), 9 if self.dual else 6, axis=-1)
    shift, scale, gate, ff_shift, ff_scale, ff_gate = chunks[:6]
    context_chunks = jnp.split(self.norm1_context.linear(nnx.silu(embedding)), 2 if self.last else 6, axis=-1)
    if self.last:  # AdaLayerNormContinuous: scale first
      context_scale, context_shift = context_chunks
    else:
      context_shift, context_scale, context_gate, context_ff_shift, context_ff_scale, context_ff_gate = context_chunks
    normed = standardized(x)
    image, text = self.attn(modulated(normed, shift, scale),
                            modulated(standardized(context), context_shift, context_scale), angles, text_first)
    x = x + gate[:, None] * image
    if self.dual:
      shift2, scale2, gate2 = chunks[6:]
      x = x + gate2[:, None] * self.attn2(modulated(normed, shift2, scale2))
    x = x + ff_gate[:, None] * run_feed_forward(self.ff, modulated(standardized(x), ff_shift, ff_scale))
    if self.last:
      return x, None
    context = context + context_gate[:, None] * text
    return x, context + context_ff_gate[:, None] * run_feed_forward(
        self.ff_context, modulated(standardized(context), context_ff_shift, context_ff_scale))


def standardized(x):
  """Tokens [batch, n, dim] layer-normalised without an affine map (every norm of an SD3 block), in float32."""
  return jax.nn.standardize(x.astype(jnp.float32), axis=-1, epsilon=EPS)


class SD3Transformer(nnx.Module):
  """diffusers' SD3Transformer2DModel of a config.json (read_config)."""

  def __init__(self, config: dict, *, rngs: nnx.Rngs, dtype="float32", remat_policy=None, attention="auto",
               lora_rank=0, ff_lora_rank=0):
    c, dtype = DEFAULTS | config, jnp.dtype(dtype)
    dim, self.patch, self.out_channels = c["num_attention_heads"] * c["attention_head_dim"], c["patch_size"], c[
        "out_channels"]
    self.max_size, self.remat_policy = c["pos_embed_max_size"], remat_policy
    self.pos_embed = nnx.Module()
    self.pos_embed.proj = layers.conv(c["in_channels"], dim, self.patch, rngs, jnp.float32, stride=self.patch,
                                      padding="VALID")
    self.pos_embed.pos_embed = PositionTable(position_table(dim, self.max_size, c["sample_size"] // self.patch)[None])
    self.time_text_embed = nnx.Module()
    self.time_text_embed.timestep_embedder = sd_unet.embedding_mlp(256, dim, rngs)
    self.time_text_embed.text_embedder = sd_unet.embedding_mlp(c["pooled_projection_dim"], dim, rngs)
    self.context_embedder = layers.dense(c["joint_attention_dim"], dim, ("text_embed", "embed"), rngs, jnp.float32)
    self.transformer_blocks = nnx.List([
        JointBlock(dim, c["num_attention_heads"], c["qk_norm"], rngs, dtype, attention, last=i == c["num_layers"] - 1,
                   dual=i in c["dual_attention_layers"], lora_rank=lora_rank, ff_lora_rank=ff_lora_rank)
        for i in range(c["num_layers"])])
    self.norm_out = modulation(dim, 2, rngs)
    self.proj_out = layers.dense(dim, self.patch ** 2 * self.out_channels, ("embed", None), rngs, jnp.float32)

  def positions(self, rows: int, columns: int):
    """The position table's centred crop for rows x columns patches [rows * columns, dim]."""
    if max(rows, columns) > self.max_size:
      raise ValueError(f"{rows} x {columns} patches: SD3's position table covers at most {self.max_size} a side "
                       f"({self.max_size * self.patch} latent pixels); make smaller images (--height, --width)")
    top, left = (self.max_size - rows) // 2, (self.max_size - columns) // 2
    table = self.pos_embed.pos_embed[...].reshape(self.max_size, self.max_size, -1)
    return table[top:top + rows, left:left + columns].reshape(rows * columns, -1)

  def __call__(self, x, timestep, text, pooled, skip_layers=()):
    """skip_layers: indices of blocks left out (both streams pass them unchanged: skip-layer guidance's pass)."""
    b, h, w, _ = x.shape
    p, rows, columns = self.patch, h // self.patch, w // self.patch
    tokens = self.pos_embed.proj(x.astype(jnp.float32)).reshape(b, rows * columns, -1)
    tokens = tokens + self.positions(rows, columns)[None]
    embed = self.time_text_embed
    mlp = lambda module, features: module.linear_2(nnx.silu(module.linear_1(features)))
    embedding = (mlp(embed.timestep_embedder, sd_unet.sinusoid(timestep.reshape(-1), 256, True, 0))
                 + mlp(embed.text_embedder, pooled.astype(jnp.float32)))
    context = self.context_embedder(text.astype(jnp.float32))
    run = lambda block, *args: block(*args)
    run = layers.rematerialised(run, self.remat_policy) if self.remat_policy else run
    for index, block in enumerate(self.transformer_blocks):
      if index not in skip_layers:
        tokens, context = run(block, tokens, context, embedding)
    scale, shift = jnp.split(self.norm_out.linear(nnx.silu(embedding)), 2, axis=-1)
    out = self.proj_out(modulated(standardized(tokens), shift, scale))
    out = out.reshape(b, rows, columns, p, p, self.out_channels).transpose(0, 1, 3, 2, 4, 5)
    return out.reshape(b, h, w, self.out_channels)


def load_diffusers(path, field: str = "model.sd3_path") -> SD3Transformer:
  """An SD3Transformer with the weights of a local diffusers directory (config.json and its safetensors, one file or
  the shards its index lists)."""
  return diffusers_directory.load(path, SD3Transformer, read_config(path, field))
