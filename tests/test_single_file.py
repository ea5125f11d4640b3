"""Single-file (original LDM layout) Stable Diffusion checkpoints read into diffusers roots and written from them,
checked against diffusers' own single-file converters."""

import filecmp
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from test_sd_unet import save_tiny_stable_diffusion

from conftest import assert_trees_equal
from diffusion_jax import single_file
from diffusion_jax.models import diffusers_directory

ROOT = pathlib.Path(__file__).resolve().parents[1]


def with_text_model(name: str) -> str:
  """A CLIP text model's tensor name as files name it (transformers 5 names a CLIPTextModel's without text_model.)."""
  return name if name.startswith(("text_model.", "text_projection")) else f"text_model.{name}"


# variant -> its text encoders' (LDM prefix, pipeline attribute, OpenCLIP's layout): the real files' names, stated here
# apart from single_file.LAYOUTS, which they check
TEXT_ENCODERS = {"sd1": [("cond_stage_model.transformer.", "text_encoder", False)],
                 "sd2": [("cond_stage_model.model.", "text_encoder", True)],
                 "sdxl": [("conditioner.embedders.0.transformer.", "text_encoder", False),
                          ("conditioner.embedders.1.model.", "text_encoder_2", True)],
                 "sdxl_refiner": [("conditioner.embedders.0.model.", "text_encoder_2", True)]}


@pytest.mark.parametrize("variant", ["sd1", "sd2", "sdxl", "sdxl_refiner"])
def test_a_single_file_checkpoint_becomes_the_diffusers_root_it_was_made_from(tmp_path, variant):
  """A tiny SD 1.x (SDXL, SDXL refiner) root written as a single file (single_file.write; 2 layers a level; for sd2
  its text encoder in OpenCLIP's layout, as SD 2.x's, which write refuses): diffusers' single-file converters turn
  that file back into the pipeline's tensors exactly, so the layout is the one they read. single_file.convert, given
  the root for its structure, writes a root whose weights our loaders (and transformers) read exactly as the
  original's; an EMA scalar, CLIP's position ids and a text layer the root's config does not run (SD 2.x's last) are
  left over. A file of another architecture, a missing tensor, a .ckpt and an existing output are refused, naming
  what is wrong."""
  import transformers
  from diffusers.loaders import single_file_utils as theirs
  from safetensors.numpy import load_file

  from configs import stable_diffusion
  from diffusion_jax.models import text_to_image

  sdxl, refiner = variant.startswith("sdxl"), variant == "sdxl_refiner"
  pipeline = save_tiny_stable_diffusion(tmp_path / "root", ["a red circle"] * 5, sdxl=sdxl, layers_per_block=2,
                                        refiner=refiner)
  if variant == "sd2":
    text_config = tmp_path / "root" / "text_encoder" / "config.json"
    text_config.write_text(text_config.read_text().replace('"quick_gelu"', '"gelu"'))  # OpenCLIP's: SD 2.x's root
    with pytest.raises(ValueError, match="an SD 2.x root is not written as a single file"):
      single_file.write(tmp_path / "root", tmp_path / "written.safetensors")
    ldm = single_file.ldm_tensors(tmp_path / "root", "SD 2.x")
  else:
    ldm = load_file(single_file.write(tmp_path / "root", tmp_path / "written.safetensors"))
  as_torch = {k: torch.from_numpy(v) for k, v in ldm.items()}
  same = lambda converted, model: assert_trees_equal(
      {with_text_model(k): v for k, v in converted.items()},
      {with_text_model(k): v for k, v in model.state_dict().items() if not k.endswith("position_ids")})
  same(theirs.convert_ldm_unet_checkpoint(as_torch, pipeline.unet.config), pipeline.unet)
  same(theirs.convert_ldm_vae_checkpoint(as_torch, pipeline.vae.config), pipeline.vae)
  for prefix, name, open_clip in TEXT_ENCODERS[variant]:
    model = getattr(pipeline, name)
    same(theirs.convert_open_clip_checkpoint(model, as_torch, prefix) if open_clip else
         theirs.convert_ldm_clip_checkpoint({k: v for k, v in as_torch.items() if k.startswith(prefix)}), model)

  first = TEXT_ENCODERS[variant][0][0]
  extra = {"model_ema.decay": np.ones((), np.float32)} | (
      {first + "transformer.resblocks.2.ln_1.weight": np.ones(32, np.float32)} if variant == "sd2" else
      {first + "text_model.embeddings.position_ids": np.arange(16, dtype=np.int64)[None]})
  save_file(ldm | extra, str(tmp_path / "model.safetensors"))
  (tmp_path / "root" / "safety_checker").mkdir()  # a part the single file does not hold keeps its weights
  save_file({"weight": np.ones(2, np.float32)}, str(tmp_path / "root" / "safety_checker" / "model.safetensors"))
  single_file.convert(tmp_path / "model.safetensors", tmp_path / "root", tmp_path / "converted")
  weights = lambda root: text_to_image.pretrained_weights(stable_diffusion.get_config(str(root)))
  assert_trees_equal(weights(tmp_path / "converted"), weights(tmp_path / "root"))
  tokenizer = "tokenizer_2" if refiner else "tokenizer"
  for kept in (f"{tokenizer}/vocab.json", "safety_checker/model.safetensors"):  # everything else is the root's
    assert filecmp.cmp(tmp_path / "converted" / kept, tmp_path / "root" / kept, shallow=False)
  reader, name = ((transformers.CLIPTextModelWithProjection, "text_encoder_2") if refiner else
                  (transformers.CLIPTextModel, "text_encoder"))
  same(reader.from_pretrained(tmp_path / "converted" / name).state_dict(),
       getattr(pipeline, name))  # (what diffusers' pipelines read, too)

  with pytest.raises(ValueError, match="exists: give a new directory"):
    single_file.convert(tmp_path / "model.safetensors", tmp_path / "root", tmp_path / "converted")
  with pytest.raises(ValueError, match="a .safetensors file, please"):
    single_file.convert(tmp_path / "model.ckpt", tmp_path / "root", tmp_path / "other")
  missing = next(k for k in ldm if k.endswith("out_layers.3.weight"))
  save_file({k: v for k, v in ldm.items() if k != missing}, str(tmp_path / "missing.safetensors"))
  with pytest.raises(ValueError, match=f"does not fit --like=.*unet: no {missing}"):
    single_file.convert(tmp_path / "missing.safetensors", tmp_path / "root", tmp_path / "other")
  if variant == "sdxl":  # SDXL's file against SD 1.x's structure
    save_tiny_stable_diffusion(tmp_path / "sd", ["a red circle"] * 5)
    result = subprocess.run([sys.executable, "-m", "diffusion_jax.single_file",
                             f"--checkpoint={tmp_path / 'model.safetensors'}", f"--like={tmp_path / 'sd'}",
                             f"--output={tmp_path / 'other'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "has no text_encoder_2/config.json: give the diffusers root of the single file's architecture (SDXL)" in \
        result.stderr.splitlines()[-1]
  assert not (tmp_path / "other").exists()


def test_a_damaged_or_cut_short_file_is_refused_naming_it(tmp_path):
  """A download cut short, or another format under the .safetensors name, is a ValueError naming the file (the
  jobs' `error: ...` line), not safetensors' own error as a traceback."""
  save_file({"model.diffusion_model.out.2.weight": np.ones((4, 8), np.float32)}, tmp_path / "whole.safetensors")
  whole = (tmp_path / "whole.safetensors").read_bytes()
  (tmp_path / "cut.safetensors").write_bytes(whole[:len(whole) - 16])
  (tmp_path / "photo.safetensors").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
  for name in ("cut", "photo"):
    with pytest.raises(ValueError, match=f"'.*{name}.safetensors' cannot be read as safetensors \\(damaged, cut "
                                         "short or another format\\): Error while deserializing header"):
      single_file.convert(tmp_path / f"{name}.safetensors", tmp_path, tmp_path / "root")
  # A checkpoint's repository cloned without Git LFS: its weights files are pointers (text) to them
  (tmp_path / "pointer.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\n")
  with pytest.raises(ValueError, match="'.*pointer.safetensors' is a Git LFS pointer, not the file itself"):
    single_file.convert(tmp_path / "pointer.safetensors", tmp_path, tmp_path / "root")
  with pytest.raises(ValueError, match="'.*pointer.safetensors' is a Git LFS pointer"):  # (export reads dtypes)
    diffusers_directory.stored_dtype([tmp_path / "pointer.safetensors"])
