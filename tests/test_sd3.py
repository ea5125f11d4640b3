"""Stable Diffusion 3: the MMDiT transformer (models/sd3_transformer.py) against diffusers' SD3Transformer2DModel, and
configs/stable_diffusion3.py on a tiny checkpoint's folders against diffusers' StableDiffusion3Pipeline."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from conftest import exported_run_holds_the_fused_pipeline
from test_sd_unet import save_tiny_clip_tokenizer

from diffusion_jax import config_checks, media, sample, train
from diffusion_jax.models import init_rngs, sd3_transformer, text_to_image


def save_tiny_sd3_transformer(directory, **fields):
  """A 2-block SD3Transformer2DModel (2 heads of 8; text tokens 40 wide, pooled 16) with random weights, perturbed
  off diffusers' zero initialisations, saved as an SD3 checkpoint's transformer/ folder; returns it."""
  import diffusers

  torch.manual_seed(0)
  model = diffusers.SD3Transformer2DModel(**{
      "sample_size": 16, "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 2,
      "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 40, "caption_projection_dim": 16,
      "pooled_projection_dim": 16, "pos_embed_max_size": 12} | fields).eval()
  with torch.no_grad():
    for name, parameter in model.named_parameters():
      if "pos_embed.pos_embed" not in name:
        parameter.add_(0.1 * torch.randn_like(parameter))
  model.save_pretrained(directory)
  return model


@pytest.mark.parametrize("variant", ["sd3", "sd35"])
def test_the_transformer_predicts_what_diffusers_sd3_transformer_does(tmp_path, variant):
  """SD 3's layout, and SD 3.5 Medium's (a second self-attention in the first block, queries and keys RMS-normalised
  per head): loaded from a diffusers directory, a non-square latent image's prediction (its patches a centred crop of
  the position table) equals diffusers' to float rounding, as does its prediction with a block left out (skip-layer
  guidance's); the position table diffusers initialises is ours. Too many
  patches and an unsupported config are refused, saying why."""
  fields = {"dual_attention_layers": (0,), "qk_norm": "rms_norm"} if variant == "sd35" else {}
  reference = save_tiny_sd3_transformer(tmp_path / "transformer", **fields)
  ours = sd3_transformer.load_diffusers(tmp_path / "transformer")
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 12, 4)).astype(np.float32)  # 4 x 6 patches
  text, pooled = rng.standard_normal((2, 7, 40)).astype(np.float32), rng.standard_normal((2, 16)).astype(np.float32)
  timestep = np.array([900.0, 30.0], np.float32)
  with torch.no_grad():
    expected = reference(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(text), torch.from_numpy(pooled),
                         torch.from_numpy(timestep)).sample.permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(ours(jnp.asarray(x), jnp.asarray(timestep), jnp.asarray(text), jnp.asarray(pooled)),
                             expected, atol=2e-5)
  fresh = sd3_transformer.SD3Transformer(sd3_transformer.read_config(tmp_path / "transformer"), rngs=nnx.Rngs(0))
  np.testing.assert_allclose(fresh.pos_embed.pos_embed[...], reference.pos_embed.pos_embed.numpy(), atol=1e-5)
  with torch.no_grad():  # skip-layer guidance's pass: a block left out
    skipped = reference(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(text), torch.from_numpy(pooled),
                        torch.from_numpy(timestep), skip_layers=[0]).sample.permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(ours(jnp.asarray(x), jnp.asarray(timestep), jnp.asarray(text), jnp.asarray(pooled),
                                  skip_layers=(0,)), skipped, atol=2e-5)
  assert np.abs(skipped - expected).max() > 1e-2
  with pytest.raises(ValueError, match="14 x 6 patches: SD3's position table covers at most 12 a side"):
    ours(jnp.zeros((1, 28, 12, 4)), jnp.asarray(timestep[:1]), jnp.asarray(text[:1]), jnp.asarray(pooled[:1]))
  assert sd3_transformer.config_problems({"caption_projection_dim": 32, "num_attention_heads": 2,
                                          "attention_head_dim": 8, "qk_norm": "layer_norm"}) == [
      "caption_projection_dim=32: the text tokens join the image tokens' attention, so it must be the model width "
      "(num_attention_heads x attention_head_dim = 16)",
      "qk_norm='layer_norm': only None (SD 3) and 'rms_norm' (SD 3.5) are supported"]


class SentencePieceT5Tokenizer:
  """transformers' T5 tokenizer as SD3's pipelines call it (the prompt's pieces, end-of-sequence, padding with 0 to
  max_length), from sentencepiece itself: the pipeline's tokenizer_3."""

  def __init__(self, model_file):
    import sentencepiece

    self.processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))

  def __call__(self, prompts, padding="max_length", max_length=None, **_):
    rows = [self.processor.encode(p) + [self.processor.eos_id()] for p in prompts]
    length = max_length if padding == "max_length" else max(map(len, rows))
    rows = [(row[:length - 1] + row[-1:] if len(row) > length else row) + [0] * (length - len(row)) for row in rows]
    return type("Encoding", (), {"input_ids": torch.tensor(rows)})

  def batch_decode(self, ids):  # (the pipeline's warning of a truncated prompt)
    return [self.processor.decode(row.tolist()) for row in ids]

  added_tokens_encoder = {}  # (Flux's pipeline looks for textual-inversion tokens)

  def tokenize(self, prompt):
    return self.processor.encode(prompt, out_type=str)


def save_tiny_sd3(root, captions):
  """A Stable Diffusion 3 checkpoint's folders with tiny random models: transformer/ (save_tiny_sd3_transformer),
  text_encoder/ and text_encoder_2/ (2-layer CLIPTextModelWithProjections of width 16 projecting to 8), tokenizer/
  and tokenizer_2/ (CLIP's BPE; the second pads with "!"), text_encoder_3/ (a 1-layer T5 encoder of width 40) and
  tokenizer_3/spiece.model, vae/ (a factor-2 VAE with 4 latent channels, SD3's latent shift and no quant
  convolutions) and scheduler/ (flow matching, shift 3). Returns diffusers' StableDiffusion3Pipeline of them."""
  import diffusers
  import transformers

  from diffusion_jax.text import tokenizers

  transformer = save_tiny_sd3_transformer(root / "transformer")
  vocab = save_tiny_clip_tokenizer(root / "tokenizer", captions)
  save_tiny_clip_tokenizer(root / "tokenizer_2", captions, pad_token="!")
  torch.manual_seed(0)
  clip_config = transformers.CLIPTextConfig(
      vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
      max_position_embeddings=16, bos_token_id=vocab - 2, eos_token_id=vocab - 1, projection_dim=8)
  encoders = [transformers.CLIPTextModelWithProjection(clip_config).eval() for _ in range(2)]
  for encoder, folder in zip(encoders, ("text_encoder", "text_encoder_2")):
    encoder.save_pretrained(root / folder)
  (root / "tokenizer_3").mkdir()
  spiece = tokenizers.train_sentencepiece(captions, root / "tokenizer_3" / "spiece", vocab_size=30)
  t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=32, d_model=40, d_kv=8, d_ff=48, num_layers=1,
                                                         num_heads=2, feed_forward_proj="gated-gelu")).eval()
  t5.save_pretrained(root / "text_encoder_3")
  vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                                norm_num_groups=4, sample_size=32, shift_factor=0.1, scaling_factor=1.5,
                                use_quant_conv=False, use_post_quant_conv=False).eval()
  vae.save_pretrained(root / "vae")
  scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
  scheduler.save_pretrained(root / "scheduler")
  tokenizer = lambda folder, **pad: transformers.CLIPTokenizer(
      str(root / folder / "vocab.json"), str(root / folder / "merges.txt"), model_max_length=16, **pad)
  return diffusers.StableDiffusion3Pipeline(transformer, scheduler, vae, encoders[0], tokenizer("tokenizer"),
                                            encoders[1], tokenizer("tokenizer_2", pad_token="!"), t5,
                                            SentencePieceT5Tokenizer(spiece))


def tiny_lora_run(config, tmp_path):
  """A checkpoint config (SD3's, Flux's) made a seconds-long float32 LoRA run (rank 2, attention and feed-forward;
  the config's remat) of 2 steps on 32 px captioned_shapes, 16 CLIP and 8 T5 tokens, sampling 2 steps."""
  config.model.update(dtype="float32", lora_rank=2, lora_feed_forward=True)  # (remat: the configs' own)
  config.text.update(max_length=16, t5_max_length=8)
  config.text.t5.dtype = "float32"
  config.data.update(dataset="captioned_shapes", resolution=32, num_train=64, num_eval=16,
                     data_dir=str(tmp_path / "tfds"))
  config.train.update(batch_size=8, steps=2, checkpoint_every=2, log_every=1, sample_every=0)
  config.optimizer.update(learning_rate=1e-2, warmup_steps=0)  # (2 steps that move the updates measurably)
  config.sample.update(steps=2, prompts=("a large red circle",))


def trained_lora_run(config, tmp_path, network: str, described_lines) -> tuple:
  """Train `config`'s LoRA run in tmp_path/run and check it: the pretrained parts (`network`, the text encoders, the
  autoencoder) are the checkpoint's as loaded, only the LoRA's updates trained (and moved), samples written, and the
  exported adapter described with `described_lines`. Returns its (weights, graphdef)."""
  from diffusion_jax import lora

  train.train_and_evaluate(config, tmp_path / "run")
  _, weights, graphdef, *_ = sample.load_checkpoint(tmp_path / "run", use_ema=False)
  loaded = text_to_image.pretrained_weights(config)
  for name in (network, "text_encoder", "autoencoder"):
    jax.tree.map(np.testing.assert_array_equal, weights.frozen[name], loaded[name])
  updates = jax.tree_util.tree_flatten_with_path(weights.params)[0]
  assert updates and all(text_to_image.is_lora(tuple(str(getattr(k, "key", k)) for k in path)) for path, _ in updates)
  assert max(float(np.abs(x).max()) for path, x in updates if "lora_b" in jax.tree_util.keystr(path)) > 0
  assert sample.run(tmp_path / "run", {"steps": 2}, output_dir=tmp_path / "out").exists()
  lora.export(tmp_path / "run", tmp_path / "adapter.safetensors", use_ema=False)
  described = lora.describe(lora.read(str(tmp_path / "adapter.safetensors")))
  for line in described_lines:
    assert line in described, described
  return weights, graphdef


def test_sd3_reads_a_checkpoints_folders_fine_tunes_a_lora_and_samples(tmp_path):
  """configs/stable_diffusion3.py:ROOT reads an SD3 checkpoint's folders (flow path, shift 3 from its scheduler,
  guidance 7). The text condition is what StableDiffusion3Pipeline.encode_prompt makes (both CLIPs' penultimate
  states, padded to the T5's width, then T5's states; both pooled embeddings), the null condition its encoding of
  the empty negative prompt, and the network's prediction its transformer's at the flow timestep. A LoRA of it
  (attention and feed-forward) trains only its updates on captioned_shapes, describes itself and samples; written in
  diffusers' layout, the pipeline with it fused predicts what the trained model does, and read back it fits; the run
  exported whole (export.py) holds the fused pipeline's transformer. Without
  the second encoder or T5's tokenizer, with a T5 path holding another model, on the variance-preserving path or told
  FLUX.1 dev's guidance scale, the config check says what is wrong, as it does of samples wider than the position
  table covers, and of skip-layer guidance of blocks it lacks or without classifier-free guidance. Sampled with
  skip-layer guidance (--skip_layers), its images change."""
  from configs import stable_diffusion3
  from diffusion_jax import lora
  from diffusion_jax.data import captioned_shapes
  from diffusion_jax.text import tokenizers

  pipeline = save_tiny_sd3(tmp_path / "sd3", [" ".join(captioned_shapes.VOCABULARY)] * 5)
  config = stable_diffusion3.get_config(str(tmp_path / "sd3"))
  assert (config.model.sd3_path, config.text.t5_encoder_path, config.text.spiece_path, config.sample.flow_shift,
          config.diffusion.schedule_params.shift, config.sample.guidance_scale) == (
      str(tmp_path / "sd3" / "transformer"), str(tmp_path / "sd3" / "text_encoder_3"),
      str(tmp_path / "sd3" / "tokenizer_3" / "spiece.model"), 3.0, 3.0, 7.0)
  tiny_lora_run(config, tmp_path)
  assert config_checks.problems(config, device_count=8) == []
  bad = config.copy_and_resolve_references()
  bad.text.second_encoder_path = ""
  assert "SD3's transformer reads two CLIP text encoders and a T5: set text.second_encoder_path" in " ".join(
      config_checks.problems(bad, device_count=8))
  bad = config.copy_and_resolve_references()
  bad.text.t5_encoder_path = str(tmp_path / "sd3" / "text_encoder")
  assert "text_encoder' holds no T5 encoder: its config.json (model_type 'clip_text_model') lacks d_model" in " ".join(
      config_checks.problems(bad, device_count=8))
  bad = config.copy_and_resolve_references()
  bad.sample.width = 52  # 2 x 2 latent pixels a patch, 2 x 2 pixels a latent pixel: 13 patches, the table 12
  assert config_checks.problems(bad, device_count=8) == [
      "sample.width=52 is 13 of SD3's patches, and its position table covers at most 12 a side: at most 48 pixels"]
  bad = config.copy_and_resolve_references()
  bad.diffusion.path, bad.text.spiece_path, bad.sample.flux_guidance = "vp", "", 3.5
  bad.sample.skip_layers = (1, 2)
  found = " ".join(config_checks.problems(bad, device_count=8))
  for problem in ("diffusion.path='vp', diffusion.prediction='flow': SD3's transformer predicts the velocity",
                  "sample.skip_layers=1,2: the transformer has blocks 0 to 1",
                  "sample.flux_guidance=3.5: the guidance scale a guidance-distilled Flux (FLUX.1 dev: "
                  "guidance_embeds) is told to follow; this model reads none",
                  "text.t5_encoder_path reads T5's ids: set text.spiece_path"):
    assert problem in found, found

  bad = config.copy_and_resolve_references()
  bad.sample.update(skip_layers=(0,), guidance_scale=1.0)
  assert config_checks.problems(bad, device_count=8) == [
      "sample.skip_layers=0: skip-layer guidance is added to classifier-free guidance, which guidance_scale=1 turns "
      "off (as StableDiffusion3Pipeline)"]
  bad.sample.update(guidance_scale=7.0, skip_layer_scale=-1.0)
  assert config_checks.problems(bad, device_count=8) == ["sample.skip_layer_scale=-1.0 must be >= 0"]
  bad.sample.update(skip_layer_scale=2.8, skip_layer_start=0.5, skip_layer_stop=0.2)
  assert config_checks.problems(bad, device_count=8) == [
      "sample.skip_layer_start=0.5, sample.skip_layer_stop=0.2: fractions of the steps, 0 <= start < stop <= 1"]

  weights, graphdef = trained_lora_run(config, tmp_path, "sd3", (
      f"for a model: Stable Diffusion 3's transformer of {tmp_path / 'sd3' / 'transformer'}",
      # 2 blocks' joint attention: 8 projections, 7 in the last (its text output unused); 3 feed-forward layers' 2
      "joint attention: 15 layers", "feed-forward: 6 layers"))
  # Skip-layer guidance (sample --skip_layers) at the second of 2 steps: other images, their provenance saying so
  sample.run(tmp_path / "run", {"steps": 2, "skip_layers": (0,), "skip_layer_start": 0.0,
                                "skip_layer_stop": 1.0}, output_dir=tmp_path / "skipped")
  skipped_image, default_image = (media.read_image(tmp_path / folder / "p000_00.png").astype(np.float32)
                                  for folder in ("skipped", "out"))
  assert np.abs(skipped_image - default_image).max() > 0
  assert json.loads(media.read_provenance(tmp_path / "skipped" / "p000_00.png")["skip_layer_guidance"]) == {
      "layers": [0], "scale": 2.8, "start": 0.0, "stop": 1.0}

  # The condition, the null condition and the prediction of the base weights (the LoRA's updates zeroed) and of the
  # trained ones, against the pipeline's, then with the LoRA written in diffusers' layout fused into it
  prompts = ["a large red circle at the top left", "two small blue squares"]
  ids, mask = tokenizers.from_config(config)(prompts)
  assert ids.shape == (2, 16 + 16 + 8) and mask.shape == (2, 16 + 8)
  latents = np.random.default_rng(0).standard_normal((2, 16, 16, 4)).astype(np.float32)
  sigma = 0.7
  logsnr = jnp.full((2,), 2 * np.log((1 - sigma) / sigma), jnp.float32)
  run = nnx.jit(lambda model: (lambda text: (text, model.null_condition(text, mask)[0], model(latents, logsnr, text,
                                                                                              mask)))(
      model.encode(ids, mask)))
  text, null, prediction = run(nnx.merge(graphdef, jax.tree.map(jnp.zeros_like, weights.params), weights.frozen))
  trained_prediction = run(nnx.merge(graphdef, weights.params, weights.frozen))[2]

  def diffusers_condition_and_prediction():
    with torch.no_grad():
      text, negative, pooled, negative_pooled = pipeline.encode_prompt(
          prompts, None, None, device="cpu", do_classifier_free_guidance=True, max_sequence_length=8)
      prediction = pipeline.transformer(torch.tensor(latents.transpose(0, 3, 1, 2)), text, pooled,
                                        torch.full((2,), 1000 * sigma)).sample.numpy().transpose(0, 2, 3, 1)
    return text.numpy(), negative.numpy(), pooled.numpy(), negative_pooled.numpy(), prediction

  expected, negative, pooled, negative_pooled, expected_prediction = diffusers_condition_and_prediction()
  np.testing.assert_allclose(text[..., :40], expected, atol=2e-5)
  np.testing.assert_allclose(text[:, 0, 40:], pooled, atol=2e-5)
  assert nnx.merge(graphdef, weights.params, weights.frozen).token_width == 40  # (where a text-embedding cache stores
  # the pooled embedding apart)
  np.testing.assert_allclose(null[..., :40], negative, atol=2e-5)
  np.testing.assert_allclose(null[:, 0, 40:], negative_pooled, atol=2e-5)
  np.testing.assert_allclose(prediction, expected_prediction, atol=1e-4)
  lora.export(tmp_path / "run", tmp_path / "diffusers.safetensors", use_ema=False, layout="diffusers")
  pipeline.load_lora_weights(str(tmp_path / "diffusers.safetensors"))
  pipeline.fuse_lora()
  assert np.abs(trained_prediction - prediction).max() > 1e-2  # (the LoRA changed the prediction)
  np.testing.assert_allclose(trained_prediction, diffusers_condition_and_prediction()[-1], atol=1e-4)
  exported_run_holds_the_fused_pipeline(tmp_path / "run", pipeline, ("transformer", "text_encoder", "vae"))
  # read back, its updates ('transformer/...', whose the file does not say) fit this model, fused as trained
  adapter = lora.read(str(tmp_path / "diffusers.safetensors"))
  lora.check([adapter], config)
  fused = lora.fuse(jax.device_get(weights.frozen), [adapter])["sd3"]["transformer_blocks"][0]["attn"]["to_q"]
  trained = weights.params["sd3"]["transformer_blocks"][0]["attn"]
  np.testing.assert_allclose(fused["kernel"], weights.frozen["sd3"]["transformer_blocks"][0]["attn"]["to_q"]["kernel"]
                             + trained["to_q_lora"]["lora_a"] @ trained["to_q_lora"]["lora_b"], atol=1e-6)


SD3_MEDIUM = {"num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536, "pos_embed_max_size": 192}
SD35_LARGE = {"num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432, "pos_embed_max_size": 192,
              "qk_norm": "rms_norm"}
SD35_MEDIUM = SD3_MEDIUM | {"pos_embed_max_size": 384, "qk_norm": "rms_norm", "dual_attention_layers": tuple(range(13))}


@pytest.mark.parametrize("fields, at_least", [(SD3_MEDIUM, 2e9), (SD35_MEDIUM, 2.2e9), (SD35_LARGE, 8e9)],
                         ids=["sd3_medium", "sd35_medium", "sd35_large"])
def test_the_real_size_has_diffusers_parameter_count(fields, at_least):
  """SD 3 Medium's, SD 3.5 Medium's and SD 3.5 Large's transformer configs (diffusers' defaults but what their
  config.json sets): our module's parameter count (shapes only, nothing allocated) is diffusers' (built on PyTorch's
  meta device)."""
  import diffusers

  assert sd3_transformer.config_problems(fields) == []
  with torch.device("meta"):
    expected = sum(p.numel() for p in diffusers.SD3Transformer2DModel(**fields).parameters())
  ours = nnx.eval_shape(lambda: sd3_transformer.SD3Transformer(fields, rngs=init_rngs.seeded(0)))
  assert sum(x.size for x in jax.tree.leaves(nnx.state(ours, nnx.Param))) == expected > at_least
