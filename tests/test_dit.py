"""The diffusion transformer: starts as the zero function, learns through every block, trains sharded as on one
device, samples; configs it cannot serve are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import t2i_shapes
from diffusion_jax import config_checks, sample, sharding
from diffusion_jax.data import pipeline
from diffusion_jax.models import init_rngs, text_to_image
from diffusion_jax.text import tokenizers
from test_train import one_step


def dit_config():
  config = t2i_shapes.get_config("test")
  config.model.update(backbone="dit", channels=16, depth=2, patch_size=2)
  return config


def test_starts_as_the_zero_function_and_learns_through_every_block():
  config = dit_config()
  model = text_to_image.TextToImage(config, rngs=init_rngs.seeded(0))
  graphdef, params, frozen = text_to_image.split(model, config)
  params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  target = jax.random.normal(jax.random.key(2), x.shape)
  ids = jnp.array([[5, 9, 13, 0], [7, 2, 0, 0], [3, 0, 0, 0], [4, 6, 8, 10]])
  logsnr = jnp.array([-3.0, -1.0, 1.0, 3.0])

  def loss(params):
    model = nnx.merge(graphdef, params, frozen)
    return jnp.mean((model(x, logsnr, model.encode(ids, ids > 0), ids > 0) - target) ** 2)

  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, opt_state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  initial = loss(params)
  assert float(initial) == pytest.approx(float(jnp.mean(target ** 2)))  # the output starts at exactly zero
  trained, opt_state = params, tx.init(params)
  for _ in range(30):
    trained, opt_state, value = step(trained, opt_state)
  assert float(value) < 0.7 * float(initial)
  for index in range(config.model.depth):  # the zero gates open: every block's attention and MLP train
    block, before = trained["dit"]["blocks"][index], params["dit"]["blocks"][index]
    for path in (("self_attn", "q", "kernel"), ("ff", "proj_in", "kernel"), ("cross_attn", "out", "kernel")):
      leaf = lambda tree: tree[path[0]][path[1]][path[2]]
      assert float(jnp.abs(leaf(block) - leaf(before)).max()) > 0, (index, path)


def test_trains_sharded_like_one_device_and_samples():
  config = dit_config()
  batch_np = pipeline.synthetic_batch(config)
  single_state, single_metrics = one_step(config, dict(data=1, fsdp=1, tensor=1), batch_np, jax.devices()[:1])
  state, metrics = one_step(config, dict(data=2, fsdp=2, tensor=2), batch_np)
  np.testing.assert_allclose(metrics["loss"], single_metrics["loss"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(jax.device_get(single_state.params))):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
  graphdef = text_to_image.split(text_to_image.abstract(config), config)[0]
  sample_config = config.sample.copy_and_resolve_references()
  sample_config.update(steps=2, num_per_prompt=2)
  images = sample.generate(config, graphdef, state.params, state.frozen, tokenizers.from_config(config),
                           ["a large red circle", "a small blue square"], sample_config,
                           sharding.make_mesh(config.mesh))
  assert images.shape == (2, 2, 16, 16, 3) and images.dtype == np.uint8


def test_configs_a_dit_cannot_serve_are_refused():
  config = dit_config()
  config.model.update(patch_size=3, channels=30, temporal=True, dropout=0.1)
  message = "; ".join(config_checks.problems(config, device_count=8))
  assert "divisible by model.patch_size=3" in message and "model.channels=30" in message
  assert "has no model.temporal, model.dropout yet" in message
  config.model.backbone = "vit"
  assert "model.backbone='vit' is not one of" in "; ".join(config_checks.problems(config, device_count=8))
