"""Fine-tuning Stable Diffusion 3 or 3.5 (a diffusers checkpoint: SD 3 Medium, SD 3.5 Medium / Large) on your images:
its MMDiT transformer (model.backbone='sd3', trained), two CLIP text encoders, T5 encoder and VAE (frozen), read from
the checkpoint's folders, on the flow path with the velocity loss (flow_mse), training and sampling time shifted by
its scheduler's shift (3), sampled with the flow Euler sampler (SD3's FlowMatchEulerDiscreteScheduler; its grid ends
at sigma 0.001 before 0, ours steps to 0 evenly), 28 steps, guidance 7 against the empty prompt's encoding, as SD3's
pipelines.

  python -m diffusion_jax.main --config=configs/stable_diffusion3.py:/path/to/stable-diffusion-3-medium-diffusers \\
      --workdir=DIR --config.data.folder=/path/to/images --config.data.captions_file=/path/to/images/captions.jsonl

The variant is the checkpoint's root directory: transformer/, text_encoder/, text_encoder_2/, text_encoder_3/,
tokenizer/, tokenizer_2/, tokenizer_3/spiece.model, vae/ and scheduler/scheduler_config.json are read from it (the
config check names a missing or mismatched one). A root without text_encoder_3/ (SD3 run without its T5, as its
pipelines allow) gives T5's tokens as zeros. The images are scaled to cover the transformer's sample_size times 8
(1024 px) and cropped. Without a root (`configs/stable_diffusion3.py`) the paths are empty, for the command line to
give.
"""

import os

import ml_collections

from configs import base


def get_config(root: str = ""):
  config = base.get_config()
  part, read = base.checkpoint_root(root)
  transformer, scheduler = read("transformer", "config.json"), read("scheduler", "scheduler_config.json")
  config.model.update(backbone="sd3", sd3_path=part("transformer"), in_channels=transformer.get("out_channels", 16),
                      dtype="bfloat16", remat=True, remat_policy="matmuls")
  t5 = not root or os.path.isdir(part("text_encoder_3"))
  config.text.update(pretrained_path=part("text_encoder"), second_encoder_path=part("text_encoder_2"),
                     t5_encoder_path=part("text_encoder_3") if t5 else "", tokenizer="clip",
                     tokenizer_path=part("tokenizer"), second_tokenizer_path=part("tokenizer_2"),
                     spiece_path=part("tokenizer_3", "spiece.model") if t5 else "", max_length=77, t5_max_length=256,
                     trainable=False)
  config.text.t5.dtype = "bfloat16"  # T5 v1.1 XXL's 4.7B weights: 9.5 GB
  config.latent.autoencoder_path = part("vae")
  shift = scheduler.get("shift", 3.0)
  config.diffusion.update(path="flow", prediction="flow", weighting="flow_mse", schedule="flow")
  config.diffusion.schedule_params = ml_collections.ConfigDict(dict(shift=shift))  # replaces the cosine's
  config.data.update(dataset="folder", resolution=8 * transformer.get("sample_size", 128))
  config.optimizer.update(learning_rate=1e-5, warmup_steps=100, schedule="constant", weight_decay=0.01)
  config.train.update(batch_size=8, steps=2000, ema_decays=(0.9999,), checkpoint_every=500)
  config.sample.update(sampler="flow_euler", steps=28, guidance_scale=7.0, flow_shift=shift, threshold="none",
                       num_per_prompt=1, prompts=("a photograph of an astronaut riding a horse",))
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  return config
