"""Training the latent-diffusion autoencoder (FSDP on a (2, 4) mesh): the loss falls, the written directory is a
diffusers AutoencoderKL (diffusers' PyTorch model computes what ours does), its scaling factor gives unit-variance
latents, a rerun resumes, and a bad config is refused with every problem named."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import autoencoder_shapes, t2i_shapes
from diffusion_jax import config_checks, media, train_autoencoder
from diffusion_jax.data import pipeline
from diffusion_jax.models import autoencoder
from test_autoencoder import as_torch


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  config = autoencoder_shapes.get_config("test")
  config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
  config.mesh.update(data=2, fsdp=4)  # parameters and Adam moments sharded 4 ways, batch over all 8 devices
  return config


def test_trains_writes_a_diffusers_autoencoder_and_resumes(config, tmp_path, caplog):
  import torch
  from diffusers import AutoencoderKL

  workdir = tmp_path / "workdir"
  directory = train_autoencoder.train(config, workdir)
  records = [json.loads(line) for line in (workdir / "logs" / "train.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [10, 20, 30]
  assert records[-1]["l1"] < 0.8 * records[0]["l1"], records  # it learns

  ours = autoencoder.load_diffusers(str(directory))
  theirs = AutoencoderKL.from_pretrained(directory).eval()
  source = pipeline.data_source(config.data, "train")
  x = np.stack([media.to_float(source[i]["image"]) for i in range(16)])
  with torch.no_grad():
    posterior = theirs.encode(as_torch(x)).latent_dist
    decoded = theirs.decode(posterior.mean).sample.permute(0, 2, 3, 1).numpy()
  mean, _ = ours.moments(jnp.asarray(x))
  np.testing.assert_allclose(mean, posterior.mean.permute(0, 2, 3, 1).numpy(), atol=1e-4)
  np.testing.assert_allclose(ours.decode(ours.encode(jnp.asarray(x))), decoded, atol=1e-4)
  # scaling_factor = 1 / the std of the training latents: the diffusion model sees about unit variance.
  latents = ours.encode(jnp.asarray(x), jax.random.key(0))
  assert theirs.config.scaling_factor == ours.scaling_factor and 0.7 < float(jnp.std(latents)) < 1.4
  result = json.loads((workdir / "logs" / "reconstruction.json").read_text())
  assert result["examples"] == 16 and media.read_provenance(workdir / "reconstructions.png")["psnr_db"] == str(
      result["psnr_db"])
  assert result["psnr_db"] > 10 and result["fid_random_conv"] > 0 and 0 <= result["judge/all"] <= 1
  latent = t2i_shapes.get_config("latent")  # the latent demo's config fits the autoencoder written
  latent.latent.autoencoder_path = str(directory)
  latent.data.resolution = config.data.resolution
  config_checks.validate(latent)

  config = config.copy_and_resolve_references()
  config.train.steps = 32
  caplog.set_level("INFO", logger="diffusion_jax")
  assert train_autoencoder.train(config, workdir) == directory
  assert "resumed from step 30" in caplog.text
  assert [json.loads(line)["step"] for line in (workdir / "logs" / "train.jsonl").read_text().splitlines()][-1] == 32
  config.autoencoder.latent_channels = 8
  with pytest.raises(ValueError, match="checkpoints of another autoencoder.*latent_channels: 4 -> 8"):
    train_autoencoder.train(config, workdir)


def test_a_bad_config_is_refused_with_every_problem(config, tmp_path):
  config = config.copy_and_resolve_references()
  config.data.resolution = 15
  config.autoencoder.update(block_out_channels=(8, 10), out_channels=1)
  config.train.kl_weight = -1.0
  with pytest.raises(ValueError) as error:
    train_autoencoder.train(config, tmp_path)
  for part in ("block_out_channels (8, 10) must be positive multiples of autoencoder.norm_num_groups=4",
               "data.resolution=15 is not divisible by the downsampling factor 2", "must be 3 (RGB",
               "train.kl_weight=-1.0 must be >= 0"):
    assert part in str(error.value)
  assert not (tmp_path / "checkpoints").exists()  # refused before anything is written
