"""AdamW with gradient clipping and a warm-up + cosine (or constant) learning-rate schedule, whose numbers are
arrays.

The hyper-parameters (`hyperparameters(config)`) are an argument of the compiled train step, not constants
baked into it: runs that differ only in learning rate, schedule length, warm-up, Adam betas, weight decay or
clipping threshold (a learning-rate sweep, the budgets of one size in a scaling sweep, a resume with more
train.steps) share one compiled program through the persistent compilation cache. optax's schedules take
their lengths as Python numbers, so the schedule is written here; it matches
`optax.warmup_cosine_decay_schedule` / `optax.warmup_constant_schedule` step for step (tested).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

SCHEDULES = ("cosine", "constant")
HYPERPARAMETERS = ("learning_rate", "warmup_steps", "decay_steps", "end_learning_rate", "b1", "b2", "weight_decay",
                   "grad_clip")


def hyperparameters(config) -> dict[str, np.ndarray]:
  """HYPERPARAMETERS from `config.optimizer` (the schedule's length is config.train.steps, warm-up included),
  as float32 scalars."""
  c = config.optimizer
  warmup = max(c.warmup_steps, 1)
  numbers = dict(learning_rate=c.learning_rate, warmup_steps=warmup,
                 decay_steps=max(config.train.steps, warmup + 1),
                 end_learning_rate=c.learning_rate * c.end_learning_rate_factor,
                 b1=c.b1, b2=c.b2, weight_decay=c.weight_decay, grad_clip=c.grad_clip)
  return {k: np.float32(numbers[k]) for k in HYPERPARAMETERS}


def learning_rate(step, hparams: dict, schedule: str):
  """The learning rate at optimizer step `step` (a count from 0): linear from 0 to learning_rate over
  warmup_steps, then constant, or cosine decay to end_learning_rate at decay_steps and constant after."""
  step = jnp.asarray(step, jnp.float32)
  peak, warmup = hparams["learning_rate"], hparams["warmup_steps"]
  warm = peak * jnp.clip(step / warmup, 0.0, 1.0)
  if schedule == "constant":
    return warm
  progress = jnp.clip((step - warmup) / (hparams["decay_steps"] - warmup), 0.0, 1.0)
  end = hparams["end_learning_rate"]
  cosine = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
  return jnp.where(step < warmup, warm, cosine)


def make(config, hparams: dict) -> optax.GradientTransformation:
  """Clip by global norm (unless optimizer.grad_clip is 0), then AdamW at the scheduled learning rate.
  `hparams` may be traced; only the schedule's kind and whether to clip come from `config`. The state's
  layout does not depend on `hparams`."""
  tx = optax.adamw(lambda count: learning_rate(count, hparams, config.optimizer.schedule), b1=hparams["b1"],
                   b2=hparams["b2"], weight_decay=hparams["weight_decay"])
  clip = optax.clip_by_global_norm(hparams["grad_clip"]) if config.optimizer.grad_clip else optax.identity()
  return optax.chain(clip, tx)


def state_shardings(tx: optax.GradientTransformation, params, param_shardings, replicated):
  """Shardings of `tx.init(params)` (params: arrays or ShapeDtypeStructs): the moments sharded exactly like the
  parameters they track, counters `replicated`."""
  return optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, params), param_shardings,
                               transform_non_params=lambda _: replicated)
