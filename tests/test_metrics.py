"""Metrics: the shapes judge, Fréchet distance, random-conv FID, the evaluation job."""

import json
import logging

import numpy as np
import pytest
import scipy.linalg

from diffusion_jax.data import captioned_shapes
from diffusion_jax.metrics import fid, shapes_judge


def dataset_images(count, resolution=32, seed=0):
  rng = np.random.default_rng(seed)
  objects = [captioned_shapes.random_objects(rng, 2) for _ in range(count)]
  images = np.stack([captioned_shapes.render(o, resolution) for o in objects])
  return images, [captioned_shapes.caption(o) for o in objects]


@pytest.mark.parametrize("resolution", [32, 64])
def test_judge_scores_real_images_correct_and_noise_near_chance(resolution):
  images, captions = dataset_images(300, resolution)
  assert shapes_judge.accuracy(images, captions)["all"] >= 0.99
  noise = np.random.default_rng(1).integers(0, 256, images.shape, dtype=np.uint8)
  scores = shapes_judge.accuracy(noise, captions)
  assert scores["all"] < 0.05 and scores["color"] < 0.4 and scores["shape"] < 0.5


def test_accuracy_is_also_split_by_object_count():
  one = captioned_shapes.render([(0, 0, 1, 0)], 32)
  two = captioned_shapes.render([(0, 0, 1, 0), (2, 1, 0, 3)], 32)
  captions = [captioned_shapes.caption([(0, 0, 1, 0)]), captioned_shapes.caption([(0, 0, 1, 0), (2, 1, 0, 3)])]
  swapped = shapes_judge.swapped_colours(captions[1])
  scores = shapes_judge.accuracy(np.stack([one, two, two]), [captions[0], captions[1], swapped])
  assert scores["all_1_object"] == 1.0 and scores["all_2_objects"] == 0.5 and scores["all"] == 2 / 3


def test_judge_notices_a_wrong_attribute():
  image = captioned_shapes.render([(0, 0, 1, 0)], 32)  # large red circle, top left
  assert shapes_judge.score(image, "a large red circle at the top left")["color"] == 1.0
  wrong = shapes_judge.score(image, "a small blue square at the top left")
  assert wrong["color"] == wrong["shape"] == wrong["size"] == 0.0 and wrong["position"] == 1.0
  assert shapes_judge.score(image, "a large red circle at the bottom right")["position"] == 0.0
  with pytest.raises(ValueError, match="Not a captioned_shapes caption"):
    shapes_judge.parse("a cat on a mat")


def test_swapped_colours_paint_each_object_in_the_other_ones_colour():
  objects = [(0, 0, 1, 0), (2, 1, 0, 3)]  # a large red circle top left, a small blue square bottom right
  image, caption = captioned_shapes.render(objects, 32), captioned_shapes.caption(objects)
  swapped = shapes_judge.swapped_colours(caption)
  assert sorted(swapped.split()) == sorted(caption.split())  # the same words
  scores = shapes_judge.score(image, swapped)
  assert scores["color"] == 0.0 and scores["shape"] == scores["size"] == scores["position"] == 1.0
  for unchanged in ([objects[0]], [objects[0], (0, 2, 0, 1)]):  # one object; two of one colour
    assert shapes_judge.swapped_colours(captioned_shapes.caption(unchanged)) == captioned_shapes.caption(unchanged)


def test_caption_gap_is_the_mean_loss_difference_over_the_changed_captions():
  from configs import t2i_shapes
  from diffusion_jax import evaluate
  from diffusion_jax.text import tokenizers

  config = t2i_shapes.get_config("test")
  captions = [captioned_shapes.caption(objects) for objects in (
      [(0, 0, 1, 0), (2, 1, 0, 3)], [(0, 0, 1, 0)], [(1, 2, 0, 1), (0, 1, 1, 2)], [(0, 0, 1, 0), (0, 2, 0, 1)])]
  ids, mask = tokenizers.from_config(config)(captions)
  batch = {"image": np.zeros((4, 2, 2, 3), np.float32), "text_ids": ids, "text_mask": mask}
  # A stand-in loss per example and level (two levels), averaged over the batch as heldout_loss's is.
  per_example = lambda b: np.stack([np.sin(b["text_ids"] @ np.arange(ids.shape[1])), b["text_ids"][:, :6].sum(1)], 1)
  heldout = lambda params, frozen, b: per_example(b).mean(0)
  gap = evaluate.caption_gap(config, heldout, None, None, batch, captions, shapes_judge.swapped_colours,
                             heldout(None, None, batch))
  rewritten = [shapes_judge.swapped_colours(c) for c in captions]
  changed = [i for i, (r, c) in enumerate(zip(rewritten, captions)) if r != c]
  assert changed == [0, 2]
  swapped_ids, _ = tokenizers.from_config(config)(rewritten)
  expected = (per_example({"text_ids": swapped_ids}) - per_example(batch))[changed].mean()
  assert gap == pytest.approx(expected, rel=1e-12)
  assert evaluate.caption_gap(config, heldout, None, None, batch, captions, lambda c: c, None) is None


def test_heldout_loss_in_sharded_batches_is_the_loss_of_the_whole_set(trained):
  """12 examples 8 at a time over the 8 devices (the last batch padded) score what all 12 at once on one do: each
  example's noise is its row of one draw for the set."""
  from diffusion_jax import evaluate, sample
  from diffusion_jax.metrics import heldout_loss

  _, workdir, _ = trained
  config, weights, graphdef, _, mesh = sample.load_checkpoint(workdir)
  batch = evaluate.validation_set(config, 12)[0]
  whole = heldout_loss.make_heldout_loss_fn(config, graphdef)(*weights, batch)
  batched = heldout_loss.make_heldout_loss_fn(config, graphdef, mesh, batch_size=8)(*weights, batch)
  assert whole.shape == (len(heldout_loss.LEVELS),) and np.all(whole > 0)
  np.testing.assert_allclose(batched, whole, rtol=1e-5)
  first = heldout_loss.make_heldout_loss_fn(config, graphdef)(*weights,
                                                              {k: v[:8] for k, v in batch.items()})
  assert np.abs(first - whole).max() > 1e-6  # the last four examples count


@pytest.mark.parametrize("samples, dimensions", [(500, 8), (20, 64)])  # full-rank and singular covariances
def test_frechet_distance_matches_direct_scipy_computation(samples, dimensions):
  rng = np.random.default_rng(0)
  a = rng.normal(size=(samples, dimensions))
  b = 0.5 * a + rng.normal(0.3, 1.5, size=(samples, dimensions))
  mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
  root = scipy.linalg.sqrtm(s1 @ s2).real
  direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root)
  assert fid.fid(a, b) == pytest.approx(direct, rel=1e-7)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise():
  images, _ = dataset_images(400)
  features = fid.random_conv_features(images)
  assert fid.fid(features, features) == pytest.approx(0.0, abs=1e-6)
  rng = np.random.default_rng(0)
  distances = []
  for level in (10, 40, 120):
    noisy = np.clip(images + rng.normal(0, level, images.shape), 0, 255).astype(np.uint8)
    distances.append(fid.fid(fid.random_conv_features(noisy), features))
  assert 0 < distances[0] < distances[1] < distances[2]


def test_features_in_padded_batches_are_those_of_the_whole_set(caplog):
  """Ten images in batches of four: three calls of one shape (the last padded), the padding's rows dropped, and
  progress logged; the random-conv features are those of one batch of ten."""
  images = np.random.default_rng(0).integers(0, 256, (10, 16, 16, 3), np.uint8)
  sizes = []

  def mean_colour(x):
    sizes.append(len(x))
    return x.reshape(len(x), -1, 3).mean(1)

  caplog.set_level("INFO", logger="diffusion_jax")
  np.testing.assert_allclose(fid.batched(mean_colour, images, 4, report_every=0), images.mean((1, 2)))
  assert sizes == [4, 4, 4] and "features: 4 of 10 (40%)" in caplog.text
  np.testing.assert_allclose(fid.random_conv_features(images, batch=4), fid.random_conv_features(images), rtol=1e-5,
                             atol=1e-6)


def test_evaluation_job_is_resumable(trained, tiny_clip, monkeypatch, caplog):
  from diffusion_jax import checkpoint, evaluate

  _, workdir, _ = trained
  featurised = []  # every set of images the job computed features of

  def features(images):
    featurised.append(np.array(images))
    return fid.random_conv_features(images)

  monkeypatch.setattr(evaluate, "metric_features", lambda *weights: {"fid_random_conv": features})
  real = evaluate.validation_set(checkpoint.read_config(workdir), 8)[1]
  times_real = lambda: sum(np.array_equal(images, real) for images in featurised)
  first = evaluate.run(workdir, num_prompts=8, heldout_examples=8, combination_prompts=8)
  assert [r["step"] for r in first] == [2, 4]
  assert times_real() == 1 and len(featurised) == 3  # the real set once for both checkpoints, then their samples
  for record in first:
    assert np.isfinite(record["heldout_loss"]) and record["fid_random_conv"] >= 0
    assert 0 <= record["accuracy/all"] <= 1
    assert 0 <= record["accuracy_heldout_combinations/all"] <= 1  # t2i_shapes holds three combinations out
    assert np.isfinite(record["heldout_loss_binding_gap"])
  caplog.set_level(logging.INFO, logger="diffusion_jax")
  assert evaluate.run(workdir, num_prompts=8, heldout_examples=8, combination_prompts=8) == []  # nothing left to do
  assert "already evaluated under these settings" in caplog.text
  lines = [json.loads(line) for line in (workdir / "logs" / "eval.jsonl").read_text().splitlines()]
  assert [line["step"] for line in lines] == [2, 4]
  settings = lines[0]["settings"]  # what the numbers depend on, written beside them
  assert settings == first[0]["settings"] and settings["num_prompts"] == 8 and settings["metrics"] == []
  assert settings["sample"]["guidance_scale"] == trained[0].sample.guidance_scale
  with pytest.raises(ValueError) as error:  # every bad swept value named before anything is loaded
    evaluate.run(workdir, step=4, sweeps={"sampler": ("nope:20", "ddpm:0"), "steps": ("many",), "threshold": ("soft",),
                                          "aug_level": ("0.2",), "guidance_interval": ("5:1", "none")})
  for part in ("'nope:20'", "'ddpm:0'", "must be >= 1", "--steps_sweep value 'many'", "--threshold_sweep value 'soft'",
               "--aug_level_sweep: the model is not a super-resolution stage",
               "--guidance_interval_sweep value '5:1': '5:1': (5.0, 1.0) must be () or (low, high)"):
    assert part in str(error.value)
  featurised.clear()
  sweep = evaluate.run(workdir, step=4, num_prompts=8, heldout_examples=8, combination_prompts=4,
                       sweeps={"guidance": (1.0, 4.0), "sampler": ("ddim:3", "ddpm")}, clip_weights=tiny_clip[0])
  assert times_real() == 1 and len(featurised) == 6  # and once for a checkpoint's five sample settings
  assert sweep[0]["step"] == 4 and 0 <= sweep[0]["clip_score"] <= 100
  assert (workdir / "eval" / "guidance_sweep_step_4.png").exists()
  assert "| guidance |" in (workdir / "eval" / "guidance_sweep_step_4.md").read_text()
  table = (workdir / "eval" / "sampler_sweep_step_4.md").read_text().splitlines()
  assert [line.split(" | ")[0] for line in table[2:]] == ["| ddim:3", "| ddpm"]
  assert "accuracy_heldout_combinations/all" in table[0]  # judged at every sweep point, not only the default
  # Under other settings a checkpoint is evaluated again: here only 2 (4 was, by the --step run above).
  again = evaluate.run(workdir, num_prompts=8, heldout_examples=8, combination_prompts=4, clip_weights=tiny_clip[0])
  assert [r["step"] for r in again] == [2] and "clip_score" in again[0]
  assert ("Checkpoint 2 was evaluated under other settings; evaluating it again (combination_prompts: 8 -> 4; "
          "metrics: [] -> ['clip_score'])") in caplog.text
  assert evaluate.heldout_combination_accuracy(checkpoint.read_config(workdir), None, None, None, 0, None) == {}


def test_a_checkpoint_counts_as_evaluated_only_under_the_same_settings(tmp_path):
  from diffusion_jax import evaluate

  settings = {"num_prompts": 8, "sample": {"negative_prompt": "", "steps": 25}}
  other = {"num_prompts": 8, "sample": {"negative_prompt": "blue", "steps": 25}}
  (tmp_path / "logs").mkdir()
  lines = [{"step": 1}, {"step": 2, "settings": settings}, {"step": 3, "settings": other}]
  (tmp_path / "logs" / "eval.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
  assert evaluate.done_steps(tmp_path, settings) == {1, 2}  # a line from before settings were recorded: any
  assert evaluate.done_steps(tmp_path, other) == {1, 3}
  assert evaluate.changed_settings(settings, other) == ["sample.negative_prompt: '' -> 'blue'"]
  # A line written before a sample field existed was made with that field's old-behaviour value.
  (tmp_path / "logs" / "eval.jsonl").write_text(json.dumps({"step": 5, "settings": settings}) + "\n")
  with_interval = lambda interval: {**settings, "sample": {**settings["sample"], "guidance_interval": interval}}
  assert evaluate.done_steps(tmp_path, with_interval([])) == {5}
  assert evaluate.done_steps(tmp_path, with_interval([1, 2])) == set()
  assert evaluate.changed_settings({"metrics": []}, {}) == ["metrics: [] -> None"]


def test_heldout_combination_captions_are_the_first_validation_captions_naming_one(trained):
  from diffusion_jax import evaluate

  config = trained[0]
  pairs = captioned_shapes.combinations(config.data.heldout_combinations)
  every = evaluate.validation_set(config, config.data.num_eval)[2]
  naming = [c for c in every if any((color, shape) in pairs for color, shape, _, _ in shapes_judge.parse(c))]
  _, images, captions = evaluate.validation_set(config, 3, keep=lambda e: captioned_shapes.shows_any(e, pairs))
  assert len(naming) >= 3 and captions == naming[:3] and len(images) == 3


def test_evaluation_samples_each_caption_from_its_own_noise(trained):
  """The same caption twice in an evaluation set gives two different samples: a set that shares one noise
  is less diverse than the real data, and the noise rather than the caption would decide what is judged."""
  from diffusion_jax import evaluate, sample

  config, weights, graphdef, _, mesh = sample.load_checkpoint(trained[1])
  _, images, captions = evaluate.validation_set(config, 2)
  images, captions = np.concatenate([images, images]), captions * 2
  _, generated = evaluate.generation_metrics(config, graphdef, weights, mesh, images, captions,
                                             evaluate.evaluation_sample_config(config))
  assert np.abs(generated[0].astype(int) - generated[2]).mean() > 1.0


def test_evaluation_skips_unreadable_checkpoints_and_goes_on(trained, tmp_path, caplog):
  import shutil

  from diffusion_jax import evaluate

  workdir = tmp_path / "work"
  shutil.copytree(trained[1], workdir, ignore=shutil.ignore_patterns("logs", "eval", "samples"))
  for path in (workdir / "checkpoints").rglob("*"):  # both checkpoints: the job goes past each (and generates
    if path.is_file() and path.stat().st_size > 1000 and "state" in path.parts:  # nothing, which is cheap)
      path.write_bytes(b"garbage")
  assert evaluate.run(workdir, num_prompts=4, heldout_examples=4, combination_prompts=0) == []
  assert "Checkpoint 2 in" in caplog.text and "Checkpoint 4 in" in caplog.text and "cannot be read" in caplog.text
  with pytest.raises(ValueError, match="Checkpoint 2 in .* cannot be read"):  # asked for by step: an error
    evaluate.run(workdir, step=2, num_prompts=4, heldout_examples=4, combination_prompts=0)
  # More examples than the validation split holds (the test data's 32): refused before any checkpoint is read
  with pytest.raises(ValueError, match="--heldout_examples=40: the validation split holds 32 examples; give at most"):
    evaluate.run(workdir, step=2, num_prompts=4, heldout_examples=40, combination_prompts=0)
  # More images than the host's free memory holds: refused before anything is read, not killed after the sampling
  with pytest.raises(ValueError, match=r"--num_prompts=1000000000: the job would hold about 2304.0 GB of 16 x 16 "
                                       r"images in host memory .the real and the generated, uint8., and .* GB is free"):
    evaluate.run(workdir, step=2, num_prompts=10**9, heldout_examples=4, combination_prompts=0)
  from diffusion_jax import checkpoint

  config = checkpoint.read_config(workdir)
  sample_config = evaluate.evaluation_sample_config(config)
  problem = lambda swept, available: evaluate.host_memory_problem(config, sample_config, 1000, 64, swept, available)
  assert problem(False, 16 * 16 * 3 * 3000) is None and problem(True, 16 * 16 * 3 * 3000) is not None
  assert "give at most about 999," in problem(True, 16 * 16 * 3 * 3999)


def test_the_command_lines_sample_settings_override_the_configs_for_evaluation():
  from configs import t2i_shapes
  from diffusion_jax import evaluate

  config = t2i_shapes.get_config("test")
  settings = evaluate.evaluation_sample_config(config, {"batch_size": 16, "negative_prompt": "blue", "steps": None})
  assert (settings.batch_size, settings.negative_prompt, settings.num_per_prompt) == (16, "blue", 1)
  assert settings.steps == config.sample.steps  # None: left to the config
  assert config.sample.negative_prompt == "" and evaluate.evaluation_sample_config(config).batch_size == 256
