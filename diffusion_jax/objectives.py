"""What the network predicts, the diffusion loss, and how training noise levels are drawn.

All functions are pure. Shapes: x0, eps, x_t: [batch, ...]; alpha, sigma, logsnr: [batch].
"""

import jax
import jax.numpy as jnp

from diffusion_jax import schedules

PREDICTIONS = ("eps", "x0", "v", "flow", "edm")
WEIGHTINGS = ("eps_mse", "v_mse", "x0_mse", "min_snr", "edm", "flow_mse")
TIME_SAMPLERS = ("uniform", "log_normal", "logit_normal")


def _check(name, valid, kind):
  if name not in valid:
    raise ValueError(f"Unknown {kind} {name!r}; valid options: {list(valid)}.")


def per_example(a, x):
  """Reshape per-example [batch] values to broadcast against x [batch, ...]."""
  return jnp.reshape(a, jnp.shape(a) + (1,) * (x.ndim - jnp.ndim(a)))


def per_example_switch(takes_first, first, second):
  """first() for the examples where takes_first [batch] bool, second() for the others (two functions of no
  arguments giving [batch, ...]): only one runs when every example agrees (lax.cond), both when they differ."""
  both = lambda: (lambda a, b: jnp.where(per_example(takes_first, a), a, b))(first(), second())
  return jax.lax.cond(jnp.all(takes_first), first, lambda: jax.lax.cond(jnp.any(takes_first), both, second))


def diffuse(x0, eps, alpha, sigma):
  """Forward process q(x_t | x0): x_t = alpha * x0 + sigma * eps."""
  return per_example(alpha, x0) * x0 + per_example(sigma, x0) * eps


# ----------------------------------------------------------------------------- EDM preconditioning


def edm_preconditioning(alpha, sigma, sigma_data: float = 0.5):
  """Karras et al. 2022 coefficients (c_skip, c_out, c_in) for s = sigma / alpha.

  D(y) = c_skip * y + c_out * F(c_in * y) with y = x_t / alpha; c_noise is logsnr (see models).
  """
  s = sigma / alpha
  c_skip = sigma_data**2 / (s**2 + sigma_data**2)
  c_out = s * sigma_data / jnp.sqrt(s**2 + sigma_data**2)
  c_in = 1 / jnp.sqrt(s**2 + sigma_data**2)
  return c_skip, c_out, c_in


# ----------------------------------------------------------------------------- parameterisations


def target(prediction: str, x0, eps, alpha, sigma, sigma_data: float = 0.5):
  """Regression target of the network output for a prediction type."""
  _check(prediction, PREDICTIONS, "prediction")
  a, s = per_example(alpha, x0), per_example(sigma, x0)
  if prediction == "eps":
    return eps
  if prediction == "x0":
    return x0
  if prediction == "v":
    return a * eps - s * x0
  if prediction == "flow":
    return eps - x0
  c_skip, c_out, _ = edm_preconditioning(a, s, sigma_data)
  return (x0 - c_skip * diffuse(x0, eps, alpha, sigma) / a) / c_out


def x0_from_prediction(prediction: str, output, x_t, alpha, sigma, sigma_data: float = 0.5):
  """Exact inverse of `target`: the denoised x0 implied by a network output at x_t."""
  _check(prediction, PREDICTIONS, "prediction")
  a, s = per_example(alpha, x_t), per_example(sigma, x_t)
  if prediction == "eps":
    return (x_t - s * output) / a
  if prediction == "x0":
    return output
  if prediction == "v":
    return (a * x_t - s * output) / (a**2 + s**2)
  if prediction == "flow":
    return (x_t - s * output) / (a + s)
  c_skip, c_out, _ = edm_preconditioning(a, s, sigma_data)
  return c_skip * x_t / a + c_out * output


def eps_from_x0(x0, x_t, alpha, sigma):
  return (x_t - per_example(alpha, x_t) * x0) / per_example(sigma, x_t)


def network_input_scale(prediction: str, alpha, sigma, sigma_data: float = 0.5):
  """Factor applied to x_t before the network: EDM's c_in / alpha, else 1."""
  if prediction == "edm":
    return edm_preconditioning(alpha, sigma, sigma_data)[2] / alpha
  return jnp.ones_like(alpha)


def _log_dx0_doutput_sq(prediction, logsnr, alpha, sigma, sigma_data):
  """log of (d x0 / d output)^2: converts an x0-space weight into the output space."""
  if prediction == "eps":
    return -logsnr
  if prediction == "x0":
    return jnp.zeros_like(logsnr)
  if prediction == "v":
    return 2 * jnp.log(sigma) - 2 * jnp.log(alpha**2 + sigma**2)
  if prediction == "flow":
    return 2 * jnp.log(sigma) - 2 * jnp.log(alpha + sigma)
  _, c_out, _ = edm_preconditioning(alpha, sigma, sigma_data)
  return 2 * jnp.log(c_out)


# ----------------------------------------------------------------------------- loss weighting


def log_x0_weight(weighting: str, logsnr, min_snr_gamma: float = 5.0, sigma_data: float = 0.5):
  """log w(logsnr) of the loss w * |x0_hat - x0|^2 that each named weighting corresponds to.

  eps_mse: w = snr; v_mse: w = snr + 1; x0_mse: w = 1; min_snr: w = min(snr, gamma)
  (Hang et al. 2023); edm: w = (s^2 + sd^2) / (s * sd)^2 with s^2 = 1 / snr (Karras et al. 2022); flow_mse:
  w = (1 + sqrt(snr))^2 = 1 / t^2 on the flow path (x = (1 - t) x0 + t eps), which makes the loss of the flow
  prediction |v_hat - v|^2, the rectified-flow loss SD3 and Wan train with.
  """
  _check(weighting, WEIGHTINGS, "loss weighting")
  if weighting == "eps_mse":
    return logsnr
  if weighting == "v_mse":
    return jnp.logaddexp(logsnr, 0.0)
  if weighting == "x0_mse":
    return jnp.zeros_like(logsnr)
  if weighting == "min_snr":
    return jnp.minimum(logsnr, jnp.log(min_snr_gamma))
  if weighting == "flow_mse":
    return 2 * jnp.logaddexp(logsnr / 2, 0.0)
  # (s^2 + sd^2) / (s^2 sd^2) = 1 / sd^2 + snr
  return jnp.logaddexp(logsnr, -2 * jnp.log(sigma_data))


def loss(prediction: str, weighting: str, output, x0, eps, logsnr, path: str = "vp",
         min_snr_gamma: float = 5.0, sigma_data: float = 0.5):
  """Per-example weighted MSE [batch] of network output against the prediction target.

  The weight makes the loss equal w(logsnr) * mean |x0_hat - x0|^2 whatever the prediction type,
  computed in the output space (finite even where x0_hat is ill-conditioned).
  """
  alpha, sigma = schedules.alpha_sigma_from_logsnr(logsnr, path)
  mse = jnp.mean(
      (output - target(prediction, x0, eps, alpha, sigma, sigma_data)) ** 2,
      axis=tuple(range(1, output.ndim)),
  )
  log_weight = log_x0_weight(weighting, logsnr, min_snr_gamma, sigma_data) + _log_dx0_doutput_sq(
      prediction, logsnr, alpha, sigma, sigma_data)
  return jnp.exp(log_weight) * mse


# ----------------------------------------------------------------------------- training noise levels


def sample_logsnr(key, batch: int, sampler: str, logsnr_fn=None, mean: float = 0.0, std: float = 1.0):
  """Draw training log-SNRs [batch].

  uniform: t ~ U[0, 1] through `logsnr_fn`. log_normal (EDM): ln(sigma_edm) ~ N(mean, std), i.e.
  logsnr = -2 ln sigma_edm. logit_normal (SD3): logit(t) ~ N(mean, std) on the flow path, i.e.
  logsnr = -2 logit(t).
  """
  _check(sampler, TIME_SAMPLERS, "timestep sampler")
  if sampler == "uniform":
    return _uniform_logsnr_fn(logsnr_fn)(jax.random.uniform(key, (batch,)))
  return -2 * (mean + std * jax.random.normal(key, (batch,)))


def logsnr_above_probability(boundary, sampler: str, logsnr_fn=None, mean: float = 0.0, std: float = 1.0):
  """P(logsnr > boundary) under sample_logsnr's distribution (a scalar)."""
  _check(sampler, TIME_SAMPLERS, "timestep sampler")
  if sampler == "uniform":
    return _crossing(_uniform_logsnr_fn(logsnr_fn), boundary)  # t below it: log-SNR above the boundary
  return jax.scipy.stats.norm.cdf(_normal_crossing(boundary, mean, std))


def sample_logsnr_on_side(key, batch: int, boundary, above: bool, sampler: str, logsnr_fn=None, mean: float = 0.0,
                          std: float = 1.0):
  """Draw training log-SNRs [batch] from sample_logsnr's distribution restricted to those above `boundary` (above
  True) or at or below it. With the side drawn with its probability (logsnr_above_probability), each log-SNR is
  distributed as sample_logsnr's while a batch spans one side (a pair of experts split there runs one)."""
  _check(sampler, TIME_SAMPLERS, "timestep sampler")
  if sampler == "uniform":
    logsnr_fn = _uniform_logsnr_fn(logsnr_fn)
    crossing, u = _crossing(logsnr_fn, boundary), jax.random.uniform(key, (batch,))
    return logsnr_fn(crossing * u if above else crossing + (1 - crossing) * u)
  crossing = _normal_crossing(boundary, mean, std)  # z below it: log-SNR above the boundary
  lower, upper = (-jnp.inf, crossing) if above else (crossing, jnp.inf)
  return -2 * (mean + std * jax.random.truncated_normal(key, lower, upper, (batch,)))


def _uniform_logsnr_fn(logsnr_fn):
  if logsnr_fn is None:
    raise ValueError("timestep sampler 'uniform' needs the noise schedule's logsnr_fn.")
  return logsnr_fn


def _normal_crossing(boundary, mean, std):
  """The standard normal z where the log-normal and logit-normal samplers' logsnr = -2 (mean + std z) is boundary."""
  return (-boundary / 2 - mean) / std


def _crossing(logsnr_fn, logsnr, iterations: int = 40):
  """The t in [0, 1] where the decreasing logsnr_fn(t) crosses `logsnr` (bisection)."""
  def halve(_, bounds):
    low, high = bounds
    middle = (low + high) / 2
    above = logsnr_fn(middle) > logsnr
    return jnp.where(above, middle, low), jnp.where(above, high, middle)

  low, high = jax.lax.fori_loop(0, iterations, halve, (jnp.float32(0.0), jnp.float32(1.0)))
  return (low + high) / 2


# ----------------------------------------------------------------------------- classifier-free guidance


def drop_condition(key, embeddings, mask, drop_prob: float, null=None):
  """Replace the text condition by the null one with probability p: `null` (embeddings, mask) like the inputs
  (the model's null_condition), default zeros with an all-padding mask.

  embeddings: [batch, tokens, dim]; mask: [batch, tokens] bool. Returns (embeddings, mask, kept[batch]).
  """
  if not 0.0 <= drop_prob <= 1.0:
    raise ValueError(f"condition drop probability must be in [0, 1], got {drop_prob}.")
  kept = jax.random.uniform(key, (embeddings.shape[0],)) >= drop_prob
  null_embeddings, null_mask = null if null is not None else (0, False)
  return (
      jnp.where(kept[:, None, None], embeddings, null_embeddings),
      jnp.where(kept[:, None], mask, null_mask),
      kept,
  )
