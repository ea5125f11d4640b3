"""Parameter counts of published configurations, from jax.eval_shape (nothing is allocated)."""

import jax
import pytest
from flax import nnx

from configs import imagen_base64
from diffusion_jax import config_checks
from diffusion_jax.models import t5, unet


def count(module_fn) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(module_fn), nnx.Param)))


def test_t5_v1_1_xxl_encoder_size():
  config = imagen_base64.get_config().text.t5
  # google/t5-v1_1-xxl encoder: 4,762,310,656 parameters (shared embedding included).
  assert count(lambda: t5.T5Encoder(config, rngs=nnx.Rngs(0))) == pytest.approx(4.762e9, rel=0.01)


def test_imagen_base_unet_size():
  config = imagen_base64.get_config().model
  # Imagen's 64x64 base model has 2B parameters (Saharia et al. 2022); ours is within 5%.
  assert count(lambda: unet.UNet(config, rngs=nnx.Rngs(0))) == pytest.approx(2.0e9, rel=0.05)


@pytest.mark.parametrize("variant", ["dp", "fsdp", "fsdp_tp"])
def test_pod_config_variants_validate_on_a_pod(variant):
  config = imagen_base64.get_config(variant)
  config.text.spiece_path = "/path/to/spiece.model"
  config_checks.validate(config, device_count=256, process_count=64)
