"""The metric writer: JSONL lines as written (non-finite values as null) and a progress line that says where the run
is, with an ETA only once it can be estimated; an evaluation's writer shows its scores instead."""

import json
import struct

from diffusion_jax import metric_writers


def tensorboard_tags(directory) -> set[str]:
  """The scalar names in a directory's TensorBoard event files (TFRecords: length, its CRC, event, its CRC)."""
  from tensorboardX.proto import event_pb2

  tags = set()
  for path in directory.glob("events.out.tfevents.*"):
    data, offset = path.read_bytes(), 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      tags |= {value.tag for value in event.summary.value}
      offset += 12 + length + 4
  return tags


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

  assert tensorboard_tags(tmp_path / "logs" / "train") == {"loss", "l1"}  # (NaN left out)

  scores = metric_writers.MetricWriter(tmp_path, total_steps=100, name="eval")  # never started
  scores.write(250, {f"score_{i}": i + 0.5 for i in range(metric_writers.PROGRESS_SCALARS + 2)})
  scores.write(260, {"heldout_loss/logsnr_+2": 0.5, "heldout_loss/logsnr_-2": 0.25})
  scores.close()
  assert {"heldout_loss/logsnr_2", "heldout_loss/logsnr_-2"} <= tensorboard_tags(tmp_path / "logs" / "eval")
  shown = " ".join(f"score_{i}={i + 0.5:.4g}" for i in range(metric_writers.PROGRESS_SCALARS))
  assert capsys.readouterr().err.splitlines()[0] == f"eval at step 250: {shown}"
