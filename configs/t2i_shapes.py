"""Small text-to-image model on the built-in captioned_shapes dataset; trains on a laptop CPU.

  python -m diffusion_jax.main --config=configs/t2i_shapes.py --workdir=workdirs/t2i_shapes

Variants (`--config=configs/t2i_shapes.py:VARIANT`): `fsdp` shards parameters and optimizer state over
all devices; `base16` is the 16 px base stage of `configs/cascades/shapes_16_32.py`
(trained on every colour-shape combination, which the others hold three out of); `base16_distill` distils
that run (workdirs/t2i_shapes_base16) into a student sampling in 8 unguided DDIM steps what it samples in 16
guided ones (distillation.py; override distill.steps and finetune.workdir for the next halving); `scaling` is the
16 px, single-object base of the scaling sweep (`configs/scaling/shapes_t2i.py`); `dit` trains a
diffusion transformer (`models/dit.py`, 2x2 patches) instead of the U-Net; `latent` trains on the 16x16x4
latents of the autoencoder `configs/autoencoder_shapes.py` writes (train that first, README: Latent diffusion);
`test` is a seconds-long smoke configuration for the test suite.
"""

from configs import base


def get_config(variant: str = ""):
  config = base.get_config()
  config.data.dataset = "captioned_shapes"
  config.data.resolution = 32
  config.data.max_objects = 2
  config.data.num_train = 20000
  # Never shown together in training (each colour and shape is, with others); evaluation judges them apart.
  config.data.heldout_combinations = ("red square", "green circle", "blue triangle")

  config.text.tokenizer = "words"
  config.text.max_length = 20
  # Words start mixed with their neighbours, so a colour can reach its object's words; four layers, and
  # cross-attention at 16x16 as well as 8x8 (below), bind it better (README: binding).
  config.text.t5.update(vocab_size=32, d_model=64, d_kv=16, d_ff=128, num_layers=4, num_heads=4,
                        position_bias_init="local")

  # Sized for about 0.8 s per step on a 2-core CPU (4,000 steps: 55 minutes).
  config.model.update(channels=32, channel_mults=(1, 2, 2), num_res_blocks=(1, 1, 2), attention_levels=(1, 2),
                      skips="level", skip_scale=0.7071067811865476, heads=4, text_dim=64)

  config.train.batch_size = 32
  config.train.steps = 4000
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 100
  config.train.ema_decays = (0.99,)
  config.train.log_every = 50
  config.train.checkpoint_every = 200
  config.train.sample_every = 1000

  config.sample.prompts = (
      "a large red circle at the top left",
      "a small blue square at the bottom right",
      "a large green triangle at the top right and a small yellow circle at the bottom left",
      "a large magenta square at the bottom left",
      "a large blue triangle at the top left",  # held out of training
  )
  if variant == "fsdp":
    config.mesh.update(data=1, fsdp=-1)
  elif variant in ("base16", "base16_distill"):  # the 16 px base of configs/cascades/shapes_16_32.py (README)
    config.data.update(resolution=16, heldout_combinations=())  # all combinations
    config.text.t5.num_layers = 2
    config.model.attention_levels = (2,)
    config.train.steps = 800
  elif variant == "scaling":
    config.data.update(resolution=16, max_objects=1, heldout_combinations=())
    config.text.t5.update(d_model=32, d_kv=8, d_ff=64, num_layers=1)
    config.model.update(channels=16, num_res_blocks=(1, 1, 1), attention_levels=(2,), text_dim=32)
    config.train.update(keep_checkpoints=1, ema_decays=(0.9,))
    config.sample.use_ema = False  # short runs: the held-out loss is measured on the trained weights
  elif variant == "dit":  # the same task with a diffusion transformer (models/dit.py) instead of the U-Net
    # Position sinusoids with periods up to 4x the 16x16 patch grid (README, Diffusion transformer).
    config.model.update(backbone="dit", channels=128, depth=6, patch_size=2, heads=4, position_max_period=64.0)
  elif variant == "latent":  # latent diffusion on the autoencoder of configs/autoencoder_shapes.py
    config.latent.autoencoder_path = "workdirs/autoencoder_shapes/autoencoder"
    config.latent.cache = "workdirs/autoencoder_shapes/latent_cache"  # encoded once (a minute), then read
    config.model.in_channels = 4
    config.sample.threshold = "none"  # latents are not in [-1, 1]
  elif variant == "test":
    config.data.num_train = 256
    config.data.num_eval = 32
    config.data.resolution = 16
    config.text.t5.update(d_model=32, d_kv=8, d_ff=64, num_layers=1)
    config.model.update(channels=16, channel_mults=(1, 2), num_res_blocks=(1, 1), attention_levels=(1,),
                        heads=2, text_dim=32)
    config.train.update(batch_size=16, steps=4, log_every=2, checkpoint_every=2)
    config.optimizer.warmup_steps = 2
    config.sample.update(steps=4, num_per_prompt=2)
  elif variant:
    raise ValueError(f"Unknown t2i_shapes variant {variant!r}; valid variants: 'fsdp', 'base16', 'base16_distill', "
                     "'scaling', 'dit', 'latent', 'test'.")
  if variant == "base16_distill":  # README: Progressive distillation
    config.finetune.workdir = "workdirs/t2i_shapes_base16"
    config.distill.steps = 8  # the teacher's 16 steps, guided as it samples (3) -> the student's 8 unguided ones
    config.distill.threshold = "none"  # the teacher's steps unthresholded too: what the students sample like
    # Unthresholded: a student's estimate is where one step must aim, not an image.
    config.sample.update(sampler="ddim", steps=config.distill.get_ref("steps"), guidance_scale=1.0, threshold="none")
    config.optimizer.update(learning_rate=1e-4, warmup_steps=20)
    config.train.update(steps=400, checkpoint_every=100, sample_every=0)
  return config
