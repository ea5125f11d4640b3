"""Objectives: exact parameterisation round trips, loss weightings, noise-level samplers, CFG dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion_jax import objectives, schedules


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(objectives.PREDICTIONS), st.sampled_from(["vp", "flow"]), st.floats(-8, 8))
def test_target_inverts_to_x0(prediction, path, logsnr):
  key0, key1 = jax.random.split(jax.random.key(0))
  x0 = jax.random.normal(key0, (2, 4, 4, 3))
  eps = jax.random.normal(key1, x0.shape)
  alpha, sigma = schedules.alpha_sigma_from_logsnr(jnp.full((2,), logsnr), path)
  x_t = objectives.diffuse(x0, eps, alpha, sigma)
  output = objectives.target(prediction, x0, eps, alpha, sigma)
  np.testing.assert_allclose(objectives.x0_from_prediction(prediction, output, x_t, alpha, sigma), x0,
                             rtol=2e-3, atol=2e-3)


def test_v_target_on_vp_path():
  x0, eps = jnp.ones((1, 3)), 2 * jnp.ones((1, 3))
  alpha, sigma = jnp.array([0.6]), jnp.array([0.8])
  np.testing.assert_allclose(objectives.target("v", x0, eps, alpha, sigma), 0.6 * 2 - 0.8 * 1)


@pytest.mark.parametrize("prediction", objectives.PREDICTIONS)
def test_loss_equals_weighted_x0_error(prediction):
  """The loss is w(logsnr) |x0_hat - x0|^2 for every parameterisation (min-SNR weighting here)."""
  keys = jax.random.split(jax.random.key(1), 3)
  x0 = jax.random.normal(keys[0], (5, 8))
  eps = jax.random.normal(keys[1], x0.shape)
  logsnr = jnp.linspace(-6, 6, 5)
  alpha, sigma = schedules.alpha_sigma_from_logsnr(logsnr)
  output = objectives.target(prediction, x0, eps, alpha, sigma) + 0.1 * jax.random.normal(keys[2], x0.shape)
  loss = objectives.loss(prediction, "min_snr", output, x0, eps, logsnr, min_snr_gamma=5.0)
  x0_hat = objectives.x0_from_prediction(prediction, output, objectives.diffuse(x0, eps, alpha, sigma), alpha,
                                         sigma)
  expected = jnp.minimum(jnp.exp(logsnr), 5.0) * jnp.mean((x0_hat - x0) ** 2, axis=1)
  np.testing.assert_allclose(loss, expected, rtol=1e-3)


def test_named_weightings_reduce_to_plain_mse():
  x0, eps = jnp.zeros((3, 4)), jnp.ones((3, 4))
  logsnr = jnp.array([-3.0, 0.0, 3.0])
  zero = jnp.zeros((3, 4))
  np.testing.assert_allclose(objectives.loss("eps", "eps_mse", zero, x0, eps, logsnr), 1.0, rtol=1e-5)
  alpha, sigma = schedules.alpha_sigma_from_logsnr(logsnr)
  v = objectives.target("v", x0, eps, alpha, sigma)
  np.testing.assert_allclose(objectives.loss("v", "v_mse", v + 1, x0, eps, logsnr), 1.0, rtol=1e-5)
  # flow_mse makes the flow prediction's loss on the flow path the plain |v_hat - v|^2 (SD3's, Wan's).
  flow_alpha, flow_sigma = schedules.alpha_sigma_from_logsnr(logsnr, "flow")
  velocity = objectives.target("flow", x0, eps, flow_alpha, flow_sigma)
  np.testing.assert_allclose(objectives.loss("flow", "flow_mse", velocity + 1, x0, eps, logsnr, "flow"), 1.0,
                             rtol=1e-5)
  # EDM weighting makes the preconditioned output's loss unweighted (Karras et al. eq. 8).
  edm = objectives.target("edm", x0, eps, alpha, sigma)
  np.testing.assert_allclose(objectives.loss("edm", "edm", edm + 1, x0, eps, logsnr), 1.0, rtol=1e-4)


def test_timestep_samplers():
  key = jax.random.key(0)
  uniform = objectives.sample_logsnr(key, 20000, "uniform", schedules.logsnr_schedule("cosine"))
  t = 2 * jnp.arctan(jnp.exp(-uniform / 2)) / jnp.pi  # inverse cosine schedule (unclipped part)
  assert abs(float(jnp.mean(t)) - 0.5) < 0.02
  log_normal = objectives.sample_logsnr(key, 20000, "log_normal", mean=-1.2, std=1.2)
  ln_sigma = jnp.log(schedules.edm_sigma_from_logsnr(log_normal))
  assert abs(float(ln_sigma.mean()) + 1.2) < 0.05 and abs(float(ln_sigma.std()) - 1.2) < 0.05
  logit_normal = objectives.sample_logsnr(key, 20000, "logit_normal", mean=0.0, std=1.0)
  _, t_flow = schedules.alpha_sigma_from_logsnr(logit_normal, "flow")
  logit = jnp.log(t_flow) - jnp.log1p(-t_flow)
  assert abs(float(logit.mean())) < 0.05 and abs(float(logit.std()) - 1.0) < 0.05


@pytest.mark.parametrize("sampler, mean", [("uniform", 0.0), ("logit_normal", -0.5), ("log_normal", -1.2)])
def test_draws_on_each_side_of_a_boundary_mix_into_the_samplers_distribution(sampler, mean):
  """A pair of experts' routed batches: sample_logsnr_on_side's draws lie on their side of the boundary, and the
  sides' draws mixed with logsnr_above_probability's weights are distributed as sample_logsnr's (at its deciles,
  within 0.01), the probability the share of its draws above the boundary."""
  boundary, schedule = -1.5, schedules.logsnr_schedule("flow", shift=5.0)
  key = jax.random.key(0)
  above, below = (np.asarray(objectives.sample_logsnr_on_side(key, 40000, boundary, side, sampler, schedule, mean,
                                                              1.2)) for side in (True, False))
  free = np.asarray(objectives.sample_logsnr(key, 40000, sampler, schedule, mean, 1.2))
  assert above.min() > boundary >= below.max()
  probability = float(objectives.logsnr_above_probability(boundary, sampler, schedule, mean, 1.2))
  assert abs(probability - (free > boundary).mean()) < 0.01
  deciles = np.quantile(free, np.linspace(0.1, 0.9, 9))
  mixed = probability * (above[:, None] < deciles).mean(0) + (1 - probability) * (below[:, None] < deciles).mean(0)
  np.testing.assert_allclose(mixed, np.linspace(0.1, 0.9, 9), atol=0.01)


def test_drop_condition():
  emb = jnp.ones((1000, 4, 8))
  mask = jnp.ones((1000, 4), bool)
  out, out_mask, kept = objectives.drop_condition(jax.random.key(0), emb, mask, 0.25)
  assert abs(1 - float(kept.mean()) - 0.25) < 0.05
  np.testing.assert_array_equal(out[~kept], 0.0)
  np.testing.assert_array_equal(out_mask[~kept], False)
  np.testing.assert_array_equal(out[kept], emb[kept])
  assert bool(jnp.all(objectives.drop_condition(jax.random.key(0), emb, mask, 0.0)[2]))


@pytest.mark.parametrize("call, message", [
    (lambda: objectives.target("score", jnp.zeros(1), jnp.zeros(1), 1.0, 0.0), "valid options"),
    (lambda: objectives.log_x0_weight("p2", jnp.zeros(1)), "valid options"),
    (lambda: objectives.sample_logsnr(jax.random.key(0), 2, "beta"), "valid options"),
    (lambda: objectives.sample_logsnr(jax.random.key(0), 2, "uniform"), "logsnr_fn"),
    (lambda: objectives.drop_condition(jax.random.key(0), jnp.zeros((1, 1, 1)), jnp.ones((1, 1), bool), 1.5),
     "in \\[0, 1\\]"),
])
def test_bad_input_raises_clear_error(call, message):
  with pytest.raises(ValueError, match=message):
    call()
