import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import t2i_shapes
from diffusion_jax import optimizer


def config_with(**optimizer_fields):
  config = t2i_shapes.get_config("test")
  config.optimizer.update(optimizer_fields)
  return config


@pytest.mark.parametrize("schedule, warmup, steps, end_factor", [
    ("cosine", 5, 20, 0.1), ("cosine", 0, 12, 0.0), ("cosine", 30, 20, 0.1), ("constant", 7, 20, 0.1)])
def test_schedule_matches_optax_step_for_step(schedule, warmup, steps, end_factor):
  config = config_with(schedule=schedule, warmup_steps=warmup, learning_rate=3e-3, end_learning_rate_factor=end_factor)
  config.train.steps = steps
  hparams = optimizer.hyperparameters(config)
  if schedule == "constant":
    reference = optax.warmup_constant_schedule(0.0, 3e-3, max(warmup, 1))
  else:
    reference = optax.warmup_cosine_decay_schedule(0.0, 3e-3, max(warmup, 1), max(steps, warmup + 1),
                                                   end_value=3e-3 * end_factor)
  counts = jnp.arange(steps + 10)
  ours = jax.jit(jax.vmap(lambda c, h: optimizer.learning_rate(c, h, schedule), in_axes=(0, None)))(counts, hparams)
  np.testing.assert_allclose(ours, jax.vmap(reference)(counts), rtol=1e-5, atol=1e-10)


def test_updates_match_optax_adamw_with_its_own_schedule():
  config = config_with(learning_rate=1e-2, warmup_steps=2, weight_decay=0.1, grad_clip=0.5, b1=0.8, b2=0.95)
  config.train.steps = 6
  reference = optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(
      optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 6, end_value=1e-2 * config.optimizer.end_learning_rate_factor),
      b1=0.8, b2=0.95, weight_decay=0.1))
  hparams = optimizer.hyperparameters(config)

  @jax.jit
  def ours_update(grads, state, params, hparams):  # the numbers traced, as in the train step
    return optimizer.make(config, hparams).update(grads, state, params)

  params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.ones(3)}
  ours_state, reference_state = optimizer.make(config, hparams).init(params), reference.init(params)
  ours_params, reference_params = params, params
  for step in range(6):
    grads = jax.tree.map(lambda p, step=step: jnp.sin(p * (step + 1)) * (step + 1), ours_params)
    updates, ours_state = ours_update(grads, ours_state, ours_params, hparams)
    ours_params = optax.apply_updates(ours_params, updates)
    updates, reference_state = reference.update(grads, reference_state, reference_params)
    reference_params = optax.apply_updates(reference_params, updates)
    for a, b in zip(jax.tree.leaves(ours_params), jax.tree.leaves(reference_params)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # The state has the layout optax's own AdamW gives (checkpoints written before this module still restore).
  assert jax.tree.structure(ours_state) == jax.tree.structure(reference_state)
