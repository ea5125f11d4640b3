"""HunyuanVideo's causal 3-D VAE (Kong et al. 2024; diffusers' `AutoencoderKLHunyuanVideo`): an autoencoder that
compresses time as well as space, the kind every latent video model since 2024 diffuses on (CogVideoX, Wan and
HunyuanVideo compress 4 frames into one).

Every convolution is 3-D and causal in time: a frame's features see it and the frames before it (padded in front by
repeating the first frame, and at the borders of space by repeating the edge: diffusers' replicate padding), never
the frames after. Some levels halve time as well as space (a stride-2 convolution), so a clip of 1 + r k frames
encodes to 1 + k latent frames (r = 4), the first of which holds the first frame alone; a still image is a one-frame
clip. The decoder mirrors it: each upsampling repeats every frame but the first in time as well as in space. The
middle blocks' single-head attention is causal too (each frame's positions attend to their own frame's and earlier
ones'). The group norms' statistics span the whole clip (as diffusers computes them), so later frames still move
earlier latents a little through them.

This module holds what differs from Stable Diffusion's VAE: the causal convolution, resampling in time and space,
and diffusers' rule for which levels do it. `autoencoder.py` assembles them in the layout of Stable Diffusion's
encoder and decoder (autoencoder.CAUSAL_PARTS, with its residual blocks and causally masked attention), and
`autoencoder.AutoencoderKL` (whose posterior, scaling and loading it shares) builds it when a config.json names this
class: clips [batch, frames, h, w, c] -> latents [batch, latent frames, h/f, w/f, latent_channels] -> clips.
"""

import math

import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models import layers

CLASS_NAME = "AutoencoderKLHunyuanVideo"
BLOCK_TYPES = {"HunyuanVideoDownBlock3D", "HunyuanVideoUpBlock3D"}
DEFAULTS = {"spatial_compression_ratio": 8, "temporal_compression_ratio": 4, "mid_block_add_attention": True,
            "norm_num_groups": 32, "layers_per_block": 2, "latent_channels": 16}
# What a causal autoencoder must share, beyond the image fields, with one it starts from (train.init_from).
LAYOUT_FIELDS = ("spatial_compression_ratio", "temporal_compression_ratio", "mid_block_add_attention")


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


def sampler(config: dict, level: int, channels: int, up: bool, rngs) -> nnx.Module | None:
  """The down- or upsampling module of a level of the encoder or decoder (level_factors), or None."""
  factors = level_factors(config)[level]
  return None if factors == (1, 1) else (Upsample if up else Downsample)(channels, factors, rngs)
