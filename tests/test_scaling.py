"""Scaling sweeps: fits recover known laws, FLOPs grow as expected, the runner skips, resumes and reports."""

import ast
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest

from configs.scaling import shapes_t2i
from diffusion_jax import config_checks
from diffusion_jax.scaling import fit, report, sweep as sweeps

# A synthetic world with known laws: N_opt = 0.01 C^0.5, L_opt = 20 C^-0.1, FLOPs per example = 600 N.
N_OPT_EXPONENT, LOSS_EXPONENT = 0.5, -0.1


def synthetic_runs(budgets=(1e12, 1e13, 1e14, 1e15), noise=0.002, seed=0):
  rng = np.random.default_rng(seed)
  runs = []
  for budget in budgets:
    n_opt, loss_opt = 0.01 * budget ** N_OPT_EXPONENT, 20 * budget ** LOSS_EXPONENT
    for params in np.geomspace(n_opt / 8, n_opt * 8, 7):
      loss = loss_opt * (1 + 0.05 * np.log(params / n_opt) ** 2) + rng.normal(0, noise)
      runs.append({"budget": budget, "params": float(params), "flops_per_example": 600 * params,
                   "heldout_loss": float(loss), "size": f"n{params:.3g}", "steps": 1})
  return runs


def test_power_law_recovers_a_noisy_exponent():
  rng = np.random.default_rng(1)
  x = np.geomspace(1e3, 1e7, 20)
  law = fit.power_law(x, 3.0 * x ** -0.3 * np.exp(rng.normal(0, 0.01, x.shape)))
  assert abs(law.exponent + 0.3) < 0.01 and abs(law.coefficient / 3.0 - 1) < 0.1 and law.r2 > 0.99
  with pytest.raises(ValueError, match="two distinct x"):
    fit.power_law([5, 5], [1, 2])


def test_isoflop_fit_recovers_the_compute_optimal_laws():
  runs = synthetic_runs()
  result = fit.fit(runs)
  assert all(f.interior for f in result.isoflops)
  assert abs(result.n_opt_law.exponent - N_OPT_EXPONENT) < 0.03
  assert abs(result.d_opt_law.exponent - (1 - N_OPT_EXPONENT)) < 0.03  # D = C / (600 N)
  assert abs(result.loss_law.exponent - LOSS_EXPONENT) < 0.01 and result.loss_law.r2 > 0.99
  assert abs(result.flops_law.exponent - 1) < 1e-6
  intervals = fit.bootstrap(runs, samples=200)
  assert intervals["n_opt"][0] <= N_OPT_EXPONENT + 0.03 and intervals["n_opt"][1] >= N_OPT_EXPONENT - 0.03
  assert intervals["loss"][0] < intervals["loss"][1]
  extrapolated = fit.extrapolation(runs)
  assert extrapolated["budget"] == 1e15 and abs(extrapolated["relative_error"]) < 0.02


def test_isoflop_without_an_inner_minimum_is_flagged_and_uses_the_best_run():
  params = [1e4, 2e4, 4e4, 8e4]
  result = fit.isoflop(1e12, params, [1.0, 0.9, 0.8, 0.7])  # still improving at the largest size
  assert not result.interior and result.n_opt == 8e4 and result.loss_opt == pytest.approx(0.7, abs=0.01)
  with pytest.raises(ValueError, match="at least 3"):
    fit.isoflop(1e12, params[:2], [1.0, 0.9])
  with pytest.raises(ValueError, match="two or more compute budgets"):
    fit.fit(synthetic_runs(budgets=(1e12,)))


def test_report_has_every_run_and_a_plot(tmp_path):
  runs = synthetic_runs(budgets=(1e12, 1e13, 1e14))
  table, plot = report.write(runs, tmp_path, bootstrap_samples=50)
  text = table.read_text()
  for run in runs:
    assert f"{run['heldout_loss']:.4f}" in text
  assert "N_opt ∝ C^a" in text and "Extrapolation" in text and text.count("**") == 2 * 3
  assert PIL.Image.open(plot).size == (1400, 400)


def test_with_learning_rates_the_fits_and_report_use_the_best_of_each_size_and_budget(tmp_path):
  runs = synthetic_runs(budgets=(1e12, 1e13, 1e14))
  for run in runs:
    run["learning_rate"] = 3e-3
  # Other learning rates: worse by a margin that varies with the size, so a fit of all runs would be skewed.
  worse = [dict(run, learning_rate=lr, heldout_loss=run["heldout_loss"] + 0.05 * (1 + index % 3))
           for lr in (1e-3, 1e-2) for index, run in enumerate(runs)]
  assert sorted(map(id, fit.best_learning_rate(worse + runs))) == sorted(map(id, runs))
  table, _ = report.write(worse + runs, tmp_path, bootstrap_samples=20)
  (tmp_path / "reference").mkdir()
  reference, _ = report.write(runs, tmp_path / "reference", bootstrap_samples=20)
  text, reference_text = table.read_text(), reference.read_text()
  fits_part = lambda t: t[t.index("| budget C (FLOPs)"):]
  assert fits_part(text) == fits_part(reference_text)  # the same fits, intervals and extrapolation
  assert "lr 0.003)" in text and "| size | budget C | lr 0.001 | lr 0.003 | lr 0.01 |" in text
  assert text.count("**") == 2 * 3 + 2 * len(runs)  # best size per budget; best learning rate per size and budget
  assert "Best at the smallest or largest" not in text  # 3e-3 is inside the range
  edge, _ = report.write(worse[len(runs):] + runs, tmp_path, bootstrap_samples=20)  # 3e-3 and 1e-2 only
  assert "Best at the smallest or largest learning rate tried" in edge.read_text()


def test_step_flops_grow_with_resolution(tmp_path):
  """About linear in pixels (4x per doubling; attention a bit more). Growth with width (about quadratic)
  is asserted on the same cost analysis by test_bench's step-benchmark test."""
  base = sweeps.load_config_file("configs/t2i_shapes.py:test")
  base.data.data_dir = str(tmp_path)
  flops = [sweeps.measure_step(sweeps.apply(base, {"data.resolution": r}))[0] for r in (16, 32)]
  assert 3.5 < flops[1] / flops[0] < 5.5


def test_planned_and_reported_flops_are_within_two_percent_of_the_compiled_step(tmp_path):
  """The planner and training both read the cost analysis of the lowered step (training's split over the mesh's
  devices); on one CPU device it matches what the compiled program counts. So does the recount on one CPU device
  that backends without a lowered count and rematerialising models get, for a config whose attention is cuDNN's, on
  an 8-device FSDP mesh, with remat (whose recomputation the lowered step counts: 18% more here)."""
  import jax

  from diffusion_jax import sharding, train

  config = sweeps.load_config_file("configs/t2i_shapes.py:test")
  config.data.data_dir = str(tmp_path)
  planned, _ = sweeps.measure_step(config)
  lowered, _ = train.lower_abstract_step(config, sharding.make_mesh(config.mesh, devices=jax.devices()[:1]))
  compiled = train.program_flops(lowered.compile())
  assert planned * config.train.batch_size == pytest.approx(compiled, rel=0.02)
  pod = sharding.make_mesh(config.mesh)
  assert pod.devices.size == 8
  per_device = train.flops_per_device(train.lower_abstract_step(config, pod)[0], pod)
  assert per_device * 8 == pytest.approx(compiled, rel=0.02)
  on_gpu = config.copy_and_resolve_references()
  on_gpu.model.attention = "cudnn"
  on_gpu.mesh.update(data=1, fsdp=-1)
  on_gpu.model.remat = True
  assert train.flops_on_cpu(on_gpu) == pytest.approx(compiled, rel=0.02)


def test_plan_refuses_runs_that_are_too_short(tmp_path):
  sweep = shapes_t2i.get_config("test")
  sweep.update(width_multipliers=(0.5,), budgets=(1e6,))
  with pytest.raises(ValueError, match="fewer than sweep.min_steps"):
    sweeps.plan(sweep, tmp_path / "measurements.json")


def test_a_dit_sweep_scales_its_width_and_block_count():
  experiment = sweeps.load_config_file("configs/t2i_shapes.py:dit")
  sweep = shapes_t2i.get_config("test")
  sweep.update(width_multipliers=(0.3, 1.0), depth_multipliers=(0.5, 1.0))
  sizes = sweeps.size_overrides(sweep, experiment)
  assert sorted(sizes) == ["c128_d0.5", "c128_d1", "c40_d0.5", "c40_d1"]  # 0.3 x 128 rounded to a multiple of 4
  assert sizes["c40_d0.5"] == {"model.channels": 40, "model.depth": 3}
  for overrides in sizes.values():
    assert not config_checks.problems(sweeps.apply(experiment, overrides), device_count=8)


def test_plan_with_learning_rates_trains_each_size_and_budget_at_each(tmp_path):
  sweep = shapes_t2i.get_config("test")
  sweep.update(width_multipliers=(0.5,), budgets=(1.2e10, 2.4e10), learning_rates=(1e-3, 3e-3))
  runs = sweeps.plan(sweep, tmp_path / "measurements.json")
  assert [r.name.rsplit("_", 1)[1] for r in runs] == ["lr0.001", "lr0.003"] * 2
  assert runs[0].name.rsplit("_", 1)[0] == runs[1].name.rsplit("_", 1)[0] != runs[2].name.rsplit("_", 1)[0]
  assert runs[0].steps == runs[1].steps < runs[2].steps == runs[3].steps
  assert [sweeps.run_config(sweep, r).optimizer.learning_rate for r in runs] == [1e-3, 3e-3] * 2
  assert all(sweeps.run_config(sweep, r).train.sample_every == 0 for r in runs)  # runs sample nothing
  sweep.learning_rates = (3e-3, 0.0)
  with pytest.raises(ValueError, match=r"sweep.learning_rates=\(0.003, 0.0\) must all be > 0"):
    sweeps.plan(sweep, tmp_path / "measurements.json")
  bad = sweep.copy_and_resolve_references()  # (a grid or budget list that plans nothing, runs that cannot train)
  bad.update(learning_rates=(), budgets=(), width_multipliers=(0.0,), checkpoints_per_run=0)
  assert sweeps.problems(bad) == ["sweep.budgets=() is empty", "sweep.width_multipliers=(0.0,) must all be > 0",
                                  "sweep.checkpoints_per_run=0 must be >= 1"]
  del sweep["learning_rates"]  # a sweep config written before the field
  with pytest.raises(ValueError, match="has no learning_rates"):
    sweeps.plan(sweep, tmp_path / "measurements.json")


def test_runner_skips_finished_runs_and_resumes_a_killed_one(tmp_path, monkeypatch, caplog):
  from diffusion_jax.scaling import run as runner

  monkeypatch.setenv("HOME", str(tmp_path))  # the built-in dataset goes to ~/tensorflow_datasets
  root = tmp_path / "sweep"
  flags = ["--sweep=configs/scaling/shapes_t2i.py:test", "--sweep.width_multipliers=(0.5,)",
           "--sweep.budgets=(1.2e10,2.4e10)", f"--root={root}"]
  # Both sweep processes run on one device: compiling for one is faster than for the eight of the tests.
  env = os.environ | {"XLA_FLAGS": os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=1")}
  command = [sys.executable, "-m", "diffusion_jax.scaling.run", *flags]
  process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  # Kill it (no chance to save) once the second run has committed a checkpoint before its last step.
  sweep = shapes_t2i.get_config("test")
  sweep.update(width_multipliers=(0.5,), budgets=(1.2e10, 2.4e10))
  deadline = time.time() + 240
  while time.time() < deadline and process.poll() is None:
    if (root / "results.jsonl").exists() and (root / "measurements.json").exists():
      second = sweeps.plan(sweep, root / "measurements.json")[1]
      checkpoints = root / second.name / "checkpoints"
      if checkpoints.exists() and any(p.name.isdigit() for p in checkpoints.iterdir()):
        process.send_signal(signal.SIGKILL)
        break
    time.sleep(0.05)
  process.wait(timeout=30)
  assert process.returncode == -signal.SIGKILL, f"the sweep ended before it could be killed: {process.stderr.read()}"
  first, second = sweeps.plan(sweep, root / "measurements.json")
  assert list(runner.read_results(root)) == [first.name]

  # Rerun: the finished run is skipped, the killed one resumes and also records FID and judge accuracy.
  rerun = subprocess.run(command + ["--sweep.generation_metrics=4"], env=env, capture_output=True, text=True,
                         timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  log = rerun.stderr
  assert f"run 1/1 {second.name}" in log and first.name + ":" not in log
  resumed = int(log.split("resumed from step ")[1].split()[0])
  assert 0 < resumed < second.steps
  records = list(runner.read_results(root).values())
  assert [r["name"] for r in records] == [first.name, second.name]
  assert records[1]["learning_rate"] == sweeps.run_config(sweep, second).optimizer.learning_rate
  assert records[1]["steps"] == second.steps and records[1]["total_flops"] == pytest.approx(
      second.steps * second.flops_per_example * records[1]["batch_size"])
  assert np.isfinite(records[1]["heldout_loss"]) and "heldout_loss/logsnr_+0" in records[1]
  assert records[1]["fid_random_conv"] >= 0 and 0 <= records[1]["accuracy/all"] <= 1
  assert "fid_random_conv" not in records[0]
  assert not (root / "scaling.md").exists()  # one size per budget: nothing to fit, no report

  caplog.set_level("INFO", logger="diffusion_jax")
  assert runner.run_sweep(sweep, root) == records and "run 1/" not in caplog.text  # nothing left to do
  assert runner.print_commands(sweep, root, "LAUNCH") == []
  (root / "results.jsonl").write_text(json.dumps(records[0]) + "\n")
  [command] = runner.print_commands(sweep, root, "LAUNCH")
  words = shlex.split(command)
  assert words[0] == "LAUNCH" and words[1] == f"--config={sweep.experiment}"
  assert words[-1] == f"--workdir={root / second.name}"
  # The printed flags, parsed back, give the config the runner trains with.
  overrides = {w.split("=", 1)[0][len("--config."):]: ast.literal_eval(w.split("=", 1)[1]) for w in words[2:-1]}
  assert sweeps.apply(sweeps.load_config_file(sweep.experiment), overrides) == sweeps.run_config(sweep, second)


def test_only_selects_named_runs_and_refuses_unknown_names():
  from diffusion_jax.scaling import run as runner

  runs = [sweeps.Run(f"c8_d1_C{b}", "c8_d1", b, {}, 1.0, 10, 5, 2) for b in (1, 2)]
  assert runner.selected(runs) == runs and runner.selected(runs, ["c8_d1_C2"]) == runs[1:]
  with pytest.raises(ValueError, match=r"does not have: \['c9_d1_C1'\]"):
    runner.selected(runs, ["c9_d1_C1"])


def test_analyzing_a_sweep_that_cannot_be_fitted_is_an_error_only_when_asked_for(tmp_path, caplog):
  """--analyze_only over finished runs that cannot be fitted (one budget) is an error naming why (it wrote nothing
  and exited 0 before); after a sweep's runs it is a warning. A --root that cannot be a directory is named."""
  from diffusion_jax import checkpoint
  from diffusion_jax.scaling import run as runner

  with open(tmp_path / "results.jsonl", "w") as results:
    for record in synthetic_runs(budgets=(1e12,)):
      results.write(json.dumps({"name": f"{record['size']}_C1e12", **record}) + "\n")
  sweep = shapes_t2i.get_config("test")
  assert runner.analyze(sweep, tmp_path) is None and "no scaling report yet" in caplog.text
  with pytest.raises(ValueError, match=r"--root=.*: no scaling report from 7 finished runs: Scaling fits need runs "
                                       r"at two or more compute budgets"):
    runner.analyze(sweep, tmp_path, required=True)
  with pytest.raises(ValueError, match="--root=.*results.jsonl cannot be made a directory: File exists"):
    checkpoint.prepare_workdir(tmp_path / "results.jsonl", "--root")
