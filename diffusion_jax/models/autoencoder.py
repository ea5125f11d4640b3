"""The KL autoencoder of latent diffusion (Rombach et al. 2022: Stable Diffusion's VAE), in the layout of
diffusers' `AutoencoderKL`, loaded from a local diffusers directory (`load_diffusers`; `save_diffusers` writes one,
for `train_autoencoder.py`): the frozen map between images and the latents a latent diffusion model is trained on
(`latent.autoencoder_path`).

Encoder: conv, per level `layers_per_block` residual blocks and a stride-2 convolution (none after the last),
a middle of residual block, single-head self-attention, residual block, then GroupNorm-SiLU-conv to the
posterior's mean and log-variance. The decoder mirrors it with `layers_per_block + 1` residual blocks per
level and nearest-neighbour 2x upsampling. Computed in float32 (SD's VAE overflows in float16).

`encode(x, key)`: x [batch, ..., h, w, in_channels] in [-1, 1] -> latents [batch, ..., h/f, w/f,
latent_channels]: a draw from the posterior (its mean when key is None), shifted by the checkpoint's
`shift_factor` and multiplied by its `scaling_factor` (about unit variance for a diffusion model);
`decode(latents)` undoes both and decodes. f = 2^(levels - 1); the encoder and the image decoder fold leading axes
(frames) into the batch.
`moments(x)` and `latents_from_moments` are encode's two halves (a latent cache stores the moments).

Stable Video Diffusion's VAE (diffusers' `AutoencoderKLTemporalDecoder`, Blattmann et al. 2023) loads too: the same
encoder, frame by frame, and a temporal decoder that decodes a clip's frames together. Each of its residual blocks
is a per-frame block followed by one over time (3x1x1 convolutions, group norms over the whole clip), the two mixed
by a learned weight, and a last 3x1x1 convolution follows the output convolution. `decode` reads latents [batch,
frames, h/f, w/f, latent_channels] as clips (a still image [batch, h/f, w/f, c] is a one-frame clip).

So do the causal 3-D VAEs, which compress time too and encode and decode each clip whole: HunyuanVideo's
(causal_autoencoder.py, assembled here from this module's blocks), Wan's (wan_autoencoder.py, whose latents
are shifted and scaled per channel) and CogVideoX's (cogvideox_autoencoder.py, run in diffusers' chunks of frames).

`start_params` starts an autoencoder from another's weights (`train_autoencoder`'s train.init_from): a copy of the
same layout, a temporal decoder started from an image autoencoder at which it reconstructs every frame exactly as
the image autoencoder does (SVD fine-tuned its temporal decoder from an image one), or a causal autoencoder inflated
from an image one (`inflated`: 2-D kernels into 3-D, reading the current frame).
"""

import functools
import json
import pathlib
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from diffusion_jax import local_files
from diffusion_jax.models import (abstract_modules, causal_autoencoder, cogvideox_autoencoder, diffusers_directory,
                                  layers, named_tensors, wan_autoencoder)

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
# Attention names of checkpoints written before diffusers renamed them (its own loader maps them the same way).
OLD_ATTENTION_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
TEMPORAL = "AutoencoderKLTemporalDecoder"
# What diffusers' AutoencoderKLTemporalDecoder fixes rather than reads from its config.json.
TEMPORAL_FIXED = {"norm_num_groups": 32, "mid_block_add_attention": True, "use_quant_conv": True,
                  "use_post_quant_conv": False, "shift_factor": None}
# diffusers AutoencoderKL's defaults for the layout fields a config.json may leave out.
LAYOUT_DEFAULTS = {"norm_num_groups": 32, "mid_block_add_attention": True, "use_quant_conv": True,
                   "use_post_quant_conv": True}
SHARED_FIELDS = ("in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
                 "norm_num_groups")  # what an image autoencoder must share with the temporal decoder it starts


def read_config(path: str, field: str = "latent.autoencoder_path") -> dict:
  """The config.json of a local diffusers AutoencoderKL (AutoencoderKLTemporalDecoder, AutoencoderKLHunyuanVideo,
  AutoencoderKLWan: with that class's defaults and the fields the others name, wan_autoencoder.fields;
  AutoencoderKLCogVideoX: with its defaults) directory; a ValueError saying what is wrong (naming `field`, the config
  field that gave the path)."""
  file = pathlib.Path(path).expanduser() / "config.json"
  if not file.exists() and (file.parent / "vae" / "config.json").exists():
    raise ValueError(f"{field}={path!r} is a whole pipeline's checkpoint; its autoencoder is its vae/ folder: "
                     f"{field}={str(file.parent / 'vae')!r}")
  if not file.exists():
    raise ValueError(f"{field}={path!r} has no config.json: give the local directory of a diffusers "
                     f"AutoencoderKL (config.json and {WEIGHTS_FILE}, e.g. the vae/ folder of a Stable Diffusion "
                     f"checkpoint), {TEMPORAL} (Stable Video Diffusion's vae/ folder), "
                     f"{causal_autoencoder.CLASS_NAME} (HunyuanVideo's), {wan_autoencoder.CLASS_NAME} (Wan's) or "
                     f"{cogvideox_autoencoder.CLASS_NAME} (CogVideoX's), "
                     "or the autoencoder/ folder a train_autoencoder run writes into its workdir once it ends.")
  config = local_files.read_json(file)
  blocks = set(config.get("down_block_types", ())) | set(config.get("up_block_types", ()))
  name = config.get("_class_name", "AutoencoderKL")
  known = {name: {"DownEncoderBlock2D", "UpDecoderBlock2D"} for name in ("AutoencoderKL", TEMPORAL)} | {
      causal_autoencoder.CLASS_NAME: causal_autoencoder.BLOCK_TYPES, wan_autoencoder.CLASS_NAME: set(),
      cogvideox_autoencoder.CLASS_NAME: cogvideox_autoencoder.BLOCK_TYPES}
  if name not in known or blocks - known[name]:
    raise ValueError(f"{str(file)!r} is not a diffusers AutoencoderKL with 2-D blocks, an {TEMPORAL}, an "
                     f"{causal_autoencoder.CLASS_NAME}, an {wan_autoencoder.CLASS_NAME} or an "
                     f"{cogvideox_autoencoder.CLASS_NAME} (class {name!r}, blocks {sorted(blocks)}); only those "
                     "autoencoders are supported.")
  problems = (wan_autoencoder.config_problems(config) if is_wan(config) else
              cogvideox_autoencoder.config_problems(config) if is_cogvideox(config) else
              causal_autoencoder.config_problems(config) if is_causal(config) else [])
  if problems:
    raise ValueError(f"{str(file)!r}: " + "; ".join(problems))
  return with_class_defaults(config)


def with_class_defaults(config: dict) -> dict:
  """config.json with the defaults of Wan's (and the fields the other classes name: wan_autoencoder.fields) and
  CogVideoX's classes, which diffusers takes for the fields they leave out."""
  return (wan_autoencoder.fields(config) if is_wan(config) else
          cogvideox_autoencoder.fields(config) if is_cogvideox(config) else config)


def is_wan(config: dict) -> bool:
  """Whether config.json is one of Wan's causal 3-D VAEs (wan_autoencoder.py: Wan 2.1's, Wan 2.2's)."""
  return config.get("_class_name") == wan_autoencoder.CLASS_NAME


def is_cogvideox(config: dict) -> bool:
  """Whether config.json is CogVideoX's causal 3-D VAE (cogvideox_autoencoder.py)."""
  return config.get("_class_name") == cogvideox_autoencoder.CLASS_NAME


def is_causal(config: dict) -> bool:
  """Whether config.json is a causal 3-D VAE, which compresses time too: HunyuanVideo's (causal_autoencoder.py),
  Wan's (wan_autoencoder.py) or CogVideoX's (cogvideox_autoencoder.py)."""
  return config.get("_class_name") in (causal_autoencoder.CLASS_NAME, wan_autoencoder.CLASS_NAME,
                                       cogvideox_autoencoder.CLASS_NAME)


def downsampling_factor(config: dict) -> int:
  """How many pixels of a side one latent holds."""
  if is_wan(config):
    return wan_autoencoder.fields(config)["spatial_compression_ratio"]
  if is_causal(config) and not is_cogvideox(config):
    return causal_autoencoder.compression(config)[1]
  return 2 ** (len(config["block_out_channels"]) - 1)


def image_channels(config: dict) -> tuple[int, int]:
  """(in, out): the channels of the images the autoencoder encodes and decodes (Wan 2.2's config.json counts those
  of its 2x2 pixel patches)."""
  if is_wan(config):
    return wan_autoencoder.fields(config)["image_channels"]
  return config["in_channels"], config["out_channels"]


def latent_frames(config: dict, frames: int) -> int:
  """Latent frames of a clip of `frames` frames: as many, but for a causal autoencoder (1 + (frames - 1) / r)."""
  return (frames - 1) // time_compression(config) + 1


def time_compression(config: dict) -> int:
  """Frames one latent frame holds (a causal autoencoder's first holds one): 1 but for a causal autoencoder."""
  if is_wan(config) or is_cogvideox(config):
    return with_class_defaults(config)["temporal_compression_ratio"]
  return causal_autoencoder.compression(config)[0] if is_causal(config) else 1


def frames_problem(config: dict, field: str, frames: int) -> str | None:
  """Why a clip of `frames` frames (the value of config field `field`) cannot be encoded and decoded back to as
  many frames (None when it can): a causal autoencoder needs 1 + a multiple of its time compression (CogVideoX's
  of twice that: it decodes an odd number of latent frames only, cogvideox_autoencoder.py)."""
  time = time_compression(config)
  step = 2 * time if is_cogvideox(config) else time
  if (frames - 1) % step == 0:
    return None
  why = (f"; {cogvideox_autoencoder.CLASS_NAME} decodes an odd number of latent frames only (diffusers' decoder "
         f"turns 2 latent frames into {2 * time} frames)" if is_cogvideox(config) else "")
  return (f"{field}={frames}: the causal autoencoder encodes 1 + {time} k frames into 1 + k latent frames{why}; "
          f"give 1 + a multiple of {step} (e.g. {1 + step * max(1, (frames - 1) // step)})")


def conv(in_ch, out_ch, kernel, rngs, stride=1, padding="SAME"):
  return layers.conv(in_ch, out_ch, kernel, rngs, jnp.float32, stride=stride, padding=padding)


def group_norm(channels, groups, rngs, epsilon=1e-6):  # diffusers' epsilon but in the temporal blocks
  return layers.group_norm(channels, rngs, jnp.float32, groups=groups, epsilon=epsilon)


def per_frame(module, clips):
  """`module` of images [n, h, w, c] applied to each frame of clips [batch, frames, h, w, c]."""
  out = module(clips.reshape((-1,) + clips.shape[2:]))
  return out.reshape(clips.shape[:2] + out.shape[1:])


class ResnetBlock(nnx.Module):
  """GroupNorm-SiLU-conv twice, plus the input (through a 1-wide conv when the width changes); `make_conv(in, out,
  kernel, rngs)` makes the convolutions (causal_autoencoder.CausalConv: causal 3-D ones)."""

  def __init__(self, in_ch, out_ch, groups, rngs, make_conv=conv):
    self.norm1, self.conv1 = group_norm(in_ch, groups, rngs), make_conv(in_ch, out_ch, 3, rngs)
    self.norm2, self.conv2 = group_norm(out_ch, groups, rngs), make_conv(out_ch, out_ch, 3, rngs)
    self.conv_shortcut = make_conv(in_ch, out_ch, 1, rngs) if in_ch != out_ch else None

  def __call__(self, x):
    h = self.conv2(nnx.silu(self.norm2(self.conv1(nnx.silu(self.norm1(x))))))
    return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nnx.Module):
  """Single-head self-attention over all positions of x [batch, ..., channels], after a GroupNorm, with a residual;
  `causal` (clips [batch, frames, h, w, c]): each frame's positions attend to their own frame's and earlier ones'."""

  def __init__(self, channels, groups, rngs, causal=False):
    self.causal = causal
    self.group_norm = group_norm(channels, groups, rngs)
    projection = lambda: layers.dense(channels, channels, ("embed", "heads"), rngs, jnp.float32)
    self.to_q, self.to_k, self.to_v = projection(), projection(), projection()
    self.to_out = nnx.List([layers.dense(channels, channels, ("heads", "embed"), rngs, jnp.float32)])

  def __call__(self, x):
    tokens = self.group_norm(x).reshape(x.shape[0], -1, 1, x.shape[-1])
    mask = None
    if self.causal:
      frame = jnp.repeat(jnp.arange(x.shape[1]), tokens.shape[1] // x.shape[1])
      mask = frame[:, None] >= frame[None, :]
    out = jax.nn.dot_product_attention(self.to_q(tokens), self.to_k(tokens), self.to_v(tokens), mask=mask)
    return x + self.to_out[0](out.reshape(x.shape))


class MidBlock(nnx.Module):
  """Residual block, attention (if any), residual block; `parts` makes them (IMAGE_PARTS, or CAUSAL_PARTS)."""

  def __init__(self, channels, groups, attention, rngs, parts):
    self.resnets = nnx.List([parts.resnet(channels, channels, groups, rngs) for _ in range(2)])
    self.attentions = nnx.List([parts.attention(channels, groups, rngs)]) if attention else None

  def __call__(self, x):
    x = self.resnets[0](x)
    if self.attentions is not None:
      x = self.attentions[0](x)
    return self.resnets[1](x)


class Resample(nnx.Module):
  """Stride-2 convolution padded on the bottom and right (down), or nearest 2x then a convolution (up)."""

  def __init__(self, channels, up, rngs):
    self.up = up
    self.conv = conv(channels, channels, 3, rngs, stride=1 if up else 2, padding="SAME" if up else ((0, 1), (0, 1)))

  def __call__(self, x):
    if self.up:
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return self.conv(x)


class TemporalResnetBlock(nnx.Module):
  """GroupNorm-SiLU-conv twice over clips [batch, frames, h, w, c], plus the input: 3x1x1 convolutions (zero-padded
  in time) and group norms whose statistics span the clip's frames."""

  def __init__(self, channels, rngs):
    self.norm1 = group_norm(channels, 32, rngs, epsilon=1e-5)
    self.conv1 = conv(channels, channels, (3, 1, 1), rngs)
    self.norm2 = group_norm(channels, 32, rngs, epsilon=1e-5)
    self.conv2 = conv(channels, channels, (3, 1, 1), rngs)

  def __call__(self, x):
    return x + self.conv2(nnx.silu(self.norm2(self.conv1(nnx.silu(self.norm1(x))))))


class TimeMixer(nnx.Module):
  """The learned weight sigmoid(mix_factor) of the temporal path (diffusers' AlphaBlender, "learned", switched)."""

  def __init__(self):
    self.mix_factor = nnx.Param(jnp.zeros((1,), jnp.float32))

  def __call__(self, spatial, temporal):
    weight = jax.nn.sigmoid(self.mix_factor[...][0])
    return (1 - weight) * spatial + weight * temporal


class SpatioTemporalBlock(nnx.Module):
  """A residual block per frame, then one over time, mixed: clips [batch, frames, h, w, in] -> [..., out]."""

  def __init__(self, in_ch, out_ch, rngs):
    self.spatial_res_block = ResnetBlock(in_ch, out_ch, 32, rngs)
    self.temporal_res_block = TemporalResnetBlock(out_ch, rngs)
    self.time_mixer = TimeMixer()

  def __call__(self, clips):
    spatial = per_frame(self.spatial_res_block, clips)
    return self.time_mixer(spatial, self.temporal_res_block(spatial))


class Level(nnx.Module):
  """Residual blocks at one resolution, then the level's down- or upsampling, `make_sampler()`'s module (None:
  none; made after the blocks, so that they draw their initial weights first)."""

  def __init__(self, in_ch, out_ch, blocks, groups, make_sampler, up, rngs, resnet=ResnetBlock):
    self.resnets = nnx.List([resnet(in_ch if i == 0 else out_ch, out_ch, groups, rngs) for i in range(blocks)])
    self.samplers_name = "upsamplers" if up else "downsamplers"  # diffusers' names
    sampler = make_sampler()
    setattr(self, self.samplers_name, None if sampler is None else nnx.List([sampler]))

  def __call__(self, x):
    for block in self.resnets:
      x = block(x)
    samplers = getattr(self, self.samplers_name)
    return x if samplers is None else samplers[0](x)


class Parts(NamedTuple):
  """The building blocks an Encoder and Decoder are assembled from: `conv3(in, out, rngs)`, a 3-wide convolution;
  `resnet(in, out, groups, rngs)`; `attention(channels, groups, rngs)`; `sampler(config, level, channels, up,
  rngs)`, that level's down- or upsampling module, or None."""
  conv3: Callable
  resnet: Callable
  attention: Callable
  sampler: Callable


def image_sampler(config, level, channels, up, rngs):
  return Resample(channels, up, rngs) if level < len(config["block_out_channels"]) - 1 else None


IMAGE_PARTS = Parts(lambda i, o, rngs: conv(i, o, 3, rngs), ResnetBlock, Attention, image_sampler)
CAUSAL_PARTS = Parts(lambda i, o, rngs: causal_autoencoder.CausalConv(i, o, 3, rngs),
                     functools.partial(ResnetBlock, make_conv=causal_autoencoder.CausalConv),
                     functools.partial(Attention, causal=True), causal_autoencoder.sampler)


class Encoder(nnx.Module):
  """Stable Diffusion's encoder (`parts`: IMAGE_PARTS), or HunyuanVideo's causal one (CAUSAL_PARTS)."""

  def __init__(self, c: dict, rngs, parts=IMAGE_PARTS):
    widths, groups = c["block_out_channels"], c["norm_num_groups"]
    self.conv_in = parts.conv3(c["in_channels"], widths[0], rngs)
    self.down_blocks = nnx.List([
        Level(widths[max(i - 1, 0)], width, c["layers_per_block"], groups,
              functools.partial(parts.sampler, c, i, width, False, rngs), False, rngs, parts.resnet)
        for i, width in enumerate(widths)])
    self.mid_block = MidBlock(widths[-1], groups, c.get("mid_block_add_attention", True), rngs, parts)
    self.conv_norm_out = group_norm(widths[-1], groups, rngs)
    self.conv_out = parts.conv3(widths[-1], 2 * c["latent_channels"], rngs)

  def __call__(self, x):
    x = self.conv_in(x)
    for level in self.down_blocks:
      x = level(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nnx.Module):
  """The encoder's mirror, with `layers_per_block + 1` residual blocks a level."""

  def __init__(self, c: dict, rngs, parts=IMAGE_PARTS):
    widths, groups = c["block_out_channels"][::-1], c["norm_num_groups"]
    self.conv_in = parts.conv3(c["latent_channels"], widths[0], rngs)
    self.mid_block = MidBlock(widths[0], groups, c.get("mid_block_add_attention", True), rngs, parts)
    self.up_blocks = nnx.List([
        Level(widths[max(i - 1, 0)], width, c["layers_per_block"] + 1, groups,
              functools.partial(parts.sampler, c, i, width, True, rngs), True, rngs, parts.resnet)
        for i, width in enumerate(widths)])
    self.conv_norm_out = group_norm(widths[-1], groups, rngs)
    self.conv_out = parts.conv3(widths[-1], c["out_channels"], rngs)

  def __call__(self, z):
    x = self.mid_block(self.conv_in(z))
    for level in self.up_blocks:
      x = level(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class TemporalMidBlock(nnx.Module):
  """diffusers' MidBlockTemporalDecoder: block, per-frame attention, block (it builds `layers_per_block` blocks but
  runs the first two; with one block the attention is built and not run)."""

  def __init__(self, channels, blocks, rngs):
    self.resnets = nnx.List([SpatioTemporalBlock(channels, channels, rngs) for _ in range(blocks)])
    self.attentions = nnx.List([Attention(channels, 32, rngs)])

  def __call__(self, clips):
    clips = self.resnets[0](clips)
    if len(self.resnets) > 1:
      clips = self.resnets[1](per_frame(self.attentions[0], clips))
    return clips


class TemporalLevel(nnx.Module):
  """Spatio-temporal blocks at one resolution, then (except at the last level) per-frame 2x upsampling."""

  def __init__(self, in_ch, out_ch, blocks, resample, rngs):
    self.resnets = nnx.List([SpatioTemporalBlock(in_ch if i == 0 else out_ch, out_ch, rngs) for i in range(blocks)])
    self.upsamplers = nnx.List([Resample(out_ch, True, rngs)]) if resample else None

  def __call__(self, clips):
    for block in self.resnets:
      clips = block(clips)
    return clips if self.upsamplers is None else per_frame(self.upsamplers[0], clips)


class TemporalDecoder(nnx.Module):
  """Stable Video Diffusion's decoder: latents [batch, frames, h/f, w/f, c] -> clips [batch, frames, h, w, out]."""

  def __init__(self, c: dict, rngs):
    widths, blocks = c["block_out_channels"][::-1], c["layers_per_block"]
    self.conv_in = conv(c["latent_channels"], widths[0], 3, rngs)
    self.mid_block = TemporalMidBlock(widths[0], blocks, rngs)
    self.up_blocks = nnx.List([TemporalLevel(widths[max(i - 1, 0)], width, blocks + 1, i < len(widths) - 1, rngs)
                               for i, width in enumerate(widths)])
    self.conv_norm_out = group_norm(widths[-1], 32, rngs)
    self.conv_out = conv(widths[-1], c["out_channels"], 3, rngs)
    self.time_conv_out = conv(c["out_channels"], c["out_channels"], (3, 1, 1), rngs)

  def __call__(self, z):
    clips = self.mid_block(per_frame(self.conv_in, z))
    for level in self.up_blocks:
      clips = level(clips)
    return self.time_conv_out(per_frame(lambda x: self.conv_out(nnx.silu(self.conv_norm_out(x))), clips))


class AutoencoderKL(nnx.Module):
  """diffusers' AutoencoderKL, or the AutoencoderKLTemporalDecoder, AutoencoderKLHunyuanVideo or AutoencoderKLWan
  that config.json names."""

  def __init__(self, config: dict, *, rngs: nnx.Rngs):
    config = with_class_defaults(config)
    latent = config["latent_channels"]
    self.temporal = config.get("_class_name") == TEMPORAL
    self.causal = is_causal(config)
    config = config | TEMPORAL_FIXED if self.temporal else config
    if is_wan(config):
      self.encoder, self.decoder = wan_autoencoder.Encoder(config, rngs), wan_autoencoder.Decoder(config, rngs)
    elif is_cogvideox(config):
      self.encoder = cogvideox_autoencoder.Encoder(config, rngs)
      self.decoder = cogvideox_autoencoder.Decoder(config, rngs)
    elif self.causal:
      config = causal_autoencoder.DEFAULTS | config
      self.encoder, self.decoder = Encoder(config, rngs, CAUSAL_PARTS), Decoder(config, rngs, CAUSAL_PARTS)
    else:
      self.encoder = Encoder(config, rngs)
      self.decoder = TemporalDecoder(config, rngs) if self.temporal else Decoder(config, rngs)
    pointwise = (1, 1, 1) if self.causal else 1
    self.quant_conv = conv(2 * latent, 2 * latent, pointwise, rngs) if config.get("use_quant_conv", True) else None
    self.post_quant_conv = (conv(latent, latent, pointwise, rngs) if config.get("use_post_quant_conv", True)
                            else None)
    # latents = (z - shift_factor) * scaling_factor: numbers, or (Wan) a tuple of one per latent channel
    self.shift_factor, self.scaling_factor = (wan_autoencoder.latent_normalisation(config) if is_wan(config) else
                                              (float(config.get("shift_factor") or 0.0),
                                               float(config.get("scaling_factor") or 0.18215)))

  def moments(self, x):
    """x [batch, h, w, in_channels] (a causal autoencoder: clips [batch, frames, h, w, in_channels]) -> the
    posterior's (mean, log-variance) [batch, (latent frames,) h/f, w/f, latent_channels]; it reads a still image
    [batch, h, w, in_channels] as a one-frame clip."""
    if self.causal and x.ndim == 4:
      return tuple(m[:, 0] for m in self.moments(x[:, None]))
    x = x.astype(jnp.float32)  # Wan's and CogVideoX's clips are encoded in chunks of frames, as diffusers does
    h = (wan_autoencoder.streamed(self.encoder, x, 4) if isinstance(self.encoder, wan_autoencoder.Encoder) else
         cogvideox_autoencoder.encoded(self.encoder, x) if isinstance(self.encoder, cogvideox_autoencoder.Encoder)
         else self.encoder(x))
    if self.quant_conv is not None:
      h = self.quant_conv(h)
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def posterior(self, x):
    """Images or clips [batch, (frames,) h, w, in_channels] -> the posterior's (mean, log-variance) [batch, (latent
    frames,) h/f, w/f, latent_channels]: a causal autoencoder encodes each clip whole (a still image as a one-frame
    clip), the others every frame alone (more leading axes fold into the batch)."""
    lead = x.shape[:-4] if self.causal and x.ndim > 4 else x.shape[:-3]
    return tuple(m.reshape(lead + m.shape[1:]) for m in self.moments(x.reshape((-1,) + x.shape[len(lead):])))

  def encode(self, x, key=None):
    """Images or clips [batch, (frames,) h, w, in_channels] -> latents: a posterior draw (its mean when key is
    None), shifted and scaled."""
    return self.latents_from_moments(*self.posterior(x), key)

  def latents_from_moments(self, mean, logvar, key=None):
    """The latents of a posterior [..., h/f, w/f, latent_channels] (`moments`' or a latent cache's): a draw (the
    mean when key is None), shifted and scaled."""
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    z = mean if key is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    return (z - jnp.asarray(self.shift_factor)) * jnp.asarray(self.scaling_factor)

  def decode(self, latents):
    return self.decode_unscaled(latents.astype(jnp.float32) / jnp.asarray(self.scaling_factor)
                                + jnp.asarray(self.shift_factor))

  def decode_unscaled(self, z):
    """Posterior draws z [batch, (frames,) h/f, w/f, latent_channels] (no shift or scaling) -> [batch, (frames,) h,
    w, out]: a temporal decoder decodes each clip's frames together (more leading axes fold into the batch), the
    image decoder every frame alone (the temporal autoencoder has no post_quant_conv). A causal decoder decodes each
    clip whole too (Wan's a latent frame at a time: wan_autoencoder.streamed; CogVideoX's in diffusers' chunks,
    cogvideox_autoencoder.decoded), a still's latents [batch, h/f, w/f, c] as a one-frame clip's."""
    if self.causal:
      clips = z[:, None] if z.ndim == 4 else z.reshape((-1,) + z.shape[-4:])
      clips = clips if self.post_quant_conv is None else self.post_quant_conv(clips)
      x = (wan_autoencoder.streamed(self.decoder, clips, 1) if isinstance(self.decoder, wan_autoencoder.Decoder) else
           cogvideox_autoencoder.decoded(self.decoder, clips)
           if isinstance(self.decoder, cogvideox_autoencoder.Decoder) else self.decoder(clips))
      return x[:, 0] if z.ndim == 4 else x.reshape(z.shape[:-4] + x.shape[1:])
    lead = z.shape[:-3]
    if self.temporal:
      x = self.decoder(z.reshape((-1,) + z.shape[-4:]) if z.ndim > 4 else z[:, None])
    else:
      images = z.reshape((-1,) + z.shape[-3:])
      x = self.decoder(images if self.post_quant_conv is None else self.post_quant_conv(images))
    return x.reshape(lead + x.shape[-3:])


def _renamed_old_attention(tensors: dict) -> dict:
  """Old checkpoints' attention projections (query/key/value/proj_attn, some stored as 1x1 convolutions
  [out, in, 1, 1]) under today's names and as linear weights [out, in]."""
  old_to_new = {f"attentions.0.{old}.": f"attentions.0.{new}." for new, old in OLD_ATTENTION_NAMES.items()}
  renamed = {}
  for name, value in tensors.items():
    for old, new in old_to_new.items():
      if old in name:
        name, value = name.replace(old, new), value.reshape(value.shape[:2]) if value.ndim == 4 else value
    renamed[name] = value
  return renamed


def tensor_shapes(path) -> dict:
  """{tensor name: shape} of what load_diffusers reads from a local diffusers directory's WEIGHTS_FILE (from its
  config.json alone)."""
  return diffusers_directory.tensor_shapes(AutoencoderKL, read_config(path))


def load_diffusers(path: str) -> AutoencoderKL:
  """An AutoencoderKL with the weights of a local diffusers directory (config.json and WEIGHTS_FILE)."""
  config = read_config(path)
  weights = pathlib.Path(path).expanduser() / WEIGHTS_FILE
  if not weights.exists():
    raise ValueError(f"No {WEIGHTS_FILE} in {path!r} (PyTorch .bin files are not read): save the autoencoder "
                     "with diffusers' save_pretrained(..., safe_serialization=True).")
  tensors = named_tensors.read_safetensors(weights)
  if is_wan(config):  # its norms' gammas are stored [channels, 1, 1(, 1)]
    tensors = {name: value.reshape(-1) if name.endswith(".gamma") else value for name, value in tensors.items()}
  return named_tensors.load(abstract_modules.of(AutoencoderKL, config), _renamed_old_attention(tensors),
                            named_tensors.torch_name, f"{str(weights)!r} does not match its config.json")


def diffusers_config(fields: dict, scaling_factor: float) -> dict:
  """A diffusers AutoencoderKL config.json from our autoencoder fields (configs/autoencoder_shapes.py), an
  AutoencoderKLTemporalDecoder one with `temporal_decoder`, or an AutoencoderKLHunyuanVideo one with `causal` (the
  fields each class reads)."""
  fields = {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in fields.items()}
  spatial = fields.pop("spatial_compression_ratio", 0) or 2 ** (len(fields["block_out_channels"]) - 1)
  if fields.pop("causal", False):
    read = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
            "norm_num_groups", "mid_block_add_attention")
    levels = len(fields["block_out_channels"])
    return {"_class_name": causal_autoencoder.CLASS_NAME, "act_fn": "silu", "scaling_factor": scaling_factor,
            "down_block_types": ["HunyuanVideoDownBlock3D"] * levels,
            "up_block_types": ["HunyuanVideoUpBlock3D"] * levels,
            "spatial_compression_ratio": spatial, "temporal_compression_ratio": 4, **{k: fields[k] for k in read}}
  down = ["DownEncoderBlock2D"] * len(fields["block_out_channels"])
  if fields.pop("temporal_decoder", False):
    read = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels", "sample_size")
    return {"_class_name": TEMPORAL, "down_block_types": down, "scaling_factor": scaling_factor, "force_upcast": True,
            **{k: fields[k] for k in read}}
  return {"_class_name": "AutoencoderKL", "act_fn": "silu", "down_block_types": down,
          "up_block_types": ["UpDecoderBlock2D"] * len(down), "scaling_factor": scaling_factor, "shift_factor": None,
          "use_quant_conv": True, "use_post_quant_conv": True, "force_upcast": True, **fields}


def save_diffusers(model: AutoencoderKL, config: dict, path) -> pathlib.Path:
  """Write `model` as a diffusers directory (config.json and WEIGHTS_FILE in PyTorch's layout), which
  `load_diffusers` and diffusers' `AutoencoderKL.from_pretrained` (AutoencoderKLTemporalDecoder's, for a temporal
  decoder) read."""
  from safetensors.numpy import save_file

  directory = pathlib.Path(path).expanduser()
  directory.mkdir(parents=True, exist_ok=True)
  tensors = {}
  for param_path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = np.asarray(jax.device_get(variable.get_value()), np.float32)
    name, transpose = named_tensors.torch_name(tuple(str(p) for p in param_path), value.ndim)
    tensors[name] = np.ascontiguousarray(np.transpose(value, np.argsort(transpose)) if transpose else value)
  save_file(tensors, directory / WEIGHTS_FILE)
  (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
  return directory


def latent_shape(path: str, height: int, width: int) -> tuple[int, int, int]:
  """[h, w, channels] of the latents of a height x width image."""
  config = read_config(path)
  factor = downsampling_factor(config)
  return (height // factor, width // factor, config["latent_channels"])


def is_temporal(config: dict) -> bool:
  return config.get("_class_name") == TEMPORAL


def layout(config: dict) -> dict:
  """A diffusers autoencoder config.json with the defaults and fixed values its class applies."""
  return LAYOUT_DEFAULTS | config | (TEMPORAL_FIXED if is_temporal(config) else {})


def start_problems(source: dict, target: dict) -> list[str]:
  """Why the autoencoder of config.json `source` cannot start one of config.json `target` (start_params; empty when
  it can)."""
  if is_wan(source) or is_cogvideox(source):
    return [f"it is an {source['_class_name']}, which this project loads but does not train (train_autoencoder "
            "trains Stable Diffusion's, Stable Video Diffusion's and HunyuanVideo's layouts)"]
  if is_causal(source) and not is_causal(target):
    return [f"it is an {causal_autoencoder.CLASS_NAME} (a causal 3-D autoencoder) and this autoencoder not; a "
            "causal autoencoder starts only causal ones"]
  if is_causal(target) and is_temporal(source):
    return ["it has a temporal decoder; a causal autoencoder starts from an image autoencoder or one of its own "
            "layout"]
  value = lambda config, field: list(v) if isinstance(v := config.get(field), (tuple, list)) else v
  differ = lambda fields: [f"its {field} is {value(source, field)}, this autoencoder's {value(target, field)}"
                           for field in fields if value(source, field) != value(target, field)]
  if is_causal(source):
    source, target = causal_autoencoder.DEFAULTS | source, causal_autoencoder.DEFAULTS | target
    return differ(SHARED_FIELDS + causal_autoencoder.LAYOUT_FIELDS)
  if is_causal(target):  # inflated from an image autoencoder
    source, target = layout(source), causal_autoencoder.DEFAULTS | target
    found = differ(SHARED_FIELDS + ("mid_block_add_attention",))
    if target["spatial_compression_ratio"] != (factor := downsampling_factor(source)):
      found.append(f"it halves space at every level but the last ({factor}x), this autoencoder "
                   f"{target['spatial_compression_ratio']}x: set spatial_compression_ratio={factor}, so that each "
                   "of its levels resamples space where the image autoencoder's does")
    return found
  source, target = layout(source), layout(target)
  if is_temporal(source) and not is_temporal(target):
    return ["it has a temporal decoder and this autoencoder an image decoder"]
  same = is_temporal(source) == is_temporal(target)
  found = differ(SHARED_FIELDS + (tuple(LAYOUT_DEFAULTS) if same else ()))
  if not same and not source["mid_block_add_attention"]:
    found.append("its middle block has no attention, which the temporal decoder's runs")
  if not same and target["layers_per_block"] < 2:
    found.append("a temporal decoder with layers_per_block < 2 runs no attention and one residual block in its "
                 "middle block (diffusers' MidBlockTemporalDecoder), the image decoder two and attention: set "
                 "layers_per_block >= 2")
  return found


def start_params(source_config: dict, source: dict, target_config: dict, fresh: dict) -> dict:
  """Pure-dict parameters for an autoencoder of `target_config`, started from `source` (an autoencoder of
  `source_config`; start_problems empty); fresh: a freshly initialised target's. The same kind of decoder: a copy of
  `source`. An image autoencoder starting a temporal decoder: its encoder and every per-frame layer, each temporal
  residual block's last convolution zero (the block is the identity, so its mix is the per-frame block's output),
  the last 3x1x1 convolution the identity in time, and the image decoder's post_quant_conv (z -> z P + b; the
  temporal decoder has none) folded into the first convolution (kernel P K) and the posterior's mean (+ s, s P = b,
  exact at the borders too); the temporal blocks' other weights stay fresh. An image autoencoder starting a causal
  one: inflated (`inflated`)."""
  if is_causal(target_config) and not is_causal(source_config):
    return inflated(source, fresh)
  if is_temporal(source_config) == is_temporal(target_config):
    return source
  source, fresh = traverse_util.flatten_dict(source), traverse_util.flatten_dict(fresh)
  latent = target_config["latent_channels"]
  quant = (source[("quant_conv", "kernel")], source[("quant_conv", "bias")]) if layout(source_config)[
      "use_quant_conv"] else (np.eye(2 * latent)[None, None], np.zeros(2 * latent))
  post, post_bias = (source[("post_quant_conv", "kernel")][0, 0], source[("post_quant_conv", "bias")]) if layout(
      source_config)["use_post_quant_conv"] else (np.eye(latent), np.zeros(latent))
  if np.linalg.cond(post) > 1e6:
    raise ValueError("the image autoencoder's post_quant_conv is singular, so it cannot be folded into a temporal "
                     "decoder (which has none): train the temporal decoder from scratch (leave train.init_from "
                     "empty)")
  shift = np.linalg.solve(post.T, post_bias)
  out_channels = target_config["out_channels"]
  started = {("quant_conv", "kernel"): quant[0],
             ("quant_conv", "bias"): quant[1] + np.concatenate([shift, np.zeros(latent)]),
             ("decoder", "conv_in", "kernel"): np.einsum("ij,hwjc->hwic", post,
                                                         source[("decoder", "conv_in", "kernel")]),
             ("decoder", "time_conv_out", "kernel"): np.pad(np.eye(out_channels)[None, None, None],
                                                            ((1, 1), (0, 0), (0, 0), (0, 0), (0, 0))),
             ("decoder", "time_conv_out", "bias"): np.zeros(out_channels)}

  def start(path, value):
    if path in started:
      return started[path]
    if "temporal_res_block" in path:  # a fresh block, its output convolution zero
      return np.zeros_like(value) if "conv2" in path else value
    if "time_mixer" in path or (path[1] == "mid_block" and path[2] == "resnets" and path[3] >= 2):
      return value  # the mixing weight; the middle blocks diffusers builds but does not run
    return source[tuple(p for p in path if p != "spatial_res_block")]

  started_flat = {path: np.asarray(start(path, value), np.float32) for path, value in fresh.items()}
  return traverse_util.unflatten_dict(started_flat)


def inflated(source: dict, fresh: dict) -> dict:
  """Pure-dict parameters of a causal autoencoder (fresh: a freshly initialised one's) started from an image
  autoencoder's (`source`; start_problems empty): each 2-D kernel [k, k, in, out] becomes the last time tap of its
  3-D one [k, k, k, in, out], the other taps zero ("tail" initialisation: every convolution starts reading the
  current frame alone, and time downsampling keeps every other frame), and every other weight is copied; a
  quant_conv or post_quant_conv the image autoencoder lacks starts as the identity. The image downsampling's window
  (zero-padded below and right) covers pixels 2i..2i+2, the causal one's (padded on every side) 2i-1..2i+1: its
  kernel moves one tap down and right, the far row and column folded into the nearer ones, so that each latent
  starts where the image autoencoder's was. The start is still not the image autoencoder: the causal convolutions
  repeat the edge where the image ones pad zeros, which matters most on small images (README)."""
  source, fresh = traverse_util.flatten_dict(source), traverse_util.flatten_dict(fresh)

  def recentred(kernel):  # [3, 3, in, out]: taps (a, b, c) -> (0, a, b + c) along each spatial axis
    for axis in (0, 1):
      first, middle, last = np.moveaxis(kernel, axis, 0)
      kernel = np.moveaxis(np.stack([np.zeros_like(first), first, middle + last]), 0, axis)
    return kernel

  def start(path, value):
    name = path[:-2] + path[-1:] if path[-2] == "conv" and path[:-2] + path[-1:] in source else path  # CausalConv
    if name not in source:  # a quant conv the image autoencoder has none of
      weight = np.eye(value.shape[-1])[None, None] if path[-1] == "kernel" else np.zeros_like(value)
    else:
      weight = source[name]
    if value.ndim == weight.ndim:
      return weight
    kernel = np.zeros(value.shape, np.float32)
    kernel[-1] = recentred(weight) if "downsamplers" in path else weight
    return kernel

  return traverse_util.unflatten_dict({path: np.asarray(start(path, value), np.float32)
                                       for path, value in fresh.items()})
