"""Two-stage cascade on captioned_shapes: a 16 px base model, then the 16 -> 32 px super-resolution stage.

  python -m diffusion_jax.main --config=configs/t2i_shapes.py:base16 --workdir=workdirs/t2i_shapes_base16
  python -m diffusion_jax.main --config=configs/sr_shapes.py --workdir=workdirs/sr_shapes
  python -m diffusion_jax.sample --cascade=configs/cascades/shapes_16_32.py ["--cascade.stages[1].aug_level=0.2"]

Each stage entry (`stages.stage`): its training workdir, checkpoint step (-1 = latest) and sampling settings
(None = the stage's own config).
"""

import ml_collections

from configs.cascades.stages import stage


def get_config():
  c = ml_collections.ConfigDict()
  c.stages = (
      stage("workdirs/t2i_shapes_base16", sampler="dpmpp_2m", steps=25, guidance_scale=3.0),
      stage("workdirs/sr_shapes", sampler="dpmpp_2m", steps=25, guidance_scale=1.0, aug_level=0.1),
  )
  c.prompts = (
      "a large red circle at the top left",
      "a small blue square at the bottom right",
      "a large green triangle at the top right and a small yellow circle at the bottom left",
      "a large magenta square at the bottom left",
  )
  c.num_per_prompt = 4
  c.seed = 0
  c.output_dir = "workdirs/cascade_shapes_16_32"
  return c
