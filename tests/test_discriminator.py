"""The PatchGAN discriminator computes what pix2pix's NLayerDiscriminator (taming-transformers' layout, written here
in PyTorch) computes in training mode with the same weights, at several depths and sizes, and over clips with 3-D
convolutions; its hinge losses are the textbook ones."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from diffusion_jax.models import discriminator


def torch_patch_discriminator(in_channels, channels, layers, temporal=False) -> torch.nn.Sequential:
  """NLayerDiscriminator(input_nc, ndf, n_layers) with BatchNorm: its `main` Sequential; with `temporal`, the same
  with 3-D convolutions of kernel (3, 4, 4), stride 1 in time, padding 1."""
  conv, norm = (torch.nn.Conv3d, torch.nn.BatchNorm3d) if temporal else (torch.nn.Conv2d, torch.nn.BatchNorm2d)
  kernel, stride = ((3, 4, 4), lambda s: (1, s, s)) if temporal else (4, lambda s: s)
  modules = [conv(in_channels, channels, kernel, stride(2), 1), torch.nn.LeakyReLU(0.2)]
  width = channels
  for n in range(1, layers + 1):
    out = channels * min(2 ** n, 8)
    modules += [conv(width, out, kernel, stride(2 if n < layers else 1), 1, bias=False), norm(out),
                torch.nn.LeakyReLU(0.2)]
    width = out
  modules.append(conv(width, 1, kernel, stride(1), 1))
  return torch.nn.Sequential(*modules)


def copy_weights(ours: discriminator.PatchDiscriminator, theirs: torch.nn.Sequential) -> None:
  convs = [m for m in theirs if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
  norms = [m for m in theirs if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d))]
  with torch.no_grad():
    for conv, module in zip(ours.convs, convs, strict=True):  # [..., in, out] -> [out, in, ...]
      module.weight.copy_(torch.tensor(np.moveaxis(np.asarray(conv.kernel.get_value()), (-1, -2), (0, 1))))
      if module.bias is not None:
        module.bias.copy_(torch.tensor(np.asarray(conv.bias.get_value())) + 0.1)  # nonzero biases
        conv.bias.set_value(jnp.asarray(module.bias.numpy()))
    for norm, module in zip(ours.norms, norms, strict=True):
      module.weight.copy_(torch.tensor(np.asarray(norm.scale.get_value())))
      module.bias.copy_(torch.tensor(np.asarray(norm.bias.get_value())) - 0.05)
      norm.bias.set_value(jnp.asarray(module.bias.numpy()))


@pytest.mark.parametrize("layers,resolution", [(3, 32), (2, 16), (3, 40)])
def test_logits_are_nlayer_discriminators_in_training_mode(layers, resolution):
  ours = discriminator.PatchDiscriminator(3, 8, layers, rngs=nnx.Rngs(0))
  theirs = torch_patch_discriminator(3, 8, layers).train()
  copy_weights(ours, theirs)
  x = np.random.default_rng(0).uniform(-1, 1, (4, resolution, resolution, 3)).astype(np.float32)
  with torch.no_grad():
    expected = theirs(torch.tensor(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  side = discriminator.output_size(resolution, layers)
  assert expected.shape == (4, side, side, 1)
  np.testing.assert_allclose(ours(jnp.asarray(x)), expected, atol=1e-4, rtol=1e-4)
  assert discriminator.widths(8, layers)[:-1] == [m.out_channels for m in theirs if isinstance(m, torch.nn.Conv2d)][:-1]


def test_a_temporal_discriminator_is_the_3d_nlayer_discriminator_over_clips():
  """temporal: 3-D convolutions over clips [n, frames, h, w, c], as the PyTorch module built of Conv3d and
  BatchNorm3d computes."""
  ours = discriminator.PatchDiscriminator(3, 8, 2, temporal=True, rngs=nnx.Rngs(0))
  theirs = torch_patch_discriminator(3, 8, 2, temporal=True).train()
  copy_weights(ours, theirs)
  x = np.random.default_rng(0).uniform(-1, 1, (2, 5, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    expected = theirs(torch.tensor(x.transpose(0, 4, 1, 2, 3))).numpy().transpose(0, 2, 3, 4, 1)
  side = discriminator.output_size(16, 2)
  assert expected.shape == (2, 5, side, side, 1)
  np.testing.assert_allclose(ours(jnp.asarray(x)), expected, atol=1e-4, rtol=1e-4)


def test_hinge_losses():
  real, fake = jnp.array([2.0, 0.5, -1.0]), jnp.array([-2.0, 0.0, 1.0])
  # relu(1 - real) = [0, 0.5, 2], relu(1 + fake) = [0, 1, 2]
  np.testing.assert_allclose(discriminator.hinge_discriminator_loss(real, fake), 0.5 * (2.5 / 3 + 3 / 3), rtol=1e-6)
  np.testing.assert_allclose(discriminator.generator_loss(fake), 1 / 3, rtol=1e-6)
  assert discriminator.output_size(16, 3) < 1 <= discriminator.output_size(16, 2)
