"""Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"): classifier-free
guidance's unconditional branch replaced by a weaker model conditioned on the same prompt, so that guidance
pushes away from that model's errors rather than from the unconditional distribution.

The guide is a checkpoint of a training workdir: an earlier step of the model's own run, or a run of a smaller
model of the same experiment. It must see and predict what the model does (the fields in GUIDE_FIELDS); it
encodes the prompt with its own text encoder. `sample.py --guide_workdir=DIR [--guide_step=N]` and
`evaluate.py` (the same flags) sample with it, and a cascade stage with its `guide_workdir` and `guide_step`
fields; samplers.make_denoiser combines the two predictions as it does the conditional and unconditional ones
(guidance scale, rescale and interval alike).
"""

import dataclasses
from typing import Any

from diffusion_jax import checkpoint

# Why the --guide_* flags are refused with --cascade, and what to give instead.
WITH_CASCADE = ("not used with --cascade: give the guide to the stage it guides (--cascade.stages[K].guide_step=N, "
                "--cascade.stages[K].guide_workdir=DIR)")
# Config fields the guide must share with the model it guides: the same inputs (image size, latents, frames,
# low-res conditioning), the same output parameterisation, and the same tokens.
GUIDE_FIELDS = ("data.resolution", "data.width", "latent.autoencoder_path", "model.in_channels", "model.temporal",
                "model.lowres_conditioning", "superres.lowres_resolution", "superres.lowres_frames",
                "superres.residual", "diffusion.path", "diffusion.prediction", "diffusion.sigma_data",
                "text.tokenizer", "text.max_length", "text.spiece_path")


@dataclasses.dataclass(frozen=True)
class Guide:
  config: Any       # the guide run's experiment config
  graphdef: Any
  params: Any       # the weights sampled with (its first EMA copy when the model samples with EMA)
  frozen: Any
  workdir: str
  step: int


def problems(config, guide_config) -> list[str]:
  """'field: model's -> guide's' for every GUIDE_FIELDS field in which the guide's config differs."""
  differences = checkpoint.config_differences(config, guide_config)
  return [d for d in differences if d.split(":")[0] in GUIDE_FIELDS]


def check_fit(config, workdir) -> None:
  """A ValueError naming every GUIDE_FIELDS field in which the run in `workdir` (its config.json: no checkpoint
  is read) differs from the model of `config`."""
  if found := problems(config, checkpoint.read_config(workdir)):
    raise ValueError(f"the guide {workdir} does not see or predict what the model does: {'; '.join(found)} (the "
                     "model's -> the guide's)")


def load(config, workdir, step: int | None, use_ema: bool, mesh_config=None) -> Guide:
  """The guide from `workdir`'s checkpoint `step` (default: the latest) for the model of `config`, on the model's
  mesh (sample.load_checkpoint's `mesh_config`); check_fit's ValueError before any checkpoint is read."""
  from diffusion_jax import sample

  check_fit(config, workdir)
  try:
    guide_config, weights, graphdef, step, _ = sample.load_checkpoint(workdir, step, use_ema, mesh_config)
  except ValueError as error:
    raise ValueError(f"the autoguidance guide (--guide_workdir, --guide_step): {error}") from None
  return Guide(guide_config, graphdef, weights.params, weights.frozen, str(workdir), step)


def check_negative_prompts(negative_prompts) -> None:
  """A ValueError when any of `negative_prompts` is given: a negative prompt and a guide both replace guidance's
  unconditional branch."""
  if any(negative_prompts):
    raise ValueError("negative prompts and an autoguidance guide both replace guidance's unconditional branch: "
                     "give one of them (drop --negative_prompt and the prompts file's, or the --guide_* flags)")


def define_flags():
  """--guide_workdir and --guide_step, flags of the sampling and the evaluation job (read by `load`)."""
  from absl import flags

  flags.DEFINE_string("guide_workdir", None, "Autoguidance: a workdir of this experiment whose weaker model (fewer "
                      "steps, or a smaller run) is guidance's other branch instead of the unconditional model.")
  flags.DEFINE_integer("guide_step", None, "Autoguidance: the guide's checkpoint (default its latest); alone, a "
                       "checkpoint of --workdir.")


def provenance(guide: Guide) -> dict:
  """What sample and evaluation outputs record of the guide."""
  return {"workdir": guide.workdir, "step": int(guide.step)}
