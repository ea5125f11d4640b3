"""Videos longer than a clip, window by window (video_extension.py)."""

import json

import ml_collections
import numpy as np
import pytest

from diffusion_jax import media, sample, video_extension


def test_windows_add_a_clip_less_its_context_until_the_length_is_reached():
  assert video_extension.window_count(8, 4, 2) == 2  # 4 + 2 + 2
  assert video_extension.window_count(7, 4, 2) == 2  # 8 frames made, the last cut
  assert video_extension.window_count(4, 4, 2) == 0
  settings = lambda **s: ml_collections.ConfigDict({"video_length": 0, "context_frames": 0, **s})
  assert video_extension.context_frames(settings(), 5) == 2 and video_extension.problems(settings(), 4) == []
  assert "--video_length=4 is not longer than a clip (4 frames" in video_extension.problems(settings(video_length=4),
                                                                                              4)[0]
  assert "--context_frames=4 must be in 1..3" in video_extension.problems(settings(video_length=9, context_frames=4),
                                                                          4)[0]
  # On a causal autoencoder's latents (4 frames a latent frame but the first): whole latent frames, 1 + 4 k.
  assert [video_extension.context_frames(settings(), frames, 4) for frames in (5, 9, 13, 17)] == [1, 5, 5, 9]
  assert video_extension.problems(settings(video_length=20), 9, 4) == []
  assert "--context_frames=3: a window keeps whole latent frames of the causal autoencoder (the first holds one " \
         "frame, each other 4): give 1 + a multiple of 4 below 9 (e.g. 1 or 5)" in video_extension.problems(
             settings(video_length=20, context_frames=3), 9, 4)[0]


@pytest.mark.xdist_group("video")
def test_a_video_model_makes_videos_longer_than_its_clips(trained_video, trained, tmp_path):
  config, workdir, _ = trained_video
  settings = {"steps": 2, "num_per_prompt": 2, "frames": 3}
  sample.run(workdir, settings, None, output_dir=tmp_path / "clips")
  sample.run(workdir, {**settings, "video_length": 6, "context_frames": 1}, None,
             output_dir=tmp_path / "long")
  records = [json.loads(line) for line in (tmp_path / "long" / "manifest.jsonl").read_text().splitlines()]
  assert records[0]["video_length"] == 6 and records[0]["context_frames"] == 1 and records[0]["clip_frames"] == 3
  side = config.data.resolution
  videos = []
  for record in records:
    strip = media.read_image(tmp_path / "long" / record["file"])  # frames left to right, lossless
    assert strip.shape == (side, 6 * side, 3)
    assert media.read_gif(tmp_path / "long" / record["animation"])[0].shape[0] == 6
    clip = media.read_image(tmp_path / "clips" / record["file"])
    np.testing.assert_array_equal(strip[:, :3 * side], clip)  # the first clip is the one a plain run makes
    videos.append(strip.reshape(side, 6, side, 3))
  # The two samples of a prompt go on with noise of their own: their new frames differ.
  assert np.abs(videos[0][:, 3:].astype(int) - videos[1][:, 3:]).mean() > 5

  def refused(message, workdir, **overrides):
    with pytest.raises(ValueError, match=message):
      sample.run(workdir, {**settings, **overrides}, None, output_dir=tmp_path / "x")

  refused("--video_length=3 is not longer than a clip", workdir, video_length=3)
  refused(r"--context_frames=3 must be in 1..2", workdir, video_length=8, context_frames=3)
  refused("--video_length extends the clips of a video model; this workdir's model makes images", trained[1],
          video_length=8, frames=None)
  refused("--strength, --context_frames: not used here", workdir, strength=0.5, context_frames=1)


@pytest.mark.xdist_group("video")
def test_evaluation_scores_image_to_video_and_the_frames_an_extension_makes(trained_video, trained, tmp_path):
  import shutil

  from diffusion_jax import evaluate

  workdir = tmp_path / "work"  # eval.jsonl is written into the workdir
  shutil.copytree(trained_video[1], workdir, ignore=shutil.ignore_patterns("logs", "eval", "samples"))
  options = dict(step=4, num_prompts=4, heldout_examples=4, combination_prompts=0)
  video = {"video_length": 6, "context_frames": 2, "steps": 2}
  [record] = evaluate.run(workdir, image_to_video=True, sample_overrides=video, **options)
  assert record["settings"]["image_to_video"] and record["settings"]["sample"]["video_length"] == 6
  assert 0 <= record["accuracy/direction"] <= 1 and np.isfinite(record["fvd_random_conv"])
  with pytest.raises(ValueError, match=r"--image_to_video: this model makes images \(give a video model's workdir\); "
                                       "--video_length: this model makes images"):
    evaluate.run(trained[1], image_to_video=True, sample_overrides=video, **options)
  with pytest.raises(ValueError, match="--video_length=3 is not longer than a clip"):
    evaluate.run(workdir, sample_overrides={"video_length": 3, "frames": 3}, **options)
