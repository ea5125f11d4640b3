"""A small KL autoencoder for latent diffusion on the built-in captioned_shapes images; trains on a laptop CPU.

  python -m diffusion_jax.train_autoencoder --config=configs/autoencoder_shapes.py \
      --workdir=workdirs/autoencoder_shapes

writes `workdirs/autoencoder_shapes/autoencoder/`, a diffusers AutoencoderKL directory that
`configs/t2i_shapes.py:latent` trains on (`latent.autoencoder_path`). Variants: `test` is a seconds-long smoke
configuration for the test suite; `video` trains Stable Video Diffusion's layout (a temporal decoder) on
t2v_moving_shapes' 16 px clips, `video_test` its smoke configuration; `causal` HunyuanVideo's causal 3-D VAE, which
compresses time too, on the same clips made 5 frames long, `causal_test` its smoke configuration; `causal_image` an
image autoencoder on those clips' frames that `causal_inflated`, a causal one 4x in space, starts from (inflated).

Groups: `data`, `optimizer` and `mesh` are the diffusion experiments' (configs/base.py documents them);
`autoencoder` holds the fields of diffusers' AutoencoderKL config (models/autoencoder.py); `train` the run.
"""

import ml_collections

from configs import base


def get_config(variant: str = ""):
  experiment = base.get_config()
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = experiment.data
  c.data.update(dataset="captioned_shapes", resolution=32, max_objects=2, num_train=20000)
  c.mesh = experiment.mesh
  c.optimizer = experiment.optimizer
  # The loss sums over pixels (SD's convention, so kl_weight means what it does in SD's configs): its gradient
  # norm grows with the image size; Adam does not care, a fixed clipping threshold would.
  c.optimizer.update(learning_rate=1e-3, warmup_steps=100, grad_clip=0.0, weight_decay=0.0)

  # Two levels: 32 px images -> 16x16x4 latents (the factor is 2^(levels - 1)); 0.66M parameters. Half the widths
  # (16, 32) train 3.5x faster but blur edges enough to cost the latent model a third of its shapes (README).
  c.autoencoder = dict(
      in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
      norm_num_groups=8, mid_block_add_attention=True, sample_size=32,
      temporal_decoder=False,      # Stable Video Diffusion's decoder, which decodes a clip's frames together (variant
                                   # `video`; written as a diffusers AutoencoderKLTemporalDecoder)
      causal=False,                # HunyuanVideo's causal 3-D VAE, which encodes 1 + 4 k frames into 1 + k latent
                                   # frames (variant `causal`; written as a diffusers AutoencoderKLHunyuanVideo)
      spatial_compression_ratio=0,  # with causal: the latents' downsampling factor, a power of 2 (diffusers' rule:
                                   # the first log2 of it levels downsample); 0: 2^(levels - 1), as the image one's
  )

  c.train = dict(
      steps=3000,                  # 40 minutes on a 2-core CPU; 48 dB PSNR on held-out images (README)
      batch_size=32,
      kl_weight=1e-6,              # the KL term's weight against the L1 error, each summed per example (SD: 1e-6)
      scale_batches=8,             # training batches whose latents set scaling_factor = 1 / their std
      eval_examples=512,           # held-out images (clips of a video dataset) reconstructed at the end (PSNR, FID)
      eval_every=1000,             # ... and every this many steps (0: at the end only), into logs/eval.jsonl
      log_every=50,
      checkpoint_every=500,
      keep_checkpoints=2,
      init_from="",                # a local diffusers autoencoder directory whose weights start the run (an image
                                   # autoencoder's can start a temporal decoder or, inflated, a causal one:
                                   # models/autoencoder.py start_params)
  )
  # LPIPS (metrics/lpips.py): `path`, a local weights directory, adds the held-out reconstructions' LPIPS to
  # logs/reconstruction.json; `loss_weight` > 0 (SD: 1.0) adds Stable Diffusion's perceptual term to the loss.
  c.lpips = dict(path="", loss_weight=0.0)
  # The PatchGAN adversarial term (models/discriminator.py): `weight` scales SD's adaptive weight (SD: 0.5; 0: no
  # discriminator); it starts at `start_step` (SD: 50001); `layers` stride-2 convolutions (SD: 3), the first
  # `channels` wide (SD: 64); `temporal`: with a temporal decoder, 3-D convolutions judge whole clips (Video LDM's and
  # SVD's choice) rather than each frame alone.
  c.adversarial = dict(weight=0.0, start_step=0, layers=3, channels=64, temporal=False)
  if variant == "test":
    c.data.update(resolution=16, num_train=256, num_eval=16, max_objects=1)
    c.autoencoder.update(latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4, sample_size=16)
    c.optimizer.update(learning_rate=3e-3, warmup_steps=2)
    c.train.update(steps=10, batch_size=8, scale_batches=2, eval_examples=16, eval_every=5, log_every=5,
                   checkpoint_every=5)
  elif variant in ("video", "video_test"):  # t2v_moving_shapes' clips; 32 groups, diffusers' fixed number
    c.data.update(dataset="moving_shapes", resolution=16, frames=4, image_key="video", num_train=5000, num_eval=256)
    # Two blocks a level, as SVD's: its middle block runs attention only with two (models/autoencoder.py).
    c.autoencoder.update(temporal_decoder=True, norm_num_groups=32, sample_size=16, layers_per_block=2)
    c.train.update(batch_size=8)  # clips of 4 frames: 32 images a step, as the image variant
    if variant == "video_test":
      c.data.update(num_train=64, num_eval=8)
      c.autoencoder.layers_per_block = 1
      c.optimizer.update(learning_rate=3e-3, warmup_steps=2)
      c.train.update(steps=10, batch_size=8, scale_batches=2, eval_examples=8, eval_every=5, log_every=5,
                     checkpoint_every=5)
  elif variant in ("causal", "causal_test", "causal_image", "causal_inflated"):  # t2v_moving_shapes' clips, 5 = 1 + 4
    c.data.update(dataset="moving_shapes", resolution=16, frames=5, image_key="video", num_train=5000, num_eval=256)
    # Three levels, time halved at the first two, space at the first only: 5 frames of 16 px -> 2 x 8x8x8 latents,
    # as many numbers as the temporal decoder's 4 x 8x8x4. Half the image one's widths: 3-D convolutions cost 3x.
    c.autoencoder.update(causal=True, block_out_channels=(16, 32, 32), latent_channels=8, sample_size=16,
                         spatial_compression_ratio=2)
    c.train.update(steps=1500, batch_size=8, eval_every=500)  # 21 minutes on a 2-core CPU
    if variant == "causal_test":
      c.data.update(num_train=64, num_eval=8)
      c.autoencoder.update(block_out_channels=(8, 16, 16), norm_num_groups=4, latent_channels=4)
      c.optimizer.update(learning_rate=3e-3, warmup_steps=2)
      c.train.update(steps=10, batch_size=8, scale_batches=2, eval_examples=8, eval_every=5, log_every=5,
                     checkpoint_every=5)
    elif variant in ("causal_image", "causal_inflated"):
      # 4x in space, 16 latent channels (2 x 4x4x16 latents a clip): an image autoencoder of these widths inflates
      # into this causal one (train.init_from; README).
      c.autoencoder.update(latent_channels=16, spatial_compression_ratio=4)
      if variant == "causal_image":  # that image autoencoder, on the clips' frames: 8 minutes
        c.autoencoder.update(causal=False, spatial_compression_ratio=0)
        c.train.update(steps=6000, eval_every=1500)
      else:  # the causal one started from it (run causal_image first): 11 minutes
        c.train.update(steps=1000, eval_every=250, init_from="workdirs/autoencoder_causal_image/autoencoder")
  elif variant:
    raise ValueError(f"Unknown autoencoder_shapes variant {variant!r}; valid variants: 'test', 'video', "
                     "'video_test', 'causal', 'causal_test', 'causal_image', 'causal_inflated'.")
  return c
