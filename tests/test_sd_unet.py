"""Stable Diffusion's U-Net (models/sd_unet.py) against diffusers' UNet2DConditionModel, and as a backbone."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from conftest import assert_trees_equal, exported_run_holds_the_fused_pipeline
from diffusion_jax import config_checks, sample, schedules, sharding, train
from diffusion_jax.models import clip, init_rngs, sd_unet, sdxl_text


POOLED = 12  # the tiny SDXL U-Net's pooled text width


def save_tiny_sd_unet(directory, linear_projection=False, heads=4, channels=4, cross_attention_dim=16, seed=0,
                      sdxl=False, layers_per_block=1, in_channels=None, time_ids=6):
  """A random 2-level UNet2DConditionModel (cross-attention at the first level) saved as a diffusers directory:
  SD 1.x's layout (1x1 convolutions around the attention, `heads` heads everywhere) or, with linear_projection and a
  list of heads, SD 2.x's; with sdxl, SDXL's (linear projections, cross-attention at the second level only, there
  two transformer blocks deep, and the added embedding of a POOLED-wide pooled text embedding and `time_ids` time ids:
  the refiner's 5)."""
  import diffusers

  torch.manual_seed(seed)
  attends = ("DownBlock2D", "CrossAttnDownBlock2D") if sdxl else ("CrossAttnDownBlock2D", "DownBlock2D")
  added = dict(transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
               projection_class_embeddings_input_dim=POOLED + time_ids * 8) if sdxl else {}
  model = diffusers.UNet2DConditionModel(
      sample_size=16, in_channels=in_channels or channels, out_channels=channels, block_out_channels=(32, 64),
      layers_per_block=layers_per_block,
      down_block_types=attends, up_block_types=tuple(t.replace("Down", "Up") for t in reversed(attends)),
      cross_attention_dim=cross_attention_dim, attention_head_dim=heads, norm_num_groups=8,
      use_linear_projection=linear_projection or sdxl, **added).eval()
  model.save_pretrained(directory)
  return model


@pytest.mark.parametrize("linear_projection, heads, sdxl", [(False, 4, False), (True, (2, 4), False),
                                                            (True, (2, 4), True)])
def test_the_unet_computes_what_diffusers_computes(tmp_path, linear_projection, heads, sdxl):
  reference = save_tiny_sd_unet(tmp_path, linear_projection, heads, sdxl=sdxl)
  ours = sd_unet.load_diffusers(tmp_path)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
  timesteps, text = np.array([10.0, 999.0], np.float32), rng.standard_normal((2, 7, 16)).astype(np.float32)
  added = {"text_embeds": rng.standard_normal((2, POOLED)).astype(np.float32),
           "time_ids": np.array([[1024, 768, 0, 0, 1024, 1024], [512, 512, 16, 32, 128, 128]], np.float32)}
  with torch.no_grad():
    expected = reference(torch.tensor(x), torch.tensor(timesteps), torch.tensor(text), added_cond_kwargs={
        k: torch.tensor(v) for k, v in added.items()} if sdxl else None).sample.numpy()
  out = nnx.jit(lambda model, *args: model(*args))(ours, x.transpose(0, 2, 3, 1), timesteps, text,
                                                    *((added["text_embeds"], added["time_ids"]) if sdxl else ()))
  np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), expected, atol=2e-5)


def test_the_timestep_of_a_logsnr_is_sds():
  """At the log-SNRs of diffusers' Stable Diffusion table (DDPMScheduler, scaled-linear betas) the U-Net reads that
  table's timesteps; between two it reads a fraction; beyond its ends, the ends."""
  import diffusers

  alphas_cumprod = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                           beta_end=0.012).alphas_cumprod.double().numpy()
  steps = np.array([0, 1, 250, 500, 999])
  logsnr = schedules.logsnr_from_alphas_cumprod(alphas_cumprod[steps])
  np.testing.assert_allclose(sd_unet.timestep(jnp.asarray(logsnr, jnp.float32)), steps, atol=2e-3)
  middle = sd_unet.timestep(jnp.asarray(logsnr[2:4].mean(keepdims=True), jnp.float32))
  assert 250 < float(middle[0]) < 500
  np.testing.assert_allclose(sd_unet.timestep(jnp.array([30.0, -30.0])), [0, 999])


def test_what_it_cannot_build_is_refused_by_name(tmp_path):
  save_tiny_sd_unet(tmp_path / "unet")
  with pytest.raises(ValueError, match="it is a whole pipeline's checkpoint; give its unet/ folder"):
    sd_unet.read_config(tmp_path)
  config = json.loads((tmp_path / "unet" / "config.json").read_text())
  (tmp_path / "unet" / "config.json").write_text(json.dumps(config | {"addition_embed_type": "image",
                                                                      "class_embed_type": "timestep",
                                                                      "transformer_layers_per_block": [[1], [2]]}))
  with pytest.raises(ValueError, match=r"class_embed_type='timestep', addition_embed_type='image', "
                                       r"transformer_layers_per_block=\[\[1\], \[2\]\]: one depth per level, not "
                                       r"per block: not supported \(SD 1.x, 2.x and SDXL U-Nets are; the x4"):
    sd_unet.read_config(tmp_path / "unet")
  (tmp_path / "unet" / "config.json").write_text(json.dumps(config | {"cross_attention_dim": 32}))
  with pytest.raises(ValueError, match="does not match its config.json .*attn2.to_k.weight has shape"):
    sd_unet.load_diffusers(tmp_path / "unet")


def test_a_stable_diffusion_unet_backbone_starts_from_its_weights(tmp_path):
  """model.backbone='sd_unet' with our T5: the config check asks for the VP path and the U-Net's channels and text
  width; the model starts with the directory's weights (training and sampling: the tests of SD's checkpoints below).
  Its abstract model (text_to_image.abstract), traced once per config, follows the U-Net folder rewritten deeper."""
  from configs import t2i_shapes
  from diffusion_jax.models import text_to_image

  save_tiny_sd_unet(tmp_path / "unet", channels=3, cross_attention_dim=32)
  config = t2i_shapes.get_config("test")
  config.model.update(backbone="sd_unet", sd_unet_path=str(tmp_path / "unet"), lowres_conditioning=True)
  config.data.data_dir = str(tmp_path / "tfds")
  config.diffusion.path, config.text.t5.d_model = "flow", 16
  found = " ".join(config_checks.problems(config, device_count=8))
  for problem in ("SD's U-Net reads the timesteps of its variance-preserving table; set diffusion.path='vp'",
                  "the text encoder's width 16 (text.pretrained_path's, or text.t5.d_model; SDXL's, both encoders') "
                  "must equal the U-Net's cross_attention_dim=32",
                  "model.lowres_conditioning: not supported with model.backbone='sd_unet' yet"):
    assert problem in found
  config.diffusion.path, config.text.t5.d_model, config.model.lowres_conditioning = "vp", 32, False
  assert config_checks.problems(config, device_count=8) == []
  state, _ = train.init_state(config, sharding.make_mesh(config.mesh))
  loaded = nnx.to_pure_dict(nnx.state(sd_unet.load_diffusers(tmp_path / "unet")))
  jax.tree.map(np.testing.assert_array_equal, state.params["sd_unet"], loaded)
  # The abstract model, traced once per config, is traced again when a file the config names changes
  shapes = lambda model: jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(nnx.state(model)))
  first = text_to_image.abstract(config)
  assert text_to_image.abstract(config) is not first and shapes(text_to_image.abstract(config)) == shapes(first)
  save_tiny_sd_unet(tmp_path / "unet", channels=3, cross_attention_dim=32, layers_per_block=2)
  deeper = shapes(text_to_image.abstract(config))["sd_unet"]
  assert deeper == jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(nnx.state(sd_unet.load_diffusers(
      tmp_path / "unet")))) != shapes(first)["sd_unet"]


def save_tiny_clip_tokenizer(directory, captions, pad_token=None):
  """A CLIP tokenizer (vocab.json, merges.txt: byte-level BPE with CLIP's word ends, learnt from `captions`, every byte
  and its word end in the vocabulary, as CLIP's is) saved as Stable Diffusion's tokenizer/ folder; pad_token: its
  tokenizer_config.json's (SD 2.x's "!"), else none (end-of-text)."""
  from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

  from diffusion_jax.text import tokenizers

  tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
  tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(tokenizers.CLIPTokenizer.SPLIT),
                                                                    behavior="removed", invert=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tok.train_from_iterator(captions, trainers.BpeTrainer(
      vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix="</w>",
      show_progress=False))
  directory.mkdir(parents=True, exist_ok=True)
  tok.model.save(str(directory))
  vocab = json.loads((directory / "vocab.json").read_text())
  for token in [c + end for c in sorted(pre_tokenizers.ByteLevel.alphabet()) for end in ("", "</w>")] + [
      "<|startoftext|>", "<|endoftext|>"]:
    vocab.setdefault(token, len(vocab))
  (directory / "vocab.json").write_text(json.dumps(vocab))
  if pad_token:
    (directory / "tokenizer_config.json").write_text(json.dumps({"pad_token": pad_token}))
  return len(vocab)


@pytest.mark.parametrize("pad_token", [None, "!"])
def test_the_clip_tokenizer_makes_transformers_ids(tmp_path, pad_token):
  """SD 1.x's padding (end-of-text) and SD 2.x's ("!", split out of prompts as transformers splits its special
  tokens); words, numbers, punctuation, case and spacing; a prompt cut to max_length keeps its end-of-text token.
  The mask marks the prompt's tokens (none for the empty prompt, whose ids are still start and end)."""
  import transformers

  from diffusion_jax.text import tokenizers

  save_tiny_clip_tokenizer(tmp_path, ["a large red circle at the top left", "two blue squares"] * 5, pad_token)
  ours = tokenizers.CLIPTokenizer(str(tmp_path), 12)
  theirs = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"),
                                      **({"pad_token": pad_token} if pad_token else {}))
  prompts = ["a large red circle!! 12 Zebra's", "", "A  large\tRED",
             "two small blue squares and a green triangle at top"]
  ids, mask = ours(prompts)
  for row, prompt in enumerate(prompts):
    expected = theirs(prompt, padding="max_length", max_length=12, truncation=True)
    assert list(ids[row]) == expected["input_ids"], prompt
    assert list(mask[row]) == [bool(m) and bool(prompt) for m in expected["attention_mask"]], prompt
  with pytest.raises(ValueError, match="has no tokenizer.json, nor vocab.json and merges.txt"):
    tokenizers.CLIPTokenizer(str(tmp_path / "nothing"), 12)
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
  with pytest.raises(ValueError, match=r"lacks \['<pad>'\]: is it a CLIP tokenizer\?"):
    tokenizers.CLIPTokenizer(str(tmp_path), 12)
  (tmp_path / "damaged").mkdir()
  (tmp_path / "damaged" / "tokenizer.json").write_text('{"version": "1.0", "model": ')  # cut short
  with pytest.raises(ValueError, match=r"tokenizer.json' cannot be read as a tokenizer \(text.tokenizer_path\)"):
    tokenizers.CLIPTokenizer(str(tmp_path / "damaged"), 12)


def save_tiny_stable_diffusion(root, captions, sdxl=False, layers_per_block=1, inpainting=False, refiner=False):
  """A Stable Diffusion 1.x checkpoint's folders (unet/, text_encoder/, tokenizer/, vae/, scheduler/) with tiny
  random models: a 2-level U-Net, a 2-layer CLIP text model of width 32, a factor-2 VAE with 4 latent channels.
  With sdxl, an SDXL checkpoint's: SDXL's U-Net layout (save_tiny_sd_unet) and also text_encoder_2/ (a 2-layer
  CLIPTextModelWithProjection of width 16 projecting to POOLED) and tokenizer_2/ (padding with "!"); with refiner
  too, the SDXL refiner's (no text_encoder/ and tokenizer/; the U-Net reads text_encoder_2/'s states and 5 time ids);
  with inpainting, an SD inpainting checkpoint's (the U-Net reads 9 channels). Returns diffusers'
  StableDiffusionPipeline (StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline,
  StableDiffusionInpaintPipeline) of them."""
  import diffusers
  import transformers

  save_tiny_sd_unet(root / "unet", cross_attention_dim=16 if refiner else 48 if sdxl else 32, sdxl=sdxl,
                    layers_per_block=layers_per_block, in_channels=9 if inpainting else None,
                    time_ids=5 if refiner else 6)
  vocab = save_tiny_clip_tokenizer(root / "tokenizer", captions)
  torch.manual_seed(0)
  clip_config = lambda width, **fields: transformers.CLIPTextConfig(
      vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=4,
      max_position_embeddings=16, bos_token_id=vocab - 2, eos_token_id=vocab - 1, **fields)
  text_encoder = transformers.CLIPTextModel(clip_config(32)).eval()
  text_encoder.save_pretrained(root / "text_encoder")
  vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                                norm_num_groups=4, sample_size=32).eval()
  vae.save_pretrained(root / "vae")
  scheduler = (diffusers.EulerDiscreteScheduler if sdxl else diffusers.DDPMScheduler)(
      beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
      **({"timestep_spacing": "leading"} if sdxl else {"clip_sample": False}))
  scheduler.save_pretrained(root / "scheduler")
  tokenizer = lambda folder, **pad: transformers.CLIPTokenizer(
      str(root / folder / "vocab.json"), str(root / folder / "merges.txt"), model_max_length=16, **pad)
  unet = diffusers.UNet2DConditionModel.from_pretrained(root / "unet")
  if not sdxl:
    kind = diffusers.StableDiffusionInpaintPipeline if inpainting else diffusers.StableDiffusionPipeline
    return kind(vae, text_encoder, tokenizer("tokenizer"), unet, scheduler, None, None, requires_safety_checker=False)
  save_tiny_clip_tokenizer(root / "tokenizer_2", captions, pad_token="!")
  second = transformers.CLIPTextModelWithProjection(clip_config(16, projection_dim=POOLED)).eval()
  second.save_pretrained(root / "text_encoder_2")
  if refiner:  # (no first text encoder: as the SDXL refiner's root)
    shutil.rmtree(root / "text_encoder")
    shutil.rmtree(root / "tokenizer")
    return diffusers.StableDiffusionXLImg2ImgPipeline(vae, None, second, None, tokenizer("tokenizer_2", pad_token="!"),
                                                      unet, scheduler, requires_aesthetics_score=True,
                                                      force_zeros_for_empty_prompt=False)
  return diffusers.StableDiffusionXLPipeline(vae, text_encoder, second, tokenizer("tokenizer"),
                                             tokenizer("tokenizer_2", pad_token="!"), unet, scheduler)


def test_stable_diffusion_reads_a_checkpoints_folders_as_its_pipeline_encodes_and_predicts(tmp_path):
  """configs/stable_diffusion.py:ROOT reads a Stable Diffusion checkpoint's folders. Its text condition and the null
  condition guidance drops to are what diffusers' StableDiffusionPipeline encodes (the empty prompt's encoding), and
  its network's prediction at SD's timestep 500 is the pipeline's U-Net's (training and sampling: the SDXL test
  below). The evaluation job scores the checkpoint as it is (evaluate --config): one line, step 0, whose held-out
  loss is that of these weights."""
  from configs import stable_diffusion
  from diffusion_jax.data import captioned_shapes
  from diffusion_jax.text import tokenizers

  pipeline = save_tiny_stable_diffusion(tmp_path / "sd", [" ".join(captioned_shapes.VOCABULARY)] * 5)
  config = stable_diffusion.get_config(str(tmp_path / "sd"))
  assert (config.model.sd_unet_path, config.text.tokenizer_path) == (str(tmp_path / "sd" / "unet"),
                                                                      str(tmp_path / "sd" / "tokenizer"))
  assert (config.text.second_encoder_path, config.sample.guidance_scale, config.data.size_ids) == (
      "", 7.5, False)
  config.text.update(max_length=20, embedding_cache=str(tmp_path / "cache"))
  config.data.size_ids, config.model.lora_text_encoder, config.data.aesthetic_score = True, True, 6.0
  found = " ".join(config_checks.problems(config, device_count=8))
  for problem in ("text.max_length=20 exceeds the CLIP text encoder's 16 positions",
                  "data.size_ids: only SDXL's U-Net reads an image's size and crop",
                  "data.aesthetic_score=6.0: only the SDXL refiner's U-Net reads an aesthetic score; leave it 0",
                  "model.lora_text_encoder: updates of a CLIP text encoder (text.pretrained_path, Stable Diffusion's) "
                  "need model.lora_rank > 0", "model.lora_text_encoder trains the text encoder's updates: its "
                  "embeddings cannot be cached"):
    assert problem in found
  config.text.update(max_length=16, embedding_cache="")
  config.model.dtype, config.data.size_ids, config.model.lora_text_encoder = "float32", False, False
  config.data.aesthetic_score = 0.0
  config.data.update(dataset="captioned_shapes", resolution=32, num_train=64, num_eval=16,
                     data_dir=str(tmp_path / "tfds"))
  assert config_checks.problems(config, device_count=8) == []
  state, graphdef = train.init_state(config, sharding.make_mesh(config.mesh))
  prompts = ["a large red circle at the top left", "two small blue squares"]
  ids, mask = tokenizers.from_config(config)(prompts)
  latents = np.random.default_rng(0).standard_normal((2, 16, 16, 4)).astype(np.float32)
  alphas_cumprod = pipeline.scheduler.alphas_cumprod.double().numpy()
  logsnr = jnp.full((2,), schedules.logsnr_from_alphas_cumprod(alphas_cumprod[500]), jnp.float32)

  @jax.jit
  def conditions_and_prediction(params, frozen):
    model = nnx.merge(graphdef, params, frozen)
    text = model.encode(ids, mask)
    return text, model.null_condition(text, mask)[0], model(latents, logsnr, text, mask)

  text, null, prediction = conditions_and_prediction(state.params, state.frozen)
  with torch.no_grad():
    expected_text, expected_null = pipeline.encode_prompt(prompts, "cpu", 1, True)
    expected = pipeline.unet(torch.tensor(latents.transpose(0, 3, 1, 2)), 500, expected_text).sample.numpy()
  np.testing.assert_allclose(text, expected_text.numpy(), atol=2e-5)
  np.testing.assert_allclose(null, expected_null.numpy(), atol=2e-5)
  np.testing.assert_allclose(np.asarray(prediction).transpose(0, 3, 1, 2), expected, atol=1e-4)

  from diffusion_jax import checkpoint, evaluate
  from diffusion_jax.metrics import heldout_loss

  options = dict(num_prompts=4, heldout_examples=4, combination_prompts=0, sample_overrides={"steps": 2})
  with pytest.raises(ValueError, match="--step: not used with --config"):
    evaluate.run(tmp_path / "eval", step=3, config=config, **options)
  [record] = evaluate.run(tmp_path / "eval", config=config, **options)
  assert record["step"] == 0 and record["settings"]["pretrained"] and np.isfinite(record["fid_random_conv"])
  assert checkpoint.config_differences(checkpoint.read_config(tmp_path / "eval"), config) == []  # what was evaluated
  assert [r["step"] for r in evaluate.evaluated(tmp_path / "eval")] == [0]
  mesh = sharding.make_mesh(sharding.SAMPLING_MESH)
  batch, _, _ = evaluate.validation_set(config, 4)
  losses = heldout_loss.make_heldout_loss_fn(config, graphdef, mesh, evaluate.evaluation_sample_config(
      config).batch_size)(*jax.device_put((state.params, state.frozen), sharding.replicated(mesh)), batch)
  np.testing.assert_allclose(record["heldout_loss"], np.mean(losses), rtol=1e-5)


def test_sdxl_fine_tunes_a_lora_and_samples_from_a_checkpoints_folders(tmp_path):
  """configs/stable_diffusion.py:ROOT of an SDXL checkpoint also reads text_encoder_2/ and tokenizer_2/ (guidance 5,
  its pipeline's). Each prompt's ids are both tokenizers' (which differ where "!" is the second's padding); the text
  condition holds what StableDiffusionXLPipeline.encode_prompt makes, both encoders' penultimate states and the
  second's pooled embedding, the null condition is its zeros, and the network's prediction at timestep 500 is the
  pipeline's U-Net's given those and the images' sizes and crops as time ids (data.size_ids, training's): checked of
  the trained LoRA, against the pipeline with it fused. Without the
  second encoder or its tokenizer, or with a latent cache beside data.size_ids, the config check says what is wrong.
  A LoRA of it (model.lora_rank, model.lora_feed_forward, model.lora_text_encoder: both encoders', remat) trains only
  its updates; exported, the adapter says what it adapts, and sampling fuses it; exported in diffusers' layout, the
  pipeline with it fused makes the trained model's text condition and prediction, and the run exported whole
  (export.py) holds that pipeline's U-Net and text encoders."""
  from configs import stable_diffusion
  from diffusion_jax import lora
  from diffusion_jax.data import captioned_shapes
  from diffusion_jax.models import text_to_image
  from diffusion_jax.text import tokenizers

  pipeline = save_tiny_stable_diffusion(tmp_path / "sdxl", [" ".join(captioned_shapes.VOCABULARY)] * 5, sdxl=True)
  config = stable_diffusion.get_config(str(tmp_path / "sdxl"))
  assert (config.text.second_encoder_path, config.text.second_tokenizer_path, config.sample.guidance_scale,
          config.data.size_ids) == (str(tmp_path / "sdxl" / "text_encoder_2"), str(tmp_path / "sdxl" / "tokenizer_2"),
                                    5.0, True)
  config.model.update(dtype="float32", lora_rank=2, lora_feed_forward=True, lora_text_encoder=True, remat=True)
  config.text.max_length = 16
  config.data.update(dataset="captioned_shapes", resolution=32, num_train=64, num_eval=16,
                     data_dir=str(tmp_path / "tfds"))
  config.train.update(batch_size=8, steps=2, checkpoint_every=2, log_every=1, sample_every=0)
  config.optimizer.learning_rate = 1e-2
  config.sample.update(steps=2, prompts=("a large red circle!",))
  assert config_checks.problems(config, device_count=8) == []
  bad = config.copy_and_resolve_references()
  bad.text.second_encoder_path = bad.text.second_tokenizer_path = ""
  assert ("SDXL's U-Net (addition_embed_type='text_time') reads a second text encoder's pooled embedding"
          in " ".join(config_checks.problems(bad, device_count=8)))
  bad = config.copy_and_resolve_references()
  bad.text.second_tokenizer_path = ""
  assert "text.second_encoder_path and text.second_tokenizer_path go together" in " ".join(
      config_checks.problems(bad, device_count=8))
  bad = config.copy_and_resolve_references()
  bad.latent.cache = str(tmp_path / "latents")
  assert "data.size_ids with latent.cache: the cache holds one view of each image" in " ".join(
      config_checks.problems(bad, device_count=8))

  train.train_and_evaluate(config, tmp_path / "run")
  _, weights, graphdef, *_ = sample.load_checkpoint(tmp_path / "run", use_ema=False)
  # (the U-Net's cross_attention_dim: where the pooled embedding starts, what a text-embedding cache stores apart)
  assert nnx.merge(graphdef, weights.params, weights.frozen).token_width == 48
  loaded = text_to_image.pretrained_weights(config)
  for name in ("sd_unet", "text_encoder", "autoencoder"):
    jax.tree.map(np.testing.assert_array_equal, weights.frozen[name], loaded[name])
  updates = jax.tree_util.tree_flatten_with_path(weights.params)[0]
  assert updates and all(text_to_image.is_lora(tuple(str(getattr(k, "key", k)) for k in path)) for path, _ in updates)
  assert max(float(np.abs(x).max()) for path, x in updates if "lora_b" in jax.tree_util.keystr(path)) > 0
  lora.export(tmp_path / "run", tmp_path / "adapter.safetensors", use_ema=False)
  described = lora.describe(lora.read(str(tmp_path / "adapter.safetensors")))
  # Level 1's down transformer and its two up ones, 2 blocks deep, and the middle's: 8 blocks of 4 projections
  # an attention and 2 feed-forward layers; each text encoder's 2 layers of 4 attention and 2 MLP projections
  for line in (f"for a model: Stable Diffusion's U-Net of {tmp_path / 'sdxl' / 'unet'}", "self-attention: 32 layers",
               "cross-attention: 32 layers", "feed-forward: 16 layers", "text encoder: 24 layers"):
    assert line in described, described
  grid = sample.run(tmp_path / "run", {"steps": 2}, output_dir=tmp_path / "out")
  assert grid.exists()
  lora.export(tmp_path / "run", tmp_path / "diffusers.safetensors", use_ema=False, layout="diffusers")
  assert lora.read(str(tmp_path / "diffusers.safetensors")).updates.keys() == lora.read(
      str(tmp_path / "adapter.safetensors")).updates.keys()
  with pytest.raises(ValueError, match="kohya's SDXL names number SDXL's blocks .* layers_per_block=1 has no such"):
    lora.export(tmp_path / "run", tmp_path / "kohya.safetensors", layout="kohya")  # (SDXL's: the test below)

  # The trained model's condition and prediction, and diffusers' of the checkpoint with the diffusers-layout file
  prompts = ["a large red circle at the top left!", "two small blue squares"]
  ids, mask = tokenizers.from_config(config)(prompts)
  assert ids.shape == (2, 32) and mask.shape == (2, 16) and (ids[0, :16] != ids[0, 16:]).any()
  latents = np.random.default_rng(0).standard_normal((2, 16, 16, 4)).astype(np.float32)
  alphas_cumprod = pipeline.scheduler.alphas_cumprod.double().numpy()
  logsnr = jnp.full((2,), schedules.logsnr_from_alphas_cumprod(alphas_cumprod[500]), jnp.float32)
  # data.size_ids (the config's for SDXL): one image made at the training size, one cropped from a larger one
  time_ids = np.array([[32.0, 32, 0, 0, 32, 32], [48, 40, 8, 0, 32, 32]], np.float32)
  model = nnx.merge(graphdef, weights.params, weights.frozen)
  text, null, prediction = nnx.jit(lambda model: (
      lambda text: (text, model.null_condition(text, mask)[0], model(latents, logsnr, text, mask, size_ids=time_ids)))(
          model.encode(ids, mask)))(model)

  def diffusers_condition_and_prediction():
    with torch.no_grad():
      text, _, pooled, _ = pipeline.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=True)
      return text.numpy(), pooled.numpy(), pipeline.unet(torch.tensor(latents.transpose(0, 3, 1, 2)), 500, text,
                                                         added_cond_kwargs={"text_embeds": pooled, "time_ids": (
                                                             torch.tensor(time_ids))}).sample.numpy()

  base = diffusers_condition_and_prediction()
  pipeline.load_lora_weights(str(tmp_path / "diffusers.safetensors"))
  pipeline.fuse_lora()
  expected_text, pooled, expected = diffusers_condition_and_prediction()
  np.testing.assert_allclose(text[..., :48], expected_text, atol=2e-5)
  np.testing.assert_allclose(text[..., 48:], np.broadcast_to(pooled[:, None], (2, 16, POOLED)), atol=2e-5)
  assert not np.asarray(null).any()
  np.testing.assert_allclose(np.asarray(prediction).transpose(0, 3, 1, 2), expected, atol=1e-4)
  assert np.abs(expected_text - base[0]).max() > 1e-4 and np.abs(expected - base[2]).max() > 1e-3  # (updates matter)
  exported_run_holds_the_fused_pipeline(tmp_path / "run", pipeline, ("unet", "text_encoder", "text_encoder_2", "vae"))

def test_the_sdxl_refiner_encodes_and_predicts_as_its_pipeline_and_refines_images(tmp_path):
  """configs/stable_diffusion.py:ROOT of the SDXL refiner's root (text_encoder_2/ and tokenizer_2/, no text_encoder/)
  reads those as its text encoder and tokenizer, with its pipeline's aesthetic score (6) and strength (0.3). Its text
  condition holds what StableDiffusionXLImg2ImgPipeline.encode_prompt makes (the encoder's penultimate states and
  pooled embedding), its null condition the empty prompt's encoding (the pipeline's negative:
  force_zeros_for_empty_prompt false), and the network's prediction at timestep 500 is the pipeline's U-Net's given
  the pipeline's time ids, the last an aesthetic score: 6 (the conditional branch's), 2.5 (guidance's other branch's)
  or the data's (data.size_ids). The config check asks for data.aesthetic_score with its U-Net, and names an SDXL
  base U-Net's 6 time ids given the refiner's one encoder. The sampling job (sample --config) refines an image
  (--init_image), recording both scores (the test below: another --negative_aesthetic_score changes what it makes).
  A LoRA of its U-Net and text encoder trains on the data's ids; written in diffusers' layout, the
  pipeline's load_lora_weights and fuse_lora make what the run exported whole (export.py) holds."""
  from configs import stable_diffusion
  from diffusion_jax.data import captioned_shapes
  from diffusion_jax.text import tokenizers

  root = tmp_path / "refiner"
  pipeline = save_tiny_stable_diffusion(root, [" ".join(captioned_shapes.VOCABULARY)] * 5, sdxl=True, refiner=True)
  config = stable_diffusion.get_config(str(root))
  assert (config.text.pretrained_path, config.text.tokenizer_path, config.text.second_encoder_path,
          config.data.aesthetic_score, config.sample.strength, config.sample.guidance_scale) == (
              str(root / "text_encoder_2"), str(root / "tokenizer_2"), "", 6.0, 0.3, 5.0)
  config.model.dtype, config.text.max_length = "float32", 16
  config.data.update(dataset="captioned_shapes", resolution=32, num_train=64, num_eval=16,
                     data_dir=str(tmp_path / "tfds"))
  assert config_checks.problems(config, device_count=8) == []
  bad = config.copy_and_resolve_references()
  bad.data.aesthetic_score = 0.0
  assert "The SDXL refiner's U-Net reads its images' aesthetic score as a time id: set data.aesthetic_score" in (
      " ".join(config_checks.problems(bad, device_count=8)))
  save_tiny_sd_unet(tmp_path / "base_unet", cross_attention_dim=16, sdxl=True)  # (SDXL base's 6 time ids)
  bad.data.aesthetic_score, bad.model.sd_unet_path = 6.0, str(tmp_path / "base_unet")
  assert "beside 5 time ids of 8 (52); an SDXL base U-Net reads 6: set text.second_encoder_path" in (
      " ".join(config_checks.problems(bad, device_count=8)))

  weights, graphdef, _ = sample.load_pretrained(config)
  prompts = ["a large red circle at the top left!", "two small blue squares"]
  ids, mask = tokenizers.from_config(config)(prompts)
  latents = np.random.default_rng(0).standard_normal((2, 16, 16, 4)).astype(np.float32)
  logsnr = jnp.full((2,), schedules.logsnr_from_alphas_cumprod(pipeline.scheduler.alphas_cumprod.double().numpy()[
      500]), jnp.float32)
  data_ids = np.array([[48.0, 40, 8, 0, 6], [32, 32, 0, 0, 4]], np.float32)  # (data.size_ids: training's)

  @jax.jit
  def conditions_and_predictions(params, frozen):
    model = nnx.merge(graphdef, params, frozen)
    text = model.encode(ids, mask)
    null = model.null_condition(text, mask)[0]
    return text, null, [model(latents, logsnr, text, mask), model(latents, logsnr, null, mask, aesthetic_score=2.5),
                        model(latents, logsnr, text, mask, size_ids=data_ids)]

  text, null, predictions = conditions_and_predictions(weights.params, weights.frozen)
  with torch.no_grad():
    expected_text, expected_null, pooled, null_pooled = pipeline.encode_prompt(prompts, device="cpu",
                                                                               do_classifier_free_guidance=True)
    time_ids, null_time_ids = pipeline._get_add_time_ids((32, 32), (0, 0), (32, 32), 6.0, 2.5, (32, 32), (0, 0),
                                                         (32, 32), torch.float32, POOLED)
    unet = lambda text, pooled, ids: pipeline.unet(torch.tensor(latents.transpose(0, 3, 1, 2)), 500, text,
                                                   added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    expected = [unet(expected_text, pooled, time_ids.repeat(2, 1)), unet(expected_null, null_pooled,
                                                                          null_time_ids.repeat(2, 1)),
                unet(expected_text, pooled, torch.tensor(data_ids))]
  assert time_ids.tolist() == [[32, 32, 0, 0, 6.0]] and null_time_ids.tolist() == [[32, 32, 0, 0, 2.5]]
  for ours, states, theirs_pooled in ((text, expected_text, pooled), (null, expected_null, null_pooled)):
    np.testing.assert_allclose(ours[..., :16], states.numpy(), atol=2e-5)
    np.testing.assert_allclose(ours[..., 16:], np.broadcast_to(theirs_pooled.numpy()[:, None], (2, 16, POOLED)),
                               atol=2e-5)
  for ours, theirs in zip(predictions, expected):
    np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), theirs.numpy(), atol=1e-4)

  import PIL.Image

  from diffusion_jax import media

  PIL.Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "a.png")
  config.sample.prompts = prompts[:1]
  refined = sample.run(None, {"steps": 10, "num_per_prompt": 1}, output_dir=tmp_path / "refined",
                       init_image=tmp_path / "a.png", config=config).parent / "p000_00.png"
  assert np.asarray(PIL.Image.open(refined)).shape == (32, 32, 3)
  assert media.read_provenance(refined)["aesthetic_scores"] == "[6.0, 2.5]"

  from diffusion_jax import lora

  config.model.update(lora_rank=2, lora_text_encoder=True)  # a LoRA of it and its text encoder, on the data's ids
  config.train.update(batch_size=8, steps=2, checkpoint_every=2, log_every=1, sample_every=0)
  config.optimizer.learning_rate = 1e-2
  train.train_and_evaluate(config, tmp_path / "run")
  lora.export(tmp_path / "run", tmp_path / "diffusers.safetensors", use_ema=False, layout="diffusers")
  weights = lambda part: {k.replace(".base_layer", ""): v.clone()  # (a loaded adapter wraps each layer's base_layer)
                          for k, v in getattr(pipeline, part).state_dict().items() if "lora_" not in k}
  base = {part: weights(part) for part in ("unet", "text_encoder_2")}
  pipeline.load_lora_weights(str(tmp_path / "diffusers.safetensors"))
  pipeline.fuse_lora()
  for part, before in base.items():  # (the trained updates matter)
    assert max(float((v - before[k]).abs().max()) for k, v in weights(part).items()) > 1e-4, part
  exported_run_holds_the_fused_pipeline(tmp_path / "run", pipeline, ("unet", "text_encoder_2", "vae"))


def test_the_sdxl_base_hands_its_latents_to_the_refiner_as_diffusers_ensemble_of_experts_does(tmp_path):
  """sample --config=BASE --refiner=REFINER (refiner.py): the SDXL base runs the Euler steps of the grid at
  timesteps 200 and above (--denoising_end=0.8: 8 of 10) and the refiner the other 2 from its latents, making from the
  same noise, to a level of 8 bits, what StableDiffusionXLPipeline(denoising_end=0.8, output_type="latent") handed
  to StableDiffusionXLImg2ImgPipeline(denoising_start=0.8) makes; the refiner's aesthetic scores matter and are
  recorded, as is a LoRA of its U-Net fused into it (--refiner_lora), which changes the image. Refused before any
  checkpoint is read: --denoising_end without a refiner or with a handover where one model runs no step, edits,
  autoguidance, another schedule, a LoRA that does not fit the refiner; refused by what they are: video and
  super-resolution models, latents of another shape. The evaluation job (evaluate --config --refiner) scores the
  ensemble's samples (another FID than the base's alone, the same held-out loss), records the refiner in its
  settings, and checks every sweep point's handover and refuses edits first."""
  import PIL.Image

  from configs import stable_diffusion
  from diffusion_jax import media, refiner
  from diffusion_jax.data import captioned_shapes

  captions = [" ".join(captioned_shapes.VOCABULARY)] * 5
  base = save_tiny_stable_diffusion(tmp_path / "base", captions, sdxl=True)
  refining = save_tiny_stable_diffusion(tmp_path / "refiner", captions, sdxl=True, refiner=True)
  base_config, refiner_config = (stable_diffusion.get_config(str(tmp_path / name)) for name in ("base", "refiner"))
  for c in (base_config, refiner_config):
    c.model.dtype, c.text.max_length, c.data.resolution = "float32", 16, 32
  base_config.data.update(dataset="captioned_shapes", num_train=64, num_eval=16, data_dir=str(tmp_path / "tfds"))
  prompt = "a large red circle at the top left"
  # (the sampling and evaluation jobs then sample one config: their compiled samplers are shared)
  base_config.sample.update(prompts=[prompt], steps=10, num_per_prompt=1, sampler="euler")
  run = lambda name, **settings: sample.run(None, settings, output_dir=tmp_path / name, config=base_config,
                                            refiner_config=refiner_config, denoising_end=0.8).parent / "p000_00.png"
  ours = np.asarray(PIL.Image.open(run("ensemble")), float)

  noise = np.array(jax.random.normal(sample.example_keys([base_config.sample.seed], 1)[0], (16, 16, 4)))
  base.scheduler.set_timesteps(10)
  start = float(base.scheduler.sigmas[0]) / float(base.scheduler.init_noise_sigma)  # (our start: sigma_max noise)
  with torch.no_grad():
    latents = base(prompt=[prompt], height=32, width=32, num_inference_steps=10, denoising_end=0.8,
                   guidance_scale=5.0, latents=torch.from_numpy(noise).permute(2, 0, 1)[None] * start,
                   output_type="latent").images
    theirs = refining(prompt=[prompt], image=latents, num_inference_steps=10, denoising_start=0.8,
                      guidance_scale=5.0, output_type="np").images[0]
  assert np.abs(ours - theirs * 255).max() <= 1
  record = media.read_provenance(tmp_path / "ensemble" / "p000_00.png")
  assert json.loads(record["refiner"])["aesthetic_scores"] == [6.0, 2.5]
  record_hash = lambda record: json.loads(record["refiner"])["config_hash"]
  assert np.abs(np.asarray(PIL.Image.open(run("other", negative_aesthetic_score=6.0)), float) - ours).max() > 0

  # A LoRA of the refiner's U-Net fused into it (--refiner_lora) changes the image and is recorded; one of the base's
  # does not fit it. (At a scale far past use: the refiner runs the grid's last 2 steps, whose changes this tiny VAE
  # shows 1 level deep in 8 bits; at 0.5 one value in 768 moved, and a flake once left none)
  import safetensors.numpy

  from diffusion_jax import lora

  for name in ("refiner", "base"):  # (of the middle block's projections: a few programs fuse them)
    updates = random_lora(lambda: sd_unet.SDUNet(sd_unet.read_config(tmp_path / name / "unet"),
                                                 rngs=init_rngs.seeded(0), lora_rank=2), "sd_unet")
    safetensors.numpy.save_file({k: v for k, v in updates.items() if "mid_block" in k},
                                tmp_path / f"{name}_lora.safetensors", metadata={"format": lora.FORMAT})
  adapted = sample.run(None, {}, output_dir=tmp_path / "adapted",
                       config=base_config, refiner_config=refiner_config, refiner_adapters=[
                           lora.read(f"{tmp_path / 'refiner_lora.safetensors'}:100", "--refiner_lora")])
  assert (np.asarray(PIL.Image.open(adapted.parent / "p000_00.png"), float) != ours).mean() > 0.1
  [adapter] = json.loads(media.read_provenance(adapted.parent / "p000_00.png")["refiner"])["lora"]
  assert adapter["scale"] == 100 and adapter["file"].endswith("refiner_lora.safetensors")

  def refused(match, refiner_config=refiner_config, denoising_end=0.8, **given):
    with pytest.raises(ValueError, match=match):
      sample.run(None, {"steps": 10}, output_dir=tmp_path / "refused", config=base_config,
                 refiner_config=refiner_config, denoising_end=denoising_end, **given)

  refused("--denoising_end: the part of the grid the model runs before a --refiner", refiner_config=None)
  refused(r"--denoising_end=0.999 hands over at step 10 of 10: the refiner would run none", denoising_end=0.999)
  PIL.Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
  refused("--refiner: the prompts edit images", init_image=tmp_path / "a.png")
  refused("an autoguidance guide fits one model", guide_workdir=tmp_path)
  refused("--refiner_lora=.*base_lora.safetensors: its updates .* do not fit this model",
          refiner_adapters=[lora.read(str(tmp_path / "base_lora.safetensors"))])
  refused("--refiner_lora: an adapter fused into a --refiner", refiner_config=None, denoising_end=None,
          refiner_adapters=[lora.read(str(tmp_path / "refiner_lora.safetensors"))])
  other = refiner_config.copy_and_resolve_references()
  other.diffusion.schedule_params.beta_end = 0.02
  refused("--refiner: the refiner's sampling grid is not the model's", refiner_config=other)
  video = base_config.copy_and_resolve_references()
  video.model.temporal = True
  assert refiner.problems(video, refiner_config) == [
      "the model is a video model; an ensemble of experts hands over an image's latents, from noise: sample it "
      "without --refiner"]
  assert "the refiner's latents are (16, 16, 8), the model's (16, 16, 4)" in refiner.sampling_problems(
      base_config, refiner_config, (np.zeros(3), (16, 16, 4)), (np.zeros(3), (16, 16, 8)))[0]

  from diffusion_jax import evaluate  # the evaluation job scores the ensemble's samples, at every sweep point

  options = dict(config=base_config, num_prompts=4, heldout_examples=4, combination_prompts=0)
  with pytest.raises(ValueError, match="--refiner: --image_to_image: not with a refiner"):
    evaluate.run(tmp_path / "eval", refiner_config=refiner_config, edit_real="image_to_image", **options)
  with pytest.raises(ValueError, match="--denoising_end=0.8 hands over at step 0 of 1: the model would run none"):
    evaluate.run(tmp_path / "eval", refiner_config=refiner_config, sweeps={"steps": ("1",)}, **options)
  [ensemble] = evaluate.run(tmp_path / "eval", refiner_config=refiner_config, **options)
  assert ensemble["settings"]["refiner"] == {"denoising_end": 0.8, "config_hash": record_hash(record),
                                             "aesthetic_scores": [6.0, 2.5]}
  [alone] = evaluate.run(tmp_path / "eval", **options)  # (other settings: evaluated again, without the refiner)
  assert "refiner" not in alone["settings"] and alone["heldout_loss"] == ensemble["heldout_loss"]
  assert alone["fid_random_conv"] != ensemble["fid_random_conv"]


def save_kohya_lora(directory, shapes: dict) -> dict:
  """A kohya-layout LoRA of random updates of the layers `shapes` names ({layer: (down shape, up shape)}), alpha 1:
  directory/kohya.safetensors, and its U-Net's updates alone in kohya_unet.safetensors (diffusers' kohya loader
  fails on text encoders). Returns its tensors."""
  import safetensors.torch

  generator, tensors = torch.Generator().manual_seed(0), {}
  for layer, (down, up) in shapes.items():
    tensors[f"lora_{layer}.lora_down.weight"] = 0.3 * torch.randn(*down, generator=generator)
    tensors[f"lora_{layer}.lora_up.weight"] = 0.3 * torch.randn(*up, generator=generator)
    tensors[f"lora_{layer}.alpha"] = torch.tensor(1.0)
  safetensors.torch.save_file(tensors, directory / "kohya.safetensors")
  safetensors.torch.save_file({k: v for k, v in tensors.items() if k.startswith("lora_unet_")},
                              directory / "kohya_unet.safetensors")
  return tensors


def kohya_fused(pipeline, root, directory, text_width: int):
  """The config of the tiny checkpoint at `root` (diffusers' `pipeline` of it), its initial state, its weights with
  directory/kohya.safetensors fused at 0.7 (--lora), a jitted predict(weights) of random latents at SD's timestep 500
  for random text of text_width, and those latents and text."""
  from configs import stable_diffusion
  from diffusion_jax import lora

  config = stable_diffusion.get_config(str(root))
  config.text.max_length, config.model.dtype, config.data.resolution = 16, "float32", 32
  state, graphdef = train.init_state(config, sharding.make_mesh(config.mesh))
  adapters = [lora.read(f"{directory / 'kohya.safetensors'}:0.7")]
  lora.check(adapters, config)
  weights = lora.fused(sample.Weights(state.params, state.frozen), adapters)
  latents = np.random.default_rng(0).standard_normal((2, 16, 16, 4)).astype(np.float32)
  text = np.random.default_rng(1).standard_normal((2, 16, text_width)).astype(np.float32)
  logsnr = schedules.logsnr_from_alphas_cumprod(pipeline.scheduler.alphas_cumprod.double().numpy()[500])
  predict = jax.jit(lambda w: nnx.merge(graphdef, w.params, w.frozen)(
      latents, jnp.full((2,), logsnr, jnp.float32), text, np.ones((2, 16), bool)))
  return config, state, weights, predict, latents, text


def our_lora_fuses_as_diffusers_fuses_it(pipeline, directory, ours: dict, sdxl: bool, predict, state, expected_fn):
  """Our updates `ours` (name -> array, of the U-Net and text encoders) written in kohya's layout read back as they
  were; the U-Net's, loaded and fused by diffusers' `pipeline` (after unloading what it had), make expected_fn() its
  U-Net's prediction equal to predict() of ours fused into `state`'s weights."""
  import safetensors.numpy

  from diffusion_jax import lora, sd_lora

  safetensors.numpy.save_file(sd_lora.to_kohya(ours, sdxl=sdxl), directory / "ours.safetensors")
  written = lora.read(str(directory / "ours.safetensors"))
  assert written.updates.keys() == ours.keys()
  for key in ours:
    np.testing.assert_allclose(written.updates[key], ours[key], atol=1e-7)
  unet = {name: x for name, x in ours.items() if name.startswith("sd_unet/")}
  safetensors.numpy.save_file(sd_lora.to_kohya(unet, sdxl=sdxl), directory / "ours_unet.safetensors")
  pipeline.unfuse_lora()
  pipeline.unload_lora_weights()
  pipeline.load_lora_weights(directory, weight_name="ours_unet.safetensors")
  pipeline.fuse_lora()
  fused = lora.fused(sample.Weights(state.params, state.frozen), [dataclasses.replace(written, updates=unet)])
  np.testing.assert_allclose(np.asarray(predict(fused)).transpose(0, 3, 1, 2), expected_fn(), atol=5e-5)


def random_lora(make_module, prefix: str) -> dict:
  """Random updates {name: array} of every LoRA layer of the module make_module() builds, named under `prefix`."""
  state = nnx.state(nnx.eval_shape(make_module), nnx.LoRAParam)
  return {f"{prefix}/{lora_name}": 0.2 * np.random.default_rng(i).standard_normal(x.shape).astype(np.float32)
          for i, (lora_name, x) in enumerate((("/".join(map(str, path))), x) for path, x in nnx.to_flat_state(state))}


def test_the_sgm_names_of_sdxls_blocks_are_diffusers_modules():
  """kohya's SDXL files name the U-Net's modules as the SGM U-Net numbers them (2 ResNet blocks a level). An output
  block's module 1 is the level's transformer, or, at a level without one (the SDXL refiner's outermost, whose up
  level diffusers' own conversion maps to its attentions), its upsampler."""
  from diffusion_jax import sd_lora

  for sgm, ours in (("input_blocks 4 1 proj_in", "down_blocks 1 attentions 0 proj_in"),
                    ("input_blocks 3 0 op", "down_blocks 0 downsamplers 0 conv"),
                    ("middle_block 2 in_layers 2", "mid_block resnets 1 conv1"),
                    ("output_blocks 5 1 transformer_blocks 0 attn1 to_q",
                     "up_blocks 1 attentions 2 transformer_blocks 0 attn1 to_q"),
                    ("output_blocks 5 2 conv", "up_blocks 1 upsamplers 0 conv"),
                    ("output_blocks 2 1 conv", "up_blocks 0 upsamplers 0 conv"),
                    ("output_blocks 2 0 skip_connection", "up_blocks 0 resnets 2 conv_shortcut")):
    assert sd_lora.diffusers_parts(sgm.split()) == ours.split(), sgm


def test_stable_diffusion_loras_in_kohyas_and_diffusers_layouts_fuse_as_diffusers_fuses_them(tmp_path):
  """A kohya-layout LoRA (attention, feed-forward, a 1x1 projection, a LoCon 3x3 convolution, the text encoder; alpha
  / rank) fused by --lora at scale 0.7: the U-Net predicts what diffusers' U-Net does after load_lora_weights and
  fuse_lora(0.7), and the text encoder's projection moves by 0.7 alpha / rank up @ down; export --config --lora
  writes a root of exactly those fused weights. The same U-Net updates
  saved by diffusers in its (PEFT's) layout read the same. Ours (of the U-Net and the text encoder) written in kohya's
  layout (sd_lora.to_kohya) read back as they were, and the U-Net's fuse in diffusers as in ours. Updates of layers the
  model lacks are refused by name, as are tensors that are no low-rank update."""
  import diffusers
  import safetensors.numpy
  import safetensors.torch
  from peft.utils import get_peft_model_state_dict

  from diffusion_jax import lora
  from diffusion_jax.data import captioned_shapes

  captions = [" ".join(captioned_shapes.VOCABULARY)] * 5
  pipeline = save_tiny_stable_diffusion(tmp_path / "sd", captions)
  rank = 2
  shapes = {"unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": ((rank, 32), (32, rank)),
            "unet_up_blocks_1_attentions_1_transformer_blocks_0_attn2_to_out_0": ((rank, 32), (32, rank)),
            "unet_mid_block_attentions_0_proj_in": ((rank, 64, 1, 1), (64, rank, 1, 1)),
            "unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj": ((rank, 32), (256, rank)),
            "unet_down_blocks_1_resnets_0_conv1": ((rank, 32, 3, 3), (64, rank, 1, 1)),
            "te_text_model_encoder_layers_1_self_attn_q_proj": ((rank, 32), (32, rank))}
  tensors = save_kohya_lora(tmp_path, shapes)
  pipeline.load_lora_weights(tmp_path, weight_name="kohya_unet.safetensors", adapter_name="kohya")
  diffusers.StableDiffusionPipeline.save_lora_weights(
      tmp_path / "peft", unet_lora_layers=get_peft_model_state_dict(pipeline.unet, adapter_name="kohya"),
      unet_lora_adapter_metadata=pipeline.unet.peft_config["kohya"].to_dict())
  pipeline.fuse_lora(lora_scale=0.7)

  config, state, weights, predict, latents, text = kohya_fused(pipeline, tmp_path / "sd", tmp_path, 32)
  adapters = [lora.read(f"{tmp_path / 'kohya.safetensors'}:0.7")]
  with torch.no_grad():
    expected = pipeline.unet(torch.tensor(latents.transpose(0, 3, 1, 2)), 500, torch.tensor(text)).sample.numpy()
  np.testing.assert_allclose(np.asarray(predict(weights)).transpose(0, 3, 1, 2), expected, atol=5e-5)
  q_proj = lambda w: np.asarray(w.frozen["text_encoder"]["text_model"]["encoder"]["layers"][1]["self_attn"]["q_proj"][
      "kernel"])
  layer = "lora_te_text_model_encoder_layers_1_self_attn_q_proj"
  moved = 0.7 * (1.0 / rank) * (tensors[f"{layer}.lora_up.weight"] @ tensors[f"{layer}.lora_down.weight"]).numpy().T
  np.testing.assert_allclose(q_proj(weights) - q_proj(state), moved, atol=1e-6)
  # Merged into the checkpoint (export --config --lora): the root written holds exactly these fused weights
  from configs import stable_diffusion
  from diffusion_jax import export
  from diffusion_jax.models import text_to_image

  export.export(None, tmp_path / "merged", adapters=adapters, config=config)
  merged = text_to_image.pretrained_weights(stable_diffusion.get_config(str(tmp_path / "merged")))
  assert_trees_equal((merged["sd_unet"], merged["text_encoder"]),
                     (weights.params["sd_unet"], weights.frozen["text_encoder"]))

  theirs = lora.read(str(tmp_path / "peft" / "pytorch_lora_weights.safetensors"))
  product = lambda adapter, key: adapter.updates[key] @ adapter.updates[key.removesuffix("a") + "b"]
  assert sorted(theirs.updates) == sorted(k for k in adapters[0].updates if k.startswith("sd_unet/"))
  for key in (k for k in theirs.updates if k.endswith("/lora_a")):
    np.testing.assert_allclose(product(theirs, key), product(adapters[0], key), atol=1e-6)

  # A LoRA of every attention and feed-forward projection of ours, written in kohya's layout (lora --format=kohya)
  ours = random_lora(lambda: sd_unet.SDUNet(sd_unet.read_config(tmp_path / "sd" / "unet"), rngs=init_rngs.seeded(0),
                                            lora_rank=rank, ff_lora_rank=rank), "sd_unet")
  assert len(ours) == 2 * 4 * 10  # 4 transformers (level 0's down and its two up, the middle's), 10 projections each
  ours |= random_lora(lambda: clip.TextModel(clip.read_text_config(tmp_path / "sd" / "text_encoder"),
                                             rngs=init_rngs.seeded(0), lora_rank=rank), "text_encoder")
  our_lora_fuses_as_diffusers_fuses_it(pipeline, tmp_path, ours, False, predict, state, lambda: pipeline.unet(
      torch.tensor(latents.transpose(0, 3, 1, 2)), 500, torch.tensor(text)).sample.detach().numpy())

  misfit = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_1_attn1_to_q.lora_down.weight": np.ones((2, 32)),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_1_attn1_to_q.lora_up.weight": np.ones((32, 2))}
  safetensors.numpy.save_file({k: v.astype(np.float32) for k, v in misfit.items()}, tmp_path / "sdxl.safetensors")
  with pytest.raises(ValueError, match="transformer_blocks/1/attn1/to_q/kernel is not in this model"):
    lora.check([lora.read(str(tmp_path / "sdxl.safetensors"))], config)
  safetensors.numpy.save_file({"lora_unet_conv_in.diff": np.ones((4, 4), np.float32)}, tmp_path / "diff.safetensors")
  with pytest.raises(ValueError, match="is a Stable Diffusion LoRA that cannot be read: 1 tensors are not low-rank "
                                       "updates .* lora_unet_conv_in.diff"):
    lora.read(str(tmp_path / "diff.safetensors"))


def test_an_inpainting_checkpoint_reads_what_diffusers_inpainting_pipeline_gives_it_and_completes_images(tmp_path):
  """An SD inpainting checkpoint (its U-Net reads 9 channels: the latents, where to generate, the known image's
  latents): configs/stable_diffusion.py:ROOT diffuses its 4 latent channels. For an image and a keep mask, its
  condition is the mask at the latents' size as StableDiffusionInpaintPipeline.prepare_mask_latents makes it and
  the latents of the image with the generated region zeroed, and its prediction is the pipeline's U-Net's of those.
  Its training loss reads images with random rectangles generated anew (editing.training_keep_masks: about a
  quarter of them whole); it completes a masked image, keeping the known pixels exactly, and samples from text
  alone (all of it generated). A latent cache is refused (the masked images need the pixels)."""
  from configs import stable_diffusion
  from diffusion_jax import editing
  from diffusion_jax.data import captioned_shapes

  pipeline = save_tiny_stable_diffusion(tmp_path / "sd", [" ".join(captioned_shapes.VOCABULARY)] * 5,
                                        inpainting=True)
  config = stable_diffusion.get_config(str(tmp_path / "sd"))
  assert config.model.in_channels == 4
  config.text.max_length, config.model.dtype = 16, "float32"
  state, graphdef, images, keep, latents, ids, mask = inpainting_inputs(
      config, tmp_path, "SD's inpainting U-Net reads the latents of each training image with a masked region")
  logsnr = jnp.full((2,), schedules.logsnr_from_alphas_cumprod(pipeline.scheduler.alphas_cumprod.double().numpy()[
      500]), jnp.float32)

  @jax.jit
  def condition_and_prediction(params, frozen):
    model = nnx.merge(graphdef, params, frozen)
    condition = model.inpainting_condition(images, keep)
    return condition, model(latents, logsnr, model.encode(ids, mask), mask, condition=condition)

  condition, prediction = condition_and_prediction(state.params, state.frozen)
  as_torch = lambda x: torch.tensor(np.asarray(x).transpose(0, 3, 1, 2))
  with torch.no_grad():
    text, _ = pipeline.encode_prompt(PROMPTS, "cpu", 1, False)
    masked = pipeline.vae.encode(as_torch(images * keep)).latent_dist.mean * pipeline.vae.config.scaling_factor
    generated, masked = pipeline.prepare_mask_latents(1 - as_torch(keep), masked, 2, 32, 32, torch.float32, "cpu",
                                                      None, False)
    expected = pipeline.unet(torch.cat([as_torch(latents), generated, masked], 1), 500, text).sample.numpy()
  np.testing.assert_array_equal(as_torch(condition["mask"]).numpy(), generated.numpy())
  np.testing.assert_allclose(as_torch(condition["masked_latents"]).numpy(), masked.numpy(), atol=2e-5)
  np.testing.assert_allclose(np.asarray(prediction).transpose(0, 3, 1, 2), expected, atol=1e-4)
  masks = np.asarray(editing.training_keep_masks(jax.random.key(0), (64, 32, 32)))
  whole = (masks == 0).all(axis=(1, 2, 3))
  assert 5 < whole.sum() < 30 and ((masks[~whole] == 0).any(axis=(1, 2, 3)) & (masks[~whole] == 1).any(axis=(1, 2, 3))
                                   ).all()

  assert_trains_and_completes(config, graphdef, state, images, ids, mask)


PROMPTS = ["a large red circle", "two small blue squares"]


def inpainting_inputs(config, tmp_path, refusal: str):
  """An inpainting checkpoint's config (SD's, FLUX.1 Fill's) made a tiny run on 32 px captioned_shapes, checked (a
  latent cache refused, saying `refusal`), and inputs for it: (state, graphdef, images [2, 32, 32, 3], keep masks
  [2, 32, 32, 1] (a rectangle; the right half from column 17, a latent pixel half kept), latents [2, 16, 16, 4],
  the ids and mask of PROMPTS)."""
  config.data.update(dataset="captioned_shapes", resolution=32, num_train=64, num_eval=16,
                     data_dir=str(tmp_path / "tfds"))
  config.sample.update(steps=2, prompts=("a large red circle",))
  assert config_checks.problems(config, device_count=8) == []
  bad = config.copy_and_resolve_references()
  bad.latent.cache = str(tmp_path / "latents")
  assert refusal in " ".join(config_checks.problems(bad, device_count=8))
  from diffusion_jax.text import tokenizers

  state, graphdef = train.init_state(config, sharding.make_mesh(config.mesh))
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  keep = np.ones((2, 32, 32, 1), np.float32)
  keep[0, 8:24, 4:20], keep[1, :, 17:] = 0, 0
  latents = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
  return (state, graphdef, images, keep, latents) + tokenizers.from_config(config)(PROMPTS)


def assert_trains_and_completes(config, graphdef, state, images, ids, mask):
  """An inpainting model's training loss (a random keep mask's condition for each image) is finite, and it completes
  masked pictures keeping their known pixels exactly, and samples from text alone (all of it generated)."""
  from diffusion_jax.text import tokenizers

  batch = {"image": images, "text_ids": ids, "text_mask": mask}
  loss = jax.jit(train.make_loss_fn(config, graphdef))(state.params, state.frozen, batch, jax.random.key(0), None)[0]
  assert np.isfinite(float(loss))
  picture = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), np.uint8)
  known = np.ones((2, 32, 32), bool)
  known[:, 8:24, 8:24] = False
  sample_config = config.sample.copy_and_resolve_references()
  sample_config.update(steps=2, num_per_prompt=1)
  generate = lambda **edit: sample.generate(config, graphdef, state.params, state.frozen, tokenizers.from_config(
      config), PROMPTS, sample_config, sharding.make_mesh(config.mesh), **edit)[:, 0]
  completed = generate(init_images=picture, keep_masks=known)
  np.testing.assert_array_equal(completed[known], picture[known])
  assert not np.array_equal(completed[~known], picture[~known])
  assert generate().shape == (2, 32, 32, 3)


def test_sdxl_loras_in_kohyas_layout_fuse_as_diffusers_fuses_them(tmp_path):
  """An SDXL LoRA in kohya's layout, its U-Net's modules named as the SGM U-Net names them (a transformer's
  attention, the middle block's projection, LoCon's 3x3 convolutions of a ResNet block, a downsampler and an
  upsampler, a 1x1 shortcut, the added embedding; both text encoders', te1 and te2), fused by --lora at scale 0.7
  into a tiny SDXL checkpoint of 2 ResNet blocks a level: the U-Net predicts what diffusers' does after
  load_lora_weights and fuse_lora(0.7), and each text encoder's layer moves by 0.7 alpha / rank up @ down. Our
  updates (of the U-Net and both text encoders) written in that layout (sd_lora.to_kohya) read back as they were, and
  the U-Net's fuse in diffusers as in ours. export --config --lora merges the kohya LoRA into a root, and a single
  file, of exactly the fused weights."""
  from diffusion_jax.data import captioned_shapes

  captions = [" ".join(captioned_shapes.VOCABULARY)] * 5
  pipeline = save_tiny_stable_diffusion(tmp_path / "sdxl", captions, sdxl=True, layers_per_block=2)
  rank = 2
  shapes = {"unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k": ((rank, 48), (64, rank)),
            "unet_output_blocks_1_1_transformer_blocks_0_attn1_to_out_0": ((rank, 64), (64, rank)),
            "unet_middle_block_1_proj_in": ((rank, 64), (64, rank)),
            "unet_input_blocks_1_0_in_layers_2": ((rank, 32, 3, 3), (32, rank, 1, 1)),
            "unet_input_blocks_3_0_op": ((rank, 32, 3, 3), (32, rank, 1, 1)),
            "unet_output_blocks_2_2_conv": ((rank, 64, 3, 3), (64, rank, 1, 1)),
            "unet_output_blocks_4_0_skip_connection": ((rank, 64, 1, 1), (32, rank, 1, 1)),
            "unet_label_emb_0_0": ((rank, POOLED + 48), (128, rank)),
            "te1_text_model_encoder_layers_1_self_attn_q_proj": ((rank, 32), (32, rank)),
            "te2_text_model_encoder_layers_0_mlp_fc1": ((rank, 16), (32, rank))}
  tensors = save_kohya_lora(tmp_path, shapes)
  pipeline.load_lora_weights(tmp_path, weight_name="kohya_unet.safetensors")
  pipeline.fuse_lora(lora_scale=0.7)

  config, state, weights, predict, latents, text = kohya_fused(pipeline, tmp_path / "sdxl", tmp_path, 48 + POOLED)
  with torch.no_grad():
    added = {"text_embeds": torch.tensor(text[:, 0, 48:]), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
    expected = pipeline.unet(torch.tensor(latents.transpose(0, 3, 1, 2)), 500, torch.tensor(text[..., :48]),
                             added_cond_kwargs=added).sample.numpy()
  np.testing.assert_allclose(np.asarray(predict(weights)).transpose(0, 3, 1, 2), expected, atol=5e-5)
  for layer, path in (("te1_text_model_encoder_layers_1_self_attn_q_proj", ("first", 1, "self_attn", "q_proj")),
                      ("te2_text_model_encoder_layers_0_mlp_fc1", ("second", 0, "mlp", "fc1"))):
    model, index, module, projection = path
    kernel = lambda w: np.asarray(w.frozen["text_encoder"][model]["text_model"]["encoder"]["layers"][index][module][
        projection]["kernel"])
    moved = 0.7 * (1.0 / rank) * (tensors[f"lora_{layer}.lora_up.weight"] @ tensors[f"lora_{layer}.lora_down.weight"])
    np.testing.assert_allclose(kernel(weights) - kernel(state), moved.numpy().T, atol=1e-6)
  # Merged into the checkpoint (export --config --lora --single_file): both text encoders written, and the single
  # file read back, hold exactly these fused weights
  from configs import stable_diffusion
  from diffusion_jax import export, lora, single_file
  from diffusion_jax.models import text_to_image

  adapters = [lora.read(f"{tmp_path / 'kohya.safetensors'}:0.7")]
  export.export(None, tmp_path / "merged", single=tmp_path / "merged.safetensors", adapters=adapters, config=config)
  single_file.convert(tmp_path / "merged.safetensors", tmp_path / "sdxl", tmp_path / "read_back")
  for root in ("merged", "read_back"):
    merged = text_to_image.pretrained_weights(stable_diffusion.get_config(str(tmp_path / root)))
    assert_trees_equal((merged["sd_unet"], merged["text_encoder"]),
                       (weights.params["sd_unet"], weights.frozen["text_encoder"]))

  # A LoRA of every attention and feed-forward projection of ours, written in kohya's SDXL layout (lora --format=kohya)
  ours = random_lora(lambda: sd_unet.SDUNet(sd_unet.read_config(tmp_path / "sdxl" / "unet"), rngs=init_rngs.seeded(0),
                                            lora_rank=rank, ff_lora_rank=rank), "sd_unet")
  assert len(ours) == 2 * 12 * 10  # 12 transformer blocks (4 down, 2 middle, 6 up), 10 projections each
  ours |= random_lora(lambda: sdxl_text.TextEncoders(
      clip.read_text_config(tmp_path / "sdxl" / "text_encoder"), clip.read_text_config(
          tmp_path / "sdxl" / "text_encoder_2"), rngs=init_rngs.seeded(0), lora_rank=rank), "text_encoder")
  our_lora_fuses_as_diffusers_fuses_it(pipeline, tmp_path, ours, True, predict, state, lambda: pipeline.unet(
      torch.tensor(latents.transpose(0, 3, 1, 2)), 500, torch.tensor(text[..., :48]),
      added_cond_kwargs=added).sample.detach().numpy())


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_sampling_steps_on_the_timesteps_sds_schedulers_take(spacing):
  """sample.timestep_spacing (configs/stable_diffusion.py: the scheduler's, leading with steps_offset 1 for SD 1.x
  and 2.x): the U-Net reads, step by step, the timesteps of diffusers' Euler scheduler of SD's table (fractional
  ones for linspace), then the grid ends clean. The spacing is refused for a schedule that is no DDPM table, an
  offset for other than leading ones."""
  import diffusers

  from configs import stable_diffusion

  config = stable_diffusion.get_config()
  assert (config.sample.timestep_spacing, config.sample.steps_offset) == ("leading", 1)
  config.sample.update(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0, steps=25)
  scheduler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                               timestep_spacing=spacing, steps_offset=config.sample.steps_offset)
  scheduler.set_timesteps(25)
  grid = sample.sampling_logsnr(config, config.sample)
  np.testing.assert_allclose(sd_unet.timestep(grid[:-1]), scheduler.timesteps.numpy(), atol=0.02)
  assert grid[-1] == np.inf
  config.diffusion.schedule, config.sample.steps_offset = "cosine", 2
  assert (f"sample.timestep_spacing={spacing!r} spaces a DDPM table's timesteps; this model's schedule is 'cosine'"
          in config_checks.timestep_spacing_problem(config, config.sample, "sample."))
  config.diffusion.schedule = "scaled_linear"
  problem = config_checks.timestep_spacing_problem(config, config.sample, "sample.")
  assert problem is None if spacing == "leading" else "sample.steps_offset=2: shifts leading timesteps" in problem


SD21 = dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True)
SDXL = dict(block_out_channels=[320, 640, 1280], down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2,
            up_block_types=["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"], attention_head_dim=[5, 10, 20],
            transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, use_linear_projection=True)


@pytest.mark.parametrize("fields, at_least", [(SD21, 8.5e8), (SDXL, 2.5e9)], ids=["sd21", "sdxl"])
def test_the_real_size_has_diffusers_parameter_count(fields, at_least):
  """SD 2.1's and SDXL base's U-Net configs (diffusers' defaults but what their config.json sets: 4 levels of 2
  ResNet blocks, SDXL's 1, 2 and 10 transformer blocks a level, which the tiny tests do not reach): our module's
  parameter count (shapes only, nothing allocated) is diffusers' (built on PyTorch's meta device)."""
  import diffusers

  assert sd_unet.config_problems(fields) == []
  with torch.device("meta"):
    expected = sum(p.numel() for p in diffusers.UNet2DConditionModel(**fields).parameters())
  ours = nnx.eval_shape(lambda: sd_unet.SDUNet(fields, rngs=init_rngs.seeded(0)))
  assert sum(x.size for x in jax.tree.leaves(nnx.state(ours, nnx.Param))) == expected > at_least
