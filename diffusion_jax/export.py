"""A fine-tuned Stable Diffusion run written as the kind of checkpoint it started from: a diffusers root (the run's
U-Net beside the rest of the root its config read), and with --single_file the same as one file in the original
layout (single_file.write), for diffusers' pipelines, A1111 and ComfyUI.

  python -m diffusion_jax.export --workdir=RUN --output=DIR [--step=N] [--use_ema=false] [--single_file=FILE]

Flags:
  --workdir      a full fine-tune of a Stable Diffusion 1.x, 2.x or SDXL checkpoint (configs/stable_diffusion.py:ROOT:
                 model.backbone='sd_unet', the text encoders and VAE frozen); a LoRA run's adapter is written by
                 python -m diffusion_jax.lora instead
  --output       the diffusers root to write (must not exist): the config's root copied, with the run's U-Net
                 (float32) in unet/
  --step         checkpoint step (default: the latest)
  --use_ema      the first EMA copy (default: the run's sample.use_ema) or, false, the trained weights
  --single_file  also write that root as one .safetensors in the original layout (SD 1.x, SDXL; must not exist)
"""

import logging
import pathlib

from absl import flags
from flax import nnx

from diffusion_jax import checkpoint, cli, single_file

log = logging.getLogger(__name__)


def source_root(config, workdir) -> pathlib.Path:
  """The diffusers root a Stable Diffusion fine-tune's config read its parts from; a ValueError saying why a run
  cannot be exported (another backbone, a LoRA, parts from several places)."""
  m = config.model
  if m.backbone != "sd_unet":
    raise ValueError(f"--workdir={str(workdir)!r} fine-tunes a {m.backbone!r}: export writes Stable Diffusion U-Net "
                     "runs (configs/stable_diffusion.py)")
  if m.lora_rank:
    raise ValueError(f"--workdir={str(workdir)!r} is a LoRA run: write its adapter with python -m diffusion_jax.lora "
                     "(--format=diffusers or kohya), which diffusers' and kohya's tools load")
  root = pathlib.Path(m.sd_unet_path).expanduser().parent
  paths = {"text.pretrained_path": config.text.pretrained_path,
           "latent.autoencoder_path": config.latent.autoencoder_path}
  if elsewhere := [f"{field}={path!r}" for field, path in paths.items()
                   if pathlib.Path(path).expanduser().parent != root]:
    raise ValueError(f"export copies the root the U-Net came from ({str(root)!r}); {', '.join(elsewhere)} "
                     "read parts from elsewhere")
  return root


def export(workdir, output, step: int | None = None, use_ema: bool | None = None, single=None) -> pathlib.Path:
  """Write the diffusers root `output`: the root a Stable Diffusion fine-tune's config read (source_root), copied,
  with the run's U-Net at checkpoint `step` (default: the latest; use_ema: its first EMA copy, default the run's
  sample.use_ema); with `single`, that root as a single file too (single_file.write). Returns `output`."""
  from safetensors.numpy import save_file

  from diffusion_jax import sample
  from diffusion_jax.models import diffusers_directory, named_tensors

  config = checkpoint.read_config(workdir)
  root, output = source_root(config, workdir), pathlib.Path(output).expanduser()
  for flag, path in (("--output", output), ("--single_file", single)):
    if path is not None and pathlib.Path(path).expanduser().exists():
      raise ValueError(f"{flag}={str(path)!r} exists: give a new path (nothing is overwritten)")
  if single is not None and single_file.layout(root, "the root") == "SD 2.x":
    raise ValueError("--single_file: an SD 2.x root is not written as a single file (its text encoder in diffusers "
                     "lacks the last of OpenCLIP's layers that SD 2.x's single files hold); leave it out")
  _, weights, graphdef, step, _ = sample.load_checkpoint(workdir, step, use_ema)
  if trained := sorted(set(weights.params) - {"sd_unet"}):
    raise ValueError(f"--workdir={str(workdir)!r} trained its {', '.join(trained)} too: export writes the U-Net of "
                     "runs whose other parts are frozen")
  unet = nnx.merge(graphdef, weights.params, weights.frozen).sd_unet
  diffusers_directory.copy_root(root, output, ("unet",))
  save_file(named_tensors.tensors(unet, named_tensors.torch_name),
            str(output / "unet" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
  log.info("wrote %s: %s step %d's U-Net beside %s", output, workdir, step, root)
  if single is not None:
    single_file.write(output, single)
  return output


def define_flags():
  flags.DEFINE_string("workdir", None, "A Stable Diffusion full fine-tune's workdir.", required=True)
  flags.DEFINE_string("output", None, "The diffusers root to write (a new directory).", required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step; default latest.")
  flags.DEFINE_bool("use_ema", None, "The first EMA copy (default: the run's sample.use_ema).")
  flags.DEFINE_string("single_file", None, "Also write the root as one .safetensors in the original layout.")


def main(argv):
  del argv
  f = flags.FLAGS
  logging.getLogger("diffusion_jax").setLevel(logging.INFO)
  cli.print_result(lambda: export(f.workdir, f.output, f.step, f.use_ema, f.single_file))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
