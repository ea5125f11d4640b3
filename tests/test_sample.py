"""Sampling job: outputs with provenance, and clear errors for bad input."""

import json
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import PIL.Image
import pytest

from diffusion_jax import media, sample

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_samples_carry_provenance(trained, tmp_path, monkeypatch):
  config, workdir, _ = trained
  monkeypatch.setattr(sample, "GRID_PROMPTS", 1)  # the grid shows the first prompt; every sample is written
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text(json.dumps({"prompt": "a large red circle at the top left", "seed": 11}) + "\n"
                     + json.dumps({"prompt": "a small blue square at the bottom right", "guidance_scale": 2.0}) + "\n")
  out = tmp_path / "out"
  grid = sample.run(workdir, {"num_per_prompt": 3, "steps": 3, "sampler": "ddim", "seed": 7},
                    prompts, step=2, output_dir=out)
  records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
  assert len(records) == 6 and PIL.Image.open(grid).height == 2 * config.data.resolution + 18  # (one labelled row)
  for record in records:
    image = np.asarray(PIL.Image.open(out / record["file"]))
    assert image.shape == (config.data.resolution, config.data.resolution, 3)
    provenance = media.read_provenance(out / record["file"])
    assert provenance["prompt"] == record["prompt"] and provenance["generated_by"] == "diffusion_jax"
    for key in ("seed", "sampler", "steps", "guidance_scale", "checkpoint_step", "config_hash"):
      assert key in provenance
    assert json.loads(provenance["checkpoint_step"]) == 2 and provenance["sampler"] == "ddim"
  assert [(r["seed"], r["guidance_scale"]) for r in records[::3]] == [(11, 3.0), (7, 2.0)]


def test_an_interrupted_sampling_job_keeps_every_sample_it_made(trained, tmp_path, caplog):
  """Samples are written as they are made: a job stopped by Ctrl-C while sampling its second group of prompts (here
  its tokenizer's second call) keeps the first group's files, each listed in manifest.jsonl, and says so."""
  from diffusion_jax.text import tokenizers

  config, weights, graphdef, step, mesh = sample.load_checkpoint(trained[1])
  sample_config = config.sample.copy_and_resolve_references()
  sample_config.update(steps=2, num_per_prompt=2)
  tokenizer, calls = tokenizers.from_config(config), []

  def interrupted_on_the_second_group(texts):
    calls.append(texts)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return tokenizer(texts)

  prompts = [{"prompt": "a red circle", "guidance_scale": 2.0}, {"prompt": "a blue square", "guidance_scale": 3.0}]
  with pytest.raises(KeyboardInterrupt):
    sample.write_samples(config, graphdef, weights.params, weights.frozen, interrupted_on_the_second_group, prompts,
                         sample_config, mesh, step, tmp_path)
  records = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
  assert [(r["prompt"], r["index"], r["file"]) for r in records] == [("a red circle", 0, "p000_00.png"),
                                                                     ("a red circle", 1, "p000_01.png")]
  assert all(media.read_provenance(tmp_path / r["file"])["prompt"] == "a red circle" for r in records)
  assert not (tmp_path / "grid.png").exists() and not list(tmp_path.glob("p001_*"))
  assert f"interrupted: the 2 samples made so far are in {tmp_path} (manifest.jsonl lists them" in caplog.text


def test_samples_of_another_size_and_the_image_they_edit_brought_to_it(trained, tmp_path):
  """--height and --width (any size the network divides): 8 x 24 samples (UniPC), an --init_image of another aspect
  scaled to cover them and centre-cropped as training images are, its --mask with it: the kept pixels are the
  image's."""
  from diffusion_jax.data import pipeline

  _, workdir, _ = trained
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (30, 40, 3), np.uint8)
  mask = np.zeros((30, 40, 3), np.uint8)
  mask[:, 20:] = 255  # the right half generated anew
  media.save_png(tmp_path / "image.png", image, {})
  media.save_png(tmp_path / "mask.png", mask, {})
  out = tmp_path / "out"
  sample.run(workdir, {"height": 8, "width": 24, "steps": 2, "sampler": "unipc", "num_per_prompt": 1},
             output_dir=out, init_image=tmp_path / "image.png", mask=tmp_path / "mask.png")
  records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
  samples = [np.asarray(PIL.Image.open(out / r["file"])) for r in records]
  assert {s.shape for s in samples} == {(8, 24, 3)}
  kept = pipeline.resize_and_crop(mask, (8, 24), None)[..., 0] < 128
  assert kept.any() and not kept.all()
  for generated in samples:
    np.testing.assert_array_equal(generated[kept], pipeline.resize_and_crop(image, (8, 24), None)[kept])


def test_a_flow_schedules_sampling_grid_takes_its_own_time_shift():
  """sample.flow_shift (--flow_shift): a flow schedule's sampling grid shifted by it, sigma = s t / (1 + (s - 1) t)
  at t from 1 down to 0, instead of by the training schedule's shift (configs/wan_t2v.py trains at 5 and samples at
  3, as Wan's pipelines sample 480p); 0 keeps the training shift; another schedule refuses it."""
  from configs import t2i_shapes, wan_t2v

  from diffusion_jax import config_checks, schedules

  config = wan_t2v.get_config()
  assert (config.sample.flow_shift, config.diffusion.schedule_params.shift) == (3.0, 5.0)
  for shift in (3.0, 5.0):
    config.sample.flow_shift = shift
    t = np.linspace(1.0, 0.0, config.sample.steps + 1)[1:-1]
    sigma = schedules.alpha_sigma_from_logsnr(sample.sampling_logsnr(config, config.sample), "flow")[1]
    np.testing.assert_allclose(sigma[1:-1], shift * t / (1 + (shift - 1) * t), rtol=1e-5)
    assert sigma[-1] == 0 and sigma[0] > 0.999
  config.sample.flow_shift = 0.0
  np.testing.assert_array_equal(sample.sampling_logsnr(config, config.sample), schedules.continuous_logsnr_grid(
      schedules.logsnr_schedule("flow", shift=5.0), config.sample.steps))
  image_config = t2i_shapes.get_config("test")
  image_config.sample.flow_shift = 3.0
  assert config_checks.flow_shift_problem(image_config, image_config.sample, "--") == (
      "--flow_shift=3.0: the time shift of a flow schedule's sampling grid; this model's schedule is 'cosine': leave "
      "it at 0")


def test_skip_layer_guidance_is_said_to_act_at_no_step_where_none_of_a_samplings_steps_is_in_its_window():
  """sample.skip_layer_guidance_absent: SD3's pipelines' window of 28 steps (start 0.01, stop 0.2) is steps 1 to 5;
  an edit at strength 0.6 runs steps 12 to 27 (none of them), at 0.9 steps 3 to 27; 2 steps hold no window; a
  prompt at guidance scale 1 adds none either."""
  from configs import t2i_shapes

  config = t2i_shapes.get_config("test").sample
  config.update(steps=28, guidance_scale=7.0, skip_layers=(7,), skip_layer_start=0.01, skip_layer_stop=0.2,
                strength=0.6)
  assert sample.skip_layer_guidance_absent(config, edit=False) is None
  assert sample.skip_layer_guidance_absent(config, edit=True) == (
      "its window (skip_layer_start / stop 0.01 / 0.2: steps 1 to 5 of 28) holds none of the steps an edit at "
      "strength 0.6 runs (12 to 27)")
  config.strength = 0.9
  assert sample.skip_layer_guidance_absent(config, edit=True) is None
  config.steps = 2  # 0.02 < i < 0.4: no step
  assert sample.skip_layer_guidance_absent(config, edit=False) == (
      "its window (skip_layer_start / stop 0.01 / 0.2: none of 2 steps) holds none of them")
  config.guidance_scale = 1.0
  assert "guidance scale 1" in sample.skip_layer_guidance_absent(config, edit=False)
  config.skip_layers = ()
  assert sample.skip_layer_guidance_absent(config, edit=True) is None


def test_outside_its_guidance_interval_a_sample_is_unguided(trained, tmp_path, caplog):
  interval = (1e6, 1e7)  # above every noise level sigma/alpha of the grid: no step is guided
  workdir, settings = trained[1], {"num_per_prompt": 2, "steps": 3, "sampler": "ddim", "guidance_interval": interval}
  unguided = sample.run(workdir, {**settings, "guidance_scale": 1.0}, step=2, output_dir=tmp_path / "a")
  assert "--guidance_interval: no effect at guidance scale 1" in caplog.text
  outside = sample.run(workdir, {**settings, "guidance_scale": 3.0}, step=2, output_dir=tmp_path / "b")
  records = [json.loads(line) for line in (tmp_path / "b" / "manifest.jsonl").read_text().splitlines()]
  assert records and all(r["guidance_interval"] == list(interval) and r["guidance_scale"] == 3.0 for r in records)
  for record in records:
    images = [np.asarray(PIL.Image.open(grid.parent / record["file"])) for grid in (unguided, outside)]
    np.testing.assert_array_equal(*images)
  # A prompts file's own interval: its prompt as unguided, beside the same prompt guided at every step.
  prompt = records[0]["prompt"]
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text(json.dumps({"prompt": prompt, "guidance_interval": "1e6:1e7"}) + "\n"
                     + json.dumps({"prompt": prompt, "guidance_interval": "none"}) + "\n")
  every_step = {**settings, "guidance_interval": (), "guidance_scale": 3.0}
  per_prompt = sample.run(workdir, every_step, prompts, step=2, output_dir=tmp_path / "c")
  guided = sample.run(workdir, every_step, step=2, output_dir=tmp_path / "d")
  records = [json.loads(line) for line in (tmp_path / "c" / "manifest.jsonl").read_text().splitlines()]
  assert [r["guidance_interval"] for r in records] == [list(interval)] * 2 + [[]] * 2
  read = lambda grid, r: np.asarray(PIL.Image.open(grid.parent / r["file"]))
  np.testing.assert_array_equal(read(per_prompt, records[0]), read(unguided, records[0]))
  np.testing.assert_array_equal(read(per_prompt, records[2]), read(guided, records[0]))
  assert not np.array_equal(read(guided, records[0]), read(unguided, records[0]))
  prompts.write_text(json.dumps({"prompt": prompt, "guidance_interval": [2, 1]}) + "\n")
  with pytest.raises(ValueError, match=r"line 1: guidance_interval \(2.0, 1.0\) must be .* with 0 <= low < high"):
    sample.read_prompts(prompts)


def test_a_sampling_jobs_default_directory_never_holds_samples_already(tmp_path):
  """WORKDIR/samples/step_<N> while it holds no samples; once it does (the training run's at that step), step_<N>.2,
  then .3: a job never overwrites samples it was not pointed at."""
  chosen = []
  for _ in range(3):
    chosen.append(sample.free_output_dir(tmp_path, 4))
    chosen[-1].mkdir(parents=True)
    (chosen[-1] / "manifest.jsonl").write_text("{}\n")
  assert [path.relative_to(tmp_path).as_posix() for path in chosen] == [
      "samples/step_4", "samples/step_4.2", "samples/step_4.3"]
  (tmp_path / "samples" / "step_5").mkdir()  # (a directory without samples is used)
  assert sample.free_output_dir(tmp_path, 5) == tmp_path / "samples" / "step_5"


def test_a_prompts_file_line_that_would_be_misread_is_refused_naming_it(tmp_path):
  """A misspelt key (its value dropped), a line that is no object, a prompt that is no text, a seed that is no integer
  and a file that is no UTF-8 text are refused, each naming the file's line; a blank line is skipped, counted."""
  prompts = tmp_path / "prompts.jsonl"
  good = json.dumps({"prompt": "a red circle", "seed": 3.0}) + "\n\n"
  prompts.write_text(good)
  assert sample.read_prompts(prompts) == [{"prompt": "a red circle", "seed": 3}]
  for line, problem in (({"prompt": "a", "sede": 3}, "line 3: unknown key 'sede' (known: prompt, seed,"),
                        (["a", "b"], "line 3: a JSON list, not an object"),
                        ({"prompt": 5}, "line 3: 'prompt' 5 is not a string"),
                        ({"prompt": "a", "seed": 1.5}, "line 3: seed 1.5 is not an integer"),
                        ({"prompt": "a", "guidance_scale": float("nan")}, "line 3: guidance_scale nan must be >= 0"),
                        ({"seed": 1}, "line 3: no 'prompt'")):
    prompts.write_text(good + json.dumps(line) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{str(prompts)!r}, {problem}")):
      sample.read_prompts(prompts)
  (text := tmp_path / "prompts.txt").write_bytes(b"\xff\xfe a red circle\n")
  with pytest.raises(ValueError, match="prompts.txt' is not UTF-8 text"):
    sample.read_prompts(text)


def test_autoguidance_by_the_model_itself_is_no_guidance_and_by_an_earlier_checkpoint_guides(trained, tmp_path):
  workdir, settings = trained[1], {"num_per_prompt": 2, "steps": 3, "sampler": "ddim", "guidance_scale": 3.0}
  run = lambda name, **guide: sample.run(workdir, settings, step=4, output_dir=tmp_path / name, **guide)
  grids = {"self": run("self", guide_step=4), "earlier": run("earlier", guide_workdir=workdir, guide_step=2)}
  unguided = sample.run(workdir, {**settings, "guidance_scale": 1.0}, step=4,
                        output_dir=tmp_path / "scale1")
  records = [json.loads(line) for line in (grids["earlier"].parent / "manifest.jsonl").read_text().splitlines()]
  assert all(r["guide"] == {"workdir": str(workdir), "step": 2} for r in records)
  read = lambda grid, record: np.asarray(PIL.Image.open(grid.parent / record["file"])).astype(int)
  for record in records:
    # Guided by itself, guidance pushes nowhere: the conditional model's samples (to float rounding).
    assert np.abs(read(grids["self"], record) - read(unguided, record)).max() <= 1
  assert any(np.abs(read(grids["earlier"], r) - read(unguided, r)).max() > 1 for r in records)
  with pytest.raises(ValueError, match="negative prompts and an autoguidance guide"):
    sample.run(workdir, {**settings, "negative_prompt": "blue"}, step=4, output_dir=tmp_path / "n",
               guide_step=2)
  with pytest.raises(ValueError, match=r"the autoguidance guide \(--guide_workdir, --guide_step\): No checkpoint at "
                                       r"step 3 .* available steps: \[2, 4\]"):
    sample.run(workdir, settings, step=4, output_dir=tmp_path / "m", guide_step=3)


def test_a_runs_own_checkpoint_as_its_refiner_finishes_its_samples_and_an_earlier_one_changes_them(trained,
                                                                                                   tmp_path):
  """sample --refiner_workdir (refiner.py): the workdir's own latest checkpoint as the refiner of its model makes,
  under a first-order deterministic sampler (DDIM), the images the model makes alone (to float rounding); its
  earlier checkpoint (--refiner_step) finishes them otherwise; the records name the refiner's workdir and step.
  Refused before any checkpoint is read, by the sampling and the evaluation job: a step the workdir lacks, a
  directory that is not a workdir, both --refiner and --refiner_workdir, --refiner_step without a workdir."""
  config, workdir, _ = trained
  settings = {"num_per_prompt": 2, "steps": 4, "sampler": "ddim", "guidance_scale": 3.0}
  run = lambda name, **refiner: sample.run(workdir, settings, step=4, output_dir=tmp_path / name, **refiner)
  alone, own, earlier = (run("alone"), run("own", refiner_workdir=workdir, denoising_end=0.5),
                         run("earlier", refiner_workdir=workdir, refiner_step=2, denoising_end=0.5))
  records = [json.loads(line) for line in (earlier.parent / "manifest.jsonl").read_text().splitlines()]
  assert all(r["refiner"] | {"config_hash": None} == {"denoising_end": 0.5, "config_hash": None,
                                                      "workdir": str(workdir), "step": 2, "use_ema": True}
             for r in records)
  read = lambda grid, record: np.asarray(PIL.Image.open(grid.parent / record["file"])).astype(int)
  for record in records:
    assert np.abs(read(own, record) - read(alone, record)).max() <= 1
  assert any(np.abs(read(earlier, r) - read(alone, r)).max() > 1 for r in records)

  def refused(match, **refiner):
    with pytest.raises(ValueError, match=match):
      sample.run(workdir, settings, step=4, output_dir=tmp_path / "refused", **refiner)

  refused(r"--refiner_workdir=.* has no checkpoint at step 3 \(available: \[2, 4\]\)", refiner_workdir=workdir,
          refiner_step=3)
  refused("--refiner_workdir: .* is not a diffusion_jax workdir", refiner_workdir=tmp_path)
  refused("--refiner and --refiner_workdir: give one refiner", refiner_workdir=workdir, refiner_config=config)
  refused("--refiner_step: a checkpoint of a --refiner_workdir", refiner_step=2)
  assert not (tmp_path / "refused").exists()

  from diffusion_jax import evaluate  # (its job passes the flags on: checked as sampling's, before anything is read)

  with pytest.raises(ValueError, match=r"--refiner_workdir=.* has no checkpoint at step 3"):
    evaluate.run(workdir, step=4, refiner_workdir=workdir, refiner_step=3)


def test_a_sampling_job_on_an_fsdp_mesh_makes_the_data_parallel_jobs_samples(trained, tmp_path):
  """--mesh=fsdp=-1: the weights (and the autoguidance guide's) are restored sharded over the 8 devices; the samples
  are the default mesh's (every device a whole copy) to float rounding; a mesh the devices or the model do not fit
  is refused before any checkpoint is read."""
  from diffusion_jax import evaluate, sharding

  workdir, settings = trained[1], {"num_per_prompt": 2, "steps": 3, "sampler": "ddim", "guidance_scale": 3.0}
  fsdp = sharding.mesh_from_flag("fsdp=-1")
  assert fsdp == {"data": 1, "fsdp": -1, "sequence": 1, "tensor": 1}
  weights = sample.load_checkpoint(workdir, mesh_config=fsdp)[1]
  assert any("fsdp" in str(leaf.sharding.spec) for leaf in jax.tree.leaves(weights.params))
  grids = {name: sample.run(workdir, settings, step=4, output_dir=tmp_path / name, guide_step=2,
                            mesh_config=mesh) for name, mesh in (("data", None), ("fsdp", fsdp))}
  for data_file in sorted(grids["data"].parent.glob("*.png")):
    read = lambda path: np.asarray(PIL.Image.open(path)).astype(int)
    assert np.abs(read(data_file) - read(grids["fsdp"].parent / data_file.name)).max() <= 1
  for flag, message in (("pipeline=2", "--mesh='pipeline=2': give AXIS=SIZE pairs"),
                        ("fsdp=3", "--mesh: config.mesh .* cannot fill 8 devices"),
                        ("sequence=2", "mesh.sequence=2 splits a video model's frames over devices; an image model")):
    with pytest.raises(ValueError, match=message):
      sample.run(workdir, settings, mesh_config=sharding.mesh_from_flag(flag))
  with pytest.raises(ValueError, match="mesh.sequence=2 splits a video model's frames"):  # an evaluation job's too
    evaluate.run(workdir, step=4, mesh_config=sharding.mesh_from_flag("sequence=2"))


def test_a_guide_must_see_and_predict_what_the_model_does(trained):
  from diffusion_jax import autoguidance

  config = trained[0]
  other = config.copy_and_resolve_references()
  other.data.resolution, other.diffusion.prediction, other.model.channels = 32, "eps", 8  # its size may differ
  assert autoguidance.problems(config, other) == [f"data.resolution: {config.data.resolution} -> 32",
                                                  f"diffusion.prediction: {config.diffusion.prediction!r} -> 'eps'"]
  assert autoguidance.problems(config, config) == []


@pytest.mark.parametrize("overrides, prompts_text, message", [
    ({"sampler": "plms"}, None, "--sampler='plms'"),
    ({"steps": 0}, None, "--steps=0"),
    ({"guidance_scale": -1.0}, None, "--guidance_scale=-1.0"),
    ({"batch_size": 0}, None, "--batch_size=0 must be >= 1"),
    ({"edit_noise": "ddim"}, None,
     r"--edit_noise='ddim' is not one of \['random', 'inversion', 'source_inversion', 'null_text_inversion'\]"),
    ({"edit_noise": "null_text_inversion"}, None, r"--edit_noise='null_text_inversion' optimises guidance's text for "
     r"deterministic DDIM steps: set sampler='ddim' and eta=0 \(not sampler='dpmpp_2m', eta=0.0\)"),
    ({"null_text_iterations": 5}, None, "--null_text_iterations: not used here"),  # nothing is edited
    ({"negative_aesthetic_score": 2.0}, None, "--negative_aesthetic_score: only the SDXL refiner's U-Net reads"),
    ({}, "\n\n", "has no prompts"),
    ({"width": 7}, None, r"--width=7 must be a multiple of 2 \(the U-Net's 2 \*\* \(levels - 1\), 2 levels\)"),
    ({"redux_prompt_scale": 0.5}, None, r"--redux_prompt_scale=0.5: FLUX.1 Redux's scales \(model.flux_redux_path\)"),
    ({}, '{"prompt": "a red circle", "init_image": ["a.png", "b.png"]}',
     "A list of init_images is FLUX.1 Redux's .* images to blend; this model reads one image a prompt"),
])
def test_bad_sampling_input_is_explained(trained, tmp_path, overrides, prompts_text, message):
  _, workdir, _ = trained
  prompts = None
  if prompts_text is not None:
    prompts = tmp_path / ("prompts.jsonl" if prompts_text.startswith("{") else "prompts.txt")
    prompts.write_text(prompts_text)
  with pytest.raises(ValueError, match=message):
    sample.run(workdir, overrides, prompts)


def test_cli_reports_a_missing_workdir_in_one_line(tmp_path):
  result = subprocess.run([sys.executable, "-m", "diffusion_jax.sample", f"--workdir={tmp_path / 'nope'}"],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert "is not a diffusion_jax workdir" in result.stderr and "Traceback" not in result.stderr


def test_a_config_of_another_kind_is_refused_naming_what_it_is(tmp_path):
  """A job given another kind of config (a cascade's or an autoencoder's where a diffusion experiment's is read, an
  experiment's as --cascade) says what each one is and what reads it, every such flag at once; an autoencoder's
  config given to the main job and an experiment's to the autoencoder trainer too (an AttributeError traceback
  before)."""
  jobs = {"sample": ["--cascade=configs/t2i_shapes.py:test", "--refiner=configs/autoencoder_shapes.py:test"],
          "train_autoencoder": ["--config=configs/t2i_shapes.py:test", f"--workdir={tmp_path / 'run'}"],
          "main": ["--config=configs/cascades/shapes_16_32.py", f"--workdir={tmp_path / 'run'}"]}
  errors = {}
  for job, args in jobs.items():
    result = subprocess.run([sys.executable, "-m", f"diffusion_jax.{job}", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors[job] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert errors["sample"] == [
      "error: --refiner=configs/autoencoder_shapes.py:test is an autoencoder's config (python -m "
      "diffusion_jax.train_autoencoder trains it), not a diffusion experiment's (configs/t2i_shapes.py, "
      "stable_diffusion.py, ...)",
      "error: --cascade=configs/t2i_shapes.py:test is a diffusion experiment's config (the main job trains it), not a "
      "cascade's (configs/cascades/)"]
  assert errors["train_autoencoder"] == [
      "error: --config=configs/t2i_shapes.py:test is a diffusion experiment's config (the main job trains it), not an "
      "autoencoder's (configs/autoencoder_*.py)"]
  assert errors["main"] == [
      "error: --config=configs/cascades/shapes_16_32.py is a cascade's config (sample and evaluate read it as "
      "--cascade), not a diffusion experiment's (configs/t2i_shapes.py, stable_diffusion.py, ...)"]
  assert not (tmp_path / "run").exists()
  # A workdir of another kind: an autoencoder trainer's given to sample, evaluate, export or the main job, and back
  from configs import autoencoder_shapes, t2i_shapes
  from diffusion_jax import checkpoint

  for kind, config in (("autoencoder", autoencoder_shapes.get_config("test")), ("experiment", t2i_shapes.get_config())):
    (tmp_path / kind).mkdir()
    checkpoint.write_config(tmp_path / kind, config)
  assert checkpoint.read_config(tmp_path / "autoencoder", "autoencoder").autoencoder.latent_channels == 4
  with pytest.raises(ValueError, match=r"--workdir='.*autoencoder' holds the run of an autoencoder's config \(python "
                                       r"-m diffusion_jax.train_autoencoder trains it\), not a diffusion experiment's"):
    checkpoint.read_config(tmp_path / "autoencoder")
  with pytest.raises(ValueError, match=r"--workdir='.*experiment' holds the run of a diffusion experiment's config "
                                       r"\(the main job trains it\), not an autoencoder's"):
    checkpoint.read_config(tmp_path / "experiment", "autoencoder")


def test_flags_a_cascade_would_ignore_are_refused_all_at_once():
  for module, given in (("sample", ["--steps=5", "--init_image=a.png", "--guide_step=2"]),
                        ("evaluate", ["--heldout_examples=8", "--lpips_weights=w", "--guidance_interval=1:5",
                                      "--video_to_video"])):
    result = subprocess.run([sys.executable, "-m", f"diffusion_jax.{module}",
                             "--cascade=configs/cascades/shapes_16_32.py", *given], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    refused = [line.removeprefix("error: ") for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert sorted(line.split(":")[0] for line in refused) == sorted(flag.split("=")[0] for flag in given), refused
    assert all(": not used with --cascade" in line for line in refused), refused


def test_evaluations_polling_flags_without_watch_are_refused(tmp_path):
  """Flags that do not go together, and a value absl's parser refuses (out of the flag's bounds), are both `error:`
  lines and exit code 2, like every other bad input."""
  for given, message in ((["--poll_seconds=5", "--max_idle_minutes=1"],
                          "error: --poll_seconds, --max_idle_minutes: only with --watch"),
                         (["--watch", "--poll_seconds=0"],
                          "error: flag --poll_seconds=0: 0 is not a positive integer")):
    result = subprocess.run([sys.executable, "-m", "diffusion_jax.evaluate", f"--workdir={tmp_path}", *given], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert any(line.startswith(message) for line in result.stderr.splitlines()), result.stderr


def test_sampling_a_configs_checkpoints_refuses_what_it_cannot_read(tmp_path):
  """sample --config and evaluate --config: a checkpoint step and a missing --output_dir are usage errors; the demo's
  test config, which trains its text encoder and U-Net from scratch, is refused naming them (exit 2, one line, no
  traceback) before anything is read or written."""
  output = f"--output_dir={tmp_path / 'out'}"
  for job, flags, code, message in (
      ("sample", ["--step=3", output], 2, "--step: not used with --config"),
      ("sample", [], 2, "--config needs --output_dir"),
      ("sample", [output], 2, "error: --config: this config's text_encoder, unet would be used at their random "
                              "initialisation"),
      ("evaluate", ["--watch", output], 2, "--watch: not used with --config"),
      ("evaluate", [], 2, "--config needs --output_dir"),
      ("evaluate", [output], 2, "error: --config: this config's text_encoder, unet would be used at their random "
                                "initialisation")):
    result = subprocess.run([sys.executable, "-m", f"diffusion_jax.{job}", "--config=configs/t2i_shapes.py:test",
                             *flags], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == code and "Traceback" not in result.stderr, result.stderr
    assert message in [line for line in result.stderr.splitlines() if line.startswith("error: ")][-1], result.stderr
    assert not (tmp_path / "out").exists()


def test_sampling_is_deterministic_and_independent_of_device_count(trained):
  from diffusion_jax import sharding
  from diffusion_jax.text import tokenizers

  config, workdir, _ = trained
  config, weights, graphdef, _, _ = sample.load_checkpoint(workdir)
  tokenizer = tokenizers.from_config(config)
  sample_config = config.sample.copy_and_resolve_references()
  sample_config.update(steps=3, num_per_prompt=3)
  prompts = ["a large red circle at the top left"]

  def run(devices, batch_size=256, **kwargs):
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1), devices=devices)
    params, frozen = jax.device_put((weights.params, weights.frozen), sharding.replicated(mesh))
    sample_config.batch_size = batch_size
    return sample.generate(config, graphdef, params, frozen, tokenizer, prompts, sample_config, mesh, **kwargs)

  eight, again, one = run(jax.devices()), run(jax.devices()), run(jax.devices()[:1])
  np.testing.assert_array_equal(eight, again)
  assert np.abs(eight.astype(int) - one.astype(int)).max() <= 1  # same images up to float rounding
  assert not np.array_equal(eight[0, 0], eight[0, 1])  # the images of one prompt differ
  batches = []  # each batch's samples as it is made (what a sampling job writes then)
  by_twos = run(jax.devices()[:1], batch_size=2, on_batch=lambda first, samples: batches.append((first, samples)))
  assert by_twos.shape == one.shape and np.abs(by_twos.astype(int) - one.astype(int)).max() <= 1
  assert [first for first, _ in batches] == [0, 2]  # three samples in two batches, the last one padded (not passed)
  np.testing.assert_array_equal(np.concatenate([samples for _, samples in batches]), by_twos[0])
  none_kept = run(jax.devices()[:1], batch_size=2, kept_prompts=0)  # (a job's: its samples given to on_batch alone)
  assert none_kept.shape == (0,) + by_twos.shape[1:]


def test_a_model_built_with_remat_samples_the_same_images(trained):
  """model.remat recomputes blocks in the backward pass only: the sampler (a scan over steps, where the blocks run
  inside another transform's trace) runs the model built with it and gets the images of the model without it."""
  from diffusion_jax.models import text_to_image
  from diffusion_jax.text import tokenizers

  config, weights, graphdef, _, mesh = sample.load_checkpoint(trained[1])
  sample_config = config.sample.copy_and_resolve_references()
  sample_config.update(steps=2, num_per_prompt=2)
  remat = config.copy_and_resolve_references()
  remat.model.update(remat=True, remat_policy="matmuls")
  remat_graphdef = text_to_image.split(text_to_image.abstract(remat), remat)[0]
  assert remat_graphdef != graphdef
  images = [sample.generate(c, g, weights.params, weights.frozen, tokenizers.from_config(c), ["a red circle"],
                            sample_config, mesh) for c, g in ((config, graphdef), (remat, remat_graphdef))]
  assert np.abs(images[0].astype(int) - images[1].astype(int)).max() <= 1


def test_sampling_reads_one_copy_of_the_weights_not_the_train_state(trained):
  """A checkpoint holds the trainable weights, an EMA copy of them and the optimizer's moments; sampling
  allocates only the copy it samples with and the frozen weights."""
  import gc


  from diffusion_jax import train

  _, workdir, _ = trained
  gc.collect()
  before = {id(array) for array in jax.live_arrays()}
  config, weights, _, _, mesh = sample.load_checkpoint(workdir)
  allocated = sum(a.nbytes for a in jax.live_arrays() if id(a) not in before)
  assert allocated == sum(x.nbytes for x in jax.tree.leaves(tuple(weights))) > 0
  whole = train.abstract_state(config, mesh)[0]
  assert 2 * allocated < sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(whole))


def test_checkpoints_of_one_run_share_one_compiled_sampler(trained, caplog):
  from diffusion_jax.text import tokenizers

  config, workdir, _ = trained
  sample_config = config.sample.copy_and_resolve_references()
  sample_config.update(steps=2, num_per_prompt=1)
  images = []
  for step in (2, 4):  # what the evaluation job does for each new checkpoint
    config, weights, graphdef, _, mesh = sample.load_checkpoint(workdir, step)
    images.append(sample.generate(config, graphdef, weights.params, weights.frozen, tokenizers.from_config(config),
                                  ["a large red circle at the top left"], sample_config, mesh))
  assert sample.compiled_sampler(config, graphdef, sample_config, mesh)._cache_size() == 1
  assert not np.array_equal(images[0], images[1])  # the weights are arguments, not baked-in constants
  # Weights that make non-finite values (a diverged run's) are said to, not written as black pixels unsaid
  diverged = jax.tree.map(lambda x: x * np.nan, weights.params)
  sample.generate(config, graphdef, diverged, weights.frozen, tokenizers.from_config(config), ["a blue square"],
                  sample_config, mesh)
  assert "1 of 1 samples hold non-finite values (NaN or inf), written as black pixels" in caplog.text
  assert "non-finite" not in caplog.text.replace("1 of 1 samples hold non-finite", "")  # (the finite ones: unsaid)
  # Other prompts, seeds and counts (a job's overrides of the config's sample section) share it too; a setting the
  # program reads does not
  other = config.copy_and_resolve_references()
  other.sample.update(prompts=["a blue square"], seed=7, num_per_prompt=3, use_ema=False)
  shared = sample.compiled_sampler(config, graphdef, sample_config, mesh)
  assert sample.compiled_sampler(other, graphdef, sample_config, mesh) is shared
  longer = sample_config.copy_and_resolve_references()
  longer.steps += 1
  assert sample.compiled_sampler(other, graphdef, longer, mesh) is not shared


def test_a_given_image_of_another_size_is_shown_in_the_grid_at_the_samples_size(tmp_path):
  """FLUX.1 Kontext's reference at its own size, Redux's image at its encoder's: the grid row shows it first,
  brought to the samples' size (scaled to cover, centre crop), labelled as given, not edited."""
  samples = np.random.default_rng(0).integers(0, 256, (1, 2, 16, 16, 3), np.uint8)
  wide = np.zeros((8, 32, 3), np.uint8)
  wide[:, 8:24] = 255  # its centre half white: what a centre crop of it, scaled to cover 16 x 16, keeps
  grid = media.read_image(sample.write_outputs(tmp_path, [{"prompt": "p"}], samples, {},
                                               {0: (wide, np.zeros((8, 32), bool))}, "the given image"))
  top = 14  # (the label's height; tiles at twice the size)
  assert (grid[top:top + 32, :32] == 255).all()
  np.testing.assert_array_equal(grid[top:top + 32:2, 34:66:2], samples[0, 0])


def test_a_large_prompts_file_writes_every_sample_and_a_grid_of_the_first(tmp_path):
  count = sample.GRID_PROMPTS + 3
  images = np.random.default_rng(0).integers(0, 256, (count, 1, 8, 8, 3), np.uint8)
  grid = sample.write_outputs(tmp_path, [{"prompt": f"prompt {p}"} for p in range(count)], images, {"steps": 2})
  records = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
  assert len(records) == count and records[-1]["prompt"] == f"prompt {count - 1}"
  np.testing.assert_array_equal(media.read_image(tmp_path / records[-1]["file"]), images[-1, 0])
  assert json.loads(media.read_provenance(grid)["prompts"]) == [f"prompt {p}" for p in range(sample.GRID_PROMPTS)]


def test_negative_prompts_replace_the_null_condition_of_guidance(trained, tmp_path):
  from diffusion_jax.text import tokenizers

  _, workdir, _ = trained
  config, weights, graphdef, _, mesh = sample.load_checkpoint(workdir)
  leaves, tree = jax.tree.flatten(weights.params)  # every weight off its initial value, so the text matters
  keys = jax.random.split(jax.random.key(0), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  sample_config = config.sample.copy_and_resolve_references()
  sample_config.update(steps=2, num_per_prompt=2)  # the config's guidance scale, 3 (one compiled sampler below)
  prompts = ["a large red circle at the top left", "a small blue square at the bottom right"]

  def run(negatives, guidance_scale=3.0):
    sample_config.guidance_scale = guidance_scale
    return sample.generate(config, graphdef, params, weights.frozen, tokenizers.from_config(config), prompts,
                           sample_config, mesh, negative_prompts=negatives).astype(int)

  plain, conditional = run(None), run(None, 1.0)
  # A negative prompt equal to the prompt makes both branches one: guidance gives the conditional prediction.
  assert np.abs(run(prompts) - conditional).max() <= 1 < np.abs(plain - conditional).max()
  mixed = run(["a large green triangle in the middle", ""])
  assert np.abs(mixed[0] - plain[0]).max() > 1  # the negative prompt steers the first prompt's images
  assert np.abs(mixed[1] - plain[1]).max() <= 1  # "" keeps the null condition

  jsonl = tmp_path / "prompts.jsonl"
  jsonl.write_text("\n".join(json.dumps(e) for e in [{"prompt": prompts[0], "negative_prompt": "green"},
                                                      {"prompt": prompts[1]}]))
  out = tmp_path / "out"
  sample.run(workdir, {"steps": 2, "num_per_prompt": 1, "negative_prompt": "blue"}, jsonl,
             output_dir=out)
  records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
  assert [r["negative_prompt"] for r in records] == ["green", "blue"]  # the file's, else --negative_prompt's
  assert media.read_provenance(out / records[0]["file"])["negative_prompt"] == "green"
