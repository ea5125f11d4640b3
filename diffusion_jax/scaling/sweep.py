"""A scaling sweep: model sizes x compute budgets (x learning rates), each run's length derived from its measured
FLOPs.

A sweep config (see `configs/scaling/`) names an experiment config (`file.py[:variant]`), width and
depth multipliers of its U-Net, compute budgets C in training FLOPs and optionally learning rates to try at
each size and budget (the fits then use the best). A run's examples are
D = C / FLOPs-per-example, where FLOPs per example come from XLA's cost analysis of the compiled train
step (forward, backward and optimizer update; not the 6N rule), so steps = D / batch size.
"""

import dataclasses
import hashlib
import importlib.util
import itertools
import json
import math
import pathlib

import ml_collections


# What a sweep config holds (configs/scaling/shapes_t2i.py documents each).
FIELDS = ("experiment", "common", "width_multipliers", "depth_multipliers", "budgets", "learning_rates", "min_steps",
          "warmup_fraction", "checkpoints_per_run", "heldout_examples", "generation_metrics", "bootstrap_samples")


@dataclasses.dataclass(frozen=True)
class Run:
  name: str                # "<size>_C<budget>[_lr<learning rate>]", also the run's workdir name
  size: str
  budget: float            # training FLOPs
  overrides: dict          # flat "section.field" -> value, applied to the experiment config
  flops_per_example: float
  params: int
  steps: int
  batch_size: int

  @property
  def total_flops(self) -> float:
    return self.steps * self.batch_size * self.flops_per_example


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """The config of `path.py[:variant]`, as `--config=` would load it."""
  path, _, variant = spec.partition(":")
  if not pathlib.Path(path).is_file():
    raise ValueError(f"Config file {path!r} does not exist (paths are relative to the working directory).")
  module_spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def apply(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  config = config.copy_and_resolve_references()
  for key, value in overrides.items():
    *sections, field = key.split(".")
    node = config
    for section in sections:
      node = node[section]
    if field not in node:
      raise ValueError(f"Sweep override {key!r} names no field of the experiment config.")
    node[field] = value
  return config


def flatten(nested, prefix: str = "") -> dict:
  """{"data": {"data_dir": x}} -> {"data.data_dir": x}."""
  flat = {}
  for key, value in nested.items():
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def size_overrides(sweep, experiment) -> dict:
  """{size name: overrides} for the grid of width x depth multipliers (depth: the U-Net's residual blocks per
  level, or the DiT's blocks). Widths are rounded to multiples of the attention head count so every level
  divides into heads (a DiT's also to multiples of 4, for its position embedding)."""
  model, sizes = experiment.model, {}
  step = math.lcm(model.heads, 4) if model.backbone == "dit" else model.heads
  for width, depth in itertools.product(sweep.width_multipliers, sweep.depth_multipliers):
    channels = max(1, round(model.channels * width / step)) * step
    if model.backbone == "dit":
      deeper = {"model.depth": max(1, round(model.depth * depth))}
    else:
      deeper = {"model.num_res_blocks": tuple(max(1, round(b * depth)) for b in model.num_res_blocks)}
    sizes[f"c{channels}_d{depth:g}"] = {"model.channels": channels, **deeper}
  return sizes


def measurement_key(config) -> str:
  """What the train step's FLOPs depend on: model, text encoder, objective, batch and input shape."""
  relevant = {k: config[k].to_dict() for k in ("model", "text", "diffusion")}
  relevant |= {"batch_size": config.train.batch_size, "grad_accum": config.train.grad_accum,
               "resolution": config.data.resolution, "frames": config.data.frames}
  if config.data.width:  # (added later: square runs keep their keys)
    relevant["width"] = config.data.width
  return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def measure_step(config) -> tuple[float, int]:
  """(FLOPs per example, trainable parameters) of the config's train step lowered for one device, from
  abstract shapes: XLA's cost analysis of the program before optimisation (within 2% of the compiled one's,
  tested), so planning compiles nothing and allocates nothing. One device counts the work once: on N
  data-parallel devices each also repeats the optimizer update, which is not training compute."""
  import jax

  from diffusion_jax import sharding, train

  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  lowered, state = train.lower_abstract_step(config, mesh)
  return train.program_flops(lowered) / config.train.batch_size, train.count_params(state.params)


def budget_name(budget: float) -> str:
  return f"C{budget:.2e}".replace("+", "")


def problems(sweep) -> list[str]:
  """What makes a sweep config plan nothing, or runs that cannot train: an empty grid or budget list, multipliers,
  budgets or learning rates that are not positive (NaN included), counts below their least."""
  found = [f"sweep.{field}=() is empty" for field in ("width_multipliers", "depth_multipliers", "budgets")
           if not len(sweep[field])]
  found += [f"sweep.{field}={tuple(sweep[field])} must all be > 0" for field in
            ("width_multipliers", "depth_multipliers", "budgets", "learning_rates")
            if any(not value > 0 for value in sweep[field])]
  found += [f"sweep.{field}={sweep[field]} must be >= {least}" for field, least in
            (("min_steps", 1), ("checkpoints_per_run", 1), ("heldout_examples", 1), ("generation_metrics", 0),
             ("bootstrap_samples", 1)) if not sweep[field] >= least]
  if not 0 <= sweep.warmup_fraction < 1:
    found.append(f"sweep.warmup_fraction={sweep.warmup_fraction} must be in [0, 1)")
  return found


def plan(sweep, measurements_path=None) -> list[Run]:
  """Every run of the sweep, sizes outer and budgets inner. Step measurements are cached in
  `measurements_path` (JSON, keyed by the sized config) so a resumed sweep does not recompile them."""
  missing = [field for field in FIELDS if field not in sweep]
  if missing:
    raise ValueError(f"The sweep config has no {', '.join(missing)} (configs/scaling/shapes_t2i.py documents "
                     "each field; e.g. learning_rates=() trains with the experiment's learning rate).")
  if found := problems(sweep):
    raise ValueError("The sweep config cannot be planned: " + "; ".join(found) + ".")
  common = flatten(sweep.common)
  experiment = apply(load_config_file(sweep.experiment), common)
  path = pathlib.Path(measurements_path) if measurements_path else None
  cache = json.loads(path.read_text()) if path and path.exists() else {}
  runs, too_short = [], []
  for size, overrides in size_overrides(sweep, experiment).items():
    sized = apply(experiment, overrides)
    key = measurement_key(sized)
    if key not in cache:
      cache[key] = measure_step(sized)
      if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache, indent=1))
    flops_per_example, params = cache[key]
    for budget, learning_rate in itertools.product(sweep.budgets, tuple(sweep.learning_rates) or (None,)):
      steps = round(budget / (flops_per_example * sized.train.batch_size))
      name = f"{size}_{budget_name(budget)}" + (f"_lr{learning_rate:g}" if learning_rate else "")
      if steps < sweep.min_steps:
        too_short.append(f"{name}: {steps} steps")
      run_overrides = common | overrides | {
          "train.steps": steps, "optimizer.warmup_steps": max(1, round(steps * sweep.warmup_fraction)),
          "train.checkpoint_every": max(1, steps // sweep.checkpoints_per_run), "train.log_every":
          max(1, min(sized.train.log_every, steps // 10)), "train.sample_at_end": False,
          "train.sample_every": 0}  # the held-out loss is the measurement; samples would only cost time
      if learning_rate:
        run_overrides["optimizer.learning_rate"] = float(learning_rate)
      runs.append(Run(name, size, float(budget), run_overrides, float(flops_per_example), int(params), steps,
                      sized.train.batch_size))
  if too_short:
    raise ValueError(f"These runs would train for fewer than sweep.min_steps={sweep.min_steps} steps; raise the "
                     "smallest budget or shrink the largest model:\n  " + "\n  ".join(too_short))
  return runs


def run_config(sweep, run: Run) -> ml_collections.ConfigDict:
  return apply(load_config_file(sweep.experiment), run.overrides)


def flag_value(value) -> str:
  if isinstance(value, (tuple, list)):
    return "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def main_command(sweep, run: Run, workdir) -> list[str]:
  """`python -m diffusion_jax.main` arguments that train this run (for launchers and clusters)."""
  return [f"--config={sweep.experiment}", *(f"--config.{k}={flag_value(v)}" for k, v in run.overrides.items()),
          f"--workdir={workdir}"]
