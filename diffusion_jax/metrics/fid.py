"""Fréchet distance between Gaussian fits of image features (FID), with pluggable feature extractors.

`feature_fn(images uint8 [n, h, w, 3]) -> features [n, d]`. Built in: `random_conv_features`, a fixed
random-weight convolutional network (seeded, no download) that is enough to rank models on the built-in
datasets; numbers are comparable only between runs that use the same extractor and resolution.
"""

import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)


def statistics(features: np.ndarray):
  features = np.asarray(features, np.float64)
  return features.mean(0), np.cov(features, rowvar=False)


def trace_sqrt_product(sigma1, sigma2) -> float:
  """tr((S1 S2)^(1/2)) of two covariance matrices [d, d]: the square roots of the eigenvalues of the symmetric
  S1^(1/2) S2 S1^(1/2) (which has those of S1 S2), summed. Two symmetric eigendecompositions cost far less
  than a general matrix square root (scipy.linalg.sqrtm) at Inception's d = 2048, and stay finite for
  singular covariances (fewer samples than dimensions)."""
  eigenvalues, eigenvectors = np.linalg.eigh(sigma1)
  root1 = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T
  return float(np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ sigma2 @ root1), 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))."""
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))


def fid(features_a, features_b) -> float:
  return frechet_distance(*statistics(features_a), *statistics(features_b))


@functools.cache
def random_conv_params(seed: int, kernel=(3, 3), widths=(32, 64, 128)):
  """He-scaled random kernels [*kernel, in, out] of a fixed 3-layer conv net (2-D or 3-D by `kernel`)."""
  keys = jax.random.split(jax.random.key(seed), len(widths))
  params, channels = [], 3
  for key, width in zip(keys, widths):
    fan_in = int(np.prod(kernel)) * channels
    params.append(jax.random.normal(key, tuple(kernel) + (channels, width)) * np.sqrt(2.0 / fan_in))
    channels = width
  return params


@functools.partial(jax.jit, static_argnames=("strides", "dimension_numbers"))
def random_conv_apply(params, pixels, strides, dimension_numbers):
  """uint8 [n, ..., 3] -> [n, sum of widths]: ReLU conv layers, each mean-pooled over its non-batch axes."""
  x = pixels.astype(jnp.float32) / 127.5 - 1.0
  pooled = []
  for kernel in params:
    x = jax.nn.relu(jax.lax.conv_general_dilated(x, kernel, strides, "SAME", dimension_numbers=dimension_numbers))
    pooled.append(x.mean(axis=tuple(range(1, x.ndim - 1))))
  return jnp.concatenate(pooled, axis=-1)


def batched(fn, pixels, batch: int, report_every: float = 15.0) -> np.ndarray:
  """fn (features of a batch) over `batch`-sized slices of pixels, concatenated. With more than one slice the last
  is padded with zeros (rows dropped after), so one compiled program serves every slice; once it has run for
  `report_every` seconds, progress is logged with an ETA (Inception features of an FID-10k on a CPU)."""
  pixels = np.asarray(pixels)
  outputs, start = [], time.time()
  last_report = start
  for first in range(0, len(pixels), batch):
    part = pixels[first:first + batch]
    if len(part) < batch < len(pixels):
      part = np.concatenate([part, np.zeros((batch - len(part),) + part.shape[1:], part.dtype)])
    outputs.append(np.asarray(fn(part))[:len(pixels) - first])
    done, now = min(first + batch, len(pixels)), time.time()
    if now - last_report >= report_every and done < len(pixels):
      last_report = now
      log.info("features: %d of %d (%d%%), elapsed %.0fs, eta %.0fs", done, len(pixels), 100 * done // len(pixels),
               now - start, (now - start) * (len(pixels) - done) / done)
  return np.concatenate(outputs)


def random_conv_features(images, seed: int = 0, batch: int = 256) -> np.ndarray:
  """Fixed random-weight conv features (224 dims): mean-pooled activations of three stride-2 layers."""
  params = random_conv_params(seed)
  return batched(lambda x: random_conv_apply(params, x, (2, 2), ("NHWC", "HWIO", "NHWC")), images, batch)
