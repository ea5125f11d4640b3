"""Two processes on 127.0.0.1 (4 simulated devices each) train, checkpoint and sample as one job."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from diffusion_jax import checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_two_process_training(tmp_path):
  env = dict(os.environ, PYTHON=sys.executable)
  env.pop("XLA_FLAGS", None)
  command = [str(ROOT / "launch" / "local.sh"), "2", "4", "--config=configs/t2i_shapes.py:test",
             f"--workdir={tmp_path / 'work'}", f"--config.data.data_dir={tmp_path / 'tfds'}"]
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert checkpoint.manager(tmp_path / "work", read_only=True).all_steps() == [2, 4]
  # Each process saved its own input-iterator position.
  iterator_files = sorted(p.name for p in (tmp_path / "work" / "checkpoints" / "4" / "data_iter").iterdir())
  assert any("process_0" in name for name in iterator_files) and any("process_1" in name for name in iterator_files)
  manifest = (tmp_path / "work" / "samples" / "step_4" / "manifest.jsonl").read_text().splitlines()
  assert len(manifest) == 4 * 2 and all(json.loads(line)["checkpoint_step"] == 4 for line in manifest)
