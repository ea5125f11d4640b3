"""LPIPS (Zhang et al. 2018, v0.1, VGG trunk): the learned perceptual distance between images, from local weights.

It is a reconstruction metric (an autoencoder's held-out images, a super-resolution stage's samples against the
real high-resolution images: lower is closer) and the perceptual term of Stable Diffusion's autoencoder loss.
A weights directory holds the two standard files (nothing is downloaded):

  vgg16-397923af.pth   torchvision's ImageNet VGG16 (any `vgg16*.pth`, or the same tensors as .safetensors/.npz)
  vgg.pth              the LPIPS v0.1 linear layers, shipped in the `lpips` package as lpips/weights/v0.1/vgg.pth
                       (or vgg.safetensors / vgg.npz)

The distance, as the `lpips` package computes it: images in [-1, 1] are shifted and scaled to the VGG's input
statistics; at the five ReLUs before each pooling (relu1_2 ... relu5_3) each pixel's features are scaled to unit
length, their squared differences weighted per channel by the linear layers, averaged over pixels, and the five
summed. The trunk pools four times: images need at least 16 pixels a side.

  model = lpips.load("weights/lpips")
  lpips.distance(model, x, y)          # float [-1, 1] [n, h, w, 3] twice -> [n], differentiable
  lpips.mean_distance(model, a, b)     # uint8 [n, ..., h, w, 3] twice -> their mean distance
"""

import functools
import pathlib

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax.metrics import fid, torch_weights
from diffusion_jax.models import init_rngs, named_tensors

# VGG16's convolutions by stage (torchvision's configuration "D"); a 2x2 max pool precedes every stage but the first.
STAGE_WIDTHS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
MIN_RESOLUTION = 2 ** (len(STAGE_WIDTHS) - 1)
# The `lpips` package's ScalingLayer: [-1, 1] images to the trunk's input statistics.
SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
SCALE = np.array([0.458, 0.448, 0.450], np.float32)
BACKBONE_FILES = ("vgg16*.pth", "vgg16*.safetensors", "vgg16*.npz")
LINEAR_FILES = ("vgg.pth", "vgg.safetensors", "vgg.npz")


def torch_feature_indices() -> list[int]:
  """The index in torchvision's `vgg16().features` of each convolution (ReLUs and pools take the others)."""
  indices, index = [], 0
  for stage, widths in enumerate(STAGE_WIDTHS):
    index += stage > 0  # the pool before the stage
    for _ in widths:
      indices.append(index)
      index += 2  # the convolution and its ReLU
  return indices


class LPIPS(nnx.Module):
  """VGG16's 13 convolutions (`convs`) and the five per-channel weightings (`linears`, 1x1 convolutions)."""

  def __init__(self, *, rngs):
    self.convs, self.linears, channels = nnx.List(), nnx.List(), 3
    for widths in STAGE_WIDTHS:
      for width in widths:
        self.convs.append(nnx.Conv(channels, width, (3, 3), padding=1, rngs=rngs))
        channels = width
      self.linears.append(nnx.Conv(channels, 1, (1, 1), use_bias=False, rngs=rngs))

  def features(self, x) -> list[jax.Array]:
    """[n, h, w, 3] in [-1, 1] -> the five stages' last ReLU outputs."""
    x, outputs, convs = (x - SHIFT) / SCALE, [], iter(self.convs)
    for stage, widths in enumerate(STAGE_WIDTHS):
      if stage:
        x = linen.max_pool(x, (2, 2), (2, 2))
      for _ in widths:
        x = jax.nn.relu(next(convs)(x))
      outputs.append(x)
    return outputs


def distance(model: LPIPS, x, y) -> jax.Array:
  """LPIPS between float images x, y [n, h, w, 3] in [-1, 1] -> [n]."""
  unit = lambda f: f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True)) + 1e-10)
  total = 0.0
  for linear, fx, fy in zip(model.linears, model.features(x), model.features(y)):
    total = total + linear(jnp.square(unit(fx) - unit(fy))).mean(axis=(1, 2, 3))
  return total


def torch_name(path: tuple, ndim: int) -> tuple[str, tuple | None]:
  """NNX path -> (name in the weights files, transpose): convs.i is torchvision's features.<index>, linears.k the
  lpips package's lin<k>.model.1."""
  group, index, leaf = path
  module = f"features.{torch_feature_indices()[int(index)]}" if group == "convs" else f"lin{index}.model.1"
  transpose = named_tensors.kernel_transpose(ndim) if leaf == "kernel" else None
  return f"{module}.{named_tensors.TORCH_NAMES[leaf]}", transpose


def weight_files(directory) -> tuple[pathlib.Path, pathlib.Path]:
  """(backbone, linear layers) files in an LPIPS weights directory; a ValueError says what is missing."""
  directory = pathlib.Path(directory).expanduser()
  if not directory.is_dir():
    raise ValueError(f"No LPIPS weights directory at {str(directory)!r}: give a directory holding torchvision's "
                     "vgg16-397923af.pth and the lpips package's weights/v0.1/vgg.pth.")
  first = lambda patterns: next((p for pattern in patterns for p in sorted(directory.glob(pattern))), None)
  backbone, linear = first(BACKBONE_FILES), first(LINEAR_FILES)
  missing = [f"torchvision's VGG16 weights ({' or '.join(BACKBONE_FILES)})"] if backbone is None else []
  if linear is None:
    missing.append(f"the LPIPS v0.1 linear layers, the lpips package's weights/v0.1/vgg.pth "
                   f"({' or '.join(LINEAR_FILES)})")
  if missing:
    raise ValueError(f"The LPIPS weights directory {str(directory)!r} lacks {' and '.join(missing)}.")
  return backbone, linear


@functools.cache
def load(directory: str) -> LPIPS:
  """The LPIPS network of a weights directory (the module docstring lists its files)."""
  backbone, linear = weight_files(directory)
  tensors = torch_weights.read(backbone, "VGG16", "vgg16-397923af.pth")
  tensors |= torch_weights.read(linear, "LPIPS linear layers", "lpips/weights/v0.1/vgg.pth")
  abstract = nnx.eval_shape(lambda: LPIPS(rngs=init_rngs.seeded(0)))
  return named_tensors.load(abstract, tensors, torch_name, f"The weights in {str(directory)!r} do not match LPIPS "
                            "(VGG16 + v0.1 linear layers)", ignored=("classifier.",))


@functools.partial(jax.jit, static_argnames="graphdef")
def _pair_distance(graphdef, state, pairs):
  """uint8 [n, 2, h, w, 3] -> [n]."""
  x = pairs.astype(jnp.float32) / 127.5 - 1.0
  return distance(nnx.merge(graphdef, state), x[:, 0], x[:, 1])


def mean_distance(model: LPIPS, images, reference, batch: int = 64) -> float:
  """The mean LPIPS between uint8 images and their references [n, ..., h, w, 3] (a video's frames count as
  images), `batch` pairs at a time."""
  images, reference = (np.asarray(a).reshape((-1,) + np.shape(a)[-3:]) for a in (images, reference))
  if images.shape != reference.shape:
    raise ValueError(f"LPIPS compares images of one shape; got {images.shape} and {reference.shape}")
  if min(images.shape[1:3]) < MIN_RESOLUTION:
    raise ValueError(f"LPIPS needs images of at least {MIN_RESOLUTION} pixels a side (its VGG pools four times); "
                     f"these are {images.shape[1]}x{images.shape[2]}")
  graphdef, state = nnx.split(model)
  state = jax.device_put(state)  # once, not every batch (loaded weights are on the host)
  pairs = np.stack([images, reference], axis=1)
  return float(np.mean(fid.batched(lambda p: _pair_distance(graphdef, state, p), pairs, batch)))
