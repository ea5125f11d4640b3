"""LPIPS computes what the `lpips` package computes (conftest's lpips_weights: its v0.1 linear layers, a
random-weight VGG16 trunk in torchvision's layout), its gradient is the package's, and a weights directory that is
not one is refused."""

import shutil

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from diffusion_jax.metrics import lpips

# The network in one compiled program (an eager call compiles each of its operations apart).
distance = nnx.jit(lpips.distance)


def images(seed, shape):
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


@pytest.mark.parametrize("resolution", [16, 40])
def test_distance_and_its_gradient_are_the_lpips_packages(lpips_weights, resolution):
  directory, oracle = lpips_weights
  model = lpips.load(str(directory))
  x, y = images(1, (3, resolution, resolution, 3)), images(2, (3, resolution, resolution, 3))
  x[0] = y[0]  # identical images: 0
  ours = distance(model, x, y)
  grad = nnx.jit(lambda model, a, b: jax.grad(lambda a: lpips.distance(model, a, b).sum())(a))(model, x, y)
  as_torch = lambda a: torch.tensor(a.transpose(0, 3, 1, 2))
  torch_x = as_torch(x).requires_grad_()
  theirs = oracle(torch_x, as_torch(y)).reshape(-1)
  theirs.sum().backward()
  np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-4, atol=1e-6)
  assert ours[0] < 1e-6 < ours[1]
  np.testing.assert_allclose(grad, torch_x.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-3, atol=1e-7)


def test_mean_distance_of_uint8_images_and_videos(lpips_weights):
  directory, _ = lpips_weights
  model = lpips.load(str(directory))
  rng = np.random.default_rng(0)
  a, b = (rng.integers(0, 256, (5, 2, 16, 16, 3), dtype=np.uint8) for _ in range(2))
  frames = lambda v: v.reshape(-1, 16, 16, 3).astype(np.float32) / 127.5 - 1
  expected = float(np.mean(distance(model, frames(a), frames(b))))
  np.testing.assert_allclose(lpips.mean_distance(model, a, b, batch=4), expected, rtol=1e-5)  # 10 frames: 3 batches
  assert lpips.mean_distance(model, a, a) < 1e-6
  with pytest.raises(ValueError, match="at least 16 pixels a side"):
    lpips.mean_distance(model, a[..., :8, :8, :], b[..., :8, :8, :])


def test_what_is_not_an_lpips_weights_directory_is_refused(lpips_weights, tmp_path):
  directory, _ = lpips_weights
  with pytest.raises(ValueError, match="No LPIPS weights directory"):
    lpips.load(str(tmp_path / "nope"))
  shutil.copy(directory / "vgg.pth", tmp_path / "vgg.pth")
  with pytest.raises(ValueError, match=r"lacks torchvision's VGG16 weights \(vgg16\*.pth"):
    lpips.load(str(tmp_path))
  state = torch.load(directory / "vgg16-397923af.pth")
  state["features.28.weight"] = state["features.28.weight"][:, :256]
  del state["features.26.bias"]
  torch.save(state, tmp_path / "vgg16.pth")
  with pytest.raises(ValueError, match=r"do not match LPIPS.*missing features.26.bias.*features.28.weight has shape"):
    lpips.load(str(tmp_path))
