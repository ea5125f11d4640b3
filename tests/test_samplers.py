"""Samplers against diffusers' PyTorch schedulers (step by step) and against exact Gaussian denoisers."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from diffusion_jax import objectives, samplers, schedules

STEPS = 12
SHAPE = (4, 6)
MEAN = np.linspace(-0.5, 0.5, SHAPE[1])
STD = np.linspace(0.3, 0.9, SHAPE[1])


def exact_x0(x, alpha, sigma, mean=MEAN, std=STD):
  """E[x0 | x_t] for x0 ~ N(mean, diag(std^2)) and x_t = alpha x0 + sigma eps (any scaling)."""
  alpha, sigma = alpha.reshape(-1, 1), sigma.reshape(-1, 1)
  gain = alpha * std**2 / (alpha**2 * std**2 + sigma**2)
  return mean + gain * (x - alpha * mean)


def rel_err(ours, theirs):
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  return np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs))


def run_diffusers(scheduler, vp_alpha_sigma_of, generator_seed=None):
  """Run a diffusers loop with the exact Gaussian eps-model; return the states after each step.

  vp_alpha_sigma_of(i, t) gives the VP (alpha, sigma) of the model input at loop index i.
  """
  torch.manual_seed(0)
  x = torch.randn(SHAPE, dtype=torch.float64) * scheduler.init_noise_sigma
  x_init = x.clone()
  states = []
  for i, t in enumerate(scheduler.timesteps):
    x_in = scheduler.scale_model_input(x, t)
    alpha, sigma = vp_alpha_sigma_of(i, t)
    x0 = exact_x0(x_in.numpy(), np.array([alpha]), np.array([sigma]))
    eps = (x_in.numpy() - alpha * x0) / sigma
    kwargs = {} if generator_seed is None else {"generator": torch.Generator().manual_seed(generator_seed + i)}
    x = scheduler.step(torch.from_numpy(eps), t, x, **kwargs).prev_sample
    states.append(x.numpy().copy())
  return x_init.numpy(), states


def exact_denoiser(x, alpha, sigma):
  return exact_x0(x, alpha, sigma)


def our_trajectory(logsnr, x_init, sampler, key=None):
  alpha, sigma = schedules.alpha_sigma_from_logsnr(jnp.asarray(logsnr))
  with jax.enable_x64(True):
    alpha, sigma = schedules.alpha_sigma_from_logsnr(jnp.asarray(logsnr, jnp.float64))
    fn = jax.jit(lambda x: samplers.sample(exact_denoiser, x, alpha, sigma, sampler, key=key,
                                           return_trajectory=True))
    return np.asarray(fn(jnp.asarray(x_init)))


def ac_logsnr(scheduler, t):
  ac = scheduler.alphas_cumprod.double().numpy()
  return schedules.logsnr_from_alphas_cumprod(ac[int(t)]) if t >= 0 else np.inf


def vp_from_ac(scheduler):
  ac = scheduler.alphas_cumprod.double().numpy()
  return lambda i, t: (np.sqrt(ac[int(t)]), np.sqrt(1 - ac[int(t)]))


def vp_from_edm_sigmas(scheduler):
  edm = scheduler.sigmas.double().numpy()
  return lambda i, t: (1 / np.sqrt(1 + edm[i] ** 2), edm[i] / np.sqrt(1 + edm[i] ** 2))


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_ddim_matches_diffusers_step_by_step(beta_schedule):
  scheduler = diffusers.DDIMScheduler(beta_schedule=beta_schedule, clip_sample=False, set_alpha_to_one=True)
  scheduler.set_timesteps(STEPS)
  x_init, states = run_diffusers(scheduler, vp_from_ac(scheduler))
  grid = [ac_logsnr(scheduler, t) for t in scheduler.timesteps] + [np.inf]
  ours = our_trajectory(grid, x_init, "ddim")
  for step, (a, b) in enumerate(zip(ours, states)):
    assert rel_err(a, b) < 1e-5, f"step {step}"


def test_ddpm_matches_diffusers_step_by_step():
  scheduler = diffusers.DDPMScheduler(beta_schedule="linear", clip_sample=False)
  scheduler.set_timesteps(STEPS)
  x_init, states = run_diffusers(scheduler, vp_from_ac(scheduler), generator_seed=100)
  timesteps = [int(t) for t in scheduler.timesteps]
  grid = [ac_logsnr(scheduler, t) for t in timesteps] + [np.inf]
  alpha, sigma = schedules.alpha_sigma_from_logsnr(np.array(grid))
  # Drive our step with the very noise diffusers drew (same generator seeds).
  x = x_init
  for i, (a_t, s_t, a_s, s_s) in enumerate(zip(alpha[:-1], sigma[:-1], alpha[1:], sigma[1:])):
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + i), dtype=torch.float64).numpy()
    with jax.enable_x64(True):
      x0 = exact_x0(x, np.array([a_t]), np.array([s_t]))
      x = np.asarray(samplers.ddim_step(x, x0, a_t, s_t, a_s, s_s, 1.0, noise if i < STEPS - 1 else 0 * noise))
    assert rel_err(x, states[i]) < 1e-5, f"step {i}"


@pytest.mark.parametrize("scheduler_class, sampler", [("DPMSolverMultistepScheduler", "dpmpp_2m"),
                                                      ("UniPCMultistepScheduler", "unipc")])
def test_multistep_samplers_match_diffusers_step_by_step(scheduler_class, sampler):
  """DPM-Solver++(2M), and UniPC (order 2, bh2, its corrector at every step after the first), against diffusers'
  schedulers as Stable Diffusion's pipelines use them (epsilon prediction on the VP path)."""
  scheduler = getattr(diffusers, scheduler_class)(beta_schedule="linear")
  scheduler.set_timesteps(STEPS)
  x_init, states = run_diffusers(scheduler, vp_from_edm_sigmas(scheduler))
  grid = schedules.logsnr_from_edm_sigma(scheduler.sigmas.double().numpy())
  ours = our_trajectory(grid, x_init, sampler)
  for step, (a, b) in enumerate(zip(ours, states)):
    assert rel_err(a, b) < 1e-5, f"step {step}"


def test_unipc_on_the_flow_path_matches_wans_scheduler_step_by_step():
  """Wan's pipelines' sampler: diffusers' UniPCMultistepScheduler with flow sigmas (shifted by 5) predicting the
  velocity eps - x0, against ours on the same sigmas of the flow path x = (1 - sigma) x0 + sigma eps."""
  scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                flow_shift=5.0)
  scheduler.set_timesteps(STEPS)
  flow_sigmas = scheduler.sigmas.double().numpy()
  torch.manual_seed(0)
  x = torch.randn(SHAPE, dtype=torch.float64)
  x_init, states = x.numpy().copy(), []
  for i, t in enumerate(scheduler.timesteps):
    s = flow_sigmas[i]
    x0 = exact_x0(x.numpy(), np.array([1 - s]), np.array([s]))
    velocity = (x.numpy() - x0) / s  # eps - x0, eps = (x - (1 - s) x0) / s
    x = scheduler.step(torch.from_numpy(velocity), t, x).prev_sample
    states.append(x.numpy().copy())
  with jax.enable_x64(True):
    sigma = jnp.asarray(flow_sigmas)
    trajectory = jax.jit(lambda x: samplers.sample(exact_denoiser, x, 1 - sigma, sigma, "unipc",
                                                   return_trajectory=True))(jnp.asarray(x_init))
  for step, (a, b) in enumerate(zip(np.asarray(trajectory), states)):
    assert rel_err(a, b) < 1e-5, f"step {step}"


@pytest.mark.parametrize("karras", [False, True])
def test_euler_matches_diffusers_step_by_step(karras):
  scheduler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", use_karras_sigmas=karras)
  scheduler.set_timesteps(STEPS)
  x_init, states = run_diffusers(scheduler, vp_from_edm_sigmas(scheduler))
  edm = scheduler.sigmas.double().numpy()
  grid = schedules.logsnr_from_edm_sigma(edm)
  # diffusers keeps x in sigma-space (x / alpha); ours is on the VP path.
  vp_scale = 1 / np.sqrt(1 + edm**2)
  ours = our_trajectory(grid, x_init * vp_scale[0], "euler")
  for step, (a, b) in enumerate(zip(ours, states)):
    assert rel_err(a / vp_scale[step + 1], b) < 1e-5, f"step {step}"


def test_heun_matches_diffusers_step_by_step():
  scheduler = diffusers.HeunDiscreteScheduler(beta_schedule="linear", use_karras_sigmas=True)
  scheduler.set_timesteps(STEPS)
  x_init, states = run_diffusers(scheduler, vp_from_edm_sigmas(scheduler))
  edm = scheduler.sigmas.double().numpy()[::2]  # [s0, s1, s1, s2, s2, ..., 0] -> one per level
  edm = np.concatenate([edm, [0.0]]) if edm[-1] != 0 else edm
  grid = schedules.logsnr_from_edm_sigma(edm)
  vp_scale = 1 / np.sqrt(1 + edm**2)
  ours = our_trajectory(grid, x_init * vp_scale[0], "heun")
  # A diffusers Heun step is two scheduler calls (the last one, to sigma = 0, is a single Euler call).
  completed = states[1::2] + [states[-1]]
  for step, (a, b) in enumerate(zip(ours, completed)):
    assert rel_err(a / vp_scale[step + 1], b) < 1e-5, f"step {step}"


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_betas_match_diffusers(name):
  params = {} if name == "squaredcos_cap_v2" else {"beta_start": 0.00085, "beta_end": 0.012}
  theirs = diffusers.DDPMScheduler(beta_schedule=name, **params).betas.numpy()
  np.testing.assert_allclose(schedules.betas(name, 1000, **params), theirs, rtol=1e-5, atol=1e-7)


def test_grids_match_diffusers_timesteps():
  for cls, spacing in [(diffusers.DDIMScheduler, "leading"), (diffusers.DDIMScheduler, "trailing"),
                       (diffusers.EulerDiscreteScheduler, "linspace")]:
    scheduler = cls(beta_schedule="linear", timestep_spacing=spacing)
    scheduler.set_timesteps(STEPS)
    np.testing.assert_allclose(schedules.discrete_timesteps(1000, STEPS, spacing), scheduler.timesteps.numpy(),
                               rtol=1e-5, atol=1e-6)
  scheduler = diffusers.EulerDiscreteScheduler(beta_schedule="linear")
  scheduler.set_timesteps(STEPS)
  ac = schedules.alphas_cumprod_from_betas(schedules.betas("linear"))
  ours = schedules.edm_sigma_from_logsnr(schedules.discrete_logsnr_grid(ac, STEPS, "linspace"))
  np.testing.assert_allclose(ours, scheduler.sigmas.numpy(), rtol=1e-4)  # diffusers tables are float32


# ----------------------------------------------------------------------------- analytic data


def gaussian_sampling_error(sampler, steps, n=4096, dims=SHAPE[1], grid="cosine"):
  """|mean error| + |std error| of samples from the exact denoiser of N(MEAN, diag(STD^2))."""
  logsnr = schedules.continuous_logsnr_grid(schedules.logsnr_schedule("cosine", logsnr_min=-12, logsnr_max=12), steps)
  path = "flow" if sampler == "flow_euler" else "vp"
  alpha, sigma = schedules.alpha_sigma_from_logsnr(logsnr, path)
  key = jax.random.key(1)
  x_init = sigma[0] * jax.random.normal(key, (n, dims))
  x = jax.jit(lambda x: samplers.sample(exact_denoiser, x, alpha, sigma, sampler, key=jax.random.key(2)))(x_init)
  x = np.asarray(x)
  return np.abs(x.mean(0) - MEAN).max() + np.abs(x.std(0) - STD).max()


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_samplers_reproduce_gaussian_data(sampler):
  assert gaussian_sampling_error(sampler, 64) < 0.08


def deterministic_error(sampler, steps):
  """Distance of a sampler's endpoint to a fine-grid reference for the same starting noise."""

  def run(k):
    with jax.enable_x64(True):
      # Uniform steps in log-SNR, stopping short of clean so the ODE solution stays smooth.
      logsnr = jnp.linspace(-10.0, 10.0, k + 1)
      alpha, sigma = schedules.alpha_sigma_from_logsnr(logsnr)
      x_init = sigma[0] * jax.random.normal(jax.random.key(0), (64, SHAPE[1]), jnp.float64)
      return np.asarray(samplers.sample(exact_denoiser, x_init, alpha, sigma, sampler))

  return np.abs(run(steps) - run(2048)).max()


@pytest.mark.parametrize("sampler, order", [("ddim", 1), ("euler", 1), ("dpmpp_2m", 2), ("heun", 2), ("unipc", 3)])
def test_convergence_order(sampler, order):
  e1, e2 = deterministic_error(sampler, 32), deterministic_error(sampler, 64)
  measured = np.log2(e1 / e2)
  assert order - 0.25 < measured < order + 0.35, measured


# ----------------------------------------------------------------------------- guidance, thresholding


def test_guidance_scale_one_is_conditional_model():
  x = jax.random.normal(jax.random.key(0), (3, 4, 4, 3))
  alpha, sigma = jnp.full((3,), 0.6), jnp.full((3,), 0.8)

  def network(x, logsnr, conditional):
    return jnp.tanh(x) * (1.0 if conditional else -2.0)

  guided = samplers.make_denoiser(network, "eps", guidance_scale=1.0)(x, alpha, sigma)
  cond_only = (x - 0.8 * jnp.tanh(x)) / 0.6
  np.testing.assert_allclose(guided, cond_only, rtol=1e-5, atol=1e-6)
  scaled = samplers.make_denoiser(network, "eps", guidance_scale=3.0)(x, alpha, sigma)
  eps = -2.0 * jnp.tanh(x) + 3.0 * (3.0 * jnp.tanh(x))
  np.testing.assert_allclose(scaled, (x - 0.8 * eps) / 0.6, rtol=1e-5, atol=1e-5)


def test_guidance_interval_guides_only_the_steps_inside_it_and_skips_the_unconditional_pass_outside():
  unconditional_passes = []

  def network(x, logsnr, conditional):  # an eps prediction whose branches differ
    if not conditional:
      jax.debug.callback(lambda: unconditional_passes.append(1))
    return jnp.tanh(x) * (1.0 if conditional else -2.0)

  x = jax.random.normal(jax.random.key(0), (3, 4, 4, 3))
  logsnr = jnp.array([4.0, 0.0, -4.0])  # noise levels sigma/alpha = exp(-logsnr / 2): 0.14, 1, 7.4
  alpha, sigma = jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))
  denoiser = lambda **kw: jax.jit(samplers.make_denoiser(network, "eps", **kw))
  guided, unguided = denoiser(guidance_scale=3.0)(x, alpha, sigma), denoiser(guidance_scale=1.0)(x, alpha, sigma)
  unconditional_passes.clear()
  inside = denoiser(guidance_scale=3.0, guidance_interval=(0.5, 2.0))(x, alpha, sigma)
  np.testing.assert_allclose(inside[1], guided[1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(inside[::2], unguided[::2], rtol=1e-5, atol=1e-6)
  assert len(unconditional_passes) == 1
  outside = denoiser(guidance_scale=3.0, guidance_interval=(8.0, 20.0))(x, alpha, sigma)
  np.testing.assert_allclose(outside, unguided, rtol=1e-5, atol=1e-6)
  assert len(unconditional_passes) == 1  # no example inside: the pass is skipped
  np.testing.assert_allclose(denoiser(guidance_scale=3.0, guidance_interval=(0.0, 1e9))(x, alpha, sigma), guided,
                             rtol=1e-5, atol=1e-6)
  assert samplers.parse_guidance_interval("0.28:5.42") == (0.28, 5.42)
  assert samplers.parse_guidance_interval("none") == samplers.parse_guidance_interval("") == ()
  for bad, message in (("5:1", "0 <= low < high"), ("wide", "is not LOW:HIGH"), ("1:2:3", "is not LOW:HIGH")):
    with pytest.raises(ValueError, match=f"--guidance_interval='{bad}'.*{message}"):
      samplers.parse_guidance_interval(bad, "--guidance_interval=")
  with pytest.raises(ValueError, match="0 <= low < high"):
    samplers.make_denoiser(network, "eps", guidance_scale=3.0, guidance_interval=(1.0,))


def test_a_denoiser_switched_at_a_noise_level_gives_each_example_its_sides_and_runs_one_for_a_uniform_batch():
  """samplers.switched_at (a pair of experts' two guidance scales): log-SNR above the boundary -> the low-noise
  denoiser, at or below -> the high-noise one, per example; a batch on one side runs only that side's."""
  ran = []

  def denoiser(name, shift):
    def denoise(x, alpha, sigma):
      jax.debug.callback(lambda: ran.append(name))
      return x + shift
    return denoise

  denoise = jax.jit(samplers.switched_at(denoiser("high", 1.0), denoiser("low", -1.0), 0.0))
  x = jnp.zeros((3, 2))
  alpha = jnp.array([0.9, 0.5, 0.2])  # log-SNR 2 log(alpha / sigma): above 0, 0, below 0
  sigma = jnp.sqrt(1 - alpha ** 2).at[1].set(0.5)
  np.testing.assert_array_equal(jax.block_until_ready(denoise(x, alpha, sigma))[:, 0], [-1.0, 1.0, 1.0])
  assert sorted(ran) == ["high", "low"]
  for level, name, value in ((0.2, "high", 1.0), (0.9, "low", -1.0)):
    ran.clear()
    alpha = jnp.full(3, level)
    np.testing.assert_array_equal(jax.block_until_ready(denoise(x, alpha, jnp.sqrt(1 - alpha ** 2))), value)
    assert ran == [name]


def test_skip_layer_guidance_adds_the_conditional_minus_the_skipped_prediction_at_its_steps_only():
  """SD3's skip-layer guidance on a flow model: the guided velocity plus scale x (conditional - skipped) where an
  example's log-SNR is in the window (StableDiffusion3Pipeline's sum of predictions), the guided one elsewhere, and
  the skipped pass not run when no example is inside. The window holds the steps i of 28 with 28 x 0.01 < i < 28 x
  0.2, steps 1 to 5, as the pipeline's."""
  skipped_passes = []

  def network(x, logsnr, conditional):  # velocities whose branches differ
    return jnp.tanh(x) * (1.0 if conditional else -2.0)

  def skipped(x, logsnr):
    jax.debug.callback(lambda: skipped_passes.append(1))
    return jnp.sin(x)

  x = jax.random.normal(jax.random.key(0), (3, 4, 4, 3))
  t = jnp.array([0.2, 0.5, 0.8])
  alpha, sigma = 1 - t, t
  logsnr = 2 * jnp.log(alpha / sigma)
  window = (float(logsnr[2]) - 0.1, float(logsnr[1]) + 0.1)  # the examples at t 0.5 and 0.8
  denoiser = lambda **kw: jax.jit(samplers.make_denoiser(network, "flow", 3.0, **kw))
  x0 = denoiser(skip_layer_guidance=(skipped, 2.8, window))(x, alpha, sigma)
  cond, uncond = network(x, logsnr, True), network(x, logsnr, False)
  velocity = uncond + 3.0 * (cond - uncond) + 2.8 * (cond - jnp.sin(x)) * (t[:, None, None, None] > 0.3)
  np.testing.assert_allclose(x0, objectives.x0_from_prediction("flow", velocity, x, alpha[:, None, None, None],
                                                                sigma[:, None, None, None]), rtol=1e-5, atol=1e-5)
  assert len(skipped_passes) == 1
  np.testing.assert_allclose(denoiser(skip_layer_guidance=(skipped, 2.8, (10.0, 20.0)))(x, alpha, sigma),
                             denoiser()(x, alpha, sigma), rtol=1e-5, atol=1e-6)
  assert len(skipped_passes) == 1  # no example inside: the pass is skipped

  grid = np.linspace(-6.0, 6.0, 29)  # 28 steps, noisiest first
  lowest, highest = samplers.skip_layer_window(grid, 0.01, 0.2)
  assert [i for i in range(28) if lowest <= grid[i] <= highest] == [1, 2, 3, 4, 5]
  assert samplers.skip_layer_window(grid[:3], 0.01, 0.2) is None  # 2 steps: 0.02 < i < 0.4 holds none


def test_guidance_rescale_restores_conditional_std():
  cond = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  uncond = 0.2 * cond
  guided = samplers.guided_prediction(cond, uncond, 7.5, guidance_rescale=1.0)
  np.testing.assert_allclose(guided.std(axis=(1, 2, 3)), cond.std(axis=(1, 2, 3)), rtol=1e-5)


def test_dynamic_thresholding_keeps_x0_in_range():
  x0 = 3 * jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  out = samplers.threshold_x0(x0, "dynamic", 95.0)
  assert float(jnp.abs(out).max()) <= 1.0 + 1e-6
  small = 0.5 * jnp.tanh(x0)  # already within [-1, 1]: dynamic thresholding leaves it alone
  np.testing.assert_allclose(samplers.threshold_x0(small, "dynamic"), small)
  assert float(jnp.abs(samplers.threshold_x0(x0, "static")).max()) <= 1.0


@pytest.mark.parametrize("call, message", [
    (lambda: samplers.sample(exact_denoiser, jnp.zeros(SHAPE), jnp.ones(3), jnp.ones(3), "plms"), "valid samplers"),
    (lambda: samplers.sample(exact_denoiser, jnp.zeros(SHAPE), jnp.ones(1), jnp.ones(1)), "steps >= 1"),
    (lambda: samplers.make_denoiser(lambda *a: a[0], "eps", guidance_scale=-1.0), "guidance_scale"),
    (lambda: samplers.make_denoiser(lambda *a: a[0], "eps", threshold="soft"), "valid options"),
    (lambda: schedules.continuous_logsnr_grid(schedules.logsnr_schedule("cosine"), 0), "steps must be >= 1"),
])
def test_bad_input_raises_clear_error(call, message):
  with pytest.raises(ValueError, match=message):
    call()


MODES = np.array([[-1.0, 0.5], [1.0, -0.5]])
MODE_WEIGHTS = np.array([0.3, 0.7])
MODE_STD = 0.2


def mixture_x0(x, alpha, sigma):
  """E[x0 | x_t] for x0 ~ sum_k w_k N(mode_k, MODE_STD^2 I) in 2-D."""
  alpha, sigma = alpha.reshape(-1, 1, 1), sigma.reshape(-1, 1, 1)
  var = alpha**2 * MODE_STD**2 + sigma**2                              # marginal variance per mode
  diff = x[:, None, :] - alpha * MODES[None]                           # [n, modes, 2]
  log_w = jnp.log(MODE_WEIGHTS) - jnp.sum(diff**2, -1) / (2 * var[..., 0])
  resp = jax.nn.softmax(log_w, axis=1)[..., None]                      # posterior mode probabilities
  posterior_mean = MODES[None] + alpha * MODE_STD**2 / var * diff
  return jnp.sum(resp * posterior_mean, axis=1)


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_samplers_reproduce_gaussian_mixture(sampler):
  logsnr = schedules.continuous_logsnr_grid(schedules.logsnr_schedule("cosine", logsnr_min=-12, logsnr_max=12), 64)
  alpha, sigma = schedules.alpha_sigma_from_logsnr(logsnr, "flow" if sampler == "flow_euler" else "vp")
  x_init = sigma[0] * jax.random.normal(jax.random.key(3), (4096, 2))
  run = jax.jit(lambda x: samplers.sample(mixture_x0, x, alpha, sigma, sampler, key=jax.random.key(4)))
  x = np.asarray(run(x_init))
  nearest = np.argmin(((x[:, None] - MODES[None]) ** 2).sum(-1), axis=1)
  np.testing.assert_allclose(np.bincount(nearest, minlength=2) / len(x), MODE_WEIGHTS, atol=0.03)
  for k in range(2):
    members = x[nearest == k]
    np.testing.assert_allclose(members.mean(0), MODES[k], atol=0.03)
    np.testing.assert_allclose(members.std(0), MODE_STD, rtol=0.15)


def test_step_callback_sees_every_step_and_changes_nothing(caplog):
  from diffusion_jax import sample as sample_job

  logsnr = schedules.continuous_logsnr_grid(schedules.logsnr_schedule("cosine"), 6)
  alpha, sigma = schedules.alpha_sigma_from_logsnr(logsnr)
  x_init = sigma[0] * jax.random.normal(jax.random.key(0), (8, SHAPE[1]))
  seen = []
  run = lambda on_step: np.asarray(jax.jit(lambda x: samplers.sample(exact_denoiser, x, alpha, sigma, "ddpm",
                                                                      on_step=on_step))(x_init))
  with_callback = run(lambda step: seen.append(int(step)))
  jax.effects_barrier()
  assert sorted(seen) == list(range(6))
  np.testing.assert_array_equal(with_callback, run(None))
  caplog.set_level("INFO", logger="diffusion_jax")
  progress = sample_job.SamplingProgress(6, "ddpm", every=0.0)  # report every step
  run(progress)
  run(progress)  # the compiled sampler reused: its second run reports again
  jax.effects_barrier()
  assert caplog.text.count("sampling (ddpm): step 5/6 (83%)") == 2 and "step 0/" not in caplog.text


@pytest.mark.parametrize("typed", [True, False])
def test_per_example_keys_make_stochastic_samples_independent_of_the_batch(typed):
  """With one key per example, an example's DDPM noise is its own: sampled alone or beside others, it ends
  the same; with one key for the batch it does not."""
  logsnr = schedules.continuous_logsnr_grid(schedules.logsnr_schedule("cosine"), 5)
  alpha, sigma = schedules.alpha_sigma_from_logsnr(logsnr)
  x_init = sigma[0] * jax.random.normal(jax.random.key(0), (3, SHAPE[1]))
  keys = jax.random.split(jax.random.key(1), 3)
  keys = keys if typed else jax.random.key_data(keys)
  run = lambda x, key: np.asarray(samplers.sample(exact_denoiser, x, alpha, sigma, "ddpm", key=key))
  together, alone = run(x_init, keys), run(x_init[1:2], keys[1:2])
  np.testing.assert_allclose(together[1:2], alone, rtol=1e-5, atol=1e-6)
  assert not np.allclose(together[0], together[1])
  shared = run(x_init, jax.random.key(1))
  assert not np.allclose(shared[1:2], run(x_init[1:2], jax.random.key(1)), atol=1e-3)
