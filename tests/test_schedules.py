"""Noise schedules: monotonicity, conversions, discrete tables, zero terminal SNR, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion_jax import schedules

CONTINUOUS = [
    ("cosine", {}),
    ("shifted_cosine", {"resolution": 128, "base_resolution": 64}),
    ("interpolated_shifted_cosine", {"resolution": 64, "base_resolution": 16}),
    ("linear", {}),
    ("scaled_linear", {}),
    ("edm", {}),
    ("flow", {}),
    ("flow", {"shift": 5.0}),
]


@pytest.mark.parametrize("name, params", CONTINUOUS)
def test_logsnr_decreases_with_time(name, params):
  fn = schedules.logsnr_schedule(name, **params)
  assert bool(jnp.all(jnp.isfinite(fn(jnp.array([0.0, 1.0])))))
  logsnr = fn(jnp.linspace(0.002, 1.0, 512))
  assert bool(jnp.all(jnp.diff(logsnr) < 0))


def test_shifted_cosine_shifts_by_resolution_ratio():
  t = jnp.linspace(0.1, 0.9, 9)
  base = schedules.logsnr_schedule("cosine")(t)
  shifted = schedules.logsnr_schedule("shifted_cosine", resolution=256, base_resolution=64,
                                      logsnr_min=-15 - 2 * np.log(4), logsnr_max=15 - 2 * np.log(4))(t)
  np.testing.assert_allclose(shifted, base + 2 * np.log(64 / 256), rtol=1e-5, atol=1e-4)


def test_interpolated_schedule_is_unshifted_when_clean_and_shifted_when_noisy():
  params = {"resolution": 64, "base_resolution": 16}
  logsnr = lambda name, t: schedules.logsnr_schedule(name, **({} if name == "cosine" else params))(jnp.array(t))
  interpolated = lambda t: logsnr("interpolated_shifted_cosine", t)
  assert float(interpolated(0.0)) == pytest.approx(float(logsnr("cosine", 0.0)), abs=1e-4)
  assert float(interpolated(1.0)) == pytest.approx(float(logsnr("shifted_cosine", 1.0)), abs=1e-4)
  t = jnp.linspace(0.05, 0.95, 19)  # in between it lies between the two
  assert bool(jnp.all((logsnr("shifted_cosine", t) < interpolated(t)) & (interpolated(t) < logsnr("cosine", t))))


def test_continuous_linear_is_limit_of_discrete_table():
  ac = schedules.alphas_cumprod_from_betas(schedules.betas("linear", 1000))
  t = (np.arange(1000) + 1) / 1000
  continuous = jax.nn.sigmoid(schedules.logsnr_schedule("linear")(jnp.asarray(t)))
  np.testing.assert_allclose(continuous, ac, atol=2e-3)


def test_edm_schedule_spans_sigma_range():
  fn = schedules.logsnr_schedule("edm", sigma_min=0.01, sigma_max=50.0)
  sigmas = schedules.edm_sigma_from_logsnr(fn(jnp.array([0.0, 1.0])))
  np.testing.assert_allclose(sigmas, [0.01, 50.0], rtol=1e-4)
  np.testing.assert_allclose(schedules.karras_edm_sigmas(5, 0.01, 50.0)[[0, -1]], [50.0, 0.01], rtol=1e-9)


@settings(max_examples=60, deadline=None)
@given(st.floats(-20, 20))
def test_vp_alpha_sigma_round_trip(logsnr):
  alpha, sigma = schedules.alpha_sigma_from_logsnr(jnp.float32(logsnr))
  assert abs(float(alpha**2 + sigma**2) - 1) < 1e-5
  np.testing.assert_allclose(schedules.logsnr_from_alpha_sigma(alpha, sigma), logsnr, atol=1e-3)
  np.testing.assert_allclose(schedules.logsnr_from_edm_sigma(schedules.edm_sigma_from_logsnr(logsnr)),
                             logsnr, atol=1e-4)


def test_shifted_flow_is_sd3s_and_wans_time_shift():
  """shift s: sigma = s t / (1 + (s - 1) t) on the flow path (SD3's and Wan's sampling shift)."""
  t = np.linspace(0.05, 0.95, 19)
  _, sigma = schedules.alpha_sigma_from_logsnr(schedules.logsnr_schedule("flow", shift=5.0)(jnp.asarray(t)), "flow")
  np.testing.assert_allclose(sigma, 5 * t / (1 + 4 * t), rtol=1e-5)
  with pytest.raises(ValueError, match="flow schedule needs shift > 0"):
    schedules.logsnr_schedule("flow", shift=0.0)


@settings(max_examples=60, deadline=None)
@given(st.floats(-12, 12))
def test_flow_path_round_trip(logsnr):
  alpha, sigma = schedules.alpha_sigma_from_logsnr(jnp.float32(logsnr), "flow")
  assert abs(float(alpha + sigma) - 1) < 1e-6
  np.testing.assert_allclose(schedules.logsnr_from_alpha_sigma(alpha, sigma), logsnr, atol=2e-3)


@pytest.mark.parametrize("name", sorted(schedules.DISCRETE_BETAS))
def test_betas_alphas_cumprod_round_trip(name):
  b = schedules.betas(name, 1000)
  np.testing.assert_allclose(schedules.betas_from_alphas_cumprod(schedules.alphas_cumprod_from_betas(b)), b,
                             rtol=1e-9, atol=1e-12)


def test_zero_terminal_snr_rescale():
  b = schedules.rescale_zero_terminal_snr(schedules.betas("scaled_linear", 1000))
  ac = schedules.alphas_cumprod_from_betas(b)
  original = schedules.alphas_cumprod_from_betas(schedules.betas("scaled_linear", 1000))
  assert ac[-1] == pytest.approx(0.0, abs=1e-12)
  assert ac[0] == pytest.approx(original[0], rel=1e-9)
  assert np.all(np.diff(ac) < 0)
  with jax.enable_x64(True):
    alpha, sigma = schedules.alpha_sigma_from_logsnr(jnp.asarray(schedules.logsnr_from_alphas_cumprod(ac[-1])))
  assert float(alpha) == 0.0 and float(sigma) == 1.0


@pytest.mark.parametrize("call, message", [
    (lambda: schedules.logsnr_schedule("sigmoid"), "valid options"),
    (lambda: schedules.logsnr_schedule("cosine", shift=2), "valid parameters"),
    (lambda: schedules.logsnr_schedule("cosine", logsnr_min=5, logsnr_max=-5), "logsnr_min < logsnr_max"),
    (lambda: schedules.logsnr_schedule("edm", sigma_min=10, sigma_max=1), "sigma_min < sigma_max"),
    (lambda: schedules.betas("cosine"), "valid options"),
    (lambda: schedules.betas("linear", beta_end=1.5), "outside"),
    (lambda: schedules.discrete_timesteps(1000, 0), "steps must be >= 1"),
    (lambda: schedules.discrete_timesteps(1000, 10, "uniform"), "valid options"),
    (lambda: schedules.alpha_sigma_from_logsnr(0.0, "ve"), "valid paths"),
])
def test_bad_input_raises_clear_error(call, message):
  with pytest.raises(ValueError, match=message):
    call()
