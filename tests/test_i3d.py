"""FVD's I3D: loaded from a weights file in the `pytorch_i3d` layout, it computes what a PyTorch I3D does.

The oracle is a PyTorch Inception-I3D written in the test with that port's module names and its
TensorFlow-style "SAME" padding (explicit asymmetric F.pad, zero-padded max pools); its state_dict has
the names and layouts of `i3d_pretrained_400.pt`. Random weights with batch-norm statistics taken from a
calibration clip keep the activations O(1) through all 57 layers.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from diffusion_jax.metrics import fid, i3d  # noqa: E402


def same_padding(sizes, kernel, stride):
  """F.pad arguments (last dimension first) for TensorFlow "SAME" padding of [frames, h, w]."""
  pads = []
  for size, k, s in reversed(list(zip(sizes, kernel, stride))):
    total = max(k - s, 0) if size % s == 0 else max(k - size % s, 0)
    pads += [total // 2, total - total // 2]
  return pads


class Unit(torch.nn.Module):
  def __init__(self, cin, cout, kernel=(1, 1, 1), stride=(1, 1, 1), logits=False):
    super().__init__()
    self.kernel, self.stride = kernel, stride
    self.conv3d = torch.nn.Conv3d(cin, cout, kernel, stride, bias=logits)
    self.bn = None if logits else torch.nn.BatchNorm3d(cout, eps=1e-3, momentum=1.0)

  def forward(self, x):
    x = self.conv3d(F.pad(x, same_padding(x.shape[2:], self.kernel, self.stride)))
    return x if self.bn is None else F.relu(self.bn(x))


def max_pool(x, kernel, stride):
  return F.max_pool3d(F.pad(x, same_padding(x.shape[2:], kernel, stride)), kernel, stride)


class Mixed(torch.nn.Module):
  def __init__(self, cin, widths):
    super().__init__()
    self.b0, self.b1a = Unit(cin, widths[0]), Unit(cin, widths[1])
    self.b1b, self.b2a = Unit(widths[1], widths[2], (3, 3, 3)), Unit(cin, widths[3])
    self.b2b, self.b3b = Unit(widths[3], widths[4], (3, 3, 3)), Unit(cin, widths[5])

  def forward(self, x):
    return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)),
                      self.b3b(max_pool(x, (3, 3, 3), (1, 1, 1)))], dim=1)


class TorchI3D(torch.nn.Module):
  """[n, 3, frames, 224, 224] -> logits averaged over time [n, 400]."""

  MIXED = {"Mixed_3b": (192, (64, 96, 128, 16, 32, 32)), "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
           "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)), "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
           "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)), "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
           "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)), "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
           "Mixed_5c": (832, (384, 192, 384, 48, 128, 128))}

  def __init__(self):
    super().__init__()
    self.Conv3d_1a_7x7 = Unit(3, 64, (7, 7, 7), (2, 2, 2))
    self.Conv3d_2b_1x1 = Unit(64, 64)
    self.Conv3d_2c_3x3 = Unit(64, 192, (3, 3, 3))
    for name, (cin, widths) in self.MIXED.items():
      setattr(self, name, Mixed(cin, widths))
    self.logits = Unit(1024, 400, logits=True)

  def forward(self, x):
    x = max_pool(self.Conv3d_1a_7x7(x), (1, 3, 3), (1, 2, 2))
    x = max_pool(self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x)), (1, 3, 3), (1, 2, 2))
    x = max_pool(self.Mixed_3c(self.Mixed_3b(x)), (3, 3, 3), (2, 2, 2))
    for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
      x = getattr(self, name)(x)
    x = self.Mixed_5c(self.Mixed_5b(max_pool(x, (2, 2, 2), (2, 2, 2))))
    return self.logits(F.avg_pool3d(x, (2, 7, 7), stride=1)).mean((2, 3, 4))


def torch_input(videos):
  """uint8 [n, 4, h, w, 3] -> [n, 3, 16, 224, 224] in [-1, 1]: each frame 4 times, bilinear resize."""
  x = torch.from_numpy(np.repeat(videos, 4, axis=1)).float() / 255
  n, f, h, w, c = x.shape
  x = F.interpolate(x.reshape(n * f, h, w, c).permute(0, 3, 1, 2), size=(224, 224), mode="bilinear",
                    align_corners=False)
  return (x * 2 - 1).reshape(n, f, c, 224, 224).permute(0, 2, 1, 3, 4)


@pytest.fixture(scope="session")
def clips():
  from diffusion_jax.data import moving_shapes

  rng = np.random.default_rng(0)
  return np.stack([moving_shapes.render(*moving_shapes.random_clip(rng, 4, 16), 4, 16) for _ in range(3)])


@pytest.fixture(scope="session")
def torch_i3d(clips):
  torch.manual_seed(0)
  model = TorchI3D()
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm3d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0, 0.2)
    model.train()(torch_input(clips))  # momentum 1: running statistics := this batch's, activations O(1)
  return model.eval()


def test_features_from_a_pt_file_match_pytorch_and_give_a_sane_fvd(torch_i3d, clips, tmp_path):
  from diffusion_jax import evaluate

  path = tmp_path / "i3d_pretrained_400.pt"
  torch.save(torch_i3d.state_dict(), path)
  fns = evaluate.metric_features(i3d_weights=path)  # what --i3d_weights gives the evaluation job
  assert "fvd_i3d" in fns
  features = fns["fvd_i3d"](clips)  # 4 frames of 16 px: stretched to 16 frames and resized to 224 inside
  with torch.no_grad():
    theirs = torch_i3d(torch_input(clips)).numpy()
  assert features.shape == (3, i3d.FEATURES)
  assert np.abs(theirs).std() > 0.1  # not a vanished signal
  np.testing.assert_allclose(features, theirs, rtol=2e-3, atol=2e-3 * np.abs(theirs).max())
  apart = fid.fid(features[:2], features[1:])
  assert apart > 0 and abs(fid.fid(features, features)) < 1e-3 * apart


def test_weights_files_are_read_without_torch_and_mismatches_named(torch_i3d, tmp_path):
  from safetensors.numpy import save_file

  tensors = {k: v.numpy() for k, v in torch_i3d.state_dict().items() if v.is_floating_point()}
  save_file(tensors, tmp_path / "i3d.safetensors")
  read = i3d.read_weights(tmp_path / "i3d.safetensors")
  assert sorted(read) == sorted(tensors)
  bad = dict(read)
  del bad["Mixed_4d.b1b.conv3d.weight"]
  bad["logits.conv3d.bias"] = np.ones(7, np.float32)
  bad["Mixed_6a.b0.conv3d.weight"] = np.ones(3, np.float32)
  with pytest.raises(ValueError) as error:
    i3d.from_weights(bad)
  for part in ("missing Mixed_4d.b1b.conv3d.weight", "logits.conv3d.bias has shape (7,), expected (400,)",
               "unknown tensor Mixed_6a.b0.conv3d.weight"):
    assert part in str(error.value)
  with pytest.raises(ValueError, match="No I3D weights file"):
    i3d.read_weights(tmp_path / "absent.pt")
