"""Fréchet video distance (FVD): the Fréchet distance (`fid.frechet_distance`) between Gaussian fits of
clip features, with pluggable feature extractors.

`feature_fn(videos uint8 [n, frames, h, w, 3]) -> features [n, d]`. Built in: `random_video_features`,
a fixed random-weight 3-D convolutional network (kernels span 3 frames, like I3D's, so the order of the
frames matters) together with the per-frame random-conv image features. Numbers compare runs that use the
same extractor, resolution and frame count.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.metrics import fid


@functools.cache
def _random_conv3d_params(seed: int, widths=(32, 64, 128)):
  keys = jax.random.split(jax.random.key(seed + 1), len(widths))
  params, channels = [], 3
  for key, width in zip(keys, widths):
    params.append(jax.random.normal(key, (3, 3, 3, channels, width)) * np.sqrt(2.0 / (27 * channels)))
    channels = width
  return params


@jax.jit
def _random_conv3d_apply(params, videos):
  x = videos.astype(jnp.float32) / 127.5 - 1.0
  pooled = []
  for kernel in params:
    x = jax.nn.relu(jax.lax.conv_general_dilated(x, kernel, (1, 2, 2), "SAME",
                                                 dimension_numbers=("NDHWC", "DHWIO", "NDHWC")))
    pooled.append(x.mean(axis=(1, 2, 3)))
  return jnp.concatenate(pooled, axis=-1)


def random_video_features(videos, seed: int = 0, batch: int = 64) -> np.ndarray:
  """uint8 [n, frames, h, w, 3] -> [n, 448]: random 3-D conv features (224) and mean per-frame features (224)."""
  videos = np.asarray(videos)
  n, f = videos.shape[:2]
  params = _random_conv3d_params(seed)
  space_time = np.concatenate([np.asarray(_random_conv3d_apply(params, videos[i:i + batch]))
                               for i in range(0, n, batch)])
  frames = fid.random_conv_features(videos.reshape((n * f,) + videos.shape[2:]), seed).reshape(n, f, -1)
  return np.concatenate([space_time, frames.mean(1)], axis=-1)


def fvd(videos_a, videos_b, feature_fn=random_video_features) -> float:
  return fid.fid(feature_fn(videos_a), feature_fn(videos_b))
