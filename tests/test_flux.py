"""Flux: the transformer (models/flux_transformer.py) against diffusers' FluxTransformer2DModel, and configs/flux.py on
a tiny checkpoint's folders against diffusers' FluxPipeline."""

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from conftest import exported_run_holds_the_fused_pipeline
from test_sd3 import SentencePieceT5Tokenizer, tiny_lora_run, trained_lora_run
from test_sd_unet import assert_trains_and_completes, inpainting_inputs, save_tiny_clip_tokenizer

from diffusion_jax import config_checks, export, media, sample, schedules
from diffusion_jax.models import flux_transformer, init_rngs


def save_tiny_flux_transformer(directory, guidance_embeds=True, in_channels=16):
  """A FluxTransformer2DModel of 2 double-stream and 2 single-stream blocks (2 heads of 8, rotary axes 2 + 2 + 4;
  latents of 4 channels, packed 16; more in_channels: FLUX.1 Fill's; T5 states 40 wide, CLIP's pooled 16) with
  random weights, perturbed off diffusers' zero initialisations, saved as a Flux checkpoint's transformer/ folder;
  returns it."""
  import diffusers

  torch.manual_seed(0)
  model = diffusers.FluxTransformer2DModel(
      patch_size=1, in_channels=in_channels, out_channels=16, num_layers=2, num_single_layers=2,
      attention_head_dim=8, num_attention_heads=2, joint_attention_dim=40, pooled_projection_dim=16,
      guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4)).eval()
  with torch.no_grad():
    for parameter in model.parameters():
      parameter.add_(0.1 * torch.randn_like(parameter))
  model.save_pretrained(directory)
  return model


def diffusers_prediction(model, latents, sigma, text, pooled, guidance=None, reference=None):
  """diffusers' Flux transformer's velocity for latents [batch, h, w, c] (numpy), packed, with the pipeline's ids;
  with reference latents [batch, h', w', c], FluxKontextPipeline's: their tokens after the image's, ids (1, row,
  column), the image's part of the output."""
  from diffusers import FluxPipeline

  pack = lambda x: FluxPipeline._pack_latents(torch.from_numpy(x).permute(0, 3, 1, 2), *np.take(x.shape, (0, 3, 1, 2)))
  ids = lambda x: FluxPipeline._prepare_latent_image_ids(x.shape[0], x.shape[1] // 2, x.shape[2] // 2, "cpu",
                                                         torch.float32)
  b, h, w, c = latents.shape
  packed, image_ids = pack(latents), ids(latents)
  if reference is not None:
    reference_ids = ids(reference)
    reference_ids[:, 0] = 1
    packed, image_ids = torch.cat([packed, pack(reference)], 1), torch.cat([image_ids, reference_ids])
  with torch.no_grad():
    out = model(packed, torch.as_tensor(text), torch.as_tensor(pooled), torch.as_tensor(sigma), image_ids,
                torch.zeros(text.shape[1], 3), None if guidance is None else torch.as_tensor(guidance)).sample
  out = out[:, :h * w // 4]
  # (_unpack_latents takes pixel sizes and the VAE's factor: latents of h x w are pixels of 2h x 2w at factor 2)
  return FluxPipeline._unpack_latents(out, 2 * h, 2 * w, 2).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["dev", "schnell"])
def test_the_transformer_predicts_what_diffusers_flux_transformer_does(tmp_path, guidance_embeds):
  """FLUX.1 dev's layout (a guidance embedding) and schnell's: loaded from a diffusers directory, a non-square latent
  image's prediction (packed 2 x 2, rotary angles of the pipeline's ids) equals diffusers' to float rounding, also
  with a reference image's tokens beside (FLUX.1 Kontext's); a guided model without a guidance scale and an
  unsupported config are refused, saying why."""
  reference = save_tiny_flux_transformer(tmp_path / "transformer", guidance_embeds)
  ours = flux_transformer.load_diffusers(tmp_path / "transformer")
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 12, 4)).astype(np.float32)
  text, pooled = rng.standard_normal((2, 7, 40)).astype(np.float32), rng.standard_normal((2, 16)).astype(np.float32)
  sigma, guidance = np.array([0.9, 0.2], np.float32), np.array([3.5, 1.0], np.float32) if guidance_embeds else None
  expected = diffusers_prediction(reference, x, sigma, text, pooled, guidance)
  np.testing.assert_allclose(ours(jnp.asarray(x), jnp.asarray(1000 * sigma), jnp.asarray(text), jnp.asarray(pooled),
                                  None if guidance is None else jnp.asarray(guidance)), expected, atol=5e-5)
  if guidance_embeds:
    with pytest.raises(ValueError, match="reads the guidance scale it follows"):
      ours(jnp.asarray(x), jnp.asarray(sigma), jnp.asarray(text), jnp.asarray(pooled))
    # FLUX.1 Kontext's call: a reference image's latents (another size) beside the image's
    image = rng.standard_normal((2, 6, 10, 4)).astype(np.float32)
    with_reference = diffusers_prediction(reference, x, sigma, text, pooled, guidance, image)
    np.testing.assert_allclose(ours(jnp.asarray(x), jnp.asarray(1000 * sigma), jnp.asarray(text), jnp.asarray(pooled),
                                    jnp.asarray(guidance), jnp.asarray(image)), with_reference, atol=5e-5)
    assert np.abs(with_reference - expected).max() > 1e-2
  assert flux_transformer.config_problems({"patch_size": 2, "in_channels": 10, "axes_dims_rope": [2, 2, 2],
                                           "attention_head_dim": 8}) == [
      "patch_size=2: only 1 (every Flux model's: the pipeline packs 2 x 2 latents)",
      "in_channels=10, out_channels=None: a text-to-image Flux maps packed latents (4 x the latent channels) to as "
      "many; FLUX.1 Depth / Canny reads twice as many (a control image's latents beside them), FLUX.1 Fill more (the "
      "known image's latents and a mask)",
      "axes_dims_rope=[2, 2, 2] must sum to attention_head_dim=8"]


def test_flux_shift_follows_the_image_size_as_diffusers_calculate_shift():
  """schedules.resolution_flow_shift is e^mu of diffusers' calculate_shift (Flux's pipelines' dynamic shift), and
  its time shift of t is the exponential one diffusers' scheduler applies."""
  from diffusers import FlowMatchEulerDiscreteScheduler
  from diffusers.pipelines.flux.pipeline_flux import calculate_shift

  for tokens in (256, 1024, 4096, 6000):
    assert schedules.resolution_flow_shift(tokens) == pytest.approx(math.exp(calculate_shift(tokens)), rel=1e-6)
  scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
  scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.1, 4), mu=calculate_shift(1024))
  shift, t = schedules.resolution_flow_shift(1024), np.linspace(1.0, 0.1, 4)
  np.testing.assert_allclose(scheduler.sigmas[:-1].numpy(), shift * t / (1 + (shift - 1) * t), rtol=1e-5)


def save_tiny_flux(root, captions):
  """A FLUX.1 dev checkpoint's folders with tiny random models: transformer/ (save_tiny_flux_transformer),
  text_encoder/ (a 2-layer CLIPTextModel of width 16) and tokenizer/ (CLIP's BPE), text_encoder_2/ (a 1-layer T5
  encoder of width 40) and tokenizer_2/spiece.model, vae/ (a factor-2 VAE with 4 latent channels, Flux's latent
  shift and no quant convolutions) and scheduler/ (flow matching with dynamic shifting, dev's). Returns diffusers'
  FluxPipeline of them."""
  import diffusers
  import transformers

  from diffusion_jax.text import tokenizers

  transformer = save_tiny_flux_transformer(root / "transformer")
  vocab = save_tiny_clip_tokenizer(root / "tokenizer", captions)
  torch.manual_seed(0)
  text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
      max_position_embeddings=16, bos_token_id=vocab - 2, eos_token_id=vocab - 1)).eval()
  text_encoder.save_pretrained(root / "text_encoder")
  (root / "tokenizer_2").mkdir()
  spiece = tokenizers.train_sentencepiece(captions, root / "tokenizer_2" / "spiece", vocab_size=30)
  t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=32, d_model=40, d_kv=8, d_ff=48, num_layers=1,
                                                         num_heads=2, feed_forward_proj="gated-gelu")).eval()
  t5.save_pretrained(root / "text_encoder_2")
  vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                                norm_num_groups=4, sample_size=32, shift_factor=0.1159, scaling_factor=0.3611,
                                use_quant_conv=False, use_post_quant_conv=False).eval()
  vae.save_pretrained(root / "vae")
  scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
  scheduler.save_pretrained(root / "scheduler")
  tokenizer = transformers.CLIPTokenizer(str(root / "tokenizer" / "vocab.json"), str(root / "tokenizer" / "merges.txt"),
                                         model_max_length=16)
  return diffusers.FluxPipeline(scheduler, vae, text_encoder, tokenizer, t5, SentencePieceT5Tokenizer(spiece),
                                transformer)


def test_flux_reads_a_checkpoints_folders_fine_tunes_a_lora_and_samples(tmp_path):
  """configs/flux.py:ROOT reads a FLUX.1 dev checkpoint's folders (flow path shifted by its scheduler's shift 3 in
  training; sampling without classifier-free guidance, the model told guidance 3.5, on a grid shifted by e^mu of the
  samples' tokens, diffusers' calculate_shift, at the training size and another). The text condition is what
  FluxPipeline.encode_prompt makes (T5's states; CLIP's pooled embedding) and the network's prediction its
  transformer's at the flow timestep with the guidance scale. A LoRA of it (and of CLIP) trains only its updates on
  captioned_shapes, describes itself and samples; written in diffusers' layout, the pipeline with it fused (CLIP's
  updates too) encodes the prompts' pooled embedding and predicts what the trained model does, and read back it
  fits, as it does written in kohya's names. The run exported whole (export.py) holds the fused pipeline's
  transformer and CLIP; a single file of it is refused. Told another guidance scale when sampling (--flux_guidance),
  it predicts what the pipeline's transformer does with that scale, and samples otherwise. A second CLIP encoder,
  other latent channels, a missing T5 tokenizer, a negative --flux_guidance, skip-layer guidance (SD3's) and a
  resolution shift out of order are refused by the config check, saying what is wrong."""
  from diffusers.pipelines.flux.pipeline_flux import calculate_shift

  from configs import flux
  from diffusion_jax import lora
  from diffusion_jax.data import captioned_shapes
  from diffusion_jax.text import tokenizers

  pipeline = save_tiny_flux(tmp_path / "flux", [" ".join(captioned_shapes.VOCABULARY)] * 5)
  config = flux.get_config(str(tmp_path / "flux"))
  assert (config.model.flux_path, config.text.t5_encoder_path, config.model.in_channels, config.text.t5_max_length,
          config.diffusion.schedule_params.shift, config.sample.guidance_scale, config.model.flux_guidance) == (
      str(tmp_path / "flux" / "transformer"), str(tmp_path / "flux" / "text_encoder_2"), 4, 512, 3.0, 1.0, 3.5)
  assert (config.sample.flow_shift, config.sample.resolution_shift) == (0.0, (256, 4096, 0.5, 1.15))
  tiny_lora_run(config, tmp_path)
  config.model.lora_text_encoder = True  # (CLIP's: its pooled embedding)
  assert config_checks.problems(config, device_count=8) == []
  # The sampling grid's shift is Flux's for the samples' tokens: 32 px, 16 x 16 latents, 8 x 8 tokens; 64 px, 256
  for size, tokens in ((0, 64), (64, 256)):
    settings = config.sample.copy_and_resolve_references()
    settings.update(height=size, width=size, steps=4)
    shift, t = math.exp(calculate_shift(tokens)), np.linspace(1, 0, 5)[1:-1]
    sigma = shift * t / (1 + (shift - 1) * t)
    np.testing.assert_allclose(sample.sampling_logsnr(config, settings)[1:-1], 2 * np.log((1 - sigma) / sigma),
                               rtol=1e-4)
  bad = config.copy_and_resolve_references()
  bad.text.second_encoder_path = str(tmp_path / "flux" / "text_encoder")
  assert "Flux's transformer reads a CLIP text encoder's pooled embedding and a T5's states" in " ".join(
      config_checks.problems(bad, device_count=8))
  bad = config.copy_and_resolve_references()
  bad.model.in_channels, bad.text.spiece_path, bad.sample.resolution_shift = 3, "", (4096, 256, 0.5, 1.15)
  bad.sample.flux_guidance, bad.sample.skip_layers = -2.0, (0,)
  found = " ".join(config_checks.problems(bad, device_count=8))
  for problem in ("model.in_channels=3: Flux's transformer diffuses latents of 4 channels",
                  "sample.flux_guidance=-2.0 must be >= 0 (or -1: model.flux_guidance)",
                  "sample.skip_layers=0: skip-layer guidance leaves blocks of SD3's transformer out; this model is no "
                  "SD3",
                  "text.t5_encoder_path reads T5's ids: set text.spiece_path",
                  "sample.resolution_shift=(4096, 256, 0.5, 1.15): (base_tokens, max_tokens, base_shift, max_shift), "
                  "base_tokens < max_tokens"):
    assert problem in found, found

  weights, graphdef = trained_lora_run(config, tmp_path, "flux", (
      f"for a model: Flux's transformer of {tmp_path / 'flux' / 'transformer'}",
      # 2 double blocks' 8 attention projections, 2 single blocks' 3; 2 x 4 feed-forward layers, 2 x 2 single-block MLP
      "joint attention: 22 layers", "feed-forward: 12 layers"))

  # The condition and the prediction of the base weights (the LoRA's updates zeroed) and of the trained ones,
  # against the pipeline's, then with the LoRA written in diffusers' layout fused into it
  prompts = ["a large red circle at the top left", "two small blue squares"]
  ids, mask = tokenizers.from_config(config)(prompts)
  assert ids.shape == (2, 16 + 8) and mask.shape == (2, 8)
  latents = np.random.default_rng(0).standard_normal((2, 16, 16, 4)).astype(np.float32)
  sigma = 0.7
  logsnr = jnp.full((2,), 2 * np.log((1 - sigma) / sigma), jnp.float32)
  run = nnx.jit(lambda model: (lambda text: (text, model(latents, logsnr, text, mask)))(model.encode(ids, mask)))
  text, prediction = run(nnx.merge(graphdef, jax.tree.map(jnp.zeros_like, weights.params), weights.frozen))
  trained_text, trained_prediction = run(nnx.merge(graphdef, weights.params, weights.frozen))
  with torch.no_grad():
    expected, pooled, _ = pipeline.encode_prompt(prompts, None, device="cpu", max_sequence_length=8)
  expected, pooled = expected.numpy(), pooled.numpy()
  np.testing.assert_allclose(text[..., :40], expected, atol=2e-5)
  np.testing.assert_allclose(text[:, 0, 40:], pooled, atol=2e-5)
  assert nnx.merge(graphdef, weights.params, weights.frozen).token_width == 40  # (where a text-embedding cache stores
  # the pooled embedding apart)
  theirs = lambda expected, pooled, guidance=3.5: diffusers_prediction(
      pipeline.transformer, latents, np.full(2, sigma), expected, pooled, np.full(2, guidance))
  np.testing.assert_allclose(prediction, theirs(expected, pooled), atol=1e-4)
  # Told another guidance scale when sampling (sample --flux_guidance), the model predicts what diffusers' does with
  # it, and the samples change
  told = nnx.jit(lambda model: model(latents, logsnr, model.encode(ids, mask), mask, flux_guidance=1.5))
  np.testing.assert_allclose(told(nnx.merge(graphdef, jax.tree.map(jnp.zeros_like, weights.params), weights.frozen)),
                             theirs(expected, pooled, 1.5), atol=1e-4)
  sample.run(tmp_path / "run", {"steps": 2, "flux_guidance": 1.5}, output_dir=tmp_path / "told")
  told_image, default_image = (media.read_image(tmp_path / folder / "p000_00.png").astype(np.float32)
                               for folder in ("told", "out"))
  assert np.abs(told_image - default_image).max() > 0
  assert media.read_provenance(tmp_path / "told" / "p000_00.png")["flux_guidance"] == "1.5"
  lora.export(tmp_path / "run", tmp_path / "diffusers.safetensors", use_ema=False, layout="diffusers")
  pipeline.load_lora_weights(str(tmp_path / "diffusers.safetensors"))
  pipeline.fuse_lora(components=["transformer", "text_encoder"])  # (Flux's default fuses the transformer alone)
  with torch.no_grad():
    expected, pooled, _ = pipeline.encode_prompt(prompts, None, device="cpu", max_sequence_length=8)
  assert np.abs(trained_text[:, 0, 40:] - text[:, 0, 40:]).max() > 1e-3  # (CLIP's LoRA moved the pooled embedding)
  np.testing.assert_allclose(trained_text[:, 0, 40:], pooled.numpy(), atol=2e-5)
  assert np.abs(trained_prediction - prediction).max() > 1e-2  # (the LoRA changed the prediction)
  np.testing.assert_allclose(trained_prediction, theirs(expected.numpy(), pooled.numpy()), atol=1e-4)
  lora.check([lora.read(str(tmp_path / "diffusers.safetensors"))], config)  # (read back: 'transformer/' is Flux's)
  exported_run_holds_the_fused_pipeline(tmp_path / "run", pipeline, ("transformer", "text_encoder", "vae"))
  with pytest.raises(ValueError, match="--single_file: single files are written of Stable Diffusion 1.x and SDXL "
                                       "roots; this is a 'flux' model's"):
    export.export(tmp_path / "run", tmp_path / "merged", single=tmp_path / "flux.safetensors")
  assert not (tmp_path / "merged").exists()
  # Written in kohya's names (fused layers' parts stacked), read back: every layer's update (a @ b) as trained
  lora.export(tmp_path / "run", tmp_path / "kohya.safetensors", use_ema=False, layout="kohya")
  product = lambda updates: {k.removesuffix("/lora_a"): updates[k] @ updates[k[:-1] + "b"] for k in updates
                             if k.endswith("/lora_a")}
  trained, written = (product(lora.read(str(tmp_path / f"{name}.safetensors")).updates)
                      for name in ("adapter", "kohya"))
  assert written.keys() == trained.keys() and any(k.startswith("text_encoder/clip/") for k in written)
  for key, update in trained.items():
    np.testing.assert_allclose(written[key], update, atol=1e-6, err_msg=key)
  # ... and in BFL's own names (no alpha; CLIP's in kohya's), read back: the same updates
  import safetensors.numpy

  lora.export(tmp_path / "run", tmp_path / "bfl.safetensors", use_ema=False, layout="bfl")
  keys = safetensors.numpy.load_file(tmp_path / "bfl.safetensors").keys()
  assert "diffusion_model.single_blocks.0.linear1.lora_A.weight" in keys and not any("alpha" in k for k in keys
                                                                                      if "diffusion_model" in k)
  written = product(lora.read(str(tmp_path / "bfl.safetensors")).updates)
  assert written.keys() == trained.keys()
  for key, update in trained.items():
    np.testing.assert_allclose(written[key], update, atol=1e-6, err_msg=key)


def test_flux_dev_has_diffusers_parameter_count():
  """FLUX.1 dev's transformer config (diffusers' defaults and a guidance embedding; schnell's is the same without
  it): our module's parameter count (shapes only, nothing allocated) is diffusers' (built on PyTorch's meta device),
  11.9 billion."""
  import diffusers

  with torch.device("meta"):
    expected = sum(p.numel() for p in diffusers.FluxTransformer2DModel(guidance_embeds=True).parameters())
  ours = nnx.eval_shape(lambda: flux_transformer.FluxTransformer({"guidance_embeds": True}, rngs=init_rngs.seeded(0)))
  assert sum(x.size for x in jax.tree.leaves(nnx.state(ours, nnx.Param))) == expected > 1.1e10


def test_flux_loras_in_kohyas_and_bfls_names_fuse_as_diffusers_fuses_them(tmp_path):
  """A Flux LoRA in kohya's names (a double block's fused image and text qkv, output projection, MLP and text
  modulation; a single block's linear2; alpha / rank scaling) fused at 0.7 into the transformer predicts what
  diffusers' does with the file loaded by FluxPipeline.load_lora_weights and fused at 0.7; the same tensors in BFL's
  names (ComfyUI's) read as the same updates; a tensor of no Flux layer is refused, naming it; a single block's fused
  linear1 splits into its query, key, value and MLP input updates, and the final modulation's halves are swapped
  into diffusers' order. Written in kohya's names, updates of some of a fused layer's parts (the rest zero), of the
  final modulation and of CLIP read back as they were."""
  import diffusers
  import safetensors.torch

  from diffusion_jax import flux_lora, lora

  reference = save_tiny_flux_transformer(tmp_path / "transformer")
  dim, rank, rng = 16, 4, np.random.default_rng(0)
  shapes = {"double_blocks_0_img_attn_qkv": (dim, 3 * dim), "double_blocks_1_txt_attn_qkv": (dim, 3 * dim),
            "double_blocks_0_img_attn_proj": (dim, dim), "double_blocks_1_img_mlp_0": (dim, 4 * dim),
            "double_blocks_0_txt_mod_lin": (dim, 6 * dim), "single_blocks_0_linear2": (5 * dim, dim)}
  tensors = {}
  for layer, (inputs, outputs) in shapes.items():
    tensors[f"lora_unet_{layer}.lora_down.weight"] = torch.from_numpy(rng.normal(size=(rank, inputs)).astype(
        np.float32) * 0.3)
    tensors[f"lora_unet_{layer}.lora_up.weight"] = torch.from_numpy(rng.normal(size=(outputs, rank)).astype(
        np.float32) * 0.3)
    tensors[f"lora_unet_{layer}.alpha"] = torch.tensor(2.0)
  safetensors.torch.save_file(tensors, tmp_path / "kohya.safetensors")
  pipeline = diffusers.FluxPipeline(None, None, None, None, None, None, reference)
  pipeline.load_lora_weights(str(tmp_path / "kohya.safetensors"))
  pipeline.fuse_lora(lora_scale=0.7)

  adapter = lora.read(f"{tmp_path / 'kohya.safetensors'}:0.7")
  assert len(adapter.updates) == 2 * (3 + 3 + 1 + 1 + 1 + 1)  # the fused qkv layers split into their parts
  ours = flux_transformer.load_diffusers(tmp_path / "transformer")
  graphdef, state = nnx.split(ours)
  fused = lora.fuse({"flux": nnx.to_pure_dict(state)}, [adapter])["flux"]
  nnx.replace_by_pure_dict(state, fused)
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 8, 12, 4)).astype(np.float32)
  text, pooled = rng.standard_normal((2, 7, 40)).astype(np.float32), rng.standard_normal((2, 16)).astype(np.float32)
  sigma, guidance = np.array([0.9, 0.2], np.float32), np.array([3.5, 1.0], np.float32)
  expected = diffusers_prediction(pipeline.transformer, x, sigma, text, pooled, guidance)
  np.testing.assert_allclose(nnx.merge(graphdef, state)(jnp.asarray(x), jnp.asarray(1000 * sigma), jnp.asarray(text),
                                                        jnp.asarray(pooled), jnp.asarray(guidance)), expected,
                             atol=5e-5)
  unfused = diffusers_prediction(save_tiny_flux_transformer(tmp_path / "again"), x, sigma, text, pooled, guidance)
  assert np.abs(expected - unfused).max() > 1e-2  # (the LoRA moved the prediction)

  inner = {name.replace(".", "_"): name for name in (*flux_lora.DOUBLE, *flux_lora.SINGLE, *flux_lora.OUTER)}
  bfl_name = lambda key: "diffusion_model." + re.sub(  # kohya's 'double_blocks_0_img_attn_qkv' -> BFL's dots
      r"^(double_blocks|single_blocks)_(\d+)_(\w+)$", lambda m: f"{m[1]}.{m[2]}.{inner[m[3]]}",
      key.removeprefix("lora_unet_").partition(".")[0])
  bfl = {bfl_name(k) + "." + k.partition(".")[2].replace("lora_down", "lora_A").replace("lora_up", "lora_B"): v.numpy()
         for k, v in tensors.items()}
  assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight" in bfl
  read = flux_lora.from_file(bfl)
  assert read.keys() == adapter.updates.keys()
  for key, value in read.items():
    np.testing.assert_allclose(value, adapter.updates[key], atol=1e-6)
  with pytest.raises(ValueError, match="1 tensors are not low-rank updates .* e.g. lora_unet_double_blocks_0_nothing"):
    flux_lora.from_file(bfl | {"lora_unet_double_blocks_0_nothing.lora_down.weight": np.zeros((rank, dim))})
  # Two layers diffusers' kohya reader does not take at this size: a single block's linear1 (split at the real
  # model's widths only): its query, key, value and MLP input rows, dim, dim, dim and 4 dim, each with the shared
  # down; and the final modulation (dropped): its (shift, scale) halves as diffusers' (scale, shift)
  down, up = rng.normal(size=(rank, dim)).astype(np.float32), rng.normal(size=(7 * dim, rank)).astype(np.float32)
  final_up = rng.normal(size=(2 * dim, rank)).astype(np.float32)
  split = flux_lora.from_file({"lora_unet_single_blocks_1_linear1.lora_down.weight": down,
                               "lora_unet_single_blocks_1_linear1.lora_up.weight": up,
                               "lora_unet_final_layer_adaLN_modulation_1.lora_down.weight": down,
                               "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight": final_up,
                               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": down,
                               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": up[:dim]})
  assert "text_encoder/clip/text_model/encoder/layers/0/self_attn/q_proj_lora/lora_a" in split  # (Flux's CLIP)
  rows = {"single_transformer_blocks/1/attn/to_q": up[:dim], "single_transformer_blocks/1/attn/to_k": up[dim:2 * dim],
          "single_transformer_blocks/1/attn/to_v": up[2 * dim:3 * dim], "single_transformer_blocks/1/proj_mlp":
          up[3 * dim:], "norm_out/linear": np.concatenate([final_up[dim:], final_up[:dim]])}
  for layer, part in rows.items():
    module = f"flux/{layer}_lora"
    np.testing.assert_allclose(split[f"{module}/lora_a"] @ split[f"{module}/lora_b"], (part @ down).T, atol=1e-5)

  # Written in kohya's names: a query and key but no value (the fused qkv's third rows zero), a single block's MLP
  # input and value, the final modulation and CLIP's query, each read back as it was
  updates = {}
  shapes = {"flux/transformer_blocks/0/attn/to_q_lora": (dim, dim),
            "flux/transformer_blocks/0/attn/to_k_lora": (dim, dim),
            "flux/single_transformer_blocks/1/proj_mlp_lora": (dim, 4 * dim),
            "flux/single_transformer_blocks/1/attn/to_v_lora": (dim, dim), "flux/norm_out/linear_lora": (dim, 2 * dim),
            "flux/transformer_blocks/0/ff/net_lora/2": (4 * dim, dim),
            "text_encoder/clip/text_model/encoder/layers/0/self_attn/q_proj_lora": (dim, dim)}
  for module, (inputs, outputs) in shapes.items():
    updates[f"{module}/lora_a"] = rng.normal(size=(inputs, rank)).astype(np.float32)
    updates[f"{module}/lora_b"] = rng.normal(size=(rank, outputs)).astype(np.float32)
  written = flux_lora.to_kohya(updates)
  assert written["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (2 * rank, dim)
  back = flux_lora.from_file(written)
  for key in back:
    if key.endswith("/lora_a"):
      module = key.removesuffix("/lora_a")
      given = (updates[key] @ updates[module + "/lora_b"] if key in updates else 0)
      np.testing.assert_allclose(back[key] @ back[module + "/lora_b"], given, atol=1e-5, err_msg=key)
  assert {k for k in back if k.endswith("/lora_a")} >= {k for k in updates if k.endswith("/lora_a")}


def test_a_flux_fill_checkpoint_reads_what_diffusers_fill_pipeline_gives_it_and_completes_images(tmp_path):
  """A FLUX.1 Fill checkpoint (its transformer reads 48 packed channels: the latents, the known image's latents and
  where to generate, each latent pixel's 2 x 2 pixels of the tiny VAE): configs/flux.py:ROOT diffuses its 4 latent
  channels. For an image and a keep mask, its condition is what FluxFillPipeline.prepare_mask_latents makes of them
  (packed as the pipeline packs it) and its prediction the pipeline's transformer's of the latents beside it; its
  training loss reads random keep masks; it completes a masked image keeping the known pixels exactly and samples
  from text alone. A latent cache is refused."""
  import diffusers

  from configs import flux
  from diffusion_jax.data import captioned_shapes

  pipeline = save_tiny_flux(tmp_path / "flux", [" ".join(captioned_shapes.VOCABULARY)] * 5)
  fill = save_tiny_flux_transformer(tmp_path / "flux" / "transformer", in_channels=48)
  pipeline = diffusers.FluxFillPipeline(pipeline.scheduler, pipeline.vae, pipeline.text_encoder, pipeline.tokenizer,
                                        pipeline.text_encoder_2, pipeline.tokenizer_2, fill)
  config = flux.get_config(str(tmp_path / "flux"))
  assert config.model.in_channels == 4
  config.model.dtype, config.text.t5.dtype = "float32", "float32"
  config.text.update(max_length=16, t5_max_length=8)
  state, graphdef, images, keep, latents, ids, mask = inpainting_inputs(
      config, tmp_path, "FLUX.1 Fill's transformer reads the latents of each training image with a masked region")
  sigma = 0.7
  logsnr = jnp.full((2,), 2 * np.log((1 - sigma) / sigma), jnp.float32)

  @jax.jit
  def condition_and_prediction(params, frozen):
    model = nnx.merge(graphdef, params, frozen)
    condition = model.inpainting_condition(images, keep)
    text = model.encode(ids, mask)
    return condition, text, model(latents, logsnr, text, mask, condition=condition)

  condition, text, prediction = condition_and_prediction(state.params, state.frozen)
  as_torch = lambda x: torch.tensor(np.asarray(x).transpose(0, 3, 1, 2))
  with torch.no_grad():
    known = pipeline.vae.encode(as_torch(images * keep)).latent_dist.mean
    generated, masked = pipeline.prepare_mask_latents(1 - as_torch(keep), known, 2, 4, 1, 32, 32, torch.float32,
                                                      "cpu", None)
  pack = lambda x: diffusers.FluxPipeline._pack_latents(as_torch(x), 2, x.shape[-1], 16, 16).numpy()
  np.testing.assert_allclose(pack(condition["masked_latents"]), masked.numpy(), atol=2e-5)
  np.testing.assert_array_equal(pack(condition["mask"]), generated.numpy())
  inputs = np.concatenate([latents, condition["masked_latents"], condition["mask"]], -1)
  expected = diffusers_prediction(pipeline.transformer, inputs, np.full(2, sigma), np.asarray(text[..., :40]),
                                  np.asarray(text[:, 0, 40:]), np.full(2, 3.5))
  np.testing.assert_allclose(prediction, expected, atol=1e-4)

  assert_trains_and_completes(config, graphdef, state, images, ids, mask)


def test_flux_depth_canny_samples_what_diffusers_control_pipeline_samples_from_a_control_image(tmp_path):
  """A FLUX.1 Depth / Canny checkpoint (its transformer reads twice the channels it predicts: a control image's
  latents beside the latents): the sampling job reads it as it is (sample --config) and each prompt's --init_image
  as its control image, and makes, from the same starting noise, the image FluxControlPipeline makes given that
  image's latents (4 steps, guidance 3.5, the dynamic shift; the posterior's mean, which the pipeline would draw
  from), to a level of 8 bits; another control image makes another image. A prompt without one, a mask, a strength
  and an inverted start are refused, as are evaluating it and the Kontext flag on it, and training it without
  control images. Given them as a folder's references (data.reference_key), each example's training loss reads its
  own (another control image, another loss); the evaluation job samples beside the held-out pairs' control images
  (psnr_target: against the images they pair with); training samples without held-out pairs to read are
  refused."""
  import diffusers
  import PIL.Image

  from configs import flux
  from diffusion_jax import edit_inputs, evaluate, train
  from diffusion_jax.data import captioned_shapes
  from diffusion_jax.models import text_to_image

  pipeline = save_tiny_flux(tmp_path / "control", [" ".join(captioned_shapes.VOCABULARY)] * 5)
  transformer = save_tiny_flux_transformer(tmp_path / "control" / "transformer", in_channels=32)
  config = flux.get_config(str(tmp_path / "control"))
  config.model.update(dtype="float32", remat=False)
  config.text.update(max_length=16, t5_max_length=8)
  config.text.t5.dtype = "float32"
  config.data.update(dataset="captioned_shapes", resolution=32, data_dir=str(tmp_path / "tfds"))
  config.sample.update(steps=4, prompts=("a large red circle",))
  assert config_checks.problems(config, device_count=8) == [] and text_to_image.flux_control(config)
  controls = [np.random.default_rng(seed).integers(0, 256, (32, 32, 3), np.uint8) for seed in (0, 1)]
  for k, control in enumerate(controls):
    PIL.Image.fromarray(control).save(tmp_path / f"control{k}.png")
    sample.run(None, {}, output_dir=tmp_path / f"job{k}", init_image=tmp_path / f"control{k}.png", config=config)
  ours = [media.read_image(tmp_path / f"job{k}" / "p000_00.png").astype(np.float32) for k in (0, 1)]

  noise = np.asarray(jax.random.normal(sample.example_keys([config.sample.seed], 1)[0], (16, 16, 4)))
  pack = lambda x: diffusers.FluxPipeline._pack_latents(x, 1, 4, 16, 16)
  with torch.no_grad():
    control = pipeline.vae.encode(torch.tensor(controls[0] / 127.5 - 1.0).permute(2, 0, 1)[None].float()).latent_dist
  control_latents = pack((control.mean - pipeline.vae.config.shift_factor) * pipeline.vae.config.scaling_factor)
  theirs = diffusers.FluxControlPipeline(pipeline.scheduler, pipeline.vae, pipeline.text_encoder, pipeline.tokenizer,
                                         pipeline.text_encoder_2, pipeline.tokenizer_2, transformer)(
      prompt=list(config.sample.prompts), control_image=control_latents, height=32, width=32, num_inference_steps=4,
      guidance_scale=3.5, latents=pack(torch.from_numpy(noise).permute(2, 0, 1)[None]), max_sequence_length=8,
      output_type="np").images[0]
  np.testing.assert_allclose(ours[0], np.round(theirs * 255), atol=2)
  assert np.abs(ours[0] - ours[1]).max() > 10

  entry = {"prompt": "a large red circle", "init_image": str(tmp_path / "control0.png")}
  inverted = config.sample.copy_and_resolve_references()
  inverted.edit_noise = "inversion"
  for entries, sample_config, problem in (
      ([entry, {"prompt": "two squares"}], config.sample,
       r"FLUX.1 Depth / Canny samples from its control image \(a depth map, an edge map\): give each prompt one .*"
       r"\['two squares'\]"),
      ([entry | {"strength": 0.5}], config.sample, "reads --init_image as its control image .* not an image to edit"),
      ([entry], inverted, "--edit_noise='inversion': FLUX.1 Depth / Canny samples from noise beside")):
    with pytest.raises(ValueError, match=problem):
      edit_inputs.read(config, sample_config, entries, 0)
  with pytest.raises(ValueError, match="FLUX.1 Depth / Canny's transformer, which trains on images paired with "
                                       "control images .*: give them as data.reference_key"):
    train.train_and_evaluate(config, tmp_path / "run")
  with pytest.raises(ValueError, match="FLUX.1 Depth / Canny samples from control images, which evaluation's"):
    evaluate.run(tmp_path / "eval", config=config)
  assert not (tmp_path / "run").exists() and not (tmp_path / "eval").exists()
  # Trained on (image, control image) pairs, a folder's references: the loss reads each example's control image
  import json

  from diffusion_jax.data import pipeline
  from diffusion_jax.text import tokenizers

  pairs, lines = tmp_path / "pairs", []
  pairs.mkdir()
  for i in range(10):  # (the last 2 held out)
    for name, picture in zip(("image", "control"), np.random.default_rng(i).integers(0, 256, (2, 32, 32, 3),
                                                                                     np.uint8)):
      PIL.Image.fromarray(picture).save(pairs / f"{name}{i}.png")
    lines.append(json.dumps({"file": f"image{i}.png", "caption": "a red circle", "reference": f"control{i}.png"}))
  (pairs / "captions.jsonl").write_text("\n".join(lines[:8]))
  (pairs / "held_out.jsonl").write_text("\n".join(lines[8:]))
  paired = config.copy_and_resolve_references()
  paired.data.update(dataset="folder", folder=str(pairs), captions_file=str(pairs / "captions.jsonl"),
                     eval_captions_file=str(pairs / "held_out.jsonl"), reference_key="reference")
  paired.train.update(batch_size=8, sample_every=0, sample_at_end=False)
  assert config_checks.problems(paired, device_count=8) == []
  weights, graphdef, _ = sample.load_pretrained(paired)
  batch = next(iter(pipeline.make_loader(paired.data, pipeline.data_source(paired.data, "train"),
                                         tokenizers.from_config(paired), 8, seed=0)))
  loss = jax.jit(lambda batch: train.make_loss_fn(paired, graphdef)(weights.params, weights.frozen, batch,
                                                                    jax.random.PRNGKey(0), None)[1][0])
  assert np.abs(loss(batch) - loss(batch | {"reference": batch["reference"][::-1]})).min() > 0
  # The evaluation job samples beside the held-out pairs' control images: its held-out loss reads them as trained
  [line] = evaluate.run(tmp_path / "paired_eval", config=paired, num_prompts=2, heldout_examples=2,
                        combination_prompts=0)
  assert np.isfinite([line[k] for k in ("psnr_target", "fid_random_conv", "heldout_loss")]).all()
  paired.train.sample_at_end = True  # (training samples read held-out control images, which this folder lacks)
  paired.data.eval_captions_file = ""
  assert "train.sample_every, train.sample_at_end: FLUX.1 Depth / Canny's training samples read held-out control" in (
      " ".join(config_checks.problems(paired, device_count=8)))
  config.model.flux_kontext = True
  assert "this transformer is FLUX.1 Depth / Canny's (in_channels twice out_channels), which reads a control" in (
      " ".join(config_checks.problems(config, device_count=8)))


def test_flux_kontext_samples_what_diffusers_kontext_pipeline_samples_beside_a_reference_image(tmp_path):
  """configs/flux.py of a FLUX.1 Kontext root (model_index.json's FluxKontextPipeline) sets model.flux_kontext; its
  sampler reads an --init_image as a reference image (its latents' tokens beside the sample's, ids (1, row,
  column)) and makes, from the same starting noise, the images FluxKontextPipeline makes with that image (4 steps,
  guidance 3.5, the dynamic shift), to a level of 8 bits, for a square reference and for a 2:1 one at its own size
  (the pipeline's default resize to the resolution Kontext trained at: the reference read as its image processor
  makes it); without the reference they differ. The sampling job makes them from the checkpoint's folders as they
  are (sample --config). A mask, a prompt's
  strength or an inverted start is refused for it, and the flag on another backbone or on FLUX.1 Fill. A LoRA of it
  trains on a folder of edit pairs (folder_dataset --references, data.reference_key): each example's loss reads its
  reference (another reference, another loss), and its training samples follow the held-out pairs' references (two
  of one caption, from one noise, differ); a reference key without model.flux_kontext, or another key on a folder,
  is refused."""
  import json

  import diffusers
  import PIL.Image

  from configs import flux
  from diffusion_jax import edit_inputs, sharding, train
  from diffusion_jax.data import captioned_shapes
  from diffusion_jax.text import tokenizers

  pipeline = save_tiny_flux(tmp_path / "kontext", [" ".join(captioned_shapes.VOCABULARY)] * 5)
  (tmp_path / "kontext" / "model_index.json").write_text(json.dumps({"_class_name": "FluxKontextPipeline"}))
  config = flux.get_config(str(tmp_path / "kontext"))
  assert config.model.flux_kontext and not flux.get_config(str(tmp_path / "missing")).model.flux_kontext
  config.model.update(dtype="float32", remat=False)
  config.text.update(max_length=16, t5_max_length=8)
  config.text.t5.dtype = "float32"
  config.data.update(dataset="captioned_shapes", resolution=32, data_dir=str(tmp_path / "tfds"))
  config.sample.steps = 4
  assert config_checks.problems(config, device_count=8) == []
  mesh = sharding.make_mesh(config.mesh)
  state, graphdef = train.init_state(config, mesh)  # (the checkpoint's weights: nothing is trained)
  image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)
  prompts, tokenizer = ["a large red circle"], tokenizers.from_config(config)
  wide = np.random.default_rng(1).integers(0, 256, (25, 50, 3), np.uint8)  # 2:1
  for file, picture in (("image.png", image), ("wide.png", wide), ("tiny.png", wide[:3])):
    PIL.Image.fromarray(picture).save(tmp_path / file)
  entry = {"prompt": prompts[0], "init_image": str(tmp_path / "image.png")}

  def reference(resize, file):  # the reference image sampling reads for --init_image=file
    sample_config = config.sample.copy_and_resolve_references()
    sample_config.kontext_resize = resize
    [(picture, _)] = edit_inputs.read(config, sample_config, [entry | {"init_image": str(tmp_path / file)}],
                                      0).values()
    return picture

  kontext = diffusers.FluxKontextPipeline(**pipeline.components)
  # The pipeline's default resize: the resolution Kontext trained at nearest 2:1, Lanczos (this tiny autoencoder's
  # tokens are 4 pixels a side, so the sampling below reads references at their own size)
  np.testing.assert_array_equal(reference("preferred", "wide.png"), np.asarray(
      kontext.image_processor.resize(PIL.Image.fromarray(wide), 720, 1456)))
  assert reference("own", "image.png").shape == (32, 32, 3) and reference("own", "wide.png").shape == (24, 48, 3)
  with pytest.raises(ValueError, match="is 50 x 3 pixels: a FLUX.1 Kontext reference kept at its own size"):
    reference("own", "tiny.png")  # under one token high
  given = lambda images: dict(init_images=images, keep_masks=np.zeros(images.shape[:3], bool)) if len(images) else {}
  ours, ours_wide, without = (
      sample.generate(config, graphdef, state.params, state.frozen, tokenizer, prompts, config.sample, mesh,
                      **given(picture))[:, 0] for picture in (image[None], reference("own", "wide.png")[None], ()))
  noise = np.asarray(jax.random.normal(sample.example_keys([config.sample.seed], 1)[0], (16, 16, 4)))
  latents = diffusers.FluxPipeline._pack_latents(torch.from_numpy(noise).permute(2, 0, 1)[None], 1, 4, 16, 16)
  theirs, theirs_wide = (
      kontext(prompt=prompts, image=PIL.Image.fromarray(picture), height=32, width=32, num_inference_steps=4,
              guidance_scale=3.5, latents=latents, max_sequence_length=8, output_type="np", max_area=32 * 32,
              _auto_resize=False).images for picture in (image, wide))
  np.testing.assert_allclose(ours.astype(np.float32), np.round(theirs * 255), atol=2)
  np.testing.assert_allclose(ours_wide.astype(np.float32), np.round(theirs_wide * 255), atol=2)
  assert np.abs(ours.astype(np.float32) - without).max() > 10
  # The sampling job reads the checkpoint's folders as they are (sample --config, no training): the same image
  job = config.copy_and_resolve_references()
  job.sample.update(prompts=tuple(prompts), kontext_resize="own")
  with pytest.raises(ValueError, match="takes no workdir and needs an output directory"):
    sample.run(None, {}, config=job)
  sample.run(None, {}, output_dir=tmp_path / "job", init_image=tmp_path / "image.png", config=job)
  np.testing.assert_allclose(media.read_image(tmp_path / "job" / "p000_00.png").astype(np.float32),
                             ours[0].astype(np.float32), atol=1)
  assert media.read_provenance(tmp_path / "job" / "p000_00.png")["checkpoint_step"] == (
      "none: the pretrained checkpoints")
  for extra in ({"mask": str(tmp_path / "image.png")}, {"strength": 0.5}):
    with pytest.raises(ValueError, match="reads --init_image as a reference image to follow"):
      edit_inputs.read(config, config.sample, [entry | extra], 0)
  inverted = config.sample.copy_and_resolve_references()
  inverted.edit_noise = "inversion"
  with pytest.raises(ValueError, match="--edit_noise='inversion': FLUX.1 Kontext samples from noise"):
    edit_inputs.read(config, inverted, [entry], 0)
  bad = config.copy_and_resolve_references()
  bad.model.backbone = "dit"
  assert "model.flux_kontext: FLUX.1 Kontext's reference images are read by Flux's transformer" in " ".join(
      config_checks.problems(bad, device_count=8))

  # A LoRA of it trains on edit pairs (folder_dataset --references, data.reference_key): its loss reads each image's
  # reference, beside which the model predicts
  from diffusion_jax import train
  from diffusion_jax.data import folder_dataset, pipeline

  pairs, rng, lines = tmp_path / "pairs", np.random.default_rng(2), []
  pairs.mkdir()
  for i in range(10):  # (the last 2 held out, their references black and white)
    edited, source = rng.integers(0, 256, (2, 32, 32, 3), np.uint8)
    source = source if i < 8 else np.full_like(source, 255 * (i - 8))
    for name, picture in (("edited", edited), ("source", source)):
      PIL.Image.fromarray(picture).save(pairs / f"{name}{i}.png")
    lines.append(json.dumps({"file": f"edited{i}.png", "caption": "a red circle", "reference": f"source{i}.png"}))
  (pairs / "captions.jsonl").write_text("\n".join(lines[:8]))
  (pairs / "held_out.jsonl").write_text("\n".join(lines[8:]))
  assert folder_dataset.main([f"--images={pairs}", f"--captions={pairs / 'captions.jsonl'}",
                              f"--eval_captions={pairs / 'held_out.jsonl'}", f"--data_dir={tmp_path / 'tfds'}",
                              "--references"]) == 0
  edits = config.copy_and_resolve_references()
  tiny_lora_run(edits, tmp_path)
  edits.data.update(dataset="folder", folder=str(pairs), captions_file=str(pairs / "captions.jsonl"),
                    eval_captions_file=str(pairs / "held_out.jsonl"), reference_key="reference")
  assert config_checks.problems(edits, device_count=8) == []
  train.train_and_evaluate(edits, tmp_path / "edits")
  _, weights, graphdef, step, _ = sample.load_checkpoint(tmp_path / "edits", use_ema=False)
  assert step == 2
  batch = next(iter(pipeline.make_loader(edits.data, pipeline.data_source(edits.data, "train"),
                                         tokenizers.from_config(edits), 8, seed=0)))
  loss = jax.jit(lambda batch: train.make_loss_fn(edits, graphdef)(weights.params, weights.frozen, batch,
                                                                   jax.random.PRNGKey(0), None)[1][0])
  assert np.abs(loss(batch) - loss(batch | {"reference": batch["reference"][::-1]})).min() > 0
  # Its training samples follow the held-out references: two pairs of one caption, sampled from one noise, differ
  edits.sample.prompts = ("one", "two")  # (as many samples as prompts; theirs are the held-out captions)
  grid = sample.write_training_samples(edits, weights, graphdef, 2, tmp_path / "edits")
  records = [json.loads(line) for line in (grid.parent / "manifest.jsonl").read_text().splitlines()]
  assert [r["prompt"] for r in records] == ["a red circle"] * 2
  first, second = (media.read_image(grid.parent / r["file"]).astype(np.float32) for r in records)
  assert np.abs(first - second).max() > 2  # (the same noise and prompt: without the references, the same image)
  for field, value, problem in (("model.flux_kontext", False, "reference images are read by FLUX.1 Kontext"),
                                ("data.reference_key", "source", "a folder of images holds its edit pairs' "
                                                                 "references as 'reference'")):
    bad = edits.copy_and_resolve_references()
    bad.update_from_flattened_dict({field: value})
    assert problem in " ".join(config_checks.problems(bad, device_count=8))


def test_flux_redux_samples_what_diffusers_samples_from_an_images_redux_tokens(tmp_path):
  """configs/flux.py with model.flux_redux_path (a FLUX.1 Redux root: SigLIP's image encoder, its image processor,
  the Redux embedder) reads an --init_image as an image to vary: its SigLIP states projected to T5's width follow the
  prompt's T5 states, as FluxPriorReduxPipeline appends them, and the sampling job makes, from the same noise, the
  image FluxPipeline makes from those embeddings (4 steps, guidance 3.5, the dynamic shift; within 2 of 255 levels);
  another image, scaled (--redux_prompt_scale, --redux_pooled_scale: FluxPriorReduxPipeline's prompt_embeds_scale
  and pooled_prompt_embeds_scale), what it makes of that image's embeddings so scaled. Refused by name:
  classifier-free guidance with it, a mask, an embedder of another width, a Kontext transformer with it, a root
  without its parts, its scales without it. The tokens are the pipeline's image_embeds (1e-5)."""
  import diffusers
  import PIL.Image
  import transformers
  from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder

  from configs import flux
  from diffusion_jax import edit_inputs
  from diffusion_jax.data import captioned_shapes

  pipeline = save_tiny_flux(tmp_path / "flux", [" ".join(captioned_shapes.VOCABULARY)] * 5)
  root = tmp_path / "redux"
  torch.manual_seed(0)
  encoder = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
      hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
      patch_size=8)).eval()
  encoder.save_pretrained(root / "image_encoder")
  processor = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
  processor.save_pretrained(root / "feature_extractor")
  embedder = ReduxImageEncoder(redux_dim=16, txt_in_features=40).eval()
  embedder.save_pretrained(root / "image_embedder")
  prompt = "a large red circle"
  config = flux.get_config(str(tmp_path / "flux"))
  config.model.update(dtype="float32", remat=False, flux_redux_path=str(root))
  config.text.update(max_length=16, t5_max_length=8)
  config.text.t5.dtype = "float32"
  config.data.update(dataset="captioned_shapes", resolution=32, data_dir=str(tmp_path / "tfds"))
  config.sample.update(steps=4, prompts=(prompt,))
  assert config_checks.problems(config, device_count=8) == []
  pictures = [np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8), np.full((32, 32, 3), 255, np.uint8)]
  scales = [(1.0, 1.0), (0.3, 0.5)]  # (prompt_embeds_scale, pooled_prompt_embeds_scale)
  ours = []
  for k, picture in enumerate(pictures):
    PIL.Image.fromarray(picture).save(tmp_path / f"image{k}.png")
    sample.run(None, {"redux_prompt_scale": scales[k][0], "redux_pooled_scale": scales[k][1]},
               output_dir=tmp_path / f"job{k}", init_image=tmp_path / f"image{k}.png", config=config)
    ours.append(media.read_image(tmp_path / f"job{k}" / "p000_00.png").astype(np.float32))

  noise = np.asarray(jax.random.normal(sample.example_keys([config.sample.seed], 1)[0], (16, 16, 4)))
  embeds = []
  for picture, (prompt_scale, pooled_scale), made in zip(pictures, scales, ours):
    with torch.no_grad():
      pixels = processor(images=PIL.Image.fromarray(picture), return_tensors="pt").pixel_values
      embeds.append(image_embeds := embedder(encoder(pixel_values=pixels).last_hidden_state).image_embeds)
      prompt_embeds, pooled, _ = pipeline.encode_prompt([prompt], None, device="cpu", max_sequence_length=8)
      theirs = pipeline(prompt_embeds=torch.cat([prompt_embeds, image_embeds], dim=1) * prompt_scale,
                        pooled_prompt_embeds=pooled * pooled_scale, height=32, width=32, num_inference_steps=4,
                        guidance_scale=3.5, output_type="np", latents=diffusers.FluxPipeline._pack_latents(
                            torch.from_numpy(noise).permute(2, 0, 1)[None], 1, 4, 16, 16)).images[0]
    np.testing.assert_allclose(made, np.round(theirs * 255), atol=2)
  assert np.abs(ours[0] - ours[1]).max() > 2  # (the same noise and prompt: a white image, other tokens)
  # Both images, blended (a prompts file's list of init_images): FluxPriorReduxPipeline's sum of the two conditions
  (tmp_path / "blend.jsonl").write_text(json.dumps({"prompt": prompt, "init_image": ["image0.png", "image1.png"]}))
  grid = sample.run(None, {}, prompts_path=tmp_path / "blend.jsonl", output_dir=tmp_path / "blend", config=config)
  with torch.no_grad():
    blended = sum(torch.cat([prompt_embeds, image_embeds], dim=1) for image_embeds in embeds)
    theirs = pipeline(prompt_embeds=blended, pooled_prompt_embeds=2 * pooled, height=32, width=32,
                      num_inference_steps=4, guidance_scale=3.5, output_type="np",
                      latents=diffusers.FluxPipeline._pack_latents(torch.from_numpy(noise).permute(2, 0, 1)[None], 1,
                                                                   4, 16, 16)).images[0]
  np.testing.assert_allclose(media.read_image(tmp_path / "blend" / "p000_00.png").astype(np.float32),
                             np.round(theirs * 255), atol=2)
  shown = media.read_image(grid)[14:14 + 64]  # its row (below the label): both images given, then the sample
  np.testing.assert_array_equal(shown[::2, :64:2], pictures[0])
  assert (shown[:, 66:66 + 64] == 255).all()
  weights, graphdef, _ = sample.load_pretrained(config)  # the tokens themselves: the pipeline's image_embeds
  tokens = nnx.merge(graphdef, weights.params, weights.frozen).redux(pictures[0][None] / 127.5 - 1.0)
  np.testing.assert_allclose(tokens, embeds[0].numpy(), atol=1e-5)

  with pytest.raises(ValueError, match="--guidance_scale=3.0: with FLUX.1 Redux"):
    sample.run(None, {"guidance_scale": 3.0}, output_dir=tmp_path / "guided", init_image=tmp_path / "image0.png",
               config=config)
  with pytest.raises(ValueError, match="FLUX.1 Redux reads --init_image as an image to vary, not an image to edit"):
    edit_inputs.read(config, config.sample, [{"prompt": prompt, "init_image": str(tmp_path / "image0.png"),
                                              "mask": str(tmp_path / "image1.png")}], 0)
  ReduxImageEncoder(redux_dim=16, txt_in_features=32).save_pretrained(tmp_path / "narrow" / "image_embedder")
  for part in ("image_encoder", "feature_extractor"):
    (tmp_path / "narrow" / part).symlink_to(root / part)
  for update, problem in (({"model.flux_redux_path": str(tmp_path / "narrow")},
                           "its embedder makes tokens 32 wide (txt_in_features); Flux's transformer reads T5 states "
                           "40 wide"),
                          ({"model.flux_kontext": True}, "FLUX.1 Redux varies an image with FLUX.1 dev or schnell"),
                          ({"model.flux_redux_path": str(tmp_path / "flux")}, "lacks image_encoder/, "
                                                                              "feature_extractor/, image_embedder/"),
                          ({"model.flux_redux_path": "", "sample.redux_pooled_scale": 0.5},
                           "sample.redux_pooled_scale=0.5: FLUX.1 Redux's scales (model.flux_redux_path); this model "
                           "has none")):
    bad = config.copy_and_resolve_references()
    bad.update_from_flattened_dict(update)
    assert problem in " ".join(config_checks.problems(bad, device_count=8))
