"""Wan's video diffusion transformer against diffusers' PyTorch WanTransformer3DModel (tiny random weights saved as
diffusers does, in one file and in shards); what it cannot build is refused with a reason."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from flax import traverse_util

from diffusion_jax import (checkpoint, config_checks, edit_inputs, evaluate, lora, media, sample, sharding,
                           train)
from diffusion_jax.data import pipeline
from diffusion_jax.metrics import heldout_loss
from diffusion_jax.models import clip, diffusers_directory, init_rngs, text_to_image, wan_transformer
from diffusion_jax.text import tokenizers

# RGB in and out, and the width of t2v_moving_shapes:test's text encoder, so a pixel video model runs on it.
TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=3, out_channels=3,
            text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2, rope_max_seq_len=32)


def save_tiny_wan(directory, max_shard_size="10GB", seed=0, **changes):
  """diffusers' WanTransformer3DModel of TINY's fields (with `changes`), random, saved to `directory`."""
  from diffusers import WanTransformer3DModel

  torch.manual_seed(seed)
  model = WanTransformer3DModel(**TINY | changes).eval()
  with torch.no_grad():  # off the zero biases and unit norms of a fresh model
    for parameter in model.parameters():
      parameter.add_(0.05 * torch.randn_like(parameter))
  model.save_pretrained(directory, safe_serialization=True, max_shard_size=max_shard_size)
  return model


def moving_clips_step(config, graphdef, state, mesh):
  """(train step compiled for `state`, hyperparameters, a batch of the config's moving clips on the mesh)."""
  source = pipeline.data_source(config.data, "train")
  batch = next(iter(pipeline.make_loader(config.data, source, tokenizers.from_config(config), 8, seed=0)))
  batch_np = {k: batch[k] for k in ("video", "text_ids", "text_mask")}
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch_np.items()}
  step, _ = train.compile_step(config, train.make_train_step(config, graphdef), state, shapes, mesh)
  return step, train.place_hparams(config, mesh), pipeline.to_global(batch_np, sharding.batch_sharding(mesh))


def trained_a_step_and_sampled(config, graphdef, state, mesh, workdir):
  """(state after a train step on moving clips, whose loss is finite and gradient not zero, the grid and manifest
  records of the training samples it writes into `workdir` in 2 steps)."""
  step, hparams, batch = moving_clips_step(config, graphdef, state, mesh)
  state, metrics = step(state, batch, hparams)
  assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
  config.sample.update(steps=2, batch_size=8)
  grid = sample.write_training_samples(config, sample.Weights(state.params, state.frozen), graphdef, 1, workdir)
  return state, grid, [json.loads(line) for line in (grid.parent / "manifest.jsonl").read_text().splitlines()]


def test_the_transformer_computes_what_diffusers_computes(tmp_path):
  """Latent clips of 3 frames of 4 x 6 (3 x 2 x 3 tubelets, so the rotary angles of every axis matter), two noise
  levels, text whose second half is padding in one prompt: diffusers' output, the padded text zeroed as Wan's
  pipelines do; weights saved in shards load the same."""
  reference = save_tiny_wan(tmp_path / "one")
  ours = wan_transformer.load_diffusers(tmp_path / "one")
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 4, 6, 3)).astype(np.float32)
  timestep = np.array([10.0, 873.0], np.float32)
  text = rng.normal(size=(2, 5, 32)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  with torch.no_grad():
    expected = reference(torch.from_numpy(x).permute(0, 4, 1, 2, 3), torch.from_numpy(timestep),
                         torch.from_numpy(np.where(mask[..., None], text, 0))).sample
  got = ours(jnp.asarray(x), jnp.asarray(timestep), jnp.asarray(text), jnp.asarray(mask))
  np.testing.assert_allclose(got, expected.permute(0, 2, 3, 4, 1).numpy(), atol=1e-5)
  inputs = (jnp.asarray(x), jnp.asarray(timestep), jnp.asarray(text), jnp.asarray(mask))

  def variant(**options):  # the same weights in a model built with other options
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: wan_transformer.WanTransformer(
        wan_transformer.read_config(tmp_path / "one"), rngs=init_rngs.seeded(0), **options)))
    return lambda state: nnx.merge(graphdef, state)(*inputs)

  # blocks recomputed in the backward pass (model.remat): the same gradients
  squares = lambda network: jax.jit(jax.grad(lambda state: jnp.sum(network(state) ** 2)))(nnx.state(ours))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               squares(variant()), squares(variant(remat_policy="full")))
  # bfloat16 products and attention (model.dtype): about the same output
  low = jax.jit(variant(dtype="bfloat16"))(nnx.state(ours))
  assert low.dtype == jnp.float32 and 0 < np.abs(low - got).max() < 0.02 * np.abs(got).max()
  save_tiny_wan(tmp_path / "shards", max_shard_size="20KB")
  assert (tmp_path / "shards" / diffusers_directory.WEIGHTS_INDEX).exists()
  sharded = wan_transformer.load_diffusers(tmp_path / "shards")
  np.testing.assert_array_equal(sharded(jnp.asarray(x), jnp.asarray(timestep), jnp.asarray(text), jnp.asarray(mask)),
                                got)


def test_a_pair_of_experts_denoises_each_example_by_its_noise_level(tmp_path):
  """Wan 2.2 A14B's experts (model.wan_low_noise_path): an example whose timestep is at or above the boundary is
  the high-noise expert's output, one below it the low-noise expert's, in mixed and in uniform batches; an expert
  of other widths and a boundary outside (0, 1) are refused."""
  from configs import t2v_moving_shapes

  save_tiny_wan(tmp_path / "high"), save_tiny_wan(tmp_path / "low", seed=1)
  high, low = (wan_transformer.load_diffusers(tmp_path / name) for name in ("high", "low"))
  rng = np.random.default_rng(0)
  x, text = rng.normal(size=(2, 2, 4, 4, 3)).astype(np.float32), rng.normal(size=(2, 5, 32)).astype(np.float32)
  mask = jnp.ones((2, 5), bool)
  pair = jax.jit(lambda t: wan_transformer.experts(high, low, 500.0, x, t, text, mask))
  for timestep in ([10.0, 873.0], [500.0, 900.0], [10.0, 499.0]):
    t = jnp.asarray(timestep)
    expected = jnp.where((t >= 500)[:, None, None, None, None], high(x, t, text, mask), low(x, t, text, mask))
    np.testing.assert_allclose(pair(t), expected, atol=1e-5)
  assert np.abs(high(x, t, text, mask) - low(x, t, text, mask)).max() > 0.1  # (the experts differ)
  config = t2v_moving_shapes.get_config("test")
  config.model.update(backbone="wan", wan_path=str(tmp_path / "high"), wan_low_noise_path=str(tmp_path / "low"))
  config.diffusion.update(path="flow", prediction="flow")
  config.data.image_fraction = 0.0
  config.text.t5.d_model = 32
  assert config_checks.problems(config, device_count=8) == []
  save_tiny_wan(tmp_path / "wide", seed=1)
  (tmp_path / "wide" / "config.json").write_text(json.dumps(json.loads(
      (tmp_path / "wide" / "config.json").read_text()) | {"text_dim": 64}))
  config.model.update(wan_low_noise_path=str(tmp_path / "wide"), wan_boundary=1.0, wan_expert_batches="both",
                      wan_image_encoder_path=str(tmp_path / "low"))
  found = " ".join(config_checks.problems(config, device_count=8))
  assert "model.wan_image_encoder_path: only a Wan 2.1 image-to-video transformer (image_dim) reads" in found
  assert "model.wan_expert_batches='both' must be one of ['routed', 'mixed']" in found
  assert "model.wan_low_noise_path's text_dim=64 differs from model.wan_path's 32" in found
  assert "model.wan_boundary=1.0: the sigma (timestep / 1000) where the low-noise expert takes over" in found
  config.model.backbone = "unet"
  config.sample.guidance_scale_low_noise = 2.0
  found = " ".join(config_checks.problems(config, device_count=8))
  assert "model.wan_low_noise_path: a low-noise expert of Wan's transformer; model.backbone='unet'" in found
  assert "sample.guidance_scale_low_noise=2.0: the guidance scale of a pair of Wan experts' low-noise steps" in found


def test_what_it_cannot_build_is_refused_with_a_reason(tmp_path):
  with pytest.raises(ValueError, match="has no config.json: give the local directory of a diffusers "
                                       "WanTransformer3DModel"):
    wan_transformer.read_config(tmp_path)
  save_tiny_wan(tmp_path / "pipeline" / "transformer")
  with pytest.raises(ValueError, match="a whole pipeline's checkpoint; give its transformer/ folder"):
    wan_transformer.read_config(tmp_path / "pipeline")
  directory = tmp_path / "pipeline" / "transformer"
  config = json.loads((directory / "config.json").read_text())
  (directory / "config.json").write_text(json.dumps(config | {"added_kv_proj_dim": 48, "pos_embed_seq_len": 514}))
  with pytest.raises(ValueError, match="added_kv_proj_dim=48: an image-to-video model's image tokens need both, the "
                                       "second the model's width 24; pos_embed_seq_len=514: a first-last-frame "
                                       "model's image position embedding is for the CLIP tokens of its two images; "
                                       "it needs image_dim"):
    wan_transformer.load_diffusers(directory)
  (directory / "config.json").write_text(json.dumps(config | {"ffn_dim": 64}))
  with pytest.raises(ValueError, match="does not match its config.json .*blocks.0.ffn.net.0.proj.weight has shape"):
    wan_transformer.load_diffusers(directory)


def test_a_lora_of_wans_pair_of_experts_trains_on_a_pod_mesh_and_samples(tmp_path):
  """model.backbone='wan': the config check asks for Wan's flow parameterisation and the transformer's widths. With
  both of Wan 2.2 A14B's experts (model.wan_low_noise_path) as a LoRA (no finetune.workdir: its base is the
  checkpoint), the model starts with the directories' weights, train steps on a (2, 2, 2) mesh move the low-rank
  updates of both experts and nothing else, each step's gradient one expert's (routed batches), and clips are
  sampled (one expert a step), the low-noise expert's steps at a guidance scale of their own when given."""
  from configs import t2v_moving_shapes

  save_tiny_wan(tmp_path / "wan", num_layers=1), save_tiny_wan(tmp_path / "low", seed=1, num_layers=1)
  config = t2v_moving_shapes.get_config("test")
  config.model.update(backbone="wan", wan_path=str(tmp_path / "wan"))
  config.data.update(data_dir=str(tmp_path / "tfds"), image_fraction=0.0)
  found = " ".join(config_checks.problems(config, device_count=8))
  assert "Wan's transformer predicts the velocity eps - x0 on the flow path; set both to 'flow'" in found
  config.diffusion.update(path="flow", prediction="flow")
  config.text.t5.d_model = 16
  assert "the text encoder's width 16 (text.pretrained_path's, or text.t5.d_model) must equal Wan's " \
         "text_dim=32" in " ".join(config_checks.problems(config, device_count=8))
  config.text.t5.d_model = 32
  config.model.update(lora_rank=2, lora_modulation=True)
  assert "model.lora_modulation: not supported with model.backbone='wan' yet" in " ".join(
      config_checks.problems(config, device_count=8))
  config.model.update(lora_modulation=False, lora_feed_forward=True, wan_low_noise_path=str(tmp_path / "low"))
  assert config_checks.problems(config, device_count=8) == []
  config.mesh.update(data=2, fsdp=2, tensor=2)  # its parameters sharded by their logical axes too
  mesh = sharding.make_mesh(config.mesh)
  state, graphdef = train.init_state(config, mesh)
  loaded = {name: nnx.to_pure_dict(nnx.state(wan_transformer.load_diffusers(tmp_path / directory)))
            for name, directory in (("wan", "wan"), ("wan_low", "low"))}
  for name, weights in loaded.items():
    jax.tree.map(np.testing.assert_array_equal, state.frozen[name], weights)
  # 2 experts x 1 block x (4 projections of 2 attentions + 2 feed-forward layers), a and b each
  assert len(updates := traverse_util.flatten_dict(state.params)) == 40 and all(map(text_to_image.is_lora, updates))
  step, hparams, batch = moving_clips_step(config, graphdef, state, mesh)
  trained = state  # donated to the step
  for k in range(8):  # the first step's learning rate is 0 (warm-up)
    trained, metrics = step(trained, batch, hparams)
    assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    if k == 0:  # routed batches (model.wan_expert_batches): the gradient (Adam's first moment) of one expert alone
      moments = {jax.tree_util.keystr(path): np.abs(np.asarray(x)).max() for path, x in
                 jax.tree_util.tree_flatten_with_path(trained.opt_state)[0] if "lora_b" in jax.tree_util.keystr(path)}
      assert sorted({"wan_low" in path for path, m in moments.items() if m > 0}) in ([True], [False])
  for name, weights in loaded.items():
    jax.tree.map(np.testing.assert_array_equal, trained.frozen[name], weights)
  moved = traverse_util.flatten_dict(trained.params)  # both experts': the batches drew each's noise levels
  assert min(float(np.abs(x).max()) for path, x in moved.items() if path[-1] == "lora_b") > 0
  # exported in diffusers' layout: one file per expert, which --lora reads back into each
  checkpoint.write_config(tmp_path / "run", config)
  mngr = checkpoint.manager(tmp_path / "run")
  checkpoint.save(mngr, 2, trained)
  mngr.wait_until_finished()
  (tmp_path / "taken_low_noise.safetensors").touch()  # (the second file refused as the first, before any reading)
  with pytest.raises(ValueError, match="taken_low_noise.safetensors exists: give a new path"):
    lora.export(tmp_path / "run", tmp_path / "taken.safetensors", step=999, layout="diffusers")
  lora.export(tmp_path / "run", tmp_path / "pair.safetensors", use_ema=False, layout="diffusers")
  read = lora.read(str(tmp_path / "pair.safetensors")).updates | lora.read(
      f"low_noise={tmp_path / 'pair_low_noise.safetensors'}").updates
  assert read.keys() == {lora.name(path) for path in moved}
  for path, x in moved.items():
    np.testing.assert_allclose(read[lora.name(path)], x, rtol=1e-6)
  sample_config = config.sample.copy_and_resolve_references()
  sample_config.update(steps=2, num_per_prompt=1)
  clips = sample.generate(config, graphdef, trained.params, trained.frozen, tokenizers.from_config(config),
                          ["a red circle moving left"], sample_config, mesh)
  assert clips.shape == (1, 1, config.data.frames, 16, 16, 3) and clips.dtype == np.uint8
  sample_config.guidance_scale_low_noise = 0.0  # the low-noise expert's step unguided: other clips
  unguided = sample.generate(config, graphdef, trained.params, trained.frozen, tokenizers.from_config(config),
                             ["a red circle moving left"], sample_config, mesh)
  assert np.abs(unguided.astype(int) - clips).max() > 8


def test_the_wan_config_reads_an_image_to_video_checkpoints_parts_and_fine_tunes_them(tmp_path):
  """configs/wan_t2v.py:ROOT on a tiny random diffusers checkpoint of an image-to-video Wan (as Wan 2.1 I2V:
  transformer/ reading the clip, a mask and the image's latents, and the image's CLIP tokens from image_encoder/;
  UMT5 text_encoder/, tokenizer/spiece.model, vae/): the config check passes, the condition is what diffusers'
  WanImageToVideoPipeline builds, the model reads it (the latents after the clip's channels, the CLIP tokens in its
  cross-attentions) as diffusers' transformer does, a train step on moving clips runs with every part loaded (UMT5,
  CLIP and the VAE frozen), exported (export.py) it is the root again with the trained transformer, which diffusers
  loads whole, and clips are sampled from given first frames; a missing part, mismatched channels and a missing
  image are named. A root with transformer_2/ (Wan 2.2 A14B) gives the pair of experts, switched at its
  model_index.json's boundary_ratio; one whose model_index.json has expand_timesteps (Wan 2.2 TI2V 5B) starts clips
  at images."""
  import shutil

  import transformers
  from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanTransformer3DModel

  from diffusion_jax import export

  from configs import wan_t2v
  from diffusion_jax.models import t5

  root = tmp_path / "Wan-tiny"
  # text_dim 32 = the UMT5's width; 3 latent channels = the VAE's, read with a mask of 4 (frames a latent holds)
  # and CLIP tokens 16 wide read by cross-attention projections of the model's width (2 heads x 12)
  reference = save_tiny_wan(root / "transformer", num_layers=1, in_channels=10, image_dim=16, added_kv_proj_dim=24)
  torch.manual_seed(0)
  transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
      hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
      hidden_act="gelu")).save_pretrained(root / "image_encoder", safe_serialization=True)
  transformers.UMT5EncoderModel(transformers.UMT5Config(
      vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4, dropout_rate=0.0)).save_pretrained(
          root / "text_encoder", safe_serialization=True)
  vae = AutoencoderKLWan(base_dim=4, z_dim=3, latents_mean=[0.1, -0.2, 0.3], latents_std=[0.5, 2.0, 1.0])
  vae.save_pretrained(root / "vae", safe_serialization=True)
  (root / "tokenizer").mkdir()
  tokenizers.train_sentencepiece(["a red circle moving left", "a blue square moving up"],
                                 root / "tokenizer" / "spiece", vocab_size=30)
  config = wan_t2v.get_config(str(root))
  assert config.model.wan_low_noise_path == "" and config.model.in_channels == 3  # (the transformer's out_channels)
  assert (config.data.resolution, config.data.width) == (480, 832)  # Wan's 480p
  config.data.update(dataset="moving_shapes", resolution=32, width=0, frames=5, num_train=16, num_eval=8,
                     data_dir=str(tmp_path / "tfds"))
  config.text.max_length = 8
  config.model.dtype = "float32"  # (bfloat16 products are slower on a CPU, and the comparison below is exact)
  config.mesh.update(data=2, fsdp=4)
  assert config_checks.problems(config, device_count=8) == []
  mesh = sharding.make_mesh(config.mesh)
  state, graphdef = train.init_state(config, mesh)
  encoder = nnx.to_pure_dict(nnx.state(t5.load_hf_encoder(root / "text_encoder")))
  jax.tree.map(np.testing.assert_array_equal, state.frozen["text_encoder"], encoder)
  image_encoder = nnx.to_pure_dict(nnx.state(clip.load_vision(root / "image_encoder")))
  jax.tree.map(np.testing.assert_array_equal, state.frozen["image_encoder"], image_encoder)
  assert not any("image_encoder" in str(path) for path in traverse_util.flatten_dict(state.params))
  # the condition of two first frames, and the network's output for it, against diffusers'
  model = nnx.merge(graphdef, jax.device_get(state.params), jax.device_get(state.frozen))
  images = np.random.default_rng(0).uniform(-1, 1, size=(2, 32, 32, 3)).astype(np.float32)
  condition = model.image_condition(jnp.asarray(images), 5)
  assert condition["image"].shape == (2, 17, 16)  # the class token and 4 x 4 patches
  pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae.eval(), scheduler=None)
  with torch.no_grad():  # (an image at a time: the pipeline encodes one and repeats it for the batch)
    expected = torch.cat([pipe.prepare_latents(torch.from_numpy(image[None]).permute(0, 3, 1, 2), 1, 3, 32, 32, 5,
                                               torch.float32, torch.device("cpu"))[1] for image in images])
  np.testing.assert_allclose(condition["latents"], expected.permute(0, 2, 3, 4, 1).numpy(), atol=1e-5)
  # a last frame too (diffusers' last_image) for the first example, not for the second
  last = np.random.default_rng(2).uniform(-1, 1, size=(2, 32, 32, 3)).astype(np.float32)
  ended = model.image_condition(jnp.asarray(images), 5, jnp.asarray(last), jnp.array([True, False]))["latents"]
  with torch.no_grad():
    expected_last = pipe.prepare_latents(torch.from_numpy(images[:1]).permute(0, 3, 1, 2), 1, 3, 32, 32, 5,
                                         torch.float32, torch.device("cpu"),
                                         last_image=torch.from_numpy(last[:1]).permute(0, 3, 1, 2))[1]
  np.testing.assert_allclose(ended[:1], expected_last.permute(0, 2, 3, 4, 1).numpy(), atol=1e-5)
  np.testing.assert_allclose(ended[1:], condition["latents"][1:], atol=1e-6)
  # (512 text tokens: diffusers' attention takes what comes before the last 512 context tokens as the image's)
  x, text = jax.random.normal(jax.random.key(1), (2, 2, 4, 4, 3)), jax.random.normal(jax.random.key(2), (2, 512, 32))
  logsnr = jnp.array([-3.0, 1.0])
  with torch.no_grad():
    theirs = reference(torch.from_numpy(np.concatenate([x, condition["latents"]], -1)).permute(0, 4, 1, 2, 3),
                       torch.from_numpy(np.asarray(wan_transformer.timestep(logsnr))),
                       torch.from_numpy(np.asarray(text)),
                       encoder_hidden_states_image=torch.from_numpy(np.asarray(condition["image"]))).sample
  ours = model(x, logsnr, text, jnp.ones((2, 512), bool), condition=condition)
  np.testing.assert_allclose(ours, theirs.permute(0, 2, 3, 4, 1).numpy(), atol=1e-5)
  other = dict(condition, image=condition["image"][::-1])  # the image tokens are read
  assert np.abs(model(x, logsnr, text, jnp.ones((2, 512), bool), condition=other) - ours).max() > 1e-3
  # sampled from given first frames: the training samples animate the first frames of validation clips
  state, grid, records = trained_a_step_and_sampled(config, graphdef, state, mesh, tmp_path / "run")
  # exported (export.py): the root again, with the trained transformer, which diffusers loads whole
  checkpoint.write_config(tmp_path / "run", config)
  mngr = checkpoint.manager(tmp_path / "run")
  checkpoint.save(mngr, 1, state)
  mngr.wait_until_finished()
  exported = export.export(tmp_path / "run", tmp_path / "exported", use_ema=False)
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(wan_transformer.load_diffusers(
      exported / "transformer"))), jax.device_get(state.params["wan"]))
  _, info = WanTransformer3DModel.from_pretrained(exported / "transformer", output_loading_info=True)
  assert info["missing_keys"] == [] and info["unexpected_keys"] == []
  assert sorted(p.name for p in exported.iterdir()) == sorted(p.name for p in root.iterdir())
  _, clips, captions = evaluate.validation_set(config, 1)
  assert [r["prompt"] for r in records] == captions and "strength" not in records[0]
  assert media.read_image(grid.parent / records[0]["file"]).shape == (32, 5 * 32, 3)
  with pytest.raises(ValueError, match="This image-to-video model animates an image: give each prompt the image"):
    sample.generate(config, graphdef, state.params, state.frozen, tokenizers.from_config(config), captions,
                    config.sample, mesh)
  # the sampling CLI: each prompt's --init_image is read as the first frame of its clip; nothing else is taken
  media.save_png(tmp_path / "first.png", clips[0, 0], {})
  prompts = [{"prompt": "a red circle", "init_image": str(tmp_path / "first.png")}]
  (animated, keep), = edit_inputs.read(config, config.sample, prompts, 5).values()
  np.testing.assert_array_equal(animated[0], clips[0, 0])
  assert keep[0].all() and not keep[1:].any()
  for entry, problem in (({"prompt": "a red circle"}, "give each prompt the image its clip starts at"),
                         ({**prompts[0], "last_image": prompts[0]["init_image"]}, "reads the CLIP tokens of one"),
                         ({**prompts[0], "strength": 0.5}, "an image-to-video model makes its whole clip from noise"),
                         ({**prompts[0], "init_video": "v.gif"}, "an image-to-video model animates an --init_image")):
    with pytest.raises(ValueError, match=problem):
      edit_inputs.read(config, config.sample, [entry], 5)
  with pytest.raises(ValueError, match="an image-to-video model: evaluate it with --image_to_video"):
    evaluate.video_problems(config, config.sample, image_to_video=False)
  evaluate.video_problems(config, config.sample, image_to_video=True)
  checkpoint.write_config(tmp_path / "run", config)
  with pytest.raises(ValueError, match="--strength: not used here.*an image-to-video model's --init_image is not"):
    sample.run(tmp_path / "run", {"strength": 0.5}, init_image=tmp_path / "first.png")
  config.model.wan_image_encoder_path = ""
  assert "reads CLIP tokens of the image (image_dim=16): set model.wan_image_encoder_path" in " ".join(
      config_checks.problems(config, device_count=8))
  config.model.wan_image_encoder_path = str(root / "text_encoder")
  assert "holds a 'umt5', not a CLIPVisionModel" in " ".join(config_checks.problems(config, device_count=8))
  config.latent.cache = str(tmp_path / "cache")
  reference.save_pretrained(root / "transformer")  # the config's copy, its widths changed
  (root / "transformer" / "config.json").write_text(json.dumps(json.loads(
      (root / "transformer" / "config.json").read_text()) | {"in_channels": 7}))
  found = " ".join(config_checks.problems(config, device_count=8))
  assert "Wan's image-to-video transformer reads 7 channels: it must read the clip's 3, a mask of 4" in found
  assert "(are model.wan_path and latent.autoencoder_path from different checkpoints?)" in found
  assert "latent.cache: not supported for an image-to-video Wan yet" in found
  shutil.rmtree(root / "vae")
  assert f"latent.autoencoder_path={str(root / 'vae')!r} has no config.json" in " ".join(
      config_checks.problems(config, device_count=8))
  (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "expand_timesteps": True}))
  ti2v = wan_t2v.get_config(str(root))  # as Wan 2.2 TI2V 5B's root: clips may start at images
  assert ti2v.model.wan_clean_first_frame and ti2v.model.wan_first_frame_fraction == 0.5
  (root / "transformer_2").mkdir()  # as Wan 2.2 A14B: an expert for low noise
  (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "boundary_ratio": 0.9}))
  pair = wan_t2v.get_config(str(root))
  assert (pair.model.wan_low_noise_path, pair.model.wan_boundary) == (str(root / "transformer_2"), 0.9)


def test_a_wan_lora_travels_to_and_from_the_pytorch_layouts(tmp_path):
  """A LoRA of Wan's attention and feed-forward written in diffusers' layout (lora --format=diffusers) and loaded
  by diffusers (PEFT) into its transformer computes what our LoRA model computes, and reads back as the same
  updates; files in Wan's original layout (with alphas) and musubi-tuner's, read by --lora and fused into Wan's
  weights, compute what diffusers computes with them; biases' updates are refused, naming them."""
  from safetensors.numpy import load_file, save_file

  from diffusion_jax import diffusers_lora

  reference = save_tiny_wan(tmp_path / "wan")
  config = wan_transformer.read_config(tmp_path / "wan")
  rng = np.random.default_rng(0)
  graph, lora_state = nnx.split(nnx.eval_shape(lambda: wan_transformer.WanTransformer(
      config, rngs=init_rngs.seeded(0), lora_rank=2, ff_lora_rank=2)))
  base = nnx.to_pure_dict(nnx.state(wan_transformer.load_diffusers(tmp_path / "wan")))
  updates = {"wan/" + lora.name(path): 0.3 * rng.normal(size=x.shape).astype(np.float32)
             for path, x in traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(
                 nnx.merge(graph, lora_state), nnx.LoRAParam))).items()}
  x = rng.normal(size=(2, 2, 4, 4, 3)).astype(np.float32)
  timestep, text = np.array([10.0, 873.0], np.float32), rng.normal(size=(2, 5, 32)).astype(np.float32)

  def theirs(state_dict):  # diffusers' transformer with the LoRA loaded by PEFT
    model = type(reference).from_pretrained(tmp_path / "wan").eval()
    model.load_lora_adapter({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}, prefix="transformer",
                            adapter_name="lora")
    with torch.no_grad():
      out = model(torch.from_numpy(x).permute(0, 4, 1, 2, 3), torch.from_numpy(timestep), torch.from_numpy(text))
    return out.sample.permute(0, 2, 3, 4, 1).numpy()

  ours = lambda model, weights: nnx.merge(model, weights)(jnp.asarray(x), jnp.asarray(timestep), jnp.asarray(text),
                                                          jnp.ones((2, 5), bool))
  plain_graph, plain_state = nnx.split(nnx.eval_shape(lambda: wan_transformer.WanTransformer(
      config, rngs=init_rngs.seeded(0))))

  def fused(adapter):  # Wan's own model with the adapter fused into its kernels (sampling's --lora)
    nnx.replace_by_pure_dict(plain_state, lora.fuse({"wan": base}, [adapter])["wan"])
    return ours(plain_graph, plain_state)

  nnx.replace_by_pure_dict(lora_state, traverse_util.unflatten_dict(
      traverse_util.flatten_dict(base) | {tuple(int(p) if p.isdigit() else p for p in name.split("/")[1:]): u
                                          for name, u in updates.items()}))
  with_lora = ours(graph, lora_state)
  save_file(diffusers_lora.to_diffusers(updates), tmp_path / "diffusers.safetensors")
  np.testing.assert_allclose(theirs(load_file(tmp_path / "diffusers.safetensors")), with_lora, atol=1e-5)
  adapter = lora.read(str(tmp_path / "diffusers.safetensors"))
  assert adapter.updates.keys() == updates.keys()
  jax.tree.map(np.testing.assert_array_equal, adapter.updates, updates)
  described = lora.describe(adapter)  # --inspect
  assert "rank 2 LoRA updates of 20 layers" in described and "made elsewhere (Wan LoRA (PyTorch layout))" in described
  assert "self-attention: 8 layers" in described and "cross-attention: 8 layers" in described
  assert "feed-forward: 4 layers" in described
  from configs import t2v_moving_shapes

  model = t2v_moving_shapes.get_config("test")
  model.model.update(backbone="wan", wan_path=str(tmp_path / "wan"))
  model.text.t5.d_model = 32
  lora.check([adapter], model)  # a Wan workdir's model takes it (sampling's --lora)
  # Wan 2.2 A14B's pair: one file per expert, read into the low-noise one with low_noise=
  low = lora.read(f"low_noise={tmp_path / 'diffusers.safetensors'}:0.5")
  assert low.scale == 0.5 and low.updates.keys() == {"wan_low/" + name[4:] for name in updates}
  pair = updates | {"wan_low/" + name[4:]: 2 * x for name, x in updates.items()}
  files = diffusers_lora.per_expert(pair)
  assert files.keys() == {"", "_low_noise"} and files[""].keys() == files["_low_noise"].keys()
  jax.tree.map(np.testing.assert_array_equal, files["_low_noise"], jax.tree.map(lambda x: 2 * x, files[""]))
  save_file(updates, tmp_path / "ours.safetensors", metadata={"format": lora.FORMAT})
  with pytest.raises(ValueError, match="low_noise= names the expert a Wan LoRA file in a PyTorch layout updates"):
    lora.read(f"low_noise={tmp_path / 'ours.safetensors'}")
  # Wan's original layout, alpha 4 of rank 2 (an update twice a @ b), and musubi-tuner's flattened names
  original = {}
  for key, value in load_file(tmp_path / "diffusers.safetensors").items():
    for ours_name, theirs_name in diffusers_lora.ORIGINAL_BLOCK_LAYERS.items():
      key = key.replace(f".{theirs_name}.", f".{ours_name}.")
    key = key.replace("transformer.", "diffusion_model.").replace("lora_A", "lora_down").replace("lora_B", "lora_up")
    original[key] = value
    original[key.rsplit(".", 2)[0] + ".alpha"] = np.array(4.0, np.float32)
  assert len(original) == 60 and "diffusion_model.blocks.1.cross_attn.o.lora_up.weight" in original
  from diffusers import WanPipeline

  for name, layout in (("original", original), ("musubi", {
      "lora_unet_" + k.removeprefix("diffusion_model.").split(".lora")[0].split(".alpha")[0].replace(".", "_")
      + k[len(k.split(".lora")[0].split(".alpha")[0]):]: v for k, v in original.items()})):
    save_file(layout, tmp_path / f"{name}.safetensors")
    expected = theirs(WanPipeline.lora_state_dict(str(tmp_path / f"{name}.safetensors")))
    np.testing.assert_allclose(fused(lora.read(str(tmp_path / f"{name}.safetensors"))), expected, atol=1e-5)
  assert np.abs(expected - with_lora).max() > 1e-2  # (alpha matters)
  import safetensors.torch  # shared LoRAs are often bfloat16, which numpy lacks

  safetensors.torch.save_file({k: torch.from_numpy(v).bfloat16() for k, v in original.items()},
                              tmp_path / "bfloat16.safetensors")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-3),
               lora.read(str(tmp_path / "bfloat16.safetensors")).updates,
               lora.read(str(tmp_path / "original.safetensors")).updates)
  save_file(original | {"diffusion_model.blocks.0.self_attn.q.diff_b": np.zeros(24, np.float32)},
            tmp_path / "bias.safetensors")
  with pytest.raises(ValueError, match="a Wan LoRA that cannot be read: 1 tensors are not low-rank updates .*"
                                       "blocks.0.attn1.to_q.diff_b"):
    lora.read(str(tmp_path / "bias.safetensors"))


def test_an_image_to_video_wan_lora_reads_its_image_projections_as_diffusers_converts_them(tmp_path):
  """A Wan 2.1 image-to-video LoRA in Wan's original layout (cross_attn.k_img / v_img, img_emb.proj.1 / .3 beside a
  self-attention projection, the blocks' with alphas): --lora reads each layer's update a @ b as diffusers' conversion
  (WanPipeline.lora_state_dict) gives it, and fuses it into that kernel of an image-to-video Wan."""
  from diffusers import WanPipeline
  from safetensors.numpy import save_file

  from diffusion_jax import diffusers_lora

  save_tiny_wan(tmp_path / "wan", num_layers=1, in_channels=10, image_dim=16, added_kv_proj_dim=24)
  rng, original = np.random.default_rng(0), {}
  shapes = {"blocks.0.cross_attn.k_img": (24, 24), "blocks.0.cross_attn.v_img": (24, 24), "img_emb.proj.1": (16, 16),
            "img_emb.proj.3": (16, 24), "blocks.0.self_attn.q": (24, 24)}
  for layer, (fan_in, fan_out) in shapes.items():
    original[f"diffusion_model.{layer}.lora_down.weight"] = rng.normal(size=(2, fan_in)).astype(np.float32)
    original[f"diffusion_model.{layer}.lora_up.weight"] = rng.normal(size=(fan_out, 2)).astype(np.float32)
    if layer.startswith("blocks."):  # (diffusers' conversion takes no alpha of the image embedder)
      original[f"diffusion_model.{layer}.alpha"] = np.array(4.0, np.float32)
  save_file(original, tmp_path / "i2v.safetensors")
  theirs = {k: v.numpy() for k, v in WanPipeline.lora_state_dict(str(tmp_path / "i2v.safetensors")).items()}
  adapter = lora.read(str(tmp_path / "i2v.safetensors"))
  base = nnx.to_pure_dict(nnx.state(wan_transformer.load_diffusers(tmp_path / "wan")))
  fused = traverse_util.flatten_dict(lora.fuse({"wan": base}, [adapter])["wan"])
  base = traverse_util.flatten_dict(base)
  assert len(theirs) == 2 * len(shapes)
  for key in theirs:
    if key.endswith("lora_A.weight"):
      layer = key.removeprefix(diffusers_lora.PREFIX).removesuffix(".lora_A.weight")
      update = theirs[key].T @ theirs[key.replace("lora_A", "lora_B")].T
      module = diffusers_lora.update_module(layer)
      np.testing.assert_allclose(adapter.updates[f"{module}/lora_a"] @ adapter.updates[f"{module}/lora_b"], update,
                                 rtol=1e-5)
      kernel = tuple(int(p) if p.isdigit() else p for p in lora.kernel_of(f"{module}/lora_a").split("/")[1:])
      np.testing.assert_allclose(fused[kernel] - base[kernel], update, rtol=1e-4, atol=1e-5)


def test_a_lora_of_an_image_to_video_wan_adapts_its_image_projections_as_diffusers_reads_them(tmp_path):
  """model.lora_rank on Wan 2.1 image-to-video's transformer also adapts the image tokens' projections
  (add_k_proj_lora, add_v_proj_lora); exported in diffusers' layout and loaded by diffusers (PEFT) into its
  transformer, the LoRA computes what ours does on a clip with its condition and CLIP tokens (1e-5)."""
  from diffusion_jax import diffusers_lora

  reference = save_tiny_wan(tmp_path / "wan", num_layers=1, in_channels=10, image_dim=16, added_kv_proj_dim=24)
  config = wan_transformer.read_config(tmp_path / "wan")
  graph, state = nnx.split(nnx.eval_shape(lambda: wan_transformer.WanTransformer(config, rngs=init_rngs.seeded(0),
                                                                                 lora_rank=2, ff_lora_rank=2)))
  rng = np.random.default_rng(0)
  base = nnx.to_pure_dict(nnx.state(wan_transformer.load_diffusers(tmp_path / "wan")))
  updates = {lora.name(path): 0.3 * rng.normal(size=x.shape).astype(np.float32) for path, x in
             traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(nnx.merge(graph, state), nnx.LoRAParam))).items()}
  assert {"blocks/0/attn2/add_k_proj_lora/lora_a", "blocks/0/attn2/add_v_proj_lora/lora_b"} <= updates.keys()
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(traverse_util.flatten_dict(base) | {
      tuple(int(p) if p.isdigit() else p for p in name.split("/")): u for name, u in updates.items()}))
  x = rng.normal(size=(2, 2, 4, 4, 10)).astype(np.float32)
  timestep, text = np.array([10.0, 873.0], np.float32), rng.normal(size=(2, 512, 32)).astype(np.float32)
  image = rng.normal(size=(2, 17, 16)).astype(np.float32)
  ours = nnx.merge(graph, state)(jnp.asarray(x), jnp.asarray(timestep), jnp.asarray(text), jnp.ones((2, 512), bool),
                                 jnp.asarray(image))
  reference.load_lora_adapter({k: torch.from_numpy(v) for k, v in diffusers_lora.to_diffusers(
      {f"wan/{name}": u for name, u in updates.items()}).items()}, prefix="transformer", adapter_name="lora")
  with torch.no_grad():
    theirs = reference(torch.from_numpy(x).permute(0, 4, 1, 2, 3), torch.from_numpy(timestep), torch.from_numpy(text),
                       encoder_hidden_states_image=torch.from_numpy(image)).sample.permute(0, 2, 3, 4, 1).numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_wan_22_ti2v_starts_clips_at_images_as_diffusers_feeds_its_first_frame(tmp_path):
  """Wan 2.2 TI2V's image-to-video mode (model.wan_clean_first_frame; diffusers' expand_timesteps): a timestep per
  frame of tokens is what diffusers' transformer computes from one per token; a given first latent frame is read
  clean at timestep 0 as WanImageToVideoPipeline feeds it, and its output is the velocity toward it, so a sampler
  keeps it; a run trains with some clips given their first frame (and its held-out loss gives the same share theirs,
  whatever the batch), samples clips that start at an --init_image and from text alone (at another size too), and
  what does not fit is refused."""
  from configs import t2v_moving_shapes

  reference = save_tiny_wan(tmp_path / "wan", num_layers=1)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 4, 6, 3)).astype(np.float32)
  text, mask = rng.normal(size=(2, 5, 32)).astype(np.float32), np.ones((2, 5), bool)
  per_frame = np.array([[0.0, 700.0, 700.0], [10.0, 500.0, 900.0]], np.float32)
  diffusers_output = lambda clips, per_token: reference(torch.from_numpy(np.asarray(clips)).permute(0, 4, 1, 2, 3),
                                                        torch.from_numpy(np.asarray(per_token, np.float32)),
                                                        torch.from_numpy(text[:len(clips)])).sample.permute(
                                                            0, 2, 3, 4, 1).numpy()
  with torch.no_grad():  # diffusers: a timestep per token, each frame's 2 x 3 tubelets at their frame's
    expected = diffusers_output(x, np.repeat(per_frame, 6, axis=1))
  ours = wan_transformer.load_diffusers(tmp_path / "wan")
  np.testing.assert_allclose(ours(jnp.asarray(x), jnp.asarray(per_frame), jnp.asarray(text), jnp.asarray(mask)),
                             expected, atol=1e-5)
  config = t2v_moving_shapes.get_config("test")
  config.model.update(backbone="wan", wan_path=str(tmp_path / "wan"), wan_first_frame_fraction=0.5)
  config.diffusion.update(path="flow", prediction="flow")
  config.data.update(data_dir=str(tmp_path / "tfds"), image_fraction=0.0)
  config.text.t5.d_model = 32
  assert "set model.wan_clean_first_frame=True (Wan 2.2 TI2V) or leave it at 0" in " ".join(
      config_checks.problems(config, device_count=8))
  config.model.wan_clean_first_frame = True
  assert config_checks.problems(config, device_count=8) == []
  mesh = sharding.make_mesh(config.mesh)
  state, graphdef = train.init_state(config, mesh)
  model = nnx.merge(graphdef, *jax.device_get((state.params, state.frozen)))
  # the first example given its first latent frame, the second not
  first, logsnr = rng.normal(size=(2, 1, 4, 6, 3)).astype(np.float32), jnp.array([-1.0, 2.0])
  condition = {"first_latents": jnp.asarray(first), "first_given": jnp.array([True, False])}
  got = model(jnp.asarray(x), logsnr, jnp.asarray(text), jnp.asarray(mask), condition=condition)
  timestep = float(wan_transformer.timestep(logsnr)[0])
  with torch.no_grad():  # the pipeline's (1 - first_frame_mask) * condition + first_frame_mask * latents
    fed = diffusers_output(np.concatenate([first[:1], x[:1, 1:]], axis=1), np.repeat([[0.0, timestep, timestep]], 6, 1))
  np.testing.assert_allclose(got[:1, 1:], fed[:, 1:], atol=1e-5)
  sigma = float(jax.nn.sigmoid(-logsnr[0] / 2))  # its clean estimate x - sigma v is the given frame
  np.testing.assert_allclose(x[:1, :1] - sigma * np.asarray(got[:1, :1]), first[:1], atol=1e-5)
  np.testing.assert_allclose(got[1:], model(jnp.asarray(x[1:]), logsnr[1:], jnp.asarray(text[1:]),
                                            jnp.asarray(mask[1:])), atol=1e-5)
  step, hparams, batch = moving_clips_step(config, graphdef, state, mesh)
  state, metrics = step(state, batch, hparams)
  assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
  # the held-out loss gives the second of two clips its first frame (fraction 0.5), a batch at a time or not
  held = evaluate.validation_set(config, 2)[0]
  held_out = lambda c, rows: heldout_loss.make_heldout_loss_fn(c, graphdef, None, rows)(state.params, state.frozen,
                                                                                         held)
  np.testing.assert_allclose(held_out(config, 1), held_out(config, 2), rtol=1e-5)
  without = config.copy_and_resolve_references()
  without.model.wan_first_frame_fraction = 0.0
  assert not np.allclose(held_out(without, 2), held_out(config, 2), rtol=1e-3)
  # sampling: an --init_image starts its clip (not an edit: no strength); a prompt without one is made from text
  _, clips, captions = evaluate.validation_set(config, 1)
  media.save_png(tmp_path / "first.png", clips[0, 0], {})
  prompts = [{"prompt": captions[0], "init_image": str(tmp_path / "first.png")}]
  edits = edit_inputs.read(config, config.sample, prompts, config.data.frames)
  sample_config = config.sample.copy_and_resolve_references()
  sample_config.update(steps=3, num_per_prompt=1)
  grid = sample.write_samples(config, graphdef, state.params, state.frozen, tokenizers.from_config(config), prompts,
                              sample_config, mesh, 1, tmp_path / "samples", edits=edits)
  record = json.loads((grid.parent / "manifest.jsonl").read_text().splitlines()[0])
  strip = media.read_image(grid.parent / record["file"])  # the clip's frames side by side
  assert "strength" not in record and strip.shape == (16, config.data.frames * 16, 3)
  assert np.abs(strip[:, :16].astype(int) - clips[0, 0]).max() <= 1  # the clip starts at the image
  assert np.abs(strip[:, 16:32].astype(int) - clips[0, 0]).max() > 16  # and is made anew after it
  sample_config.update(height=16, width=32)  # from text alone, and at another size (sample.height, sample.width)
  assert config_checks.sample_size_problems(config, sample_config, "--") == []
  made = sample.generate(config, graphdef, state.params, state.frozen, tokenizers.from_config(config), captions,
                         sample_config, mesh)
  assert made.shape == (1, 1, config.data.frames, 16, 32, 3)
  sample_config.width = 31
  assert config_checks.sample_size_problems(config, sample_config, "--") == [
      "--width=31 must be a multiple of 2 (Wan's patch 2x2)"]
  window = np.zeros((1, config.data.frames, 16, 16), bool)
  window[:, :2] = True  # a video extension's window keeps its context frames: an edit, not an image to animate
  assert not edit_inputs.animated(config, window) and edit_inputs.animated(config, edits[0][1][None])
  for entries, problem in (([prompts[0], {"prompt": "a blue square"}], "give every prompt of the call one"),
                           ([{**prompts[0], "last_image": prompts[0]["init_image"]}], "it reads no last frame")):
    with pytest.raises(ValueError, match=problem):
      edit_inputs.read(config, config.sample, entries, config.data.frames)
  config.model.update(wan_low_noise_path=str(tmp_path / "wan"), wan_first_frame_fraction=1.5)
  config.distill.steps = 4
  found = " ".join(config_checks.problems(config, device_count=8))
  assert "model.wan_first_frame_fraction=1.5 must be in [0, 1]" in found
  assert "model.wan_clean_first_frame: not with a pair of experts (model.wan_low_noise_path)" in found
  assert "model.wan_first_frame_fraction with distill.steps: distillation's teacher passes no first frames" in found
  config.model.update(backbone="unet", attention_levels=(5,))  # (the U-Net's own checks still run)
  found = " ".join(config_checks.problems(config, device_count=8))
  assert "model.wan_clean_first_frame, model.wan_first_frame_fraction: Wan 2.2 TI2V's image-to-video mode" in found
  assert "model.attention_levels (5,) names a level beyond" in found


def test_a_first_last_frame_wan_makes_clips_between_two_images_as_diffusers_reads_them(tmp_path):
  """Wan 2.1 FLF2V (pos_embed_seq_len), on pixels: the condition ends each clip at its last image, the CLIP tokens
  of both images (the first's then the last's) get the learnt position embedding, and the model's output equals
  diffusers' transformer given the two images' tokens as WanImageToVideoPipeline passes them; training conditions
  each clip on its own first and last frames, its samples (and an evaluation's) are made between validation clips'
  first and last frames, a prompt without a last image is refused, and an image encoder of another token count is
  named."""
  import transformers

  from configs import t2v_moving_shapes

  # 7 channels in: the clip's 3, a mask of 1 (a pixel frame a frame) and the given frames' 3; two images of 17
  # CLIP tokens (4 x 4 patches and the class token)
  reference = save_tiny_wan(tmp_path / "wan", num_layers=1, in_channels=7, image_dim=16, added_kv_proj_dim=24,
                            pos_embed_seq_len=34)
  torch.manual_seed(0)
  transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
      hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
      hidden_act="gelu")).save_pretrained(tmp_path / "image_encoder", safe_serialization=True)
  config = t2v_moving_shapes.get_config("test")
  config.model.update(backbone="wan", wan_path=str(tmp_path / "wan"), wan_image_encoder_path=str(
      tmp_path / "image_encoder"))
  config.diffusion.update(path="flow", prediction="flow")
  config.data.update(data_dir=str(tmp_path / "tfds"), image_fraction=0.0)
  config.text.t5.d_model = 32
  assert config_checks.problems(config, device_count=8) == []
  mesh = sharding.make_mesh(config.mesh)
  state, graphdef = train.init_state(config, mesh)
  model = nnx.merge(graphdef, *jax.device_get((state.params, state.frozen)))
  frames, rng = config.data.frames, np.random.default_rng(0)
  first, last = (rng.uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32) for _ in range(2))
  condition = model.image_condition(jnp.asarray(first), frames, jnp.asarray(last), jnp.array([True, True]))
  assert condition["image"].shape == (2, 34, 16)
  np.testing.assert_allclose(condition["latents"][:, -1, ..., 1:], last, atol=1e-6)  # the clip ends at it
  x, text = jax.random.normal(jax.random.key(1), (2, frames, 16, 16, 3)), jax.random.normal(jax.random.key(2),
                                                                                          (2, 512, 32))
  logsnr = jnp.array([-3.0, 1.0])
  pairs = np.asarray(condition["image"]).reshape(4, 17, 16)  # the pipeline's batch: each clip's first, then last
  with torch.no_grad():
    theirs = reference(torch.from_numpy(np.concatenate([x, condition["latents"]], -1)).permute(0, 4, 1, 2, 3),
                       torch.from_numpy(np.asarray(wan_transformer.timestep(logsnr))),
                       torch.from_numpy(np.asarray(text)), encoder_hidden_states_image=torch.from_numpy(pairs)).sample
  ours = model(x, logsnr, text, jnp.ones((2, 512), bool), condition=condition)
  np.testing.assert_allclose(ours, theirs.permute(0, 2, 3, 4, 1).numpy(), atol=1e-5)
  state, grid, records = trained_a_step_and_sampled(config, graphdef, state, mesh, tmp_path / "run")
  _, clips, captions = evaluate.validation_set(config, len(records))
  assert [r["prompt"] for r in records] == captions
  assert media.read_image(grid.parent / records[0]["file"]).shape == (16, frames * 16, 3)  # (a sampler without
  # each clip's last frame is refused: the sampling below)
  media.save_png(tmp_path / "first.png", clips[0, 0], {})
  prompt = {"prompt": captions[0], "init_image": str(tmp_path / "first.png")}
  with pytest.raises(ValueError, match="makes clips between two images: give each prompt the image its clip ends"):
    edit_inputs.read(config, config.sample, [prompt], frames)
  with pytest.raises(ValueError, match="makes clips between two images"):
    sample.generate(config, graphdef, state.params, state.frozen, tokenizers.from_config(config), captions[:1],
                    config.sample, mesh, init_images=clips[:1, :frames],
                    keep_masks=edit_inputs.first_frame_edit(clips[0, 0], frames)[1][None])
  (_, keep), = edit_inputs.read(config, config.sample, [{**prompt, "last_image": prompt["init_image"]}],
                                frames).values()
  assert keep[0].all() and keep[-1].all() and not keep[1:-1].any()
  given, kept = evaluate.given_media(config, config.sample, clips, image_to_video=True)  # (evaluate --image_to_video)
  np.testing.assert_array_equal(given[:, -1], clips[:, frames - 1])
  assert kept[:, 0].all() and kept[:, -1].all() and not kept[:, 1:-1].any()
  encoder_config = tmp_path / "image_encoder" / "config.json"
  encoder_config.write_text(json.dumps(json.loads(encoder_config.read_text()) | {"patch_size": 4}))
  assert "embeds pos_embed_seq_len=34 image tokens, two images' of model.wan_image_encoder_path's 65: they must be " \
         "130" in " ".join(config_checks.problems(config, device_count=8))
