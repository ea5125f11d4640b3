"""Training the latent-diffusion autoencoder (FSDP on a (2, 4) mesh): the loss falls, the written directory is a
diffusers AutoencoderKL (diffusers' PyTorch model computes what ours does), its scaling factor gives unit-variance
latents, reconstructions are scored during training, a rerun resumes, the perceptual and adversarial terms weigh
as SD's, two processes train and write what one does, a temporal decoder started from an image autoencoder trains
on clips and is written as Stable Video Diffusion's autoencoder, and a bad config is refused with every problem
named."""

import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from configs import autoencoder_shapes, t2i_shapes
from diffusion_jax import config_checks, media, optimizer, sharding, train_autoencoder
from diffusion_jax.data import pipeline
from diffusion_jax.models import autoencoder, init_rngs
from test_autoencoder import as_torch, random_autoencoder

pytestmark = pytest.mark.xdist_group("autoencoder")  # one worker trains the autoencoder (`trained`) these tests read


@pytest.fixture(scope="session")
def config(tmp_path_factory):
  config = autoencoder_shapes.get_config("test")
  config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
  config.mesh.update(data=2, fsdp=4)  # parameters and Adam moments sharded 4 ways, batch over all 8 devices
  return config


@pytest.fixture(scope="session")
def trained(config, tmp_path_factory):
  """10 steps in this process: (workdir, the diffusers directory written)."""
  workdir = tmp_path_factory.mktemp("autoencoder_workdir")
  return workdir, train_autoencoder.train(config, workdir)


def read_log(workdir, name="train"):
  return [json.loads(line) for line in (workdir / "logs" / f"{name}.jsonl").read_text().splitlines()]


def test_trains_writes_a_diffusers_autoencoder_and_resumes(config, trained, tmp_path, caplog):
  import torch
  from diffusers import AutoencoderKL

  workdir = tmp_path / "workdir"  # a copy: the rerun below trains on
  shutil.copytree(trained[0], workdir)
  directory = workdir / trained[1].name
  records = read_log(workdir)
  assert [r["step"] for r in records] == [5, 10]
  assert records[-1]["l1"] < 0.8 * records[0]["l1"], records  # it learns
  assert all(r["examples_per_s"] > 0 and r["step_time_s"] > 0 for r in records)

  ours = autoencoder.load_diffusers(str(directory))
  theirs = AutoencoderKL.from_pretrained(directory).eval()
  source = pipeline.data_source(config.data, "train")
  x = np.stack([media.to_float(source[i]["image"]) for i in range(16)])
  with torch.no_grad():
    posterior = theirs.encode(as_torch(x)).latent_dist
    decoded = theirs.decode(posterior.mean).sample.permute(0, 2, 3, 1).numpy()
  mean, _ = ours.moments(jnp.asarray(x))
  np.testing.assert_allclose(mean, posterior.mean.permute(0, 2, 3, 1).numpy(), atol=1e-4)
  np.testing.assert_allclose(ours.decode(ours.encode(jnp.asarray(x))), decoded, atol=1e-4)
  # scaling_factor = 1 / the std of the training latents: the diffusion model sees about unit variance.
  latents = ours.encode(jnp.asarray(x), jax.random.key(0))
  assert theirs.config.scaling_factor == ours.scaling_factor and 0.7 < float(jnp.std(latents)) < 1.4
  evaluations = read_log(workdir, "eval")  # every train.eval_every (5) steps and at the end
  assert [e["step"] for e in evaluations] == [5, 10] and evaluations[-1]["psnr_db"] > evaluations[0]["psnr_db"]
  result = json.loads((workdir / "logs" / "reconstruction.json").read_text())
  assert result["examples"] == 16 and media.read_provenance(workdir / "reconstructions.png")["psnr_db"] == str(
      result["psnr_db"])
  assert result["psnr_db"] > 10 and result["fid_random_conv"] > 0 and 0 <= result["judge/all"] <= 1
  latent = t2i_shapes.get_config("latent")  # the latent demo's config fits the autoencoder written
  latent.latent.autoencoder_path = str(directory)
  latent.data.resolution = config.data.resolution
  config_checks.validate(latent)

  saved = json.loads((workdir / "config.json").read_text())
  for field in ("temporal_decoder", "causal", "spatial_compression_ratio"):
    del saved["autoencoder"][field]  # as a run from before these fields wrote it: it resumes all the same
  (workdir / "config.json").write_text(json.dumps(saved))
  config = config.copy_and_resolve_references()
  config.train.steps = 12
  caplog.set_level("INFO", logger="diffusion_jax")
  assert train_autoencoder.train(config, workdir) == directory
  assert "resumed from step 10" in caplog.text
  assert read_log(workdir)[-1]["step"] == 12 and read_log(workdir, "eval")[-1]["step"] == 12
  config.autoencoder.latent_channels = 8
  with pytest.raises(ValueError, match="checkpoints of another autoencoder.*latent_channels: 4 -> 8"):
    train_autoencoder.train(config, workdir)


def test_the_perceptual_term_is_lpips_per_pixel_value_and_reconstructions_get_an_lpips(config, lpips_weights,
                                                                                         tmp_path):
  config = config.copy_and_resolve_references()
  config.lpips.update(path=str(lpips_weights[0]), loss_weight=0.5)
  config.train.update(steps=3, log_every=1)
  train_autoencoder.train(config, tmp_path)
  pixels = config.data.resolution ** 2 * 3
  for record in read_log(tmp_path):  # per example: L1 summed over pixels + weight * LPIPS per pixel value + KL
    expected = record["l1"] * pixels + 0.5 * pixels * record["lpips"] + config.train.kl_weight * record["kl"]
    np.testing.assert_allclose(record["loss"], expected, rtol=1e-5)
    assert record["lpips"] > 0
  result = json.loads((tmp_path / "logs" / "reconstruction.json").read_text())
  assert result["lpips"] > 0 and result["examples"] == 16 and read_log(tmp_path, "eval")[-1]["lpips"] == result["lpips"]


def test_adversarial_term_starts_at_its_step_with_sds_adaptive_weight_and_resumes(config, tmp_path, caplog):
  config = config.copy_and_resolve_references()
  config.adversarial.update(weight=0.5, start_step=2, layers=2, channels=8)
  config.train.update(steps=3, log_every=1)
  train_autoencoder.train(config, tmp_path)
  records = read_log(tmp_path)
  # Steps 1 and 2 come before step 2: the discriminator is not run (its losses and the weight are logged as 0).
  assert [(r["generator_weight"] > 0, r["discriminator_loss"] > 0) for r in records] == [(False, False)] * 2 + [
      (True, True)]
  assert [r["generator_loss"] for r in records[:2]] == [0, 0]

  # One step from the state at step 2: the generator loss's weight is SD's ratio of gradient norms with respect to
  # the decoder's last kernel (here from full gradients), and the discriminator takes a step.
  mesh = sharding.make_mesh(config.mesh)
  state = train_autoencoder.init_state(config, mesh)
  state = state.replace(step=jax.device_put(jnp.array(2), state.step.sharding))
  graphdef = nnx.graphdef(nnx.eval_shape(
      lambda: autoencoder.AutoencoderKL(train_autoencoder.model_config(config), rngs=init_rngs.seeded(0))))
  source = pipeline.data_source(config.data, "train")
  x = np.stack([media.to_float(source[i]["image"]) for i in range(8)])
  # The program train() compiled (same arguments, shardings and donation): the compilation cache has it.
  step = jax.jit(train_autoencoder.make_train_step(config, graphdef), donate_argnums=0)
  batch, hparams = pipeline.to_global({"image": x}, sharding.batch_sharding(mesh)), optimizer.hyperparameters(config)
  before = jax.device_get(state)  # the step donates its state
  new, metrics = step(state, batch, hparams, None)
  key = jax.random.fold_in(jax.random.key(config.seed), 2)

  def reconstruct(params):
    model = nnx.merge(graphdef, params)
    mean, logvar = model.moments(x)
    return model.decode_unscaled(mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape))

  critic = nnx.merge(nnx.graphdef(train_autoencoder.make_discriminator(config, nnx.Rngs(0))), before.discriminator)
  last_kernel_grad = lambda loss: jax.jit(jax.grad(loss))(before.params)["decoder"]["conv_out"]["kernel"]
  reconstruction_grad = last_kernel_grad(lambda p: jnp.abs(reconstruct(p) - x).sum(axis=(1, 2, 3)).mean())
  generator_grad = last_kernel_grad(lambda p: -critic(reconstruct(p)).mean())
  expected = 0.5 * jnp.linalg.norm(reconstruction_grad) / (jnp.linalg.norm(generator_grad) + 1e-4)
  np.testing.assert_allclose(metrics["generator_weight"], expected, rtol=1e-4)
  # Its schedule counts from adversarial.start_step: the warm-up's first learning rate is 0, the second is not.
  moved = lambda a, b: max(jax.tree.leaves(jax.tree.map(lambda u, v: float(jnp.max(jnp.abs(u - v))), a, b)))
  assert moved(new.discriminator, before.discriminator) == 0
  discriminator = jax.device_get(new.discriminator)
  assert moved(step(new, batch, hparams, None)[0].discriminator, discriminator) > 0

  config.train.steps = 4
  caplog.set_level("INFO", logger="diffusion_jax")
  train_autoencoder.train(config, tmp_path)  # the discriminator and its optimizer state come back too
  assert "resumed from step 3" in caplog.text and read_log(tmp_path)[-1]["step"] == 4
  config.adversarial.weight = 0.0
  with pytest.raises(ValueError, match=r"another autoencoder \(discriminator: 2 layers, 8 channels -> none\)"):
    train_autoencoder.train(config, tmp_path)


def test_init_from_starts_a_run_from_an_autoencoder_of_the_same_layout(config, trained):
  """train.init_from naming a trained image autoencoder of the config's layout: the fresh state's weights become its
  weights, each sharded over the (2, 4) mesh as the fresh one was; another layout is refused."""
  config = config.copy_and_resolve_references()
  config.train.init_from = str(trained[1])
  assert train_autoencoder.problems(config) == []
  mesh = sharding.make_mesh(config.mesh)
  fresh = train_autoencoder.init_state(config, mesh)
  placements = jax.tree.map(lambda x: x.sharding, fresh.params)
  started = train_autoencoder.started(config, fresh)
  assert jax.tree.map(lambda x: x.sharding, started.params) == placements
  expected = nnx.to_pure_dict(nnx.state(autoencoder.load_diffusers(str(trained[1])), nnx.Param))
  for ours, theirs in zip(jax.tree.leaves(started.params), jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(ours, theirs)
  config.autoencoder.latent_channels = 8
  assert "cannot start this autoencoder: its latent_channels is 4, this autoencoder's 8" in " ".join(
      train_autoencoder.problems(config))


def test_a_bad_config_is_refused_with_every_problem(config, tmp_path):
  bad = config.copy_and_resolve_references()
  bad.data.update(resolution=15, width=17)
  bad.autoencoder.update(block_out_channels=(8, 10), out_channels=1, latent_channels=0)
  bad.train.kl_weight = -1.0
  bad.optimizer.learning_rate = float("nan")  # (the diffusion trainer's optimizer and built-in data checks)
  bad.data.max_objects = 3
  bad.lpips.update(path=str(tmp_path / "nope"), loss_weight=-1.0)
  bad.adversarial.update(weight=0.5, layers=3, start_step=-1)
  with pytest.raises(ValueError) as error:
    train_autoencoder.train(bad, tmp_path)
  for part in ("block_out_channels (8, 10) must be positive multiples of autoencoder.norm_num_groups=4",
               "data.resolution=15 is not divisible by the downsampling factor 2",
               "data.width=17 is not divisible by the downsampling factor 2", "must be 3 (RGB",
               "train.kl_weight=-1.0 must be >= 0", "lpips.loss_weight=-1.0 must be >= 0",
               "LPIPS (lpips.path) needs images of at least 16 pixels a side; data.resolution x data.width gives "
               "15 x 17",
               "lpips.path: No LPIPS weights directory at", "adversarial.start_step=-1 must be >= 0",
               "the discriminator's 3 stride-2 layers (adversarial.layers) leave no patch of 15 x 17 images",
               "autoencoder.latent_channels=0 must be >= 1", "optimizer.learning_rate=nan must be > 0",
               "data.max_objects=3 must be in 1..2", "data.resolution=15: captioned_shapes draws images of 16, 32"):
    assert part in str(error.value)
  bad.data.width = 0  # squares: data.width, unset, is not named
  bad.autoencoder.norm_num_groups = 0  # (the widths' check divides by it)
  found = " ".join(train_autoencoder.problems(bad))
  assert "data.width=" not in found and "autoencoder.norm_num_groups=0 must be >= 1" in found
  bad.lpips.update(path="", loss_weight=1.0)
  bad.data.wrap_around = True
  found = " ".join(train_autoencoder.problems(bad))
  assert "lpips.loss_weight > 0 needs lpips.path" in found and "data.dataset='captioned_shapes' has no paths" in found
  assert not (tmp_path / "checkpoints").exists()  # refused before anything is written
  config = config.copy_and_resolve_references()
  config.train.eval_examples = 4  # the evaluation at the end shards its batches over the 8 devices
  with pytest.raises(ValueError, match="train.eval_examples=4 must be at least the 8 data-parallel devices"):
    train_autoencoder.validate(config, sharding.make_mesh(config.mesh))
  config.mesh.update(data=-1, sequence=2)
  with pytest.raises(ValueError, match="mesh.sequence=2: sequence parallelism splits a video diffusion model's "
                                       "frames; the autoencoder trainer would only repeat its work on those "
                                       "devices: leave it 1"):
    train_autoencoder.validate(config, sharding.make_mesh(config.mesh))


def test_a_temporal_decoder_trains_on_clips_and_is_written_as_svds_autoencoder(tmp_path):
  """autoencoder.temporal_decoder (autoencoder_shapes.py:video_test, on the (2, 4) mesh), started from an image
  autoencoder (train.init_from; random weights): the start is scored, then trained on moving_shapes clips the L1
  error falls, the encoder is the image one's moved by its few steps, and the written directory is a diffusers
  AutoencoderKLTemporalDecoder whose PyTorch model decodes clips as ours does; the held-out reconstructions are
  scored frame by frame; a 3-D discriminator judges its clips from adversarial.start_step on. An image dataset,
  another group count, an image autoencoder of other widths, and a 3-D discriminator without a temporal decoder are
  refused."""
  import torch
  from diffusers import AutoencoderKLTemporalDecoder

  config = autoencoder_shapes.get_config("video_test")
  config.data.data_dir = str(tmp_path / "tfds")
  config.mesh.update(data=2, fsdp=4)
  config.autoencoder.layers_per_block = 2  # a temporal decoder's middle block runs attention only with two blocks
  image_fields = config.autoencoder.to_dict() | {"temporal_decoder": False}
  image_config, image, image_params = random_autoencoder(image_fields, 1)
  autoencoder.save_diffusers(image, image_config, tmp_path / "image")
  config.train.init_from = str(tmp_path / "image")
  config.adversarial.update(weight=0.5, start_step=5, layers=2, channels=8, temporal=True)  # a 3-D discriminator
  directory = train_autoencoder.train(config, tmp_path / "workdir")
  assert json.loads((directory / "config.json").read_text())["_class_name"] == "AutoencoderKLTemporalDecoder"
  logged = read_log(tmp_path / "workdir")
  assert logged[-1]["l1"] < logged[0]["l1"]
  # Step 5 ran before adversarial.start_step, step 10 after: the discriminator then judged clips and weighed in.
  assert [(r["generator_weight"] > 0, r["discriminator_loss"] > 0) for r in logged] == [(False, False), (True, True)]
  assert [r["step"] for r in read_log(tmp_path / "workdir", "eval")] == [0, 5, 10]  # the start is scored too
  trained = nnx.to_pure_dict(nnx.state(autoencoder.load_diffusers(str(directory)), nnx.Param))
  fresh = random_autoencoder(config.autoencoder.to_dict(), 2)[2]
  distance = lambda params: sum(float(np.sum(np.abs(np.asarray(a) - b))) for a, b in zip(
      jax.tree.leaves(params["encoder"]), jax.tree.leaves(image_params["encoder"])))
  assert distance(trained) < distance(fresh) / 3
  z = np.random.default_rng(1).normal(size=(2, 4, 8, 8, 4)).astype(np.float32)  # 2 clips of 4 frames
  with torch.no_grad():
    clips = AutoencoderKLTemporalDecoder.from_pretrained(str(directory)).decode(as_torch(z.reshape(8, 8, 8, 4)),
                                                                                num_frames=4).sample
  np.testing.assert_allclose(autoencoder.load_diffusers(str(directory)).decode_unscaled(jnp.asarray(z)),
                             clips.permute(0, 2, 3, 1).numpy().reshape(2, 4, 16, 16, 3), atol=1e-4)
  scores = json.loads((tmp_path / "workdir" / "logs" / "reconstruction.json").read_text())
  assert scores["examples"] == 8 * 4 and np.isfinite(scores["psnr_db"])  # train.eval_examples clips, every frame
  assert scores["fvd_random_conv"] > 0 and 0 <= scores["judge/direction"] <= 1  # and the clips as videos, judged
  bad = config.copy_and_resolve_references()
  bad.data.dataset = "captioned_shapes"
  bad.autoencoder.norm_num_groups = 8
  found = " ".join(train_autoencoder.problems(bad))
  for part in ("normalises over 32 groups; set autoencoder.norm_num_groups=32 (not 8)",
               "decodes clips: give a video dataset"):
    assert part in found
  bad.autoencoder.temporal_decoder = False
  assert "adversarial.temporal judges clips, which only a temporal decoder or a causal autoencoder" in " ".join(
      train_autoencoder.problems(bad))
  bad = config.copy_and_resolve_references()
  bad.autoencoder.block_out_channels = (32, 32)
  assert train_autoencoder.problems(bad) == [
      f"train.init_from={config.train.init_from!r} cannot start this autoencoder: its block_out_channels is "
      "[32, 64], this autoencoder's [32, 32] (match the autoencoder fields to its config.json, or leave "
      "train.init_from empty to start from scratch)"]
  bad.train.init_from = str(tmp_path)
  assert "train.init_from=" in " ".join(train_autoencoder.problems(bad)) and "has no config.json" in " ".join(
      train_autoencoder.problems(bad))


def test_a_causal_autoencoder_trains_on_clips_and_is_written_as_hunyuan_videos(tmp_path):
  """autoencoder.causal (autoencoder_shapes.py:causal_test, 4x in space, on the (2, 4) mesh), started from an image
  autoencoder (random weights) inflated into 3-D: 5-frame clips encode to 2 latent frames, the L1 error falls, a 3-D
  discriminator weighs in from its start step, the convolutions still read the current frame mostly, the written
  directory is a diffusers AutoencoderKLHunyuanVideo whose PyTorch model encodes and decodes clips as ours does, and
  the held-out clips are scored frame by frame and as clips. Clips of 4 frames, 2 levels, both video layouts at once,
  a spatial ratio without the causal layout and an image autoencoder of another downsampling factor are refused."""
  import torch
  from diffusers import AutoencoderKLHunyuanVideo

  config = autoencoder_shapes.get_config("causal_test")
  config.data.data_dir = str(tmp_path / "tfds")
  config.mesh.update(data=2, fsdp=4)
  config.train.eval_every = 0  # scored at the end only
  config.adversarial.update(weight=0.5, start_step=5, layers=2, channels=8, temporal=True)
  image_config, image, _ = random_autoencoder(config.autoencoder.to_dict() | {"causal": False,
                                                                              "spatial_compression_ratio": 0}, 3)
  autoencoder.save_diffusers(image, image_config, tmp_path / "image")
  config.autoencoder.spatial_compression_ratio = 4  # the image autoencoder's downsampling factor
  config.train.init_from = str(tmp_path / "image")
  directory = train_autoencoder.train(config, tmp_path / "workdir")
  written = autoencoder.read_config(str(directory))
  assert written["_class_name"] == "AutoencoderKLHunyuanVideo" and autoencoder.latent_frames(written, 5) == 2
  logged = read_log(tmp_path / "workdir")
  assert logged[-1]["l1"] < logged[0]["l1"]
  assert [(r["generator_weight"] > 0, r["discriminator_loss"] > 0) for r in logged] == [(False, False), (True, True)]
  ours = autoencoder.load_diffusers(str(directory))
  kernel = np.abs(np.asarray(ours.decoder.up_blocks[0].resnets[0].conv1.conv.kernel[...]))  # [time, h, w, in, out]
  assert kernel[:-1].mean() < 0.2 * kernel[-1].mean()  # inflated: the earlier frames' taps started at zero
  x = np.random.default_rng(0).uniform(-1, 1, (2, 5, 16, 16, 3)).astype(np.float32)
  z = np.random.default_rng(1).normal(size=(2, 2, 4, 4, 4)).astype(np.float32)
  as_clips = lambda a: torch.from_numpy(a).permute(0, 4, 1, 2, 3)
  with torch.no_grad():
    reference = AutoencoderKLHunyuanVideo.from_pretrained(str(directory))
    mean = reference.encode(as_clips(x)).latent_dist.mean.permute(0, 2, 3, 4, 1).numpy()
    clips = reference.decode(as_clips(z)).sample.permute(0, 2, 3, 4, 1).numpy()
  np.testing.assert_allclose(ours.moments(jnp.asarray(x))[0], mean, atol=1e-4)
  np.testing.assert_allclose(ours.decode_unscaled(jnp.asarray(z)), clips, atol=1e-4)
  scores = json.loads((tmp_path / "workdir" / "logs" / "reconstruction.json").read_text())
  assert scores["examples"] == 8 * 5 and np.isfinite(scores["psnr_db"]) and scores["fvd_random_conv"] > 0
  # The motion judge read the 8 reconstructed clips against their captions: each moves one of four ways.
  ways = ("judge/direction", "judge/direction_opposite", "judge/direction_across", "judge/direction_still")
  assert sum(scores[k] * 8 for k in ways) == pytest.approx(8) and 0 <= scores["judge/all"] <= 1
  bad = config.copy_and_resolve_references()
  bad.data.frames = 4
  bad.autoencoder.temporal_decoder = True
  found = " ".join(train_autoencoder.problems(bad))
  for part in ("data.frames=4: the causal autoencoder encodes 1 + 4 k frames", "e.g. 5",
               "autoencoder.causal and autoencoder.temporal_decoder are two layouts"):
    assert part in found
  bad = config.copy_and_resolve_references()
  bad.autoencoder.block_out_channels = (8, 16)
  assert "needs at least 3 levels" in " ".join(train_autoencoder.problems(bad))
  bad.autoencoder.causal = False
  assert "spatial_compression_ratio=4 is read by a causal autoencoder only" in " ".join(
      train_autoencoder.problems(bad))
  bad = config.copy_and_resolve_references()
  bad.autoencoder.spatial_compression_ratio = 2
  assert "set spatial_compression_ratio=4" in " ".join(train_autoencoder.problems(bad))


def test_two_processes_train_and_write_what_one_does(config, trained, tmp_path):
  """launch/local.py runs the trainer as 2 processes of 4 devices, parameters sharded over all 8 (so over both
  processes), started (train.init_from) from a directory holding the weights the run in this process started from:
  the same batches as the 8-device run here, so the same losses, weights, scaling factor and reconstruction
  scores."""
  start = jax.device_get(train_autoencoder.init_state(config, sharding.make_mesh(config.mesh)).params)
  layout = train_autoencoder.model_config(config)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: autoencoder.AutoencoderKL(layout, rngs=init_rngs.seeded(0))))
  autoencoder.save_diffusers(nnx.merge(graphdef, start), layout, tmp_path / "start")
  root = pathlib.Path(__file__).resolve().parents[1]
  workdir = tmp_path / "work"
  command = [sys.executable, str(root / "launch" / "local.py"), "--num_processes=2", "--devices_per_process=4",
             "--module=diffusion_jax.train_autoencoder", "--", "--config=configs/autoencoder_shapes.py:test",
             f"--workdir={workdir}", f"--config.data.data_dir={config.data.data_dir}", "--config.mesh.data=1",
             "--config.mesh.fsdp=8", "--config.train.eval_every=0",  # the final scores only: they are compared
             f"--config.train.init_from={tmp_path / 'start'}"]
  result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "started from the autoencoder in" in result.stderr
  single, directory = trained
  # The first logged step agrees to float rounding; Adam at learning rate 3e-3 grows rounding differences of
  # near-zero gradients: later steps agree to 1e-3, the final weights to 1% of their norm.
  for i, (ours, theirs) in enumerate(zip(read_log(workdir), read_log(single), strict=True)):
    np.testing.assert_allclose([ours["loss"], ours["kl"]], [theirs["loss"], theirs["kl"]], rtol=1e-3 if i else 1e-5)
  ours = safetensors.numpy.load_file(workdir / "autoencoder" / "diffusion_pytorch_model.safetensors")
  theirs = safetensors.numpy.load_file(directory / "diffusion_pytorch_model.safetensors")
  assert ours.keys() == theirs.keys()
  difference = sum(np.sum((ours[k] - theirs[k]) ** 2) for k in theirs)
  assert difference < 1e-2**2 * sum(np.sum(v**2) for v in theirs.values())
  read_json = lambda path: json.loads(path.read_text())
  np.testing.assert_allclose(read_json(workdir / "autoencoder" / "config.json")["scaling_factor"],
                             read_json(directory / "config.json")["scaling_factor"], rtol=1e-4)
  ours, theirs = (read_json(w / "logs" / "reconstruction.json") for w in (workdir, single))
  assert ours.keys() == theirs.keys() and ours["examples"] == theirs["examples"]
  np.testing.assert_allclose([ours["psnr_db"], ours["fid_random_conv"]], [theirs["psnr_db"], theirs["fid_random_conv"]],
                             rtol=1e-3)
