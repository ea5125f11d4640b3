"""Fréchet distance between Gaussian fits of image features (FID), with pluggable feature extractors.

`feature_fn(images uint8 [n, h, w, 3]) -> features [n, d]`. Built in: `random_conv_features`, a fixed
random-weight convolutional network (seeded, no download) that is enough to rank models on the built-in
datasets; numbers are comparable only between runs that use the same extractor and resolution.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


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


def batched(fn, pixels, batch: int) -> np.ndarray:
  pixels = np.asarray(pixels)
  return np.concatenate([np.asarray(fn(pixels[i:i + batch])) for i in range(0, len(pixels), batch)])


def random_conv_features(images, seed: int = 0, batch: int = 256) -> np.ndarray:
  """Fixed random-weight conv features (224 dims): mean-pooled activations of three stride-2 layers."""
  params = random_conv_params(seed)
  return batched(lambda x: random_conv_apply(params, x, (2, 2), ("NHWC", "HWIO", "NHWC")), images, batch)
