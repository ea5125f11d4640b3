"""Random streams for model building: the same parameters as `nnx.Rngs` (also from a traced key), as plain
arrays; abstract shapes."""

import jax
import numpy as np
from flax import nnx

from configs import base
from diffusion_jax.models import init_rngs, unet


def tiny_config():
  config = base.get_config().model
  config.update(channels=8, channel_mults=(1,), num_res_blocks=(1,), attention_levels=(0,), heads=2, text_dim=8)
  return config


def params(make_rngs):
  return nnx.to_pure_dict(nnx.state(unet.UNet(tiny_config(), rngs=make_rngs(3)), nnx.Param))


def test_parameters_equal_those_of_plain_rngs_and_the_abstract_shapes():
  ours, plain = jax.jit(lambda: params(init_rngs.seeded))(), jax.jit(lambda: params(nnx.Rngs))()
  # From a traced key (the seed an argument): the same parameters, and one program for every seed.
  from_key = jax.jit(lambda key: params(lambda _: init_rngs.seeded(key)))
  keyed = from_key(jax.random.key(3))
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: unet.UNet(tiny_config(), rngs=init_rngs.seeded(0))),
                                        nnx.Param))
  assert jax.tree.structure(ours) == jax.tree.structure(plain) == jax.tree.structure(abstract)
  for a, b, c, shape in zip(jax.tree.leaves(ours), jax.tree.leaves(plain), jax.tree.leaves(keyed),
                            jax.tree.leaves(abstract)):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(c, b)
    assert (a.shape, a.dtype) == (shape.shape, shape.dtype)
  assert from_key.lower(jax.random.key(3)).as_text() == from_key.lower(jax.random.key(4)).as_text()


def test_built_eagerly_the_parameters_are_plain_arrays():
  for leaf in jax.tree.leaves(params(init_rngs.seeded)):
    assert isinstance(leaf, jax.Array) and not isinstance(leaf, jax.Ref)

