"""`captioned_shapes`: built-in TFDS dataset of coloured shapes with compositional captions.

Each image shows one or two shapes, each in its own quadrant, on a black background; the caption names
size, colour, shape and position of each ("a small red circle at the top left and a large blue square
at the bottom right"). The ground-truth attributes are stored as features so evaluation can judge
generated images. Everything is generated locally and deterministically from a seed. Colour-shape
combinations can be held out of the training split ("red square": never a red square in training, though
red things and squares are), to test whether a model composes attributes it learnt apart.

Build (once, into any data_dir): `captioned_shapes.build(data_dir, resolution=32)`; the training
pipeline does this on first use.
"""

import dataclasses

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from diffusion_jax.data import local_builder

COLORS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (235, 220, 50),
    "magenta": (220, 60, 220),
    "cyan": (50, 220, 230),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
MAX_OBJECTS = 2
VOCABULARY = tuple(sorted(
    {"a", "and", "at", "the"} | set(COLORS) | set(SHAPES) | set(SIZES) | {w for p in POSITIONS for w in p.split()}))


def caption(objects) -> str:
  """objects: list of (color, shape, size, position) indices -> caption text."""
  parts = [f"a {SIZES[s]} {list(COLORS)[c]} {SHAPES[k]} at the {POSITIONS[p]}" for c, k, s, p in objects]
  return " and ".join(parts)


def draw_shape(image: np.ndarray, color: int, shape: int, radius: float, cy: float, cx: float) -> None:
  """Paint one shape of the given radius (pixels) centred at (cy, cx) into image [res, res, 3] in place."""
  resolution = image.shape[0]
  yy, xx = np.mgrid[0:resolution, 0:resolution] + 0.5
  dy, dx = yy - cy, xx - cx
  if SHAPES[shape] == "circle":
    inside = dy**2 + dx**2 <= radius**2
  elif SHAPES[shape] == "square":
    inside = (np.abs(dy) <= radius * 0.85) & (np.abs(dx) <= radius * 0.85)
  else:  # upward triangle: below the two slanted edges, above the base
    inside = (dy <= radius * 0.8) & (dy >= -radius) & (np.abs(dx) <= (dy + radius) * 0.6)
  image[inside] = COLORS[list(COLORS)[color]]


def radius_of(size: int, resolution: int) -> float:
  """Shape radius in pixels: a quarter-image cell holds a large shape."""
  return resolution / 2 * (0.22 if SIZES[size] == "small" else 0.42)


def render(objects, resolution: int) -> np.ndarray:
  """objects -> uint8 image [resolution, resolution, 3]."""
  image = np.zeros((resolution, resolution, 3), np.uint8)
  half = resolution / 2
  for color, shape, size, position in objects:
    draw_shape(image, color, shape, radius_of(size, resolution), half * (0.5 + position // 2),
               half * (0.5 + position % 2))
  return image


def combinations(names) -> frozenset:
  """("red square", ...) -> frozenset of (colour index, shape index); ValueError naming the valid words."""
  pairs = []
  for name in names:
    color, _, shape = str(name).partition(" ")
    if color not in COLORS or shape not in SHAPES:
      raise ValueError(f"{name!r} is not a colour-shape combination of captioned_shapes: write 'COLOUR SHAPE' "
                       f"with a colour of {list(COLORS)} and a shape of {list(SHAPES)}.")
    pairs.append((list(COLORS).index(color), SHAPES.index(shape)))
  return frozenset(pairs)


def shows_any(example, pairs: frozenset) -> bool:
  """Whether a dataset example (its `color` and `shape` features) shows one of the (colour, shape) pairs."""
  return any((int(c), int(k)) in pairs for c, k in zip(example["color"], example["shape"]))


def random_objects(rng: np.random.Generator, max_objects: int, exclude: frozenset = frozenset()):
  """1..max_objects random (color, shape, size, position) in distinct quadrants; (colour, shape) pairs in
  `exclude` are drawn again."""
  count = int(rng.integers(1, max_objects + 1))
  positions = rng.permutation(len(POSITIONS))[:count]
  objects = []
  for position in positions:
    color, shape = int(rng.integers(len(COLORS))), int(rng.integers(len(SHAPES)))
    while (color, shape) in exclude:
      color, shape = int(rng.integers(len(COLORS))), int(rng.integers(len(SHAPES)))
    objects.append((color, shape, int(rng.integers(len(SIZES))), int(position)))
  return objects


@dataclasses.dataclass
class CaptionedShapesConfig(tfds.core.BuilderConfig):
  resolution: int = 32
  max_objects: int = 2
  num_train: int = 20000
  num_validation: int = 1000
  num_test: int = 1000
  seed: int = 0
  heldout_combinations: tuple = ()  # (colour, shape) index pairs absent from the train split


def config_name(resolution, max_objects, num_train, seed, heldout_combinations=()) -> str:
  heldout = "".join(f"_x{c}{k}" for c, k in sorted(heldout_combinations))
  return f"r{resolution}_o{max_objects}_n{num_train}_s{seed}{heldout}"


class CaptionedShapes(local_builder.LocalBuilder):
  """Coloured shapes with compositional captions and ground-truth attributes."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [CaptionedShapesConfig(name=config_name(32, 2, 20000, 0))]

  def _info(self):
    r = self.builder_config.resolution
    attribute = lambda: tfds.features.Tensor(shape=(MAX_OBJECTS,), dtype=np.int32)
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(r, r, 3)),
            "caption": tfds.features.Text(),
            "num_objects": tfds.features.Scalar(dtype=np.int32),
            "color": attribute(),
            "shape": attribute(),
            "size": attribute(),
            "position": attribute(),
        }),
        description=__doc__,
    )

  def _split_generators(self, dl_manager):
    c = self.builder_config
    return {"train": self._generate_examples(c.num_train, c.seed, frozenset(c.heldout_combinations)),
            "validation": self._generate_examples(c.num_validation, c.seed + 1_000_003),
            "test": self._generate_examples(c.num_test, c.seed + 2_000_003)}

  def _generate_examples(self, count, seed, exclude=frozenset()):
    c = self.builder_config
    rng = np.random.default_rng(seed)
    for index in range(count):
      objects = random_objects(rng, c.max_objects, exclude)
      padded = objects + [(-1, -1, -1, -1)] * (MAX_OBJECTS - len(objects))
      columns = np.array(padded, np.int32).T
      yield index, {
          # PIL images are encoded by TFDS without TensorFlow.
          "image": PIL.Image.fromarray(render(objects, c.resolution)),
          "caption": caption(objects),
          "num_objects": len(objects),
          "color": columns[0], "shape": columns[1], "size": columns[2], "position": columns[3],
      }


def builder(data_dir: str, resolution: int = 32, max_objects: int = 2, num_train: int = 20000,
            num_eval: int = 1000, seed: int = 0, heldout_combinations=()) -> CaptionedShapes:
  """The builder for one configuration, prepared (array_record files) on first use. heldout_combinations:
  colour-shape names ("red square") that the train split never shows; validation and test keep them."""
  if resolution not in (16, 32, 64):
    raise ValueError(f"captioned_shapes resolution must be 16, 32 or 64, got {resolution}.")
  if not 1 <= max_objects <= MAX_OBJECTS:
    raise ValueError(f"captioned_shapes max_objects must be 1..{MAX_OBJECTS}, got {max_objects}.")
  pairs = tuple(sorted(combinations(heldout_combinations)))
  config = CaptionedShapesConfig(name=config_name(resolution, max_objects, num_train, seed, pairs) + f"_e{num_eval}",
                                 resolution=resolution, max_objects=max_objects, num_train=num_train,
                                 num_validation=num_eval, num_test=num_eval, seed=seed, heldout_combinations=pairs)
  result = CaptionedShapes(config=config, data_dir=data_dir, file_format="array_record")
  result.download_and_prepare()
  return result
