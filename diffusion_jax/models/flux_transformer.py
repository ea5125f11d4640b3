"""Flux's rectified-flow transformer (Black Forest Labs 2024; diffusers' `FluxTransformer2DModel`: FLUX.1 dev and
schnell, and the variants that read an image beside the latents: Fill, Depth / Canny, Kontext), loaded from a local
diffusers directory (`load_diffusers`: the `transformer/` folder of a Flux checkpoint).

Latent images are packed as Flux's pipelines pack them, 2 x 2 latent pixels a token (their channels in the order
channel, row, column), and embedded by one linear layer; the text tokens (T5's states, joint_attention_dim wide:
models/flux_text.py) are projected to the model width once. num_layers double-stream blocks run the text and image
tokens through one attention, each stream with its own projections, modulation and feed-forward (SD3's MMDiT block,
models/sd3_transformer.py, with the text tokens first and queries and keys RMS-normalised per head); then
num_single_layers single-stream blocks run the joined sequence through a parallel attention and MLP, projected out
together. Queries and keys are turned by 3-axis rotary embeddings of each token's ids (axes_dims_rope features of
a head for each axis: the text tokens' ids are 0, an image token's (0, row, column) of its packed grid). The
modulation is the embedding of the timestep, plus (FLUX.1 dev's guidance_embeds) that of the guidance scale the
model was distilled to follow, plus the pooled text embedding (CLIP's).

Call: x [batch, h, w, in_channels / 4] (latent images; h and w even; FLUX.1 Fill's: the latents, the known image's
latents and the mask, TextToImage.inpainting_condition; FLUX.1 Depth / Canny's: the latents and the control image's,
TextToImage.control_condition), timestep [batch] (1000 sigma on the flow path x = (1 -
sigma) x0 + sigma eps), text [batch, tokens, joint_attention_dim], pooled [batch, pooled_projection_dim], guidance
[batch] (the guidance scale; None without guidance_embeds), reference (FLUX.1 Kontext's: a reference image's
latents, their tokens beside the image's with ids (1, row, column); None: none) -> [batch, h, w, out_channels / 4]
float32, the prediction of the velocity eps - x0. `dtype`, `remat_policy`, `attention`, lora_rank and ff_lora_rank
as SD3's transformer's (the single blocks' MLP and output projections take ff_lora_rank's updates).
"""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax.models import diffusers_directory, layers, sd_unet
from diffusion_jax.models.sd3_transformer import Attention, JointBlock, modulated, modulation, standardized

CLASS_NAME = "FluxTransformer2DModel"
DEFAULTS = {"patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19, "num_single_layers": 38,
            "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
            "pooled_projection_dim": 768, "guidance_embeds": False, "axes_dims_rope": (16, 56, 56)}
PACK = 2  # latent pixels a token's side (the pipelines' _pack_latents)
THETA = 10000.0


def config_problems(config: dict) -> list[str]:
  """What this module cannot build from a FluxTransformer2DModel config.json."""
  c, found = DEFAULTS | config, []
  if c["patch_size"] != 1:
    found.append(f"patch_size={c['patch_size']}: only 1 (every Flux model's: the pipeline packs 2 x 2 latents)")
  out = c["out_channels"] or c["in_channels"]
  if c["in_channels"] % PACK ** 2 or out % PACK ** 2 or c["in_channels"] < out or out < c["in_channels"] < 2 * out:
    found.append(f"in_channels={c['in_channels']}, out_channels={c['out_channels']}: a text-to-image Flux maps "
                 "packed latents (4 x the latent channels) to as many; FLUX.1 Depth / Canny reads twice as many (a "
                 "control image's latents beside them), FLUX.1 Fill more (the known image's latents and a mask)")
  if sum(c["axes_dims_rope"]) != c["attention_head_dim"]:
    found.append(f"axes_dims_rope={list(c['axes_dims_rope'])} must sum to attention_head_dim="
                 f"{c['attention_head_dim']}")
  return found


def read_config(path, field: str = "model.flux_path") -> dict:
  """The config.json of a local diffusers FluxTransformer2DModel directory, with its class's defaults; a ValueError
  that says what is wrong, naming `field`."""
  return diffusers_directory.read_checked_config(path, field, CLASS_NAME, "transformer",
                                               "the transformer/ folder of a Flux checkpoint",
                                               DEFAULTS, config_problems)


def latent_channels(config: dict) -> int:
  """The channels of the latents a Flux transformer diffuses (its out_channels unpacked)."""
  c = DEFAULTS | config
  return (c["out_channels"] or c["in_channels"]) // PACK ** 2


def is_fill(config: dict) -> bool:
  """Whether a transformer's config.json is an inpainting model's (FLUX.1 Fill): it reads, beside the latents, the
  latents of the known image and where to generate (in_channels > 2 x out_channels)."""
  c = DEFAULTS | config
  return c["in_channels"] > 2 * (c["out_channels"] or c["in_channels"])


def is_control(config: dict) -> bool:
  """Whether a transformer's config.json is a structure-conditioned model's (FLUX.1 Depth / Canny): it reads a
  control image's latents (a depth map's, an edge map's) beside the latents (in_channels = 2 x out_channels)."""
  c = DEFAULTS | config
  return c["in_channels"] == 2 * (c["out_channels"] or c["in_channels"])


def image_ids(first: int, rows: int, columns: int) -> np.ndarray:
  """[rows * columns, 3] ids of an image's tokens, row-major: (first, row, column)."""
  rows_ids, columns_ids = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
  return np.stack([np.full(rows * columns, first), rows_ids.reshape(-1), columns_ids.reshape(-1)], axis=1)


def rotary_angles(text_tokens: int, rows: int, columns: int, axes_dims, reference=None) -> np.ndarray:
  """[text_tokens + rows * columns (+ the reference's), head_dim / 2] rotation angles of each token's feature pairs:
  the text tokens' ids 0, then the image tokens' (0, row, column), row-major, then, with `reference` (its rows,
  columns: FLUX.1 Kontext's), its tokens' (1, row, column); each axis's angles id x theta^(-2i / axis_dim)
  (diffusers' FluxPosEmbed)."""
  ids = np.concatenate([np.zeros((text_tokens, 3)), image_ids(0, rows, columns),
                        *([image_ids(1, *reference)] if reference else [])])
  return np.concatenate([np.outer(ids[:, axis], 1.0 / THETA ** (np.arange(0, dim, 2) / dim))
                         for axis, dim in enumerate(axes_dims)], axis=1).astype(np.float32)


def packed(x):
  """Latents [batch, h, w, c] -> Flux's tokens [batch, h / 2 * w / 2, 4 c]: each 2 x 2 block's channels in the order
  channel, row, column (the pipelines' _pack_latents)."""
  b, h, w, c = x.shape
  tokens = x.astype(jnp.float32).reshape(b, h // PACK, PACK, w // PACK, PACK, c).transpose(0, 1, 3, 5, 2, 4)
  return tokens.reshape(b, h // PACK * (w // PACK), c * PACK ** 2)


class SingleBlock(nnx.Module):
  """diffusers' FluxSingleTransformerBlock: the joined text and image tokens [batch, n, dim], modulated once, through
  an attention (no output projection of its own) beside a 4x-wide tanh-GELU MLP, both projected back by `proj_out`
  and gated. lora_rank: the attention's query, key and value updates; ff_lora_rank: proj_mlp's and proj_out's."""

  def __init__(self, dim, heads, rngs, dtype, implementation, lora_rank=0, ff_lora_rank=0):
    self.norm = modulation(dim, 3, rngs)
    self.proj_mlp = layers.dense(dim, 4 * dim, ("embed", "mlp"), rngs, dtype)
    self.proj_mlp_lora = layers.lora(dim, 4 * dim, ("embed", "mlp"), ff_lora_rank, rngs, dtype)
    self.attn = Attention(dim, heads, "rms_norm", rngs, dtype, implementation, lora_rank, joint=False, out=False)
    self.proj_out = layers.dense(5 * dim, dim, ("mlp", "embed"), rngs, dtype)
    self.proj_out_lora = layers.lora(5 * dim, dim, ("mlp", "embed"), ff_lora_rank, rngs, dtype)

  def __call__(self, x, embedding, angles):
    shift, scale, gate = jnp.split(self.norm.linear(nnx.silu(embedding)), 3, axis=-1)
    normed = modulated(standardized(x), shift, scale)
    mlp = nnx.gelu(layers.adapted(self, "proj_mlp", normed), approximate=True)
    attended = self.attn(normed, angles=angles)
    joined = jnp.concatenate([attended.astype(mlp.dtype), mlp], axis=-1)
    return x + gate[:, None] * layers.adapted(self, "proj_out", joined).astype(jnp.float32)


class FluxTransformer(nnx.Module):
  """diffusers' FluxTransformer2DModel of a config.json (read_config)."""

  def __init__(self, config: dict, *, rngs: nnx.Rngs, dtype="float32", remat_policy=None, attention="auto",
               lora_rank=0, ff_lora_rank=0):
    c, dtype = DEFAULTS | config, jnp.dtype(dtype)
    dim, heads = c["num_attention_heads"] * c["attention_head_dim"], c["num_attention_heads"]
    self.axes_dims, self.channels, self.remat_policy = tuple(c["axes_dims_rope"]), latent_channels(c), remat_policy
    self.x_embedder = layers.dense(c["in_channels"], dim, (None, "embed"), rngs, jnp.float32)
    self.time_text_embed = nnx.Module()
    self.time_text_embed.timestep_embedder = sd_unet.embedding_mlp(256, dim, rngs)
    self.time_text_embed.guidance_embedder = sd_unet.embedding_mlp(256, dim, rngs) if c["guidance_embeds"] else None
    self.time_text_embed.text_embedder = sd_unet.embedding_mlp(c["pooled_projection_dim"], dim, rngs)
    self.context_embedder = layers.dense(c["joint_attention_dim"], dim, ("text_embed", "embed"), rngs, jnp.float32)
    self.transformer_blocks = nnx.List([
        JointBlock(dim, heads, "rms_norm", rngs, dtype, attention, last=False, dual=False, lora_rank=lora_rank,
                   ff_lora_rank=ff_lora_rank) for _ in range(c["num_layers"])])
    self.single_transformer_blocks = nnx.List([
        SingleBlock(dim, heads, rngs, dtype, attention, lora_rank, ff_lora_rank)
        for _ in range(c["num_single_layers"])])
    self.norm_out = modulation(dim, 2, rngs)
    self.proj_out = layers.dense(dim, PACK ** 2 * self.channels, ("embed", None), rngs, jnp.float32)

  @property
  def guided(self) -> bool:
    """Whether the model reads the guidance scale it was distilled to follow (FLUX.1 dev)."""
    return self.time_text_embed.guidance_embedder is not None

  def __call__(self, x, timestep, text, pooled, guidance=None, reference=None):
    """reference: FLUX.1 Kontext's latents of a reference image [batch, h', w', c] (any even size), its tokens
    beside the image's (ids (1, row, column)) in every attention; the prediction is the image's."""
    b, h, w, _ = x.shape
    if self.guided and guidance is None:
      raise ValueError("This Flux model (guidance_embeds) reads the guidance scale it follows: give `guidance`")
    rows, columns = h // PACK, w // PACK
    tokens, grid = self.x_embedder(packed(x)), None
    if reference is not None:  # its tokens after the image's (its rows and columns of tokens: their ids)
      tokens = jnp.concatenate([tokens, self.x_embedder(packed(reference))], axis=1)
      grid = (reference.shape[1] // PACK, reference.shape[2] // PACK)
    embed = self.time_text_embed
    mlp = lambda module, values: module.linear_2(nnx.silu(module.linear_1(values)))
    embedding = (mlp(embed.timestep_embedder, sd_unet.sinusoid(timestep.reshape(-1), 256, True, 0))
                 + mlp(embed.text_embedder, pooled.astype(jnp.float32)))
    if self.guided:
      embedding = embedding + mlp(embed.guidance_embedder, sd_unet.sinusoid(1000.0 * guidance.reshape(-1), 256, True,
                                                                            0))
    context = self.context_embedder(text.astype(jnp.float32))
    angles = jnp.asarray(rotary_angles(text.shape[1], rows, columns, self.axes_dims, grid))
    # (the text first in the joint sequence: a constant of the call, not an argument remat would trace)
    double, single = lambda block, *args: block(*args, text_first=True), lambda block, *args: block(*args)
    if self.remat_policy:
      double, single = (layers.rematerialised(run, self.remat_policy) for run in (double, single))
    for block in self.transformer_blocks:
      tokens, context = double(block, tokens, context, embedding, angles)
    joined = jnp.concatenate([context, tokens], axis=1)
    for block in self.single_transformer_blocks:
      joined = single(block, joined, embedding, angles)
    scale, shift = jnp.split(self.norm_out.linear(nnx.silu(embedding)), 2, axis=-1)
    out = self.proj_out(modulated(standardized(joined[:, text.shape[1]:text.shape[1] + rows * columns]), shift, scale))
    out = out.reshape(b, rows, columns, self.channels, PACK, PACK).transpose(0, 1, 4, 2, 5, 3)
    return out.reshape(b, h, w, self.channels)


def load_diffusers(path, field: str = "model.flux_path") -> FluxTransformer:
  """A FluxTransformer with the weights of a local diffusers directory (config.json and its safetensors, one file
  or the shards its index lists)."""
  return diffusers_directory.load(path, FluxTransformer, read_config(path, field))
