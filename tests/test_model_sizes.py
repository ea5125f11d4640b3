"""Parameter counts of published configurations, from jax.eval_shape (nothing is allocated)."""

import jax
import pytest
from flax import nnx

from configs import imagen_base64
from diffusion_jax import config_checks
from diffusion_jax.models import init_rngs, t5, unet


def count(module_fn) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(module_fn), nnx.Param)))


def test_t5_v1_1_xxl_encoder_size():
  config = imagen_base64.get_config().text.t5
  # google/t5-v1_1-xxl encoder: 4,762,310,656 parameters (shared embedding included).
  assert count(lambda: t5.T5Encoder(config, rngs=init_rngs.seeded(0))) == pytest.approx(4.762e9, rel=0.01)


def test_imagen_base_unet_size():
  config = imagen_base64.get_config().model
  # Imagen's 64x64 base model has 2B parameters (Saharia et al. 2022); ours has 2.01B.
  assert count(lambda: unet.UNet(config, rngs=init_rngs.seeded(0))) == pytest.approx(2.0e9, rel=0.02)


def test_video_base_unet_adds_temporal_layers_to_the_image_base():
  from configs import t2v_base64

  image = count(lambda: unet.UNet(imagen_base64.get_config().model, rngs=init_rngs.seeded(0)))
  video = count(lambda: unet.UNet(t2v_base64.get_config().model, rngs=init_rngs.seeded(0)))
  # Imagen Video's 16x40x24 base model is 5.6B with its own widths; ours keeps the image widths.
  assert 1.2 * image < video < 2.5 * image
  config = t2v_base64.get_config()
  config.text.spiece_path = "/path/to/spiece.model"
  config_checks.validate(config, device_count=256, process_count=64)


@pytest.mark.parametrize("variant", ["dp", "fsdp", "fsdp_tp"])
def test_pod_config_variants_validate_on_a_pod(variant):
  config = imagen_base64.get_config(variant)
  config.text.spiece_path = "/path/to/spiece.model"
  config_checks.validate(config, device_count=256, process_count=64)


@pytest.mark.parametrize("name, devices", [("t2i_shapes:fsdp", 8), ("imagen_base64:fsdp", 256), ("t2v_base64:", 256)])
def test_fsdp_shards_parameters_evenly(name, devices):
  """Per-device parameter count under FSDP is within 10% of total / devices (abstract mesh, no allocation)."""
  import importlib
  import math

  from diffusion_jax import sharding
  from diffusion_jax.models import text_to_image

  module, variant = name.split(":")
  config = importlib.import_module(f"configs.{module}").get_config(variant)
  mesh = jax.sharding.AbstractMesh((1, devices, 1, 1), sharding.MESH_AXES)
  _, params, _ = text_to_image.split(text_to_image.abstract(config), config)
  total = per_device = 0
  for _, variable in nnx.to_flat_state(params):
    shape = variable.get_value().shape
    spec = sharding.logical_to_spec(variable.get_metadata()["out_sharding"], shape, mesh)
    split = math.prod(mesh.shape[a] for dim in spec if dim for a in ((dim,) if isinstance(dim, str) else dim))
    total += math.prod(shape)
    per_device += math.prod(shape) / split
  assert per_device <= 1.1 * total / devices


def test_imagen_sr256_stage_size_and_pod_validation():
  from configs import imagen_sr256

  config = imagen_sr256.get_config()
  # Imagen's 64 -> 256 Efficient U-Net has 600M parameters.
  assert count(lambda: unet.UNet(config.model, rngs=init_rngs.seeded(0))) == pytest.approx(6.0e8, rel=0.25)
  config.text.spiece_path = "/path/to/spiece.model"
  config.data.update(dataset="tfds", name="your_dataset")  # (as its docstring's command: 256 px images of a dataset)
  config_checks.validate(config, device_count=256, process_count=64)


def test_stable_diffusions_kl_f8_autoencoder_and_discriminator_sizes(lpips_weights):
  from configs import autoencoder_kl_f8
  from diffusion_jax import train_autoencoder
  from diffusion_jax.models import autoencoder

  config = autoencoder_kl_f8.get_config()
  model_config = train_autoencoder.model_config(config)
  # diffusers' AutoencoderKL of Stable Diffusion (e.g. stabilityai/sd-vae-ft-mse): 83,653,863 parameters;
  # taming-transformers' NLayerDiscriminator (ndf 64, 3 layers, batch norm): 2,765,633.
  assert count(lambda: autoencoder.AutoencoderKL(model_config, rngs=init_rngs.seeded(0))) == 83_653_863
  assert count(lambda: train_autoencoder.make_discriminator(config, init_rngs.seeded(0))) == 2_765_633
  assert autoencoder.downsampling_factor(model_config) == 8
  assert train_autoencoder.problems(config) == [
      "data.dataset='tfds' opens the prepared TFDS dataset data.name (in data.data_dir): set it",
      "lpips.loss_weight > 0 needs lpips.path, a local LPIPS weights directory (metrics/lpips.py)"]
  config.data.name = "your_dataset"  # (as its docstring's command)
  config.lpips.path = str(lpips_weights[0])
  assert train_autoencoder.problems(config) == []
