"""Peak signal-to-noise ratio of uint8 images: how a super-resolution stage compares with bicubic upsampling."""

import jax
import numpy as np

from diffusion_jax import media


def psnr(images, reference) -> float:
  """PSNR in dB over whole sets of uint8 images [n, ..., h, w, 3] (one MSE over all pixels)."""
  mse = np.mean((np.asarray(images, np.float64) - np.asarray(reference, np.float64)) ** 2)
  return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def bicubic(lowres, like) -> np.ndarray:
  """uint8 lowres [n, (frames,) r, r, 3] upsampled bicubically to the shape of `like` (uint8)."""
  return media.to_uint8(jax.image.resize(media.to_float(lowres), np.shape(like), "bicubic"))
