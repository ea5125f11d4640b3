"""Training curves: the smoothing is a debiased moving average, a resumed run's repeated steps keep their last
value, several workdirs share one figure with one colour each, and what cannot be plotted is refused."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffusion_jax import curves, media


def test_smoothing_is_a_debiased_moving_average():
  values = np.array([4.0, 2.0, 6.0])
  # weights 0.5 on the past: (0.5 * 4) / 0.5, (0.25 * 4 + 0.5 * 2) / 0.75, (0.125 * 4 + 0.25 * 2 + 0.5 * 6) / 0.875
  np.testing.assert_allclose(curves.smooth(values, 0.5), [4.0, 8 / 3, 4 / 0.875])
  np.testing.assert_allclose(curves.smooth(np.full(5, 3.0), 0.9), np.full(5, 3.0))
  np.testing.assert_array_equal(curves.smooth(values, 0.0), values)


def test_series_keeps_a_resumed_steps_last_value_and_skips_missing_ones():
  records = [{"step": 10, "loss": 1.0}, {"step": 20, "loss": 0.8}, {"step": 20, "loss": 0.7},
             {"step": 30, "loss": None}, {"step": 15, "loss": 0.9}, {"step": 40}]
  steps, values = curves.series(records, "loss")
  np.testing.assert_array_equal(steps, [10, 15, 20])
  np.testing.assert_array_equal(values, [1.0, 0.9, 0.7])


def test_evaluations_under_other_settings_are_lines_of_their_own():
  records = [{"step": 2, "fid": 3.0}, {"step": 2, "fid": 2.0, "settings": {"num_prompts": 8}},
             {"step": 4, "fid": 1.0, "settings": {"num_prompts": 8}},
             {"step": 4, "fid": 9.0, "settings": {"num_prompts": 64}}]
  groups = curves.by_settings(records)
  assert [[r["fid"] for r in group] for group in groups] == [[3.0], [2.0, 1.0], [9.0]]


def test_an_evaluation_from_before_a_sample_field_existed_shares_the_line_of_its_old_value():
  old = {"num_prompts": 8, "sample": {"steps": 25}}  # written before sample.guidance_interval existed
  unguided, guided = ({"num_prompts": 8, "sample": {"steps": 25, "guidance_interval": value}}
                      for value in ([], [0.3, 2]))
  records = [{"step": 2, "fid": 3.0, "settings": old}, {"step": 4, "fid": 2.0, "settings": unguided},
             {"step": 4, "fid": 1.0, "settings": guided}]
  assert [[r["fid"] for r in group] for group in curves.by_settings(records)] == [[3.0, 2.0], [1.0]]


def test_several_workdirs_share_one_figure(trained, tmp_path):
  _, workdir, _ = trained
  other = tmp_path / "copy" / workdir.name  # the same name: the legend shows whole paths
  shutil.copytree(workdir / "logs", other / "logs")
  with open(other / "logs" / "eval.jsonl", "a") as log:
    log.write(json.dumps({"step": 4, "heldout_loss": 0.5, "fid_random_conv": 1.5}) + "\n")
  path = curves.write([workdir, other], tmp_path / "curves.png")
  provenance = media.read_provenance(path)
  assert json.loads(provenance["workdirs"]) == [str(workdir), str(other)]
  metrics = json.loads(provenance["metrics"])
  assert metrics[:3] == ["loss", "heldout_loss", "fid_random_conv"] and "learning_rate" in metrics
  with Image.open(path) as image:  # 3 panels a row (4.5 x 3.2 inches at 100 dpi)
    assert image.size == (3 * 450, -(-len(metrics) // 3) * 320)
  pattern = str(tmp_path / "cop?" / "*")  # a glob pattern names the directories it matches
  assert json.loads(media.read_provenance(curves.write([pattern], tmp_path / "glob.png"))["workdirs"]) == [str(other)]
  path = curves.write([workdir], tmp_path / "one.png", metrics=["loss"], smoothing=0.0)
  assert json.loads(media.read_provenance(path)["metrics"]) == ["loss"]


def test_what_cannot_be_plotted_is_refused(trained, tmp_path):
  _, workdir, _ = trained
  with pytest.raises(ValueError, match="--metrics: no workdir logged nope; there are .*grad_norm.*loss"):
    curves.write([workdir], tmp_path / "x.png", metrics=["loss", "nope"])
  odd = tmp_path / "odd" / "logs"
  odd.mkdir(parents=True)
  (odd / "train.jsonl").write_text(json.dumps({"step": 1, "custom": 0.5}) + "\n")
  with pytest.raises(ValueError, match=r"No metric of loss, .* was logged; name some with --metrics \(there are "
                                       r"custom\)"):
    curves.write([odd.parent], tmp_path / "x.png")
  with pytest.raises(ValueError, match="--workdirs: no directory matches"):
    curves.write([str(tmp_path / "nothing*")], tmp_path / "x.png")
  with pytest.raises(ValueError, match=r"--smoothing=1.0 must be in \[0, 1\)"):
    curves.write([workdir], tmp_path / "x.png", smoothing=1.0)
  for output in (tmp_path, tmp_path / "curves"):  # a directory, no extension: PIL's "unknown file extension: " before
    with pytest.raises(ValueError, match=f"--output={output}: a .png file's path, please"):
      curves.write([workdir], output)
  result = subprocess.run([sys.executable, "-m", "diffusion_jax.curves", f"--workdirs={tmp_path / 'nope'}"],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert result.stderr.splitlines()[-1].startswith("error: No logs/train.jsonl in")
