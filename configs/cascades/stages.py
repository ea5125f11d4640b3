"""A cascade config's stage entry: its training workdir, checkpoint step (-1 = latest), LoRA adapters fused into its
weights (`lora`: comma-separated FILE[:SCALE], as sample.py's --lora; "" = none), an autoguidance guide
(`guide_workdir`, `guide_step`, as sample.py's --guide_workdir and --guide_step: guide_step >= 0 alone takes that
checkpoint of the stage's own workdir; guide_workdir another run, at its latest or guide_step; "" and -1 = none),
the mesh it is restored onto and sampled on (`mesh`: AXIS=SIZE,... as sample.py's --mesh, e.g. "fsdp=-1" for a
stage one device cannot hold; "" = data-parallel, every device a whole copy) and sampling settings.

Each setting left to the stage's own config is a typed placeholder (None), so that any of them can still be set
from the command line, e.g. "--cascade.stages[0].threshold=dynamic".
"""

import ml_collections
from ml_collections import config_dict

SETTINGS = dict(sampler=str, steps=int, guidance_scale=float, guidance_rescale=float, guidance_interval=tuple,
                threshold=str, threshold_percentile=float, aug_level=float, use_ema=bool, eta=float, frames=int,
                batch_size=int, negative_prompt=str)


def stage(workdir, **settings):
  fields = dict(workdir=workdir, step=-1, lora="", guide_workdir="", guide_step=-1, mesh="")
  fields.update({name: config_dict.placeholder(kind) for name, kind in SETTINGS.items()})
  entry = ml_collections.ConfigDict(fields)
  entry.update(settings)
  return entry
