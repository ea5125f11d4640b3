"""Text-conditioned diffusion transformer (DiT, Peebles & Xie 2023, with text cross-attention as in PixArt-alpha).

The image is cut into patch_size x patch_size patches, each a token of width `channels` with a fixed 2-D
sin/cos position embedding (periods up to 2*pi*position_max_period patches: DiT's 10,000 leaves most features
nearly constant over a small grid; a few times the grid side makes nearly every feature vary). Every block is
self-attention, cross-attention to the text and a feed-forward, the first and last modulated by adaLN-Zero: a
shift, scale and gate per block from the conditioning embedding (log-SNR and pooled text), the gates starting
at zero so every block starts as the identity. A final modulated LayerNorm and a zero-initialised projection
give each patch's prediction. `dropout` (training only: a call with a dropout_key) acts on each feed-forward's
hidden units.

Video (`temporal`, Latte-style space-time factorisation): the spatial blocks run on every frame as if it were
an image, and after each block a temporal attention layer (models/temporal.py: attention over frames at each
patch position, relative-position bias up to max_frames) mixes the frames; a frame-index embedding joins the
conditioning. Temporal layers start as the identity and live under `temporal_*`, so an image DiT's checkpoint
initialises a video DiT that, per frame, is the image model (models/inflation.py), and `is_video` False rows
(stills in joint image-video batches) pass through them unchanged.

With `video_attention='spacetime'` (full attention over space and time, as CogVideoX's) a video DiT has no
temporal layers: every block's self-attention spans all patches of all frames of a clip, so frames mix in every
block; the frame-index embedding tells frames apart. Stills (`is_video` False) attend within their own frame
only, so they stay images, exactly the image model's output per frame; a video is not the image model per frame,
even just inflated (its attention spans the clip from the start). With `temporal_patch_size` t > 1 a spacetime
DiT's token is a tubelet, t consecutive frames x one patch (ViViT's tubelet embedding, Latte's and Open-Sora's
spacetime patches): a clip has t times fewer tokens (attention logits t^2 fewer), a frame-index embedding per
tubelet, and each token predicts its t frames.

A super-resolution DiT (`lowres_conditioning`, superres.py) reads the upsampled low-resolution input as extra
channels of every patch and adds an embedding of its noise-augmentation log-SNR to the conditioning, as the
U-Net does; a video one repeats each low-resolution frame over the frames it spans (temporal super-resolution).

Configuration (`config.model`, see configs/base.py): backbone='dit', channels (token width), depth (blocks),
patch_size, position_max_period, heads, ff_mult, dropout, text_dim, in_channels, dtype, remat, remat_policy, attention
(models/attention.py), temporal, max_frames, video_attention ('factorised' or 'spacetime'), temporal_patch_size,
lowres_conditioning.

Call: x [batch, h, w, in_channels], logsnr [batch], text [batch, tokens, text_dim], text_mask [batch, tokens]
bool -> prediction [batch, h, w, in_channels] (float32); h and w divisible by patch_size. Video DiT:
x [batch, frames, h, w, in_channels] -> the same shape (frames divisible by temporal_patch_size, which takes only
clips); is_video [batch] (default all True). Super-resolution:
lowres [batch, (frames,) h', w', 3] (an RGB image, also for a latent model), aug_logsnr [batch].
"""

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax import superres
from diffusion_jax.models import layers, temporal


def position_embedding(grid_h: int, grid_w: int, dim: int, max_period: float):
  """[grid_h * grid_w, dim]: sin/cos of each patch's row (first half) and column (second half), periods from
  2*pi up to 2*pi*max_period patches."""
  rows, cols = jnp.meshgrid(jnp.arange(grid_h), jnp.arange(grid_w), indexing="ij")
  return jnp.concatenate([layers.sinusoidal_embedding(rows.reshape(-1), dim // 2, max_period),
                          layers.sinusoidal_embedding(cols.reshape(-1), dim // 2, max_period)], axis=-1)


def spacetime_bias(is_video, frames: int, tokens: int):
  """[batch, 1, frames * tokens, frames * tokens] logit bias of spacetime attention: 0 where a token may attend
  (any token of its clip; a still's, is_video False, only those of its own frame), -1e9 elsewhere."""
  frame = jnp.repeat(jnp.arange(frames), tokens)
  allowed = is_video[:, None, None, None] | (frame[:, None] == frame[None, :])[None, None]
  return jnp.where(allowed, 0.0, -1e9)


def plain_layer_norm(dim, rngs, dtype):
  """LayerNorm without its own scale and bias (adaLN supplies them)."""
  return nnx.LayerNorm(dim, use_scale=False, use_bias=False, dtype=dtype, rngs=rngs)


def modulate(x, shift, scale):
  """x [batch, tokens, dim]; shift, scale [batch, dim]."""
  return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nnx.Module):
  """x [batch, tokens, dim], emb [batch, dim], text [batch, text_tokens, text_dim] -> x. lora_rank: low-rank
  updates of the attention projections; ff_lora_rank: of the feed-forward's; modulation_lora_rank: of the adaLN
  modulation's, as `modulation_lora` (0: none)."""

  def __init__(self, dim, text_dim, heads, *, ff_mult, dropout_rate, dtype, rngs, implementation="auto",
               lora_rank=0, ff_lora_rank=0, modulation_lora_rank=0):
    self.modulation = layers.dense(dim, 6 * dim, ("embed", None), rngs, dtype, zero_init=True)
    self.modulation_lora = layers.lora(dim, 6 * dim, ("embed", None), modulation_lora_rank, rngs, dtype)
    self.norm_self = plain_layer_norm(dim, rngs, dtype)
    self.self_attn = layers.Attention(dim, dim, heads, dtype=dtype, rngs=rngs, implementation=implementation,
                                      zero_out=False, lora_rank=lora_rank)
    self.norm_cross = layers.layer_norm(dim, rngs, dtype)
    self.cross_attn = layers.Attention(dim, text_dim, heads, dtype=dtype, rngs=rngs, context_axis="text_embed",
                                       null_kv=True, implementation=implementation, lora_rank=lora_rank)
    self.norm_ff = plain_layer_norm(dim, rngs, dtype)
    self.ff = layers.FeedForward(dim, ff_mult, dtype=dtype, rngs=rngs, zero_out=False, dropout_rate=dropout_rate,
                                 lora_rank=ff_lora_rank)

  def __call__(self, x, emb, text, text_mask, dropout_key=None, clip_bias=None, clip_rows=1):
    """clip_rows: consecutive rows (frames, or tubelets) whose tokens self-attend as one sequence (spacetime
    attention; 1: each row attends to itself); clip_bias: None or [clips, 1, clip_rows * tokens, clip_rows *
    tokens], added to those logits."""
    shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(layers.adapted(self, "modulation", nnx.silu(emb)), 6,
                                                             axis=-1)
    normed = modulate(self.norm_self(x), shift1, scale1)
    if clip_rows == 1:
      attended = self.self_attn(normed, normed)
    else:
      clip = normed.reshape(normed.shape[0] // clip_rows, -1, normed.shape[-1])
      attended = self.self_attn(clip, clip, bias=clip_bias).reshape(normed.shape)
    x = x + gate1[:, None] * attended
    x = x + self.cross_attn(self.norm_cross(x), text, text_mask)
    return x + gate2[:, None] * self.ff(modulate(self.norm_ff(x), shift2, scale2), dropout_key)


class DiT(nnx.Module):

  def __init__(self, config, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(config.dtype)
    dim, patch = config.channels, config.patch_size
    if dim % 4 or dim % config.heads:
      raise ValueError(f"model.channels={dim} (the DiT's width) must be divisible by 4 and by model.heads="
                       f"{config.heads}.")
    self.dtype, self.dim, self.patch = dtype, dim, patch
    self.remat = config.remat_policy if config.remat else None
    self.position_max_period = config.position_max_period
    self.lowres_conditioning = config.lowres_conditioning
    patch_channels = config.in_channels + (superres.LOWRES_CHANNELS if config.lowres_conditioning else 0)
    # A spacetime DiT's token may span several frames (a tubelet); every other DiT's spans one.
    self.temporal_patch = config.temporal_patch_size if config.temporal else 1
    self.patch_in = layers.dense(self.temporal_patch * patch * patch * patch_channels, dim, (None, "embed"), rngs,
                                 dtype)
    self.aug_in = layers.dense(dim, dim, (None, "embed"), rngs, dtype) if config.lowres_conditioning else None
    self.time_in = layers.dense(dim, dim, (None, "embed"), rngs, dtype)
    self.time_out = layers.dense(dim, dim, ("embed", "embed"), rngs, dtype)
    self.text_pool = layers.dense(config.text_dim, dim, ("text_embed", "embed"), rngs, dtype)
    modulation_lora_rank = config.lora_rank if config.lora_modulation else 0
    self.blocks = nnx.List([DiTBlock(dim, config.text_dim, config.heads, ff_mult=config.ff_mult,
                                     dropout_rate=config.dropout, dtype=dtype, rngs=rngs,
                                     implementation=config.attention, lora_rank=config.lora_rank,
                                     ff_lora_rank=config.lora_rank if config.lora_feed_forward else 0,
                                     modulation_lora_rank=modulation_lora_rank)
                               for _ in range(config.depth)])
    self.final_modulation = layers.dense(dim, 2 * dim, ("embed", None), rngs, dtype, zero_init=True)
    self.final_modulation_lora = layers.lora(dim, 2 * dim, ("embed", None), modulation_lora_rank, rngs, dtype)
    self.norm_out = plain_layer_norm(dim, rngs, dtype)
    self.patch_out = layers.dense(dim, self.temporal_patch * patch * patch * config.in_channels, ("embed", None),
                                  rngs, dtype, zero_init=True)
    self.temporal, self.max_frames = config.temporal, config.max_frames
    self.spacetime = config.temporal and config.video_attention == "spacetime"
    self.temporal_frame_embed = layers.dense(dim, dim, (None, "embed"), rngs, dtype) if self.temporal else None
    self.temporal_attention = (nnx.List([temporal.TemporalAttention(dim, config.heads, config.max_frames,
                                                                    implementation=config.attention, dtype=dtype,
                                                                    rngs=rngs, lora_rank=config.lora_rank)
                                         for _ in range(config.depth)])
                               if self.temporal and not self.spacetime else None)

  def _run(self, module, *args, **static):
    """module(*args, **static), rematerialised in the backward pass with model.remat under model.remat_policy
    (static: Python values)."""
    call = lambda m, *a: m(*a, **static)
    return layers.rematerialised(call, self.remat)(module, *args) if self.remat else call(module, *args)

  def __call__(self, x, logsnr, text, text_mask, lowres=None, aug_logsnr=None, dropout_key=None, is_video=None):
    if self.lowres_conditioning != (lowres is not None and aug_logsnr is not None):
      raise ValueError("a super-resolution DiT (model.lowres_conditioning) needs `lowres` and `aug_logsnr` inputs, "
                       "and only it takes them.")
    video_shape = x.shape if x.ndim == 5 else None
    stills = video_shape is not None and is_video is not None  # None: every example a video
    t = self.temporal_patch
    if t > 1 and (video_shape is None or video_shape[1] % t):
      raise ValueError(f"a DiT with model.temporal_patch_size={t} takes clips [batch, frames, h, w, c] of a multiple "
                       f"of {t} frames; got {x.shape}.")
    c = x.shape[-1]
    if self.lowres_conditioning:  # the upsampled low-res input becomes extra channels of every patch
      x = jnp.concatenate([x, superres.upsampled(lowres, x.shape)], axis=-1)
    if video_shape is not None:  # frames become batch rows for the spatial blocks
      if not self.temporal:
        raise ValueError("a video input [batch, frames, h, w, c] needs a video DiT (model.temporal=True).")
      is_video = jnp.ones((x.shape[0],), bool) if is_video is None else is_video
      x, logsnr, text, text_mask, frame_is_video = temporal.frames_as_rows(x, logsnr, text, text_mask, is_video)
      aug_logsnr = None if aug_logsnr is None else jnp.repeat(aug_logsnr, video_shape[1])
    rows, h, w = x.shape[:3]
    p, dtype = self.patch, self.dtype
    grid_h, grid_w = h // p, w // p
    if t > 1:  # a row is a tubelet of t consecutive frames of one clip, with that clip's conditioning
      logsnr, text, text_mask, frame_is_video = (a[::t] for a in (logsnr, text, text_mask, frame_is_video))
      aug_logsnr = None if aug_logsnr is None else aug_logsnr[::t]
    patches = x.reshape(rows // t, t, grid_h, p, grid_w, p, -1).transpose(0, 2, 4, 1, 3, 5, 6)
    patches = patches.reshape(rows // t, grid_h * grid_w, -1)  # each patch's values in (frame, row, column) order
    positions = position_embedding(grid_h, grid_w, self.dim, self.position_max_period)
    tokens = self.patch_in(patches.astype(dtype)) + positions.astype(dtype)
    text = text.astype(dtype)
    emb = self.time_out(nnx.silu(self.time_in(layers.sinusoidal_embedding(logsnr, self.dim).astype(dtype))))
    emb = emb + self.text_pool(layers.masked_mean(text, text_mask))
    if self.lowres_conditioning:
      emb = emb + self.aug_in(layers.sinusoidal_embedding(aug_logsnr, self.dim).astype(dtype))
    if video_shape is not None:  # which frame each row is (off for stills, so they stay images)
      b, f = video_shape[:2]
      frame_emb = self.temporal_frame_embed(
          temporal.frame_features(b, f, self.dim, self.max_frames, stride=t).astype(dtype))
      emb = emb + frame_is_video.astype(dtype)[:, None] * frame_emb
      gate = frame_is_video.astype(dtype)[:, None, None]

      def across_frames(attention, tokens):  # [b * f, tokens, dim] seen as [b, f, grid_h, grid_w, dim]
        mixed = self._run(attention, tokens.reshape(b, f, grid_h, grid_w, self.dim))
        return tokens + gate * mixed.reshape(tokens.shape)

    clip_rows = video_shape[1] // t if self.spacetime and video_shape is not None else 1
    # Stills attend within their own frame; without any, a clip's tokens attend to each other unmasked.
    clip_bias = (spacetime_bias(is_video, clip_rows, grid_h * grid_w).astype(dtype)
                 if clip_rows > 1 and stills else None)
    dropout_keys = ([None] * len(self.blocks) if dropout_key is None
                    else list(jax.random.split(dropout_key, len(self.blocks))))
    for index, block in enumerate(self.blocks):
      tokens = self._run(block, tokens, emb, text, text_mask, dropout_keys[index], clip_bias, clip_rows=clip_rows)
      if video_shape is not None and not self.spacetime:
        tokens = across_frames(self.temporal_attention[index], tokens)
    shift, scale = jnp.split(layers.adapted(self, "final_modulation", nnx.silu(emb)), 2, axis=-1)
    out = self.patch_out(modulate(self.norm_out(tokens), shift, scale)).astype(jnp.float32)
    out = out.reshape(rows // t, grid_h, grid_w, t, p, p, c).transpose(0, 3, 1, 4, 2, 5, 6).reshape(rows, h, w, c)
    return out if video_shape is None else out.reshape(video_shape)
