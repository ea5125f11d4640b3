"""The diffusion transformer: starts as the zero function, learns through every block; a video DiT inflates from
an image DiT and trains sharded as on one device and samples, with factorised or spacetime attention; a spacetime
DiT mixes frames and keeps stills images; a super-resolution DiT reads its inputs; dropout acts in every block, only
in training; the patch-position periods follow the config; a DiT's LoRA with feed-forward updates fuses into it;
configs it cannot serve are refused (test_video.py holds what video U-Nets and DiTs share)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util

from configs import sr_shapes, t2i_shapes, t2v_moving_shapes
from diffusion_jax import config_checks, sample, sharding
from diffusion_jax.data import pipeline
from diffusion_jax.models import dit, inflation, init_rngs, text_to_image
from diffusion_jax.text import tokenizers
from test_train import one_step
from test_unet import perturb, run
from test_video import assert_fused_is_the_lora_model, frame_influence, random_lora, video_inputs


def dit_config(video=False):
  config = t2v_moving_shapes.get_config("test") if video else t2i_shapes.get_config("test")
  config.model.update(backbone="dit", channels=16, depth=2, patch_size=2)
  return config


def test_starts_as_the_zero_function_and_learns_through_every_block():
  config = dit_config()
  model = text_to_image.TextToImage(config, rngs=init_rngs.seeded(0))
  graphdef, params, frozen = text_to_image.split(model, config)
  params, frozen = nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  target = jax.random.normal(jax.random.key(2), x.shape)
  ids = jnp.array([[5, 9, 13, 0], [7, 2, 0, 0], [3, 0, 0, 0], [4, 6, 8, 10]])
  logsnr = jnp.array([-3.0, -1.0, 1.0, 3.0])

  def loss(params):
    model = nnx.merge(graphdef, params, frozen)
    return jnp.mean((model(x, logsnr, model.encode(ids, ids > 0), ids > 0) - target) ** 2)

  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, opt_state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  trained, opt_state = params, tx.init(params)
  losses = []
  for _ in range(30):
    trained, opt_state, value = step(trained, opt_state)
    losses.append(float(value))
  # The output starts at exactly zero (up to the order of the mean's sum).
  assert losses[0] == pytest.approx(float(jnp.mean(target ** 2)), rel=1e-5)
  assert losses[-1] < 0.7 * losses[0]
  for index in range(config.model.depth):  # the zero gates open: every block's attention and MLP train
    block, before = trained["dit"]["blocks"][index], params["dit"]["blocks"][index]
    for path in (("self_attn", "q", "kernel"), ("ff", "proj_in", "kernel"), ("cross_attn", "out", "kernel")):
      leaf = lambda tree: tree[path[0]][path[1]][path[2]]
      assert float(jnp.abs(leaf(block) - leaf(before)).max()) > 0, (index, path)


def test_a_video_dit_inflated_from_an_image_dit_is_that_model_per_frame():
  image_config, video_config = dit_config(), dit_config(video=True)
  assert not inflation.compatibility_problems(image_config, video_config)
  image = perturb(text_to_image.TextToImage(image_config, rngs=init_rngs.seeded(0)))
  _, image_params, image_frozen = text_to_image.split(image, image_config)
  weights = traverse_util.flatten_dict(nnx.to_pure_dict(image_params) | nnx.to_pure_dict(image_frozen))
  # A trained-looking video model, so the inflation must replace (or zero) what it holds.
  graphdef, params, frozen = text_to_image.split(
      perturb(text_to_image.TextToImage(video_config, rngs=init_rngs.seeded(1))), video_config)
  video = nnx.merge(graphdef, *inflation.inflate(weights, nnx.to_pure_dict(params), nnx.to_pure_dict(frozen)))
  temporal_out = lambda tree: tree["dit"]["temporal_attention"][0]["attn"]["out"]["kernel"]
  x, logsnr, _, _ = video_inputs(res=16)
  ids = jnp.array([[5, 9, 13, 0], [7, 2, 0, 0]])
  text = image.encode(ids, ids > 0)
  per_frame = jnp.stack([run(image, x[:, k], logsnr, text, ids > 0) for k in range(4)], axis=1)
  # The temporal layers are still the trained-looking ones except the zeroed frame embedding: not identity.
  assert float(jnp.abs(run(video, x, logsnr, text, ids > 0) - per_frame).max()) > 1e-3
  fresh_graphdef, fresh_params, fresh_frozen = text_to_image.split(
      text_to_image.TextToImage(video_config, rngs=init_rngs.seeded(1)), video_config)
  fresh_params, fresh_frozen = inflation.inflate(weights, nnx.to_pure_dict(fresh_params),
                                                 nnx.to_pure_dict(fresh_frozen))
  assert float(jnp.abs(temporal_out(fresh_params)).max()) == 0  # temporal layers start as the identity
  inflated = nnx.merge(fresh_graphdef, fresh_params, fresh_frozen)
  np.testing.assert_allclose(run(inflated, x, logsnr, text, ids > 0), per_frame, atol=1e-5)
  unet_config = t2i_shapes.get_config("test")
  assert "model.backbone differs ('unet' vs 'dit')" in inflation.compatibility_problems(unet_config, video_config)
  image_config.model.position_max_period = 32.0
  assert "model.position_max_period differs (32.0 vs 10000.0)" in "; ".join(
      inflation.compatibility_problems(image_config, video_config))


@pytest.mark.parametrize("video_attention", ["factorised", "spacetime"])
def test_video_dit_trains_sharded_like_one_device_and_samples(video_attention):
  """Factorised, or spacetime with tokens of two frames (the spacetime model with one-frame tokens is the same
  program but for the patch reshapes: tested below)."""
  config = dit_config(video=True)
  config.model.video_attention = video_attention
  config.model.temporal_patch_size = 2 if video_attention == "spacetime" else 1
  batch_np = pipeline.synthetic_batch(config)
  batch_np["video"] = np.random.default_rng(0).normal(size=batch_np["video"].shape).astype(np.float32)
  batch_np["is_video"][::3] = False  # a joint image-video batch
  single_state, single_metrics = one_step(config, dict(data=1, fsdp=1, tensor=1), batch_np, jax.devices()[:1])
  state, metrics = one_step(config, dict(data=2, fsdp=2, tensor=2), batch_np)
  np.testing.assert_allclose(metrics["loss"], single_metrics["loss"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(jax.device_get(single_state.params))):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
  videos = sampled_clips(config, state, 2)
  assert videos.shape == (2, 2, 4, 16, 16, 3) and videos.dtype == np.uint8


def sampled_clips(config, state, num_per_prompt: int) -> np.ndarray:
  """uint8 clips of two moving-shapes prompts, 2 sampler steps, `num_per_prompt` each, on config.mesh."""
  graphdef = text_to_image.split(text_to_image.abstract(config), config)[0]
  sample_config = config.sample.copy_and_resolve_references()
  sample_config.update(steps=2, num_per_prompt=num_per_prompt)
  return sample.generate(config, graphdef, state.params, state.frozen, tokenizers.from_config(config),
                         ["a large red circle moving right", "a small blue square moving up"], sample_config,
                         sharding.make_mesh(config.mesh))


def test_a_spacetime_dit_attends_across_frames_in_every_block_and_keeps_stills_images():
  """model.video_attention='spacetime': no temporal layers; a video's frames mix (any input frame reaches every
  output frame) while a still (is_video False) is, frame by frame, what the model makes of that image."""
  config = dit_config(video=True)
  config.model.video_attention = "spacetime"
  assert config_checks.problems(config, device_count=8) == []
  model = perturb(dit.DiT(config.model, rngs=nnx.Rngs(0)))
  assert model.temporal_attention is None and model.temporal_frame_embed is not None
  x, logsnr, _, mask = video_inputs(res=16)
  text = jax.random.normal(jax.random.key(3), mask.shape + (config.model.text_dim,))
  for frame in (0, 3):
    assert np.all(frame_influence(model, x, logsnr, text, mask, frame) > 1e-4)  # every frame moves every frame
  stills = run(model, x, logsnr, text, mask, is_video=jnp.zeros(2, bool))
  per_frame = jnp.stack([run(model, x[:, k], logsnr, text, mask) for k in range(x.shape[1])], axis=1)
  np.testing.assert_allclose(stills, per_frame, atol=1e-5)
  # No is_video (no still can be in the batch): the same videos, attending without the block-diagonal bias.
  np.testing.assert_allclose(run(model, x, logsnr, text, mask), run(model, x, logsnr, text, mask,
                                                                    is_video=jnp.ones(2, bool)), atol=1e-5)
  bias = dit.spacetime_bias(jnp.array([True, False]), frames=2, tokens=3)
  assert bias.shape == (2, 1, 6, 6) and np.all(bias[0] == 0) and np.count_nonzero(bias[1] == 0) == 2 * 3 * 3
  for bad in (dict(video_attention="full"), dict(video_attention="spacetime", backbone="unet")):
    config = dit_config(video=True)
    config.model.update(bad)
    assert "model.video_attention" in "; ".join(config_checks.problems(config, device_count=8))
  config = dit_config(video=True)
  config.model.video_attention = "spacetime"
  config.inflate.update(image_workdir="image_run", train_temporal_only=True)
  assert "only the frame-index embedding" in "; ".join(config_checks.problems(config, device_count=8))


def test_a_dit_with_tokens_of_two_frames_inflates_from_an_image_dit_checkpoint(tmp_path):
  """model.temporal_patch_size=2: each token is a tubelet of two frames x one patch (half the tokens of a clip).
  Inflated from an image DiT's checkpoint, a still is that model's image in every frame; a video's frames mix,
  within a token and across tokens. Clips of an odd number of frames, and tubelets without spacetime attention,
  are refused."""
  from diffusion_jax import checkpoint, train

  image_config = dit_config()
  state, graphdef = train.init_state(image_config, sharding.make_mesh(image_config.mesh))
  image = perturb(nnx.merge(graphdef, state.params, state.frozen))
  params, frozen = (nnx.to_pure_dict(tree) for tree in text_to_image.split(image, image_config)[1:])
  workdir = tmp_path / "image"
  checkpoint.write_config(workdir, image_config)
  mngr = checkpoint.manager(workdir)
  checkpoint.save(mngr, 1, state.replace(params=params, frozen=frozen, ema=tuple(params for _ in state.ema)))
  mngr.wait_until_finished()

  config = dit_config(video=True)
  config.model.update(video_attention="spacetime", temporal_patch_size=2)
  config.inflate.update(image_workdir=str(workdir), step=1)
  assert config_checks.problems(config, device_count=8) == []
  state, graphdef = train.init_state(config, sharding.make_mesh(config.mesh))
  video = nnx.merge(graphdef, state.params, state.frozen)
  assert state.params["dit"]["patch_in"]["kernel"].shape[0] == 2 * params["dit"]["patch_in"]["kernel"].shape[0]
  x, logsnr, _, _ = video_inputs(res=16)
  ids = jnp.array([[5, 9, 13, 0], [7, 2, 0, 0]])
  text = image.encode(ids, ids > 0)
  still = jnp.broadcast_to(x[:, :1], x.shape)
  stills = run(video, still, logsnr, text, ids > 0, is_video=jnp.zeros(2, bool))
  image_out = run(image, x[:, 0], logsnr, text, ids > 0)
  for frame in range(x.shape[1]):
    np.testing.assert_allclose(stills[:, frame], image_out, atol=1e-5)
  video = perturb(video)  # the inflated frame-index embedding is zero: frames would differ only by their content
  for frame in (0, 3):
    assert np.all(frame_influence(video, x, logsnr, text, ids > 0, frame) > 1e-4)
  with pytest.raises(ValueError, match="multiple of 2 frames"):
    run(video, x[:, :3], logsnr, text, ids > 0)
  config.model.video_attention = "factorised"
  config.data.frames = 3
  found = "; ".join(config_checks.problems(config, device_count=8))
  assert "only a spacetime DiT" in found and "data.frames=3 must be a multiple of model.temporal_patch_size=2" in found


def test_a_super_resolution_dit_reads_its_low_res_input_and_augmentation_level():
  config = sr_shapes.get_config("residual")
  config.model.update(backbone="dit", channels=16, depth=2, patch_size=2)
  assert config_checks.problems(config, device_count=8) == []
  model = perturb(dit.DiT(config.model, rngs=nnx.Rngs(0)))
  keys = jax.random.split(jax.random.key(7), 3)
  x, lowres = jax.random.normal(keys[0], (2, 32, 32, 3)), jax.random.normal(keys[1], (2, 16, 16, 3))
  logsnr, text, mask = jnp.zeros(2), jax.random.normal(keys[2], (2, 5, config.model.text_dim)), jnp.ones((2, 5), bool)
  out = run(model, x, logsnr, text, mask, lowres=lowres, aug_logsnr=jnp.zeros(2))
  assert out.shape == x.shape
  for other in (dict(lowres=-lowres, aug_logsnr=jnp.zeros(2)), dict(lowres=lowres, aug_logsnr=jnp.full(2, -3.0))):
    assert float(jnp.abs(out - run(model, x, logsnr, text, mask, **other)).max()) > 1e-3
  with pytest.raises(ValueError, match="needs `lowres` and `aug_logsnr`"):
    run(model, x, logsnr, text, mask)


def test_dropout_acts_in_every_block_and_only_with_a_key():
  config = dit_config()
  config.model.dropout = 0.5
  assert config_checks.problems(config, device_count=8) == []
  model = perturb(dit.DiT(config.model, rngs=nnx.Rngs(0)))
  keys = jax.random.split(jax.random.key(3), 3)
  x, text = jax.random.normal(keys[0], (2, 16, 16, 3)), jax.random.normal(keys[1], (2, 5, config.model.text_dim))
  args = (x, jnp.zeros(2), text, jnp.ones((2, 5), bool))
  plain = run(model, *args)
  np.testing.assert_array_equal(plain, run(model, *args))
  dropped = run(model, *args, dropout_key=jax.random.key(1))
  np.testing.assert_array_equal(dropped, run(model, *args, dropout_key=jax.random.key(1)))
  assert float(jnp.abs(dropped - plain).max()) > 1e-3
  assert float(jnp.abs(dropped - run(model, *args, dropout_key=jax.random.key(2))).max()) > 1e-3
  tokens, emb = jax.random.normal(keys[2], (2, 64, 16)), jnp.ones((2, 16))
  for block in model.blocks:
    assert float(jnp.abs(run(block, tokens, emb, text, args[3], jax.random.key(1))
                         - run(block, tokens, emb, text, args[3])).max()) > 1e-3


def test_position_periods_follow_the_config():
  grid, dim = 8, 64
  spread = lambda max_period: np.ptp(np.asarray(dit.position_embedding(grid, grid, dim, max_period)), axis=0)
  flat = lambda max_period: np.mean(spread(max_period) < 0.1)  # the fraction that hardly changes over the grid
  assert flat(10000.0) > 0.5 and flat(4.0 * grid) < 0.15  # DiT's 10,000 patches on an 8x8 grid; 4x the grid
  config = dit_config()
  model = perturb(dit.DiT(config.model, rngs=nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  text = jax.random.normal(jax.random.key(1), (2, 5, config.model.text_dim))
  args = (x, jnp.zeros(2), text, jnp.ones((2, 5), bool))
  model.position_max_period = 4.0 * grid
  sharp = run(model, *args)
  model.position_max_period = config.model.position_max_period
  assert float(jnp.abs(run(model, *args) - sharp).max()) > 1e-3


def test_a_lora_of_a_dit_adapts_attention_feed_forward_and_modulation_and_fuses_into_it():
  """model.lora_feed_forward and model.lora_modulation with a video DiT: low-rank updates of every attention
  projection (self, cross and temporal), of every feed-forward projection and of every adaLN modulation (each
  block's and the final one), nothing else; fused into the DiT without them (random updates, far from nothing),
  they compute what the LoRA model computes."""
  from diffusion_jax import lora

  config = dit_config(video=True)
  config.model.update(lora_rank=2, lora_feed_forward=True, lora_modulation=True)
  graphdef, updates, weights = random_lora(config)
  projections = ("q", "k", "v", "out", "proj_in", "proj_out", "modulation", "final_modulation")
  kernels = {p[:-1] for p in weights if p[0] == "dit" and p[-1] == "kernel" and p[-2] in projections}
  assert {p[:-2] + (p[-2].removesuffix("_lora"),) for p in updates} == kernels
  assert {p[-1] for p in kernels} == set(projections) and any(p[1] == "temporal_attention" for p in kernels)
  kinds = {lora.layer_kind(lora.name(p)) for p in updates}
  assert kinds == {"self-attention", "cross-attention", "temporal attention", "feed-forward", "modulation"}
  assert_fused_is_the_lora_model(dit_config(video=True), graphdef, updates, weights)


def test_configs_a_dit_cannot_serve_are_refused():
  config = dit_config()
  config.model.update(patch_size=3, channels=30, coordinate_channels=True, position_max_period=4.0)
  message = "; ".join(config_checks.problems(config, device_count=8))
  assert "must be a multiple of 3 (the DiT's patch, model.patch_size=3)" in message and "model.channels=30" in message
  assert "data.resolution: the DiT's patch grid's longer side (5) is past model.position_max_period=4.0" in message
  assert "model.coordinate_channels is a U-Net input" in message
  config.model.backbone = "vit"
  assert "model.backbone='vit' is not one of" in "; ".join(config_checks.problems(config, device_count=8))
