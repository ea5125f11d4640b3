"""The main job as users run it: a mistyped config field, Ctrl-C, and kill -9 followed by a restart."""

import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np

from diffusion_jax import checkpoint, media, sharding, train

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main_command(workdir, data_dir, *extra):
  return [sys.executable, "-m", "diffusion_jax.main", "--config=configs/t2i_shapes.py:test", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}", *extra]


def start(command, env=None):
  return subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                          env=env or dict(os.environ))


def wait_for(process, text):
  lines = []
  for line in process.stderr:
    lines.append(line)
    if text in line:
      return lines
  raise AssertionError(f"{text!r} never appeared:\n" + "".join(lines[-30:]))


def test_mistyped_config_key_is_one_clear_error(tmp_path):
  result = subprocess.run(main_command(tmp_path / "w", tmp_path / "d", "--config.train.stepz=3"), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
  expected = """error: no such config field: 'stepz' Did you mean "steps" instead of "stepz"?"""
  assert result.stderr.splitlines()[-1] == expected


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  process = start(main_command(tmp_path / "w", tmp_path / "d", "--config.train.steps=500",
                               "--config.train.log_every=1", "--config.train.checkpoint_every=1000"))
  wait_for(process, "step 3/500")
  process.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal sends (SIGTERM, a preemption, goes the same way)
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 0, stderr[-2000:]
  assert "SIGINT received" in stderr and "rerun the same command to resume" in stderr
  assert "Traceback" not in stderr
  steps = checkpoint.manager(tmp_path / "w", read_only=True).all_steps()
  assert len(steps) == 1 and 3 <= steps[0] < 500
  assert not (tmp_path / "w" / "samples").exists()


def test_kill_9_then_restart_matches_the_uninterrupted_run(trained, tmp_path):
  config, _, final = trained
  command = main_command(tmp_path / "w", tmp_path / "d", "--config.train.log_every=1",
                         "--config.train.sample_at_end=False")
  # Both processes use the session's persistent compilation cache (conftest.py), as a user's restarts would: the
  # programs are compiled and written before step 1, so the kill after step 2 cannot cut a cache entry short.
  process = start(command)
  wait_for(process, "step 2/4")
  process.kill()  # SIGKILL: no handler runs, an async save may be half written
  process.wait()
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  state, _ = train.init_state(config, sharding.make_mesh(config.mesh))
  restored, step = checkpoint.restore(checkpoint.manager(tmp_path / "w", read_only=True), state)
  assert step == 4
  assert "loss" in media.read_provenance(tmp_path / "w" / "curves.png")["metrics"]  # written when training ends
  for a, b in zip(jax.tree.leaves(jax.device_get(restored.params)), jax.tree.leaves(final)):
    np.testing.assert_array_equal(a, b)
