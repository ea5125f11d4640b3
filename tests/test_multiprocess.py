"""Two processes on 127.0.0.1 (4 simulated devices each) train, checkpoint and sample as one job."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np

from diffusion_jax import checkpoint, media, sharding, train

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_two_process_training_matches_one_process(trained, tmp_path):
  command = [sys.executable, str(ROOT / "launch" / "local.py"), "--num_processes=2", "--devices_per_process=4",
             "--", "--config=configs/t2i_shapes.py:test", f"--workdir={tmp_path / 'work'}",
             f"--config.data.data_dir={tmp_path / 'tfds'}",
             "--config.train.sample_at_end=False"]  # two-process sampling: test_two_process_sampling_job_...
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert checkpoint.manager(tmp_path / "work", read_only=True).all_steps() == [2, 4]
  # Each process saved its own input-iterator position.
  iterator_files = sorted(p.name for p in (tmp_path / "work" / "checkpoints" / "4" / "data_iter").iterdir())
  assert any("process_0" in name for name in iterator_files) and any("process_1" in name for name in iterator_files)
  # Same global batches, in the same order, as the 1-process 8-device run of the `trained` fixture: the
  # logged losses agree to float rounding, and so do the parameters (as a whole: Adam turns rounding
  # differences of near-zero gradients into visible ones on a few near-zero weights).
  config, single_workdir, final = trained
  read = lambda w: [json.loads(line) for line in (w / "logs" / "train.jsonl").read_text().splitlines()]
  for ours, theirs in zip(read(tmp_path / "work"), read(single_workdir)):
    np.testing.assert_allclose([ours["loss"], ours["grad_norm"]], [theirs["loss"], theirs["grad_norm"]], rtol=1e-5)
  state, _ = train.init_state(config, sharding.make_mesh(config.mesh))
  restored, _ = checkpoint.restore(checkpoint.manager(tmp_path / "work", read_only=True), state)
  ours, theirs = jax.tree.leaves(jax.device_get(restored.params)), jax.tree.leaves(final)
  difference = sum(np.sum((a - b) ** 2) for a, b in zip(ours, theirs))
  assert difference < 1e-8 * sum(np.sum(b**2) for b in theirs)


def test_launchers_dry_run():
  local = subprocess.run([sys.executable, str(ROOT / "launch" / "local.py"), "--num_processes=3", "--port=1234",
                          "--dry_run", "--", "--workdir=w"], capture_output=True, text=True, timeout=60)
  lines = local.stdout.splitlines()
  assert len(lines) == 3 and all("--coordinator=127.0.0.1:1234" in line and "--workdir=w" in line for line in lines)
  assert "--process_id=2" in lines[2] and all("-m diffusion_jax.main " in line for line in lines)
  # The caller's XLA flags reach the jobs (the tests' cheap compilation, say); only the device count is replaced.
  caller = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"}
  local = subprocess.run([sys.executable, str(ROOT / "launch" / "local.py"), "--module=diffusion_jax.train_autoencoder",
                          "--dry_run", "--", "--workdir=w"], env=caller, capture_output=True, text=True, timeout=60)
  lines = local.stdout.splitlines()
  assert len(lines) == 2 and all("-m diffusion_jax.train_autoencoder --coordinator=" in line for line in lines)
  assert all(line.startswith("XLA_FLAGS='--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=4' ")
             for line in lines), lines
  # Counts that start nothing (a launcher that ran no job and exited 0) and ports that cannot be are refused
  for flag, message in (("--num_processes=0", "argument --num_processes: 0: at least 1"),
                        ("--devices_per_process=-4", "argument --devices_per_process: -4: at least 1"),
                        ("--port=70000", "argument --port: 70000: at least 0 and at most 65535")):
    local = subprocess.run([sys.executable, str(ROOT / "launch" / "local.py"), flag, "--dry_run", "--", "--workdir=w"],
                           capture_output=True, text=True, timeout=60)
    assert local.returncode == 2 and local.stderr.splitlines()[-1] == f"local.py: error: {message}", local.stderr
  tpu = subprocess.run(["bash", str(ROOT / "launch" / "tpu_pod.sh"), "pod", "zone", "--workdir=/mnt/shared/r"],
                       env={"DRY_RUN": "1", "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60)
  assert tpu.returncode == 0 and "--worker=all" in tpu.stdout and "--auto_distributed" in tpu.stdout
  slurm = subprocess.run(["bash", str(ROOT / "launch" / "slurm_gpu.sbatch"), "--workdir=/shared/r"],
                         env={"DRY_RUN": "1", "MODULE": "diffusion_jax.sample", "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=60)
  assert slurm.stdout.startswith("srun python -m diffusion_jax.sample --auto_distributed --workdir=/shared/r")


def test_two_process_sampling_job_writes_the_training_samples(trained, tmp_path):
  """The sampling job as 2 processes restores step 2 of the `trained` workdir onto both and writes the samples
  (and manifest) that the 1-process, 8-device training run wrote at that step."""
  workdir, output = trained[1], tmp_path / "samples"
  command = [sys.executable, str(ROOT / "launch" / "local.py"), "--num_processes=2", "--devices_per_process=4",
             "--module=diffusion_jax.sample", "--", f"--workdir={workdir}", "--step=2", f"--output_dir={output}"]
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  # The job's own log lines are shown (its module, run with -m, logs as __main__): the restore, progress and ETA
  assert re.search(r"sample.py:\d+\] restored .* step 2 onto the mesh", result.stderr), result.stderr[-3000:]
  assert not re.search("read only|read_only|overriding", result.stderr)  # (orbax's notices of what we chose)
  theirs = workdir / "samples" / "step_2"
  assert (output / "manifest.jsonl").read_text() == (theirs / "manifest.jsonl").read_text()
  for line in (theirs / "manifest.jsonl").read_text().splitlines():
    name = json.loads(line)["file"]
    ours, expected = (media.read_image(d / name).astype(int) for d in (output, theirs))
    assert np.abs(ours - expected).max() <= 1, name  # float rounding may move a pixel by one level


def random_adapter(config, path) -> str:
  """A LoRA adapter file of random rank-2 updates of every attention projection of `config`'s model."""
  from safetensors.numpy import save_file

  from diffusion_jax import finetune, lora

  rng, updates = np.random.default_rng(0), {}
  for p, kernel in finetune.abstract_parameters(config)[0].items():
    if p[-1] == "kernel" and p[-2] in ("q", "k", "v", "out"):
      module = lora.name(p[:-2] + (f"{p[-2]}_lora",))
      updates[f"{module}/lora_a"] = rng.normal(0, 0.3, (kernel.shape[0], 2)).astype(np.float32)
      updates[f"{module}/lora_b"] = rng.normal(0, 0.3, (2, kernel.shape[1])).astype(np.float32)
  save_file(updates, str(path), metadata={"format": lora.FORMAT})
  return str(path)


def test_two_process_evaluation_job_scores_as_one_process(trained, tmp_path):
  """The evaluation job as 2 processes writes for a checkpoint what it writes as this one process, here with a
  LoRA adapter fused into its weights, autoguidance by the run's step 2, and each real image edited from its DDIM
  inversion (--image_to_image --edit_noise=inversion)."""
  from diffusion_jax import evaluate, lora

  copies = [tmp_path / "one", tmp_path / "two"]  # eval.jsonl is written into the workdir
  for copy in copies:  # without the logs other tests' evaluations may have written into the shared workdir
    shutil.copytree(trained[1], copy, ignore=shutil.ignore_patterns("logs"))
  options = dict(num_prompts=8, heldout_examples=8, combination_prompts=0)
  adapter = random_adapter(trained[0], tmp_path / "adapter.safetensors")
  [one] = evaluate.run(copies[0], step=4, adapters=[lora.read(adapter)], guide_step=2, edit_real="image_to_image",
                       sample_overrides={"edit_noise": "inversion"}, **options)
  command = [sys.executable, str(ROOT / "launch" / "local.py"), "--num_processes=2", "--devices_per_process=4",
             "--module=diffusion_jax.evaluate", "--", f"--workdir={copies[1]}", "--step=4", f"--lora={adapter}",
             "--guide_step=2", "--image_to_image", "--edit_noise=inversion",
             *(f"--{k}={v}" for k, v in options.items())]
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  # The libraries' notices of what the job does on purpose are left out (TFDS's custom configs, decoding without
  # OpenCV; orbax's read-only checkpoints): its warnings are those a user would act on
  assert not re.search("custom data configuration|OpenCV|read only", result.stderr), result.stderr[-3000:]
  [two] = [json.loads(line) for line in (copies[1] / "logs" / "eval.jsonl").read_text().splitlines()]
  settings = [record.pop("settings") for record in (one, two)]
  assert [s.pop("guide") for s in settings] == [{"workdir": str(copy), "step": 2} for copy in copies]
  assert one.keys() == two.keys() and two["step"] == 4 and settings[0] == settings[1]
  for key in one:
    np.testing.assert_allclose(two[key], one[key], rtol=1e-4, atol=1e-6, err_msg=key)
