"""Cascades: super-resolution conditioning, stage chaining and the cascade sampler."""

import importlib
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import sr_shapes
from configs.cascades import shapes_16_32
from configs.cascades.stages import stage
from conftest import sweep_table
from diffusion_jax import cascade, checkpoint, config_checks, evaluate, media, sample, superres

pytestmark = pytest.mark.xdist_group("cascade")  # one worker trains the SR stage (trained_sr) these tests read


@pytest.fixture(scope="session")
def trained_sr(tmp_path_factory):
  """The 32 px test SR stage (16 -> 32) trained for 4 steps: (config, workdir)."""
  from diffusion_jax import train

  config = sr_shapes.get_config("test")
  config.data.data_dir = str(tmp_path_factory.mktemp("tfds_sr"))
  workdir = tmp_path_factory.mktemp("workdir_sr")
  train.train_and_evaluate(config, workdir)
  return config, workdir


@pytest.fixture(scope="session")
def trained_residual_sr(tmp_path_factory):
  """The test SR stage at half its size (8 -> 16 px) diffusing residuals over its upsampled input, trained 150
  steps: (config, workdir). At 16 px its test ends 2.8 dB above bicubic in 57 s alone (at 32 px: 1.5 dB in
  88 s); 60 steps stay below bicubic."""
  from diffusion_jax import train

  config = sr_shapes.get_config("test")
  config.superres.update(residual=True, lowres_resolution=8)
  config.data.resolution = 16
  config.data.data_dir = str(tmp_path_factory.mktemp("tfds_sr_residual"))
  config.train.update(steps=150, checkpoint_every=150, log_every=50)
  config.optimizer.update(learning_rate=6e-3, warmup_steps=10)  # at 32 px, 3e-3 ended only 0.6 dB above bicubic
  workdir = tmp_path_factory.mktemp("workdir_sr_residual")
  train.train_and_evaluate(config, workdir)
  return config, workdir


def cascade_config(*workdirs, steps=2):
  c = shapes_16_32.get_config()
  c.stages = tuple(stage(str(w), steps=steps, sampler="ddim", aug_level=0.0) for w in workdirs)
  c.prompts = ("a large red circle at the top left", "a small blue square at the bottom right")
  c.num_per_prompt = 2
  return c


def test_downsample_and_augmentation():
  x = jax.random.uniform(jax.random.key(0), (3, 2, 8, 8, 3), minval=-1, maxval=1)  # videos: every frame
  low = superres.downsample(x, 4)
  assert low.shape == (3, 2, 4, 4, 3)
  np.testing.assert_allclose(low.mean((2, 3)), x.mean((2, 3)), atol=0.05)  # a low-pass filter keeps the mean
  assert low.std() < 0.7 * x.std()  # and removes the finest detail
  np.testing.assert_allclose(superres.downsample(jnp.full((1, 8, 8, 3), 0.3), 4), 0.3, atol=1e-6)
  logsnr_fn = lambda t: 4.0 - 8.0 * t
  eps = jax.random.normal(jax.random.key(1), low.shape)
  clean, clean_logsnr = superres.augment(low, jnp.zeros(3), eps, logsnr_fn)
  np.testing.assert_array_equal(clean, low)
  noisy, logsnr = superres.augment(low, jnp.array([0.0, 0.5, 1.0]), eps, logsnr_fn)
  np.testing.assert_allclose(logsnr, [4.0, 0.0, -4.0])
  alpha, sigma = jax.nn.sigmoid(logsnr) ** 0.5, jax.nn.sigmoid(-logsnr) ** 0.5
  np.testing.assert_allclose(noisy[1:], alpha[1:, None, None, None, None] * low[1:] +
                             sigma[1:, None, None, None, None] * eps[1:], atol=1e-5)
  np.testing.assert_array_equal(noisy[0], low[0])


def test_sr_stage_conditions_on_the_low_res_input(trained_sr):
  """Two different low-res inputs give two different upsamplings of the same noise and caption."""
  config, workdir = trained_sr
  _, weights, graphdef, _, mesh = sample.load_checkpoint(workdir, use_ema=False)
  from diffusion_jax.text import tokenizers

  sample_config = config.sample.copy_and_resolve_references()
  sample_config.update(num_per_prompt=1, steps=2, aug_level=0.0)
  lowres = np.stack([np.zeros((1, 16, 16, 3), np.uint8), np.full((1, 16, 16, 3), 255, np.uint8)])
  out = sample.generate(config, graphdef, *weights, tokenizers.from_config(config),
                        ["a large red circle"] * 2, sample_config, mesh, lowres=lowres)
  assert out.shape == (2, 1, 32, 32, 3) and out.dtype == np.uint8
  assert np.abs(out[0].astype(int) - out[1].astype(int)).mean() > 1
  with pytest.raises(ValueError, match="super-resolution stage"):
    sample.generate(config, graphdef, *weights, tokenizers.from_config(config), ["a"],
                    sample_config, mesh)


def test_cascade_samples_every_stage_with_provenance(trained, trained_sr, tmp_path):
  stages = cascade.load(cascade_config(trained[1], trained_sr[1]))
  prompts = ["a large red circle at the top left", "a small blue square at the bottom right"]
  outputs = cascade.generate(stages, prompts)
  assert [o.shape for o in outputs] == [(2, 2, 16, 16, 3), (2, 2, 32, 32, 3)]
  assert all(o.dtype == np.uint8 for o in outputs)
  path = cascade.write(stages, prompts, outputs, tmp_path)
  assert path.exists() and (tmp_path / "stage_0" / "grid.png").exists()
  record = json.loads((tmp_path / "stage_1" / "manifest.jsonl").read_text().splitlines()[0])
  provenance = media.read_provenance(tmp_path / "stage_1" / record["file"])
  chain = json.loads(provenance["cascade"])
  assert [c["workdir"] for c in chain] == [str(trained[1]), str(trained_sr[1])]
  assert json.loads(provenance["aug_level"]) == 0.0 and provenance["prompt"] == prompts[0]
  # The evaluation job scores the whole cascade's final output against real validation images; a sweep varies
  # the last stage's setting on the same base samples: its point at the cascade's own level scores the same.
  config = cascade_config(trained[1], trained_sr[1])
  config.output_dir = str(tmp_path / "evaluated")
  metrics = evaluate.cascade_metrics(config, num_prompts=4, sweeps={"aug_level": ("0.0", "0.9")})
  assert metrics["fid_random_conv"] > 0 and 0 <= metrics["accuracy/all"] <= 1

  evaluated = tmp_path / "evaluated" / "eval"
  rows = sweep_table(evaluated / f"stage1_aug_level_sweep_step_{stages[1].step}.md")
  assert rows["0.0"]["fid_random_conv"] == pytest.approx(metrics["fid_random_conv"], abs=1e-3)
  assert rows["0.9"]["fid_random_conv"] != pytest.approx(rows["0.0"]["fid_random_conv"], abs=1e-3)
  lines = (tmp_path / "evaluated" / "eval" / "cascade.jsonl").read_text().splitlines()
  [record] = [json.loads(line) for line in lines]
  assert record["fid_random_conv"] == metrics["fid_random_conv"] and record["num_prompts"] == 4
  chain = [(c["workdir"], c["aug_level"]) for c in record["cascade"]]
  assert chain == [(str(trained[1]), 0.0), (str(trained_sr[1]), 0.0)]
  shown = media.read_image(tmp_path / "evaluated" / "eval" / "cascade_generated.png")
  assert shown.shape[1] >= 4 * 32 * 2  # four generated 32 px images side by side, enlarged twice
  # A sweep of the base model's guidance, judged on the final output (the SR stage runs again at every point).
  own = str(stages[0].sample_config.guidance_scale)
  evaluate.cascade_metrics(config, num_prompts=4, sweeps={"guidance": (own, "0.0")}, sweep_stage=0)
  rows = sweep_table(evaluated / f"stage0_guidance_sweep_step_{stages[0].step}.md")
  assert rows[own]["fid_random_conv"] == pytest.approx(metrics["fid_random_conv"], abs=1e-3)
  assert rows["0.0"]["fid_random_conv"] != pytest.approx(rows[own]["fid_random_conv"], abs=1e-3)


def test_a_cascade_stage_samples_with_its_autoguidance_guide(trained, trained_sr, tmp_path):
  """A stage's guide_step / guide_workdir fields: the stage guided by its own checkpoint samples what its
  conditional model does (guidance pushes nowhere), guided by an earlier one otherwise; recorded in the chain.
  A guide that does not fit the stage, or one with a negative prompt, is refused before any checkpoint is read."""
  prompts = ["a large red circle at the top left"]
  config = cascade_config(trained[1])
  config.stages[0].guidance_scale = 1.0
  unguided = cascade.generate(cascade.load(config), prompts)[0]
  config.stages[0].update(guidance_scale=3.0, guide_step=4)  # its latest checkpoint: the model itself
  np.testing.assert_allclose(cascade.generate(cascade.load(config), prompts)[0], unguided, atol=1)
  config.stages[0].guide_step = 2
  stages = cascade.load(config)
  assert np.abs(cascade.generate(stages, prompts)[0].astype(int) - unguided).max() > 1
  assert cascade.provenance(stages)[0]["guide"] == {"workdir": str(trained[1]), "step": 2}
  config = cascade_config(trained[1], trained_sr[1])
  config.stages[1].guide_workdir = str(trained[1])  # the 16 px base cannot guide the 32 px stage
  config.stages[0].update(guide_step=2, negative_prompt="blue")
  with pytest.raises(ValueError) as error:
    cascade.load(config)
  where = lambda k: f"stage {k} (--cascade.stages[{k}].guide_workdir, guide_step): "
  assert where(0) + "negative prompts and an autoguidance guide" in str(error.value)
  misfit = f"the guide {trained[1]} does not see or predict what the model does: data.resolution: 32 -> 16"
  assert where(1) + misfit in str(error.value)


def test_a_cascade_stage_samples_on_its_own_mesh(trained, trained_sr):
  """A stage entry's `mesh` (--cascade.stages[K].mesh): the super-resolution stage's weights restored sharded over
  the 8 devices (fsdp) under a data-parallel base make the data-parallel cascade's samples; a mesh the devices or
  the model do not fit is refused before any checkpoint is read, naming the stage."""
  prompts = ["a large red circle at the top left"]
  config = cascade_config(trained[1], trained_sr[1])
  data_parallel = cascade.generate(cascade.load(config), prompts)
  config.stages[1].mesh = "fsdp=-1"
  stages = cascade.load(config)
  assert dict(stages[1].mesh.shape)["fsdp"] == 8 and dict(stages[0].mesh.shape)["data"] == 8
  assert any("fsdp" in str(leaf.sharding.spec) for leaf in jax.tree.leaves(stages[1].weights.params))
  for ours, expected in zip(cascade.generate(stages, prompts), data_parallel):
    assert np.abs(ours.astype(int) - expected).max() <= 1  # float rounding may move a level
  config.stages[0].mesh, config.stages[1].mesh = "sequence=2", "fsdp=3"
  with pytest.raises(ValueError) as error:
    cascade.load(config)
  assert "stage 0 (--cascade.stages[0].mesh): mesh.sequence=2 splits a video model's frames" in str(error.value)
  assert "stage 1 (--cascade.stages[1].mesh): config.mesh" in str(error.value)
  config.stages[0].mesh = "pipeline=2"
  with pytest.raises(ValueError, match=r"stage 0 \(--cascade.stages\[0\].mesh\): --mesh='pipeline=2': give AXIS"):
    cascade.load(config)


def run_two_processes(module, config, *flags):
  """`module` as 2 processes of 4 devices (launch/local.py) on the test cascade `config` (cascade_config)."""
  root = pathlib.Path(__file__).resolve().parents[1]
  settings = lambda entry: (("workdir", entry.workdir), ("steps", 2), ("sampler", "ddim"), ("aug_level", 0.0))
  stage_flags = [f"--cascade.stages[{k}].{field}={value}" for k, entry in enumerate(config.stages)
                 for field, value in settings(entry)]
  command = [sys.executable, str(root / "launch" / "local.py"), "--num_processes=2", "--devices_per_process=4",
             f"--module=diffusion_jax.{module}", "--", "--cascade=configs/cascades/shapes_16_32.py", *stage_flags,
             f"--cascade.num_per_prompt={config.num_per_prompt}", *flags]
  result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def test_two_process_cascade_sampling_writes_what_one_process_does(trained, trained_sr, tmp_path):
  """`sample --cascade --mesh=fsdp=-1` as 2 processes: each stage's weights are sharded over the 8 devices of both
  processes and its batch split over them, the stage below's samples are the next one's input, and process 0 writes
  the images this process makes on data-parallel meshes."""
  config = cascade_config(trained[1], trained_sr[1])
  outputs = cascade.generate(cascade.load(config), list(config.prompts))
  (tmp_path / "prompts.txt").write_text("\n".join(config.prompts) + "\n")
  result = run_two_processes("sample", config, f"--prompts={tmp_path / 'prompts.txt'}",
                             f"--output_dir={tmp_path / 'out'}", "--mesh=fsdp=-1")
  assert result.stderr.count("'fsdp': 8") >= 2, result.stderr[-3000:]  # both stages' weights, logged
  for k, expected in enumerate(outputs):  # [prompts, num_per_prompt, h, w, 3]; the manifest lists them in order
    directory = tmp_path / "out" / f"stage_{k}"
    records = [json.loads(line) for line in (directory / "manifest.jsonl").read_text().splitlines()]
    written = np.stack([media.read_image(directory / r["file"]) for r in records]).astype(int)
    assert written.shape == (expected.shape[0] * expected.shape[1],) + expected.shape[2:]
    assert np.abs(written - expected.reshape(written.shape)).max() <= 1, k  # float rounding may move a level


def test_two_process_cascade_evaluation_scores_as_one_process(trained, trained_sr, tmp_path):
  config = cascade_config(trained[1], trained_sr[1])
  config.output_dir = str(tmp_path / "one")
  one = evaluate.cascade_metrics(config, num_prompts=8)
  run_two_processes("evaluate", config, "--num_prompts=8", f"--cascade.output_dir={tmp_path / 'two'}")
  [two] = [json.loads(line) for line in (tmp_path / "two" / "eval" / "cascade.jsonl").read_text().splitlines()]
  for key in one:
    np.testing.assert_allclose(two[key], one[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_cascade_refuses_stages_that_do_not_chain(trained, trained_sr, tmp_path):
  with pytest.raises(ValueError, match="first stage must be a base model"):
    cascade.load(cascade_config(trained_sr[1], trained_sr[1]))
  with pytest.raises(ValueError, match="stage 1 .* is not a super-resolution stage"):
    cascade.load(cascade_config(trained[1], trained[1]))
  mismatched = tmp_path / "sr8"
  mismatched.mkdir()
  config = json.loads((trained_sr[1] / "config.json").read_text())
  config["superres"]["lowres_resolution"] = 8
  (mismatched / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="upsamples from 8 px squares but stage 0 .* produces 16 x 16 px images"):
    cascade.load(cascade_config(trained[1], mismatched))
  with pytest.raises(ValueError, match=r"stage 1: .*is not a diffusion_jax workdir.*--cascade.stages\[1\].workdir"):
    cascade.load(cascade_config(trained[1], tmp_path / "nope"))
  bad = cascade_config(trained[1], trained_sr[1], steps=0)
  with pytest.raises(ValueError, match="stage 1: --steps=0 must be >= 1"):
    cascade.load(bad)
  with pytest.raises(ValueError, match=r"--aug_level_sweep value '1.5': --aug_level=1.5 must be in \[0, 1\]"):
    evaluate.cascade_metrics(cascade_config(trained[1], trained_sr[1]), 4, sweeps={"aug_level": ("1.5",)})
  with pytest.raises(ValueError, match="--sweep_stage=2: the cascade has stages 0 to 1"):
    evaluate.cascade_metrics(cascade_config(trained[1], trained_sr[1]), 4, sweeps={"guidance": ("1",)}, sweep_stage=2)
  # A prompts line's own settings, which a workdir's sampling would use, are not silently dropped by a cascade.
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text('{"prompt": "a red circle"}\n{"prompt": "a blue square", "seed": 3, "lora_scale": 0.5}\n')
  with pytest.raises(ValueError, match=r"prompts.jsonl: with --cascade a line gives its 'prompt' alone .* also give "
                                       r"lora_scale, seed$"):
    sample.sample_cascade(cascade_config(trained[1], trained_sr[1]), prompts, tmp_path / "out")


@pytest.mark.parametrize("name, experiments", [("shapes_16_32", ("t2i_shapes:base16", "sr_shapes")),
                                               ("imagen_64_256", ("imagen_base64", "imagen_sr256"))])
def test_shipped_cascade_configs_chain_the_experiments_they_name(tmp_path, name, experiments):
  """Each configs/cascades config, its stages' workdirs holding the config.json of the experiments their
  docstrings train, passes the chain check and the sample-settings check."""
  config = importlib.import_module(f"configs.cascades.{name}").get_config()
  for k, (entry, experiment) in enumerate(zip(config.stages, experiments, strict=True)):
    module, _, variant = experiment.partition(":")
    checkpoint.write_config(tmp_path / str(k), importlib.import_module(f"configs.{module}").get_config(
        *([variant] if variant else [])))
    entry.workdir = str(tmp_path / str(k))
  configs = cascade.stage_configs(config)
  assert cascade.chain_problems(configs) == []
  assert [config_checks.sample_problems(c.sample_config, "--") for c in configs] == [[]] * len(configs)


def test_a_cascade_of_many_prompts_writes_every_sample_and_shows_the_first(tmp_path):
  """cascade.write of more prompts than sample.GRID_PROMPTS (stages made from configs alone: nothing restored)."""
  from configs import t2i_shapes

  stages = [cascade.Stage(f"w{k}", config, config.sample) for k, config in
            enumerate((t2i_shapes.get_config("base16"), sr_shapes.get_config()))]
  count, rng = sample.GRID_PROMPTS + 2, np.random.default_rng(0)
  outputs = [rng.integers(0, 256, (count, 1, size, size, 3), np.uint8) for size in (16, 32)]
  path = cascade.write(stages, [f"prompt {p}" for p in range(count)], outputs, tmp_path)
  assert len((tmp_path / "stage_1" / "manifest.jsonl").read_text().splitlines()) == count
  assert len(json.loads(media.read_provenance(path)["prompts"])) == sample.GRID_PROMPTS


def test_sr_validation_inputs_are_the_real_images_downsampled(trained_sr):
  config, _ = trained_sr
  captions, lowres = cascade.validation_lowres(config, 2, 3)
  _, images, real_captions = evaluate.validation_set(config, 2)
  assert captions == real_captions and lowres.shape == (2, 3, 16, 16, 3) and lowres.dtype == np.uint8
  assert (lowres == lowres[:, :1]).all()  # the same input for every sample of a caption
  # Area downsampling keeps each image's mean colour.
  np.testing.assert_allclose(lowres[:, 0].mean((1, 2)), images.mean((1, 2)), atol=2)


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_temporal_superres_repeats_each_low_res_frame_over_its_span(backbone):
  """A temporal SR U-Net or DiT (2 low-res frames -> 4): with the temporal layers off, output frames 0-1 depend
  only on low-res frame 0 and frames 2-3 only on low-res frame 1; with them on, every frame sees both."""
  from flax import nnx

  from diffusion_jax.models import dit, unet
  from test_unet import perturb, tiny_config

  config = tiny_config(dropout=0.0, temporal=True, max_frames=4, lowres_conditioning=True, depth=2, patch_size=2)
  model = perturb((unet.UNet if backbone == "unet" else dit.DiT)(config, rngs=nnx.Rngs(0)))
  keys = jax.random.split(jax.random.key(0), 3)
  x, lowres = jax.random.normal(keys[0], (2, 4, 8, 8, 3)), jax.random.normal(keys[1], (2, 2, 4, 4, 3))
  args = (jnp.zeros(2), jax.random.normal(keys[2], (2, 5, 8)), jnp.ones((2, 5), bool))
  run = nnx.jit(lambda m, low, is_video: m(x, *args, lowres=low, aug_logsnr=jnp.zeros(2), is_video=is_video))
  for is_video, changed_frames in ((jnp.zeros(2, bool), [2, 3]), (jnp.ones(2, bool), [0, 1, 2, 3])):
    base = run(model, lowres, is_video)
    moved = run(model, lowres.at[:, 1].add(1.0), is_video)
    change = np.asarray(jnp.abs(moved - base).max(axis=(0, 2, 3, 4)))
    assert base.shape == (2, 4, 8, 8, 3)
    assert all(change[k] > 1e-4 for k in changed_frames) and all(change[k] == 0 for k in range(4)
                                                                  if k not in changed_frames)


def test_superres_configs_are_checked():
  from configs import t2v_moving_shapes
  from diffusion_jax import config_checks

  video = t2v_moving_shapes.get_config("test")
  video.model.lowres_conditioning = True
  video.superres.update(lowres_resolution=16, lowres_frames=2)  # temporal SR 2 -> 4 frames at 16 px
  assert config_checks.problems(video, device_count=8, process_count=1) == []
  x0 = jnp.arange(4.0)[None, :, None, None, None] * jnp.ones((1, 4, 16, 16, 3))
  np.testing.assert_array_equal(superres.lowres_input(x0, video)[0, :, 0, 0, 0], [0.0, 2.0])
  video.superres.lowres_frames = 3
  assert any("lowres_frames=3" in p for p in config_checks.problems(video, 8, 1))
  image = sr_shapes.get_config("test")
  image.superres.lowres_resolution = 32
  image.model.lowres_conditioning = False
  found = " ".join(config_checks.problems(image, 8, 1))
  assert "must be below data.resolution" in found and "needs both model.lowres_conditioning" in found


def test_psnr_and_the_bicubic_baseline():
  from diffusion_jax.metrics import psnr

  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
  assert psnr.psnr(images, images) == float("inf")
  noisy = np.clip(images + rng.normal(0, 8, images.shape), 0, 255).astype(np.uint8)
  assert 28 < psnr.psnr(noisy, images) < 32  # sigma 8: 20 log10(255 / 8) = 30 dB
  flat = np.full((2, 8, 8, 3), 77, np.uint8)
  np.testing.assert_array_equal(psnr.bicubic(flat[:, :4, :4], flat), flat)


def test_sr_stage_samples_and_evaluation_use_real_low_res_inputs(trained_sr, trained, lpips_weights, monkeypatch):
  from diffusion_jax.metrics import psnr

  config, workdir = trained_sr
  config_, weights, graphdef, step, _ = sample.load_checkpoint(workdir)
  grid = sample.write_training_samples(config_, weights, graphdef, step, workdir)
  records = [json.loads(line) for line in (grid.parent / "manifest.jsonl").read_text().splitlines()]
  captions, _ = cascade.validation_lowres(config, len(config.sample.prompts), 1)
  assert [r["prompt"] for r in records[::config.sample.num_per_prompt]] == captions
  upsampled, real_bicubic = [], psnr.bicubic  # every bicubic upsampling the evaluation computes

  def bicubic(*args):
    upsampled.append(real_bicubic(*args))
    return upsampled[-1]

  monkeypatch.setattr(psnr, "bicubic", bicubic)
  [record] = evaluate.run(workdir, step=4, num_prompts=4, heldout_examples=4, combination_prompts=4,
                          sweeps={"aug_level": (0.0, 0.5)}, lpips_weights=lpips_weights[0])
  assert len(upsampled) == 1  # the baseline, once for the checkpoint's three sample settings
  assert np.isfinite(record["psnr"]) and record["psnr_bicubic"] > 10
  assert 0 < record["lpips_bicubic"] != record["lpips"] > 0  # a 4-step stage's samples are not bicubic upsampling
  with pytest.raises(ValueError, match="--lpips_weights: .*this model is not a super-resolution stage"):
    evaluate.run(trained[1], step=4, lpips_weights=lpips_weights[0])
  with Image.open(workdir / "eval" / "aug_level_sweep_step_4.png") as plot:  # 4.5-inch panels at 100 dpi
    assert plot.size[0] == 4 * 450  # FID, judge accuracy, PSNR and LPIPS (each beside bicubic's)
  assert "| aug_level |" in (workdir / "eval" / "aug_level_sweep_step_4.md").read_text()


def test_residual_sr_stage_beats_bicubic_after_a_short_training(trained_residual_sr):
  _, workdir = trained_residual_sr
  config, weights, graphdef, _, mesh = sample.load_checkpoint(workdir)
  _, images, captions = evaluate.validation_set(config, 16)  # held-out images
  perfect_input = evaluate.evaluation_sample_config(config)
  perfect_input.update(aug_level=0.0, steps=10)
  metrics, generated = evaluate.generation_metrics(config, graphdef, weights, mesh, images, captions, perfect_input)
  assert generated.shape == images.shape and generated.dtype == np.uint8
  assert metrics["psnr"] > metrics["psnr_bicubic"] + 0.5, metrics


def test_residuals_round_trip_through_the_upsampled_input():
  config = sr_shapes.get_config("test")
  video = jax.random.uniform(jax.random.key(0), (2, 4, 32, 32, 3), minval=-1, maxval=1)
  lowres = superres.subsample_frames(superres.downsample(video, 16), 2)  # temporal and spatial SR input
  residual = superres.to_residual(video, lowres, config)
  np.testing.assert_allclose(superres.from_residual(residual, lowres, config), video, atol=1e-5)
  smooth = superres.upsampled(lowres, video.shape)  # what upsampling gives has no residual
  np.testing.assert_allclose(superres.to_residual(smooth, lowres, config), 0.0, atol=1e-6)
