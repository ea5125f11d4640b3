"""I3D as used by FVD (Flax NNX): Inception-v1 inflated to 3-D (Carreira & Zisserman 2017), loaded from
a local weights file.

The usual file is the PyTorch port of the Kinetics-400 RGB model that FVD code bases load,
`i3d_pretrained_400.pt` (a state dict in the `pytorch_i3d.InceptionI3d` layout; reading it needs torch).
The same tensors under the same names in a `.safetensors` or `.npz` file are read without torch. Nothing
is downloaded. Convolutions and max pools pad as TensorFlow's "SAME" does (more after than before when
the total is odd), as that port does.

Features are the 400 Kinetics logits averaged over the remaining time steps, of clips whose frames are
resized bilinearly to 224x224 (no antialiasing) and scaled to [-1, 1]. The network needs at least 9
frames; shorter clips are stretched in time to 16 by repeating each frame (`MIN_FRAMES`).

  features = i3d.feature_fn("i3d_pretrained_400.pt")  # uint8 [n, frames, h, w, 3] -> [n, 400]
"""

import functools

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax.metrics import torch_weights
from diffusion_jax.models import init_rngs

FEATURES = 400
RESOLUTION = 224
CLIP_FRAMES = 16  # clips with fewer than MIN_FRAMES frames are stretched to this many
MIN_FRAMES = 9    # the last average pool spans 2 of the time steps left after 8x downsampling


class Unit3D(nnx.Module):
  """3-D convolution ("SAME" padding) then batch norm with running statistics (eps 1e-3) and ReLU; the
  logits unit has a bias and neither. x: [n, frames, h, w, c]."""

  def __init__(self, in_channels, out_channels, kernel=(1, 1, 1), stride=(1, 1, 1), *, logits=False, rngs):
    self.conv3d = nnx.Conv(in_channels, out_channels, kernel, strides=stride, padding="SAME", use_bias=logits,
                           rngs=rngs)
    self.bn = None if logits else nnx.BatchNorm(out_channels, epsilon=1e-3, use_running_average=True, rngs=rngs)

  def __call__(self, x):
    x = self.conv3d(x)
    return x if self.bn is None else jax.nn.relu(self.bn(x))


def _max_pool(x, window, stride):
  """Max pool with "SAME" padding. Every pool follows a ReLU, so padding with -inf (here) or with zeros
  (the PyTorch port) gives the same result."""
  return linen.max_pool(x, window, stride, padding="SAME")


class InceptionModule(nnx.Module):
  """Four branches concatenated: 1x1; 1x1 -> 3x3x3; 1x1 -> 3x3x3; 3x3x3 max pool -> 1x1.
  widths: (b0, b1a, b1b, b2a, b2b, b3b) output channels."""

  def __init__(self, in_channels, widths, *, rngs):
    b0, b1a, b1b, b2a, b2b, b3b = widths
    self.b0 = Unit3D(in_channels, b0, rngs=rngs)
    self.b1a = Unit3D(in_channels, b1a, rngs=rngs)
    self.b1b = Unit3D(b1a, b1b, (3, 3, 3), rngs=rngs)
    self.b2a = Unit3D(in_channels, b2a, rngs=rngs)
    self.b2b = Unit3D(b2a, b2b, (3, 3, 3), rngs=rngs)
    self.b3b = Unit3D(in_channels, b3b, rngs=rngs)

  def __call__(self, x):
    return jnp.concatenate([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)),
                            self.b3b(_max_pool(x, (3, 3, 3), (1, 1, 1)))], axis=-1)


# (name, input channels, branch widths) of the Inception modules, in order.
_MIXED = (("Mixed_3b", 192, (64, 96, 128, 16, 32, 32)), ("Mixed_3c", 256, (128, 128, 192, 32, 96, 64)),
          ("Mixed_4b", 480, (192, 96, 208, 16, 48, 64)), ("Mixed_4c", 512, (160, 112, 224, 24, 64, 64)),
          ("Mixed_4d", 512, (128, 128, 256, 24, 64, 64)), ("Mixed_4e", 512, (112, 144, 288, 32, 64, 64)),
          ("Mixed_4f", 528, (256, 160, 320, 32, 128, 128)), ("Mixed_5b", 832, (256, 160, 320, 32, 128, 128)),
          ("Mixed_5c", 832, (384, 192, 384, 48, 128, 128)))


class InceptionI3d(nnx.Module):
  """x: [n, frames >= MIN_FRAMES, 224, 224, 3] in [-1, 1] -> Kinetics logits averaged over time [n, 400]."""

  def __init__(self, *, rngs):
    self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2), rngs=rngs)
    self.Conv3d_2b_1x1 = Unit3D(64, 64, rngs=rngs)
    self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3), rngs=rngs)
    for name, in_channels, widths in _MIXED:
      setattr(self, name, InceptionModule(in_channels, widths, rngs=rngs))
    self.logits = Unit3D(1024, FEATURES, logits=True, rngs=rngs)

  def __call__(self, x):
    x = _max_pool(self.Conv3d_1a_7x7(x), (1, 3, 3), (1, 2, 2))
    x = _max_pool(self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x)), (1, 3, 3), (1, 2, 2))
    x = self.Mixed_3c(self.Mixed_3b(x))
    x = _max_pool(x, (3, 3, 3), (2, 2, 2))
    for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
      x = getattr(self, name)(x)
    x = self.Mixed_5c(self.Mixed_5b(_max_pool(x, (2, 2, 2), (2, 2, 2))))
    x = linen.avg_pool(x, (2, 7, 7), (1, 1, 1), padding="VALID")
    return self.logits(x).mean(axis=(1, 2, 3))  # spatial size is 1 at 224 px


def read_weights(path) -> dict:
  """{tensor name: float32 array} of a .pt / .pth (needs torch), .safetensors or .npz weights file."""
  return torch_weights.read(path, "I3D", "i3d_pretrained_400.pt")


def from_weights(tensors: dict) -> InceptionI3d:
  """The model with every parameter taken from `tensors` (`pytorch_i3d` names); all mismatches in one error."""
  return torch_weights.load(nnx.eval_shape(lambda: InceptionI3d(rngs=init_rngs.seeded(0))), tensors, "I3D")


def prepare(videos):
  """uint8 [n, frames, h, w, 3] -> float32 [n, max(frames, 16 if frames < 9), 224, 224, 3] in [-1, 1]."""
  n, frames, h, w, c = videos.shape
  if frames < MIN_FRAMES:  # each frame repeated over the time steps it spans
    videos = videos[:, (np.arange(CLIP_FRAMES) * frames) // CLIP_FRAMES]
    frames = CLIP_FRAMES
  x = videos.astype(jnp.float32).reshape((n * frames, h, w, c)) / 255.0 * 2.0 - 1.0
  x = jax.image.resize(x, (n * frames, RESOLUTION, RESOLUTION, c), "bilinear", antialias=False)
  return x.reshape((n, frames, RESOLUTION, RESOLUTION, c))


@functools.partial(jax.jit, static_argnames="graphdef")
def _apply(graphdef, state, videos):
  return nnx.merge(graphdef, state)(prepare(videos))


def features(model: InceptionI3d, videos, batch: int = 8) -> np.ndarray:
  """uint8 videos [n, frames, h, w, 3] -> I3D features [n, 400]."""
  from diffusion_jax.metrics import fid

  graphdef, state = nnx.split(model)
  state = jax.device_put(state)  # once, not every batch (loaded weights are on the host)
  return fid.batched(lambda v: _apply(graphdef, state, v), np.asarray(videos), batch)


@functools.cache
def feature_fn(path: str):
  """An FVD feature function (uint8 [n, frames, h, w, 3] -> [n, 400]) of the weights file at `path`."""
  model = from_weights(read_weights(path))
  return lambda videos: features(model, videos)
