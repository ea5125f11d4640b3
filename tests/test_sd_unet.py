"""Stable Diffusion's U-Net (models/sd_unet.py) against diffusers' UNet2DConditionModel, and as a backbone."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from diffusion_jax import config_checks, sample, schedules, sharding, train
from diffusion_jax.models import sd_unet


def save_tiny_sd_unet(directory, linear_projection=False, heads=4, channels=4, cross_attention_dim=16, seed=0):
  """A random 2-level UNet2DConditionModel (cross-attention at the first level) saved as a diffusers directory:
  SD 1.x's layout (1x1 convolutions around the attention, `heads` heads everywhere) or, with linear_projection and a
  list of heads, SD 2.x's."""
  import diffusers

  torch.manual_seed(seed)
  model = diffusers.UNet2DConditionModel(
      sample_size=16, in_channels=channels, out_channels=channels, block_out_channels=(32, 64), layers_per_block=1,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
      cross_attention_dim=cross_attention_dim, attention_head_dim=heads, norm_num_groups=8,
      use_linear_projection=linear_projection).eval()
  model.save_pretrained(directory)
  return model


@pytest.mark.parametrize("linear_projection, heads", [(False, 4), (True, (2, 4))])
def test_the_unet_computes_what_diffusers_computes(tmp_path, linear_projection, heads):
  reference = save_tiny_sd_unet(tmp_path, linear_projection, heads)
  ours = sd_unet.load_diffusers(tmp_path)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
  timesteps, text = np.array([10.0, 999.0], np.float32), rng.standard_normal((2, 7, 16)).astype(np.float32)
  with torch.no_grad():
    expected = reference(torch.tensor(x), torch.tensor(timesteps), torch.tensor(text)).sample.numpy()
  out = ours(jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(timesteps), jnp.asarray(text))
  np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), expected, atol=2e-5)


def test_the_timestep_of_a_logsnr_is_sds():
  """At the log-SNRs of diffusers' Stable Diffusion table (DDPMScheduler, scaled-linear betas) the U-Net reads that
  table's timesteps; between two it reads a fraction; beyond its ends, the ends."""
  import diffusers

  alphas_cumprod = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                           beta_end=0.012).alphas_cumprod.double().numpy()
  steps = np.array([0, 1, 250, 500, 999])
  logsnr = schedules.logsnr_from_alphas_cumprod(alphas_cumprod[steps])
  np.testing.assert_allclose(sd_unet.timestep(jnp.asarray(logsnr, jnp.float32)), steps, atol=2e-3)
  middle = sd_unet.timestep(jnp.asarray(logsnr[2:4].mean(keepdims=True), jnp.float32))
  assert 250 < float(middle[0]) < 500
  np.testing.assert_allclose(sd_unet.timestep(jnp.array([30.0, -30.0])), [0, 999])


def test_what_it_cannot_build_is_refused_by_name(tmp_path):
  save_tiny_sd_unet(tmp_path / "unet")
  with pytest.raises(ValueError, match="it is a whole pipeline's checkpoint; give its unet/ folder"):
    sd_unet.read_config(tmp_path)
  config = json.loads((tmp_path / "unet" / "config.json").read_text())
  (tmp_path / "unet" / "config.json").write_text(json.dumps(config | {"addition_embed_type": "text_time",
                                                                      "transformer_layers_per_block": 2}))
  with pytest.raises(ValueError, match=r"transformer_layers_per_block=2, addition_embed_type='text_time': not "
                                       r"supported \(SD 1.x and 2.x U-Nets are; SDXL's"):
    sd_unet.read_config(tmp_path / "unet")
  (tmp_path / "unet" / "config.json").write_text(json.dumps(config | {"cross_attention_dim": 32}))
  with pytest.raises(ValueError, match="does not match its config.json .*attn2.to_k.weight has shape"):
    sd_unet.load_diffusers(tmp_path / "unet")


def test_a_stable_diffusion_unet_trains_from_its_weights_and_samples(tmp_path):
  """model.backbone='sd_unet': the config check asks for the VP path and the U-Net's channels and text width; the
  model starts with the directory's weights, trains (every U-Net weight moves) and samples."""
  from configs import t2i_shapes

  save_tiny_sd_unet(tmp_path / "unet", channels=3, cross_attention_dim=32)
  config = t2i_shapes.get_config("test")
  config.model.update(backbone="sd_unet", sd_unet_path=str(tmp_path / "unet"), remat=True)
  config.data.data_dir = str(tmp_path / "tfds")
  config.diffusion.path, config.text.t5.d_model = "flow", 16
  found = " ".join(config_checks.problems(config, device_count=8))
  for problem in ("SD's U-Net reads the timesteps of its variance-preserving table; set diffusion.path='vp'",
                  "the text encoder's width 16 (text.pretrained_path's d_model, or text.t5.d_model) must equal the "
                  "U-Net's cross_attention_dim=32", "model.remat: not supported with model.backbone='sd_unet' yet"):
    assert problem in found
  config.diffusion.path, config.text.t5.d_model, config.model.remat = "vp", 32, False
  assert config_checks.problems(config, device_count=8) == []
  state, _ = train.init_state(config, sharding.make_mesh(config.mesh))
  loaded = nnx.to_pure_dict(nnx.state(sd_unet.load_diffusers(tmp_path / "unet")))
  jax.tree.map(np.testing.assert_array_equal, state.params["sd_unet"], loaded)
  del state
  config.train.update(steps=2, checkpoint_every=2)
  train.train_and_evaluate(config, tmp_path / "run")
  config_read, weights, *_ = sample.load_checkpoint(tmp_path / "run", use_ema=False)
  assert config_read.model.backbone == "sd_unet"
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), weights.params["sd_unet"], loaded)
  assert min(jax.tree.leaves(moved)) > 0
  grid = sample.sample_from_workdir(tmp_path / "run", {"steps": 2, "num_per_prompt": 1}, output_dir=tmp_path / "out")
  assert grid.exists() and len(list(grid.parent.glob("*.png"))) == len(config.sample.prompts) + 1  # and the grid
