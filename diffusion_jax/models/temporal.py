"""Temporal layers of the space-time factorised U-Net (Video Diffusion Models, Make-A-Video).

The spatial layers run on every frame as if it were an image; a `TemporalBlock` after each spatial
block mixes information across frames at every pixel: a temporal residual block (pseudo-3D convolution:
a kernel over frames only, with FiLM conditioning on the noise level and pooled text, so the words that
describe motion reach the layers that make it) and, at attention levels, self-attention over frames with
a learned relative-position bias.
Both end in zero-initialised projections, so a fresh temporal block is the identity: a video U-Net built
from an image U-Net ("inflation") produces, per frame, exactly the image model's output.

Activations inside are [batch * frames, height, width, channels] (frames are consecutive rows); each
residual is multiplied by `is_video` [batch], so images (one-frame or tiled "videos" with is_video
False) pass through unchanged and joint image-video batches are exact.
"""

import jax.numpy as jnp
from flax import nnx

from diffusion_jax import sharding
from diffusion_jax.models import layers


def frames_as_rows(x, *per_example):
  """A video batch as a batch of frames: x [batch, frames, ...] -> [batch * frames, ...] (frames are consecutive
  rows, split over the mesh's `sequence` axis under sequence parallelism: sharding.constrain), and each per-example
  array [batch, ...] repeated for every frame of its clip."""
  b, f = x.shape[:2]
  rows = sharding.constrain(x.reshape((b * f,) + x.shape[2:]), ("frame_rows",) + (None,) * (x.ndim - 2))
  return (rows, *(jnp.repeat(a, f, axis=0) for a in per_example))


def frame_features(batch: int, frames: int, dim: int, max_frames: int, stride: int = 1):
  """[batch * frames / stride, dim] sinusoids of each row's frame index (rows of `stride` frames each: their
  first frame's), with periods up to max_frames (so every feature tells frames apart); a layer's frame-index
  embedding is a projection of these."""
  return layers.sinusoidal_embedding(jnp.tile(jnp.arange(0, frames, stride), batch), dim,
                                     max_period=float(max_frames))


def relative_positions(frames: int, max_frames: int):
  """[frames, frames] indices into a bias table of 2 * max_frames - 1 relative distances (clipped)."""
  distance = jnp.arange(frames)[None, :] - jnp.arange(frames)[:, None]
  return jnp.clip(distance, -(max_frames - 1), max_frames - 1) + max_frames - 1


def frames_conv(x, kernel):
  """A kernel-3 convolution over frames (zero-padded, as three shifted matmuls): x [batch, frames, h, w, in],
  kernel [3, in, out] -> [batch, frames, h, w, out]."""
  f = x.shape[1]
  padded = jnp.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))
  return sum(jnp.einsum("bfhwc,cd->bfhwd", padded[:, k:k + f], kernel[k]) for k in range(3))


class TemporalConv(nnx.Module):
  """GroupNorm-SiLU, then a kernel-3 convolution over frames.

  x: [batch, frames, h, w, ch] -> same shape (the residual branch only). update: a FramesConvLoRA of the
  kernel, or None."""

  def __init__(self, channels, *, dtype, rngs):
    self.norm = layers.group_norm(channels, rngs, dtype)
    self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (3, channels, channels)),
                            **layers.names(None, "conv_in", "conv_out"))
    self.dtype = dtype

  def __call__(self, x, update=None):
    b, f = x.shape[:2]
    h = nnx.silu(self.norm(x.reshape((b * f,) + x.shape[2:]))).reshape(x.shape)
    out = frames_conv(h, self.kernel[...].astype(self.dtype))
    return out if update is None else out + update(h).astype(out.dtype)  # no bias: a GroupNorm follows


class FramesConvLoRA(nnx.Module):
  """A low-rank update of a TemporalConv's kernel [3, in_ch, out_ch]: the convolution over frames with
  lora_a [3, in_ch, rank], then lora_b [rank, out_ch] (zeros, so it starts at nothing). Merged into the kernel it
  is lora_a @ lora_b (layers.ConvLoRA's form, over frames).

  x: [batch, frames, h, w, in_ch] -> [batch, frames, h, w, out_ch]."""

  def __init__(self, in_ch, out_ch, rank, rngs, dtype):
    a = nnx.initializers.lecun_normal()(rngs.params(), (3, in_ch, rank))
    self.lora_a = nnx.LoRAParam(a, **layers.names(None, "conv_in", None))
    self.lora_b = nnx.LoRAParam(jnp.zeros((rank, out_ch)), **layers.names(None, "conv_out"))
    self.dtype = dtype

  def __call__(self, x):
    dtype = self.dtype or x.dtype
    return frames_conv(x.astype(dtype), self.lora_a[...].astype(dtype)) @ self.lora_b[...].astype(dtype)


class TemporalAttention(nnx.Module):
  """Self-attention over frames at each pixel, with a learned per-head relative-position bias.

  x: [batch, frames, h, w, ch] -> same shape (the residual branch only). Works for any frame count;
  distances beyond max_frames - 1 share the last bias."""

  def __init__(self, channels, heads, max_frames, *, implementation, dtype, rngs, lora_rank=0):
    self.norm = layers.layer_norm(channels, rngs, dtype)
    self.attn = layers.Attention(channels, channels, heads, dtype=dtype, rngs=rngs, implementation=implementation,
                                 lora_rank=lora_rank)
    self.position_bias = nnx.Param(jnp.zeros((heads, 2 * max_frames - 1), jnp.float32), **layers.names(None, None))
    self.max_frames = max_frames

  def __call__(self, x):
    b, f, h, w, c = x.shape
    tokens = jnp.transpose(x, (0, 2, 3, 1, 4)).reshape(b * h * w, f, c)
    bias = self.position_bias[...][:, relative_positions(f, self.max_frames)][None]  # [1, heads, f, f]
    normed = self.norm(tokens)
    out = self.attn(normed, normed, bias=bias.astype(normed.dtype))
    return jnp.transpose(out.reshape(b, h, w, f, c), (0, 3, 1, 2, 4))


class TemporalBlock(nnx.Module):
  """Temporal residual block (temporal conv, FiLM on emb, SiLU, zero-initialised 1x1 conv), then
  (optionally) temporal attention, each a residual gated by is_video. lora_rank: low-rank updates of the
  attention projections; conv_lora_rank: of both convolutions, as `conv_lora` (FramesConvLoRA) and
  `conv_out_lora` (layers.ConvLoRA); film_lora_rank: of the FiLM projection, as `film_lora` (0: none).

  x: [batch * frames, h, w, ch], emb: [batch * frames, emb_dim], is_video: [batch] -> x's shape."""

  def __init__(self, channels, emb_dim, heads, max_frames, *, attention: bool, implementation, dtype, rngs,
               lora_rank=0, conv_lora_rank=0, film_lora_rank=0):
    self.conv = TemporalConv(channels, dtype=dtype, rngs=rngs)
    self.film = layers.dense(emb_dim, 2 * channels, ("embed", "conv_out"), rngs, dtype)
    self.film_lora = layers.lora(emb_dim, 2 * channels, ("embed", "conv_out"), film_lora_rank, rngs, dtype)
    self.norm = layers.group_norm(channels, rngs, dtype)
    # Zero-initialised output projection of the convolution branch: identity at initialisation.
    self.conv_out = layers.conv(channels, channels, 1, rngs, dtype, zero_init=True)
    self.conv_lora = FramesConvLoRA(channels, channels, conv_lora_rank, rngs, dtype) if conv_lora_rank else None
    self.conv_out_lora = (layers.ConvLoRA(channels, channels, 1, conv_lora_rank, rngs, dtype) if conv_lora_rank
                          else None)
    self.attention = (TemporalAttention(channels, heads, max_frames, implementation=implementation, dtype=dtype,
                                        rngs=rngs, lora_rank=lora_rank) if attention else None)

  def __call__(self, x, emb, is_video):
    b = is_video.shape[0]
    video = x.reshape((b, x.shape[0] // b) + x.shape[1:])
    gate = is_video.astype(x.dtype)[:, None, None, None, None]
    scale, shift = jnp.split(layers.adapted(self, "film", nnx.silu(emb))[:, None, None, :], 2, axis=-1)
    h = self.norm(self.conv(video, self.conv_lora).reshape(x.shape)) * (1 + scale) + shift
    video = video + gate * layers.adapted(self, "conv_out", nnx.silu(h)).reshape(video.shape)
    if self.attention is not None:
      video = video + gate * self.attention(video)
    return video.reshape(x.shape)
