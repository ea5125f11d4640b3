"""Training curves as a PNG: the train and evaluation logs of one or more workdirs, one colour per workdir.

  python -m diffusion_jax.curves --workdirs=workdirs/t2i_shapes[,workdirs/other ...] [--output=curves.png]
                                 [--metrics=loss,heldout_loss,fid_random_conv] [--smoothing=0.6]

Flags:
  --workdirs   comma-separated workdirs of the main job or the autoencoder trainer (their logs/train.jsonl and,
               when there is one, logs/eval.jsonl); quoted glob patterns name many, e.g. a scaling sweep's runs,
               "workdirs/scaling_shapes/*" (directories only)
  --output     the PNG, a .png path (default: WORKDIR/curves.png for one workdir; needed for several)
  --metrics    comma-separated metric names of either log, one panel each (default: those of DEFAULT_METRICS that
               some workdir logged); an unknown name is refused with the names there are
  --smoothing  exponential moving average of the train log's points (not the learning rate), in [0, 1) (default
               0.6; 0: none); the raw points stay as a faint line

The main job writes WORKDIR/curves.png when its training finishes; the PNG's text chunks name the workdirs and
metrics. Evaluations of one workdir under several settings (the evaluation job's flags, the "settings" of its
log lines) are separate lines, each with its own marker and dash. Use it to compare runs (ablations, a scaling
sweep's sizes) without starting TensorBoard.
"""

import glob
import itertools
import json
import math
import os
import pathlib
import sys

import numpy as np
from absl import app, flags

from diffusion_jax import cli, media

# What a run is judged by first: train loss, held-out loss and sample quality, then the optimizer and speed.
DEFAULT_METRICS = ("loss", "heldout_loss", "fid_random_conv", "accuracy/all", "psnr_db", "l1", "lpips",
                   "discriminator_loss", "learning_rate", "grad_norm", "examples_per_s")
UNSMOOTHED = {"learning_rate"}  # a schedule: smoothing would only shift it
LOGS = ("train", "eval")
EVAL_MARKERS = ("o-", "s--", "^:", "v-.", "D-")  # one per evaluation settings of a workdir
COLUMNS = 3


def expand(workdirs) -> list[str]:
  """Workdirs with each glob pattern replaced by the directories it matches (sorted); a pattern that matches
  none is refused."""
  out = []
  for entry in map(str, workdirs):
    if glob.has_magic(entry):
      matches = sorted(p for p in glob.glob(os.path.expanduser(entry)) if os.path.isdir(p))
      if not matches:
        raise ValueError(f"--workdirs: no directory matches {entry!r}")
      out += matches
    else:
      out.append(entry)
  return out


def read_logs(workdir) -> dict:
  """{log name: records} of a workdir's logs/train.jsonl and logs/eval.jsonl (the second may be missing)."""
  directory = pathlib.Path(workdir).expanduser() / "logs"
  if not (directory / "train.jsonl").exists():
    raise ValueError(f"No logs/train.jsonl in {str(workdir)!r}: give the --workdir of a training run (one that has "
                     "logged at least once).")
  logs = {}
  for name in LOGS:
    path = directory / f"{name}.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    logs[name] = [json.loads(line) for line in lines if line.strip()]
  return logs


def series(records: list[dict], metric: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of the records that hold a finite `metric`, in step order (a resumed run's repeats: the last)."""
  points = {r["step"]: r[metric] for r in records if r.get(metric) is not None and math.isfinite(r[metric])}
  steps = np.array(sorted(points), dtype=np.int64)
  return steps, np.array([points[s] for s in steps], dtype=np.float64)


def by_settings(records: list[dict]) -> list[list[dict]]:
  """Evaluation records split by the settings they were made under (their "settings" field, a sample field
  a line predates read at its old-behaviour value as evaluate.as_of does; lines without one are a group of
  their own), groups in order of first appearance: each group is one line on a plot."""
  from diffusion_jax import evaluate  # heavy (the models); only plots of evaluations need it

  every_field = {"sample": evaluate.ADDED_SAMPLE_SETTINGS}
  groups = {}
  for record in records:
    settings = record.get("settings")
    key = json.dumps(settings and evaluate.as_of(settings, every_field), sort_keys=True)
    groups.setdefault(key, []).append(record)
  return list(groups.values())


def smooth(values: np.ndarray, factor: float) -> np.ndarray:
  """Exponential moving average with weight `factor` on the past, debiased (the first point is itself)."""
  out, average, weight = np.empty_like(values), 0.0, 0.0
  for i, value in enumerate(values):
    average, weight = factor * average + (1 - factor) * value, factor * weight + (1 - factor)
    out[i] = average / weight
  return out


def write(workdirs: list, output, metrics=None, smoothing: float = 0.6) -> pathlib.Path:
  """Plot `metrics` (default: DEFAULT_METRICS that some workdir logged) of every workdir; returns the PNG's path."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  if not 0 <= smoothing < 1:
    raise ValueError(f"--smoothing={smoothing} must be in [0, 1)")
  path = pathlib.Path(output).expanduser()
  if path.suffix.lower() != ".png" or path.is_dir():
    raise ValueError(f"--output={output}: a .png file's path, please (the plot is a PNG that records its workdirs)")
  logs = {w: read_logs(w) for w in expand(workdirs)}
  logged = {m for runs in logs.values() for records in runs.values() for r in records for m, v in r.items()
            if v is None or isinstance(v, (int, float))} - {"step"}
  if metrics:
    unknown = [m for m in metrics if m not in logged]
    if unknown:
      raise ValueError(f"--metrics: no workdir logged {', '.join(unknown)}; there are {', '.join(sorted(logged))}")
  else:
    metrics = [m for m in DEFAULT_METRICS if m in logged]
  if not metrics:
    raise ValueError(f"No metric of {', '.join(DEFAULT_METRICS)} was logged; name some with --metrics (there are "
                     f"{', '.join(sorted(logged)) or 'none'})")
  rows = -(-len(metrics) // COLUMNS)
  figure, axes = plt.subplots(rows, COLUMNS, figsize=(4.5 * COLUMNS, 3.2 * rows), squeeze=False)
  labels = [pathlib.Path(w).name for w in logs]
  labels = labels if len(set(labels)) == len(labels) else list(logs)  # names, unless two runs share one
  for axis, metric in zip(axes.flat, metrics):
    for colour, (label, runs) in enumerate(zip(labels, logs.values())):
      lines = [("train", "-", runs["train"])]
      groups = by_settings(runs["eval"])
      lines += [("eval", style, group) for style, group in zip(itertools.cycle(EVAL_MARKERS), groups)]
      for name, style, records in lines:
        steps, values = series(records, metric)
        if not len(steps):
          continue
        if name == "train" and smoothing > 0 and len(steps) > 1 and metric not in UNSMOOTHED:
          axis.plot(steps, values, color=f"C{colour}", alpha=0.25, linewidth=0.8)
          values = smooth(values, smoothing)
        axis.plot(steps, values, style, color=f"C{colour}", markersize=3)
    axis.set(title=metric, xlabel="step")
  for axis in axes.flat[len(metrics):]:
    axis.set_visible(False)
  legend_room = 0.4 / (3.2 * rows) if len(logs) > 1 else 0.0  # a 0.4-inch strip above the panels
  figure.tight_layout(rect=(0, 0, 1, 1 - legend_room))
  if len(logs) > 1:  # one legend for every panel
    handles = [matplotlib.lines.Line2D([], [], color=f"C{colour}") for colour in range(len(labels))]
    figure.legend(handles, labels, loc="upper center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
  figure.canvas.draw()
  image = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
  plt.close(figure)
  media.save_png(path, image, {"workdirs": list(logs), "metrics": list(metrics), "smoothing": smoothing})
  return path


def main(argv):
  del argv
  f = flags.FLAGS
  if not f.workdirs:
    raise app.UsageError("--workdirs is required.")
  if f.output is None and len(f.workdirs) > 1:
    raise app.UsageError("--output is required with several --workdirs.")
  output = f.output or pathlib.Path(f.workdirs[0]) / "curves.png"
  if f.output is None and glob.has_magic(f.workdirs[0]):
    raise app.UsageError("--output is required with a glob pattern in --workdirs.")
  try:
    print(write(f.workdirs, output, f.metrics, f.smoothing))
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  flags.DEFINE_list("workdirs", [], "Comma-separated workdirs whose logs to plot.")
  flags.DEFINE_string("output", None, "The PNG (default WORKDIR/curves.png for one workdir).")
  flags.DEFINE_list("metrics", [], "Comma-separated metric names (default: the usual ones that were logged).")
  flags.DEFINE_float("smoothing", 0.6, "Moving-average weight on the past for train metrics, in [0, 1).")
  cli.run(main)
