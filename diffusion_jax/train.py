"""Train state, the pure train step, and the training loop.

The step is `(state, batch, hparams) -> (state, metrics)`, compiled once with `jax.jit` and explicit
NamedShardings on the mesh; the state argument is donated. `hparams` are the optimizer's numbers
(`optimizer.hyperparameters`): arguments, so that runs differing only in those share one compiled program.
A distillation (distillation.py) passes its teacher's parameters as a fourth argument, outside the checkpointed
state.
Parameters are pure nested dicts (see `models/text_to_image.py`); `nnx.merge` rebuilds the module inside the step.
"""

import logging
import pathlib
import time
from typing import Any

import flax.struct
import flax.traverse_util
import grain.python as grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from diffusion_jax import (checkpoint, config_checks, distillation, distributed, editing, finetune, hardware,
                           metric_writers, objectives, optimizer, sample, schedules, sharding, stop_signals, superres)
from diffusion_jax.data import latent_cache, pipeline
from diffusion_jax.models import inflation, init_rngs, text_to_image, wan_transformer
from diffusion_jax.text import embedding_cache, tokenizers

# Edges of the log-SNR bins in which the loss is also reported (low log-SNR = high noise).
LOGSNR_BIN_EDGES = (-6.0, -3.0, 0.0, 3.0, 6.0)
log = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict                  # trainable parameters (float32 master weights)
  frozen: dict                  # parameters the optimizer does not touch (a frozen text encoder)
  ema: tuple                    # one copy of params per config.train.ema_decays entry
  opt_state: Any
  rng: jax.Array                # raw uint32 key
  nonfinite_run: jax.Array      # consecutive steps skipped for a non-finite loss or gradient
  nonfinite_total: jax.Array


# ----------------------------------------------------------------------------- state


_weights_inits = {}  # weights_init's programs by model, given paths and shardings: the latest WEIGHTS_INITS_KEPT
WEIGHTS_INITS_KEPT = 8


def weights_init(config, shardings, given=frozenset()):
  """The jitted program that makes the config's randomly initialised (params, frozen) pure dicts, placed with
  `shardings`, from a key: the seed's key is an argument, so runs that differ only in config.seed share it. Leaves
  at the flat paths `given` (pretrained weights that replace them) are left out: nothing computes them. One program
  per model (text_to_image.model_key), `given` and `shardings` in a process: a job that loads a model again (and a
  test) does not trace its construction again (a second or more for a tiny SDXL)."""
  placed = tuple(tuple(flax.traverse_util.flatten_dict(tree).items()) for tree in shardings)
  key = (text_to_image.model_key(config), given, placed)
  if key in _weights_inits:
    return _weights_inits[key]
  config = config.copy_and_resolve_references()  # (traced at the first call)
  kept = lambda tree: without(tree, given)

  def init(key):
    model = text_to_image.TextToImage(config, rngs=init_rngs.seeded(key))
    _, params, frozen = text_to_image.split(model, config)
    return kept(nnx.to_pure_dict(params)), kept(nnx.to_pure_dict(frozen))

  while len(_weights_inits) >= WEIGHTS_INITS_KEPT:
    _weights_inits.pop(next(iter(_weights_inits)))
  _weights_inits[key] = jax.jit(init, out_shardings=(kept(shardings[0]), kept(shardings[1])))
  return _weights_inits[key]


def without(tree: dict, paths) -> dict:
  """A nested dict without the leaves at the flat paths (tuples, the first the tree's top key) `paths`."""
  flat = flax.traverse_util.flatten_dict(tree)
  return flax.traverse_util.unflatten_dict({path: leaf for path, leaf in flat.items() if path not in paths})


def filled(tree: dict, weights: dict, shardings: dict) -> dict:
  """`tree` (a nested dict of arrays) with the leaves of `weights` ({flat path: host array}) that `shardings` (the
  whole tree's) has a place for added, placed there."""
  flat, where = flax.traverse_util.flatten_dict(tree), flax.traverse_util.flatten_dict(shardings)
  flat.update({path: jax.device_put(value, where[path]) for path, value in weights.items() if path in where})
  return flax.traverse_util.unflatten_dict(flat)


def initial_weights(config, shardings) -> tuple[dict, dict]:
  """(params, frozen): the pretrained parts (a text encoder, an autoencoder, Wan's, SD's, SD3's or Flux's network)
  read on the host and placed on their shards (`shardings`: (params', frozen's)); the random initialisation
  (config.seed) computes only the rest (a LoRA's updates of a pretrained network among them)."""
  pretrained = {(name,) + path: value for name, weights in text_to_image.pretrained_weights(config).items()
                for path, value in flax.traverse_util.flatten_dict(weights).items()}
  params, frozen = weights_init(config, shardings, frozenset(pretrained))(jax.random.key(config.seed))
  return filled(params, pretrained, shardings[0]), filled(frozen, pretrained, shardings[1])


def init_state(config, mesh):
  """A TrainState created directly with its shardings (no full host copy of a randomly initialised model)."""
  graphdef, abstract_params, abstract_frozen = text_to_image.split(text_to_image.abstract(config), config)
  shardings = (sharding.state_shardings(abstract_params, mesh), sharding.state_shardings(abstract_frozen, mesh))

  # Fine-tuning: every weight from another run; Make-A-Video: spatial layers and text encoder from an image model.
  # Read (and an incompatible run refused) before anything is initialised.
  targets = lambda: finetune.abstract_targets(abstract_params, abstract_frozen, shardings)
  finetune_weights = finetune.load_weights(config, targets()) if config.finetune.workdir else None
  image_weights = inflation.load_image_weights(config, targets()) if config.inflate.image_workdir else None
  params, frozen = initial_weights(config, shardings)
  if finetune_weights is not None:
    params, frozen = finetune.start_from(finetune_weights, params, frozen)
  if image_weights is not None:
    params, frozen = inflation.inflate(image_weights, params, frozen)

  # Optimizer moments are sharded exactly like the parameters they track; counters are replicated.
  tx = optimizer.make(config, optimizer.hyperparameters(config))
  opt_shardings = optimizer.state_shardings(tx, params, shardings[0], sharding.replicated(mesh))
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  ema = jax.jit(lambda p: tuple(jax.tree.map(jnp.copy, p) for _ in config.train.ema_decays),
                out_shardings=tuple(shardings[0] for _ in config.train.ema_decays))(params)
  place = lambda x: jax.device_put(x, sharding.replicated(mesh))
  zero = lambda: place(jnp.zeros((), jnp.int32))  # distinct buffers: the state is donated
  state = TrainState(step=zero(), params=params, frozen=frozen, ema=ema, opt_state=opt_state,
                     rng=place(jax.random.PRNGKey(config.seed)), nonfinite_run=zero(), nonfinite_total=zero())
  return state, graphdef


def abstract_state(config, mesh):
  """(TrainState of ShapeDtypeStructs with shardings, graphdef): what a checkpoint restores into, with
  nothing allocated (sampling and evaluation jobs never materialise a random model or optimizer state)."""
  graphdef, params, frozen = text_to_image.split(text_to_image.abstract(config), config)
  struct = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  params, frozen = (jax.tree.map(struct, nnx.to_pure_dict(tree), sharding.state_shardings(tree, mesh))
                    for tree in (params, frozen))
  replicated = sharding.replicated(mesh)
  tx = optimizer.make(config, optimizer.hyperparameters(config))
  opt_shapes = jax.eval_shape(tx.init, params)
  opt_shardings = optimizer.state_shardings(tx, params, jax.tree.map(lambda p: p.sharding, params), replicated)
  counter = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
  state = TrainState(step=counter, params=params, frozen=frozen, ema=tuple(params for _ in config.train.ema_decays),
                     opt_state=jax.tree.map(struct, opt_shapes, opt_shardings),
                     rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated), nonfinite_run=counter,
                     nonfinite_total=counter)
  return state, graphdef


def check_resumable(config, workdir, mesh) -> None:
  """A ValueError, before anything is built, when the checkpoints in `workdir` hold a train state of another
  structure, shape or dtype than `config` makes (e.g. rerun with another model.channels): it names the
  arrays and the config fields that differ from the workdir's config.json. Compares abstract states only.
  Without a config.json (checkpoints copied on their own) there is nothing to compare: the restore decides."""
  if not (pathlib.Path(workdir).expanduser() / "config.json").exists():
    return
  saved = checkpoint.read_config(workdir)

  def arrays(c):
    state, _ = abstract_state(c, mesh)
    return {jax.tree_util.keystr(path, simple=True, separator="/"): f"{x.dtype}{list(x.shape)}"
            for path, x in jax.tree_util.tree_leaves_with_path(state)}

  old, new = arrays(saved), arrays(config)
  if old == new:
    return
  # Parameters first: the optimizer moments and EMA copies repeat them.
  names = sorted(old.keys() | new.keys(), key=lambda k: (not k.startswith("params/"), k))
  changed = [f"{k}: {old.get(k, 'absent')} -> {new.get(k, 'absent')}" for k in names if old.get(k) != new.get(k)]
  fields = checkpoint.config_differences(saved, config)
  raise ValueError(
      f"--workdir={workdir} holds checkpoints of another model or optimizer than this config makes ("
      + "; ".join(changed[:3]) + (f"; {len(changed) - 3} more arrays" if len(changed) > 3 else "") + "). Config "
      "fields that differ from its config.json: " + "; ".join(fields[:10]) + (" ..." if len(fields) > 10 else "")
      + ". Rerun with the workdir's config, or give a new --workdir.")


def count_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- step


def expert_boundary(config) -> float | None:
  """The log-SNR where a pair of Wan experts trained on routed batches (model.wan_expert_batches) switch, else None."""
  m = config.model
  routed = m.backbone == "wan" and m.wan_low_noise_path and m.wan_expert_batches == "routed"
  return wan_transformer.boundary_logsnr(m.wan_boundary) if routed else None


def make_loss_fn(config, graphdef, expert: str | None = None):
  """The training loss `(params, frozen, batch, key, teacher) -> (mean loss, (per-example loss [batch], logsnr
  [batch]))` of this config; `teacher`: a distillation's teacher parameters, else None. expert: 'high' or 'low',
  a pair of Wan experts' loss on a batch at that expert's noise levels (expert_boundary), run by it alone."""
  d = config.diffusion
  logsnr_fn = schedules.logsnr_schedule(d.schedule, **d.schedule_params)
  teacher_sampling = distillation.teacher_sampling(config) if config.distill.steps else None

  def loss_fn(params, frozen, batch, key, teacher):
    k_drop, k_time, k_noise, k_dropout = jax.random.split(key, 4)
    model = nnx.merge(graphdef, params, frozen)
    pixels = batch.get("video", batch.get("image"))  # None with the latent cache
    if "latent_mean" in batch:  # from the latent cache: the encoder ran once, the draw is still per step
      x0 = model.latents_from_moments(batch["latent_mean"], batch["latent_logvar"], jax.random.fold_in(key, 2))
    else:
      x0 = model.to_latents(pixels, jax.random.fold_in(key, 2))
    if "text_embeddings" in batch:  # from the text-embedding cache of a frozen encoder
      text = batch["text_embeddings"]
    else:
      text = model.encode(batch["text_ids"], batch["text_mask"])
    text, text_mask, kept = objectives.drop_condition(k_drop, text, batch["text_mask"], d.cond_drop_prob,
                                                      model.null_condition(text, batch["text_mask"]))
    lowres = aug_logsnr = None
    if config.model.lowres_conditioning:  # the clean low-res input: cached (a latent stage) or from the pixels
      lowres = batch["lowres"] if "lowres" in batch else superres.lowres_input(pixels, config)
      lowres, aug_logsnr = superres.training_condition(lowres, jax.random.fold_in(key, 1), config)
    if superres.is_residual(config):  # the stage diffuses the detail its clean input lacks
      x0 = superres.to_residual(x0, superres.lowres_input(x0, config), config)
    is_video = batch.get("is_video") if config.data.image_fraction > 0 else None  # None: no stills
    # an image-to-video model learns to continue each clip from its first frame (a first-last-frame one, to its last)
    condition = model.own_condition(pixels) if model.image_to_video else None
    if "reference" in batch:  # FLUX.1 Kontext learns each edit pair's image beside the reference it starts from;
      condition = model.paired_condition(batch["reference"])  # FLUX.1 Depth / Canny from its control image
    if model.inpainting:  # SD's inpainting U-Net learns to complete each image from a random part of it
      keep = editing.training_keep_masks(jax.random.fold_in(key, 5), pixels.shape[:3])
      condition = model.inpainting_condition(pixels, keep)
    if config.model.wan_first_frame_fraction:  # a model that starts clips at images: some at their own first frame
      given = jax.random.bernoulli(jax.random.fold_in(key, 4), config.model.wan_first_frame_fraction, x0.shape[:1])
      condition = {"first_latents": x0[:, :1], "first_given": given}
    if teacher is None and expert is not None:  # the low-noise expert's levels: log-SNRs above the boundary
      logsnr = objectives.sample_logsnr_on_side(k_time, x0.shape[0], expert_boundary(config), expert == "low",
                                                d.time_sampler, logsnr_fn, d.time_mean, d.time_std)
      alpha, sigma = schedules.alpha_sigma_from_logsnr(logsnr, d.path)
    elif teacher is None:
      logsnr = objectives.sample_logsnr(k_time, x0.shape[0], d.time_sampler, logsnr_fn, d.time_mean, d.time_std)
      alpha, sigma = schedules.alpha_sigma_from_logsnr(logsnr, d.path)
    else:  # a step of the student's sampling grid, with the teacher's midpoint
      logsnr_levels = distillation.training_logsnr(k_time, x0.shape[0], logsnr_fn, config.distill.steps)
      levels = schedules.alpha_sigma_from_logsnr(logsnr_levels, d.path)  # (alpha, sigma), each [3, batch]
      logsnr, alpha, sigma = logsnr_levels[0], levels[0][0], levels[1][0]
    eps = jax.random.normal(k_noise, x0.shape, x0.dtype)
    x_t = objectives.diffuse(x0, eps, alpha, sigma)
    if teacher is not None:  # the clean image two teacher steps imply, and the noise that goes with it
      teacher_model = nnx.merge(graphdef, teacher, frozen)
      teacher_text = (batch["text_embeddings"] if "text_embeddings" in batch
                      else teacher_model.encode(batch["text_ids"], batch["text_mask"]))
      teacher_null = teacher_model.null_condition(teacher_text, text_mask)[0]  # where the student's text was dropped
      denoise = distillation.teacher_denoiser(teacher_model, jnp.where(kept[:, None, None], teacher_text, teacher_null),
                                              text_mask, config, teacher_sampling, lowres=lowres, aug_logsnr=aug_logsnr,
                                              is_video=is_video, size_ids=batch.get("size_ids"))
      x0 = jax.lax.stop_gradient(distillation.target(denoise, x_t, *levels))
      eps = objectives.eps_from_x0(x0, x_t, alpha, sigma)
    x_in = x_t * objectives.per_example(objectives.network_input_scale(d.prediction, alpha, sigma, d.sigma_data), x_t)
    output = model(x_in, logsnr, text, text_mask, lowres=lowres, aug_logsnr=aug_logsnr, dropout_key=k_dropout,
                   is_video=is_video, condition=condition, expert=expert, size_ids=batch.get("size_ids"))
    per_example = objectives.loss(d.prediction, d.weighting, output, x0, eps, logsnr, d.path, d.min_snr_gamma,
                                  d.sigma_data)
    return per_example.mean(), (per_example, logsnr)

  return loss_fn


def make_train_step(config, graphdef):
  """The pure train step `(state, batch, hparams) -> (state, metrics)` for this config: static configuration
  is closed over; `hparams` are the optimizer's numbers (`optimizer.hyperparameters`), an argument so that
  runs differing only in those share the compiled program. A distillation's step also takes its teacher's
  parameters (distillation.teacher_weights), whose two DDIM steps make the target."""
  decays = tuple(config.train.ema_decays)
  accum = config.train.grad_accum
  edges = jnp.array(LOGSNR_BIN_EDGES)
  grad_fn = jax.value_and_grad(make_loss_fn(config, graphdef), has_aux=True)
  if (boundary := expert_boundary(config)) is not None:
    grad_fn = routed_grad_fn(config, graphdef, boundary, grad_fn)

  def train_step(state: TrainState, batch: dict, hparams: dict, teacher: dict | None = None):
    tx = optimizer.make(config, hparams)
    key = jax.random.fold_in(state.rng, state.step)
    # Gradient accumulation as an unrolled loop: on XLA:CPU a convolution inside a while loop (lax.scan)
    # runs ~20x slower than the same code unrolled (measured here), and accum is small.
    micro_size = batch["text_mask"].shape[0] // accum
    grads, losses, per_example, logsnr = None, [], [], []
    for index in range(accum):
      micro = jax.tree.map(lambda x: x[index * micro_size:(index + 1) * micro_size], batch)
      (loss, (micro_losses, micro_logsnr)), micro_grads = grad_fn(state.params, state.frozen, micro,
                                                                  jax.random.fold_in(key, index), teacher)
      grads = micro_grads if grads is None else jax.tree.map(jnp.add, grads, micro_grads)
      losses.append(loss)
      per_example.append(micro_losses)
      logsnr.append(micro_logsnr)
    grads = jax.tree.map(lambda g: g / accum, grads)
    per_example, logsnr = jnp.concatenate(per_example), jnp.concatenate(logsnr)
    loss, grad_norm = jnp.mean(jnp.stack(losses)), optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    # EMA with the usual warm-up: decay_t = min(decay, (1 + t) / (10 + t)).
    t = state.step.astype(jnp.float32)
    ema = tuple(
        jax.tree.map(lambda e, p, decay=decay: e + (1 - jnp.minimum(decay, (1 + t) / (10 + t))) * (p - e), e, params)
        for decay, e in zip(decays, state.ema))

    bins = jnp.digitize(logsnr.reshape(-1), edges)
    onehot = jax.nn.one_hot(bins, len(LOGSNR_BIN_EDGES) + 1)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "learning_rate": optimizer.learning_rate(state.step, hparams, config.optimizer.schedule),
        "nonfinite": 1 - finite.astype(jnp.int32),
        "loss_by_logsnr_sum": onehot.T @ per_example.reshape(-1),
        "loss_by_logsnr_count": onehot.sum(0),
    }
    new_state = state.replace(
        step=state.step + 1, params=params, ema=ema, opt_state=opt_state,
        nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1),
        nonfinite_total=state.nonfinite_total + 1 - finite.astype(jnp.int32))
    return new_state, metrics

  return train_step


def routed_grad_fn(config, graphdef, boundary: float, grad_fn):
  """A pair of Wan experts' gradient function on routed batches: each batch's side of the boundary drawn with the
  share of the time distribution it holds, then the loss and gradient of that side's expert alone (a lax.cond over
  two gradient computations: one expert's forward and backward pass runs); a distillation's (teacher given) is
  grad_fn's."""
  d = config.diffusion
  by_expert = {expert: jax.value_and_grad(make_loss_fn(config, graphdef, expert), has_aux=True)
               for expert in ("high", "low")}
  low_probability = objectives.logsnr_above_probability(
      boundary, d.time_sampler, schedules.logsnr_schedule(d.schedule, **d.schedule_params), d.time_mean, d.time_std)

  def routed(params, frozen, batch, key, teacher):
    if teacher is not None:
      return grad_fn(params, frozen, batch, key, teacher)
    low = jax.random.uniform(jax.random.fold_in(key, 3)) < low_probability
    run = lambda expert: lambda: by_expert[expert](params, frozen, batch, key, teacher)
    return jax.lax.cond(low, run("low"), run("high"))

  return routed


def lower_step(train_step, state, batch_shapes: dict, mesh, teacher=None):
  """The train step jitted with explicit shardings and lowered for `state`'s layout (nothing compiled yet); with a
  distillation's `teacher` parameters, for those as its fourth argument."""
  shardings_of = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  batch_sharding = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  teacher_args = () if teacher is None else (teacher,)
  jitted = jax.jit(train_step, in_shardings=(shardings_of(state), batch_sharding, replicated)
                   + tuple(map(shardings_of, teacher_args)), out_shardings=(shardings_of(state), replicated),
                   donate_argnums=0)
  abstract_batch = {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=batch_sharding) for k, s in batch_shapes.items()}
  abstract_hparams = {k: jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated) for k in optimizer.HYPERPARAMETERS}
  with jax.set_mesh(mesh):  # the mesh the models' sharding.constrain reads (sequence parallelism)
    return jitted.lower(checkpoint.abstract(state), abstract_batch, abstract_hparams,
                        *map(checkpoint.abstract, teacher_args))


def place_hparams(config, mesh) -> dict:
  """The config's optimizer hyper-parameters as replicated arrays: the train step's third argument."""
  return jax.device_put(optimizer.hyperparameters(config), sharding.replicated(mesh))


def lower_abstract_step(config, mesh):
  """(the config's train step lowered for its abstract state on `mesh`, that abstract state): shapes and
  shardings only, nothing allocated (FLOP and memory analyses of configs of any size)."""
  state, graphdef = abstract_state(config, mesh)
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in pipeline.synthetic_batch(config).items()}
  return lower_step(make_train_step(config, graphdef), state, shapes, mesh), state


def _cost(stage, key: str) -> float:
  """One entry of XLA's cost analysis of a lowered or compiled program; NaN when the backend gives no positive one."""
  cost = stage.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  value = float(cost.get(key, float("nan"))) if cost else float("nan")
  return value if value > 0 else float("nan")


def program_flops(stage) -> float:
  """FLOPs from XLA's cost analysis of a lowered or compiled program (NaN when the backend gives none). A lowered
  program counts the whole (global) computation; a compiled, partitioned one counts one device's share."""
  return _cost(stage, "flops")


def program_bytes(compiled) -> float:
  """Bytes one device reads and writes in a compiled program by XLA's cost analysis (each fused kernel's operands
  and outputs; NaN when the backend gives none): the memory traffic of a roofline."""
  return _cost(compiled, "bytes accessed")


def flops_per_device(lowered, mesh) -> float:
  """The model FLOPs of a lowered program split evenly over the mesh's devices (what MFU divides). Counted before
  XLA optimises the program: XLA:GPU rewrites convolutions and matmuls into cuDNN and cuBLAS calls that its cost
  analysis of the compiled program does not count (a 64 px U-Net step gave 1.09 of its 11.0 TFLOP on an H200).
  On a CPU the compiled program's count is within 2% of this (tested). NaN where the backend counts no lowered
  program (XLA:GPU behind its PJRT plugin): `flops_on_cpu` counts those."""
  return program_flops(lowered) / mesh.devices.size


def flops_on_cpu(config) -> float:
  """The model FLOPs of one train step of `config` (all devices' together) as XLA:CPU counts the step lowered for
  one CPU device, with model.remat off: a rematerialised forward pass is recomputation, which MFU does not count,
  and backends that give no count of a lowered program get one. Attention that would run cuDNN's kernel ("auto",
  "cudnn"; it has no CPU lowering) is counted as a CPU runs it ("folded"), and a distillation's teacher steps are
  left out."""
  counted = config.copy_and_resolve_references()
  if counted.model.attention in ("auto", "cudnn"):
    counted.model.attention = "folded"
  counted.model.remat = False
  counted.mesh.update(data=-1, fsdp=1, sequence=1, tensor=1)
  lowered, _ = lower_abstract_step(counted, sharding.make_mesh(counted.mesh, devices=jax.devices("cpu")[:1]))
  return program_flops(lowered)


def compile_step(config, train_step, state, batch_shapes: dict, mesh, teacher=None):
  """lower_step, compiled once; returns (compiled, model FLOPs per step per device: `flops_per_device`, or
  `flops_on_cpu` split over the mesh where model.remat is on or the backend counts no lowered program)."""
  lowered = lower_step(train_step, state, batch_shapes, mesh, teacher)
  flops = float("nan") if config.model.remat else flops_per_device(lowered, mesh)
  if np.isnan(flops):
    flops = flops_on_cpu(config) / mesh.devices.size
  return lowered.compile(), flops


# ----------------------------------------------------------------------------- text-embedding cache


def open_text_cache(config, graphdef, state, tokenizer, source):
  """The frozen encoder's embeddings of every training caption, built by process 0 on first use."""
  frozen_text = state.frozen.get("text_encoder")
  if not frozen_text:
    raise ValueError("text.embedding_cache needs a frozen text encoder (text.trainable=False).")
  t = config.text  # the tokenizer's identity: its kind and files (CLIP's: SDXL's two; SD3's and Flux's T5 length)
  t5 = f"|t5 {t.t5_max_length}" if config.model.backbone in ("sd3", "flux") else ""
  key = embedding_cache.cache_key(
      frozen_text, t.tokenizer + t.spiece_path + t.tokenizer_path + t.second_tokenizer_path + t5, t.max_length)
  directory = pathlib.Path(config.text.embedding_cache).expanduser()
  if jax.process_index() == 0 and not (directory / "meta.json").exists():
    # Parameters are arguments, not closed-over constants baked into the compiled program.
    encode_jit = jax.jit(lambda params, frozen, ids, mask: nnx.merge(graphdef, params, frozen).encode(ids, mask))
    encode = lambda ids, mask: encode_jit(state.params, state.frozen, ids, mask)
    captions = (source[i][config.data.caption_key] for i in range(len(source)))
    log.info("building the text-embedding cache in %s", directory)
    token_width = nnx.merge(graphdef, state.params, state.frozen).token_width  # (no computation: a Python int)
    embedding_cache.build(directory, captions, tokenizer, encode, key, token_width=token_width)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("text-embedding cache built")
  return embedding_cache.EmbeddingCache(directory, key)


def open_latent_cache(config, graphdef, state, source, batch_size: int = 64):
  """The frozen autoencoder's posterior of every training example (and a super-resolution stage's clean low-res
  input), built by process 0 on first use."""
  lowres = config.model.lowres_conditioning
  key = latent_cache.cache_key(state.frozen["autoencoder"], config.data, config.superres if lowres else None)
  directory = pathlib.Path(config.latent.cache).expanduser()
  if jax.process_index() == 0 and not (directory / "meta.json").exists():
    posterior_jit = jax.jit(lambda params, frozen, x: nnx.merge(graphdef, params, frozen).autoencoder.posterior(x))
    lowres_jit = jax.jit(lambda x: superres.lowres_input(x, config))

    def encode(pixels):
      moments = posterior_jit(state.params, state.frozen, pixels)
      return dict(zip(("mean", "logvar"), moments), **({"lowres": lowres_jit(pixels)} if lowres else {}))

    loader = pipeline.make_loader(config.data, source, None, batch_size, seed=0, shuffle=False, num_epochs=1,
                                  shard_options=grain.NoSharding(), drop_remainder=False)
    batches = ((b[pipeline.RECORD_INDEX], b["video"] if "video" in b else b["image"]) for b in loader)
    log.info("building the latent cache of %d training records in %s", len(source), directory)
    latent_cache.build(directory, len(source), batches, encode, key)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("latent cache built")
  return latent_cache.LatentCache(directory, key)


# ----------------------------------------------------------------------------- loop


def _host_metrics(metrics, flops, step_time, data_time, batch_size, peak):
  metrics = jax.device_get(metrics)
  out = {k: v for k, v in metrics.items() if np.ndim(v) == 0}
  for i, (total, count) in enumerate(zip(metrics["loss_by_logsnr_sum"], metrics["loss_by_logsnr_count"])):
    edges = (-np.inf,) + LOGSNR_BIN_EDGES + (np.inf,)
    out[f"loss_by_logsnr/{edges[i]:g}_to_{edges[i + 1]:g}"] = total / count if count else float("nan")
  out["step_time_s"] = step_time
  out["data_wait_s"] = data_time
  out["examples_per_s"] = batch_size / step_time
  out["tflops_per_device"] = flops / step_time / 1e12
  out["mfu"] = flops / step_time / peak
  return out


def train_and_evaluate(config, workdir: str):
  """Build everything from the config, resume from the workdir if it has checkpoints, train; returns
  (state, graphdef). One training job per workdir at a time (a second is refused)."""
  config_checks.validate(config, reads_data=True)
  if text_to_image.flux_control(config) and not config.data.reference_key:
    raise ValueError("model.flux_path is FLUX.1 Depth / Canny's transformer, which trains on images paired with "
                     "control images (depth maps, edge maps): give them as data.reference_key (a folder prepared "
                     "with python -m diffusion_jax.data.folder_dataset --references: each image's control image as "
                     "its reference), or sample it (python -m diffusion_jax.sample --config=configs/flux.py:ROOT "
                     "--init_image=CONTROL)")
  workdir = str(workdir)
  checkpoint.prepare_workdir(workdir)
  with checkpoint.workdir_lock(workdir):
    return _train(config, workdir)


def _train(config, workdir: str):
  # ---------------------------------------------------------------- mesh
  mesh = sharding.make_mesh(config.mesh)
  log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), jax.device_count(), jax.process_count())
  # ---------------------------------------------------------------- model and optimizer: restored, or initialised
  mngr = checkpoint.manager(workdir, keep=config.train.keep_checkpoints)
  resuming = bool(mngr.all_steps())
  if resuming:
    check_resumable(config, workdir, mesh)
  # A resumed run restores into the abstract state: nothing is initialised first (no init program to compile,
  # no second copy of the state in device memory while the checkpoint is read).
  state, graphdef = abstract_state(config, mesh) if resuming else init_state(config, mesh)
  restored, step = checkpoint.restore(mngr, state) if resuming else (None, None)
  if restored is not None:
    state = restored
    log.info("resumed from step %d", step)
    checkpoint.set_aside_newer(mngr, step)  # so that those steps can be saved again
  log.info("parameters: %d trainable, %d frozen", count_params(state.params), count_params(state.frozen))
  teacher = None
  if config.distill.steps:  # the run the student started from: read again on a resume
    teacher = (distillation.teacher_weights(config, mesh) if resuming
               else jax.jit(lambda p: jax.tree.map(jnp.copy, p))(state.params))  # not the donated buffers
    log.info("distilling finetune.workdir=%s into a student of %d DDIM steps", config.finetune.workdir,
             config.distill.steps)
  teacher_args = () if teacher is None else (teacher,)
  # ---------------------------------------------------------------- input
  tokenizer = tokenizers.from_config(config)
  source = pipeline.data_source(config.data, "train")
  text_cache = open_text_cache(config, graphdef, state, tokenizer, source) if config.text.embedding_cache else None
  latents = open_latent_cache(config, graphdef, state, source) if config.latent.cache else None
  per_process = config.train.batch_size // jax.process_count()
  batches = lambda seed: iter(pipeline.make_loader(config.data, source, tokenizer, per_process, seed=seed,
                                                   text_cache=text_cache, latent_cache=latents))
  data_iter = batches(config.seed)
  metadata = checkpoint.run_metadata(config)
  save = lambda: checkpoint.save(mngr, step, state, data_iter, force=True, metadata=metadata)
  if restored is not None:
    unfit = checkpoint.restore_input_position(mngr, step, data_iter)
    if distributed.any_process(unfit is not None):
      log.warning("the input position saved at step %d does not fit this run (%s): another batch size or process "
                  "count? The data order restarts with a new shuffle (seed %d).", step, unfit or "on another process",
                  config.seed + step)
      data_iter = batches(config.seed + step)
    if step > config.train.steps:
      log.warning("the workdir is at step %d, past train.steps=%d: nothing to train (raise --config.train.steps "
                  "to train on).", step, config.train.steps)
  if jax.process_index() == 0:  # only once the checkpoints are known to fit it
    checkpoint.write_config(workdir, config)
  step = int(state.step)
  # ---------------------------------------------------------------- compile
  first = next(data_iter)
  batch_shapes = {k: jax.ShapeDtypeStruct((config.train.batch_size,) + np.shape(v)[1:], np.asarray(v).dtype)
                  for k, v in first.items() if k in pipeline.MODEL_INPUTS}
  compile_start = time.perf_counter()
  compiled, flops = compile_step(config, make_train_step(config, graphdef), state, batch_shapes, mesh, teacher)
  log.info("train step compiled in %.1f s%s", time.perf_counter() - compile_start,
           "" if jax.config.jax_compilation_cache_dir else
           " (JAX_COMPILATION_CACHE_DIR=DIR keeps compiled programs for resumes and for reruns that change only "
           "optimizer numbers, train.steps or the seed)")
  hparams = place_hparams(config, mesh)
  memory = compiled.memory_analysis()
  if memory is not None:
    log.info("per-device memory: arguments %.1f MB, temporaries %.1f MB",
                 memory.argument_size_in_bytes / 1e6, memory.temp_size_in_bytes / 1e6)
  peak, peak_source = hardware.peak_flops()
  log.info("train step: %.3g FLOPs per device; peak %.3g FLOP/s per device (%s)", flops, peak, peak_source)
  # ---------------------------------------------------------------- loop
  writer = metric_writers.MetricWriter(workdir, config.train.steps)
  writer.start(step)
  batch_sharding = sharding.batch_sharding(mesh)
  keys = tuple(batch_shapes)
  pending, local = None, first
  interval_start, data_time = time.perf_counter(), 0.0
  with stop_signals.StopSignals(stop_signals.job_signals()) as stop:  # SIGTERM / Ctrl-C: save, then stop
    while step < config.train.steps:
      data_start = time.perf_counter()
      local = local if local is not None else next(data_iter)
      batch = pipeline.to_global({k: local[k] for k in keys}, batch_sharding)
      data_time += time.perf_counter() - data_start
      local = None
      state, metrics = compiled(state, batch, hparams, *teacher_args)
      step += 1
      if pending is not None:  # metrics are read one step late so the host never stalls the device
        writer.write(*pending)
        pending = None
      if step % config.train.log_every == 0 or step == config.train.steps:
        jax.block_until_ready(metrics)
        steps_done = (step - 1) % config.train.log_every + 1
        step_time = (time.perf_counter() - interval_start) / steps_done
        pending = (step, _host_metrics(metrics, flops, step_time, data_time / steps_done, config.train.batch_size,
                                       peak) | {"skipped_records": source.skipped})
        run = int(state.nonfinite_run)
        if run >= config.train.max_nonfinite:
          save()
          mngr.wait_until_finished()
          hint = ("No step has updated the weights: the weights the run started from and its data make them, not "
                  "training (are the data finite? has the text encoder an embedding for every token id?)." if (
                      run >= step) else "Lower optimizer.learning_rate or set model.dtype='float32'.")
          raise FloatingPointError(f"{run} steps in a row had a non-finite loss or gradient (step {step}); the last "
                                   f"good state is saved in {workdir}. {hint}")
      stopping = stop_signals.all_stop(stop, step, config.train.log_every) or mngr.reached_preemption(step)
      if step % config.train.checkpoint_every == 0 or step == config.train.steps or stopping:
        save()
      if stopping:
        break
      if config.train.sample_every and step % config.train.sample_every == 0 and step < config.train.steps:
        sample_start = time.perf_counter()
        log.info("samples at step %d: %s", step, sample.write_training_samples(
            config, sample.weights_of(state, config.sample.use_ema), graphdef, step, workdir))
        interval_start += time.perf_counter() - sample_start  # step times and MFU leave sampling out
      if step % config.train.log_every == 0:
        interval_start, data_time = time.perf_counter(), 0.0
    if pending is not None:
      writer.write(*pending)
    mngr.wait_until_finished()  # still inside: a first Ctrl-C here cannot cut the last save short
  writer.close()
  if step < config.train.steps:
    log.warning("%s: checkpoint saved at step %d of %d; rerun the same command to resume.",
                stop.received or "stop requested by another process or a preemption notice", step,
                config.train.steps)
  (log.warning if int(state.nonfinite_total) else log.info)("non-finite steps skipped: %d",
                                                           int(state.nonfinite_total))
  return state, graphdef
