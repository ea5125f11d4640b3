"""Fréchet video distance (FVD): the Fréchet distance (`fid.frechet_distance`) between Gaussian fits of
clip features, with pluggable feature extractors.

`feature_fn(videos uint8 [n, frames, h, w, 3]) -> features [n, d]`. Built in: `random_video_features`,
a fixed random-weight 3-D convolutional network (kernels span 3 frames, like I3D's, so the order of the
frames matters) together with the per-frame random-conv image features. Numbers compare runs that use the
same extractor, resolution and frame count.
"""

import numpy as np

from diffusion_jax.metrics import fid


def random_video_features(videos, seed: int = 0, batch: int = 64) -> np.ndarray:
  """uint8 [n, frames, h, w, 3] -> [n, 448]: random 3-D conv features (224) and mean per-frame features (224)."""
  videos = np.asarray(videos)
  n, f = videos.shape[:2]
  params = fid.random_conv_params(seed + 1, kernel=(3, 3, 3))
  space_time = fid.batched(lambda x: fid.random_conv_apply(params, x, (1, 2, 2), ("NDHWC", "DHWIO", "NDHWC")),
                           videos, batch)
  frames = fid.random_conv_features(videos.reshape((n * f,) + videos.shape[2:]), seed).reshape(n, f, -1)
  return np.concatenate([space_time, frames.mean(1)], axis=-1)


def fvd(videos_a, videos_b, feature_fn=random_video_features) -> float:
  return fid.fid(feature_fn(videos_a), feature_fn(videos_b))
