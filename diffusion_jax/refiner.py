"""An ensemble of expert denoisers (SDXL's base and refiner; eDiff-I): the model runs the noisy part of the
sampling grid and hands its latents, still noisy, to a refiner that runs the rest.

The handoff is a noise level: the training schedule's at `denoising_end` of its way from noise to clean. On a DDPM
table (sample.timestep_spacing: Stable Diffusion's) that is timestep round(T (1 - denoising_end)), the cutoff
diffusers' SDXL pipelines take (the base's denoising_end, the refiner's denoising_start): the model runs the steps
at that timestep and above, the refiner those below. Both sample one grid, so they must share the latents' shape and
the schedule; the refiner samples with the model's settings (sampler, steps, guidance, negative prompts) and its own
aesthetic scores (an SDXL refiner's time ids).
"""

import dataclasses

import numpy as np

from diffusion_jax import schedules
from diffusion_jax.models import text_to_image

DENOISING_END = 0.8  # the part of the grid SDXL's documentation gives the base (its high_noise_frac)
AESTHETIC_SETTINGS = ("aesthetic_score", "negative_aesthetic_score")  # (the prompt's, guidance's other branch's)
# Sample settings a model reads of its own: the refiner's come from its config, the rest from the model's
OWN_SETTINGS = ("flux_guidance", "skip_layers", "skip_layer_scale", "skip_layer_start", "skip_layer_stop",
                "guidance_scale_low_noise", "kontext_resize") + AESTHETIC_SETTINGS


@dataclasses.dataclass
class Refiner:
  config: object          # the refiner's config (sample --refiner's, read from pretrained checkpoints, or the
                          # config.json of its --refiner_workdir)
  denoising_end: float    # the handoff, in (0, 1)
  aesthetic_scores: tuple  # (the prompt's, guidance's other branch's): read by an SDXL refiner's U-Net alone
  adapters: list = dataclasses.field(default_factory=list)  # lora.Adapters fused into its weights
  workdir: str | None = None  # a training workdir whose checkpoint it is (None: the config's pretrained checkpoints)
  step: int | None = None     # that checkpoint's step (None: the latest, until read)
  use_ema: bool = True        # with a workdir: its first EMA copy of the weights, else its trained parameters
  weights: object = None  # its sample.Weights, once read (sample.load_refiner), the adapters fused
  graphdef: object = None
  tokenizer: object = None


def sample_config(refiner_config, model_sample_config, image_size: tuple, aesthetic_scores: tuple):
  """The refiner's sample settings: the model's (its grid, guidance, negative prompts) at the model's image_size
  (height, width), with OWN_SETTINGS from the refiner's config and its aesthetic_scores (prompt's, other branch's)."""
  settings = model_sample_config.copy_and_resolve_references()
  for key in OWN_SETTINGS:
    settings[key] = refiner_config.sample[key]
  settings.update(height=image_size[0], width=image_size[1], aesthetic_score=aesthetic_scores[0],
                  negative_aesthetic_score=aesthetic_scores[1])
  return settings


def handoff_logsnr(config, sample_config, denoising_end: float) -> float:
  """The log-SNR at which the refiner takes over: the training schedule's at timestep round(T (1 - denoising_end))
  of its DDPM table (with sample.timestep_spacing), else at t = 1 - denoising_end, as float32 as the grid."""
  params = dict(config.diffusion.schedule_params)
  if sample_config.timestep_spacing:
    alphas_cumprod = schedules.alphas_cumprod_from_betas(schedules.betas(config.diffusion.schedule, **params))
    total = len(alphas_cumprod)
    cutoff = int(round(total - denoising_end * total))
    return float(np.float32(schedules.logsnr_at_timesteps(alphas_cumprod, np.array([cutoff], float))[0]))
  return float(np.float32(schedules.logsnr_schedule(config.diffusion.schedule, **params)(1.0 - denoising_end)))


def handoff_step(config, sample_config, logsnr_grid, denoising_end: float) -> int:
  """Index into the sampling grid (logsnr [steps + 1], noisiest first) of the level the refiner starts from: the
  model runs the steps from the levels at least as noisy as handoff_logsnr. A ValueError where either would run
  none."""
  if not 0 < denoising_end < 1:
    raise ValueError(f"--denoising_end={denoising_end} must be in (0, 1): the part of the grid the model runs before "
                     "the refiner")
  level = handoff_logsnr(config, sample_config, denoising_end)
  step = int(np.sum(np.asarray(logsnr_grid)[:-1] <= level + 1e-6 * max(1.0, abs(level))))
  if not 0 < step < len(logsnr_grid) - 1:
    raise ValueError(f"--denoising_end={denoising_end} hands over at step {step} of {len(logsnr_grid) - 1}: the "
                     f"{'model' if step == 0 else 'refiner'} would run none of them; move it toward "
                     f"{'1' if step == 0 else '0'} or raise --steps")
  return step


def problems(config, refiner_config) -> list[str]:
  """Why the model of `config` cannot hand latents to the refiner of `refiner_config`, by what they are."""
  found = []
  for name, c in (("the model", config), ("the refiner", refiner_config)):
    if c.model.temporal or c.model.lowres_conditioning:
      found.append(f"{name} is a {'video' if c.model.temporal else 'super-resolution'} model; an ensemble of "
                   f"experts hands over an image's latents, from noise: sample it without --refiner")
    elif text_to_image.flux_control(c):
      found.append(f"{name} samples beside a control image (FLUX.1 Depth / Canny), which a handover has none of: "
                   "sample it without --refiner")
  return found


def sampling_problems(config, refiner_config, model_sampling, refiner_sampling) -> list[str]:
  """Why the model cannot hand latents to the refiner at these settings: each's (sampling grid log-SNRs
  [steps + 1], shape of one sample's latents)."""
  (model_grid, model_shape), (refiner_grid, refiner_shape) = model_sampling, refiner_sampling
  if tuple(model_shape) != tuple(refiner_shape):
    return [f"the refiner's latents are {tuple(refiner_shape)}, the model's {tuple(model_shape)}: they must share an "
            "autoencoder's latent space (pair models of one family, e.g. SDXL's base and refiner)"]
  if np.shape(model_grid) != np.shape(refiner_grid) or not np.allclose(model_grid, refiner_grid, rtol=1e-5):
    schedule = lambda c: f"{c.diffusion.schedule} {dict(c.diffusion.schedule_params)}"
    return [f"the refiner's sampling grid is not the model's (diffusion.schedule {schedule(refiner_config)}, the "
            f"model's {schedule(config)}): both must sample one grid (pair models trained on one schedule)"]
  return []
