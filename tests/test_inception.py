"""FID Inception-v3: loaded from a standard-format weights file, it computes what a PyTorch Inception does.

The oracle is a PyTorch Inception-v3 written in the test with torchvision's module layout and
pytorch-fid's FID patches (torchvision itself cannot be installed beside the CPU torch here); its
state_dict has the names and layouts of the standard weights file.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from diffusion_jax.metrics import inception  # noqa: E402


class BasicConv2d(torch.nn.Module):
  def __init__(self, cin, cout, **kwargs):
    super().__init__()
    self.conv = torch.nn.Conv2d(cin, cout, bias=False, **kwargs)
    self.bn = torch.nn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
  return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(torch.nn.Module):
  def __init__(self, cin, pool_features):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
    self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
    self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

  def forward(self, x):
    return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                      self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                      self.branch_pool(tf_avg_pool(x))], 1)


class BlockB(torch.nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

  def forward(self, x):
    return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                      F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(torch.nn.Module):
  def __init__(self, cin, c7):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    dbl = self.branch7x7dbl_1(x)
    for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
      dbl = layer(dbl)
    return torch.cat([self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))), dbl,
                      self.branch_pool(tf_avg_pool(x))], 1)


class BlockD(torch.nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

  def forward(self, x):
    seven = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), seven, F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(torch.nn.Module):
  def __init__(self, cin, max_pool):
    super().__init__()
    self.max_pool = max_pool
    self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
    self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
    self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    a = self.branch3x3_1(x)
    b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else tf_avg_pool(x)
    return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a), self.branch3x3dbl_3a(b),
                      self.branch3x3dbl_3b(b), self.branch_pool(pooled)], 1)


class TorchFIDInception(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
    self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = BlockA(192, 32), BlockA(256, 64), BlockA(288, 64)
    self.Mixed_6a = BlockB(288)
    self.Mixed_6b, self.Mixed_6c = BlockC(768, 128), BlockC(768, 160)
    self.Mixed_6d, self.Mixed_6e = BlockC(768, 160), BlockC(768, 192)
    self.Mixed_7a = BlockD(768)
    self.Mixed_7b, self.Mixed_7c = BlockE(1280, max_pool=False), BlockE(2048, max_pool=True)
    self.fc = torch.nn.Linear(2048, 1008)  # in the standard file, unused by FID

  def forward(self, x):
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2))), 3, stride=2)
    for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
      x = getattr(self, f"Mixed_{name}")(x)
    return x.mean((2, 3))


@pytest.fixture(scope="session")
def torch_inception():
  torch.manual_seed(0)
  model = TorchFIDInception().eval()
  with torch.no_grad():  # He-scaled kernels and non-trivial batch-norm statistics keep activations O(1)
    for module in model.modules():
      if isinstance(module, torch.nn.Conv2d):
        fan_in = module.weight[0].numel()
        module.weight.normal_(0, (2.0 / fan_in) ** 0.5)
      elif isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0, 0.2)
        module.running_mean.normal_(0, 0.2)
        module.running_var.uniform_(0.5, 2.0)
  return model


def test_features_from_a_pth_file_match_pytorch_and_give_a_sane_fid(torch_inception, tmp_path):
  from diffusion_jax import evaluate
  from diffusion_jax.data import captioned_shapes
  from diffusion_jax.metrics import fid

  path = tmp_path / "pt_inception.pth"
  torch.save(torch_inception.state_dict(), path)
  fns = evaluate.metric_features(path)  # what --inception_weights gives the evaluation job
  assert sorted(fns) == ["fid_inception", "fid_random_conv", "fvd_random_conv"]
  rng = np.random.default_rng(0)
  images = np.stack([captioned_shapes.render(captioned_shapes.random_objects(rng, 2), 32) for _ in range(8)])
  features = fns["fid_inception"](images)  # 32 px, resized to 299 inside
  with torch.no_grad():
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    theirs = torch_inception(F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1)
  assert features.shape == (8, inception.FEATURES)
  assert np.abs(theirs.numpy()).mean() > 0.1  # not a vanished signal
  np.testing.assert_allclose(features, theirs.numpy(), rtol=2e-3, atol=2e-3 * np.abs(theirs.numpy()).max())
  # FID: zero against itself, growing with added noise.
  assert fid.fid(features, features) == pytest.approx(0.0, abs=1e-6 * float(np.abs(features).max()) ** 2)
  noisy = lambda level: np.clip(images + rng.normal(0, level, images.shape), 0, 255).astype(np.uint8)
  distances = [fid.fid(fns["fid_inception"](noisy(level)), features) for level in (10, 60)]
  assert 0 < distances[0] < distances[1]
  with pytest.raises(ValueError, match="No Inception weights file"):
    evaluate.metric_features(tmp_path / "absent.pth")


def test_resize_is_pytorch_bilinear_without_antialiasing():
  rng = np.random.default_rng(1)
  for size in (32, 400):  # up and down to 299
    x = rng.normal(size=(1, size, size, 3)).astype(np.float32)
    ours = jax.image.resize(jnp.asarray(x), (1, 299, 299, 3), "bilinear", antialias=False)
    theirs = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear",
                           align_corners=False).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-5)


def test_weights_files_are_read_without_torch_and_mismatches_named(torch_inception, tmp_path):
  from safetensors.numpy import save_file

  tensors = {k: v.numpy() for k, v in torch_inception.state_dict().items() if v.is_floating_point()}
  save_file(tensors, tmp_path / "inception.safetensors")
  from_safetensors = inception.read_weights(tmp_path / "inception.safetensors")
  assert sorted(from_safetensors) == sorted(tensors)
  bad = dict(from_safetensors)
  del bad["Mixed_6b.branch7x7_2.conv.weight"]
  bad["Mixed_7c.branch_pool.bn.running_var"] = np.ones(7, np.float32)
  bad["Mixed_8a.conv.weight"] = np.ones(3, np.float32)
  with pytest.raises(ValueError) as error:
    inception.from_weights(bad)
  for part in ("missing Mixed_6b.branch7x7_2.conv.weight", "Mixed_7c.branch_pool.bn.running_var has shape (7,), "
               "expected (192,)", "unknown tensor Mixed_8a.conv.weight"):
    assert part in str(error.value)
  with pytest.raises(ValueError, match="No Inception weights file"):
    inception.read_weights(tmp_path / "absent.pth")


def test_a_damaged_weights_file_is_named_not_a_traceback(tmp_path):
  """A .pth, .npz or .safetensors download cut short (or a pickled whole model) is a ValueError naming the file."""
  import torch

  torch.save({"conv.weight": torch.ones(64, 3, 3, 3)}, tmp_path / "whole.pth")
  np.savez(tmp_path / "whole.npz", **{"conv.weight": np.ones((64, 3, 3, 3), np.float32)})
  for suffix in (".pth", ".npz"):
    (tmp_path / f"cut{suffix}").write_bytes((tmp_path / f"whole{suffix}").read_bytes()[:200])
    with pytest.raises(ValueError, match=f"'.*cut{suffix}' cannot be read as Inception weights"):
      inception.read_weights(tmp_path / f"cut{suffix}")
    # A repository cloned without Git LFS: text pointing at the weights
    (tmp_path / f"lfs{suffix}").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n")
    with pytest.raises(ValueError, match=f"'.*lfs{suffix}' is a Git LFS pointer, not the file itself"):
      inception.read_weights(tmp_path / f"lfs{suffix}")
  torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")  # a whole pickled module: refused by weights_only
  with pytest.raises(ValueError, match=r"module.pth' cannot be read as Inception weights \(a PyTorch state dict\) "
                                       r"\(damaged, cut short or another format\): Weights only load"):
    inception.read_weights(tmp_path / "module.pth")
  torch.save([torch.ones(2)], tmp_path / "list.pth")
  with pytest.raises(ValueError, match="list.pth' hold a list, not a state dict"):
    inception.read_weights(tmp_path / "list.pth")
