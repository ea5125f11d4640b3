"""The reverse process: samplers, classifier-free guidance and thresholding, as pure functions.

A *denoiser* is `denoise_fn(x, alpha, sigma) -> x0_hat` with x: [batch, ...] and alpha, sigma: [batch].
A sampling *grid* is two arrays alpha, sigma of shape [steps + 1], noisiest first; the last entry is
usually clean (sigma = 0). Every sampler is one `lax.scan` over the grid, so the whole reverse process
compiles to one program.
"""

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import objectives

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "euler", "heun", "flow_euler", "unipc")
THRESHOLDS = ("none", "static", "dynamic")


def _logsnr(alpha, sigma):
  return 2 * (jnp.log(alpha) - jnp.log(sigma))


# ----------------------------------------------------------------------------- single steps
# Each step moves x from noise level (a_t, s_t) to (a_s, s_s) given x0 = denoise(x, a_t, s_t).


def ddim_step(x, x0, a_t, s_t, a_s, s_s, eta, noise):
  """DDIM (Song et al. 2021); eta = 1 is DDPM's ancestral step with the 'fixed_small' variance."""
  eps = (x - a_t * x0) / s_t
  # c^2 = s_s^2 (1 - snr_t / snr_s); zero at the clean end (s_s = 0).
  c = eta * s_s * jnp.sqrt(-jnp.expm1(jnp.minimum(_logsnr(a_t, s_t) - _logsnr(a_s, s_s), 0.0)))
  return a_s * x0 + jnp.sqrt(jnp.maximum(s_s**2 - c**2, 0.0)) * eps + c * noise


def dpmpp_2m_step(x, x0, x0_prev, h_prev, a_t, s_t, a_s, s_s, second_order):
  """DPM-Solver++(2M) (Lu et al. 2022), midpoint form; first order where `second_order` is False."""
  h = (_logsnr(a_s, s_s) - _logsnr(a_t, s_t)) / 2
  inv_2r = jnp.where(second_order, h / (2 * h_prev), 0.0)
  inv_2r = jnp.where(jnp.isfinite(inv_2r), inv_2r, 0.0)
  d = (1 + inv_2r) * x0 - inv_2r * x0_prev
  ratio = jnp.where(s_s > 0, s_s / s_t, 0.0)
  return ratio * x - a_s * jnp.expm1(-h) * d, h


def unipc_step(x, x0, x0_prev, a_s, s_s, s_t, half_logsnrs, second_order):
  """UniPC's predictor (Zhao et al. 2023; UniP-2 with B(h) = e^-h - 1, 'bh2', predicting x0 as diffusers'
  UniPCMultistepScheduler does): x at level t with its clean estimate x0, the previous level's x0_prev, to level
  s. half_logsnrs: (lambda_s, lambda_t, lambda_prev), log(alpha / sigma) of the three levels. First order (a DDIM
  step) where `second_order` is False."""
  lambda_s, lambda_t, lambda_prev = half_logsnrs
  h = lambda_s - lambda_t
  h_phi_1 = jnp.expm1(-h)
  x_s = jnp.where(s_s > 0, s_s / s_t, 0.0) * x - a_s * h_phi_1 * x0
  slope = (x0_prev - x0) / ((lambda_prev - lambda_t) / h)  # D1 / r1
  return jnp.where(second_order, x_s - a_s * h_phi_1 * 0.5 * slope, x_s)


def unipc_corrected(x_prev, x0_prev, x0_prev2, x0, a_t, s_t, s_prev, half_logsnrs, second_order):
  """UniPC's corrector (UniC; 'bh2'): the sample at level t recomputed from the previous level's (corrected)
  sample x_prev and clean estimates (x0_prev, and the level before's x0_prev2) with the clean estimate x0 that the
  network made at level t, at no extra evaluation. half_logsnrs: (lambda_t, lambda_prev, lambda_prev2). First
  order (UniC-1) where `second_order` is False."""
  lambda_t, lambda_prev, lambda_prev2 = half_logsnrs
  h = lambda_t - lambda_prev
  h_phi_1 = jnp.expm1(-h)  # also B(h)
  phi_2 = h_phi_1 / -h - 1
  b1, b2 = phi_2 / h_phi_1, (phi_2 / -h - 0.5) * 2 / h_phi_1
  x_t = s_t / s_prev * x_prev - a_t * h_phi_1 * x0_prev
  first = x_t - a_t * h_phi_1 * 0.5 * (x0 - x0_prev)
  r1 = (lambda_prev2 - lambda_prev) / h
  rho1 = (b1 - b2) / (1 - r1)  # [[1, 1], [r1, 1]] (rho1, rho2) = (b1, b2)
  second = x_t - a_t * h_phi_1 * (rho1 * (x0_prev2 - x0_prev) / r1 + (b1 - rho1) * (x0 - x0_prev))
  return jnp.where(second_order, second, first)


def euler_step(x, x0, a_t, s_t, a_s, s_s):
  """Euler in EDM's sigma-space y = x / alpha, sigma_edm = sigma / alpha (Karras et al. 2022)."""
  y, sig_t, sig_s = x / a_t, s_t / a_t, s_s / a_s
  return a_s * (y + (sig_s - sig_t) * (y - x0) / sig_t)


def flow_euler_step(x, x0, s_t, s_s):
  """Euler on the rectified-flow ODE dx/dt = eps - x0 with t = sigma (path alpha = 1 - t)."""
  return x + (s_s - s_t) * (x - x0) / s_t


# ----------------------------------------------------------------------------- samplers


def sample(denoise_fn, x_init, alpha, sigma, sampler: str = "ddim", key=None, eta: float = 0.0,
           return_trajectory: bool = False, on_step=None):
  """Run the reverse process from x_init (already at noise level alpha[0], sigma[0]).

  x_init: [batch, ...] (images or videos). alpha, sigma: [steps + 1]. `key` is needed by the
  stochastic samplers (ddpm; ddim with eta > 0): one key for the batch, or one per example (typed keys
  [batch] or raw uint32 [batch, 2]), which makes each example's noise its own whatever batch it is sampled
  in. Returns x at the last noise level, or with return_trajectory the states after every step
  [steps, batch, ...]. on_step(step index) is called on the host as each step starts (progress reporting;
  it cannot change the result).
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"Unknown sampler {sampler!r}; valid samplers: {list(SAMPLERS)}.")
  if alpha.shape[0] < 2:
    raise ValueError("a sampling grid needs steps >= 1 (at least 2 noise levels).")
  if sampler == "ddpm":
    eta = 1.0
  if key is None:
    key = jax.random.key(0)
  steps = alpha.shape[0] - 1
  levels = (alpha[:-1], sigma[:-1], alpha[1:], sigma[1:])
  earlier = lambda a, k: jnp.concatenate([jnp.repeat(a[:1], k), a[:max(steps - k, 0)]])[:steps]  # a[n - k]
  half_logsnr = jnp.log(alpha) - jnp.log(sigma)
  history = (earlier(sigma, 1), half_logsnr[:-1], half_logsnr[1:], earlier(half_logsnr, 1), earlier(half_logsnr, 2))
  typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  per_example = key.ndim == (1 if typed else 2)
  if per_example:  # [steps, batch] keys: example i's noise at every step comes from its own key
    keys = jnp.moveaxis(jax.vmap(lambda k: jax.random.split(k, steps))(key), 0, 1)
  else:
    keys = jax.random.split(key, steps)

  def step_noise(step_key, x):
    if per_example:
      return jax.vmap(lambda k, example: jax.random.normal(k, example.shape, example.dtype))(step_key, x)
    return jax.random.normal(step_key, x.shape, x.dtype)

  def body(carry, inputs):
    x, x0_prev, h_prev, n, unipc = carry
    (a_t, s_t, a_s, s_s), step_key, (s_prev, lambda_t, lambda_s, lambda_prev, lambda_prev2) = inputs
    if on_step is not None:
      jax.debug.callback(on_step, n)
    x0 = denoise_fn(x, jnp.full(x.shape[:1], a_t), jnp.full(x.shape[:1], s_t))
    if sampler == "unipc":  # order 2 but at the first and last steps, as diffusers' lower_order_final
      x_prev, x0_prev2 = unipc
      corrected = unipc_corrected(x_prev, x0_prev, x0_prev2, x0, a_t, s_t, s_prev,
                                  (lambda_t, lambda_prev, lambda_prev2), second_order=n > 1)
      x = jnp.where(n > 0, corrected, x)
      unipc = (x, x0_prev)
      x = unipc_step(x, x0, x0_prev, a_s, s_s, s_t, (lambda_s, lambda_t, lambda_prev),
                     second_order=(n > 0) & (n < steps - 1))
    elif sampler in ("ddpm", "ddim"):
      noise = step_noise(step_key, x) if eta else jnp.zeros_like(x)
      x = ddim_step(x, x0, a_t, s_t, a_s, s_s, eta, noise)
    elif sampler == "dpmpp_2m":
      x, h_prev = dpmpp_2m_step(x, x0, x0_prev, h_prev, a_t, s_t, a_s, s_s,
                                second_order=(n > 0) & (s_s > 0))
    elif sampler == "euler":
      x = euler_step(x, x0, a_t, s_t, a_s, s_s)
    elif sampler == "flow_euler":
      x = flow_euler_step(x, x0, s_t, s_s)
    else:  # heun: Euler predictor, trapezoidal corrector unless the target is clean
      x_euler = euler_step(x, x0, a_t, s_t, a_s, s_s)

      def correct(x_euler):
        x0_next = denoise_fn(x_euler, jnp.full(x.shape[:1], a_s), jnp.full(x.shape[:1], s_s))
        y, sig_t, sig_s = x / a_t, s_t / a_t, s_s / a_s
        slope = ((y - x0) / sig_t + (x_euler / a_s - x0_next) / sig_s) / 2
        return a_s * (y + (sig_s - sig_t) * slope)

      x = jax.lax.cond(s_s > 0, correct, lambda x_euler: x_euler, x_euler)
    return (x, x0, h_prev, n + 1, unipc), (x if return_trajectory else None)

  unipc = (x_init, jnp.zeros_like(x_init)) if sampler == "unipc" else ()  # the corrector's sample and x0 before
  carry = (x_init, jnp.zeros_like(x_init), jnp.ones((), x_init.dtype), jnp.zeros((), jnp.int32), unipc)
  (x, *_), trajectory = jax.lax.scan(body, carry, (levels, keys, history))
  return trajectory if return_trajectory else x


# ----------------------------------------------------------------------------- guidance and thresholding


def guided_prediction(cond, uncond, guidance_scale: float, guidance_rescale: float = 0.0):
  """Classifier-free guidance: uncond + w (cond - uncond), optionally rescaled (Lin et al. 2023).

  With guidance_rescale = phi the result's per-example std is pulled toward cond's std.
  """
  guided = uncond + guidance_scale * (cond - uncond)
  if guidance_rescale:
    axes = tuple(range(1, cond.ndim))
    rescaled = guided * jnp.std(cond, axis=axes, keepdims=True) / jnp.std(guided, axis=axes, keepdims=True)
    guided = guidance_rescale * rescaled + (1 - guidance_rescale) * guided
  return guided


def parse_guidance_interval(text: str, prefix: str = "") -> tuple:
  """"LOW:HIGH" -> (low, high); "none" or "" -> () (guidance at every step). The ValueError for anything else, or
  for an interval guidance_interval_problem refuses, starts with `prefix` (e.g. "--guidance_interval=")."""
  if text.strip().lower() in ("", "none"):
    return ()
  try:
    low, high = (float(part) for part in text.split(":"))
  except ValueError:
    raise ValueError(f"{prefix}{text!r} is not LOW:HIGH (noise levels sigma/alpha, e.g. 0.28:5.42) or none") from None
  if problem := guidance_interval_problem((low, high)):
    raise ValueError(f"{prefix}{text!r}: {problem}")
  return (low, high)


def guidance_interval_problem(interval) -> str | None:
  """Why `interval` is not () or (low, high) with 0 <= low < high, or None when it is fine."""
  if len(interval) == 0:
    return None
  if len(interval) != 2 or not 0 <= interval[0] < interval[1]:
    return f"{tuple(interval)} must be () or (low, high) noise levels sigma/alpha with 0 <= low < high"
  return None


def in_guidance_interval(alpha, sigma, interval):
  """[batch] bool: whether guidance acts at the noise levels alpha, sigma [batch]: low < sigma / alpha <= high for
  interval (low, high) (Kynkäänniemi et al. 2024; sigma / alpha = exp(-logsnr / 2) is EDM's noise level, on either
  diffusion path)."""
  level = sigma / alpha
  return (level > interval[0]) & (level <= interval[1])


def skip_layer_steps(steps: int, start: float, stop: float) -> list[int]:
  """The steps of a grid of `steps` skip-layer guidance acts at: i where steps x start < i < steps x stop (SD3's
  pipelines')."""
  return [i for i in range(steps) if steps * start < i < steps * stop]


def skip_layer_window(logsnr_grid, start: float, stop: float) -> tuple | None:
  """(lowest, highest) log-SNR of the steps skip-layer guidance acts at (skip_layer_steps) on a grid [steps + 1]
  (noisiest first), each bound halfway to the next step's outside; None where no step is inside."""
  grid = np.asarray(logsnr_grid, np.float64)
  inside = skip_layer_steps(len(grid) - 1, start, stop)
  if not inside:
    return None
  first, last = inside[0], inside[-1]
  return (grid[first - 1] + grid[first]) / 2, (grid[last] + grid[last + 1]) / 2


def switched_at(high_noise_fn, low_noise_fn, boundary_logsnr):
  """A denoiser (x, alpha, sigma) -> x0 that is low_noise_fn where an example's log-SNR is above boundary_logsnr and
  high_noise_fn elsewhere (a pair of experts' two guidance scales): one of them runs when the batch is at one noise
  level, as a sampler's is."""

  def denoise(x, alpha, sigma):
    run = lambda fn: lambda: fn(x, alpha, sigma)
    return objectives.per_example_switch(_logsnr(alpha, sigma) > boundary_logsnr, run(low_noise_fn),
                                         run(high_noise_fn))

  return denoise


def threshold_x0(x0, kind: str = "none", percentile: float = 99.5):
  """static: clip to [-1, 1]; dynamic (Imagen): s = max(1, percentile of |x0|) per example,
  clip to [-s, s] and divide by s."""
  if kind == "none":
    return x0
  if kind == "static":
    return jnp.clip(x0, -1.0, 1.0)
  if kind == "dynamic":
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))
    s = jnp.maximum(jnp.percentile(flat, percentile, axis=1), 1.0)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.clip(x0, -s, s) / s
  raise ValueError(f"Unknown thresholding {kind!r}; valid options: {list(THRESHOLDS)}.")


def make_denoiser(network_fn, prediction: str, guidance_scale: float = 1.0, guidance_rescale: float = 0.0,
                  threshold: str = "none", threshold_percentile: float = 99.5, sigma_data: float = 0.5,
                  guidance_interval=(), skip_layer_guidance=None):
  """Wrap a network into a guided, thresholded denoiser.

  network_fn(x, logsnr, conditional: bool) -> output in the `prediction` parameterisation, where
  conditional=False means the empty (null) text condition. Guidance combines the two outputs in
  eps space, which equals combining them in any linear parameterisation. guidance_interval: (low, high) noise
  levels sigma/alpha outside which a step is unguided (in_guidance_interval), the unconditional pass skipped
  when no example of the batch is inside; () guides every step. skip_layer_guidance: (skipped_fn(x, logsnr) ->
  output with some of the network's layers left out, for the conditional text; scale; (lowest, highest) log-SNR,
  skip_layer_window): SD3's skip-layer guidance, scale x (conditional - skipped) added to the guided output where an
  example's log-SNR is in that window (its pass skipped when none is); only where classifier-free guidance acts.
  """
  if not guidance_scale >= 0:  # (NaN too)
    raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}.")
  guidance_interval = tuple(guidance_interval)
  if problem := guidance_interval_problem(guidance_interval):
    raise ValueError(f"guidance_interval {problem}.")
  if threshold not in THRESHOLDS:
    raise ValueError(f"Unknown thresholding {threshold!r}; valid options: {list(THRESHOLDS)}.")
  if not 0 < threshold_percentile <= 100:
    raise ValueError(f"threshold_percentile must be in (0, 100], got {threshold_percentile}.")

  def eps_of(output, x, alpha, sigma):
    x0 = objectives.x0_from_prediction(prediction, output, x, alpha, sigma, sigma_data)
    return objectives.eps_from_x0(x0, x, alpha, sigma)

  def denoise(x, alpha, sigma):
    logsnr = _logsnr(alpha, sigma)
    x_in = x * objectives.per_example(objectives.network_input_scale(prediction, alpha, sigma, sigma_data), x)
    cond = network_fn(x_in, logsnr, True)
    unguided = lambda: objectives.x0_from_prediction(prediction, cond, x, alpha, sigma, sigma_data)

    def guided():
      uncond = network_fn(x_in, logsnr, False)
      cond_eps = eps_of(cond, x, alpha, sigma)
      eps = guided_prediction(cond_eps, eps_of(uncond, x, alpha, sigma), guidance_scale, guidance_rescale)
      if skip_layer_guidance:
        skipped_fn, scale, (lowest, highest) = skip_layer_guidance
        applies = objectives.per_example((logsnr >= lowest) & (logsnr <= highest), x)
        away_from_skipped = lambda: jnp.where(applies, scale * (cond_eps - eps_of(skipped_fn(x_in, logsnr), x, alpha,
                                                                                   sigma)), 0.0)
        eps = eps + jax.lax.cond(jnp.any(applies), away_from_skipped, lambda: jnp.zeros_like(eps))
      return (x - objectives.per_example(sigma, x) * eps) / objectives.per_example(alpha, x)

    if guidance_scale == 1.0:
      x0 = unguided()
    elif not guidance_interval:
      x0 = guided()
    else:  # the unconditional pass only when some example of the batch is inside the interval
      applies = in_guidance_interval(alpha, sigma, guidance_interval)
      x0 = jax.lax.cond(jnp.any(applies), lambda: jnp.where(objectives.per_example(applies, x), guided(), unguided()),
                        unguided)
    return threshold_x0(x0, threshold, threshold_percentile)

  return denoise
