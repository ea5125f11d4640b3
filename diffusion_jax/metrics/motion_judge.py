"""Exact pixel judge for `moving_shapes`: does a generated clip show the object and motion its caption
asked for, and does the object keep its appearance from frame to frame?

Per frame the lit pixels are the object (black background): its centroid gives the path, and colour /
shape / size come from `shapes_judge.describe` on the first frame where it is visible. The direction is
the dominant axis and sign of the centroid's displacement from the first to the last visible frame.

On wrap-around clips (data.wrap_around: the frame is a torus) the centroid is the circular mean of the lit
pixels' coordinates, the displacement the sum of the frame-to-frame steps each taken the short way round, and
the attributes are read from the first visible frame rolled to put the object in the middle.
"""

import re

import numpy as np

from diffusion_jax.data import captioned_shapes as shapes
from diffusion_jax.data import moving_shapes
from diffusion_jax.metrics import shapes_judge

ATTRIBUTES = ("direction", "color", "shape", "size", "visible")
# How a clip's motion misses its caption's direction: the other way along its axis, along the other axis, or less
# than a pixel (each clip is one of these or right).
DIRECTION_MISSES = ("direction_opposite", "direction_across", "direction_still")
_CAPTION = re.compile(r"a (small|large) (\w+) (circle|square|triangle) moving (left|right|up|down)")


def parse(caption: str):
  """caption -> (color, shape, size, direction) indices; ValueError if it is not a moving_shapes caption."""
  match = _CAPTION.search(caption)
  if match is None or match.group(2) not in shapes.COLORS:
    raise ValueError(f"Not a moving_shapes caption: {caption!r}.")
  size, color, shape, direction = match.groups()
  return (list(shapes.COLORS).index(color), shapes.SHAPES.index(shape), shapes.SIZES.index(size),
          moving_shapes.DIRECTIONS.index(direction))


def opposite(direction: int) -> int:
  """Index into moving_shapes.DIRECTIONS of the opposite motion."""
  name = {"left": "right", "right": "left", "up": "down", "down": "up"}[moving_shapes.DIRECTIONS[direction]]
  return moving_shapes.DIRECTIONS.index(name)


def reversed_direction(caption: str) -> str:
  """The caption asking for the opposite motion ("... moving left" -> "... moving right"), all else equal."""
  color, shape, size, direction = parse(caption)
  return moving_shapes.caption(color, shape, size, opposite(direction))


def track(video: np.ndarray, wrap_around: bool = False):
  """uint8 [frames, res, res, 3] -> (centroids [frames, 2] (y, x; NaN where nothing is lit), areas [frames]);
  wrap_around: circular means, in [0, res)."""
  res = video.shape[1]
  lit = shapes_judge.lit_pixels(video)
  areas = lit.sum(axis=(1, 2)).astype(np.float64)
  yy, xx = np.mgrid[0:res, 0:res] + 0.5
  with np.errstate(invalid="ignore", divide="ignore"):
    if wrap_around:
      angle = lambda c: 2 * np.pi * c / res
      mean = lambda c: np.arctan2((lit * np.sin(angle(c))).sum(axis=(1, 2)), (lit * np.cos(angle(c))).sum(axis=(1, 2)))
      centroids = np.stack([mean(yy), mean(xx)], axis=-1) * res / (2 * np.pi) % res
    else:
      centroids = np.stack([(lit * yy).sum(axis=(1, 2)) / areas, (lit * xx).sum(axis=(1, 2)) / areas], axis=-1)
  visible = areas >= max(1.0, 0.004 * res * res)
  centroids[~visible] = np.nan
  return centroids, np.where(visible, areas, 0.0)


def direction_of(centroids: np.ndarray, wrap_resolution: int = 0):
  """Index into moving_shapes.DIRECTIONS of the dominant displacement, or None when the object is visible
  in fewer than two frames or moves less than a pixel. wrap_resolution > 0: centroids on a torus of that size."""
  visible = np.nonzero(~np.isnan(centroids[:, 0]))[0]
  if len(visible) < 2:
    return None
  if wrap_resolution:
    half = wrap_resolution / 2
    dy, dx = ((np.diff(centroids[visible], axis=0) + half) % wrap_resolution - half).sum(axis=0)
  else:
    dy, dx = centroids[visible[-1]] - centroids[visible[0]]
  if max(abs(dy), abs(dx)) < 1.0:
    return None
  if abs(dx) >= abs(dy):
    return moving_shapes.DIRECTIONS.index("right" if dx > 0 else "left")
  return moving_shapes.DIRECTIONS.index("down" if dy > 0 else "up")


def score(video: np.ndarray, caption: str, wrap_around: bool = False) -> dict:
  """Per-attribute correctness (0/1) of one clip, which of DIRECTION_MISSES its motion is (0/1 each), and
  `appearance_change`: the mean relative change of the object's area between consecutive visible frames (0 for a
  perfectly rigid object)."""
  color, shape, size, direction = parse(caption)
  res = video.shape[1]
  centroids, areas = track(video, wrap_around)
  visible = areas > 0
  result = {k: 0.0 for k in ATTRIBUTES}
  result["visible"] = float(visible.mean() >= 0.75)
  moved = direction_of(centroids, res if wrap_around else 0)
  result["direction"] = float(moved == direction)
  result["direction_opposite"] = float(moved == opposite(direction))
  result["direction_across"] = float(moved not in (None, direction, opposite(direction)))
  result["direction_still"] = float(moved is None)
  if visible.any():
    first = int(np.argmax(visible))
    frame = video[first]
    if wrap_around:  # the object whole, in the middle of the frame
      frame = np.roll(frame, tuple(int(round(res / 2 - c)) for c in centroids[first]), axis=(0, 1))
    got = shapes_judge.describe(frame, shapes_judge.lit_pixels(frame), res)
    result["color"], result["shape"], result["size"] = (float(got[0] == color), float(got[1] == shape),
                                                        float(got[2] == size))
  pairs = visible[1:] & visible[:-1]
  change = np.abs(np.diff(areas)) / np.maximum(areas[:-1], 1.0)
  result["appearance_change"] = float(change[pairs].mean()) if pairs.any() else 1.0
  return result


def accuracy(videos, captions, wrap_around: bool = False) -> dict:
  """Mean per-attribute accuracy over a set, 'all' (every attribute right), the shares of DIRECTION_MISSES and the
  mean appearance change."""
  scores = [score(np.asarray(v), c.decode() if isinstance(c, bytes) else c, wrap_around)
            for v, c in zip(videos, captions)]
  result = {k: float(np.mean([s[k] for s in scores])) for k in ATTRIBUTES + DIRECTION_MISSES + ("appearance_change",)}
  result["all"] = float(np.mean([all(s[k] == 1.0 for k in ATTRIBUTES) for s in scores]))
  return result
