"""Exact pixel judge for `captioned_shapes`: does an image show what its caption asked for?

Each quadrant is read off the pixels: empty, or one object whose colour is the nearest palette colour,
whose size follows from its area and whose shape from how much of its bounding box it fills (square ~1,
circle ~pi/4, triangle ~1/2). Scores are per attribute: colour, shape, size, position (the named
quadrant holds an object) and count (number of non-empty quadrants).
"""

import re

import numpy as np

from diffusion_jax.data import captioned_shapes as shapes

ATTRIBUTES = ("color", "shape", "size", "position", "count")
_OBJECT = re.compile(r"a (small|large) (\w+) (circle|square|triangle) at the (top left|top right|bottom left|"
                     r"bottom right)")
_PALETTE = np.array(list(shapes.COLORS.values()), np.float32)


def parse(caption: str):
  """caption -> list of (color, shape, size, position) indices; ValueError if it is not a shapes caption."""
  objects = []
  for size, color, shape, position in _OBJECT.findall(caption):
    if color not in shapes.COLORS:
      raise ValueError(f"Unknown colour {color!r} in caption {caption!r}.")
    objects.append((list(shapes.COLORS).index(color), shapes.SHAPES.index(shape), shapes.SIZES.index(size),
                    shapes.POSITIONS.index(position)))
  if not objects:
    raise ValueError(f"Not a captioned_shapes caption: {caption!r}.")
  return objects


def swapped_colours(caption: str) -> str:
  """The caption with its first two objects' colours exchanged, all else equal; unchanged when it names one
  object, or two of one colour. Every word stays: only a model that binds each colour to its own object
  finds it a worse description of the image."""
  objects = parse(caption)
  if len(objects) < 2:
    return caption
  (first_color, *first), (second_color, *second) = objects[:2]
  return shapes.caption([(second_color, *first), (first_color, *second)] + objects[2:])


def recoloured(caption: str) -> str:
  """The caption with every object in the next colour of the palette (red -> green, ..., cyan -> red), shapes,
  sizes and positions as they were: an edit the judge's colour reads and its other attributes should not."""
  return shapes.caption([((color + 1) % len(shapes.COLORS), *rest) for color, *rest in parse(caption)])


def lit_pixels(pixels: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> bool mask of pixels bright enough to belong to a shape (the background is black)."""
  return pixels.max(-1) > 80


def describe(pixels: np.ndarray, lit: np.ndarray, resolution: int):
  """(color, shape, size) indices of the one object lit in pixels [h, w, 3] of a resolution-sized image:
  nearest palette colour of the median lit pixel, shape from how much of its bounding box it fills
  (square ~1, circle ~pi/4, triangle ~1/2), size from its area (large ~4x small: threshold between)."""
  area = lit.sum()
  color = int(np.argmin(((_PALETTE - np.median(pixels[lit].astype(np.float32), axis=0)) ** 2).sum(-1)))
  ys, xs = np.nonzero(lit)
  fill = area / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
  shape = shapes.SHAPES.index("square" if fill > 0.9 else "circle" if fill > 0.64 else "triangle")
  size = shapes.SIZES.index("large" if area > 0.06 * resolution * resolution else "small")
  return color, shape, size


def detect(image: np.ndarray) -> dict:
  """uint8 [res, res, 3] -> {position: (color, shape, size)} for the non-empty quadrants."""
  res = image.shape[0]
  half = res // 2
  found = {}
  for position in range(len(shapes.POSITIONS)):
    top, left = half * (position // 2), half * (position % 2)
    cell = image[top:top + half, left:left + half]
    lit = lit_pixels(cell)
    if lit.sum() < 0.03 * half * half:
      continue
    found[position] = describe(cell, lit, res)
  return found


def score(image: np.ndarray, caption: str) -> dict:
  """Per-attribute correctness in [0, 1] for one image (averaged over the caption's objects)."""
  expected = parse(caption)
  found = detect(image)
  result = {k: 0.0 for k in ATTRIBUTES}
  for color, shape, size, position in expected:
    got = found.get(position)
    result["position"] += got is not None
    if got is not None:
      result["color"] += got[0] == color
      result["shape"] += got[1] == shape
      result["size"] += got[2] == size
  result = {k: v / len(expected) for k, v in result.items()}
  result["count"] = float(len(found) == len(expected))
  return result


def accuracy(images, captions) -> dict:
  """Mean per-attribute accuracy over a set, 'all' (every attribute of an image right), and 'all' over the
  captions naming n objects as 'all_1_object', 'all_2_objects', ... (binding colours to objects is hard)."""
  captions = [c.decode() if isinstance(c, bytes) else c for c in captions]
  scores = [score(np.asarray(i), c) for i, c in zip(images, captions)]
  right = np.array([all(s[k] == 1.0 for k in ATTRIBUTES) for s in scores])
  result = {k: float(np.mean([s[k] for s in scores])) for k in ATTRIBUTES}
  result["all"] = float(np.mean(right))
  counts = np.array([len(parse(c)) for c in captions])
  for n in sorted(set(counts.tolist())):
    result[f"all_{n}_object" + "s" * (n > 1)] = float(np.mean(right[counts == n]))
  return result
