"""Text-to-video: space-time U-Net and DiT, inflation from an image model, joint image-video training, video
sampling outputs, the motion judge and FVD."""

import json
import re
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx, traverse_util

from diffusion_jax import config_checks, media, sample, sharding, train
from diffusion_jax.data import moving_shapes
from diffusion_jax.metrics import fid, fvd, motion_judge
from diffusion_jax.models import dit, text_to_image, unet
from test_unet import perturb, run, tiny_config


def video_inputs(batch=2, frames=4, res=8, tokens=5, seed=0):
  keys = jax.random.split(jax.random.key(seed), 2)
  x = jax.random.normal(keys[0], (batch, frames, res, res, 3))
  return x, jnp.linspace(-3, 3, batch), jax.random.normal(keys[1], (batch, tokens, 8)), jnp.ones((batch, tokens), bool)


def frame_influence(model, x, logsnr, text, mask, frame, **kwargs):
  """Max |change| of each output frame when input `frame` is changed: [frames]."""
  changed = x.at[:, frame].add(1.0)
  diff = jnp.abs(run(model, changed, logsnr, text, mask, **kwargs) - run(model, x, logsnr, text, mask, **kwargs))
  return np.asarray(diff.max(axis=(0, 2, 3, 4)))


def spatial_part(params: dict) -> dict:
  """A video model's parameters without its temporal layers: an image model's."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({p: v for p, v in flat.items() if not any(str(k).startswith("temporal_")
                                                                             for k in p)})


@pytest.fixture(scope="module", params=["unet", "dit"])
def video_model(request):
  """A perturbed (non-identity) video U-Net or DiT and the image model made of its spatial parameters."""
  build = unet.UNet if request.param == "unet" else dit.DiT
  config = tiny_config(dropout=0.0, temporal=True, max_frames=4, depth=2, patch_size=2)
  video = perturb(build(config, rngs=nnx.Rngs(0)))
  config.temporal = False
  graphdef = nnx.split(build(config, rngs=nnx.Rngs(1)))[0]
  return video, nnx.merge(graphdef, spatial_part(nnx.to_pure_dict(nnx.split(video)[1])))


def test_temporal_layers_mix_frames_and_are_off_for_images(video_model):
  video, image = video_model
  x, logsnr, text, mask = video_inputs()
  mixing = frame_influence(video, x, logsnr, text, mask, frame=1)
  assert mixing[0] > 1e-3 and mixing[3] > 1e-3  # a trained-looking temporal stack spreads a change
  # Images stored as videos (is_video False): every frame is exactly the image model's output.
  off = jnp.zeros((2,), bool)
  per_frame = jnp.stack([run(image, x[:, k], logsnr, text, mask) for k in range(4)], axis=1)
  np.testing.assert_allclose(run(video, x, logsnr, text, mask, is_video=off), per_frame, atol=1e-5)
  assert np.all(np.delete(frame_influence(video, x, logsnr, text, mask, 1, is_video=off), 1) == 0)
  # A mixed batch: the image row is unaffected by the video row being a video.
  mixed = run(video, x, logsnr, text, mask, is_video=jnp.array([False, True]))
  np.testing.assert_allclose(mixed[0], per_frame[0], atol=1e-5)
  assert float(jnp.abs(mixed[1] - per_frame[1]).max()) > 1e-3


def test_a_video_unet_from_scratch_tells_frames_apart_from_the_first_step():
  # Its frame-index embedding starts random: a symmetric (all-frames-equal) start would leave nothing
  # to learn "frame 0 of a clip moving right is on the left" from (inflation zeroes it, tested below).
  fresh = unet.UNet(tiny_config(dropout=0.0, temporal=True, max_frames=4), rngs=nnx.Rngs(0))
  graphdef, initial = nnx.split(fresh)
  # Spatial layers as if trained (their zero-initialised outputs hide the embeddings); temporal ones as
  # initialised (identity blocks, which cannot tell equal frames apart, and the frame embedding).
  flat, spatial = (traverse_util.flatten_dict(nnx.to_pure_dict(state))
                   for state in (initial, nnx.split(perturb(fresh))[1]))
  mixed = {p: v if str(p[0]).startswith("temporal_") else spatial[p] for p, v in flat.items()}
  model = nnx.merge(graphdef, traverse_util.unflatten_dict(mixed))
  x, logsnr, text, mask = video_inputs()
  same = jnp.repeat(x[:, :1], 4, axis=1)
  out = run(model, same, logsnr, text, mask)
  assert float(jnp.abs(out[:, 0] - out[:, 3]).max()) > 1e-3
  still = run(model, same, logsnr, text, mask, is_video=jnp.zeros((2,), bool))
  np.testing.assert_allclose(still[:, 0], still[:, 3], atol=1e-6)


@pytest.mark.parametrize("frames", [1, 2, 4])
def test_any_frame_count_up_to_the_trained_length(video_model, frames):
  video, _ = video_model
  x, logsnr, text, mask = video_inputs(frames=frames)
  out = run(video, x, logsnr, text, mask)
  assert out.shape == x.shape and bool(jnp.isfinite(out).all())


def test_image_input_to_a_video_model_is_the_image_path(video_model):
  video, image = video_model
  x, logsnr, text, mask = video_inputs()
  np.testing.assert_allclose(run(video, x[:, 0], logsnr, text, mask), run(image, x[:, 0], logsnr, text, mask),
                             atol=1e-5)


def test_video_input_to_an_image_model_is_refused(video_model):
  _, image = video_model
  with pytest.raises(ValueError, match="needs a (temporal U-Net|video DiT)"):
    image(*video_inputs())


def models_at(config, state, graphdef, image_config, image_workdir):
  """The video model of `state` and the image model of the image checkpoint, their parameters on the host (so
  their programs run on one device, not partitioned over the 8 of the mesh)."""
  _, image_weights, image_graphdef, _, _ = sample.load_checkpoint(image_workdir, use_ema=True)
  video = nnx.merge(graphdef, *jax.device_get((state.params, state.frozen)))
  image = nnx.merge(image_graphdef, *jax.device_get(tuple(image_weights)))
  return video, image


@pytest.mark.xdist_group("video")
def test_inflated_model_is_the_image_model_per_frame_at_init(trained, trained_video):
  image_config, image_workdir, _ = trained
  config, _, _ = trained_video
  state, graphdef = train.init_state(config, sharding.make_mesh(config.mesh))
  video, image = models_at(config, state, graphdef, image_config, image_workdir)
  ids = jnp.array([[5, 9, 13, 0], [7, 2, 0, 0]])
  text = video.encode(ids, ids > 0)
  np.testing.assert_array_equal(text, image.encode(ids, ids > 0))
  x, logsnr = jax.random.normal(jax.random.key(3), (2, 4, 16, 16, 3)), jnp.array([-2.0, 1.0])
  per_frame = jnp.stack([run(image, x[:, k], logsnr, text, ids > 0) for k in range(4)], axis=1)
  assert float(jnp.abs(run(video, x, logsnr, text, ids > 0) - per_frame).max()) < 1e-5
  # At identity init, each output frame depends only on its own input frame.
  assert np.all(np.delete(frame_influence(video, x, logsnr, text, ids > 0, frame=2), 2) == 0)


@pytest.mark.xdist_group("video")
def test_inflation_adds_pixel_coordinate_inputs_with_zero_weights(trained, trained_video):
  image_config, image_workdir, _ = trained
  config = trained_video[0].copy_and_resolve_references()
  config.model.coordinate_channels = True  # the image model has none
  config.inflate.train_temporal_only = False
  state, graphdef = train.init_state(config, sharding.make_mesh(config.mesh))
  video, image = models_at(config, state, graphdef, image_config, image_workdir)
  assert video.unet.conv_in.kernel.shape[2] == image.unet.conv_in.kernel.shape[2] + 2
  ids = jnp.array([[5, 9, 13, 0], [7, 2, 0, 0]])
  text = video.encode(ids, ids > 0)
  x, logsnr = jax.random.normal(jax.random.key(3), (2, 4, 16, 16, 3)), jnp.array([-2.0, 1.0])
  per_frame = jnp.stack([run(image, x[:, k], logsnr, text, ids > 0) for k in range(4)], axis=1)
  assert float(jnp.abs(run(video, x, logsnr, text, ids > 0) - per_frame).max()) < 1e-5


@pytest.mark.xdist_group("video")
def test_training_only_the_temporal_layers(trained, trained_video):
  image_config, image_workdir, _ = trained
  config, _, state = trained_video
  graphdef = text_to_image.split(text_to_image.abstract(config), config)[0]
  video, image = models_at(config, jax.device_get(state), graphdef, image_config, image_workdir)
  trainable = traverse_util.flatten_dict(state.params)
  assert trainable and all(str(p[1]).startswith("temporal_") for p in trainable)  # ('unet', 'temporal_*', ...)
  ids = jnp.array([[5, 9, 13, 0], [7, 2, 0, 0]])
  text = video.encode(ids, ids > 0)
  np.testing.assert_array_equal(text, image.encode(ids, ids > 0))  # frozen text encoder
  x, logsnr = jax.random.normal(jax.random.key(3), (2, 4, 16, 16, 3)), jnp.array([-2.0, 1.0])
  # After a few steps the frames interact; the spatial layers are still the image model's.
  assert np.delete(frame_influence(video, x, logsnr, text, ids > 0, frame=2), 2).max() > 1e-4
  per_frame = jnp.stack([run(image, x[:, k], logsnr, text, ids > 0) for k in range(4)], axis=1)
  np.testing.assert_allclose(run(video, x, logsnr, text, ids > 0, is_video=jnp.zeros((2,), bool)), per_frame, atol=1e-5)


@pytest.mark.xdist_group("video")
def test_resuming_an_inflated_run_restores_without_initialising(trained_video, tmp_path):
  # A resumed run restores into the abstract state, so nothing initial is built: not even the inflation, whose
  # image workdir may have moved since (its weights are in the video run's checkpoints).
  config, workdir, trained_state = trained_video
  config = config.copy_and_resolve_references()
  config.inflate.image_workdir = str(tmp_path / "moved_away")
  config.train.steps = 6
  resumed_dir = tmp_path / "resumed"
  shutil.copytree(workdir, resumed_dir)
  state, _ = train.train_and_evaluate(config, resumed_dir)
  assert int(state.step) == 6
  frozen = lambda s: jax.tree.leaves(jax.device_get(s.frozen))
  for a, b in zip(frozen(state), frozen(trained_state)):  # the inflated spatial layers, as trained
    np.testing.assert_array_equal(a, b)
  fresh = tmp_path / "fresh"  # a new run does inflate, and so needs the image workdir
  with pytest.raises(ValueError, match="moved_away"):
    train.train_and_evaluate(config, fresh)


def test_inflation_from_an_incompatible_image_model_is_refused(trained, tmp_path):
  from configs import t2v_moving_shapes

  config = t2v_moving_shapes.get_config("test")
  config.data.data_dir = str(tmp_path)
  config.model.channels = 32
  config.inflate.image_workdir = str(trained[1])
  with pytest.raises(ValueError, match="does not match the video model's spatial layers.*shape"):
    train.init_state(config, sharding.make_mesh(config.mesh))
  # Coordinates added at zero weight and then frozen would never be used.
  config.model.update(channels=16, coordinate_channels=True)
  config.inflate.train_temporal_only = True
  with pytest.raises(ValueError, match="coordinate channels would stay unused"):
    train.init_state(config, sharding.make_mesh(config.mesh))


@pytest.mark.xdist_group("video")
def test_video_samples_are_gifs_mp4s_and_frame_strips_with_provenance(trained_video, tmp_path):
  config, workdir, _ = trained_video
  out = tmp_path / "samples"
  sample.run(workdir, {"steps": 2, "num_per_prompt": 2, "frames": 3}, None, output_dir=out)
  records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
  assert len(records) == 2 * len(config.sample.prompts) and (out / "grid.gif").exists()
  assert media.read_mp4(out / "grid.mp4")[1]["prompts"] == list(config.sample.prompts)
  for record in records[:2]:
    frames, provenance = media.read_gif(out / record["animation"])
    assert frames.shape == (3, 16, 16, 3)
    assert provenance["prompt"] == record["prompt"] and provenance["checkpoint_step"] == 4
    video, video_provenance = media.read_mp4(out / record["video"])  # 16 px clips upscaled 8x to 128 px
    assert video.shape == (3, 128, 128, 3) and video_provenance == provenance
    assert np.abs(video[:, 4::8, 4::8].astype(int) - frames).mean() < 10  # colours kept (lossy codec, noisy clips)
    strip = media.read_image(out / record["file"])
    np.testing.assert_array_equal(strip, np.concatenate(list(frames), axis=1))
    assert media.read_provenance(out / record["file"])["generated_by"] == "diffusion_jax"
  with pytest.raises(ValueError, match="--frames=9"):
    sample.run(workdir, {"frames": 9}, None, output_dir=tmp_path / "bad")


def clips(count, resolution, seed=0, frames=8, wrap_around=False):
  rng = np.random.default_rng(seed)
  specs = [moving_shapes.random_clip(rng, frames, resolution, wrap_around) for _ in range(count)]
  return (np.stack([moving_shapes.render(*s, frames, resolution, wrap_around) for s in specs]),
          [moving_shapes.caption(*s[:4]) for s in specs])


@pytest.mark.parametrize("resolution", [16, 32])
def test_motion_judge_scores_real_clips_and_rejects_noise_and_stills(resolution):
  videos, captions = clips(200, resolution)
  real = motion_judge.accuracy(videos, captions)
  assert real["direction"] == 1.0 and real["color"] == 1.0 and real["size"] == 1.0
  assert [real[k] for k in motion_judge.DIRECTION_MISSES] == [0.0, 0.0, 0.0]
  assert real["appearance_change"] < 0.05
  noise = np.random.default_rng(1).integers(0, 256, videos.shape, dtype=np.uint8)
  assert motion_judge.accuracy(noise, captions)["direction"] < 0.4
  stills = np.broadcast_to(videos[:, :1], videos.shape)
  still = motion_judge.accuracy(stills, captions)
  assert still["direction"] == 0.0 and still["direction_still"] == 1.0
  reversed_clips = videos[:, ::-1]
  backwards = motion_judge.accuracy(reversed_clips, captions)
  assert backwards["direction"] == 0.0 and backwards["direction_opposite"] == 1.0
  other_axis = {"left": "up", "right": "down", "up": "left", "down": "right"}
  across = [re.sub(r"moving (\w+)", lambda m: "moving " + other_axis[m.group(1)], c) for c in captions]
  assert motion_judge.accuracy(videos, across)["direction_across"] == 1.0
  with pytest.raises(ValueError, match="Not a moving_shapes caption"):
    motion_judge.parse("a large red circle at the top left")
  flipped = [motion_judge.reversed_direction(c) for c in captions]  # the reversed clips' captions
  assert motion_judge.accuracy(reversed_clips, flipped)["direction"] == 1.0
  assert [motion_judge.parse(c)[:3] for c in flipped] == [motion_judge.parse(c)[:3] for c in captions]


def test_wrap_around_clips_cross_the_edges_and_the_judge_follows_them():
  """data.wrap_around: shapes start anywhere and come back at the far edge; the wrap-around judge scores such clips
  as the plain one scores plain clips (the plain judge misreads the shapes split at an edge), and paths longer than
  the frame too (17 frames at a clip's speed, where the plain judge's direction fails)."""
  videos, captions = clips(200, 16, frames=5, wrap_around=True)
  lit = videos.max(-1) > 0
  crossing = (lit[..., 0].any(-1) & lit[..., -1].any(-1)) | (lit[..., 0, :].any(-1) & lit[..., -1, :].any(-1))
  assert 0.3 < crossing.any(axis=1).mean() < 0.9  # drawn on both sides while it crosses
  starts = np.array([moving_shapes.random_clip(np.random.default_rng(s), 5, 16, True)[4] for s in range(200)])
  assert (starts < 4).any(axis=0).all() and (starts > 12).any(axis=0).all()  # anywhere, edges included
  real = motion_judge.accuracy(videos, captions, wrap_around=True)
  assert real["direction"] == 1.0 and real["color"] == 1.0 and real["size"] == 1.0
  plain = motion_judge.accuracy(*clips(200, 16, frames=5))["shape"]  # 16 px shapes: ~0.8 of plain clips
  assert real["shape"] > plain - 0.1 and motion_judge.accuracy(videos, captions)["shape"] < plain - 0.2
  assert motion_judge.accuracy(videos[:, ::-1], captions, wrap_around=True)["direction"] == 0.0
  rng = np.random.default_rng(3)
  specs = [moving_shapes.random_clip(rng, 5, 16, True) for _ in range(50)]
  travel = 16 * moving_shapes.TRAVEL / 4  # pixels per frame of a 5-frame clip

  def path(color, shape, size, direction, start):  # 17 frames: four such clips end to end, 29 px
    dy, dx = moving_shapes.STEP[moving_shapes.DIRECTIONS[direction]]
    return np.concatenate([moving_shapes.render(color, shape, size, direction, (start[0] + 4 * k * travel * dy,
                                                start[1] + 4 * k * travel * dx), 5, 16, True)[min(k, 1):]
                           for k in range(4)])

  long = np.stack([path(*s) for s in specs])
  assert long.shape[1] == 17
  captions = [moving_shapes.caption(*s[:4]) for s in specs]
  assert motion_judge.accuracy(long, captions, wrap_around=True)["direction"] == 1.0
  assert motion_judge.accuracy(long, captions)["direction"] < 0.8


def test_travel_sets_how_far_a_clip_goes_and_paths_that_cannot_be_drawn_are_refused():
  """data.travel: the object crosses that fraction of the frame in even steps, on the torus and inside the frame;
  the judge reads every such clip's direction; a path that leaves the frame, or steps half the torus, is refused."""
  for wrap_around in (False, True):
    for travel in (0.2, 0.45):
      rng = np.random.default_rng(0)
      specs = [moving_shapes.random_clip(rng, 5, 32, wrap_around, travel) for _ in range(40)]
      videos = np.stack([moving_shapes.render(*s, 5, 32, wrap_around, travel) for s in specs])
      captions = [moving_shapes.caption(*s[:4]) for s in specs]
      assert motion_judge.accuracy(videos, captions, wrap_around)["direction"] == 1.0
      for video in videos[:8]:
        centroids, _ = motion_judge.track(video, wrap_around)
        steps = (np.diff(centroids, axis=0) + 16) % 32 - 16 if wrap_around else np.diff(centroids, axis=0)
        distance = np.abs(steps).sum(axis=-1)  # along the one axis it moves on
        np.testing.assert_allclose(distance, 32 * travel / 4, atol=0.6)
  assert moving_shapes.travel_problems(0.58, 5, False) == [] and moving_shapes.travel_problems(1.9, 5, True) == []
  assert "must fit inside the frame" in moving_shapes.travel_problems(0.6, 5, False)[0]
  assert "half the frame or more between frames" in moving_shapes.travel_problems(2.0, 5, True)[0]
  assert "must be > 0" in moving_shapes.travel_problems(0.0, 5, True)[0]
  data = ml_collections.ConfigDict(dict(dataset="moving_shapes", frames=5, wrap_around=False, travel=0.6))
  assert config_checks.moving_shapes_problems(data)[0].startswith("data.travel=0.6: a large shape's path")
  with pytest.raises(ValueError, match="moving_shapes travel=0.6: a large shape's path"):
    moving_shapes.builder("unused", resolution=16, frames=5, travel=0.6)


@pytest.mark.xdist_group("video")
def test_evaluating_a_video_model_reports_motion_and_whether_it_reads_the_direction(trained_video):
  from diffusion_jax import evaluate

  config, workdir, _ = trained_video
  _, metrics, generated, _ = evaluate.evaluate_step(workdir, None, num_prompts=4, heldout_examples=4,
                                                           combination_prompts=4)
  assert generated.shape == (4, config.data.frames, 16, 16, 3) and 0 <= metrics["accuracy/direction"] <= 1
  assert np.isfinite(metrics["heldout_loss_direction_gap"]) and metrics["heldout_loss_direction_gap"] != 0


def test_fvd_is_zero_on_itself_and_sees_frame_order_that_per_frame_fid_cannot():
  videos, _ = clips(128, 16, frames=6)
  assert abs(fvd.fvd(videos, videos)) < 1e-6
  shuffled = videos[:, np.random.default_rng(0).permutation(6)]  # the same frames, scrambled motion
  per_frame = lambda v: fid.random_conv_features(v.reshape((-1,) + v.shape[2:]))
  assert abs(fid.fid(per_frame(videos), per_frame(shuffled))) < 1e-6
  assert fvd.fvd(videos, shuffled) > 0.01
  noisy = np.clip(videos + np.random.default_rng(2).normal(0, 40, videos.shape), 0, 255).astype(np.uint8)
  assert fvd.fvd(videos, noisy) > fvd.fvd(videos, shuffled)


def random_lora(config):
  """A perturbed model of the LoRA `config` with random updates (far from nothing): (graphdef, updates {path:
  array}, its frozen weights {path: array})."""
  from diffusion_jax.models import init_rngs

  graphdef, params, frozen = text_to_image.split(perturb(text_to_image.TextToImage(config, rngs=init_rngs.seeded(0))),
                                                 config)
  rng = np.random.default_rng(0)
  updates = {p: rng.normal(0, 0.3, w.shape).astype(np.float32)
             for p, w in traverse_util.flatten_dict(nnx.to_pure_dict(params)).items()}
  return graphdef, updates, traverse_util.flatten_dict(nnx.to_pure_dict(frozen))


def assert_fused_is_the_lora_model(plain, graphdef, updates, weights):
  """The updates of random_lora fused into the model of `plain` (the same config without LoRA) holding `weights`
  compute what the LoRA model computes on a video batch, and the plain model without them does not."""
  from diffusion_jax import lora
  from diffusion_jax.models import init_rngs

  plain_graphdef, plain_params, plain_frozen = text_to_image.split(
      text_to_image.TextToImage(plain, rngs=init_rngs.seeded(1)), plain)
  taken = lambda tree: traverse_util.unflatten_dict(
      {p: weights[p] for p in traverse_util.flatten_dict(nnx.to_pure_dict(tree))})
  adapter = lora.Adapter("random", {lora.name(p): w for p, w in updates.items()}, {})
  x, logsnr, _, _ = video_inputs(res=plain.data.resolution)
  ids = jnp.array([[5, 9, 13, 0], [7, 2, 0, 0]])

  def denoised(model):
    return run(model, x, logsnr, model.encode(ids, ids > 0), ids > 0)

  with_updates = denoised(nnx.merge(graphdef, traverse_util.unflatten_dict(updates),
                                    traverse_util.unflatten_dict(weights)))
  fused = denoised(nnx.merge(plain_graphdef, lora.fuse(taken(plain_params), [adapter]),
                             lora.fuse(taken(plain_frozen), [adapter])))
  without = denoised(nnx.merge(plain_graphdef, taken(plain_params), taken(plain_frozen)))
  np.testing.assert_allclose(fused, with_updates, atol=1e-4)
  assert float(jnp.abs(without - with_updates).max()) > 1e-2


def test_a_lora_of_a_video_unet_adapts_its_temporal_blocks_and_fuses_into_it():
  """model.lora_convolutions and model.lora_modulation with a video U-Net: low-rank updates of the residual
  blocks' 3x3 convolutions and of both convolutions of every temporal block (over frames, and its 1x1 output), of
  every residual and temporal block's FiLM projection, beside every attention projection's; fused into the U-Net
  without them (random updates, far from nothing), they compute what the LoRA model computes."""
  from configs import t2v_moving_shapes
  from diffusion_jax import lora

  plain = t2v_moving_shapes.get_config("test")
  config = plain.copy_and_resolve_references()
  config.model.update(lora_rank=2, lora_convolutions=True, lora_modulation=True)
  graphdef, updates, weights = random_lora(config)
  adapted = {p[:-2] + (p[-2].removesuffix("_lora"), "kernel") for p in updates}
  temporal = {p for p in weights if p[-1] == "kernel" and any(str(k).startswith("temporal_") for k in p)
              and p[-2] in ("conv", "conv_out", "film")}
  films = {p for p in weights if p[-2:] == ("film", "kernel")}
  assert {p[-2] for p in temporal} == {"conv", "conv_out", "film"} and temporal | films <= adapted
  assert {p[-2] for p in adapted} >= {"conv1", "conv2", "q", "out"} and len(films) > len(temporal & films)
  assert {lora.layer_kind(lora.name(p)) for p in updates} >= {"temporal convolution", "convolution", "modulation",
                                                               "temporal modulation"}
  assert_fused_is_the_lora_model(plain, graphdef, updates, weights)


def test_video_config_problems_are_reported():
  from configs import t2v_moving_shapes
  from diffusion_jax import config_checks

  config = t2v_moving_shapes.get_config()
  config.data.frames = 12
  config.data.image_fraction = 1.5
  config.inflate.train_temporal_only = True
  message = "\n".join(config_checks.problems(config, device_count=8))
  assert "data.frames=12 exceeds model.max_frames=4" in message and "data.image_fraction=1.5" in message
  assert "inflate.train_temporal_only needs" in message
  config_checks.validate(t2v_moving_shapes.get_config(), device_count=8)
  config_checks.validate(t2v_moving_shapes.get_config("test"), device_count=8)


def test_stills_in_a_video_batch_are_static_and_marked(tmp_path):
  from configs import t2v_moving_shapes
  from diffusion_jax.data import pipeline
  from diffusion_jax.text import tokenizers

  config = t2v_moving_shapes.get_config("test")
  config.data.update(data_dir=str(tmp_path), image_fraction=0.5)
  source = pipeline.data_source(config.data, "train")
  batch = next(iter(pipeline.make_loader(config.data, source, tokenizers.from_config(config), 32, seed=0)))
  video, is_video = batch["video"], batch["is_video"]
  assert video.shape == (32, 4, 16, 16, 3) and 4 <= (~is_video).sum() <= 28
  static = np.all(video == video[:, :1], axis=(1, 2, 3, 4))
  np.testing.assert_array_equal(static, ~is_video)
