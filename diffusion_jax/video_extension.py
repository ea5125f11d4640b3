"""Videos longer than a model's clips: autoregressive extension (Ho et al. 2022, Video Diffusion Models).

A video model makes clips of `frames` frames (up to model.max_frames). To make `length` frames, the first clip
is generated as usual, then window after window: a clip whose first `context` frames are the last `context`
frames made so far, kept (editing.py's inpainting denoiser, over frames: the replacement method), the others
generated from noise; its new frames are appended until the video is `length` frames long. One compiled program
serves every window after the first.

On a causal autoencoder's latents (time_compression r > 1: the first latent frame holds one frame, each other r)
a window keeps whole latent frames: `context` is 1 + a multiple of r, and the kept frames encode, as a clip of
their own, to the window's first latent frames (the encoder is causal), so each window adds a multiple of r frames.
"""

import logging

import jax
import numpy as np

log = logging.getLogger(__name__)


def window_count(length: int, frames: int, context: int) -> int:
  """Windows after the first clip that make `length` frames, each adding frames - context."""
  return max(0, -(-(length - frames) // (frames - context)))


def context_frames(sample_config, frames: int, time_compression: int = 1) -> int:
  """sample.context_frames, or when 0 the 1 + a multiple of time_compression nearest half the clip (ties: the
  fewer; half the clip when time_compression is 1)."""
  r = time_compression
  latent_frames_after_first = (frames // 2 - 1 + (r - 1) // 2) // r
  return sample_config.context_frames or 1 + r * latent_frames_after_first


def problems(sample_config, frames: int, time_compression: int = 1) -> list[str]:
  """What is wrong with sample.video_length and sample.context_frames for clips of `frames` frames (a causal
  autoencoder's, whose latent frames but the first hold time_compression frames each, when that is > 1)."""
  s, found, r = sample_config, [], time_compression
  if s.video_length and s.video_length <= frames:
    found.append(f"--video_length={s.video_length} is not longer than a clip ({frames} frames, --frames): leave it "
                 "0 or make it longer")
  context = context_frames(s, frames, r)
  if s.video_length and not 1 <= context < frames:
    found.append(f"--context_frames={s.context_frames} must be in 1..{frames - 1} (a clip has {frames} frames)")
  elif s.video_length and (context - 1) % r:
    choices = " or ".join(str(c) for c in sorted({1 + (context - 1) // r * r, 1 + -(-(context - 1) // r) * r})
                          if c < frames)
    found.append(f"--context_frames={context}: a window keeps whole latent frames of the causal autoencoder (the "
                 f"first holds one frame, each other {r}): give 1 + a multiple of {r} below {frames} (e.g. "
                 f"{choices})")
  return found


def window_keys(keys: np.ndarray, window: int) -> np.ndarray:
  """Raw keys [rows, 2] of the first clips -> those of window `window` (>= 1): each row's noise its own."""
  return np.stack([np.asarray(jax.random.fold_in(key, window)) for key in keys])


def extend(first, generate_window, keys, length: int, context: int) -> np.ndarray:
  """uint8 clips [rows, frames, h, w, 3] -> videos [rows, length, h, w, 3]. generate_window(init [rows, frames,
  h, w, 3] uint8, keep [rows, frames, h, w] bool, keys [rows, 2]) -> uint8 clips of the same shape: the sampler
  (at strength 1) editing `init` where keep is False; keys: those `first` was generated with."""
  videos, frames = first, first.shape[1]
  count = window_count(length, frames, context)
  keep = np.zeros(first.shape[:-1], bool)
  keep[:, :context] = True
  for window in range(1, count + 1):
    log.info("extending the videos: window %d of %d (frames %d to %d)", window, count, videos.shape[1],
             min(length, videos.shape[1] + frames - context))
    known = videos[:, -context:]
    init = np.concatenate([known, np.repeat(known[:, -1:], frames - context, axis=1)], axis=1)
    videos = np.concatenate([videos, generate_window(init, keep, window_keys(keys, window))[:, context:]], axis=1)
  return videos[:, :length]
