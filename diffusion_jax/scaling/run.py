"""Run a scaling sweep: train every (size, budget[, learning rate]) run, record its held-out loss, fit and plot.

  python -m diffusion_jax.scaling.run --sweep=configs/scaling/shapes_t2i.py --root=DIR [--sweep.budgets=...]

Flags:
  --sweep           sweep config file (optionally `file.py:variant`); fields overridable with --sweep.<field>=...
  --root            directory of the sweep: one workdir per run, `measurements.json` (FLOPs per example of
                    each size), `results.jsonl` (one line per finished run), `scaling.md`, `scaling.png`
  --print_commands  print one training command per unfinished run (prefixed by --launcher) instead of
                    running them, for a pod or cluster; rerun without it afterwards to record the runs
                    (finished workdirs are not retrained) and write the report
  --launcher        command prefix for --print_commands (default `python -m diffusion_jax.main`), e.g.
                    `sbatch --nodes=4 launch/slurm_gpu.sbatch` or `launch/tpu_pod.sh NAME ZONE`
  --only            comma-separated run names to run (default all)
  --analyze_only    only fit and plot the runs already in results.jsonl (an error naming why when they cannot
                    be fitted yet; not with --print_commands)

Runs execute one after another in this process. Finished runs (in results.jsonl) are skipped; a run
that was killed resumes from its last checkpoint. Each record holds the parameters, FLOPs per example
and per step, steps, examples, total FLOPs, and the final held-out loss (fixed (x0, log-SNR, noise)
triples on validation data) overall and per log-SNR level; with `sweep.generation_metrics` > 0 also FID
and the judge's per-attribute accuracy on that many generated validation captions.
"""

import json
import logging
import pathlib
import shlex
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from diffusion_jax import cli
from diffusion_jax.scaling import report, sweep as sweeps

log = logging.getLogger("diffusion_jax.scaling.run")  # also when run as __main__


def read_results(root) -> dict:
  path = pathlib.Path(root) / "results.jsonl"
  if not path.exists():
    return {}
  records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
  return {r["name"]: r for r in records}


def finished_step(workdir):
  """The latest checkpoint step of a workdir, or None."""
  from diffusion_jax import checkpoint

  if not (pathlib.Path(workdir) / "checkpoints").exists():
    return None
  steps = checkpoint.manager(workdir, read_only=True).all_steps()
  return max(steps) if steps else None


def heldout_record(sweep, run: sweeps.Run, workdir) -> dict:
  """The run's final held-out loss and bookkeeping, from its last checkpoint."""
  from diffusion_jax import evaluate, sample
  from diffusion_jax.metrics import heldout_loss

  config, weights, graphdef, step, mesh = sample.load_checkpoint(workdir)
  count = max(sweep.heldout_examples, sweep.generation_metrics)
  images, captions, _ = evaluate.validation_media(config, count)
  batch = evaluate.model_batch(config, images[:sweep.heldout_examples], captions[:sweep.heldout_examples])
  losses = heldout_loss.make_heldout_loss_fn(config, graphdef, mesh, config.sample.batch_size)(weights.params,
                                                                                               weights.frozen, batch)
  batch_size = config.train.batch_size
  record = {"name": run.name, "size": run.size, "budget": run.budget, "params": run.params,
            "flops_per_example": run.flops_per_example, "flops_per_step": run.flops_per_example * batch_size,
            "steps": step, "batch_size": batch_size, "examples": step * batch_size,
            "learning_rate": config.optimizer.learning_rate,
            "total_flops": run.flops_per_example * batch_size * step, **heldout_loss.as_metrics(losses)}
  if sweep.generation_metrics:  # FID and the judge's accuracy on that many validation captions
    sample_config = config.sample.copy_and_resolve_references()
    sample_config.num_per_prompt = 1
    n = sweep.generation_metrics
    record |= evaluate.generation_metrics(config, graphdef, weights, mesh, images[:n], captions[:n], sample_config)[0]
  return record


def train_run(sweep, run: sweeps.Run, workdir) -> bool:
  """Train (or resume) one run; False when it stopped early (SIGTERM)."""
  from diffusion_jax import train

  if finished_step(workdir) == run.steps:
    return True
  state, _ = train.train_and_evaluate(sweeps.run_config(sweep, run), workdir)
  return int(state.step) == run.steps


def selected(runs, only=()) -> list:
  """The runs named in `only` (all when empty); a name the plan does not have is an error."""
  unknown = sorted(set(only) - {r.name for r in runs})
  if unknown:
    raise ValueError(f"--only names runs this sweep does not have: {unknown}; its runs are "
                     f"{[r.name for r in runs]}.")
  return [r for r in runs if not only or r.name in only]


def run_sweep(sweep, root, only=()) -> list[dict]:
  """Train and record every unfinished run (in plan order); returns all records, then writes the report."""
  root = pathlib.Path(root)
  runs = selected(sweeps.plan(sweep, root / "measurements.json"), only)
  done = read_results(root)
  todo = [r for r in runs if r.name not in done]
  total = sum(r.total_flops for r in todo)
  log.info("sweep: %d runs, %d already finished, %.3g training FLOPs to go", len(runs), len(runs) - len(todo), total)
  start, flops_done = time.time(), 0.0
  for index, run in enumerate(todo):
    workdir = root / run.name
    log.info("run %d/%d %s: %d parameters, %d steps", index + 1, len(todo), run.name, run.params, run.steps)
    if not train_run(sweep, run, workdir):
      log.warning("%s stopped before its last step; rerun the sweep to resume it.", run.name)
      break
    record = heldout_record(sweep, run, workdir)
    with open(root / "results.jsonl", "a") as f:
      f.write(json.dumps(record) + "\n")
    flops_done += run.total_flops
    elapsed = time.time() - start
    log.info("%s: held-out loss %.4f; sweep %.0f%% of FLOPs done, elapsed %.0fs, eta %.0fs", run.name,
             record["heldout_loss"], 100 * flops_done / total, elapsed, elapsed / flops_done * (total - flops_done))
  return list(read_results(root).values())


def print_commands(sweep, root, launcher: str, only=()) -> list[str]:
  root = pathlib.Path(root)
  done = read_results(root)
  lines = []
  for run in selected(sweeps.plan(sweep, root / "measurements.json"), only):
    if run.name in done:
      continue
    lines.append(" ".join([launcher, *(shlex.quote(a) for a in sweeps.main_command(sweep, run, root / run.name))]))
  return lines


def analyze(sweep, root, required: bool = False) -> tuple[pathlib.Path, pathlib.Path] | None:
  """The report's and plot's paths; None with a warning when the finished runs cannot be fitted yet (a ValueError
  when the report is `required`: --analyze_only)."""
  records = list(read_results(root).values())
  try:
    return report.write(records, root, sweep.bootstrap_samples)
  except ValueError as error:
    if required:
      raise ValueError(f"--root={root}: no scaling report from {len(records)} finished runs: {error}") from None
    log.warning("no scaling report yet: %s", error)
    return None


config_flags.DEFINE_config_file("sweep", None, "Sweep config file.", lock_config=True)
flags.DEFINE_string("root", None, "Sweep directory (run workdirs, results.jsonl, report).")
flags.DEFINE_bool("print_commands", False, "Print one training command per unfinished run instead of running.")
flags.DEFINE_string("launcher", "python -m diffusion_jax.main", "Command prefix for --print_commands.")
flags.DEFINE_list("only", [], "Run names to run (default all).")
flags.DEFINE_bool("analyze_only", False, "Only fit and plot the finished runs.")


def main(argv):
  del argv
  f = flags.FLAGS
  if f.sweep is None or f.root is None:
    raise app.UsageError("--sweep and --root are required.")
  if not f.print_commands:
    cli.refuse(("launcher",), "only with --print_commands (it prefixes the printed commands)")
  else:
    cli.refuse(("analyze_only",), "not with --print_commands (which prints the commands of the runs left)")
  import jax

  from diffusion_jax import checkpoint

  # Runs of one size share their train step (budgets change train.steps and warm-up, arguments of the step),
  # initialisation and evaluation programs: compile those once per sweep.
  jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(f.root).expanduser() / "compilation_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  try:
    checkpoint.prepare_workdir(f.root, "--root")
    if f.print_commands:
      print("\n".join(print_commands(f.sweep, f.root, f.launcher, f.only)))
      return
    if not f.analyze_only:
      run_sweep(f.sweep, f.root, f.only)
    written = analyze(f.sweep, f.root, required=f.analyze_only)
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print("interrupted: rerun the same command to resume the sweep (finished runs are kept).", file=sys.stderr)
    sys.exit(130)
  if written:
    print(f"report: {written[0]}\nplot: {written[1]}")


if __name__ == "__main__":
  cli.run(main, config_kinds={"sweep": "sweep"})
