"""Wan's causal 3-D VAEs (Wan Team 2025; diffusers' `AutoencoderKLWan`): clips [batch, frames, h, w, 3] -> latents
[batch, 1 + (frames - 1) / 4, h/f, w/f, z_dim] -> clips, loaded (frozen) from a local diffusers directory for a
latent video model (`latent.autoencoder_path`; `autoencoder.AutoencoderKL` builds it when config.json names this
class). Wan 2.1's (f = 8, 16 latent channels; Wan 2.2's 14B models use it too) and Wan 2.2's 5B one (`is_residual`,
`patch_size` 2: f = 16, 48 latent channels), which folds each 2x2 pixel patch into channels first and adds to each
level a shortcut that averages (down) or duplicates (up) neighbouring positions and frames into the new shape.

What differs from HunyuanVideo's (causal_autoencoder.py): every convolution is zero-padded (2 frames in front, the
spatial borders), the norms are RMS norms over each position's channels (no statistics across frames or pixels),
the middle block's attention is per frame, the resampling happens in space per frame (2-D convolutions) with time
resampled by separate 3x1x1 convolutions, and (Wan 2.1) each upsampling halves the width. Latents are normalised
per channel (`latents_mean`, `latents_std`) rather than by one scaling factor, and decoded clips are clamped to
[-1, 1].

diffusers runs it in chunks (the first frame, then 4 frames at a time; decoding one latent frame at a time), each
convolution caching the frames the next chunk needs. Since no layer mixes frames but causally, that equals running
the whole clip at once, as the Encoder and Decoder modules do: a time downsampling keeps the first frame and
convolves the whole sequence with stride 2 (each chunk's window starts at the previous chunk's last frame), a time
upsampling keeps the first latent frame and turns each later one into two, convolving the frames after the first
causally (diffusers starts their cache from zeros), and the shortcuts pad one zero frame in front (averaging) or
drop the first frame's copy (duplicating), as diffusers does to the first chunk. The autoencoder still runs them in
diffusers' chunks (`streamed`), each causal convolution carrying its last frames into the next chunk, which holds
one chunk's activations instead of the clip's.

Not supported (config_problems refuses them): time compressions but 4 (diffusers reads clips in chunks of 4
frames) and attention within the levels (`attn_scales`, which diffusers' encoder cannot run).
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models import layers, streaming

CLASS_NAME = "AutoencoderKLWan"
DEFAULTS = {"base_dim": 96, "decoder_base_dim": None, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
            "attn_scales": [], "temperal_downsample": [False, True, True], "is_residual": False, "in_channels": 3,
            "out_channels": 3, "patch_size": None}


def config_problems(config: dict) -> list[str]:
  """What this module cannot build from an AutoencoderKLWan config.json."""
  c, found = DEFAULTS | config, []
  patch = c["patch_size"] or 1
  if c["in_channels"] % patch ** 2 or c["out_channels"] % patch ** 2:
    found.append(f"in_channels={c['in_channels']} and out_channels={c['out_channels']} count the channels of "
                 f"{patch}x{patch} pixel patches (patch_size={c['patch_size']}): they must be multiples of "
                 f"{patch ** 2}")
  if c["attn_scales"]:
    found.append(f"attn_scales {c['attn_scales']}: diffusers' {CLASS_NAME} cannot run attention within its levels "
                 "(Wan's VAEs have none there): leave it empty")
  if c["is_residual"] and len(c["temperal_downsample"]) == len(c["dim_mult"]) - 1:
    # each level's shortcut folds (averaged_down) or spreads (duplicated_up) whole groups of channels
    widths = [c["base_dim"] * m for m in [1] + list(c["dim_mult"])]
    blocks = [2 ** bool(time) * 4 for time in c["temperal_downsample"]] + [1]
    if any(in_ch * block % out_ch for in_ch, out_ch, block in zip(widths[:-1], widths[1:], blocks)):
      found.append(f"is_residual: the levels' shortcuts cannot average widths {widths} into each other: give "
                   "dim_mult whose widths divide as Wan 2.2's ([1, 2, 4, 4]) do")
  for field in ("latents_mean", "latents_std"):
    if c.get(field) is None:
      found.append(f"{field} is missing (diffusers would take Wan 2.1's): give the {c['z_dim']} values the "
                   "diffusion model's latents were normalised with")
    elif len(c[field]) != c["z_dim"]:
      found.append(f"{field} has {len(c[field])} entries, one per latent channel: z_dim={c['z_dim']} needs as many")
  if c.get("latents_std") and min(c["latents_std"]) <= 0:
    found.append("latents_std must be positive (latents are divided by it)")
  if len(c["temperal_downsample"]) != len(c["dim_mult"]) - 1:
    found.append(f"temperal_downsample {c['temperal_downsample']} needs one entry per level but the last "
                 f"({len(c['dim_mult']) - 1})")
  elif sum(map(bool, c["temperal_downsample"])) != 2:
    found.append(f"temperal_downsample {c['temperal_downsample']}: diffusers reads clips 4 frames at a time, so "
                 "time must be halved at exactly two levels")
  return found


def fields(config: dict) -> dict:
  """config.json with this class's defaults and the names the other autoencoders' configs use: latent_channels,
  the compressions (spatial_compression_ratio, temporal_compression_ratio) and image_channels (the pixels' channels
  in and out, before patches are folded into channels)."""
  c = DEFAULTS | config
  patch = c["patch_size"] or 1
  return c | {"latent_channels": c["z_dim"], "spatial_compression_ratio": 2 ** (len(c["dim_mult"]) - 1) * patch,
              "temporal_compression_ratio": 2 ** sum(map(bool, c["temperal_downsample"])),
              "image_channels": (c["in_channels"] // patch ** 2, c["out_channels"] // patch ** 2)}


def latent_normalisation(config: dict) -> tuple[tuple, tuple]:
  """(shift, scale) per latent channel: latents = (z - latents_mean) / latents_std, as Wan's pipelines compute."""
  return tuple(map(float, config["latents_mean"])), tuple(1.0 / float(s) for s in config["latents_std"])


def conv(in_ch, out_ch, kernel, rngs, stride=1, padding="VALID", module=nnx.Conv):
  return layers.conv(in_ch, out_ch, kernel, rngs, jnp.float32, stride=stride, padding=padding, module=module)


def causal_conv(in_ch, out_ch, rngs, kernel=(3, 3, 3)):
  """A CausalConv (diffusers' WanCausalConv3d(in, out, kernel, padding=1 or (1, 0, 0) for 3x1x1): zero pixels
  around when the window is 3 wide."""
  space = (kernel[1] // 2, kernel[1] // 2)
  return conv(in_ch, out_ch, kernel, rngs, padding=((0, 0), space, space), module=streaming.CausalConv)


def streamed(module, x, chunk: int):
  """`module` (an Encoder or Decoder) applied to x [batch, 1 + chunk k, ...] as diffusers runs it: the first frame,
  then a compiled loop over k chunks of `chunk` frames (streaming.streamed); the same function as `module(x)`."""
  if (x.shape[1] - 1) % chunk:
    nearest = 1 + chunk * max(round((x.shape[1] - 1) / chunk), 1)
    raise ValueError(f"{CLASS_NAME} reads clips of 1 + {chunk} k frames, not {x.shape[1]}: cut or pad them to "
                     f"e.g. {nearest}")
  return streaming.streamed(module, x, chunk)


class RMSNorm(nnx.Module):
  """x / ||x|| sqrt(channels) gamma over each position's channels (x [..., channels]; diffusers' WanRMS_norm)."""

  def __init__(self, channels):
    self.gamma = nnx.Param(jnp.ones((channels,), jnp.float32), **layers.names("norm"))

  def __call__(self, x):
    norm = jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return x / norm * math.sqrt(x.shape[-1]) * self.gamma[...]


class ResidualBlock(nnx.Module):
  """RMSNorm-SiLU-causal conv twice, plus the input (through a 1x1x1 conv when the width changes)."""

  def __init__(self, in_ch, out_ch, rngs):
    self.norm1, self.conv1 = RMSNorm(in_ch), causal_conv(in_ch, out_ch, rngs)
    self.norm2, self.conv2 = RMSNorm(out_ch), causal_conv(out_ch, out_ch, rngs)
    self.conv_shortcut = conv(in_ch, out_ch, (1, 1, 1), rngs) if in_ch != out_ch else None

  def __call__(self, x):
    h = self.conv2(nnx.silu(self.norm2(self.conv1(nnx.silu(self.norm1(x))))))
    return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nnx.Module):
  """Single-head self-attention over each frame's positions (clips [batch, frames, h, w, c]), after an RMSNorm,
  with a residual; q, k and v from one 1x1 convolution."""

  def __init__(self, channels, rngs):
    self.norm = RMSNorm(channels)
    self.to_qkv = conv(channels, 3 * channels, 1, rngs)
    self.proj = conv(channels, channels, 1, rngs)

  def __call__(self, x):
    batch, frames, h, w, c = x.shape
    q, k, v = jnp.split(self.to_qkv(self.norm(x)).reshape(batch * frames, h * w, 1, 3 * c), 3, axis=-1)
    return x + self.proj(jax.nn.dot_product_attention(q, k, v).reshape(x.shape))


def patchify(x, patch):
  """Clips [b, f, h, w, c] -> [b, f, h/p, w/p, c p p], each p x p patch folded into channels in diffusers' order
  (channel c p p + column offset p + row offset)."""
  b, f, h, w, c = x.shape
  x = x.reshape(b, f, h // patch, patch, w // patch, patch, c).transpose(0, 1, 2, 4, 6, 5, 3)
  return x.reshape(b, f, h // patch, w // patch, c * patch * patch)


def unpatchify(x, patch):
  """patchify's inverse: [b, f, h, w, c p p] -> [b, f, h p, w p, c]."""
  b, f, h, w, channels = x.shape
  x = x.reshape(b, f, h, w, channels // patch ** 2, patch, patch).transpose(0, 1, 2, 6, 3, 5, 4)
  return x.reshape(b, f, h * patch, w * patch, channels // patch ** 2)


def averaged_down(x, out_ch, time, space):
  """diffusers' AvgDown3D: clips [b, f, h, w, c] -> [b, ceil(f / time), h/space, w/space, out_ch]: zero frames in
  front up to a multiple of `time`, each time x space x space block's values folded into channels (channel-major),
  then each group of c time space^2 / out_ch consecutive channels averaged."""
  x = jnp.pad(x, ((0, 0), ((-x.shape[1]) % time, 0), (0, 0), (0, 0), (0, 0)))
  b, f, h, w, c = x.shape
  x = x.reshape(b, f // time, time, h // space, space, w // space, space, c).transpose(0, 1, 3, 5, 7, 2, 4, 6)
  return x.reshape(b, f // time, h // space, w // space, out_ch, -1).mean(axis=-1)


def duplicated_up(x, out_ch, time, space, first=True):
  """diffusers' DupUp3D: clips [b, f, h, w, c] -> [b, f time, h space, w space, out_ch]: each channel repeated
  out_ch time space^2 / c times, spread (channel-major) over a time x space x space block; the clip's `first` frame's
  time - 1 leading copies dropped (as diffusers drops them from its first chunk)."""
  b, f, h, w, c = x.shape
  x = jnp.repeat(x, out_ch * time * space * space // c, axis=-1).reshape(b, f, h, w, out_ch, time, space, space)
  x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, f * time, h * space, w * space, out_ch)
  return x[:, time - 1:] if first else x


class Resample(nnx.Module):
  """Down: per frame, a stride-2 convolution padded on the bottom and right, then (`time`) a stride-2 3x1x1
  convolution over the whole clip after its first frame is set apart. Up: (`time`) a causal 3x1x1 convolution to
  twice the width, each latent frame but the clip's `first` becoming two, then per frame nearest 2x and a
  convolution to `out_ch` (default half the width). The 2-D convolution is `resample[1]`, as diffusers names it."""

  def __init__(self, channels, up, time, rngs, out_ch=None):
    self.up = up
    self.resample = nnx.List([None, conv(channels, out_ch or channels // 2, 3, rngs, padding="SAME") if up
                              else conv(channels, channels, 3, rngs, stride=2, padding=((0, 1), (0, 1)))])
    self.time_conv = None if not time else (
        causal_conv(channels, 2 * channels, rngs, (3, 1, 1)) if up else
        conv(channels, channels, (3, 1, 1), rngs, stride=(2, 1, 1),
             module=functools.partial(streaming.CausalConv, front=1, fill=None)))

  def __call__(self, x, first=True):
    if self.up:
      if self.time_conv is not None:  # on the frames after the first (none, in a still or a first chunk)
        later = self.time_conv(x[:, 1:] if first else x)
        b, f, h, w, c = later.shape  # (f may be 0: no -1 in the reshapes)
        later = later.reshape(b, f, h, w, 2, c // 2).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * f, h, w, c // 2)
        x = jnp.concatenate([x[:, :1], later], axis=1) if first else later
      return self.resample[1](jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3))
    x = self.resample[1](x)
    if self.time_conv is not None:  # windows from the clip's first frame, which stays too
      x = jnp.concatenate([x[:, :1], self.time_conv(x)], axis=1) if first else self.time_conv(x)
    return x


class MidBlock(nnx.Module):
  """Residual block, per-frame attention, residual block."""

  def __init__(self, channels, rngs):
    self.resnets = nnx.List([ResidualBlock(channels, channels, rngs) for _ in range(2)])
    self.attentions = nnx.List([Attention(channels, rngs)])

  def __call__(self, x):
    return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class ResidualDownBlock(nnx.Module):
  """A Wan 2.2 encoder level: its residual blocks and downsampling (none at the last level), plus its input
  averaged into the output's shape (averaged_down)."""

  def __init__(self, in_ch, out_ch, blocks, time, down, rngs):
    self.shortcut = (out_ch, 2 if time else 1, 2 if down else 1)
    self.resnets = nnx.List([ResidualBlock(in_ch if i == 0 else out_ch, out_ch, rngs) for i in range(blocks)])
    self.downsampler = Resample(out_ch, False, time, rngs) if down else None

  def __call__(self, x, first=True):
    h = x
    for block in self.resnets:
      h = block(h)
    h = h if self.downsampler is None else self.downsampler(h, first)
    return h + averaged_down(x, *self.shortcut)


class ResidualUpBlock(nnx.Module):
  """A Wan 2.2 decoder level: its residual blocks and upsampling (`up`; none at the last level), keeping the width,
  plus its input duplicated into the output's shape (duplicated_up)."""

  def __init__(self, in_ch, out_ch, blocks, time, up, rngs):
    self.shortcut = (out_ch, 2 if time else 1, 2) if up else None
    self.resnets = nnx.List([ResidualBlock(in_ch if i == 0 else out_ch, out_ch, rngs) for i in range(blocks)])
    self.upsampler = Resample(out_ch, True, time, rngs, out_ch=out_ch) if up else None

  def __call__(self, x, first=True):
    h = x
    for block in self.resnets:
      h = block(h)
    if self.upsampler is None:
      return h
    return self.upsampler(h, first) + duplicated_up(x, *self.shortcut, first)


class Encoder(nnx.Module):
  """Clips [batch, 1 + 4k frames, h, w, 3] -> the posterior's moments [batch, 1 + k, h/f, w/f, 2 z_dim] (Wan 2.2's
  pixel patches folded into channels first). The levels' blocks are one list, as diffusers builds it: per level its
  residual blocks, then its resampling (none after the last); Wan 2.2's, one ResidualDownBlock per level."""

  def __init__(self, c: dict, rngs):
    widths, last = [c["base_dim"] * m for m in [1] + list(c["dim_mult"])], len(c["dim_mult"]) - 1
    self.patch = c["patch_size"] or 1
    self.conv_in = causal_conv(c["in_channels"], widths[0], rngs)
    blocks = []
    for level, (in_ch, out_ch) in enumerate(zip(widths[:-1], widths[1:])):
      time = level < last and c["temperal_downsample"][level]
      if c["is_residual"]:
        blocks.append(ResidualDownBlock(in_ch, out_ch, c["num_res_blocks"], time, level < last, rngs))
        continue
      blocks += [ResidualBlock(in_ch if i == 0 else out_ch, out_ch, rngs) for i in range(c["num_res_blocks"])]
      if level < last:
        blocks.append(Resample(out_ch, False, time, rngs))
    self.down_blocks = nnx.List(blocks)
    self.mid_block = MidBlock(widths[-1], rngs)
    self.norm_out = RMSNorm(widths[-1])
    self.conv_out = causal_conv(widths[-1], 2 * c["z_dim"], rngs)

  def __call__(self, x, first=True):
    """Clips -> moments; `first`: x starts at the clip's first frame (else it continues a streamed clip)."""
    x = self.conv_in(patchify(x, self.patch))
    for block in self.down_blocks:
      x = block(x) if isinstance(block, ResidualBlock) else block(x, first)
    return self.conv_out(nnx.silu(self.norm_out(self.mid_block(x))))


class UpBlock(nnx.Module):
  """A decoder level: num_res_blocks + 1 residual blocks, then its upsampling (`time`: in time too; None: none)."""

  def __init__(self, in_ch, out_ch, blocks, time, rngs):
    self.resnets = nnx.List([ResidualBlock(in_ch if i == 0 else out_ch, out_ch, rngs) for i in range(blocks)])
    self.upsamplers = None if time is None else nnx.List([Resample(out_ch, True, time, rngs)])

  def __call__(self, x, first=True):
    for block in self.resnets:
      x = block(x)
    return x if self.upsamplers is None else self.upsamplers[0](x, first)


class Decoder(nnx.Module):
  """Latents [batch, 1 + k, h/f, w/f, z_dim] (after post_quant_conv) -> clips [batch, 1 + 4k, h, w, out] in
  [-1, 1]. In Wan 2.1's each level after the first starts at half the previous level's width (its upsampling
  halved it); Wan 2.2's levels are ResidualUpBlocks."""

  def __init__(self, c: dict, rngs):
    mult, last = list(c["dim_mult"]), len(c["dim_mult"]) - 1
    widths = [(c["decoder_base_dim"] or c["base_dim"]) * m for m in mult[-1:] + mult[::-1]]
    time = list(c["temperal_downsample"])[::-1]
    self.patch = c["patch_size"] or 1
    self.conv_in = causal_conv(c["z_dim"], widths[0], rngs)
    self.mid_block = MidBlock(widths[0], rngs)
    blocks = c["num_res_blocks"] + 1
    self.up_blocks = nnx.List([
        ResidualUpBlock(in_ch, out_ch, blocks, i < last and time[i], i < last, rngs) if c["is_residual"] else
        UpBlock(in_ch // 2 if i else in_ch, out_ch, blocks, time[i] if i < last else None, rngs)
        for i, (in_ch, out_ch) in enumerate(zip(widths[:-1], widths[1:]))])
    self.norm_out = RMSNorm(widths[-1])
    self.conv_out = causal_conv(widths[-1], c["out_channels"], rngs)

  def __call__(self, z, first=True):
    """Latents -> clips; `first`: z starts at the clip's first latent frame (else it continues a streamed clip)."""
    x = self.mid_block(self.conv_in(z))
    for level in self.up_blocks:
      x = level(x, first)
    return jnp.clip(unpatchify(self.conv_out(nnx.silu(self.norm_out(x))), self.patch), -1.0, 1.0)
