"""CogVideoX's causal 3-D VAE (Yang et al. 2024; diffusers' `AutoencoderKLCogVideoX`): clips [batch, 1 + 4k frames,
h, w, 3] -> latents [batch, 1 + k, h/f, w/f, latent_channels] -> clips, loaded (frozen) from a local diffusers
directory for a latent video model (`latent.autoencoder_path`; `autoencoder.AutoencoderKL` builds it when
config.json names this class). f = 2^(levels - 1); time is halved at the first two levels.

Its layout is Stable Diffusion's with 3-D convolutions, causal in time (the first frame repeated in front, zero
pixels around), group norms, no attention, and a decoder whose norms are spatial norms (Zheng et al. 2022, MoVQ):
group-normed features scaled and shifted by 1x1x1 convolutions of the latents, resized to the features' frames and
pixels (nearest; the clip's first latent frame to its first frame alone). Space is resampled per frame (a stride-2
3x3 convolution, padded on the bottom and right; nearest 2x then a 3x3 convolution); time by averaging pairs of
frames and by repeating each frame, the clip's first frame staying alone either way.

diffusers encodes a clip in chunks of 8 frames (the first chunk takes the remainder: 9 frames of a 1 + 8k clip) and
decodes its latents 2 latent frames at a time (the first chunk 3), each causal convolution caching the frames the
next chunk reads. Unlike Wan's, this is not the whole clip at once: each group norm's statistics span only its
chunk's frames. So it runs here in the same chunks (`streaming.streamed`), which also holds one chunk's activations
at a time. A chunk of an even number of latent frames decodes with no first frame set apart (diffusers' decoder turns
2 latent frames into 8 frames, not 5), so a clip decodes back to its length only with an odd number of latent
frames: clips of 1 + 8k frames (`autoencoder.frames_problem`).

Not supported (config_problems refuses them): a time compression other than 4, quant and post-quant convolutions
(which no CogVideoX checkpoint has and diffusers builds with the wrong width), activations other than SiLU.
`invert_scale_latents` (read only by diffusers' CogVideoX image-to-video pipeline, which then divides the image's
latents by the scaling factor) concerns that pipeline's transformer input, not the autoencoder: latents are scaled
as Stable Diffusion's.
"""

import functools

import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models import layers, streaming

CLASS_NAME = "AutoencoderKLCogVideoX"
BLOCK_TYPES = {"CogVideoXDownBlock3D", "CogVideoXUpBlock3D"}
DEFAULTS = {"in_channels": 3, "out_channels": 3, "block_out_channels": [128, 256, 256, 512], "latent_channels": 16,
            "layers_per_block": 3, "act_fn": "silu", "norm_eps": 1e-6, "norm_num_groups": 32,
            "temporal_compression_ratio": 4, "scaling_factor": 1.15258426, "shift_factor": None,
            "use_quant_conv": False, "use_post_quant_conv": False}
TIME_LEVELS = 2  # the first levels, which halve time too (temporal_compression_ratio 4)
FRAMES_CHUNK, LATENT_FRAMES_CHUNK = 8, 2  # diffusers' num_sample_frames_batch_size, num_latent_frames_batch_size


def config_problems(config: dict) -> list[str]:
  """What this module cannot build from an AutoencoderKLCogVideoX config.json."""
  c, found = DEFAULTS | config, []
  if c["temporal_compression_ratio"] != 4:
    found.append(f"temporal_compression_ratio={c['temporal_compression_ratio']}: diffusers reads clips 8 frames and "
                 "2 latent frames at a time, which only a ratio of 4 maps into each other")
  if len(c["block_out_channels"]) <= TIME_LEVELS:
    found.append(f"block_out_channels {list(c['block_out_channels'])}: time is halved at the first {TIME_LEVELS} "
                 f"levels, and the last level does not resample: give at least {TIME_LEVELS + 1} levels")
  for field in ("down_block_types", "up_block_types"):
    if field in c and len(c[field]) != len(c["block_out_channels"]):
      found.append(f"{field} has {len(c[field])} blocks, block_out_channels {len(c['block_out_channels'])} levels")
  found += [f"{field}=true: no CogVideoX checkpoint has it (and diffusers' {CLASS_NAME} builds it for "
            "out_channels, not latent_channels): set it false" for field in ("use_quant_conv", "use_post_quant_conv")
            if c[field]]
  if c["act_fn"] != "silu":
    found.append(f"act_fn={c['act_fn']!r}: only 'silu' (CogVideoX's) is supported")
  return found


def fields(config: dict) -> dict:
  """config.json with this class's defaults (what diffusers takes for the fields it leaves out)."""
  return DEFAULTS | config


def first_chunk(frames: int, chunk: int) -> int:
  """Frames of diffusers' first chunk of a clip read `chunk` frames at a time: the first chunk takes the remainder."""
  return frames - chunk * (max(frames // chunk, 1) - 1)


def encoded(encoder, x):
  """Clips [batch, 1 + 4k, h, w, in] -> the posterior's moments [batch, 1 + k, h/f, w/f, 2 latent_channels], run
  in diffusers' chunks."""
  if x.shape[1] % 4 != 1:
    raise ValueError(f"{CLASS_NAME} encodes clips of 1 + 4 k frames, not {x.shape[1]}: cut or pad them to e.g. "
                     f"{1 + 4 * max(round((x.shape[1] - 1) / 4), 1)}")
  return streaming.streamed(encoder, x, FRAMES_CHUNK, first_chunk(x.shape[1], FRAMES_CHUNK))


def decoded(decoder, z):
  """Latents [batch, 1 + 2k, h/f, w/f, latent_channels] -> clips [batch, 1 + 8k, h, w, out], run in diffusers'
  chunks."""
  if z.shape[1] % 2 != 1:
    raise ValueError(f"{CLASS_NAME} decodes {z.shape[1]} latent frames to {4 * z.shape[1]} frames, not "
                     f"{4 * z.shape[1] - 3} (diffusers' decoder sets no first frame apart in an even chunk): give an "
                     "odd number of latent frames, the latents of a clip of 1 + 8 k frames")
  return streaming.streamed(decoder, z, LATENT_FRAMES_CHUNK, first_chunk(z.shape[1], LATENT_FRAMES_CHUNK))


def conv(in_ch, out_ch, kernel, rngs, stride=1, padding="SAME", module=nnx.Conv):
  return layers.conv(in_ch, out_ch, kernel, rngs, jnp.float32, stride=stride, padding=padding, module=module)


class CausalConv(nnx.Module):
  """diffusers' CogVideoXCausalConv3d (its convolution is `conv`): a k x k x k convolution of clips [batch, frames,
  h, w, in], the first frame repeated k - 1 times in front (streamed: the previous chunk's last frames), zero
  pixels around."""

  def __init__(self, in_ch, out_ch, kernel, rngs):
    pad = (kernel // 2, kernel // 2)
    self.conv = conv(in_ch, out_ch, (kernel,) * 3, rngs, padding=((0, 0), pad, pad),
                     module=functools.partial(streaming.CausalConv, front=kernel - 1, fill="first"))

  def __call__(self, x):
    return self.conv(x)


def group_norm(channels, groups, rngs, epsilon=1e-6):
  return layers.group_norm(channels, rngs, jnp.float32, groups=groups, epsilon=epsilon)


def modulated(x, scale, shift):
  """x [batch, f, h, w, c] * scale + shift, scale and shift [batch, f', h', w', c] resized to x's frames and pixels
  as PyTorch's "nearest" does for whole ratios (each value over an f/f' x h/h' x w/w' block), by broadcasting: no
  resized copy is made (XLA held every spatial norm's resized copy at once: 48 GB to decode 9 frames of 480x720)."""
  (b, f, h, w, c), (zf, zh, zw) = x.shape, scale.shape[1:4]
  block = lambda a: a[:, :, None, :, None, :, None]
  x = x.reshape(b, zf, f // zf, zh, h // zh, zw, w // zw, c)
  return (x * block(scale) + block(shift)).reshape(b, f, h, w, c)


class SpatialNorm(nnx.Module):
  """diffusers' CogVideoXSpatialNorm3D: GroupNorm(x) conv_y(z) + conv_b(z), the latents z [batch, latent frames, h',
  w', latent_channels] resized to x's frames and pixels (nearest; the clip's first latent frame to its first frame
  alone). The 1x1x1 convolutions run at the latents' size, before the resizing (the same values)."""

  def __init__(self, channels, latent_ch, groups, rngs):
    self.norm_layer = group_norm(channels, groups, rngs)
    self.conv_y, self.conv_b = CausalConv(latent_ch, channels, 1, rngs), CausalConv(latent_ch, channels, 1, rngs)

  def __call__(self, x, z, first):
    x, scale, shift = self.norm_layer(x), self.conv_y(z), self.conv_b(z)
    if not first or x.shape[1] == 1:
      return modulated(x, scale, shift)
    return jnp.concatenate([modulated(x[:, :1], scale[:, :1], shift[:, :1]),
                            modulated(x[:, 1:], scale[:, 1:], shift[:, 1:])], axis=1)


class ResnetBlock(nnx.Module):
  """Norm-SiLU-causal conv twice, plus the input (through a 1x1x1 convolution when the width changes); the norms
  are group norms, or (`latent_ch` > 0: the decoder's) spatial norms of the latents."""

  def __init__(self, in_ch, out_ch, groups, epsilon, rngs, latent_ch=0):
    norm = ((lambda c: SpatialNorm(c, latent_ch, groups, rngs)) if latent_ch else
            (lambda c: group_norm(c, groups, rngs, epsilon)))
    self.norm1, self.conv1 = norm(in_ch), CausalConv(in_ch, out_ch, 3, rngs)
    self.norm2, self.conv2 = norm(out_ch), CausalConv(out_ch, out_ch, 3, rngs)
    self.conv_shortcut = conv(in_ch, out_ch, (1, 1, 1), rngs) if in_ch != out_ch else None

  def __call__(self, x, z=None, first=True):
    normed = lambda norm, h: norm(h) if z is None else norm(h, z, first)
    h = self.conv2(nnx.silu(normed(self.norm2, self.conv1(nnx.silu(normed(self.norm1, x))))))
    return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Downsample(nnx.Module):
  """diffusers' CogVideoXDownsample3D: (`time`) each pair of frames averaged, the clip's `first` frame kept alone;
  then per frame a stride-2 3x3 convolution padded on the bottom and right."""

  def __init__(self, channels, time, rngs):
    self.time = time
    self.conv = conv(channels, channels, 3, rngs, stride=2, padding=((0, 1), (0, 1)))

  def __call__(self, x, first=True):
    if self.time:
      head, rest = (x[:, :1], x[:, 1:]) if first else (x[:, :0], x)
      b, f, h, w, c = rest.shape
      x = jnp.concatenate([head, rest.reshape(b, f // 2, 2, h, w, c).mean(axis=2)], axis=1)
    return self.conv(x)


class Upsample(nnx.Module):
  """diffusers' CogVideoXUpsample3D: nearest 2x in space and (`time`) each frame twice in time but the clip's
  `first`; then per frame a 3x3 convolution."""

  def __init__(self, channels, time, rngs):
    self.time = time
    self.conv = conv(channels, channels, 3, rngs)

  def __call__(self, x, first=True):
    if self.time:
      head, rest = (x[:, :1], x[:, 1:]) if first else (x[:, :0], x)
      x = jnp.concatenate([head, jnp.repeat(rest, 2, axis=1)], axis=1)
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3))


class Level(nnx.Module):
  """Residual blocks at one resolution, then (`sampler`: a Downsample or Upsample, named as diffusers names it)
  the level's resampling; the middle block is a Level without one."""

  def __init__(self, in_ch, out_ch, blocks, c: dict, rngs, sampler=None, latent_ch=0):
    self.resnets = nnx.List([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, c["norm_num_groups"], c["norm_eps"],
                                         rngs, latent_ch) for i in range(blocks)])
    self.samplers_name = "upsamplers" if isinstance(sampler, Upsample) else "downsamplers"
    setattr(self, self.samplers_name, None if sampler is None else nnx.List([sampler]))

  def __call__(self, x, z=None, first=True):
    for block in self.resnets:
      x = block(x, z, first)
    samplers = getattr(self, self.samplers_name)
    return x if samplers is None else samplers[0](x, first)


class Encoder(nnx.Module):
  """Clips [batch, frames, h, w, in] -> the posterior's moments [batch, latent frames, h/f, w/f, 2 latent_channels]
  (`first`: x starts at the clip's first frame, else it continues a streamed clip)."""

  def __init__(self, c: dict, rngs):
    widths, last = c["block_out_channels"], len(c["block_out_channels"]) - 1
    self.conv_in = CausalConv(c["in_channels"], widths[0], 3, rngs)
    self.down_blocks = nnx.List([
        Level(widths[max(i - 1, 0)], width, c["layers_per_block"], c, rngs,
              Downsample(width, i < TIME_LEVELS, rngs) if i < last else None) for i, width in enumerate(widths)])
    self.mid_block = Level(widths[-1], widths[-1], 2, c, rngs)
    self.norm_out = group_norm(widths[-1], c["norm_num_groups"], rngs)
    self.conv_out = CausalConv(widths[-1], 2 * c["latent_channels"], 3, rngs)

  def __call__(self, x, first=True):
    x = self.conv_in(x)
    for level in self.down_blocks:
      x = level(x, first=first)
    return self.conv_out(nnx.silu(self.norm_out(self.mid_block(x, first=first))))


class Decoder(nnx.Module):
  """Latents [batch, latent frames, h/f, w/f, latent_channels] -> clips [batch, frames, h, w, out], every norm a
  spatial norm of the latents (`first`: z starts at the clip's first latent frame)."""

  def __init__(self, c: dict, rngs):
    widths, last, latent = c["block_out_channels"][::-1], len(c["block_out_channels"]) - 1, c["latent_channels"]
    self.conv_in = CausalConv(latent, widths[0], 3, rngs)
    self.mid_block = Level(widths[0], widths[0], 2, c, rngs, latent_ch=latent)
    self.up_blocks = nnx.List([
        Level(widths[max(i - 1, 0)], width, c["layers_per_block"] + 1, c, rngs,
              Upsample(width, i < TIME_LEVELS, rngs) if i < last else None, latent) for i, width in enumerate(widths)])
    self.norm_out = SpatialNorm(widths[-1], latent, c["norm_num_groups"], rngs)
    self.conv_out = CausalConv(widths[-1], c["out_channels"], 3, rngs)

  def __call__(self, z, first=True):
    x = self.mid_block(self.conv_in(z), z, first)
    for level in self.up_blocks:
      x = level(x, z, first)
    return self.conv_out(nnx.silu(self.norm_out(x, z, first)))
