"""Iso-FLOP scaling sweep on captioned_shapes that runs on this 2-core CPU (about 40 minutes).

  python -m diffusion_jax.scaling.run --sweep=configs/scaling/shapes_t2i.py --root=workdirs/scaling_shapes

Five U-Net widths (79k to 1.0M parameters) x four compute budgets spanning one decade; each run trains
for C / (FLOPs per example x batch) steps of `configs/t2i_shapes.py:scaling` (16 px, one object).
Variant `test` is a tiny two-budget sweep for the test suite.
"""

import ml_collections


def get_config(variant: str = ""):
  c = ml_collections.ConfigDict()
  c.experiment = "configs/t2i_shapes.py:scaling"   # config file[:variant] every run starts from
  c.common = ml_collections.ConfigDict()            # nested overrides for every run, e.g. {"data": {"data_dir": ...}}
  c.width_multipliers = (0.5, 0.75, 1.0, 1.5, 2.0)  # of model.channels (rounded to multiples of model.heads)
  c.depth_multipliers = (1.0,)                      # of model.num_res_blocks (rounded, at least 1)
  c.budgets = (4e11, 8.6e11, 1.86e12, 4e12)         # training FLOPs per run (XLA cost analysis)
  c.learning_rates = ()                             # optimizer.learning_rate values to train each size and budget
                                                    # with (the fits use the best); empty: the experiment's
  c.min_steps = 40                                  # refuse a plan with shorter runs
  c.warmup_fraction = 0.05                          # optimizer.warmup_steps = this x steps
  c.checkpoints_per_run = 4                         # a killed run resumes from its last checkpoint
  c.heldout_examples = 256                          # validation examples for the final held-out loss
  c.generation_metrics = 0                          # > 0: also FID and judge accuracy on this many captions
  c.bootstrap_samples = 1000
  if variant == "test":
    c.experiment = "configs/t2i_shapes.py:test"
    c.width_multipliers = (0.5, 1.0, 1.5)
    c.budgets = (1.2e10, 2.4e10)
    c.min_steps = 4
    c.checkpoints_per_run = 2
    c.heldout_examples = 16
    c.bootstrap_samples = 50
  elif variant:
    raise ValueError(f"Unknown shapes_t2i sweep variant {variant!r}; valid variants: 'test'.")
  return c
