"""Stable Diffusion's U-Net (Rombach et al. 2022; Podell et al. 2023 for SDXL; diffusers' `UNet2DConditionModel` of
SD 1.x, 2.x and SDXL), loaded from a local diffusers directory (`load_diffusers`: the `unet/` folder of a Stable
Diffusion checkpoint).

Levels of ResNet blocks (group norm, SiLU, 3x3 convolutions, the time embedding added between them) with, at the
levels `down_block_types` names CrossAttn*, a transformer after each ResNet block: a group norm, a projection in
(a 1x1 convolution, SD 1.x; a linear layer with `use_linear_projection`, SD 2.x and SDXL),
`transformer_layers_per_block` blocks (SDXL: 1, 2 and 10 by level; the middle block has the deepest level's) of
self-attention, cross-attention to the text (every text token: SD's pipelines pass no mask) and a GEGLU
feed-forward, each after a layer norm, then a projection out, added to its input. A strided convolution goes down a
level, nearest-neighbour upsampling and a convolution up; the up path reads every down-path output (concatenated
after its own features).
`attention_head_dim` is, as in diffusers, the number of heads of each level's attention (SD 1.x: 8; SD 2.x: 5,
10, 20, 20, 64-wide heads) unless `num_attention_heads` is given. SDXL's added embedding (addition_embed_type
'text_time') adds to the time embedding an MLP of its pooled text embedding beside the sinusoidal features of its
size and crop ids.

An inpainting U-Net (`is_inpainting`: in_channels = 2 out_channels + 1) reads its latents, a mask channel and the
known image's latents concatenated (models/text_to_image.py builds them).

Call: x [batch, h, w, in_channels] (latents; h and w divisible by 2^(levels - 1)), timestep [batch] (SD's discrete
timesteps 0..999, fractions allowed), text [batch, tokens, cross_attention_dim] (and for SDXL pooled [batch,
projection dim] and time_ids [batch, 6]: original height and width, crop top and left, target height and width)
-> [batch, h, w, out_channels] float32, the prediction the scheduler config names (eps or v). `dtype` (model.dtype)
is that of its convolutions, matrix products and attention; parameters, norms and the residual stream stay float32.
`remat_policy` (layers.REMAT_POLICIES) recomputes each ResNet block and transformer in the backward pass;
lora_rank, ff_lora_rank: a LoRA's low-rank updates of every attention's four projections and of the feed-forward's
two layers (0: none).

Not supported (config_problems refuses them): additional embeddings other than SDXL's, class embeddings (the x4
upscaler's), transformer depths given per block, dual or cross-only attention, other block types and
time-embedding options.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax import schedules
from diffusion_jax.models import attention, diffusers_directory, layers

CLASS_NAME = "UNet2DConditionModel"
DEFAULTS = {"in_channels": 4, "out_channels": 4, "flip_sin_to_cos": True, "freq_shift": 0,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
            "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "downsample_padding": 1,
            "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
            "cross_attention_dim": 1280, "transformer_layers_per_block": 1, "encoder_hid_dim": None,
            "attention_head_dim": 8, "num_attention_heads": None, "dual_cross_attention": False,
            "use_linear_projection": False, "class_embed_type": None, "addition_embed_type": None,
            "num_class_embeds": None, "resnet_time_scale_shift": "default", "time_embedding_type": "positional",
            "time_embedding_dim": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
            "center_input_sample": False, "resnet_out_scale_factor": 1.0, "attention_type": "default",
            "reverse_transformer_layers_per_block": None, "mid_block_only_cross_attention": None,
            "addition_time_embed_dim": None, "projection_class_embeddings_input_dim": None,
            "timestep_post_act": None, "class_embeddings_concat": False, "cross_attention_norm": None,
            "resnet_skip_time_act": False}
# Fields whose value must be the default (or None / False): what this module builds.
FIXED = ("mid_block_type", "only_cross_attention", "downsample_padding", "mid_block_scale_factor", "act_fn",
         "encoder_hid_dim", "dual_cross_attention", "class_embed_type", "num_class_embeds", "resnet_time_scale_shift",
         "time_embedding_type", "time_embedding_dim", "time_cond_proj_dim", "conv_in_kernel", "conv_out_kernel",
         "center_input_sample", "resnet_out_scale_factor", "attention_type", "reverse_transformer_layers_per_block",
         "mid_block_only_cross_attention", "timestep_post_act", "class_embeddings_concat", "cross_attention_norm",
         "resnet_skip_time_act")
TEXT_TIME = "text_time"  # SDXL's addition_embed_type
DOWN_TYPES, UP_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D")


def config_problems(config: dict) -> list[str]:
  """What this module cannot build from a UNet2DConditionModel config.json."""
  c = DEFAULTS | config
  found = [f"{key}={c[key]!r}" for key in FIXED if c[key] != DEFAULTS[key]]
  if c["addition_embed_type"] not in (None, TEXT_TIME):
    found.append(f"addition_embed_type={c['addition_embed_type']!r}")
  elif c["addition_embed_type"] and not all(isinstance(c[key], int) for key in (
      "addition_time_embed_dim", "projection_class_embeddings_input_dim")):
    found.append("addition_embed_type='text_time' without addition_time_embed_dim and "
                 "projection_class_embeddings_input_dim")
  levels = len(c["block_out_channels"])
  if [t for t in c["down_block_types"] if t not in DOWN_TYPES] or [t for t in c["up_block_types"]
                                                                   if t not in UP_TYPES]:
    found.append(f"down_block_types={c['down_block_types']}, up_block_types={c['up_block_types']}: only "
                 f"{DOWN_TYPES} and {UP_TYPES}")
  elif [t.startswith("CrossAttn") for t in c["down_block_types"]] != [
      t.startswith("CrossAttn") for t in reversed(c["up_block_types"])] or len(c["down_block_types"]) != levels:
    found.append("down_block_types and up_block_types must mirror each other, one per block_out_channels entry")
  found += [f"{key}={c[key]}: one value for every level" for key in ("layers_per_block", "cross_attention_dim",
                                                                       "use_linear_projection")
            if isinstance(c[key], (list, tuple))]
  found += [f"{key}={c[key]}: one entry per level of block_out_channels" for key in (
      "attention_head_dim", "num_attention_heads", "transformer_layers_per_block")
            if isinstance(c[key], (list, tuple)) and len(c[key]) != levels]
  if any(isinstance(n, (list, tuple)) for n in per_level(c["transformer_layers_per_block"], levels)):
    found.append(f"transformer_layers_per_block={c['transformer_layers_per_block']}: one depth per level, not per "
                 "block")
  return [f"{', '.join(found)}: not supported (SD 1.x, 2.x and SDXL U-Nets are; the x4 upscaler's is not)"
          ] if found else []


def is_inpainting(config: dict) -> bool:
  """Whether a U-Net config is an inpainting model's (SD's inpainting checkpoints): it reads its latents, a mask
  channel and the known image's latents (in_channels = 2 out_channels + 1)."""
  c = DEFAULTS | config
  return c["in_channels"] == 2 * c["out_channels"] + 1


def read_config(path, field: str = "model.sd_unet_path") -> dict:
  """The config.json of a local diffusers UNet2DConditionModel directory, with its class's defaults; a ValueError
  that says what is wrong, naming `field`."""
  return diffusers_directory.read_checked_config(path, field, CLASS_NAME, "unet",
                                               "the unet/ folder of a Stable Diffusion checkpoint",
                                               DEFAULTS, config_problems)


def timestep(logsnr):
  """SD's timestep [batch] (0..999, fractional between its table's entries) of log-SNRs [batch] on the VP path: where
  its training table (scaled-linear betas from 0.00085 to 0.012, 1,000 steps) has that log-SNR, clamped to its
  ends."""
  table = np.asarray(schedules.logsnr_from_alphas_cumprod(schedules.alphas_cumprod_from_betas(
      schedules.betas("scaled_linear"))), np.float32)  # decreasing in the timestep
  return jnp.interp(-logsnr.astype(jnp.float32), -table, np.arange(len(table), dtype=np.float32))


def per_level(value, levels: int) -> list:
  return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def heads_per_level(config: dict) -> list[int]:
  """Heads of each level's attention (diffusers reads attention_head_dim as the head count when
  num_attention_heads is not given)."""
  c = DEFAULTS | config
  return per_level(c["num_attention_heads"] or c["attention_head_dim"], len(c["block_out_channels"]))


def conv(in_ch, out_ch, kernel, rngs, dtype, stride=1):
  """A PyTorch-padded convolution: (kernel - 1) / 2 zeros on each side (with stride 2, not XLA's "SAME")."""
  pad = (kernel - 1) // 2
  return layers.conv(in_ch, out_ch, kernel, rngs, dtype, stride=stride, padding=((pad, pad), (pad, pad)))


def group_norm(channels, groups, eps, rngs):
  return layers.GroupNorm(channels, num_groups=groups, epsilon=eps, rngs=rngs, scale_metadata=layers.names("norm"),
                          bias_metadata=layers.names("norm"))


class ResnetBlock(nnx.Module):
  """diffusers' ResnetBlock2D: x [batch, h, w, in_ch], time [batch, time_dim] -> [batch, h, w, out_ch]."""

  def __init__(self, in_ch, out_ch, time_dim, c, rngs, dtype):
    self.norm1 = group_norm(in_ch, c["norm_num_groups"], c["norm_eps"], rngs)
    self.conv1 = conv(in_ch, out_ch, 3, rngs, dtype)
    self.time_emb_proj = layers.dense(time_dim, out_ch, ("embed", "conv_out"), rngs, jnp.float32)
    self.norm2 = group_norm(out_ch, c["norm_num_groups"], c["norm_eps"], rngs)
    self.conv2 = conv(out_ch, out_ch, 3, rngs, dtype)
    self.conv_shortcut = conv(in_ch, out_ch, 1, rngs, dtype) if in_ch != out_ch else None

  def __call__(self, x, time):
    h = self.conv1(nnx.silu(self.norm1(x))).astype(jnp.float32)
    h = h + self.time_emb_proj(nnx.silu(time))[:, None, None]
    h = self.conv2(nnx.silu(self.norm2(h))).astype(jnp.float32)
    return (x if self.conv_shortcut is None else self.conv_shortcut(x).astype(jnp.float32)) + h


class Attention(nnx.Module):
  """diffusers' Attention of a BasicTransformerBlock: x [batch, n, dim] attends to context [batch, m, context_dim]
  (itself when None); unbiased q, k, v projections, a biased output projection; their low-rank updates `to_q_lora`,
  `to_k_lora`, `to_v_lora`, `to_out_lora[0]` of lora_rank (0: none)."""

  def __init__(self, dim, context_dim, heads, rngs, dtype, implementation, lora_rank=0):
    self.heads, self.dtype, self.implementation = heads, dtype, implementation
    self.to_q = layers.dense(dim, dim, ("embed", "heads"), rngs, dtype, use_bias=False)
    self.to_k, self.to_v = (layers.dense(context_dim, dim, ("text_embed", "heads"), rngs, dtype, use_bias=False)
                            for _ in range(2))
    self.to_out = nnx.List([layers.dense(dim, dim, ("heads", "embed"), rngs, dtype)])
    self.to_q_lora = layers.lora(dim, dim, ("embed", "heads"), lora_rank, rngs, dtype)
    self.to_k_lora, self.to_v_lora = (layers.lora(context_dim, dim, ("text_embed", "heads"), lora_rank, rngs, dtype)
                                      for _ in range(2))
    self.to_out_lora = nnx.List([layers.lora(dim, dim, ("heads", "embed"), lora_rank, rngs, dtype)])

  def __call__(self, x, context=None):
    context = x if context is None else context
    split = lambda t: t.reshape(t.shape[:2] + (self.heads, -1)).astype(self.dtype)
    out = attention.dot_product_attention(split(layers.adapted(self, "to_q", x)),
                                          split(layers.adapted(self, "to_k", context)),
                                          split(layers.adapted(self, "to_v", context)),
                                          implementation=self.implementation)
    return layers.adapted_in_list(self, "to_out", 0, out.reshape(x.shape[:2] + (-1,))).astype(jnp.float32)


class GEGLU(nnx.Module):
  """The feed-forward's first layer: a projection to twice the hidden width (and its low-rank update `proj_lora`),
  half of it gating the other through the exact GELU."""

  def __init__(self, dim, hidden, rngs, dtype, lora_rank=0):
    self.proj = layers.dense(dim, 2 * hidden, ("embed", "mlp"), rngs, dtype)
    self.proj_lora = layers.lora(dim, 2 * hidden, ("embed", "mlp"), lora_rank, rngs, dtype)

  def __call__(self, x):
    h, gate = jnp.split(layers.adapted(self, "proj", x).astype(jnp.float32), 2, axis=-1)
    return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
  """GEGLU, then a projection back (its low-rank update: `net_lora[2]`)."""

  def __init__(self, dim, rngs, dtype, lora_rank=0):
    self.net = nnx.List([GEGLU(dim, 4 * dim, rngs, dtype, lora_rank), None,
                         layers.dense(4 * dim, dim, ("mlp", "embed"), rngs, dtype)])
    self.net_lora = nnx.List([None, None, layers.lora(4 * dim, dim, ("mlp", "embed"), lora_rank, rngs, dtype)])

  def __call__(self, x):
    return layers.adapted_in_list(self, "net", 2, self.net[0](x)).astype(jnp.float32)


class TransformerBlock(nnx.Module):
  """diffusers' BasicTransformerBlock: self-attention, cross-attention, feed-forward, each after a layer norm."""

  def __init__(self, dim, context_dim, heads, rngs, dtype, implementation, lora_rank=0, ff_lora_rank=0):
    norm = lambda: nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs, scale_metadata=layers.names("norm"),
                                 bias_metadata=layers.names("norm"))
    self.norm1, self.norm2, self.norm3 = norm(), norm(), norm()
    self.attn1 = Attention(dim, dim, heads, rngs, dtype, implementation, lora_rank)
    self.attn2 = Attention(dim, context_dim, heads, rngs, dtype, implementation, lora_rank)
    self.ff = FeedForward(dim, rngs, dtype, ff_lora_rank)

  def __call__(self, tokens, text):
    tokens = tokens + self.attn1(self.norm1(tokens))
    tokens = tokens + self.attn2(self.norm2(tokens), text)
    return tokens + self.ff(self.norm3(tokens))


class Transformer(nnx.Module):
  """diffusers' Transformer2DModel (`depth` blocks): x [batch, h, w, ch], text -> [batch, h, w, ch]."""

  def __init__(self, channels, heads, depth, c, rngs, dtype, implementation, lora_rank=0, ff_lora_rank=0):
    self.linear = c["use_linear_projection"]
    self.norm = group_norm(channels, c["norm_num_groups"], 1e-6, rngs)
    project = ((lambda: layers.dense(channels, channels, ("embed", "embed"), rngs, dtype)) if self.linear else
               (lambda: conv(channels, channels, 1, rngs, dtype)))
    self.proj_in = project()
    self.transformer_blocks = nnx.List([TransformerBlock(channels, c["cross_attention_dim"], heads, rngs, dtype,
                                                         implementation, lora_rank, ff_lora_rank)
                                        for _ in range(depth)])
    self.proj_out = project()

  def __call__(self, x, text):
    b, h, w, ch = x.shape
    tokens = self.proj_in(self.norm(x)).astype(jnp.float32).reshape(b, h * w, ch)
    for block in self.transformer_blocks:
      tokens = block(tokens, text)
    return x + self.proj_out(tokens.reshape(b, h, w, ch)).astype(jnp.float32)


class Resample(nnx.Module):
  """Downsample2D (a stride-2 convolution) or Upsample2D (nearest-neighbour 2x, then a convolution)."""

  def __init__(self, channels, up, rngs, dtype):
    self.up = up
    self.conv = conv(channels, channels, 3, rngs, dtype, stride=1 if up else 2)

  def __call__(self, x):
    if self.up:
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return self.conv(x).astype(jnp.float32)


def run(module, *args):
  return module(*args)


class Block(nnx.Module):
  """A level of the down or up path: `resnets`, `attentions` after each (cross-attention levels), and a resampler
  (`downsamplers` / `upsamplers`), as diffusers names them. make_transformer(channels, heads, depth) -> a Transformer;
  call(module, *args): how each ResNet block and transformer runs (rematerialised or not)."""

  def __init__(self, resnet_channels, out_ch, time_dim, heads, depth, attends, resample, up, c, rngs, dtype,
               make_transformer):
    self.resnets = nnx.List([ResnetBlock(in_ch, out_ch, time_dim, c, rngs, dtype) for in_ch in resnet_channels])
    self.attentions = (nnx.List([make_transformer(out_ch, heads, depth) for _ in resnet_channels]) if attends
                       else None)
    samplers = nnx.List([Resample(out_ch, up, rngs, dtype)]) if resample else None
    self.upsamplers, self.downsamplers = (samplers, None) if up else (None, samplers)

  def down(self, x, time, text, skips: list, call=run):
    for k, resnet in enumerate(self.resnets):
      x = call(resnet, x, time)
      x = call(self.attentions[k], x, text) if self.attentions is not None else x
      skips.append(x)
    if self.downsamplers is not None:
      x = self.downsamplers[0](x)
      skips.append(x)
    return x

  def up(self, x, time, text, skips: list, call=run):
    for k, resnet in enumerate(self.resnets):
      x = call(resnet, jnp.concatenate([x, skips.pop()], axis=-1), time)
      x = call(self.attentions[k], x, text) if self.attentions is not None else x
    return self.upsamplers[0](x) if self.upsamplers is not None else x


class MidBlock(nnx.Module):
  def __init__(self, channels, time_dim, heads, depth, c, rngs, dtype, make_transformer):
    self.resnets = nnx.List([ResnetBlock(channels, channels, time_dim, c, rngs, dtype) for _ in range(2)])
    self.attentions = nnx.List([make_transformer(channels, heads, depth)])

  def __call__(self, x, time, text, call=run):
    x = call(self.resnets[0], x, time)
    return call(self.resnets[1], call(self.attentions[0], x, text), time)


def sinusoid(values, dim: int, flip_sin_to_cos: bool, freq_shift: float):
  """diffusers' Timesteps: values [n] -> sinusoidal features [n, dim] at frequencies exp(-log(10000) i / (dim / 2 -
  freq_shift)), cos first when flip_sin_to_cos."""
  half = dim // 2
  freqs = jnp.exp(-np.log(10000.0) * jnp.arange(half) / (half - freq_shift))
  args = values.astype(jnp.float32)[:, None] * freqs[None]
  sin, cos = jnp.sin(args), jnp.cos(args)
  return jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)


def embedding_mlp(in_dim, out_dim, rngs):
  """diffusers' TimestepEmbedding: linear_1, SiLU, linear_2."""
  mlp = nnx.Module()
  mlp.linear_1 = layers.dense(in_dim, out_dim, (None, "embed"), rngs, jnp.float32)
  mlp.linear_2 = layers.dense(out_dim, out_dim, ("embed", "embed"), rngs, jnp.float32)
  return mlp


class SDUNet(nnx.Module):
  """diffusers' UNet2DConditionModel of a config.json (read_config)."""

  def __init__(self, config: dict, *, rngs: nnx.Rngs, dtype="float32", attention="auto", remat_policy=None,
               lora_rank=0, ff_lora_rank=0):
    c, dtype = DEFAULTS | config, jnp.dtype(dtype)
    self.remat_policy = remat_policy
    make_transformer = lambda channels, heads, depth: Transformer(channels, heads, depth, c, rngs, dtype, attention,
                                                                  lora_rank, ff_lora_rank)
    channels, levels = c["block_out_channels"], len(c["block_out_channels"])
    heads, per_layer = heads_per_level(c), c["layers_per_block"]
    depths = per_level(c["transformer_layers_per_block"], levels)
    self.flip_sin_to_cos, self.freq_shift, self.channels = c["flip_sin_to_cos"], c["freq_shift"], channels[0]
    self.cross_attention_dim = c["cross_attention_dim"]
    time_dim = 4 * channels[0]
    self.conv_in = conv(c["in_channels"], channels[0], 3, rngs, dtype)
    self.time_embedding = embedding_mlp(channels[0], time_dim, rngs)
    self.added_time_dim = c["addition_time_embed_dim"] if c["addition_embed_type"] == TEXT_TIME else None
    self.add_embedding = (embedding_mlp(c["projection_class_embeddings_input_dim"], time_dim, rngs)
                          if self.added_time_dim else None)
    attends = [t.startswith("CrossAttn") for t in c["down_block_types"]]
    self.down_blocks = nnx.List([
        Block([channels[max(i - 1, 0)]] + [channels[i]] * (per_layer - 1), channels[i], time_dim, heads[i], depths[i],
              attends[i], i < levels - 1, False, c, rngs, dtype, make_transformer) for i in range(levels)])
    self.mid_block = MidBlock(channels[-1], time_dim, heads[-1], depths[-1], c, rngs, dtype, make_transformer)
    up_blocks, previous = [], channels[-1]
    for i in reversed(range(levels)):  # the up path's level i, deepest first
      skips = [channels[i]] * per_layer + [channels[max(i - 1, 0)]]  # what the down path kept, popped in turn
      inputs = [previous + skips[0]] + [channels[i] + s for s in skips[1:]]
      up_blocks.append(Block(inputs, channels[i], time_dim, heads[i], depths[i], attends[i], i > 0, True, c, rngs,
                             dtype, make_transformer))
      previous = channels[i]
    self.up_blocks = nnx.List(up_blocks)
    self.conv_norm_out = group_norm(channels[0], c["norm_num_groups"], c["norm_eps"], rngs)
    self.conv_out = conv(channels[0], c["out_channels"], 3, rngs, dtype)

  def embedding(self, timestep, pooled=None, time_ids=None):
    """The time embedding [batch, 4 channels]: an MLP of the timestep's sinusoidal features, plus (SDXL) one of the
    pooled text embedding [batch, p] beside its time ids' [batch, k] features."""
    mlp = self.time_embedding
    time = mlp.linear_2(nnx.silu(mlp.linear_1(sinusoid(timestep, self.channels, self.flip_sin_to_cos,
                                                       self.freq_shift))))
    if self.add_embedding is None:
      return time
    if pooled is None or time_ids is None:
      raise ValueError("SDXL's U-Net (addition_embed_type='text_time') needs the pooled text embedding and time ids")
    ids = sinusoid(time_ids.reshape(-1), self.added_time_dim, self.flip_sin_to_cos, self.freq_shift)
    added = jnp.concatenate([pooled.astype(jnp.float32), ids.reshape(pooled.shape[0], -1)], axis=-1)
    return time + self.add_embedding.linear_2(nnx.silu(self.add_embedding.linear_1(added)))

  def __call__(self, x, timestep, text, pooled=None, time_ids=None):
    time = self.embedding(timestep, pooled, time_ids)
    text = text.astype(jnp.float32)
    x = self.conv_in(x.astype(jnp.float32)).astype(jnp.float32)
    call = layers.rematerialised(run, self.remat_policy) if self.remat_policy else run
    skips = [x]
    for block in self.down_blocks:
      x = block.down(x, time, text, skips, call)
    x = self.mid_block(x, time, text, call)
    for block in self.up_blocks:
      x = block.up(x, time, text, skips, call)
    return self.conv_out(nnx.silu(self.conv_norm_out(x))).astype(jnp.float32)


def tensor_shapes(path, field: str = "model.sd_unet_path") -> dict:
  """{tensor name: shape} of what load_diffusers reads from a local diffusers directory's weights (from its
  config.json alone)."""
  return diffusers_directory.tensor_shapes(SDUNet, read_config(path, field))


def load_diffusers(path, field: str = "model.sd_unet_path") -> SDUNet:
  """An SDUNet with the weights of a local diffusers directory (config.json and its safetensors, one file or the
  shards its index lists)."""
  return diffusers_directory.load(path, SDUNet, read_config(path, field))
