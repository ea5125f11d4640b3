"""Image-to-image and inpainting: the pure pieces, then the sampler and the sampling job editing images."""

import json
import logging

import ml_collections
import numpy as np
import PIL.Image
import pytest

from conftest import sweep_table
from diffusion_jax import edit_inputs, editing, media, sample
from diffusion_jax.data import pipeline


def test_an_edit_runs_the_last_strength_of_the_grid():
  assert editing.first_step(25, 0.8) == 5 and editing.first_step(25, 1.0) == 0
  assert editing.first_step(4, 0.3) == 3  # round down: one step of four
  with pytest.raises(ValueError, match=r"strength=0.2 of 4 sampler steps runs none; raise the strength to at least "
                                       r"0.25 or the steps"):
    editing.first_step(4, 0.2)
  with pytest.raises(ValueError, match=r"strength=0 must be in \(0, 1\]"):
    editing.first_step(4, 0)


@pytest.mark.parametrize("path", ["vp", "flow"])
def test_ddim_inversion_finds_the_noise_that_leads_back_to_the_image(path):
  """With the exact denoiser of Gaussian data x0 ~ N(0, c^2), DDIM inversion maps data to the noisy marginal
  N(0, alpha^2 c^2 + sigma^2) at the start level, and DDIM from there returns the data, the closer the finer the
  grid; fresh noise (SDEdit) keeps far less of it. On either diffusion path."""
  import jax
  import jax.numpy as jnp

  from diffusion_jax import samplers, schedules

  c = 0.5
  exact = lambda x, alpha, sigma: (alpha * c**2 / (alpha**2 * c**2 + sigma**2))[:, None] * x
  x0 = c * jax.random.normal(jax.random.key(0), (4096, 8))

  def round_trip(steps, strength):
    logsnr = schedules.continuous_logsnr_grid(schedules.logsnr_schedule("cosine"), steps)
    alpha, sigma = (a[editing.first_step(steps, strength):] for a in schedules.alpha_sigma_from_logsnr(logsnr, path))
    noisy = editing.inverted(exact, x0, alpha, sigma)
    fresh = alpha[0] * x0 + sigma[0] * jax.random.normal(jax.random.key(1), x0.shape)
    rms = lambda x: float(jnp.sqrt(jnp.mean((samplers.sample(exact, x, alpha, sigma, "ddim") - x0) ** 2)))
    return float(jnp.std(noisy)), float(jnp.sqrt(alpha[0] ** 2 * c**2 + sigma[0] ** 2)), rms(noisy), rms(fresh)

  for strength in (1.0, 0.75):  # the whole grid and its last three quarters
    std, marginal, error, _ = round_trip(40, strength)
    fine_std, _, fine_error, fresh_error = round_trip(160, strength)
    assert fine_std == pytest.approx(marginal, rel=0.02) and abs(fine_std - marginal) < abs(std - marginal) / 3
    assert fine_error < 0.05 * c and fine_error < error / 3 and fresh_error > 0.5 * c


def test_null_text_optimisation_makes_the_guided_walk_retrace_the_path_example_by_example():
  """editing.optimised_nulls with a step whose landing point the text shifts: the optimised texts bring the walk
  onto the path (none of its levels is reached without them), and an example's texts are the same in a batch of
  two as alone. step_of finds the grid step of a noise level."""
  import jax
  import jax.numpy as jnp

  path = jax.random.normal(jax.random.key(0), (5, 2, 3))  # 4 steps, 2 examples, 3 values each
  guided_step = lambda x, text, i: 0.5 * x + text.sum(1)  # text [batch, 2 tokens, 3]
  start = jnp.zeros((2, 2, 3))

  def walk(texts):
    x, xs = path[0], []
    for i in range(4):
      x = guided_step(x, texts[i], i)
      xs.append(x)
    return jnp.stack(xs)

  texts = editing.optimised_nulls(guided_step, path, start, iterations=300, learning_rate=0.05)
  assert texts.shape == (4, 2, 2, 3)
  reached = float(jnp.abs(walk(texts) - path[1:]).max())
  assert reached < 0.05 < float(jnp.abs(walk(jnp.zeros_like(texts)) - path[1:]).max()), reached
  alone = editing.optimised_nulls(guided_step, path[:, 1:], start[1:], iterations=300, learning_rate=0.05)
  np.testing.assert_allclose(alone[:, 0], texts[:, 1], rtol=1e-5, atol=1e-6)
  grid_logsnr = jnp.array([-4.0, -1.0, 2.0])
  np.testing.assert_array_equal(editing.step_of(jnp.array([2.0, -4.0, -1.0]), grid_logsnr), [2, 0, 1])


def test_a_latent_cell_is_kept_only_when_all_its_pixels_and_frames_are():
  keep = np.ones((1, 4, 4, 1), np.float32)
  keep[0, 1, 0] = 0  # one pixel of the top-left 2x2 block is generated anew
  np.testing.assert_array_equal(editing.keep_at(keep, (2, 2))[0, ..., 0], [[0, 1], [1, 1]])
  np.testing.assert_array_equal(editing.keep_at(keep, (4, 4)), keep)
  wide = np.ones((1, 2, 4, 1), np.float32)  # a 2 x 4 image at a 1 x 2 grid: 2 x 2 pixels a cell
  wide[0, 1, 3] = 0
  np.testing.assert_array_equal(editing.keep_at(wide, (1, 2))[0, ..., 0], [[1, 0]])
  clip = np.stack([keep, np.ones_like(keep)], axis=1)  # [batch, frames, h, w, 1]: each frame apart
  np.testing.assert_array_equal(editing.keep_at(clip, (2, 2))[0, :, ..., 0], [[[0, 1], [1, 1]], [[1, 1], [1, 1]]])
  # A causal autoencoder's 3 latent frames of 9: the first frame alone, then frames 1-4 and 5-8.
  frames = np.ones((1, 9, 4, 4, 1), np.float32)
  frames[0, 6, 3, 3] = 0
  np.testing.assert_array_equal(editing.keep_at(frames, (2, 2), 3)[0, :, ..., 0],
                                [[[1, 1], [1, 1]], [[1, 1], [1, 1]], [[1, 1], [1, 0]]])


def test_the_inpainting_denoiser_estimates_the_known_image_where_it_is_kept():
  known, estimate = np.full((2, 4, 4, 3), 0.5, np.float32), np.full((2, 4, 4, 3), -0.5, np.float32)
  keep = np.zeros((2, 4, 4, 1), np.float32)
  keep[:, :, 2:] = 1
  denoise = editing.inpainting_denoiser(lambda x, alpha, sigma: estimate, known, keep)
  out = np.asarray(denoise(None, None, None))
  np.testing.assert_array_equal(out[:, :, 2:], known[:, :, 2:])
  np.testing.assert_array_equal(out[:, :, :2], estimate[:, :, :2])


def perturbed(weights):
  """EMA weights moved off their initial values: the tiny model's output then depends on its input."""
  import jax

  leaves, tree = jax.tree.flatten(weights.params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def test_inpainting_keeps_the_kept_pixels_and_a_lower_strength_keeps_more_of_the_image(trained):
  from diffusion_jax import evaluate
  from diffusion_jax.text import tokenizers

  config, weights, graphdef, _, mesh = sample.load_checkpoint(trained[1])
  params = perturbed(weights)
  _, images, captions = evaluate.validation_set(config, 2)
  sample_config = config.sample.copy_and_resolve_references()
  sample_config.update(steps=4, num_per_prompt=1)

  def edit(strength, keep=None):
    sample_config.strength = strength
    return sample.generate(config, graphdef, params, weights.frozen, tokenizers.from_config(config), captions,
                           sample_config, mesh, init_images=images, keep_masks=keep)[:, 0].astype(int)

  keep, half = np.zeros(images.shape[:3], bool), images.shape[2] // 2
  keep[:, :, half:] = True  # the right half kept, the left half generated anew
  inpainted = edit(1.0, keep)
  np.testing.assert_array_equal(inpainted[:, :, half:], images[:, :, half:])
  assert np.abs(inpainted[:, :, :half] - images[:, :, :half]).mean() > 10
  distance = lambda strength: np.abs(edit(strength) - images).mean()
  assert distance(0.25) < 0.5 * distance(1.0)  # one step from the image barely noised, against all four from noise


def test_an_edit_from_the_inverted_image_keeps_more_of_it_than_one_from_fresh_noise(trained):
  """sample.edit_noise="inversion": the edit starts from the noise the unconditional model's DDIM path leads back
  to the image from; unguided DDIM for the image's caption, which the tiny model reads little, then ends near the
  image, where fresh noise (SDEdit) at the same strength lands far from it."""
  from diffusion_jax import evaluate
  from diffusion_jax.text import tokenizers

  config, weights, graphdef, _, mesh = sample.load_checkpoint(trained[1])
  params = perturbed(weights)
  _, images, captions = evaluate.validation_set(config, 4)
  sample_config = config.sample.copy_and_resolve_references()
  sample_config.update(steps=20, num_per_prompt=1, sampler="ddim", guidance_scale=1.0, strength=0.6)

  def distance(edit_noise):
    sample_config.edit_noise = edit_noise
    edited = sample.generate(config, graphdef, params, weights.frozen, tokenizers.from_config(config), captions,
                             sample_config, mesh, init_images=images)[:, 0]
    return np.abs(edited.astype(int) - images).mean()

  assert distance("inversion") < 0.5 * distance("random")


def test_under_guidance_an_edit_inverted_with_its_source_prompt_keeps_the_image(trained):
  """sample.edit_noise="source_inversion" (negative-prompt inversion): with the image's own caption as both source
  and prompt, guided DDIM at scale 3 is the conditional model's walk run back: it ends where the unguided edit
  does, near the image, where the unconditional inversion, guided, lands far from it. "null_text_inversion" then
  optimises guidance's other text per step: it comes back nearer still (source inversion's error is the
  inversion's own), and with no optimisation steps it is source inversion exactly. Without a source prompt for
  every edit, or with a negative prompt or a source prompt outside such an edit, generate refuses, and null-text
  inversion with any sampler but deterministic DDIM."""
  from diffusion_jax import evaluate
  from diffusion_jax.text import tokenizers

  config, weights, graphdef, _, mesh = sample.load_checkpoint(trained[1])
  params, tokenizer = perturbed(weights), tokenizers.from_config(config)
  _, images, captions = evaluate.validation_set(config, 4)
  sample_config = config.sample.copy_and_resolve_references()
  sample_config.update(steps=10, num_per_prompt=1, sampler="ddim", strength=0.6)

  def edit(edit_noise, guidance_scale, iterations=10, **given):
    sample_config.update(edit_noise=edit_noise, guidance_scale=guidance_scale, null_text_iterations=iterations)
    return sample.generate(config, graphdef, params, weights.frozen, tokenizer, captions, sample_config, mesh,
                           init_images=images, **given)[:, 0].astype(int)

  error = lambda edited: np.abs(edited - images).mean()
  from_source = edit("source_inversion", 3.0, source_prompts=captions)
  unguided = edit("source_inversion", 1.0, source_prompts=captions)
  assert np.abs(from_source - unguided).max() <= 1  # the same walk back, up to float rounding
  assert error(from_source) < 0.5 * error(edit("inversion", 3.0))
  np.testing.assert_array_equal(edit("null_text_inversion", 3.0, iterations=0, source_prompts=captions), from_source)
  sample_config.null_text_learning_rate = 0.04  # 4 Adam steps of 0.04, not the config's 10 of 0.01: 0.86x measured
  assert error(edit("null_text_inversion", 3.0, iterations=4, source_prompts=captions)) < 0.93 * error(from_source)
  with pytest.raises(ValueError, match=r"give every edit one \(--source_prompt.*none for \['"):
    edit("source_inversion", 3.0, source_prompts=captions[:2] + ["", captions[3]])
  with pytest.raises(ValueError, match="not with a negative prompt"):
    edit("source_inversion", 3.0, source_prompts=captions, negative_prompts=["blurry"] * 4)
  with pytest.raises(ValueError, match="read by edits with --edit_noise=source_inversion or null_text_inversion only"):
    edit("inversion", 3.0, source_prompts=captions)
  sample_config.sampler = "dpmpp_2m"
  with pytest.raises(ValueError, match="set sampler='ddim' and eta=0"):
    edit("null_text_inversion", 3.0, source_prompts=captions)


def test_the_sampling_job_edits_the_images_a_prompts_file_names(trained, tmp_path, caplog):
  config, workdir, _ = trained
  resolution = config.data.resolution
  rng = np.random.default_rng(0)
  picture = rng.integers(0, 256, (40, 48, 3), np.uint8)  # another size: shorter side to the resolution, centre crop
  mask = np.zeros((40, 48), np.uint8)
  mask[:20] = 255  # the top half generated anew
  PIL.Image.fromarray(picture).save(tmp_path / "picture.png")
  PIL.Image.fromarray(mask).save(tmp_path / "mask.png")
  PIL.Image.fromarray(mask[:, :40]).save(tmp_path / "narrow_mask.png")
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("\n".join(json.dumps(e) for e in [{"prompt": "a large red circle", "init_image": "picture.png",
                                                        "mask": "mask.png"},
                                                       {"prompt": "a small blue square"},
                                                       {"prompt": "a large red circle", "init_image": "picture.png"},
                                                       {"prompt": "a large red circle", "init_image": "picture.png",
                                                        "strength": 0.25}]))
  out = tmp_path / "out"
  settings = {"steps": 4, "num_per_prompt": 1, "strength": 0.5}
  sample.run(workdir, settings, prompts, output_dir=out)
  records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
  assert records[0]["init_image"] == str(tmp_path / "picture.png") and records[0]["strength"] == 0.5
  assert records[0]["mask"] == str(tmp_path / "mask.png") and "init_image" not in records[1]
  assert records[0]["edit_noise"] == "random" and "edit_noise" not in records[1]
  image, keep = edit_inputs.image_edit(records[0], resolution)
  np.testing.assert_array_equal(image, pipeline.resize_and_crop(picture, resolution, None))
  half = resolution // 2  # the mask's top half, resized and cropped as the image (bicubic: the edge may move)
  assert keep.shape == (resolution, resolution) and keep[:half - 1].sum() == 0 and keep[half + 1:].all()
  edited = media.read_image(out / records[0]["file"])
  np.testing.assert_array_equal(edited[keep], image[keep])
  assert np.abs(edited[~keep].astype(int) - image[~keep]).mean() > 5
  assert [r["strength"] for r in records[2:]] == [0.5, 0.25]  # --strength, then the prompt's own
  distance = lambda record: np.abs(media.read_image(out / record["file"]).astype(int) - image).mean()
  assert distance(records[3]) < distance(records[2])  # its own lower strength keeps more of the image

  def refused(message, **overrides):
    with pytest.raises(ValueError, match=message):
      sample.run(workdir, {**settings, **overrides.pop("settings", {})}, overrides.pop("prompts", None),
                 output_dir=tmp_path / "x", **overrides)

  refused(r"strength=0.2 of 4 sampler steps runs none", init_image=tmp_path / "picture.png",
          settings={"strength": 0.2})
  refused(r"--strength=1.5 must be in \(0, 1\]", init_image=tmp_path / "picture.png", settings={"strength": 1.5})
  refused(r"mask '.*narrow_mask.png' is 40x40 pixels, its init_image '.*picture.png' 48x40: they must match",
          init_image=tmp_path / "picture.png", mask=tmp_path / "narrow_mask.png")
  refused(r"init_image '.*nope.png' cannot be read as an image", init_image=tmp_path / "nope.png")
  refused(r"--edit_noise: not used here", settings={"edit_noise": "inversion"})
  with caplog.at_level(logging.WARNING, "diffusion_jax"):  # said before the missing checkpoint is found
    refused(r"999", init_image=tmp_path / "picture.png", step=999, settings={"edit_noise": "inversion",
                                                                           "num_per_prompt": 2})
  assert "--edit_noise=inversion starts every sample of an edited prompt from the same noise" in caplog.text
  (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "a red circle", "mask": "mask.png"}))
  refused(r"a 'mask' needs the 'init_image' it belongs to", prompts=tmp_path / "bad.jsonl")
  (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "a red circle", "strength": 0.5}))
  refused(r"A prompt's 'strength' is the part of the grid run from its image: .*\['a red circle'\]",
          prompts=tmp_path / "bad.jsonl")
  (tmp_path / "own.jsonl").write_text(json.dumps({"prompt": "a red circle", "init_image": "picture.png",
                                                  "strength": 1}))
  refused(r"--strength: not used here", prompts=tmp_path / "own.jsonl")  # every edit has its own
  inverting = {"edit_noise": "source_inversion"}
  refused(r"source_inversion and null_text_inversion invert each image with a prompt of what it shows: .*none for "
          r"\[.a large red circle at",
          init_image=tmp_path / "picture.png", settings=inverting)
  refused(r"source_inversion or null_text_inversion alone; here --edit_noise is random",
          init_image=tmp_path / "picture.png", source_prompt="noise")
  refused(r"source_inversion or null_text_inversion alone; here nothing is edited", source_prompt="noise",
          settings=inverting)
  refused(r"not with a negative prompt", init_image=tmp_path / "picture.png", source_prompt="noise",
          settings={**inverting, "negative_prompt": "blurry"})
  refused(r"not with an autoguidance guide", init_image=tmp_path / "picture.png", source_prompt="noise",
          settings=inverting, guide_step=0)
  (tmp_path / "sources.jsonl").write_text("\n".join(json.dumps(e) for e in [
      {"prompt": "a large red circle", "init_image": "picture.png", "source_prompt": "noise"},
      {"prompt": "a small blue square", "source_prompt": "noise"}]))
  refused(r"these prompts edit nothing .*: \['a small blue square'\]", prompts=tmp_path / "sources.jsonl",
          settings=inverting)
  (tmp_path / "sources.jsonl").write_text("\n".join(json.dumps(e) for e in [
      {"prompt": "a large red circle", "init_image": "picture.png", "source_prompt": "coloured noise"},
      {"prompt": "a small blue square", "init_image": "picture.png"}, {"prompt": "a small blue square"}]))
  sample.run(workdir, {**settings, **inverting}, tmp_path / "sources.jsonl", output_dir=out,
             source_prompt="noise")
  records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
  assert [r.get("source_prompt") for r in records] == ["coloured noise", "noise", None]  # its own, else the flag's
  assert [r.get("edit_noise") for r in records] == ["source_inversion"] * 2 + [None]


@pytest.mark.xdist_group("video")
def test_a_video_model_animates_an_image_as_its_clips_first_frame(trained_video, tmp_path):
  config, workdir, _ = trained_video
  resolution = config.data.resolution
  picture = np.random.default_rng(0).integers(0, 256, (resolution, resolution, 3), np.uint8)
  PIL.Image.fromarray(picture).save(tmp_path / "picture.png")
  out = tmp_path / "out"
  settings = {"steps": 2, "num_per_prompt": 2, "frames": 3, "strength": 1.0}
  sample.run(workdir, settings, None, output_dir=out, init_image=tmp_path / "picture.png")
  records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
  assert len(records) == 2 * len(config.sample.prompts)
  for record in records:
    strip = media.read_image(out / record["file"])  # the clip's frames left to right, lossless
    assert strip.shape == (resolution, 3 * resolution, 3) and record["init_image"] == str(tmp_path / "picture.png")
    np.testing.assert_array_equal(strip[:, :resolution], picture)  # the first frame is the image
    assert np.abs(strip[:, resolution:].astype(int) - np.tile(picture, (1, 2, 1))).mean() > 10  # the rest generated
  PIL.Image.fromarray(np.zeros((resolution, resolution), np.uint8)).save(tmp_path / "mask.png")
  with pytest.raises(ValueError, match="--mask is for image models"):
    sample.run(workdir, settings, None, output_dir=tmp_path / "x", init_image=tmp_path / "picture.png",
               mask=tmp_path / "mask.png")
  with pytest.raises(ValueError, match="--last_image .* is the last frame of an image-to-video Wan's clips"):
    sample.run(workdir, settings, None, output_dir=tmp_path / "x", init_image=tmp_path / "picture.png",
               last_image=tmp_path / "picture.png")


@pytest.mark.xdist_group("video")
def test_a_video_model_edits_a_clip_as_a_whole(trained, trained_video, tmp_path):
  """Video-to-video: a GIF's frames (brought to the model's resolution) noised to the strength and denoised, none
  kept; a lower strength keeps more of the clip. A clip too short, a file of another kind, and an image model
  are refused."""
  config, workdir, _ = trained_video
  resolution = config.data.resolution
  clip = np.random.default_rng(0).integers(0, 256, (4, 2 * resolution, 2 * resolution, 3), np.uint8)
  media.save_gif(tmp_path / "clip.gif", clip, {})
  given = np.stack([pipeline.resize_and_crop(frame, resolution, None) for frame in clip[:3]])
  settings = {"steps": 4, "num_per_prompt": 1, "frames": 3}
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text("\n".join(json.dumps({"prompt": "a red circle moving left", "strength": s}) for s in (0.25, 1)))
  sample.run(workdir, settings, prompts, output_dir=tmp_path / "out", init_video=tmp_path / "clip.gif")
  records = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
  assert [(r["init_video"], r["strength"]) for r in records] == [(str(tmp_path / "clip.gif"), s) for s in (0.25, 1)]
  strips = [media.read_image(tmp_path / "out" / r["file"]) for r in records]
  distances = [np.abs(strip.astype(int) - np.concatenate(list(given), axis=1)).mean() for strip in strips]
  assert strips[0].shape == (resolution, 3 * resolution, 3) and 0 < distances[0] < distances[1]

  def refused(message, workdir=workdir, clip="clip.gif"):
    with pytest.raises(ValueError, match=message):
      sample.run(workdir, settings, None, output_dir=tmp_path / "x", init_video=tmp_path / clip)

  media.save_gif(tmp_path / "short.gif", clip[:2], {})
  refused(r"short.gif' has 2 frames; the model makes clips of 3", clip="short.gif")
  refused(r"is a clip for a video model to edit; this model makes images", workdir=trained[1])
  (tmp_path / "clip.png").write_bytes(b"")
  with pytest.raises(ValueError, match=r"init_video '.*clip.png': a .gif or .mp4 clip"):
    edit_inputs.video_edit({"init_video": str(tmp_path / "clip.png")}, resolution, 3)


def test_evaluation_scores_image_edits_by_the_new_caption_and_by_what_they_kept(trained, tmp_path):
  """evaluate --image_to_image: each real image is edited toward its caption recoloured (the judge reads the real
  images' colours as wrong for it, the rest as before); the edits are judged by that caption and by the image's
  own (accuracy_source/*), with their PSNR against the image, which a strength sweep shows falling as more of the
  grid runs. What cannot run is refused before any checkpoint is read."""
  import shutil

  from diffusion_jax import evaluate
  from diffusion_jax.metrics import judges, shapes_judge

  two = "a small red circle at the top left and a large cyan square at the bottom right"
  assert shapes_judge.recoloured(two) == two.replace("red", "green").replace("cyan", "red")
  config, source, _ = trained
  _, images, captions = evaluate.validation_set(config, 16)
  as_captioned = judges.accuracy(config, images, captions)
  recoloured = judges.accuracy(config, images, evaluate.edit_captions(config, captions))
  assert recoloured["accuracy/color"] < as_captioned["accuracy/color"] and recoloured["accuracy/color"] <= 0.1
  assert all(recoloured[f"accuracy/{k}"] == as_captioned[f"accuracy/{k}"] for k in ("shape", "size", "position"))
  rolled = evaluate.edit_captions(ml_collections.ConfigDict({"data": {"dataset": "folder"}}), ["a", "b", "c"])
  assert rolled == ["b", "c", "a"]  # other data: the next image's caption

  workdir = tmp_path / "work"  # eval.jsonl is written into the workdir
  shutil.copytree(source, workdir, ignore=shutil.ignore_patterns("logs", "eval", "samples"))
  options = dict(step=4, num_prompts=4, heldout_examples=4, combination_prompts=0)
  [record] = evaluate.run(workdir, edit_real="image_to_image", sample_overrides={"steps": 4, "strength": 0.25},
                          sweeps={"strength": ["0.25", "1"], "edit_noise": ["random", "inversion", "source_inversion"]},
                          **options)
  assert record["settings"]["image_to_image"] and record["settings"]["sample"]["strength"] == 0.25
  assert {"accuracy/color", "accuracy_source/color", "psnr_source", "fid_random_conv"} <= record.keys()
  psnr = lambda sweep: [row["psnr_source"] for row in sweep_table(workdir / "eval" / f"{sweep}_step_4.md").values()]
  kept, regenerated = psnr("strength_sweep")
  assert kept == pytest.approx(record["psnr_source"], abs=1e-3) and kept > regenerated + 1
  assert (workdir / "eval" / "strength_sweep_step_4.png").exists()
  fresh, inverted, from_caption = psnr("edit_noise_sweep")  # source_inversion: each image's caption its source
  assert fresh == pytest.approx(kept, abs=1e-3) and inverted != fresh and from_caption not in (fresh, inverted)
  shown = PIL.Image.open(workdir / "eval" / "edits_step_4.png")  # the real images above their edits
  assert json.loads(shown.text["captions"]) == evaluate.edit_captions(config, captions[:4])
  assert shown.text["strength"] == "0.25" and shown.size[1] == 2 * (2 * config.data.resolution + 18)

  def refused(message, **overrides):
    with pytest.raises(ValueError, match=message):
      evaluate.run(workdir, **{**options, "edit_real": "image_to_image", **overrides})

  refused(r"--strength_sweep value '0.1': --strength=0.1 of 4 sampler steps runs none",
          sample_overrides={"steps": 4}, sweeps={"strength": ["0.1"]})
  refused(r"--strength_sweep: only with --image_to_video, --image_to_image or --video_to_video", edit_real=None,
          sweeps={"strength": ["0.5"]})
  refused(r"--video_to_video: this model makes images .*; --image_to_image edits images", edit_real="video_to_video")
  refused(r"--edit_noise_sweep value 'source_inversion': --edit_noise=source_inversion: .* not with a negative prompt",
          sample_overrides={"negative_prompt": "blurry"}, sweeps={"edit_noise": ["source_inversion"]})
  refused(r"--edit_noise=source_inversion: .* not with an autoguidance guide",
          sample_overrides={"edit_noise": "source_inversion"}, guide_step=4)
  refused(r"--edit_toward=own: only with --image_to_image or --video_to_video", edit_real=None, edit_toward="own")
  refused(r"--edit_toward='back': one of other, own", edit_toward="back")


def test_evaluation_reconstructs_images_edited_toward_their_own_captions(trained, tmp_path):
  """evaluate --image_to_image --edit_toward=own: each real image edited toward its own caption (a reconstruction,
  which psnr_source scores), so the judge's accuracy for the caption asked is its accuracy for the image's own."""
  import shutil

  from diffusion_jax import evaluate

  config, source, _ = trained
  workdir = tmp_path / "work"
  shutil.copytree(source, workdir, ignore=shutil.ignore_patterns("logs", "eval", "samples"))
  [record] = evaluate.run(workdir, step=4, num_prompts=8, heldout_examples=4, combination_prompts=0,
                          edit_real="image_to_image", edit_toward="own",
                          sample_overrides={"steps": 4, "strength": 1.0, "edit_noise": "source_inversion"})
  assert record["settings"]["edit_toward"] == "own" and record["settings"]["image_to_image"]
  assert all(record[f"accuracy/{k}"] == record[f"accuracy_source/{k}"] for k in ("color", "shape", "all"))
  assert record["psnr_source"] > 0
  _, _, captions = evaluate.validation_set(config, 8)
  assert json.loads(PIL.Image.open(workdir / "eval" / "edits_step_4.png").text["captions"]) == captions


@pytest.mark.xdist_group("video")
def test_evaluation_scores_video_edits_by_the_new_caption_and_by_what_they_kept(trained_video, tmp_path):
  """evaluate --video_to_video: each real clip is edited toward its caption with the direction reversed (the
  real clips' judge says they show the opposite, in the same colour); the edits are judged by that caption and by
  the clip's own. What cannot run is refused."""
  import shutil

  from diffusion_jax import evaluate
  from diffusion_jax.metrics import judges

  config, source, _ = trained_video
  _, clips, captions = evaluate.validation_set(config, 4)
  assert judges.accuracy(config, clips, captions)["accuracy/direction"] == 1.0
  reversed_judged = judges.accuracy(config, clips, evaluate.edit_captions(config, captions))
  assert reversed_judged["accuracy/direction"] == 0.0 and reversed_judged["accuracy/color"] == 1.0

  workdir = tmp_path / "work"
  shutil.copytree(source, workdir, ignore=shutil.ignore_patterns("logs", "eval", "samples"))
  options = dict(step=4, num_prompts=4, heldout_examples=4, combination_prompts=0)
  [record] = evaluate.run(workdir, edit_real="video_to_video", sample_overrides={"steps": 4, "strength": 0.5},
                          **options)
  assert record["settings"]["video_to_video"] and "image_to_image" not in record["settings"]
  assert {"accuracy/direction", "accuracy_source/direction", "psnr_source", "fvd_random_conv"} <= record.keys()
  assert (workdir / "eval" / "edits_step_4.png").exists()

  def refused(message, **overrides):
    with pytest.raises(ValueError, match=message):
      evaluate.run(workdir, **{**options, "edit_real": "video_to_video", **overrides})

  refused(r"not with --video_length", sample_overrides={"video_length": 6})
  refused(r"--image_to_video and --video_to_video: one kind of edit at a time", image_to_video=True)
  refused(r"--image_to_image: this model makes clips; --video_to_video edits its clips whole",
          edit_real="image_to_image")


def test_super_resolution_stages_do_not_edit():
  from configs import sr_shapes

  from diffusion_jax import evaluate

  config = sr_shapes.get_config("test")
  with pytest.raises(ValueError, match="are for text-to-image and text-to-video models; this is a super-resolution"):
    edit_inputs.check_editable(config)
  with pytest.raises(ValueError, match="--image_to_image: Image-to-image, .* this is a super-resolution stage"):
    evaluate.video_problems(config, evaluate.evaluation_sample_config(config), False, "image_to_image")


def test_reconstruction_guidance_moves_the_generated_estimate_to_agree_with_the_kept():
  """Ho et al.'s eq. 7 on a linear denoiser coupling two pixels: estimate (x0 + x1, x1), pixel 0 kept at k.
  The kept pixel's squared error (k - x0 - x1)^2 has gradient -2 (k - x0 - x1) w.r.t. x1, so the generated
  pixel's estimate becomes x1 + w * alpha * (k - x0 - x1)."""
  import jax.numpy as jnp

  denoise_fn = lambda x, alpha, sigma: jnp.stack([x[:, 0] + x[:, 1], x[:, 1]], axis=1)
  x, known, keep = jnp.array([[1.0, 2.0]]), jnp.array([[5.0, 0.0]]), jnp.array([[1.0, 0.0]])
  alpha = jnp.array([0.5])
  guided = editing.inpainting_denoiser(denoise_fn, known, keep, reconstruction_guidance=2.0)
  np.testing.assert_allclose(guided(x, alpha, None), [[5.0, 2.0 + 2.0 * 0.5 * (5.0 - 3.0)]])
  np.testing.assert_allclose(editing.inpainting_denoiser(denoise_fn, known, keep)(x, alpha, None), [[5.0, 2.0]])
