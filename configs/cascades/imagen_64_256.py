"""Imagen-like two-stage cascade for a pod: the `imagen_base64.py` base model, then the `imagen_sr256.py`
super-resolution stage (64 -> 256 px), each trained in its own workdir on a shared filesystem.

  python -m diffusion_jax.sample --cascade=configs/cascades/imagen_64_256.py --prompts=prompts.txt \\
      "--cascade.stages[0].workdir=/mnt/shared/runs/base64" "--cascade.stages[1].workdir=/mnt/shared/runs/sr256"
  python -m diffusion_jax.evaluate --cascade=configs/cascades/imagen_64_256.py --num_prompts=10000 \\
      --inception_weights=/path/to/pt_inception-2015-12-05-6726825d.pth --sweep_stage=0 --guidance_sweep=3,5,8

Sampling settings are the stages' own (base: guidance 5, dynamic thresholding; SR stage: guidance 5, augmentation
level 0), each overridable per stage, e.g. "--cascade.stages[1].aug_level=0.1".
"""

import ml_collections

from configs.cascades.stages import stage


def get_config():
  c = ml_collections.ConfigDict()
  c.stages = (
      stage("/mnt/shared/runs/base64", steps=50),
      stage("/mnt/shared/runs/sr256", steps=50),
  )
  c.prompts = (
      "a photograph of a red fox sitting in fresh snow",
      "a bowl of soup that looks like a monster, knitted out of wool",
      "an oil painting of a lighthouse on a cliff at sunset",
      "a small cactus wearing a straw hat and neon sunglasses in the desert",
  )
  c.num_per_prompt = 4
  c.seed = 0
  c.output_dir = "/mnt/shared/samples/imagen_64_256"
  return c
