"""The PatchGAN discriminator of Stable Diffusion's autoencoder loss (pix2pix's NLayerDiscriminator, as in
taming-transformers) and its hinge losses.

`layers` stride-2 4x4 convolutions (the first without normalization) double the width from `channels` (capped at 8x)
and halve the image; a stride-1 4x4 convolution doubles it once more; a last stride-1 4x4 convolution gives one
logit per patch [n, h', w', 1]. Hidden convolutions have no bias and are followed by batch normalization with the
batch's own statistics (what the PyTorch module computes in training mode, the only mode the loss uses; no running
averages are kept) and LeakyReLU(0.2). Weights start as N(0, 0.02), normalization scales as N(1, 0.02).

With `temporal`, the same network over clips [n, frames, h, w, c] (the 3-D convolutional discriminator that Video LDM
and Stable Video Diffusion trained their temporal decoders against): each convolution also spans 3 frames (padded
by one, stride 1 in time), so each logit judges up to 3 + 2 * (layers + 1) frames.
"""

import jax
import jax.numpy as jnp
from flax import nnx

KERNEL, SLOPE, EPSILON = 4, 0.2, 1e-5
TIME_KERNEL = 3  # a temporal discriminator's convolutions span this many frames


def output_size(resolution: int, layers: int) -> int:
  """The side of the logit map for images of side `resolution` (< 1: too small for `layers`)."""
  for _ in range(layers):
    resolution = (resolution + 2 - KERNEL) // 2 + 1
  for _ in range(2):
    resolution = resolution + 2 - KERNEL + 1
  return resolution


def widths(channels: int, layers: int) -> list[int]:
  """Output widths of the convolutions: `layers` stride-2 ones, the stride-1 one, the logit one."""
  return [channels * min(2 ** n, 8) for n in range(layers + 1)] + [1]


class BatchNorm(nnx.Module):
  """Batch normalization with the batch's statistics (biased variance, over every axis but the channels) and a
  learned scale and bias."""

  def __init__(self, features: int, rngs: nnx.Rngs):
    self.scale = nnx.Param(1.0 + 0.02 * jax.random.normal(rngs.params(), (features,)))
    self.bias = nnx.Param(jnp.zeros((features,)))

  def __call__(self, x):
    axes = tuple(range(x.ndim - 1))
    mean, var = jnp.mean(x, axis=axes), jnp.var(x, axis=axes)
    return (x - mean) * jax.lax.rsqrt(var + EPSILON) * self.scale + self.bias


class PatchDiscriminator(nnx.Module):

  def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3, temporal: bool = False, *,
               rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)
    outs = widths(channels, layers)
    ins = [in_channels] + outs[:-1]
    time = (TIME_KERNEL,) if temporal else ()
    conv = lambda i, o, stride, bias: nnx.Conv(i, o, time + (KERNEL, KERNEL), strides=(1,) * len(time) + (stride,) * 2,
                                               padding=1, use_bias=bias, kernel_init=init, rngs=rngs)
    strides = [2] * layers + [1, 1]
    self.convs = nnx.List([conv(i, o, s, k in (0, len(outs) - 1))
                           for k, (i, o, s) in enumerate(zip(ins, outs, strides))])
    self.norms = nnx.List([BatchNorm(o, rngs) for o in outs[1:-1]])

  def __call__(self, x):
    """Images [n, h, w, in_channels] in [-1, 1] -> patch logits [n, h', w', 1]; a temporal one's clips [n, frames,
    h, w, in_channels] -> [n, frames, h', w', 1]."""
    x = jax.nn.leaky_relu(self.convs[0](x), SLOPE)
    for conv, norm in zip(self.convs[1:-1], self.norms):
      x = jax.nn.leaky_relu(norm(conv(x)), SLOPE)
    return self.convs[-1](x)


def hinge_discriminator_loss(logits_real, logits_fake):
  """0.5 * (E[relu(1 - D(real))] + E[relu(1 + D(fake))])."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def generator_loss(logits_fake):
  """-E[D(fake)]: what the autoencoder minimizes to fool the discriminator."""
  return -jnp.mean(logits_fake)
