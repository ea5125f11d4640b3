"""Fine-tuning Stable Diffusion 1.x, 2.x, SDXL (or its refiner) or an SD inpainting model (a diffusers checkpoint) on
your images: its U-Net (model.backbone='sd_unet', trained), CLIP text encoder (SDXL: both) and VAE (frozen), read
from the checkpoint's folders, on SD's variance-preserving scaled-linear schedule with its prediction (eps, or v for
SD 2.x at 768 px: the scheduler's prediction_type), sampled with DPM-Solver++(2M), 25 steps, guidance 7.5 (SDXL: 5,
its pipeline's default), at the timesteps its scheduler spaces (timestep_spacing, steps_offset), against the empty
prompt's encoding as SD's pipelines are (SDXL base's: zeros).

  python -m diffusion_jax.main --config=configs/stable_diffusion.py:/path/to/stable-diffusion-v1-5 --workdir=DIR \\
      --config.data.folder=/path/to/images --config.data.captions_file=/path/to/images/captions.jsonl

The variant is the checkpoint's root directory: unet/, text_encoder/, tokenizer/, vae/ and
scheduler/scheduler_config.json are read from it, and an SDXL checkpoint's text_encoder_2/ and tokenizer_2/ (the
config check names a missing or mismatched one). The SDXL refiner's root has no text_encoder/ and tokenizer/: its
text_encoder_2/ and tokenizer_2/ are the text encoder and tokenizer, its images' aesthetic score (data.aesthetic_score,
6) a time id, and its edits (--init_image, a base model's image) run the last 0.3 of the grid, as its pipeline's
(sample.strength). The images are scaled to cover the U-Net's sample_size times 8
(512 px for SD 1.x and SD 2.x base, 768 for SD 2.x, 1024 for SDXL) and cropped. Without a root
(`configs/stable_diffusion.py`) the paths are empty, for the command line to give.
"""

import os

import ml_collections

from configs import base

PREDICTIONS = {"epsilon": ("eps", "eps_mse"), "v_prediction": ("v", "v_mse")}


def get_config(root: str = ""):
  config = base.get_config()
  part, read = base.checkpoint_root(root)
  unet, scheduler = read("unet", "config.json"), read("scheduler", "scheduler_config.json")
  config.model.update(backbone="sd_unet", sd_unet_path=part("unet"), in_channels=unet.get("out_channels", 4),
                      dtype="bfloat16")
  config.text.update(pretrained_path=part("text_encoder"), tokenizer="clip", tokenizer_path=part("tokenizer"),
                     max_length=77, trainable=False)
  sdxl = bool(root) and os.path.isdir(part("text_encoder_2"))
  refiner = sdxl and not os.path.isdir(part("text_encoder"))  # the SDXL refiner: text_encoder_2/ alone
  if refiner:
    config.text.update(pretrained_path=part("text_encoder_2"), tokenizer_path=part("tokenizer_2"))
    config.data.aesthetic_score = 6.0
    config.sample.strength = 0.3
  elif sdxl:
    config.text.update(second_encoder_path=part("text_encoder_2"), second_tokenizer_path=part("tokenizer_2"))
  config.latent.autoencoder_path = part("vae")
  prediction, weighting = PREDICTIONS.get(scheduler.get("prediction_type", "epsilon"), ("eps", "eps_mse"))
  config.diffusion.update(path="vp", schedule="scaled_linear", prediction=prediction, weighting=weighting)
  config.diffusion.schedule_params = ml_collections.ConfigDict()  # SD's betas, 0.00085 to 0.012 (not the cosine's)
  config.data.update(dataset="folder", resolution=8 * unet.get("sample_size", 64), size_ids=sdxl)
  config.optimizer.update(learning_rate=1e-5, warmup_steps=100, schedule="constant", weight_decay=0.01)
  config.train.update(batch_size=16, steps=2000, ema_decays=(0.9999,), checkpoint_every=500)
  spacing = scheduler.get("timestep_spacing", "leading")
  config.sample.update(sampler="dpmpp_2m", steps=25, guidance_scale=5.0 if sdxl else 7.5, threshold="none",
                       num_per_prompt=1,
                       prompts=("a photograph of an astronaut riding a horse",),  # at the scheduler's timesteps
                       # (diffusers reads steps_offset for leading spacing only):
                       timestep_spacing=spacing, steps_offset=scheduler.get("steps_offset", 1) if spacing == "leading"
                       else 0)
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  return config
