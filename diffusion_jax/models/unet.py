"""Text-conditioned U-Net (ADM / Imagen Efficient U-Net as configurations of one module).

Configuration (`config.model`, see configs/base.py):
  channels, channel_mults        width per level = channels * mult
  num_res_blocks                 residual blocks per level (tuple; more at low resolution = Efficient U-Net)
  attention_levels               levels (indices) that get self + cross attention after each block
  skips                          'block' (ADM: a skip per block) or 'level' (Efficient U-Net: one per level)
  skip_scale                     residual scale, 1/sqrt(2) in the Efficient U-Net, 1.0 in ADM
  heads, ff_mult, dropout, text_dim, in_channels, dtype ('float32' / 'bfloat16'), remat
  lowres_conditioning            super-resolution stage: concatenate an upsampled low-res image and
                                 embed its noise-augmentation log-SNR

Layout: level i runs its blocks at resolution res / 2^i. Going down, a level downsamples (strided conv)
before its blocks; going up, it upsamples (nearest + conv) after them. This is the Efficient U-Net's
order (Imagen, Saharia et al. 2022) and, level for level, the same network as ADM's "blocks then
downsample", so both are configurations of this one module.

Call: x [batch, h, w, in_channels], logsnr [batch], text [batch, tokens, text_dim],
text_mask [batch, tokens] bool -> prediction [batch, h, w, in_channels] (float32).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models import layers


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
    self.skips = config.skips
    self.remat = config.remat
    self.lowres_conditioning = config.lowres_conditioning
    emb_dim = 4 * config.channels
    block = dict(dropout_rate=config.dropout, skip_scale=config.skip_scale, dtype=dtype, rngs=rngs)
    attn = dict(ff_mult=config.ff_mult, dtype=dtype, rngs=rngs)

    self.time_in = layers.dense(config.channels, emb_dim, (None, "embed"), rngs, dtype)
    self.time_out = layers.dense(emb_dim, emb_dim, ("embed", "embed"), rngs, dtype)
    self.text_pool = layers.dense(config.text_dim, emb_dim, ("text_embed", "embed"), rngs, dtype)
    in_ch = config.in_channels * (2 if config.lowres_conditioning else 1)
    self.aug_in = (layers.dense(config.channels, emb_dim, (None, "embed"), rngs, dtype)
                   if config.lowres_conditioning else None)
    self.conv_in = layers.conv(in_ch, widths[0], 3, rngs, dtype)

    def level_blocks(level, ch_in, ch_out, n, skip_channels):
      res, tfm = [], []
      for j in range(n):
        res.append(layers.ResBlock(ch_in + skip_channels[j], ch_out, emb_dim, **block))
        tfm.append(layers.TransformerBlock(ch_out, config.text_dim, config.heads, **attn)
                   if level in config.attention_levels else None)
        ch_in = ch_out
      return nnx.List(res), nnx.List(tfm)

    down, skip_chs, ch = [], [], widths[0]
    for i, (w, n) in enumerate(zip(widths, config.num_res_blocks)):
      sample = Downsample(ch, dtype=dtype, rngs=rngs) if i > 0 else None
      down.append((sample, *level_blocks(i, ch, w, n, [0] * n)))
      skip_chs.append([w] * n if self.skips == "block" else [w])
      ch = w
    self.down = nnx.List([nnx.List(d) for d in down])

    self.mid_res1 = layers.ResBlock(ch, ch, emb_dim, **block)
    self.mid_attn = layers.TransformerBlock(ch, config.text_dim, config.heads, **attn)
    self.mid_res2 = layers.ResBlock(ch, ch, emb_dim, **block)

    up = []
    for i in reversed(range(len(widths))):
      n = config.num_res_blocks[i]
      skips = skip_chs[i][::-1] + [0] * (n - len(skip_chs[i]))
      res, tfm = level_blocks(i, ch, widths[i], n, skips)
      up.append(nnx.List([res, tfm, Upsample(widths[i], dtype=dtype, rngs=rngs) if i > 0 else None]))
      ch = widths[i]
    self.up = nnx.List(up)

    self.norm_out = layers.group_norm(ch, rngs, dtype)
    self.conv_out = layers.conv(ch, config.in_channels, 3, rngs, dtype, zero_init=True)

  def _run(self, module, *args):
    if self.remat:
      return nnx.remat(lambda m, *a: m(*a))(module, *args)
    return module(*args)

  def __call__(self, x, logsnr, text, text_mask, lowres=None, aug_logsnr=None, dropout_key=None):
    dtype = self.dtype
    text = text.astype(dtype)
    emb = self.time_out(nnx.silu(self.time_in(layers.sinusoidal_embedding(logsnr, self.channels).astype(dtype))))
    emb = emb + self.text_pool(layers.masked_mean(text, text_mask))
    if self.lowres_conditioning:
      if lowres is None or aug_logsnr is None:
        raise ValueError("this super-resolution U-Net needs `lowres` and `aug_logsnr` inputs.")
      lowres = jax.image.resize(lowres, x.shape, "bicubic")
      x = jnp.concatenate([x, lowres], axis=-1)
      emb = emb + self.aug_in(layers.sinusoidal_embedding(aug_logsnr, self.channels).astype(dtype))
    keys = iter(jax.random.split(dropout_key, 256)) if dropout_key is not None else None
    next_key = (lambda: next(keys)) if keys is not None else (lambda: None)

    h = self.conv_in(x.astype(dtype))
    skips = []
    for sample, res_blocks, attn_blocks in self.down:
      if sample is not None:
        h = sample(h)
      for res, attn in zip(res_blocks, attn_blocks):
        h = self._run(res, h, emb, next_key())
        if attn is not None:
          h = self._run(attn, h, text, text_mask)
        if self.skips == "block":
          skips.append(h)
      if self.skips == "level":
        skips.append(h)

    h = self._run(self.mid_res1, h, emb, next_key())
    h = self._run(self.mid_attn, h, text, text_mask)
    h = self._run(self.mid_res2, h, emb, next_key())

    for res_blocks, attn_blocks, sample in self.up:
      for j, (res, attn) in enumerate(zip(res_blocks, attn_blocks)):
        if self.skips == "block" or j == 0:
          h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = self._run(res, h, emb, next_key())
        if attn is not None:
          h = self._run(attn, h, text, text_mask)
      if sample is not None:
        h = sample(h)
    return self.conv_out(nnx.silu(self.norm_out(h))).astype(jnp.float32)
