"""Progressive distillation (Salimans & Ho 2022): a student that samples in N DDIM steps what its teacher samples in 2N.

A distillation run is a fine-tune (finetune.py) of the teacher's run with distill.steps = N > 0: the student starts
from the teacher's weights and trains on the teacher's data, but its target at a noisy image x on the N-step
sampling grid is not the clean image: it is the x0 for which one deterministic DDIM step of the student from x
lands where two DDIM steps of the teacher land (the teacher's 2N-step grid holds the student's levels at every
other entry). The teacher denoises as its run samples (its sample.threshold and sample.guidance_scale, unless
distill.threshold and distill.guidance_scale say otherwise): above guidance 1 the student learns the guided teacher
(Meng et al. 2023) and samples with guidance scale 1, one network pass per step instead of two, and the next halving
distils that student unguided. A student's estimate is where one step must aim, not an image: it samples
unthresholded (configs/t2i_shapes.py:base16_distill), as the next round's teacher too, and the first round's
teacher denoises unthresholded there as well (distill.threshold: a thresholded teacher's students lost FID,
README: Progressive distillation). Halving N in a chain of runs, each a
distillation of the one before, is the progressive part (README: Progressive distillation).

Shapes: x [batch, ...]; a training step's levels (log-SNR, alpha, sigma) [3, batch]: where a student step
starts, the teacher's midpoint, where it ends.
"""

import jax
import jax.numpy as jnp
from flax import traverse_util

from diffusion_jax import checkpoint, finetune, objectives, samplers, sharding, superres
from diffusion_jax.models import text_to_image

# The teacher's outputs mean what they meant in its run only under its own objective.
TEACHER_FIELDS = ("diffusion.path", "diffusion.prediction", "diffusion.sigma_data")


def problems(config) -> list[str]:
  """Why config.distill cannot run with this config (empty when it can, or when distillation is off)."""
  c, s = config.distill, config.sample
  if c.steps < 0:
    return [f"distill.steps={c.steps} must be >= 0 (0: no distillation)"]
  if not c.steps:
    return []
  found = []
  if not c.guidance_scale >= 0 and c.guidance_scale != -1:
    found.append(f"distill.guidance_scale={c.guidance_scale} must be >= 0, or -1 for the teacher's "
                 "sample.guidance_scale")
  if c.threshold and c.threshold not in samplers.THRESHOLDS:
    found.append(f"distill.threshold={c.threshold!r} must be one of {', '.join(samplers.THRESHOLDS)}, or '' for the "
                 "teacher's sample.threshold")
  if not config.finetune.workdir:
    found.append("distill.steps > 0 distils the run in finetune.workdir (the teacher): set finetune.workdir")
  if config.model.lora_rank:
    found.append("distillation trains every weight of the student: set model.lora_rank=0")
  if s.sampler != "ddim" or s.eta != 0:
    found.append(f"the student samples with deterministic DDIM (sample.sampler={s.sampler!r}, sample.eta={s.eta}): "
                 "set sample.sampler='ddim' and sample.eta=0")
  if s.steps != c.steps:
    found.append(f"the student is trained for distill.steps={c.steps} sampler steps: set sample.steps={c.steps} "
                 f"(now {s.steps})")
  if not config.finetune.workdir:
    return found
  try:
    teacher = checkpoint.read_config(config.finetune.workdir)
  except (OSError, ValueError) as error:
    return found + [f"finetune.workdir={config.finetune.workdir!r}: {checkpoint.brief(error)}"]
  differences = [d for d in checkpoint.config_differences(teacher, config) if d.split(":")[0] in TEACHER_FIELDS]
  if differences:
    found.append(f"the student must read the teacher's outputs as its run did: {'; '.join(differences)} "
                 "(teacher -> this config)")
  if (scale := teacher_sampling(config, teacher).guidance_scale) != 1 and s.guidance_scale != 1:
    found.append(f"a student of a teacher guided at {scale} (distill.guidance_scale={c.guidance_scale}) learns the "
                 f"guidance: set sample.guidance_scale=1 (now {s.guidance_scale})")
  return found


def teacher_sampling(config, teacher_config=None):
  """The sample settings the teacher denoises with: those of its run (`teacher_config`, by default finetune.workdir's
  config.json), with distill.guidance_scale as the guidance scale unless it is -1 and distill.threshold as the
  thresholding unless it is ""."""
  settings = (teacher_config or checkpoint.read_config(config.finetune.workdir)).sample.copy_and_resolve_references()
  if config.distill.guidance_scale >= 0:
    settings.guidance_scale = config.distill.guidance_scale
  if config.distill.threshold:
    settings.threshold = config.distill.threshold
  return settings


def off_grid(config, sample_config) -> list[str]:
  """How sampling a distilled student (config.distill.steps > 0) with `sample_config` leaves what it was trained for:
  its N-step deterministic DDIM grid and its run's guidance scale (a student of a guided teacher has learnt the
  guidance). Empty for a model that is no student."""
  n, s, found = config.distill.steps, sample_config, []
  if n and (s.sampler, s.steps, s.eta, s.flow_shift) != ("ddim", n, 0, 0):
    found.append(f"this model was distilled for {n} deterministic DDIM steps: sampler={s.sampler!r}, steps={s.steps}, "
                 f"eta={s.eta}, flow_shift={s.flow_shift} samples it off the grid it learnt (README: Progressive "
                 "distillation)")
  if n and s.guidance_scale != config.sample.guidance_scale:
    found.append(f"this distilled model's run samples at guidance {config.sample.guidance_scale} (a guided teacher's "
                 f"student has learnt its guidance): guidance_scale={s.guidance_scale} guides it otherwise")
  return found


def training_logsnr(key, batch: int, logsnr_fn, steps: int):
  """log-SNRs [3, batch] of a step of the student's `steps`-step sampling grid drawn uniformly per example
  (schedules.continuous_logsnr_grid: logsnr_fn at t = i / steps, the last step ending clean): where it starts, the
  teacher's midpoint, where it ends."""
  index = jax.random.randint(key, (batch,), 1, steps + 1)
  t = index / steps
  return jnp.stack([logsnr_fn(t), logsnr_fn(t - 0.5 / steps),
                    jnp.where(index == 1, jnp.inf, logsnr_fn(jnp.maximum(t - 1 / steps, 0.0)))])


def target(denoise_fn, x, alpha, sigma):
  """x0 [batch, ...] that one DDIM step from x at level 0 to level 2 must be given to land where two DDIM steps of
  the teacher's denoise_fn(x, alpha, sigma) land, through level 1 (alpha, sigma: [3, batch]); solved in closed
  form (Salimans & Ho 2022, Algorithm 2), and at a clean end (sigma 0) the teacher's last estimate itself."""
  level = lambda i: (objectives.per_example(alpha[i], x), objectives.per_example(sigma[i], x))
  (a_t, s_t), (a_mid, s_mid), (a_s, s_s) = level(0), level(1), level(2)
  x_mid = samplers.ddim_step(x, denoise_fn(x, alpha[0], sigma[0]), a_t, s_t, a_mid, s_mid, 0.0, 0.0)
  x_s = samplers.ddim_step(x_mid, denoise_fn(x_mid, alpha[1], sigma[1]), a_mid, s_mid, a_s, s_s, 0.0, 0.0)
  ratio = s_s / s_t
  return (x_s - ratio * x) / (a_s - ratio * a_t)


def teacher_denoiser(model, text, mask, config, sampling, **conditioning):
  """The teacher's denoise_fn(x, alpha, sigma) for the text (embeddings [batch, tokens, dim], mask [batch, tokens]):
  `model` guided against the null text and thresholded as the sample settings `sampling` say (teacher_sampling; a
  residual super-resolution stage: not thresholded). conditioning: the model's other inputs (lowres, aug_logsnr,
  is_video)."""

  def network_fn(x, logsnr, conditional):
    if conditional:
      return model(x, logsnr, text, mask, **conditioning)
    return model(x, logsnr, *model.null_condition(text, mask), **conditioning)

  d, s = config.diffusion, sampling
  return samplers.make_denoiser(network_fn, d.prediction, s.guidance_scale,
                                threshold="none" if superres.is_residual(config) else s.threshold,
                                threshold_percentile=s.threshold_percentile, sigma_data=d.sigma_data)


def teacher_weights(config, mesh) -> dict:
  """The teacher's trainable parameters (pure dict) from finetune.workdir, placed with this model's shardings (its
  frozen ones are the student's). A resumed run reads them again; a fresh one copies its starting weights."""
  _, params, frozen = text_to_image.split(text_to_image.abstract(config), config)
  shardings = (sharding.state_shardings(params, mesh), sharding.state_shardings(frozen, mesh))
  weights = finetune.load_weights(config, finetune.abstract_targets(params, frozen, shardings))
  paths = traverse_util.flatten_dict(shardings[0])
  return traverse_util.unflatten_dict({p: weights[p] for p in paths})
