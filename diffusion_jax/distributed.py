"""Joining a multi-process JAX job from the command line: the flags every job's CLI shares (the launchers in
`launch/` set them) and the set-up they ask for.

  --coordinator       host:port of process 0 (`launch/local.py`, CPU/GPU clusters); empty = single process
  --num_processes     number of processes in the job
  --process_id        this process's index in the job
  --auto_distributed  read the job from the cluster environment (TPU pod, SLURM, Open MPI)
"""

import sys

import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils

INIT_TIMEOUT_S = 300  # JAX's default


def define_flags() -> None:
  flags.DEFINE_string("coordinator", "", "host:port of process 0 for multi-process runs.")
  flags.DEFINE_integer("num_processes", 1, "Number of processes in a multi-process run.")
  flags.DEFINE_integer("process_id", 0, "Index of this process.")
  flags.DEFINE_bool("auto_distributed", False, "Initialise multi-process JAX from the cluster environment.")


def initialize() -> None:
  """Join the job the flags describe (nothing to do for a single process); call before any JAX computation."""
  f = flags.FLAGS
  if f.coordinator:
    # JAX aborts the process (no Python error) when not every process has joined within the timeout.
    print(f"process {f.process_id} of {f.num_processes}: joining the job at {f.coordinator}; every process must "
          f"be started within {INIT_TIMEOUT_S} s.", file=sys.stderr, flush=True)
    jax.distributed.initialize(f.coordinator, num_processes=f.num_processes, process_id=f.process_id,
                               initialization_timeout=INIT_TIMEOUT_S)
  elif f.auto_distributed:
    jax.distributed.initialize()


def from_process_zero(values: list[int]) -> list[int]:
  """Process 0's list of integers, on every process: a plan all processes follow (what each one reads from a
  shared filesystem, say a workdir's checkpoints, can differ for a moment)."""
  if jax.process_count() == 1:
    return list(values)
  count = int(multihost_utils.broadcast_one_to_all(np.int64(len(values))))
  if count == 0:
    return []
  mine = np.asarray(values if jax.process_index() == 0 else np.zeros(count), np.int64)
  return [int(v) for v in multihost_utils.broadcast_one_to_all(mine)]


def any_process(flag: bool) -> bool:
  """Whether `flag` holds on any process (a gather when there are several): a decision all processes share."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
