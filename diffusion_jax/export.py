"""A fine-tuned Stable Diffusion, SD3, Flux or Wan run (a full fine-tune, or a LoRA run's updates merged into the
checkpoint it adapted), or a checkpoint with LoRA adapters merged into it, written as the kind of checkpoint it started
from: a diffusers root (the new U-Net or transformer(s), and the CLIP text encoders an adapter changed, beside the rest
of the root its config read), and for SD 1.x and SDXL with --single_file the same as one file in the original layout
(single_file.write), for diffusers' pipelines, A1111 and ComfyUI.

  python -m diffusion_jax.export --workdir=RUN --output=DIR [--step=N] [--use_ema=false] [--single_file=FILE]
                                 [--dtype=stored|float32|float16|bfloat16]
  python -m diffusion_jax.export --config=configs/stable_diffusion.py:ROOT --lora=ADAPTER[:SCALE] --output=DIR

Flags:
  --workdir      a full fine-tune of a Stable Diffusion 1.x, 2.x, SDXL, SD3, Flux or Wan checkpoint
                 (configs/stable_diffusion.py:ROOT, stable_diffusion3.py:ROOT, flux.py:ROOT, wan_t2v.py:ROOT; the
                 text encoders and VAE frozen), or a LoRA run of one, whose updates (the network's, and the CLIP text
                 encoders' with model.lora_text_encoder) are merged into the checkpoint's weights as read (python -m
                 diffusion_jax.lora writes them as an adapter file instead)
  --config       instead of --workdir: one of those configs, the checkpoint as downloaded (with --lora, to merge
                 adapters into it)
  --lora         FILE[:SCALE], repeatable: a LoRA adapter fused into the weights at SCALE (default 1): ours, or one in
                 a PyTorch layout that sample.py's flag reads (kohya's, diffusers', BFL's); one that updates the text
                 encoders has them written too
  --output       the diffusers root to write (must not exist): the config's root copied, with the new network
                 in unet/ or transformer/ (Wan 2.2 A14B's low-noise expert in transformer_2/), and the CLIP text
                 encoders an adapter changed in text_encoder/ (SDXL's and SD3's second in text_encoder_2/)
  --step         with --workdir: checkpoint step (default: the latest)
  --use_ema      with --workdir: the first EMA copy (default: the run's sample.use_ema) or, false, the trained weights
  --single_file  also write that root as one .safetensors in the original layout (SD 1.x, SDXL; must not exist)
  --dtype        the written parts' dtype: stored (default: the dtype the root stores each part in, float16 of most SD
                 checkpoints, bfloat16 of FLUX.1's), float32, float16 or bfloat16
"""

import logging
import pathlib

from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from diffusion_jax import checkpoint, cli, config_checks, lora, single_file

log = logging.getLogger(__name__)


FLOATS = ("float64", "float32", "float16", "bfloat16")
# backbone -> {the root's folder: (the model's attribute, the model field of its path)}
NETWORKS = {"sd_unet": {"unet": ("sd_unet", "sd_unet_path")}, "sd3": {"transformer": ("sd3", "sd3_path")},
            "flux": {"transformer": ("flux", "flux_path")},
            "wan": {"transformer": ("wan", "wan_path"), "transformer_2": ("wan_low", "wan_low_noise_path")}}


def networks(config) -> dict:
  """{root folder: the model's attribute} of the networks a config fine-tunes: its U-Net or transformer (and Wan 2.2
  A14B's low-noise expert)."""
  return {folder: attribute for folder, (attribute, field) in NETWORKS[config.model.backbone].items()
          if config.model[field]}


def source_root(config, what: str) -> pathlib.Path:
  """The diffusers root a Stable Diffusion, SD3, Flux or Wan config (`what`: the flag that gave it) read its parts
  from; a ValueError saying why it cannot be exported (another backbone, a LoRA of another run, parts from several
  places)."""
  m = config.model
  if m.backbone not in NETWORKS:
    raise ValueError(f"{what} is a {m.backbone!r} model: export writes Stable Diffusion U-Nets and SD3's, Flux's and "
                     "Wan's transformers (configs/stable_diffusion.py, stable_diffusion3.py, flux.py, wan_t2v.py)")
  if m.lora_rank and config.finetune.workdir:
    raise ValueError(f"{what} is a LoRA of the run {config.finetune.workdir!r}, not of the checkpoint: export that "
                     "run, then merge this one's adapter (python -m diffusion_jax.lora) into it with --config and "
                     "--lora")
  (folder, (_, field)), *_ = NETWORKS[m.backbone].items()
  root = pathlib.Path(m[field]).expanduser().parent
  paths = {"text.pretrained_path": config.text.pretrained_path,
           "text.second_encoder_path": config.text.second_encoder_path,  # (SDXL's, SD3's)
           "text.t5_encoder_path": config.text.t5_encoder_path,  # (SD3's, Flux's)
           "latent.autoencoder_path": config.latent.autoencoder_path,
           **{f"model.{name}": m.get(name, "") for name in ("wan_low_noise_path", "wan_image_encoder_path")}}
  if elsewhere := [f"{name}={path!r}" for name, path in paths.items()
                   if path and pathlib.Path(path).expanduser().parent != root]:
    raise ValueError(f"export copies the root the {folder} came from ({str(root)!r}); {', '.join(elsewhere)} "
                     "read parts from elsewhere")
  return root


def text_encoder_folders(encoders) -> dict:
  """{root folder: CLIP text model} of a model's text encoders (SD's one, SDXL's and SD3's pair, the SDXL refiner's
  second alone, Flux's CLIP; T5s are not adapted, and not written)."""
  from diffusion_jax.models import clip, flux_text, sd3_text, sdxl_text

  if isinstance(encoders, (sdxl_text.TextEncoders, sd3_text.TextEncoders)):
    return {"text_encoder": encoders.first, "text_encoder_2": encoders.second} if encoders.first is not None else {
        "text_encoder_2": encoders.second}
  if isinstance(encoders, flux_text.TextEncoders):
    return {"text_encoder": encoders.clip}
  return {"text_encoder": encoders} if isinstance(encoders, (clip.TextModel, clip.TextModelWithProjection)) else {}


def export(workdir, output, step: int | None = None, use_ema: bool | None = None, single=None, adapters=(),
           config=None, dtype: str | None = None) -> pathlib.Path:
  """Write the diffusers root `output`: the root a Stable Diffusion, SD3, Flux or Wan fine-tune's config read
  (source_root), copied, with the run's networks (NETWORKS) at checkpoint `step` (default: the latest; use_ema: its
  first EMA copy, default the run's sample.use_ema; a LoRA run's: the root's, with the run's updates at that step
  fused in), or with `config` and no workdir, the pretrained checkpoints it reads; `adapters` (lora.Adapters) fused
  in, the CLIP text encoders written too when one updates them; with `single`, that root as a single file too
  (single_file.write). Each part is written in `dtype` ('float32', 'float16', 'bfloat16'; default: the dtype the
  root stores it in). Returns `output`."""
  from diffusion_jax import sample
  from diffusion_jax.models import clip, diffusers_directory, named_tensors

  if config is None:
    config, what = checkpoint.read_config(workdir), f"--workdir={str(workdir)!r}"
  else:
    config, what = config.copy_and_resolve_references(), "--config"
    config_checks.validate(config)
  root, output = source_root(config, what), pathlib.Path(output).expanduser()
  written_networks = networks(config)
  lora.check(adapters, lora.without_updates(config))
  for flag, path in (("--output", output), ("--single_file", single)):
    if path is not None and pathlib.Path(path).expanduser().exists():
      raise ValueError(f"{flag}={str(path)!r} exists: give a new path (nothing is overwritten)")
  if single is not None and config.model.backbone != "sd_unet":
    raise ValueError(f"--single_file: single files are written of Stable Diffusion 1.x and SDXL roots; this is a "
                     f"{config.model.backbone!r} model's (its diffusers root is written); leave it out")
  if single is not None and single_file.layout(root, "the root") == "SD 2.x":
    raise ValueError("--single_file: an SD 2.x root is not written as a single file (its text encoder in diffusers "
                     "lacks the last of OpenCLIP's layers that SD 2.x's single files hold); leave it out")
  if workdir is None:
    weights, graphdef, _ = sample.load_pretrained(config)
  elif config.model.lora_rank:  # the checkpoint as downloaded, with the run's updates fused in first
    adapters = [lora.run_adapter(workdir, config, step, use_ema), *adapters]
    weights, graphdef, _ = sample.load_pretrained(lora.without_updates(config))
  else:
    _, weights, graphdef, step, _ = sample.load_checkpoint(workdir, step, use_ema)
    if trained := sorted(set(weights.params) - set(written_networks.values())):
      raise ValueError(f"{what} trained its {', '.join(trained)} too: export writes the {', '.join(written_networks)} "
                       "of runs whose other parts are frozen")
  model = nnx.merge(graphdef, *lora.fused(weights, adapters))
  parts = {folder: named_tensors.tensors(getattr(model, attribute), named_tensors.torch_name)
           for folder, attribute in written_networks.items()}
  if any(name.startswith("text_encoder/") for adapter in adapters for name in adapter.updates):
    parts |= {f: clip.text_tensors(encoder) for f, encoder in text_encoder_folders(model.text_encoder).items()}
  diffusers_directory.copy_root(root, output, parts)
  written = write_parts(parts, root, output, written_networks, dtype)
  log.info("wrote %s: %s of %s beside %s", output, ", ".join(written), workdir or "the pretrained checkpoints", root)
  if single is not None:
    single_file.write(output, single)
  return output


def write_parts(parts: dict, root, output, network_folders, dtype: str | None) -> list[str]:
  """Write each part ({root folder: {PyTorch name: array}}) into `output`'s copy of `root`: a network's as diffusers'
  WEIGHTS_FILE, a CLIP's as transformers' model.safetensors, in `dtype` (None: the dtype `root` stores that part
  in). Returns 'folder/ (dtype)' of each."""
  import jax.numpy as jnp
  from safetensors.numpy import save_file

  from diffusion_jax.models import diffusers_directory

  written = []
  for part, tensors in parts.items():
    network = part in network_folders  # (else a transformers CLIP's folder)
    stored = dtype or diffusers_directory.stored_dtype(
        diffusers_directory.weight_files(root / part) if network else [root / part / "model.safetensors"])
    cast = jnp.dtype(stored)  # (bfloat16 too, which numpy lacks)
    save_file({name: x.astype(cast) if x.dtype.name in FLOATS else x for name, x in tensors.items()},
              str(output / part / (diffusers_directory.WEIGHTS_FILE if network else "model.safetensors")),
              metadata={"format": "pt"})
    written.append(f"{part}/ ({stored})")
  return written


def define_flags():
  flags.DEFINE_string("workdir", None, "A Stable Diffusion, SD3, Flux or Wan fine-tune's workdir (full, or LoRA: "
                      "merged).")
  config_flags.DEFINE_config_file("config", None, "Instead of --workdir: configs/stable_diffusion.py:ROOT (or "
                                  "stable_diffusion3.py, flux.py, wan_t2v.py), the checkpoint as downloaded (with "
                                  "--lora: adapters merged into it).")
  flags.DEFINE_multi_string("lora", [], "FILE[:SCALE], repeatable: a LoRA adapter fused into the weights.")
  flags.DEFINE_string("output", None, "The diffusers root to write (a new directory).", required=True)
  flags.DEFINE_integer("step", None, "With --workdir: checkpoint step; default latest.")
  flags.DEFINE_bool("use_ema", None, "With --workdir: the first EMA copy (default: the run's sample.use_ema).")
  flags.DEFINE_string("single_file", None, "Also write the root as one .safetensors in the original layout.")
  flags.DEFINE_enum("dtype", "stored", ["stored", "float32", "float16", "bfloat16"], "The written weights' dtype; "
                    "stored: each part's in the root.")


def main(argv):
  del argv
  f = flags.FLAGS
  if bool(f.workdir) == (f.config is not None):
    raise app.UsageError("Give --workdir (a fine-tune) or --config (a checkpoint as downloaded), one of them.")
  if f.config is not None:
    cli.refuse(("step", "use_ema"), "only with --workdir (a run's checkpoints)")
  cli.print_result(lambda: export(f.workdir, f.output, f.step, f.use_ema, f.single_file,
                                  [lora.read(spec) for spec in f.lora], f.config,
                                  None if f.dtype == "stored" else f.dtype))


if __name__ == "__main__":
  define_flags()
  cli.run(main, config_kinds={"config": "experiment"})
