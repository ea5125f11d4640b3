"""HunyuanVideo's causal 3-D VAE (Kong et al. 2024; diffusers' `AutoencoderKLHunyuanVideo`): an autoencoder that
compresses time as well as space, the kind every latent video model since 2024 diffuses on (CogVideoX, Wan and
HunyuanVideo compress 4 frames into one).

Every convolution is 3-D and causal in time: a frame's features see it and the frames before it (padded in front by
repeating the first frame, and at the borders of space by repeating the edge: diffusers' replicate padding), never
the frames after. Some levels halve time as well as space (a stride-2 convolution), so a clip of 1 + r k frames
encodes to 1 + k latent frames (r = 4), the first of which is the first frame's alone: a still image is a one-frame
clip. The decoder mirrors it: each upsampling repeats every frame but the first in time as well as in space. The
middle blocks' single-head attention is causal too (each frame's positions attend to their own frame's and earlier
ones'), and group norms span the whole clip.

Used through `autoencoder.AutoencoderKL` (whose posterior, scaling and loading it shares) when a config.json names
this class: `Encoder` clips [batch, frames, h, w, c] -> [batch, latent frames, h/f, w/f, 2 latent_channels],
`Decoder` latents [batch, latent frames, h/f, w/f, latent_channels] -> clips [batch, frames, h, w, c].
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models import layers

CLASS_NAME = "AutoencoderKLHunyuanVideo"
BLOCK_TYPES = {"HunyuanVideoDownBlock3D", "HunyuanVideoUpBlock3D"}
DEFAULTS = {"spatial_compression_ratio": 8, "temporal_compression_ratio": 4, "mid_block_add_attention": True,
            "norm_num_groups": 32, "layers_per_block": 2, "latent_channels": 16}
EPSILON = 1e-6


def config_problems(config: dict) -> list[str]:
  """What diffusers' AutoencoderKLHunyuanVideo (and so this module) cannot build from a config.json."""
  c, found = DEFAULTS | config, []
  if c["temporal_compression_ratio"] != 4:
    found.append(f"temporal_compression_ratio={c['temporal_compression_ratio']}: diffusers' decoder of this class "
                 "supports 4 only")
  if c["spatial_compression_ratio"] < 1 or c["spatial_compression_ratio"] & (c["spatial_compression_ratio"] - 1):
    found.append(f"spatial_compression_ratio={c['spatial_compression_ratio']} must be a power of 2")
  return found


def level_factors(config: dict) -> list[tuple[int, int]]:
  """Per level of the encoder (and of the decoder, which mirrors it), its (time, space) down- or upsampling factor,
  1 where it has none: diffusers' rule, space at the first log2(spatial ratio) levels, time (ratio 4) at the two
  levels before the last."""
  c = DEFAULTS | config
  levels = len(c["block_out_channels"])
  space, time = int(math.log2(c["spatial_compression_ratio"])), int(math.log2(c["temporal_compression_ratio"]))
  return [(2 if levels - 1 - time <= i < levels - 1 else 1, 2 if i < space else 1) for i in range(levels)]


def compression(config: dict) -> tuple[int, int]:
  """(time, space): how many frames one latent frame holds (but the first, which holds one) and the latents'
  downsampling factor."""
  factors = level_factors(config)
  return math.prod(t for t, _ in factors), math.prod(s for _, s in factors)


def latent_frames(config: dict, frames: int) -> int:
  """Latent frames of a clip of `frames` frames (1 + (frames - 1) / r when r divides frames - 1)."""
  for time, _ in level_factors(config):
    frames = (frames - 1) // time + 1
  return frames


class CausalConv(nnx.Module):
  """A k x k x k convolution causal in time: clips [batch, frames, h, w, in] padded by repeating the first frame
  k - 1 times in front and each spatial edge k // 2 times, then convolved without padding (stride (t, s, s))."""

  def __init__(self, in_ch, out_ch, kernel, rngs, stride=(1, 1, 1)):
    self.kernel = kernel
    self.conv = layers.conv(in_ch, out_ch, (kernel,) * 3, rngs, jnp.float32, stride=stride, padding="VALID")

  def __call__(self, x):
    k = self.kernel
    if k > 1:
      x = jnp.pad(x, ((0, 0), (k - 1, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)), mode="edge")
    return self.conv(x)


def group_norm(channels, groups, rngs):
  return layers.group_norm(channels, rngs, jnp.float32, groups=groups, epsilon=EPSILON)


class ResnetBlock(nnx.Module):
  """GroupNorm-SiLU-causal conv twice, plus the input (through a 1x1x1 conv when the width changes)."""

  def __init__(self, in_ch, out_ch, groups, rngs):
    self.norm1, self.conv1 = group_norm(in_ch, groups, rngs), CausalConv(in_ch, out_ch, 3, rngs)
    self.norm2, self.conv2 = group_norm(out_ch, groups, rngs), CausalConv(out_ch, out_ch, 3, rngs)
    self.conv_shortcut = CausalConv(in_ch, out_ch, 1, rngs) if in_ch != out_ch else None

  def __call__(self, x):
    h = self.conv2(nnx.silu(self.norm2(self.conv1(nnx.silu(self.norm1(x))))))
    return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class CausalAttention(nnx.Module):
  """Single-head self-attention over a clip's positions, each attending to its own frame's and earlier frames'
  (after a GroupNorm, with a residual)."""

  def __init__(self, channels, groups, rngs):
    self.group_norm = group_norm(channels, groups, rngs)
    projection = lambda: layers.dense(channels, channels, ("embed", "heads"), rngs, jnp.float32)
    self.to_q, self.to_k, self.to_v = projection(), projection(), projection()
    self.to_out = nnx.List([layers.dense(channels, channels, ("heads", "embed"), rngs, jnp.float32)])

  def __call__(self, x):
    b, t, h, w, c = x.shape
    tokens = self.group_norm(x).reshape(b, t * h * w, 1, c)
    frame = jnp.repeat(jnp.arange(t), h * w)
    mask = frame[:, None] >= frame[None, :]
    out = jax.nn.dot_product_attention(self.to_q(tokens), self.to_k(tokens), self.to_v(tokens), mask=mask)
    return x + self.to_out[0](out.reshape(x.shape))


class MidBlock(nnx.Module):
  def __init__(self, channels, groups, attention, rngs):
    self.resnets = nnx.List([ResnetBlock(channels, channels, groups, rngs) for _ in range(2)])
    self.attentions = nnx.List([CausalAttention(channels, groups, rngs)]) if attention else None

  def __call__(self, x):
    x = self.resnets[0](x)
    if self.attentions is not None:
      x = self.attentions[0](x)
    return self.resnets[1](x)


class Upsample(nnx.Module):
  """Nearest-neighbour upsampling by (time, space) (the first frame in space only), then a causal conv."""

  def __init__(self, channels, factors, rngs):
    self.factors = factors
    self.conv = CausalConv(channels, channels, 3, rngs)

  def __call__(self, x):
    time, space = self.factors
    x = jnp.repeat(jnp.repeat(x, space, axis=2), space, axis=3)
    x = jnp.concatenate([x[:, :1], jnp.repeat(x[:, 1:], time, axis=1)], axis=1)
    return self.conv(x)


class Downsample(nnx.Module):
  """A causal conv of stride (time, space, space)."""

  def __init__(self, channels, factors, rngs):
    time, space = factors
    self.conv = CausalConv(channels, channels, 3, rngs, stride=(time, space, space))

  def __call__(self, x):
    return self.conv(x)


class Level(nnx.Module):
  """Residual blocks at one resolution, then the level's down- or upsampling (if it has any)."""

  def __init__(self, in_ch, out_ch, blocks, groups, factors, up, rngs):
    self.resnets = nnx.List([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups, rngs) for i in range(blocks)])
    self.samplers_name = "upsamplers" if up else "downsamplers"  # diffusers' names
    sampler = (Upsample if up else Downsample)(out_ch, factors, rngs) if factors != (1, 1) else None
    setattr(self, self.samplers_name, None if sampler is None else nnx.List([sampler]))

  def __call__(self, x):
    for block in self.resnets:
      x = block(x)
    samplers = getattr(self, self.samplers_name)
    return x if samplers is None else samplers[0](x)


class Encoder(nnx.Module):
  def __init__(self, config: dict, rngs):
    c = DEFAULTS | config
    widths, groups = c["block_out_channels"], c["norm_num_groups"]
    self.conv_in = CausalConv(c["in_channels"], widths[0], 3, rngs)
    self.down_blocks = nnx.List([
        Level(widths[max(i - 1, 0)], width, c["layers_per_block"], groups, factors, False, rngs)
        for i, (width, factors) in enumerate(zip(widths, level_factors(c)))])
    self.mid_block = MidBlock(widths[-1], groups, c["mid_block_add_attention"], rngs)
    self.conv_norm_out = group_norm(widths[-1], groups, rngs)
    self.conv_out = CausalConv(widths[-1], 2 * c["latent_channels"], 3, rngs)

  def __call__(self, x):
    x = self.conv_in(x)
    for level in self.down_blocks:
      x = level(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nnx.Module):
  def __init__(self, config: dict, rngs):
    c = DEFAULTS | config
    widths, groups = c["block_out_channels"][::-1], c["norm_num_groups"]
    self.conv_in = CausalConv(c["latent_channels"], widths[0], 3, rngs)
    self.mid_block = MidBlock(widths[0], groups, c["mid_block_add_attention"], rngs)
    self.up_blocks = nnx.List([
        Level(widths[max(i - 1, 0)], width, c["layers_per_block"] + 1, groups, factors, True, rngs)
        for i, (width, factors) in enumerate(zip(widths, level_factors(c)))])
    self.conv_norm_out = group_norm(widths[-1], groups, rngs)
    self.conv_out = CausalConv(widths[-1], c["out_channels"], 3, rngs)

  def __call__(self, z):
    x = self.mid_block(self.conv_in(z))
    for level in self.up_blocks:
      x = level(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))
