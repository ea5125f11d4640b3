"""Super-resolution stage 16 -> 32 px on captioned_shapes: the second stage of configs/cascades/shapes_16_32.py.

  python -m diffusion_jax.main --config=configs/sr_shapes.py --workdir=workdirs/sr_shapes

The same data (every colour-shape combination), text encoder and U-Net as the base16 stage of
configs/t2i_shapes.py; the U-Net also sees the image
downsampled to 16 px, noise-augmented to a random time in [0, superres.aug_max] (its log-SNR is a
condition). Variant `residual` diffuses the residual over the bicubic-upsampled input instead of the
image (superres.residual: a far better upsampler of real images, a more literal one of a base model's
samples; see README). Variant `latent` is a latent stage (as Stable Diffusion's x4 upscaler): it diffuses the
16x16x4 latents of the autoencoder that configs/autoencoder_shapes.py trains (train that first) and reads the
16 px image on that grid. Variant `test` is a seconds-long 32 px stage for the test suite (it upsamples the
16 px `t2i_shapes.py:test` model).
"""

from configs import t2i_shapes


def get_config(variant: str = ""):
  # The base16 stage's data, text encoder, U-Net and 800 steps, at 32 px (the test variant: t2i_shapes:test's).
  config = t2i_shapes.get_config("test" if variant == "test" else "base16")
  config.data.update(resolution=32, heldout_combinations=())  # every combination, as the base16 stage
  config.model.lowres_conditioning = True
  config.superres.update(lowres_resolution=16, aug_max=0.5)
  config.sample.update(aug_level=0.1, guidance_scale=1.0)
  if variant == "residual":
    config.superres.residual = True
  elif variant == "latent":
    config.latent.autoencoder_path = "workdirs/autoencoder_shapes/autoencoder"
    config.model.in_channels = 4
    config.sample.threshold = "none"  # latents are not in [-1, 1]
  elif variant not in ("", "test"):
    raise ValueError(f"Unknown sr_shapes variant {variant!r}; valid variants: 'residual', 'latent', 'test'.")
  return config
