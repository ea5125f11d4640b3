"""The metric writer: JSONL lines as written (non-finite values as null) and a progress line that says where the run
is, with an ETA only once it can be estimated; an evaluation's writer shows its scores instead."""

import json

from diffusion_jax import metric_writers


def test_logs_and_progress_lines(tmp_path, capsys):
  train = metric_writers.MetricWriter(tmp_path, total_steps=100)
  train.start(0)
  train.write(0, {"loss": 0.5, "ignored_array": [1, 2]})
  train.write(10, {"loss": float("nan"), "l1": 0.25})
  train.close()
  lines = capsys.readouterr().err.splitlines()
  assert lines[0].startswith("step 0/100 (0%) loss=0.5 ") and lines[0].endswith("eta unknown")
  assert lines[1].startswith("step 10/100 (10%) loss=nan l1=0.25 ") and "eta unknown" not in lines[1]
  records = [json.loads(line) for line in (tmp_path / "logs" / "train.jsonl").read_text().splitlines()]
  assert records == [{"step": 0, "loss": 0.5}, {"step": 10, "loss": None, "l1": 0.25}]

  scores = metric_writers.MetricWriter(tmp_path, total_steps=100, name="eval")  # never started
  scores.write(250, {f"score_{i}": i + 0.5 for i in range(metric_writers.PROGRESS_SCALARS + 2)})
  scores.close()
  shown = " ".join(f"score_{i}={i + 0.5:.4g}" for i in range(metric_writers.PROGRESS_SCALARS))
  assert capsys.readouterr().err.splitlines() == [f"eval at step 250: {shown}"]
