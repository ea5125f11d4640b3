"""Held-out diffusion loss on fixed (x0, log-SNR, noise) triples: the quantity scaling fits use.

Every example is evaluated at the same fixed log-SNR levels with noise from a fixed key, without
condition dropout, so two checkpoints (or two models) are compared on exactly the same problem (a model that
starts clips at images: every 1/model.wan_first_frame_fraction-th example given its first frame; a pair's image, its
reference image, data.reference_key, as trained). The examples
go through the network a batch at a time, each batch sharded over a mesh; example i's noise at a level is row i
of one draw for the whole set, so the loss does not depend on the batch size or the device count.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from diffusion_jax import objectives, schedules, sharding, superres

LEVELS = tuple(np.linspace(-8.0, 8.0, 9))
_compiled = {}


def make_heldout_loss_fn(config, graphdef, mesh=None, batch_size=None):
  """(params, frozen, batch of n examples) -> loss per level [len(LEVELS)] (averaged over the examples), as numpy.

  The examples go through the network `batch_size` at a time (default: all at once; rounded up to a multiple of
  the mesh's devices, the last batch padded), each batch sharded over the mesh's batch axes (and a video model's
  frames over its `sequence` axis: sharding.constrain; mesh None: placed as jit places numpy inputs). One program
  per experiment config and batch shape serves every batch and every checkpoint of a run."""
  key = config.to_json_best_effort(sort_keys=True)
  if key not in _compiled:
    _compiled[key] = _build(config, graphdef)
  per_example = _compiled[key]

  def heldout(params, frozen, batch):
    n = len(batch["text_ids"])
    devices = mesh.size if mesh is not None else 1
    chunk = -(-min(batch_size or n, n) // devices) * devices
    pad = -n % chunk
    padded = {k: np.concatenate([np.asarray(v), np.repeat(np.asarray(v)[-1:], pad, axis=0)])
              for k, v in batch.items()}
    place = (lambda a: a) if mesh is None else (lambda a: jax.device_put(a, sharding.batch_sharding(mesh)))
    losses = []
    for start in range(0, n + pad, chunk):
      rows = place({k: v[start:start + chunk] for k, v in padded.items()})
      with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):  # sharding.constrain's mesh
        out = per_example(params, frozen, rows, np.int32(start), n)
      losses.append(np.asarray(multihost_utils.process_allgather(out, tiled=True)) if mesh is not None
                    else np.asarray(out))
    return np.concatenate(losses)[:n].mean(axis=0)

  return heldout


def _build(config, graphdef):
  d = config.diffusion
  levels = jnp.array(LEVELS)

  @functools.partial(jax.jit, static_argnums=4)
  def per_example(params, frozen, batch, start, n):
    """Losses [rows, len(LEVELS)] of the batch's examples, rows start..start + rows of the n examples (rows past
    n: padding)."""
    model = nnx.merge(graphdef, params, frozen)
    pixels = batch["video"] if "video" in batch else batch["image"]
    image = model.to_latents(pixels)  # a latent model: the posterior mean
    clean_lowres = superres.lowres_input(pixels, config) if config.model.lowres_conditioning else None
    x0 = superres.to_residual(image, clean_lowres, config) if superres.is_residual(config) else image
    text = model.encode(batch["text_ids"], batch["text_mask"])
    condition = model.own_condition(pixels) if model.image_to_video else None
    if "reference" in batch:  # each image's reference (data.reference_key), as trained
      condition = model.paired_condition(batch["reference"])
    rows = x0.shape[0]
    if fraction := config.model.wan_first_frame_fraction:  # as trained: that share given their first frame, evenly
      index = start + jnp.arange(rows)
      given = jnp.floor((index + 1) * fraction) > jnp.floor(index * fraction)
      condition = {"first_latents": x0[:, :1], "first_given": given}

    def own_rows(draw):  # this batch's rows of a draw for all n examples (zeros past n)
      padded = jnp.concatenate([draw, jnp.zeros((rows,) + draw.shape[1:], draw.dtype)])
      return jax.lax.dynamic_slice_in_dim(padded, start, rows)

    def at_level(logsnr_value, key):
      logsnr = jnp.full((rows,), logsnr_value)
      alpha, sigma = schedules.alpha_sigma_from_logsnr(logsnr, d.path)
      eps = own_rows(jax.random.normal(key, (n,) + x0.shape[1:]))
      x_t = objectives.diffuse(x0, eps, alpha, sigma)
      scale = objectives.network_input_scale(d.prediction, alpha, sigma, d.sigma_data)
      lowres = aug_logsnr = None
      if config.model.lowres_conditioning:  # super-resolution stage: the true low-res input, fixed noise
        lowres_keys = jax.random.wrap_key_data(own_rows(jax.random.key_data(
            jax.random.split(jax.random.fold_in(key, 1), n))))
        lowres, aug_logsnr = superres.sampling_condition(clean_lowres, lowres_keys, config, config.sample.aug_level)
      output = model(x_t * objectives.per_example(scale, x_t), logsnr, text, batch["text_mask"], lowres=lowres,
                     aug_logsnr=aug_logsnr, condition=condition)
      return objectives.loss(d.prediction, d.weighting, output, x0, eps, logsnr, d.path, d.min_snr_gamma,
                             d.sigma_data)

    keys = jax.random.split(jax.random.key(1234), len(LEVELS))  # fixed noise for every evaluation
    # One network pass in the program, run at each level in turn (unrolled, the nine took 5-14 s to compile)
    return jax.lax.map(lambda level_and_key: at_level(*level_and_key), (levels, keys)).T

  return per_example


def as_metrics(losses) -> dict:
  losses = np.asarray(losses)
  out = {f"heldout_loss/logsnr_{level:+.0f}": float(v) for level, v in zip(LEVELS, losses)}
  out["heldout_loss"] = float(losses.mean())
  return out
