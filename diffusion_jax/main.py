"""The main job: train an experiment, then sample from it.

  python -m diffusion_jax.main --config=configs/t2i_shapes.py --workdir=workdirs/t2i_shapes [--config.key=value ...]

Flags:
  --config        experiment config file (optionally `file.py:variant`); every field can be overridden with
                  --config.<field>=<value>; a mistyped field is an error
  --workdir       where checkpoints, logs, config.json and samples go; rerunning resumes from it
  --coordinator, --num_processes, --process_id, --auto_distributed
                  a multi-process job (launch/ sets them; diffusion_jax/distributed.py)

When training finishes it writes WORKDIR/curves.png (diffusion_jax/curves.py: the curves of the train and
evaluation logs), then, with train.sample_at_end, samples. The same command runs on a laptop CPU, a GPU node and
every host of a TPU pod. SIGTERM or Ctrl-C saves a checkpoint after the current step and stops (a second Ctrl-C
stops at once); rerunning resumes.
"""

import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

from diffusion_jax import cli, distributed

config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Work directory (checkpoints, logs, samples).")
distributed.define_flags()


def main(argv):
  del argv
  f = flags.FLAGS
  if f.workdir is None or f.config is None:
    raise app.UsageError("--config and --workdir are required.")
  distributed.initialize()
  import jax

  from diffusion_jax import train

  config = f.config
  try:
    state, graphdef = train.train_and_evaluate(config, f.workdir)
  except ValueError as error:  # configuration, data and path errors a user can fix
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:  # a second Ctrl-C, or one before the first step
    print(f"interrupted; rerun the same command to resume from the last checkpoint in {f.workdir}, if any.",
          file=sys.stderr)
    sys.exit(130)
  finished = int(state.step) == config.train.steps  # not after SIGTERM / Ctrl-C
  if finished and jax.process_index() == 0:
    from diffusion_jax import curves
    try:
      print(f"curves: {curves.write([f.workdir], pathlib.Path(f.workdir) / 'curves.png')}")
    except (ValueError, OSError) as error:  # the run is finished and saved; a plot is not worth failing it
      print(f"warning: no curves.png ({error})", file=sys.stderr)
  if config.train.sample_at_end and finished:
    from diffusion_jax import sample

    try:
      weights = sample.weights_of(state, config.sample.use_ema)
      print(f"samples: {sample.write_training_samples(config, weights, graphdef, int(state.step), f.workdir)}")
    except KeyboardInterrupt:
      print("interrupted while sampling; training is finished and saved. Sample later with "
            f"python -m diffusion_jax.sample --workdir={f.workdir}", file=sys.stderr)
      sys.exit(130)


if __name__ == "__main__":
  cli.run(main, config_kinds={"config": "experiment"})
