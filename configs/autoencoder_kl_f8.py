"""Stable Diffusion's KL-f8 autoencoder (83.7M parameters: 256 px -> 32x32x4 latents) with its full loss, for a pod.

  MODULE=diffusion_jax.train_autoencoder launch/tpu_pod.sh NAME ZONE --config=configs/autoencoder_kl_f8.py \\
      --workdir=/mnt/shared/runs/kl_f8 --config.lpips.path=/path/to/lpips_weights \\
      --config.data.dataset=tfds --config.data.name=YOUR_DATASET --config.data.data_dir=/mnt/shared/tfds

As latent-diffusion's `autoencoder_kl_32x32x4` config: L1 + LPIPS (weight 1; lpips.path, a local directory of
torchvision's vgg16-397923af.pth and the lpips package's weights/v0.1/vgg.pth) + 1e-6 KL, and from step 50,001
the PatchGAN discriminator (3 layers from 64 channels) at adversarial weight 0.5; Adam with betas (0.5, 0.9) at
4.5e-6 per example of the batch (latent-diffusion's learning-rate scaling). The written directory is what
`latent.autoencoder_path` and diffusers' AutoencoderKL.from_pretrained read. Variant `dp`: data parallel (the
default shards parameters and optimizer state over all devices).
"""

from configs import autoencoder_shapes


def get_config(variant: str = ""):
  c = autoencoder_shapes.get_config()
  c.data.update(dataset="tfds", resolution=256, random_flip=True)
  c.autoencoder.update(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                       norm_num_groups=32, mid_block_add_attention=True, sample_size=256)
  c.lpips.update(loss_weight=1.0)
  c.adversarial.update(weight=0.5, start_step=50_001, layers=3, channels=64)
  c.train.update(steps=500_000, batch_size=96, kl_weight=1e-6, scale_batches=16, eval_examples=2048,
                 eval_every=5000, log_every=100, checkpoint_every=5000, keep_checkpoints=3)
  c.optimizer.update(learning_rate=4.5e-6 * c.train.batch_size, b1=0.5, b2=0.9, warmup_steps=0,
                     schedule="constant", weight_decay=0.0, grad_clip=0.0)
  if variant == "":
    c.mesh.update(data=1, fsdp=-1, tensor=1)
  elif variant == "dp":
    c.mesh.update(data=-1, fsdp=1, tensor=1)
  else:
    raise ValueError(f"Unknown autoencoder_kl_f8 variant {variant!r}; valid variants: '' (FSDP), 'dp'.")
  return c
