"""Held-out diffusion loss on fixed (x0, log-SNR, noise) triples: the quantity scaling fits use.

Every example is evaluated at the same fixed log-SNR levels with noise from a fixed key, without
condition dropout, so two checkpoints (or two models) are compared on exactly the same problem.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax import objectives, schedules, superres

LEVELS = tuple(np.linspace(-8.0, 8.0, 9))
_compiled = {}


def make_heldout_loss_fn(config, graphdef):
  """(params, frozen, batch) -> loss per level [len(LEVELS)] (averaged over the batch); jitted once per
  experiment config, so every checkpoint of a run reuses the compiled program."""
  key = config.to_json_best_effort(sort_keys=True)
  if key not in _compiled:
    _compiled[key] = _build(config, graphdef)
  return _compiled[key]


def _build(config, graphdef):
  d = config.diffusion
  levels = jnp.array(LEVELS)

  def heldout(params, frozen, batch):
    model = nnx.merge(graphdef, params, frozen)
    pixels = batch["video"] if "video" in batch else batch["image"]
    image = model.to_latents(pixels)  # a latent model: the posterior mean
    clean_lowres = superres.lowres_input(pixels, config) if config.model.lowres_conditioning else None
    x0 = superres.to_residual(image, clean_lowres, config) if superres.is_residual(config) else image
    text = model.encode(batch["text_ids"], batch["text_mask"])

    def at_level(logsnr_value, key):
      logsnr = jnp.full((x0.shape[0],), logsnr_value)
      alpha, sigma = schedules.alpha_sigma_from_logsnr(logsnr, d.path)
      eps = jax.random.normal(key, x0.shape)
      x_t = objectives.diffuse(x0, eps, alpha, sigma)
      scale = objectives.network_input_scale(d.prediction, alpha, sigma, d.sigma_data)
      lowres = aug_logsnr = None
      if config.model.lowres_conditioning:  # super-resolution stage: the true low-res input, fixed noise
        lowres = clean_lowres
        lowres_keys = jax.random.split(jax.random.fold_in(key, 1), x0.shape[0])
        lowres, aug_logsnr = superres.sampling_condition(lowres, lowres_keys, config, config.sample.aug_level)
      output = model(x_t * objectives.per_example(scale, x_t), logsnr, text, batch["text_mask"], lowres=lowres,
                     aug_logsnr=aug_logsnr)
      return objectives.loss(d.prediction, d.weighting, output, x0, eps, logsnr, d.path, d.min_snr_gamma,
                             d.sigma_data).mean()

    keys = jax.random.split(jax.random.key(1234), len(LEVELS))  # fixed noise for every evaluation
    return jnp.stack([at_level(levels[i], keys[i]) for i in range(len(LEVELS))])

  return jax.jit(heldout)


def as_metrics(losses) -> dict:
  losses = np.asarray(losses)
  out = {f"heldout_loss/logsnr_{level:+.0f}": float(v) for level, v in zip(LEVELS, losses)}
  out["heldout_loss"] = float(losses.mean())
  return out
