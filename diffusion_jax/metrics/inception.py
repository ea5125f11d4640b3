"""Inception-v3 as used by FID (Flax NNX), loaded from a local weights file in the standard FID format.

The standard file is pytorch-fid's port of the 2015 TensorFlow FID graph, `pt_inception-2015-12-05-6726825d.pth`
(a PyTorch state dict; reading it needs torch installed). The same tensors under the same names in a
`.safetensors` or `.npz` file are read without torch. Nothing is downloaded.

FID's Inception differs from torchvision's: 1008 classes, average pools that do not count padding, and
max (not average) pooling in the last block's pool branch. Features are the 2048-d final average pool of
images resized bilinearly to 299x299 (no antialiasing) and scaled to [-1, 1], as pytorch-fid computes them.

  features = inception.feature_fn("pt_inception-2015-12-05-6726825d.pth")  # uint8 [n, h, w, 3] -> [n, 2048]
"""

import functools

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax.metrics import torch_weights
from diffusion_jax.models import init_rngs

FEATURES = 2048
RESOLUTION = 299


def _pair(value):
  return (value, value) if isinstance(value, int) else tuple(value)


class ConvBN(nnx.Module):
  """Convolution without bias, batch norm with running statistics (eps 1e-3), ReLU."""

  def __init__(self, in_channels, out_channels, kernel, stride=1, padding=0, *, rngs):
    padding = tuple((p, p) for p in _pair(padding))
    self.conv = nnx.Conv(in_channels, out_channels, _pair(kernel), strides=stride, padding=padding,
                         use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(out_channels, epsilon=1e-3, use_running_average=True, rngs=rngs)

  def __call__(self, x):
    return jax.nn.relu(self.bn(self.conv(x)))


def _avg_pool_same(x):
  """3x3 stride-1 average over the in-image neighbours only (TensorFlow's padding convention)."""
  return linen.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, stride=2, padding=0):
  return linen.max_pool(x, (3, 3), (stride, stride), ((padding, padding),) * 2)


class InceptionA(nnx.Module):
  def __init__(self, in_channels, pool_features, *, rngs):
    self.branch1x1 = ConvBN(in_channels, 64, 1, rngs=rngs)
    self.branch5x5_1 = ConvBN(in_channels, 48, 1, rngs=rngs)
    self.branch5x5_2 = ConvBN(48, 64, 5, padding=2, rngs=rngs)
    self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1, rngs=rngs)
    self.branch_pool = ConvBN(in_channels, pool_features, 1, rngs=rngs)

  def __call__(self, x):
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch5x5_2(self.branch5x5_1(x)),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        self.branch_pool(_avg_pool_same(x)),
    ], axis=-1)


class InceptionB(nnx.Module):  # grid reduction 35 -> 17
  def __init__(self, in_channels, *, rngs):
    self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    return jnp.concatenate([
        self.branch3x3(x),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        _max_pool(x),
    ], axis=-1)


class InceptionC(nnx.Module):  # factorised 7x7 convolutions
  def __init__(self, in_channels, channels_7x7, *, rngs):
    c7 = channels_7x7
    self.branch1x1 = ConvBN(in_channels, 192, 1, rngs=rngs)
    self.branch7x7_1 = ConvBN(in_channels, c7, 1, rngs=rngs)
    self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_1 = ConvBN(in_channels, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch_pool = ConvBN(in_channels, 192, 1, rngs=rngs)

  def __call__(self, x):
    double = x
    for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
      double = layer(double)
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
        double,
        self.branch_pool(_avg_pool_same(x)),
    ], axis=-1)


class InceptionD(nnx.Module):  # grid reduction 17 -> 8
  def __init__(self, in_channels, *, rngs):
    self.branch3x3_1 = ConvBN(in_channels, 192, 1, rngs=rngs)
    self.branch3x3_2 = ConvBN(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = ConvBN(in_channels, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    seven = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return jnp.concatenate([self.branch3x3_2(self.branch3x3_1(x)), seven, _max_pool(x)], axis=-1)


class InceptionE(nnx.Module):  # expanded filter bank; `pool` is "avg" (Mixed_7b) or "max" (Mixed_7c)
  def __init__(self, in_channels, pool, *, rngs):
    self.pool = pool
    self.branch1x1 = ConvBN(in_channels, 320, 1, rngs=rngs)
    self.branch3x3_1 = ConvBN(in_channels, 384, 1, rngs=rngs)
    self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch3x3dbl_1 = ConvBN(in_channels, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch_pool = ConvBN(in_channels, 192, 1, rngs=rngs)

  def __call__(self, x):
    single = self.branch3x3_1(x)
    double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = _avg_pool_same(x) if self.pool == "avg" else _max_pool(x, stride=1, padding=1)
    return jnp.concatenate([
        self.branch1x1(x),
        self.branch3x3_2a(single), self.branch3x3_2b(single),
        self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double),
        self.branch_pool(pooled),
    ], axis=-1)


class InceptionV3(nnx.Module):
  """FID Inception-v3 up to the final average pool. Layer names are those of the standard weights file."""

  def __init__(self, *, rngs):
    self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = ConvBN(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1, rngs=rngs)
    self.Conv2d_3b_1x1 = ConvBN(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = ConvBN(80, 192, 3, rngs=rngs)
    self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
    self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
    self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
    self.Mixed_6a = InceptionB(288, rngs=rngs)
    self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
    self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
    self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
    self.Mixed_7a = InceptionD(768, rngs=rngs)
    self.Mixed_7b = InceptionE(1280, "avg", rngs=rngs)
    self.Mixed_7c = InceptionE(2048, "max", rngs=rngs)

  def __call__(self, x):
    """x: [n, h, w, 3] in [-1, 1], h and w >= 75 -> [n, 2048]."""
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(_max_pool(x)))
    x = _max_pool(x)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                  self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
      x = block(x)
    return x.mean(axis=(1, 2))


_UNUSED = ("fc.", "AuxLogits.")  # the classifier heads; FID features end before them


def read_weights(path) -> dict:
  """{tensor name: float32 array} of a .pth (needs torch), .safetensors or .npz weights file."""
  return torch_weights.read(path, "Inception", "pt_inception-2015-12-05-6726825d.pth")


def from_weights(tensors: dict) -> InceptionV3:
  """The model with every parameter taken from `tensors` (standard names); all mismatches in one error."""
  return torch_weights.load(nnx.eval_shape(lambda: InceptionV3(rngs=init_rngs.seeded(0))), tensors, "FID Inception-v3",
                            _UNUSED)


@functools.partial(jax.jit, static_argnames=("graphdef", "resize"))
def _apply(graphdef, state, pixels, resize=True):
  x = pixels.astype(jnp.float32) / 255.0 * 2.0 - 1.0
  if resize:
    x = jax.image.resize(x, (x.shape[0], RESOLUTION, RESOLUTION, 3), "bilinear", antialias=False)
  return nnx.merge(graphdef, state)(x)


def features(model: InceptionV3, pixels, resize: bool = True, batch: int = 64) -> np.ndarray:
  """uint8 [n, h, w, 3] -> pool features [n, 2048], resized to 299x299 first unless `resize` is False."""
  from diffusion_jax.metrics import fid

  graphdef, state = nnx.split(model)
  state = jax.device_put(state)  # once, not every batch (loaded weights are on the host)
  return fid.batched(lambda x: _apply(graphdef, state, x, resize), pixels, batch)


@functools.cache
def feature_fn(path: str):
  """A FID feature function (uint8 [n, h, w, 3] -> [n, 2048]) of the weights file at `path`."""
  model = from_weights(read_weights(path))
  return lambda pixels: features(model, pixels)
