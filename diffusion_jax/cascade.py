"""Cascaded sampling (Imagen): a base stage, then super-resolution stages, each its own experiment.

A cascade config (`configs/cascades/*.py`) names each stage's training workdir, its sampling settings
(sampler, steps, guidance, thresholding, and for super-resolution stages the noise-augmentation
level of the low-resolution input), LoRA adapters to fuse into its weights (lora.py), an autoguidance guide
(autoguidance.py: a weaker checkpoint of the same stage's experiment) and the mesh it samples on (a large
super-resolution stage's weights sharded with fsdp, a data-parallel base below it). Stage k > 0 must be a
super-resolution stage whose input (`superres.lowres_resolution`, and for video `superres.lowres_frames`) is what
stage k - 1 produces; a chain that does not fit is refused before anything is sampled. Video cascades chain spatial
and temporal super-resolution stages the same way (Imagen Video). Every stage's output is kept and written with
its provenance.
"""

import dataclasses
import pathlib

import numpy as np

from diffusion_jax import autoguidance, checkpoint, config_checks, lora, media, sample, sharding, superres
from diffusion_jax.data import pipeline

STAGE_SETTINGS = ("sampler", "steps", "guidance_scale", "guidance_rescale", "guidance_interval", "threshold",
                  "threshold_percentile", "aug_level", "use_ema", "eta", "frames", "batch_size", "negative_prompt")


@dataclasses.dataclass
class Stage:
  workdir: str
  config: object           # the stage's experiment config (from its workdir)
  sample_config: object    # its `sample` section with the cascade's settings for this stage
  adapters: list = dataclasses.field(default_factory=list)  # lora.Adapters fused into its weights
  mesh_config: dict | None = None  # its entry's `mesh` (sharding.mesh_from_flag), None: sharding.SAMPLING_MESH
  weights: object = None   # sample.Weights of its checkpoint (the sample_config's use_ema), adapters fused
  guide: object = None     # an autoguidance.Guide, or None
  graphdef: object = None
  step: int = 0
  mesh: object = None


def stage_adapters(settings, index: int) -> list:
  """The lora.Adapters a stage entry names (`lora`: comma-separated FILE[:SCALE]); a ValueError naming the
  stage's field."""
  specs = [spec.strip() for spec in (settings.get("lora") or "").split(",") if spec.strip()]
  try:
    return [lora.read(spec) for spec in specs]
  except ValueError as error:
    raise ValueError(f"stage {index} (--cascade.stages[{index}].lora): {error}") from None


def stage_mesh(settings, index: int) -> dict | None:
  """The mesh config a stage entry names (`mesh`: AXIS=SIZE,... as --mesh; "" = None, data-parallel); a
  ValueError naming the stage's field."""
  try:
    return sharding.mesh_from_flag(settings.mesh) if settings.get("mesh") else None
  except ValueError as error:
    raise ValueError(f"stage {index} (--cascade.stages[{index}].mesh): {error}") from None


def stage_configs(cascade) -> list[Stage]:
  """Each stage's experiment config with the cascade's sampling settings; nothing is restored yet."""
  stages = []
  for index, settings in enumerate(cascade.stages):
    try:
      config = checkpoint.read_config(settings.workdir)
    except ValueError:  # read_config's advice names --workdir; a stage's workdir is set by its own field
      raise ValueError(f"stage {index}: {str(settings.workdir)!r} is not a diffusion_jax workdir (no config.json): "
                       f"train that stage first, or set --cascade.stages[{index}].workdir=DIR") from None
    sample_config = config.sample.copy_and_resolve_references()
    for key in STAGE_SETTINGS:
      if key in settings and settings[key] is not None:
        sample_config[key] = settings[key]
    sample_config.num_per_prompt, sample_config.seed = cascade.num_per_prompt, cascade.seed + index
    sample_config.update(height=0, width=0)  # (each stage samples at its data.resolution, the next stage's input)
    stages.append(Stage(settings.workdir, config, sample_config, stage_adapters(settings, index),
                        stage_mesh(settings, index)))
  return stages


def set_every_stage(cascade, **settings) -> None:
  """Give every stage of a cascade config these fields (STAGE_SETTINGS, mesh; those that are not None)."""
  for stage in cascade.stages:
    stage.update({key: value for key, value in settings.items() if value is not None})


def chain_problems(stages) -> list[str]:
  """Why these stages do not form a cascade (empty when they do)."""
  found = []
  if not stages:
    return ["a cascade needs at least one stage"]
  if stages[0].config.model.lowres_conditioning:
    found.append(f"stage 0 ({stages[0].workdir}) is a super-resolution stage; the first stage must be a base model")
  for k in range(1, len(stages)):
    below, stage = stages[k - 1].config, stages[k].config
    if not stage.model.lowres_conditioning:
      found.append(f"stage {k} ({stages[k].workdir}) is not a super-resolution stage (model.lowres_conditioning)")
    elif (produced := pipeline.image_size(below.data)) != (stage.superres.lowres_resolution,) * 2:
      found.append(f"stage {k} ({stages[k].workdir}) upsamples from {stage.superres.lowres_resolution} px squares but "
                   f"stage {k - 1} ({stages[k - 1].workdir}) produces {produced[0]} x {produced[1]} px images")
    if stage.model.temporal != below.model.temporal:
      found.append(f"stages {k - 1} and {k} mix image and video models")
    elif stage.model.temporal and stage.model.lowres_conditioning:
      produced = stages[k - 1].sample_config.frames or below.data.frames
      wanted = stage.superres.lowres_frames or stages[k].sample_config.frames or stage.data.frames
      if produced != wanted:
        found.append(f"stage {k} ({stages[k].workdir}) takes {wanted}-frame clips but stage {k - 1} produces "
                     f"{produced} frames")
  return found


def load(cascade) -> list[Stage]:
  """Validate the chain, then restore every stage's checkpoint (`step`, default the latest)."""
  stages = stage_configs(cascade)
  found = chain_problems(stages)
  found += [f"stage {k}: {problem}" for k, stage in enumerate(stages)
            for problem in config_checks.sample_problems(stage.sample_config, "--")]
  for k, stage in enumerate(stages):
    try:
      lora.check(stage.adapters, stage.config)
    except ValueError as error:
      found.append(f"stage {k} (--cascade.stages[{k}].lora): {error}")
  found += guide_problems(stages, cascade)
  for k, stage in enumerate(stages):
    field = f"--cascade.stages[{k}].frames" if stage.sample_config.frames else f"stage {k}'s data.frames"
    frames = stage.sample_config.frames or stage.config.data.frames
    found += [f"stage {k} (--cascade.stages[{k}].mesh): {problem.removeprefix('--mesh: ')}"
              for problem in sample.mesh_problems(stage.config, stage.mesh_config, frames, field)]
  if found:
    raise ValueError("Invalid cascade:\n  - " + "\n  - ".join(found))
  for k, (stage, settings) in enumerate(zip(stages, cascade.stages)):
    step = None if settings.step < 0 else settings.step
    _, weights, stage.graphdef, stage.step, stage.mesh = sample.load_checkpoint(
        stage.workdir, step, stage.sample_config.use_ema, stage.mesh_config)
    stage.weights = lora.fused(weights, stage.adapters)
    if guided(settings):
      try:
        stage.guide = autoguidance.load(stage.config, settings.guide_workdir or stage.workdir,
                                        None if settings.guide_step < 0 else settings.guide_step,
                                        stage.sample_config.use_ema, stage.mesh_config)
      except ValueError as error:
        raise ValueError(f"stage {k} (--cascade.stages[{k}].guide_workdir, guide_step): {error}") from None
  return stages


def guided(settings) -> bool:
  """Whether a cascade stage entry names an autoguidance guide."""
  return bool(settings.get("guide_workdir")) or settings.get("guide_step", -1) >= 0


def guide_problems(stages, cascade) -> list[str]:
  """Why a stage's guide cannot guide it (read from config.json files only: no checkpoint is restored)."""
  found = []
  for k, (stage, settings) in enumerate(zip(stages, cascade.stages)):
    if not guided(settings):
      continue
    where = f"stage {k} (--cascade.stages[{k}].guide_workdir, guide_step)"
    try:
      autoguidance.check_negative_prompts([stage.sample_config.negative_prompt])
      autoguidance.check_fit(stage.config, settings.guide_workdir or stage.workdir)
    except ValueError as error:
      found.append(f"{where}: {error}")
  return found


def generate_stage(stage, prompts: list[str], lowres=None, distinct_noise: bool = False, sample_config=None):
  """One stage's samples, uint8 [len(prompts), num_per_prompt, (frames,) res, res, 3], upsampling `lowres` (the
  stage below's samples) when it is a super-resolution stage; `sample_config` (default the stage's, whose
  use_ema chose the weights) as in `generate`."""
  from diffusion_jax.text import tokenizers

  sample_config = sample_config or stage.sample_config
  seeds = sample_config.seed + np.arange(len(prompts)) if distinct_noise else None
  return sample.generate(stage.config, stage.graphdef, stage.weights.params, stage.weights.frozen,
                         tokenizers.from_config(stage.config), prompts, sample_config, stage.mesh, seeds=seeds,
                         lowres=lowres, guide=stage.guide)


def generate(stages, prompts: list[str], distinct_noise: bool = False) -> list[np.ndarray]:
  """Every stage's samples, uint8 [len(prompts), num_per_prompt, (frames,) res, res, 3], base first.

  By default every prompt starts from its stage's seed (prompts compared on the same noise);
  distinct_noise gives prompt i the seed + i instead (evaluation: a set of independent samples)."""
  outputs = []
  for stage in stages:
    outputs.append(generate_stage(stage, prompts, outputs[-1] if outputs else None, distinct_noise))
  return outputs


def downsampled(images, config) -> np.ndarray:
  """uint8 images [n, (frames,) h, w, 3] -> uint8 at a super-resolution stage's input size."""
  return media.to_uint8(superres.downsample(media.to_float(images), config.superres.lowres_resolution))


def validation_lowres(config, count: int, num_per_prompt: int):
  """(captions, uint8 low-res inputs [count, num_per_prompt, ...]): the first validation examples
  downsampled to a super-resolution stage's input size, to show what the stage does on its own."""
  from diffusion_jax import evaluate

  images, captions, _ = evaluate.validation_media(config, count)
  return captions, np.repeat(downsampled(images, config)[:, None], num_per_prompt, axis=1)


def provenance(stages) -> list[dict]:
  """What made a cascade's output: each stage's workdir, checkpoint step, config hash, adapters and guide (when
  any)."""
  return [{"stage": k, "workdir": str(s.workdir), "checkpoint_step": int(s.step),
           "config_hash": sample.config_hash(s.config), **({"lora": lora.provenance(s.adapters)} if s.adapters else {}),
           **({"guide": autoguidance.provenance(s.guide)} if s.guide is not None else {})}
          for k, s in enumerate(stages)]


def write(stages, prompts: list[str], outputs, output_dir) -> pathlib.Path:
  """`stage_<k>/` per stage (PNGs, grid, manifest) and `cascade.png`: each sample of the first
  sample.GRID_PROMPTS prompts at every stage, upsampled (nearest) to the final resolution, side by side. Returns
  the path of cascade.png."""
  output_dir = pathlib.Path(output_dir)
  chain = provenance(stages)
  entries = [{"prompt": p} for p in prompts]
  for k, (stage, images) in enumerate(zip(stages, outputs)):
    settings = {key: stage.sample_config[key] for key in STAGE_SETTINGS}
    sample.write_outputs(output_dir / f"stage_{k}", [{**e, "seed": stage.sample_config.seed} for e in entries],
                         images, {**settings, "checkpoint_step": int(stage.step),
                                  "config_hash": sample.config_hash(stage.config), "cascade": chain[:k + 1]})
  final = outputs[-1].shape[-2]
  enlarge = lambda x: x.repeat(final // x.shape[-2], axis=-2).repeat(final // x.shape[-3], axis=-3)
  rows = [np.concatenate([enlarge(o[p]) for o in outputs], axis=-2).reshape((-1,) + outputs[-1].shape[-3:-2] +
                                                                          (final * len(outputs), 3))
          for p in range(min(len(prompts), sample.GRID_PROMPTS))]
  path, shown = output_dir / "cascade.png", prompts[:len(rows)]
  media.save_png(path, media.labelled_grid(rows, shown), {"cascade": chain, "prompts": shown})
  return path
