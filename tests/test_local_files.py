"""Users' local files that cannot be read are errors naming them (local_files.py)."""

import json
import subprocess
import sys

import pytest

from diffusion_jax.models import diffusers_directory


def test_a_damaged_config_json_is_named(tmp_path):
  """A model directory whose config.json is cut short, or holds no JSON object, is an error naming that file (json's
  own message names no file: the jobs would print "Expecting value: line 1 column 1" and no more)."""
  (tmp_path / "unet").mkdir()
  (tmp_path / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel", "sample_si')
  with pytest.raises(ValueError, match=r"'.*unet/config.json' cannot be read as JSON \(damaged, cut short"):
    diffusers_directory.read_config(tmp_path / "unet", "model.sd_unet_path", "UNet2DConditionModel", "unet", "")
  (tmp_path / "unet" / "config.json").write_text("[1, 2]")
  with pytest.raises(ValueError, match="'.*unet/config.json' holds a JSON list, not an object"):
    diffusers_directory.read_config(tmp_path / "unet", "model.sd_unet_path", "UNet2DConditionModel", "unet", "")


def test_a_config_read_from_a_damaged_root_is_refused_naming_the_file(tmp_path):
  """A checkpoint root's JSON read while a config loads (configs/stable_diffusion.py:ROOT): an error line naming the
  file and exit code 2."""
  (tmp_path / "unet").mkdir()
  (tmp_path / "unet" / "config.json").write_text(json.dumps({"sample_size": 8})[:-3])
  result = subprocess.run([sys.executable, "-m", "diffusion_jax.sample", f"--config=configs/stable_diffusion.py:"
                           f"{tmp_path}", f"--output_dir={tmp_path / 'out'}", "--prompts=a"],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
  assert result.stderr.splitlines()[-2].startswith(f"error: flag --config=configs/stable_diffusion.py:{tmp_path}: "
                                                  f"'{tmp_path / 'unet/config.json'}' cannot be read as JSON")
