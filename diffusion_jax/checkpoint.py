"""Orbax checkpoints of the train state together with the input iterator state.

Layout: `<workdir>/checkpoints/<step>/{state,data_iter}` plus `<workdir>/config.json` (the experiment's
config, written once, used by sampling and evaluation jobs). Saves are asynchronous; restore places
each array with the sharding of the target, so a checkpoint restores onto any mesh.
"""

import json
import pathlib

import grain.python as grain
import jax
import ml_collections
import orbax.checkpoint as ocp

ITEMS = ("state", "data_iter")


def manager(workdir, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  directory = pathlib.Path(workdir).expanduser().resolve() / "checkpoints"
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only)
  return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)


def save(mngr: ocp.CheckpointManager, step: int, state, data_iter=None, force: bool = False) -> bool:
  items = {"state": ocp.args.StandardSave(state)}
  if data_iter is not None:
    items["data_iter"] = grain.PyGrainCheckpointSave(data_iter)
  return mngr.save(step, args=ocp.args.Composite(**items), force=force)


def abstract(tree):
  """ShapeDtypeStructs carrying each array's sharding: the restore target for `tree`'s layout."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def restore(mngr: ocp.CheckpointManager, target_state, data_iter=None, step: int | None = None):
  """Restore (state, step) at `step` (default latest) into target_state's structure and shardings;
  the data iterator, if given, is restored in place. Returns (None, None) when there is no checkpoint."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    return None, None
  if step not in mngr.all_steps():
    raise ValueError(f"No checkpoint at step {step} in {mngr.directory}; available steps: {mngr.all_steps()}.")
  items = {"state": ocp.args.StandardRestore(abstract(target_state))}
  if data_iter is not None:
    items["data_iter"] = grain.PyGrainCheckpointRestore(data_iter)
  restored = mngr.restore(step, args=ocp.args.Composite(**items))
  return restored["state"], step


def write_config(workdir, config: ml_collections.ConfigDict) -> None:
  path = pathlib.Path(workdir).expanduser() / "config.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def read_config(workdir) -> ml_collections.ConfigDict:
  path = pathlib.Path(workdir).expanduser() / "config.json"
  if not path.exists():
    raise ValueError(f"{str(path)!r} does not exist: {str(workdir)!r} is not a diffusion_jax workdir (train "
                     "first, or give the --workdir of a training run).")
  return ml_collections.ConfigDict(json.loads(path.read_text()))
