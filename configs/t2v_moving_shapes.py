"""Small text-to-video model on the built-in moving_shapes dataset; trains on a laptop CPU.

  python -m diffusion_jax.main --config=configs/t2v_moving_shapes.py --workdir=workdirs/t2v_moving_shapes

A space-time factorised U-Net (models/temporal.py; the widths of t2i_shapes:base16) on 4-frame 16x16 clips, with
a fifth of the examples replaced by still frames (joint image-video training) and pixel coordinates as
extra input channels; about 9 minutes on a 2-core CPU. Variants (`--config=...:VARIANT`): `inflate`
initialises the spatial layers from a trained t2i_shapes:base16 workdir (`--config.inflate.image_workdir=DIR`)
and trains only the temporal layers; `dit` trains a video diffusion transformer (models/dit.py: 2x2 patches,
spatial blocks with temporal attention between them, or with `--config.model.video_attention=spacetime` full
attention over each clip) instead of the U-Net; `test` is a seconds-long smoke configuration for the test suite.
"""

import ml_collections

from configs import base


def get_config(variant: str = ""):
  config = base.get_config()
  config.data.dataset = "moving_shapes"
  config.data.resolution = 16
  config.data.frames = 4
  config.data.num_train = 5000
  config.data.num_eval = 256
  config.data.image_key = "video"
  config.data.image_fraction = 0.2

  config.text.tokenizer = "words"
  config.text.max_length = 12
  config.text.t5.update(vocab_size=32, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)

  config.model.update(channels=32, channel_mults=(1, 2, 2), num_res_blocks=(1, 1, 2), attention_levels=(2,),
                      skips="level", skip_scale=0.7071067811865476, heads=4, text_dim=64, temporal=True,
                      max_frames=4, coordinate_channels=True)

  # Noise levels shifted 2.8 nats towards noise (simple diffusion's shift from 16 to 64 px): which way
  # the object moves is decided at high noise, where the standard schedule trains too rarely for a
  # 10-minute run to learn it (README, Text-to-video).
  config.diffusion.schedule = "shifted_cosine"
  config.diffusion.schedule_params = ml_collections.ConfigDict(
      dict(resolution=64, base_resolution=16, logsnr_min=-15.0, logsnr_max=15.0))

  config.train.batch_size = 32
  config.train.steps = 500
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 50
  # Decaying only to half the peak (not a tenth) keeps learning the direction late in the run (README).
  config.optimizer.end_learning_rate_factor = 0.5
  config.train.ema_decays = (0.99,)
  config.train.log_every = 50
  config.train.checkpoint_every = 200

  config.sample.update(steps=25, num_per_prompt=2, prompts=(
      "a large red circle moving right",
      "a large blue square moving down",
      "a small green triangle moving left",
      "a large yellow circle moving up",
  ))
  if variant == "inflate":
    config.inflate.train_temporal_only = True
    config.model.coordinate_channels = False  # frozen at their zero start, coordinates would go unused
  elif variant == "dit":  # coordinates are a U-Net input (the DiT's patches have position embeddings)
    # Position sinusoids with periods up to 4x the 8x8 patch grid: better clips than DiT's 10,000 (README).
    config.model.update(backbone="dit", channels=96, depth=6, patch_size=2, heads=4, coordinate_channels=False,
                        position_max_period=32.0)
  elif variant == "test":
    config.data.update(num_train=64, num_eval=16)
    config.text.t5.update(d_model=32, d_kv=8, d_ff=64, num_layers=1)
    # The widths of t2i_shapes:test, so the tests inflate its checkpoint.
    config.model.update(channels=16, channel_mults=(1, 2), num_res_blocks=(1, 1), attention_levels=(1,), heads=2,
                        text_dim=32, coordinate_channels=False)
    config.train.update(batch_size=8, steps=4, log_every=2, checkpoint_every=2)
    config.optimizer.warmup_steps = 2
    config.sample.update(steps=4, num_per_prompt=1)
  elif variant:
    raise ValueError(f"Unknown t2v_moving_shapes variant {variant!r}; valid variants: 'inflate', 'dit', 'test'.")
  return config
