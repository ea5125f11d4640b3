"""Shared U-Net layers: our GroupNorm against flax's own (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffusion_jax.models import layers


@pytest.mark.parametrize("shape", [(2, 4, 4, 8), (2, 6, 4, 4, 64), (3, 5, 32)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_group_norm_is_flax_group_norm(shape, dtype):
  norm = layers.group_norm(shape[-1], nnx.Rngs(0), dtype)
  graphdef, params = nnx.split(norm)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(0), len(leaves) + 1)
  params = jax.tree.unflatten(tree, [p + jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  x = (3 * jax.random.normal(keys[-1], shape) + 1).astype(dtype)

  def loss(call):  # a nonlinear read-out, so the gradient depends on every output
    return lambda params, x: jnp.sum(jnp.sin(call(nnx.merge(graphdef, params), x).astype(jnp.float32)))

  ours = jax.jit(jax.value_and_grad(loss(lambda m, x: m(x)), argnums=(0, 1)))(params, x)
  flax = jax.jit(jax.value_and_grad(loss(nnx.GroupNorm.__call__), argnums=(0, 1)))(params, x)
  tolerance = 1e-4 if dtype == jnp.float32 else 5e-2
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(flax)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tolerance,
                               atol=tolerance * np.abs(np.asarray(b, np.float32)).max())
