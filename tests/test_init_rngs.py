"""Random streams for model building: the same parameters as `nnx.Rngs`, eagerly, jitted and abstractly."""

import jax
import numpy as np
from flax import nnx

from configs import base
from diffusion_jax.models import init_rngs, unet


def tiny_config():
  config = base.get_config().model
  config.update(channels=8, channel_mults=(1, 2), num_res_blocks=(1, 1), attention_levels=(1,), heads=2, text_dim=8)
  return config


def params(make_rngs):
  return nnx.to_pure_dict(nnx.state(unet.UNet(tiny_config(), rngs=make_rngs(3)), nnx.Param))


def test_parameters_equal_those_of_plain_rngs_under_jit_and_eagerly():
  for build in (jax.jit, lambda f: f):
    ours, plain = build(lambda: params(init_rngs.seeded))(), build(lambda: params(nnx.Rngs))()
    assert jax.tree.structure(ours) == jax.tree.structure(plain)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(plain)):
      assert isinstance(a, jax.Array) and not isinstance(a, jax.Ref)
      np.testing.assert_array_equal(a, b)


def test_abstract_model_has_the_shapes_of_the_built_one():
  abstract = nnx.state(nnx.eval_shape(lambda: unet.UNet(tiny_config(), rngs=init_rngs.seeded(0))), nnx.Param)
  built = nnx.state(unet.UNet(tiny_config(), rngs=nnx.Rngs(0)), nnx.Param)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), nnx.to_pure_dict(abstract)) == \
      jax.tree.map(lambda x: (x.shape, x.dtype), nnx.to_pure_dict(built))
