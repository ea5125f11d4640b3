"""A fine-tuned Stable Diffusion run written as a diffusers root and a single file, read back by diffusers and by us."""

import filecmp
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_single_file import ROOT
from test_sd_unet import save_tiny_stable_diffusion

from conftest import assert_trees_equal
from diffusion_jax import export, sample, single_file, train


def test_a_fine_tuned_unet_is_written_as_the_root_it_started_from_and_as_a_single_file(tmp_path):
  """Two steps of a full fine-tune of a tiny SD 1.x checkpoint (configs/stable_diffusion.py:ROOT): export writes the
  root again with the run's U-Net, which diffusers' UNet2DConditionModel loads with no tensor missing or left over
  and our loader reads as the run's weights exactly; the other parts are the root's files. Its single file
  (--single_file) reads back (single_file.convert) to the same weights. A root stored in float16 is written in
  float16, and --dtype=bfloat16 writes bfloat16, which our loader and single_file.convert read (the run's weights
  rounded). A LoRA of another run, parts from elsewhere, an SD 2.x
  single file and an existing output are refused, before anything is written, and a checkpoint step with --config
  (a checkpoint as downloaded, into which export --lora merges adapters: test_sd_unet.py's kohya test)."""
  import diffusers

  from configs import stable_diffusion
  from diffusion_jax.data import captioned_shapes
  import safetensors.numpy

  from diffusion_jax.models import diffusers_directory, sd_unet, text_to_image

  save_tiny_stable_diffusion(tmp_path / "root", [" ".join(captioned_shapes.VOCABULARY)] * 5)
  config = stable_diffusion.get_config(str(tmp_path / "root"))
  config.model.dtype, config.text.max_length = "float32", 16
  config.data.update(dataset="captioned_shapes", resolution=32, num_train=64, num_eval=16,
                     data_dir=str(tmp_path / "tfds"))
  config.train.update(batch_size=8, steps=2, checkpoint_every=2, log_every=1, sample_every=0, sample_at_end=False)
  config.optimizer.update(learning_rate=1e-2, warmup_steps=0)
  train.train_and_evaluate(config, tmp_path / "run")

  out, file = tmp_path / "exported", tmp_path / "exported.safetensors"
  assert export.export(tmp_path / "run", out, use_ema=False, single=file) == out
  _, weights, graphdef, _, _ = sample.load_checkpoint(tmp_path / "run", use_ema=False)
  trained = nnx.state(nnx.merge(graphdef, weights.params, weights.frozen).sd_unet)
  assert_trees_equal(nnx.state(sd_unet.load_diffusers(out / "unet")), trained)
  theirs, info = diffusers.UNet2DConditionModel.from_pretrained(out / "unet", output_loading_info=True)
  assert info["missing_keys"] == [] and info["unexpected_keys"] == []
  before = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "root" / "unet").state_dict()
  assert not np.allclose(theirs.state_dict()["conv_in.weight"].numpy(), before["conv_in.weight"].numpy())  # trained
  for part in ("text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors", "tokenizer/vocab.json"):
    assert filecmp.cmp(out / part, tmp_path / "root" / part, shallow=False)
  single_file.convert(file, tmp_path / "root", tmp_path / "converted")
  pretrained = lambda root: text_to_image.pretrained_weights(stable_diffusion.get_config(str(root)))
  assert_trees_equal(pretrained(tmp_path / "converted"), pretrained(out))

  # A root stored in float16 (as most SD checkpoints are) is written back in float16; --dtype=bfloat16 writes
  # bfloat16 (as FLUX.1's files are), which our loaders and single-file reader read
  unet_file = tmp_path / "root" / "unet" / diffusers_directory.WEIGHTS_FILE
  safetensors.numpy.save_file({k: v.astype(np.float16) for k, v in safetensors.numpy.load_file(unet_file).items()},
                              unet_file)
  rounded = lambda dtype: jax.tree.map(lambda x: np.asarray(x).astype(dtype).astype(np.float32), trained)  # (host)
  half = export.export(tmp_path / "run", tmp_path / "half", use_ema=False)
  assert stored_dtypes(half / "unet") == {"F16"} and stored_dtypes(half / "text_encoder") == {"F32"}
  assert_trees_equal(nnx.state(sd_unet.load_diffusers(half / "unet")), rounded(np.float16))
  bf16 = export.export(tmp_path / "run", tmp_path / "bf16", use_ema=False, single=tmp_path / "bf16.safetensors",
                       dtype="bfloat16")
  assert stored_dtypes(bf16 / "unet") == {"BF16"}
  assert_trees_equal(nnx.state(sd_unet.load_diffusers(bf16 / "unet")), rounded(jnp.bfloat16))
  single_file.convert(tmp_path / "bf16.safetensors", tmp_path / "root", tmp_path / "bf16_converted")
  assert_trees_equal(pretrained(tmp_path / "bf16_converted"), pretrained(bf16))

  for bad, message in ((dict(model=dict(lora_rank=2), finetune=dict(workdir="/w/base")),
                        "is a LoRA of the run '/w/base', not of the checkpoint: export that run, then merge"),
                       (dict(model=dict(backbone="unet")), "is a 'unet' model: export writes Stable Diffusion U-Nets")):
    changed = config.copy_and_resolve_references()
    changed.update(bad)
    with pytest.raises(ValueError, match=message):
      export.source_root(changed, "RUN")
  elsewhere = config.copy_and_resolve_references()
  elsewhere.latent.autoencoder_path = str(tmp_path / "vae")
  with pytest.raises(ValueError, match="latent.autoencoder_path=.* read parts from elsewhere"):
    export.source_root(elsewhere, "RUN")
  for flags, code, message in (
      ([f"--workdir={tmp_path / 'run'}"], 2, f"error: --output={str(out)!r} exists: give a new path (nothing is "
                                             "overwritten)"),
      ([f"--config=configs/stable_diffusion.py:{tmp_path / 'root'}", "--step=2"], 2,
       "--step: only with --workdir (a run's checkpoints)")):
    result = subprocess.run([sys.executable, "-m", "diffusion_jax.export", *flags, f"--output={out}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == code and "Traceback" not in result.stderr, result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error: ")][-1].endswith(message), \
        result.stderr
  text_config = tmp_path / "root" / "text_encoder" / "config.json"
  text_config.write_text(text_config.read_text().replace('"quick_gelu"', '"gelu"'))  # OpenCLIP's: SD 2.x's root
  with pytest.raises(ValueError, match="--single_file: an SD 2.x root is not written as a single file"):
    export.export(tmp_path / "run", tmp_path / "sd2", single=tmp_path / "sd2.safetensors")
  assert not (tmp_path / "sd2").exists()


def stored_dtypes(folder) -> set:
  """The dtypes (safetensors' names) of every tensor in a folder's safetensors files."""
  from safetensors import safe_open

  found = set()
  for file in folder.glob("*.safetensors"):
    with safe_open(file, "numpy") as f:
      found |= {f.get_slice(name).get_dtype() for name in f.keys()}
  return found
