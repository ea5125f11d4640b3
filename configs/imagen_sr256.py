"""Imagen-like 64 -> 256 super-resolution stage (Efficient U-Net) for a pod; the second stage after imagen_base64.

  launch/tpu_pod.sh NAME ZONE --config=configs/imagen_sr256.py --workdir=/mnt/shared/runs/sr256 \\
      --config.text.pretrained_path=/path/to/t5-v1_1-xxl --config.text.spiece_path=/path/to/spiece.model \\
      --config.data.dataset=tfds --config.data.name=YOUR_DATASET --config.data.data_dir=/mnt/shared/tfds

Efficient U-Net (Saharia et al. 2022, appendix): more residual blocks at low resolution, one skip per
level scaled by 1/sqrt(2), no attention at high resolution (self + text cross-attention only at 32 px
and below). Imagen's stage has width multipliers (1, 2, 4, 8, 8) and 0.6B parameters; with our heavier
residual blocks the same depths at (1, 2, 4, 4, 4) give 0.54B. Noise-conditioning augmentation up to t_aug = 0.5
in training; sampled at aug_level 0.
Variants: `fsdp` (default), `dp`.
"""

from configs import imagen_base64


def get_config(variant: str = "fsdp"):
  config = imagen_base64.get_config(variant)
  config.data.resolution = 256
  config.model.update(channels=128, channel_mults=(1, 2, 4, 4, 4), num_res_blocks=(2, 4, 8, 8, 8),
                      attention_levels=(3, 4), skips="level", skip_scale=0.7071067811865476, heads=8,
                      lowres_conditioning=True)
  config.superres.update(lowres_resolution=64, aug_max=0.5)
  config.diffusion.update(prediction="v", weighting="v_mse")
  config.train.update(batch_size=4096, steps=2_500_000)
  config.sample.update(guidance_scale=5.0, aug_level=0.0)
  return config
