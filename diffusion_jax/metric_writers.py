"""Metrics to JSONL, TensorBoard and a progress line with ETA. Only process 0 writes."""

import json
import pathlib
import sys
import time

import jax
import numpy as np


PROGRESS_SCALARS = 6  # shown by a progress line of a writer that was never started


def tensorboard_tag(key: str) -> str:
  """A metric's TensorBoard name: its key without "+" signs, which TensorBoard's names cannot hold (the held-out loss
  at log-SNR +2, "heldout_loss/logsnr_+2", is "heldout_loss/logsnr_2" beside "heldout_loss/logsnr_-2"; tensorboardX
  would write "logsnr__2" and log that it did, at every evaluation)."""
  return key.replace("+", "")


class MetricWriter:

  def __init__(self, workdir, total_steps: int, name: str = "train"):
    self.active = jax.process_index() == 0
    self.name, self.total_steps = name, total_steps
    self.start_time = None
    self.start_step = 0
    if self.active:
      from tensorboardX import SummaryWriter

      directory = pathlib.Path(workdir).expanduser() / "logs"
      directory.mkdir(parents=True, exist_ok=True)
      self.jsonl = open(directory / f"{name}.jsonl", "a")
      self.tensorboard = SummaryWriter(str(directory / name))

  def start(self, step: int):
    self.start_time, self.start_step = time.time(), step

  def write(self, step: int, metrics: dict, fields=None):
    """The scalars of `metrics` to both logs; `fields` ({name: JSON value}, e.g. an evaluation's settings) to the
    JSONL line only."""
    if not self.active:
      return
    scalars = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
    # Non-finite values (e.g. an empty log-SNR bin) are written as null: the file stays strict JSON.
    record = {k: (v if np.isfinite(v) else None) for k, v in scalars.items()}
    self.jsonl.write(json.dumps({"step": step, **record, **(fields or {})}) + "\n")
    self.jsonl.flush()
    for key, value in scalars.items():
      if np.isfinite(value):
        self.tensorboard.add_scalar(tensorboard_tag(key), value, step)
    self.tensorboard.flush()
    self.progress(step, scalars)

  def write_image(self, step: int, name: str, image: np.ndarray):
    """uint8 [h, w, 3] into TensorBoard (e.g. a sample grid)."""
    if self.active:
      self.tensorboard.add_image(name, image, step, dataformats="HWC")
      self.tensorboard.flush()

  def progress(self, step: int, scalars: dict):
    """A line on stderr: the run's progress, chosen metrics and ETA; a writer that was never started (evaluations,
    samples) shows its first few scalars instead."""
    if self.start_time is None:
      shown = " ".join(f"{k}={v:.4g}" for k, v in list(scalars.items())[:PROGRESS_SCALARS])
      print(f"{self.name} at step {step}: {shown}", file=sys.stderr, flush=True)
      return
    done = step - self.start_step
    elapsed = time.time() - self.start_time
    eta = f"{elapsed / done * (self.total_steps - step):.0f}s" if done > 0 else "unknown"
    shown = " ".join(f"{k}={scalars[k]:.4g}" for k in ("loss", "l1", "grad_norm", "examples_per_s", "mfu")
                     if k in scalars)
    print(f"step {step}/{self.total_steps} ({100 * step / self.total_steps:.0f}%) {shown} "
          f"elapsed {elapsed:.0f}s eta {eta}", file=sys.stderr, flush=True)

  def close(self):
    if self.active:
      self.jsonl.close()
      self.tensorboard.close()
