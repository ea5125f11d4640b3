"""Noise schedules, expressed through the log signal-to-noise ratio.

A noise level is described by `logsnr = log(alpha^2 / sigma^2)` where the noisy sample is
`x_t = alpha * x0 + sigma * eps`. Two *paths* map a log-SNR to (alpha, sigma):

- `vp` (variance preserving, DDPM/Imagen): alpha^2 + sigma^2 = 1.
- `flow` (rectified flow): alpha = 1 - t, sigma = t.

Continuous schedules map time t in [0, 1] (0 = clean, 1 = noise) to log-SNR. Discrete DDPM
tables (betas, alphas_cumprod) are host-side numpy constants, as in the papers' code.
"""

import functools
import inspect
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------- conversions


def alpha_sigma_from_logsnr(logsnr, path: str = "vp"):
  """(alpha, sigma) of a log-SNR on the given path. logsnr may be +-inf."""
  if path == "vp":
    return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))
  if path == "flow":
    t = jax.nn.sigmoid(-logsnr / 2)
    return 1 - t, t
  raise ValueError(f"Unknown path {path!r}; valid paths: 'vp', 'flow'.")


def logsnr_from_alpha_sigma(alpha, sigma):
  return 2 * (jnp.log(alpha) - jnp.log(sigma))


def edm_sigma_from_logsnr(logsnr):
  """EDM's sigma (noise std of x_t / alpha): sigma_edm = exp(-logsnr / 2)."""
  return jnp.exp(-logsnr / 2)


def logsnr_from_edm_sigma(edm_sigma):
  return -2 * jnp.log(edm_sigma)


def alphas_cumprod_from_betas(betas: np.ndarray) -> np.ndarray:
  return np.cumprod(1.0 - np.asarray(betas, np.float64))


def betas_from_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
  alphas_cumprod = np.asarray(alphas_cumprod, np.float64)
  alphas = alphas_cumprod / np.concatenate([[1.0], alphas_cumprod[:-1]])
  return 1.0 - alphas


def logsnr_from_alphas_cumprod(alphas_cumprod):
  """alphas_cumprod = alpha^2 on the VP path, so logsnr = log(ac / (1 - ac))."""
  return np.log(alphas_cumprod) - np.log1p(-np.asarray(alphas_cumprod))


# ----------------------------------------------------------------------------- discrete tables


def _linear_betas(num_train_timesteps, beta_start=1e-4, beta_end=2e-2):
  return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)


def _scaled_linear_betas(num_train_timesteps, beta_start=0.00085, beta_end=0.012):
  return np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2


def _squaredcos_cap_v2_betas(num_train_timesteps, max_beta=0.999):
  def alpha_bar(t):
    return np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2

  steps = np.arange(num_train_timesteps, dtype=np.float64)
  ratio = alpha_bar((steps + 1) / num_train_timesteps) / alpha_bar(steps / num_train_timesteps)
  return np.minimum(1 - ratio, max_beta)


DISCRETE_BETAS = {
    "linear": _linear_betas,
    "scaled_linear": _scaled_linear_betas,
    "squaredcos_cap_v2": _squaredcos_cap_v2_betas,
}


def _lookup(table: dict, kind: str, name: str, params: dict) -> Callable:
  if name not in table:
    raise ValueError(f"Unknown {kind} {name!r}; valid options: {sorted(table)}.")
  fn = table[name]
  allowed = [p for p in inspect.signature(fn).parameters][1:]
  unknown = sorted(set(params) - set(allowed))
  if unknown:
    raise ValueError(f"{kind} {name!r} got unknown parameters {unknown}; valid parameters: {allowed}.")
  return fn


def betas(name: str, num_train_timesteps: int = 1000, **params) -> np.ndarray:
  """Discrete DDPM betas [num_train_timesteps] for 'linear', 'scaled_linear' or 'squaredcos_cap_v2'."""
  fn = _lookup(DISCRETE_BETAS, "beta schedule", name, params)
  if num_train_timesteps < 1:
    raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}.")
  result = fn(num_train_timesteps, **params)
  if not np.all((result > 0) & (result < 1)):
    raise ValueError(f"beta schedule {name!r} with {params} gives betas outside (0, 1).")
  return result


def rescale_zero_terminal_snr(betas_: np.ndarray) -> np.ndarray:
  """Lin et al. 2023: shift and scale sqrt(alphas_cumprod) so the last step has SNR exactly 0."""
  sqrt_ac = np.sqrt(alphas_cumprod_from_betas(betas_))
  first, last = sqrt_ac[0], sqrt_ac[-1]
  sqrt_ac = (sqrt_ac - last) * first / (first - last)
  return betas_from_alphas_cumprod(sqrt_ac**2)


# ----------------------------------------------------------------------------- continuous schedules
# Each maps t in [0, 1] (array) to logsnr; 0 is the clean end.


def _cosine(t, logsnr_min=-15.0, logsnr_max=15.0):
  t_min = np.arctan(np.exp(-0.5 * logsnr_max))
  t_max = np.arctan(np.exp(-0.5 * logsnr_min))
  return -2 * jnp.log(jnp.tan(t_min + t * (t_max - t_min)))


def _shifted_cosine(t, resolution=64, base_resolution=64, logsnr_min=-15.0, logsnr_max=15.0):
  """simple diffusion (Hoogeboom et al. 2023): larger images need more noise, shift by 2 log(base/res)."""
  shift = 2 * np.log(base_resolution / resolution)
  return _cosine(t, logsnr_min - shift, logsnr_max - shift) + shift


def _interpolated_shifted_cosine(t, resolution=64, base_resolution=64, logsnr_min=-15.0, logsnr_max=15.0):
  """simple diffusion's interpolated schedule: t-weighted mix of the cosine shifted for `resolution`
  (dominant at high noise, t -> 1: where the global layout is decided) and the unshifted one (dominant at
  low noise, t -> 0: where details are drawn, as at base_resolution)."""
  shifted = _shifted_cosine(t, resolution, base_resolution, logsnr_min, logsnr_max)
  return t * shifted + (1 - t) * _cosine(t, logsnr_min, logsnr_max)


def _vp_integral_logsnr(integral, beta_start):
  """logsnr for alphas_cumprod = exp(-integral of beta), saturating at the first discrete step."""
  return -jnp.log(jnp.expm1(jnp.maximum(integral, beta_start)))


def _linear(t, beta_start=1e-4, beta_end=2e-2, num_train_timesteps=1000):
  """Continuous limit of the linear-beta DDPM table (VP-SDE)."""
  b0, b1 = beta_start * num_train_timesteps, beta_end * num_train_timesteps
  return _vp_integral_logsnr(b0 * t + 0.5 * (b1 - b0) * t**2, beta_start)


def _scaled_linear(t, beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000):
  """Continuous limit of Stable Diffusion's table: sqrt(beta) linear in t."""
  a, b = np.sqrt(beta_start), np.sqrt(beta_end)
  integral = ((a + (b - a) * t) ** 3 - a**3) / (3 * (b - a)) * num_train_timesteps
  return _vp_integral_logsnr(integral, beta_start)


def _edm(t, sigma_min=0.002, sigma_max=80.0, rho=7.0):
  """Karras et al. 2022: sigma(t)^(1/rho) linear in t between sigma_min and sigma_max."""
  edm_sigma = (sigma_min ** (1 / rho) + t * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho
  return logsnr_from_edm_sigma(edm_sigma)


def _flow(t, t_min=1e-5, shift=1.0):
  """Rectified flow: alpha = 1 - t, sigma = t, so logsnr = 2 log((1 - t) / t); with `shift` s, the time-shifted
  sigma = s t / (1 + (s - 1) t) of SD3 and Wan (their sampling shift; s > 1 spends more steps at high noise), which
  is the log-SNR lowered by 2 log s."""
  t = jnp.clip(t, t_min, 1 - t_min)
  return 2 * (jnp.log1p(-t) - jnp.log(t)) - 2 * math.log(shift)


def resolution_flow_shift(tokens: int, base_tokens=256, max_tokens=4096, base_shift=0.5, max_shift=1.15) -> float:
  """The flow time shift e^mu for images of `tokens` tokens, mu interpolated linearly in the token count from
  base_shift at base_tokens to max_shift at max_tokens (Flux's dynamic shift: diffusers' calculate_shift with its
  scheduler's base_image_seq_len, max_image_seq_len, base_shift, max_shift; their exponential time shift
  e^mu / (e^mu + 1 / t - 1) is `_flow`'s with shift e^mu)."""
  slope = (max_shift - base_shift) / (max_tokens - base_tokens)
  return math.exp(base_shift + slope * (tokens - base_tokens))


CONTINUOUS_SCHEDULES = {
    "cosine": _cosine,
    "shifted_cosine": _shifted_cosine,
    "interpolated_shifted_cosine": _interpolated_shifted_cosine,
    "linear": _linear,
    "scaled_linear": _scaled_linear,
    "edm": _edm,
    "flow": _flow,
}


def logsnr_schedule(name: str, **params) -> Callable:
  """The function t -> logsnr of a named continuous schedule with its parameters bound."""
  fn = _lookup(CONTINUOUS_SCHEDULES, "noise schedule", name, params)
  if name == "flow" and not params.get("shift", 1.0) > 0:
    raise ValueError(f"flow schedule needs shift > 0, got {params}.")
  if name == "edm" and not 0 < params.get("sigma_min", 0.002) < params.get("sigma_max", 80.0):
    raise ValueError(f"edm schedule needs 0 < sigma_min < sigma_max, got {params}.")
  if "logsnr_min" in params or "logsnr_max" in params:
    if not params.get("logsnr_min", -15.0) < params.get("logsnr_max", 15.0):
      raise ValueError(f"noise schedule {name!r} needs logsnr_min < logsnr_max, got {params}.")
  return functools.partial(fn, **params)


# ----------------------------------------------------------------------------- inference grids


def karras_edm_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
  """Karras sigmas [num_steps], from sigma_max down to sigma_min."""
  ramp = np.linspace(0, 1, num_steps)
  lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
  return (hi + ramp * (lo - hi)) ** rho


SPACINGS = ("leading", "trailing", "linspace")


def discrete_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = "leading",
                       steps_offset: int = 0) -> np.ndarray:
  """Descending timesteps [num_steps] in the conventions of DDPM-style codebases (float)."""
  if num_steps < 1:
    raise ValueError(f"steps must be >= 1, got {num_steps}.")
  if num_steps > num_train_timesteps:
    raise ValueError(f"steps ({num_steps}) cannot exceed num_train_timesteps ({num_train_timesteps}).")
  if spacing == "leading":
    ratio = num_train_timesteps // num_steps
    return (np.arange(num_steps) * ratio).round()[::-1].astype(np.float64) + steps_offset
  if spacing == "trailing":
    ratio = num_train_timesteps / num_steps
    return np.arange(num_train_timesteps, 0, -ratio).round().astype(np.float64) - 1
  if spacing == "linspace":
    return np.linspace(0, num_train_timesteps - 1, num_steps)[::-1].copy()
  raise ValueError(f"Unknown timestep spacing {spacing!r}; valid options: {list(SPACINGS)}.")


def logsnr_at_timesteps(alphas_cumprod: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
  """log-SNR at (possibly fractional) timesteps, interpolating linearly in EDM sigma."""
  edm_sigmas = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)
  return -2 * np.log(np.interp(timesteps, np.arange(len(alphas_cumprod)), edm_sigmas))


def discrete_logsnr_grid(alphas_cumprod: np.ndarray, num_steps: int, spacing: str = "leading",
                         final: str = "clean") -> np.ndarray:
  """Sampling grid [num_steps + 1] of log-SNRs, noisiest first.

  `final`: 'clean' ends at logsnr = +inf (alpha = 1, DDIM's set_alpha_to_one), 'first' ends at the
  first training timestep's log-SNR.
  """
  timesteps = discrete_timesteps(len(alphas_cumprod), num_steps, spacing)
  grid = logsnr_at_timesteps(alphas_cumprod, timesteps)
  if final == "clean":
    last = np.inf
  elif final == "first":
    last = logsnr_from_alphas_cumprod(alphas_cumprod[0])
  else:
    raise ValueError(f"Unknown final noise level {final!r}; valid options: ['clean', 'first'].")
  return np.concatenate([grid, [last]])


def continuous_logsnr_grid(logsnr_fn: Callable, num_steps: int, t_max: float = 1.0) -> jnp.ndarray:
  """Sampling grid [num_steps + 1]: logsnr_fn at t uniformly from t_max down to 0, then clean (+inf)."""
  if num_steps < 1:
    raise ValueError(f"steps must be >= 1, got {num_steps}.")
  t = jnp.linspace(t_max, 0.0, num_steps + 1)[:-1]
  return jnp.concatenate([logsnr_fn(t), jnp.array([jnp.inf], logsnr_fn(t).dtype)])
