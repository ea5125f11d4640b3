"""Fine-tuning Wan's text-to-video model (a diffusers checkpoint of Wan 2.1 or Wan 2.2 T2V) on your clips: its
transformer (model.backbone='wan', trained), UMT5 text encoder and VAE (both frozen), read from the checkpoint's
folders, on the flow path with Wan's loss (flow_mse) and time shift (5), sampled as Wan's pipelines sample 480p
(UniPC, 50 steps, guidance 5, time shift 3: sample.flow_shift).

  python -m diffusion_jax.main --config=configs/wan_t2v.py:/path/to/Wan2.1-T2V-1.3B-Diffusers --workdir=DIR \\
      --config.data.folder=/path/to/clips --config.data.captions_file=/path/to/clips/captions.jsonl

The variant is the checkpoint's root directory: transformer/, text_encoder/, tokenizer/spiece.model and vae/ are
read from it (the config check names a missing or mismatched transformer/, text_encoder/ or vae/, the tokenizer a
missing spiece.model; a copy that keeps it elsewhere takes --config.text.spiece_path=FILE). Without a root
(`configs/wan_t2v.py`) the four paths are empty, for the command line to give (and model.in_channels, 16 unless
the transformer's config.json is read: Wan 2.2 5B's 48). Wan 2.2 TI2V 5B's root (model_index.json's
expand_timesteps) also starts clips at images, reading their latent frame clean (model.wan_clean_first_frame): the
run gives half its clips their own first frame (model.wan_first_frame_fraction), and sampling animates --init_image.
Wan 2.2 A14B's root has a second transformer, transformer_2/,
the expert for low noise: it becomes model.wan_low_noise_path, switched to below model_index.json's boundary_ratio
(model.wan_boundary), and the run trains both experts (each batch drawn at one expert's noise levels:
model.wan_expert_batches). A root of an image-to-video model (Wan 2.1 I2V, Wan 2.2 I2V A14B) works the same: its
transformers read each clip's first frame as their condition (Wan 2.1's also its CLIP tokens, from the root's
image_encoder/: model.wan_image_encoder_path), and sampling animates --init_image. The clips
(data.dataset='folder_clips') are cut to their first 33 frames (9 latent frames) of 480 x 832 (data.resolution x
data.width: frames scaled to cover it and cropped); Wan's are 16 fps, so give 30 fps clips
--config.data.frame_stride=2.
"""

import os

import ml_collections

from configs import base


def get_config(root: str = ""):
  config = base.get_config()
  part, read = base.checkpoint_root(root)
  pipeline = read("model_index.json")
  # the latents' channels (Wan 2.2 5B's: 48; diffusers' default 16)
  config.model.update(backbone="wan", wan_path=part("transformer"),
                      in_channels=read("transformer", "config.json").get("out_channels", 16), temporal=True,
                      dtype="bfloat16", remat=True, remat_policy="matmuls")
  if pipeline.get("expand_timesteps"):  # Wan 2.2 TI2V 5B: clips may start at images, read clean
    config.model.update(wan_clean_first_frame=True, wan_first_frame_fraction=0.5)
  if root and os.path.isdir(part("image_encoder")):  # Wan 2.1 image-to-video: CLIP's tokens of the image
    config.model.wan_image_encoder_path = part("image_encoder")
  if root and os.path.isdir(part("transformer_2")):  # Wan 2.2 A14B: experts for high and low noise
    config.model.update(wan_low_noise_path=part("transformer_2"), wan_boundary=pipeline.get("boundary_ratio") or 0.875)
  config.text.update(pretrained_path=part("text_encoder"), tokenizer="sentencepiece",
                     spiece_path=part("tokenizer", "spiece.model"), max_length=512, trainable=False)
  config.text.t5.dtype = "bfloat16"  # UMT5-XXL's 5.7B weights: 11 GB, as Wan's pipelines run it
  config.latent.autoencoder_path = part("vae")
  config.diffusion.update(path="flow", prediction="flow", weighting="flow_mse", schedule="flow")
  config.diffusion.schedule_params = ml_collections.ConfigDict(dict(shift=5.0))  # replaces the cosine's
  config.data.update(dataset="folder_clips", image_key="video", frames=33, resolution=480, width=832,
                     image_fraction=0.0, random_flip=False)  # Wan's 480p: 480 x 832
  config.optimizer.update(learning_rate=1e-5, warmup_steps=100, schedule="constant", weight_decay=0.0)
  config.train.update(batch_size=8, steps=2000, ema_decays=(0.999,), checkpoint_every=250)
  config.sample.update(sampler="unipc", steps=50, guidance_scale=5.0, flow_shift=3.0, threshold="none",
                       num_per_prompt=1, prompts=("A cat walks on the grass, realistic style.",))
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  return config
