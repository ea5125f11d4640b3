"""Fine-tuning Flux (a diffusers checkpoint: FLUX.1 dev or schnell) on your images: its transformer
(model.backbone='flux', trained; usually as a LoRA: --config.model.lora_rank=16
--config.optimizer.learning_rate=1e-4), CLIP and T5 text encoders and VAE
(frozen), read from the checkpoint's folders, on the flow path with the velocity loss (flow_mse), training time
shifted by its scheduler's `shift` (3 for dev, 1 for schnell), as diffusers' Flux fine-tuning scripts. FLUX.1 dev
is guidance-distilled: it reads the guidance scale it follows (model.flux_guidance 3.5, in training too) and samples
without classifier-free guidance (sample.guidance_scale 1), 28 flow Euler steps time-shifted for the samples'
token count (Flux's dynamic shift, sample.resolution_shift: e^mu, 3.16 at 1024 px; --flow_shift overrides it);
schnell 4 steps unshifted. A FLUX.1 Kontext root (its model_index.json's FluxKontextPipeline) sets
model.flux_kontext: `sample --init_image` then gives the model a reference image (an edit's source) to attend to,
and it trains on edit pairs with --config.data.reference_key=reference (a folder prepared with folder_dataset
--references).

  python -m diffusion_jax.main --config=configs/flux.py:/path/to/FLUX.1-dev --workdir=DIR \\
      --config.data.folder=/path/to/images --config.data.captions_file=/path/to/images/captions.jsonl

The variant is the checkpoint's root directory: transformer/, text_encoder/ (CLIP), text_encoder_2/ (T5),
tokenizer/, tokenizer_2/spiece.model, vae/ and scheduler/scheduler_config.json are read from it (the config check
names a missing or mismatched one). The images are scaled to cover 1024 px and cropped. Without a root
(`configs/flux.py`) the paths are empty, for the command line to give.
"""

import ml_collections

from configs import base


def get_config(root: str = ""):
  config = base.get_config()
  part, read = base.checkpoint_root(root)
  transformer, scheduler = read("transformer", "config.json"), read("scheduler", "scheduler_config.json")
  guided = transformer.get("guidance_embeds", True)  # FLUX.1 dev's (schnell: False)
  latents = (transformer.get("out_channels") or transformer.get("in_channels", 64)) // 4  # (2 x 2 packed; FLUX.1
  # Fill reads more channels than it predicts: the known image's latents and the mask)
  kontext = read("model_index.json").get("_class_name") == "FluxKontextPipeline"  # FLUX.1 Kontext's checkpoint
  config.model.update(backbone="flux", flux_path=part("transformer"), in_channels=latents, flux_guidance=3.5,
                      flux_kontext=kontext, dtype="bfloat16", remat=True, remat_policy="matmuls")
  config.text.update(pretrained_path=part("text_encoder"), t5_encoder_path=part("text_encoder_2"), tokenizer="clip",
                     tokenizer_path=part("tokenizer"), spiece_path=part("tokenizer_2", "spiece.model"),
                     max_length=77, t5_max_length=512 if guided else 256, trainable=False)
  config.text.t5.dtype = "bfloat16"  # T5 v1.1 XXL's 4.7B weights: 9.5 GB
  config.latent.autoencoder_path = part("vae")
  config.diffusion.update(path="flow", prediction="flow", weighting="flow_mse", schedule="flow")
  config.diffusion.schedule_params = ml_collections.ConfigDict(dict(shift=scheduler.get("shift", 3.0 if guided
                                                                                         else 1.0)))
  config.data.update(dataset="folder", resolution=1024)
  resolution_shift = tuple(scheduler.get(key, default) for key, default in (
      ("base_image_seq_len", 256), ("max_image_seq_len", 4096), ("base_shift", 0.5), ("max_shift", 1.15)))
  dynamic = scheduler.get("use_dynamic_shifting", guided)
  config.optimizer.update(learning_rate=1e-5, warmup_steps=100, schedule="constant", weight_decay=0.0)
  config.train.update(batch_size=8, steps=2000, ema_decays=(0.999,), checkpoint_every=500)
  config.sample.update(sampler="flow_euler", steps=28 if guided else 4, guidance_scale=1.0,
                       flow_shift=0.0 if dynamic else scheduler.get("shift", 1.0),
                       resolution_shift=resolution_shift if dynamic else (), threshold="none", num_per_prompt=1,
                       prompts=("a photograph of an astronaut riding a horse",))
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  return config
