"""Text-conditioned U-Net (ADM / Imagen Efficient U-Net as configurations of one module).

Configuration (`config.model`, see configs/base.py):
  channels, channel_mults        width per level = channels * mult
  num_res_blocks                 residual blocks per level (tuple; more at low resolution = Efficient U-Net)
  attention_levels               levels (indices) that get self + cross attention after each block
  skips                          'block' (ADM: a skip per block) or 'level' (Efficient U-Net: one per level)
  skip_scale                     residual scale, 1/sqrt(2) in the Efficient U-Net, 1.0 in ADM
  heads, ff_mult, dropout, text_dim, in_channels, dtype ('float32' / 'bfloat16')
  remat, remat_policy            recompute each block in the backward pass: all of it ('full') or all but its
                                 convolutions' and projections' outputs ('matmuls'; layers.saves_matmuls)
  attention                      'auto', 'folded', 'xla' or 'cudnn' (models/attention.py)
  lowres_conditioning            super-resolution stage: concatenate an upsampled low-res image and
                                 embed its noise-augmentation log-SNR (video: a low-res clip with
                                 the same or fewer frames, repeated in time = temporal super-resolution)
  temporal, max_frames           video U-Net: a `temporal.TemporalBlock` after every spatial block
                                 (temporal attention at attention levels and in the middle); the
                                 relative-position bias covers max_frames; an embedding of the frame
                                 index joins the timestep embedding (sinusoids with periods up to
                                 max_frames, so every feature tells frames apart; randomly initialised,
                                 so frames differ from the first step; inflation zeroes it)
  coordinate_channels            also feed each pixel's (y, x) in [-1, 1] to the first convolution, so
                                 absolute position (where an object should be in a given frame) is an
                                 input rather than something inferred from the zero padding at borders

Layout: level i runs its blocks at resolution res / 2^i. Going down, a level downsamples (strided conv)
before its blocks; going up, it upsamples (nearest + conv) after them. This is the Efficient U-Net's
order (Imagen, Saharia et al. 2022) and, level for level, the same network as ADM's "blocks then
downsample", so both are configurations of this one module.

Call: x [batch, h, w, in_channels], logsnr [batch], text [batch, tokens, text_dim],
text_mask [batch, tokens] bool -> prediction [batch, h, w, in_channels] (float32).
Video (temporal U-Net): x [batch, frames, h, w, in_channels] -> [batch, frames, h, w, in_channels];
is_video [batch] (default all True) switches the temporal layers off for images stored as videos. The
spatial parameters have the same paths as in the image U-Net (temporal ones live under `temporal_*`),
so an image checkpoint loads into a video U-Net unchanged (see `models/inflation.py`).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax import superres
from diffusion_jax.models import layers, temporal


class Downsample(nnx.Module):
  def __init__(self, ch, *, dtype, rngs):
    self.conv = layers.conv(ch, ch, 3, rngs, dtype, stride=2)

  def __call__(self, x):
    return self.conv(x)


class Upsample(nnx.Module):
  def __init__(self, ch, *, dtype, rngs):
    self.conv = layers.conv(ch, ch, 3, rngs, dtype)

  def __call__(self, x):
    b, h, w, c = x.shape
    return self.conv(jax.image.resize(x, (b, 2 * h, 2 * w, c), "nearest"))


def coordinates(shape, dtype):
  """[b, h, w, 2]: each pixel's (y, x) position, spaced evenly over [-1, 1]."""
  b, h, w = shape[:3]
  y, x = jnp.meshgrid(jnp.linspace(-1, 1, h, dtype=dtype), jnp.linspace(-1, 1, w, dtype=dtype), indexing="ij")
  return jnp.broadcast_to(jnp.stack([y, x], axis=-1), (b, h, w, 2))


class UNet(nnx.Module):

  def __init__(self, config, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(config.dtype)
    widths = [config.channels * m for m in config.channel_mults]
    if len(config.num_res_blocks) != len(widths):
      raise ValueError(f"model.num_res_blocks {tuple(config.num_res_blocks)} needs one entry per level of "
                       f"model.channel_mults {tuple(config.channel_mults)}.")
    if config.skips not in ("block", "level"):
      raise ValueError(f"model.skips must be 'block' or 'level', got {config.skips!r}.")
    self.dtype = dtype
    self.channels = config.channels
    self.max_frames = config.max_frames
    self.skips = config.skips
    self.remat = config.remat_policy if config.remat else None
    self.lowres_conditioning = config.lowres_conditioning
    self.temporal = config.temporal
    emb_dim = 4 * config.channels
    film_lora_rank = config.lora_rank if config.lora_modulation else 0
    block = dict(dropout_rate=config.dropout, skip_scale=config.skip_scale, dtype=dtype, rngs=rngs,
                 lora_rank=config.lora_rank if config.lora_convolutions else 0, film_lora_rank=film_lora_rank)
    attn = dict(ff_mult=config.ff_mult, dtype=dtype, rngs=rngs, implementation=config.attention,
                lora_rank=config.lora_rank, ff_lora_rank=config.lora_rank if config.lora_feed_forward else 0)

    self.time_in = layers.dense(config.channels, emb_dim, (None, "embed"), rngs, dtype)
    self.time_out = layers.dense(emb_dim, emb_dim, ("embed", "embed"), rngs, dtype)
    self.text_pool = layers.dense(config.text_dim, emb_dim, ("text_embed", "embed"), rngs, dtype)
    self.coordinate_channels = config.coordinate_channels
    in_ch = (config.in_channels + (superres.LOWRES_CHANNELS if config.lowres_conditioning else 0)
             + (2 if config.coordinate_channels else 0))
    self.aug_in = (layers.dense(config.channels, emb_dim, (None, "embed"), rngs, dtype)
                   if config.lowres_conditioning else None)
    self.conv_in = layers.conv(in_ch, widths[0], 3, rngs, dtype)
    self.temporal_frame_embed = (layers.dense(config.channels, emb_dim, (None, "embed"), rngs, dtype)
                                 if self.temporal else None)

    def level_blocks(level, ch_in, ch_out, n, skip_channels):
      res, tfm = [], []
      for j in range(n):
        res.append(layers.ResBlock(ch_in + skip_channels[j], ch_out, emb_dim, **block))
        tfm.append(layers.TransformerBlock(ch_out, config.text_dim, config.heads, **attn)
                   if level in config.attention_levels else None)
        ch_in = ch_out
      return nnx.List(res), nnx.List(tfm)

    def temporal_blocks(ch, n, attention):  # one per spatial block; None everywhere in an image U-Net
      return nnx.List([temporal.TemporalBlock(ch, emb_dim, config.heads, config.max_frames, attention=attention,
                                              implementation=config.attention, dtype=dtype, rngs=rngs,
                                              lora_rank=config.lora_rank,
                                              conv_lora_rank=config.lora_rank if config.lora_convolutions else 0,
                                              film_lora_rank=film_lora_rank)
                       if self.temporal else None
                       for _ in range(n)])

    down, temporal_down, skip_chs, ch = [], [], [], widths[0]
    for i, (w, n) in enumerate(zip(widths, config.num_res_blocks)):
      sample = Downsample(ch, dtype=dtype, rngs=rngs) if i > 0 else None
      down.append((sample, *level_blocks(i, ch, w, n, [0] * n)))
      temporal_down.append(temporal_blocks(w, n, i in config.attention_levels))
      skip_chs.append([w] * n if self.skips == "block" else [w])
      ch = w
    self.down = nnx.List([nnx.List(d) for d in down])
    self.temporal_down = nnx.List(temporal_down)

    self.mid_res1 = layers.ResBlock(ch, ch, emb_dim, **block)
    self.mid_attn = layers.TransformerBlock(ch, config.text_dim, config.heads, **attn)
    self.mid_res2 = layers.ResBlock(ch, ch, emb_dim, **block)
    self.temporal_mid = temporal_blocks(ch, 2, True)

    up, temporal_up = [], []
    for i in reversed(range(len(widths))):
      n = config.num_res_blocks[i]
      skips = skip_chs[i][::-1] + [0] * (n - len(skip_chs[i]))
      res, tfm = level_blocks(i, ch, widths[i], n, skips)
      up.append(nnx.List([res, tfm, Upsample(widths[i], dtype=dtype, rngs=rngs) if i > 0 else None]))
      temporal_up.append(temporal_blocks(widths[i], n, i in config.attention_levels))
      ch = widths[i]
    self.up = nnx.List(up)
    self.temporal_up = nnx.List(temporal_up)

    self.norm_out = layers.group_norm(ch, rngs, dtype)
    self.conv_out = layers.conv(ch, config.in_channels, 3, rngs, dtype, zero_init=True)

  def _run(self, module, *args):
    if self.remat:
      return layers.rematerialised(lambda m, *a: m(*a), self.remat)(module, *args)
    return module(*args)

  def __call__(self, x, logsnr, text, text_mask, lowres=None, aug_logsnr=None, dropout_key=None, is_video=None):
    video_shape = x.shape if x.ndim == 5 else None
    if video_shape is not None:  # frames become batch rows for the spatial layers
      if not self.temporal:
        raise ValueError("a video input [batch, frames, h, w, c] needs a temporal U-Net (model.temporal=True).")
      b, f = video_shape[:2]
      is_video = jnp.ones((b,), bool) if is_video is None else is_video
      x, logsnr, text, text_mask, frame_is_video = temporal.frames_as_rows(x, logsnr, text, text_mask, is_video)
      if lowres is not None:  # temporal super-resolution: each low-res frame repeated over the frames it spans
        lowres, aug_logsnr = temporal.frames_as_rows(jnp.repeat(lowres, f // lowres.shape[1], axis=1), aug_logsnr)
    dtype = self.dtype
    text = text.astype(dtype)
    emb = self.time_out(nnx.silu(self.time_in(layers.sinusoidal_embedding(logsnr, self.channels).astype(dtype))))
    emb = emb + self.text_pool(layers.masked_mean(text, text_mask))
    if self.lowres_conditioning:
      if lowres is None or aug_logsnr is None:
        raise ValueError("this super-resolution U-Net needs `lowres` and `aug_logsnr` inputs.")
      lowres = superres.upsampled(lowres, x.shape)  # the same upsampling a residual stage builds on
      x = jnp.concatenate([x, lowres], axis=-1)
      emb = emb + self.aug_in(layers.sinusoidal_embedding(aug_logsnr, self.channels).astype(dtype))
    if video_shape is not None:  # which frame each row is (off for stills, so they stay images)
      frame_emb = self.temporal_frame_embed(temporal.frame_features(b, f, self.channels, self.max_frames).astype(dtype))
      emb = emb + frame_is_video.astype(dtype)[:, None] * frame_emb
    keys = iter(jax.random.split(dropout_key, 256)) if dropout_key is not None else None
    next_key = (lambda: next(keys)) if keys is not None else (lambda: None)

    def across_frames(block, h):
      return h if video_shape is None else self._run(block, h, emb, is_video)

    if self.coordinate_channels:
      x = jnp.concatenate([x, coordinates(x.shape, x.dtype)], axis=-1)
    h = self.conv_in(x.astype(dtype))
    skips = []
    for (sample, res_blocks, attn_blocks), temporal_blocks in zip(self.down, self.temporal_down):
      if sample is not None:
        h = sample(h)
      for res, attn, temporal_block in zip(res_blocks, attn_blocks, temporal_blocks):
        h = self._run(res, h, emb, next_key())
        if attn is not None:
          h = self._run(attn, h, text, text_mask)
        h = across_frames(temporal_block, h)
        if self.skips == "block":
          skips.append(h)
      if self.skips == "level":
        skips.append(h)

    h = self._run(self.mid_res1, h, emb, next_key())
    h = self._run(self.mid_attn, h, text, text_mask)
    h = across_frames(self.temporal_mid[0], h)
    h = self._run(self.mid_res2, h, emb, next_key())
    h = across_frames(self.temporal_mid[1], h)

    for (res_blocks, attn_blocks, sample), temporal_blocks in zip(self.up, self.temporal_up):
      for j, (res, attn, temporal_block) in enumerate(zip(res_blocks, attn_blocks, temporal_blocks)):
        if self.skips == "block" or j == 0:
          h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = self._run(res, h, emb, next_key())
        if attn is not None:
          h = self._run(attn, h, text, text_mask)
        h = across_frames(temporal_block, h)
      if sample is not None:
        h = sample(h)
    out = self.conv_out(nnx.silu(self.norm_out(h))).astype(jnp.float32)
    return out if video_shape is None else out.reshape(video_shape[:2] + out.shape[1:])
