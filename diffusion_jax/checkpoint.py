"""Orbax checkpoints of the train state together with the input iterator state.

Layout: `<workdir>/checkpoints/<step>/{state,data_iter}` plus `<workdir>/config.json` (the experiment's
config, written when a training job has restored, used by sampling and evaluation jobs) and
`<workdir>/train.lock` (held while a training job runs). Saves are asynchronous; restore places
each array with the sharding of the target, so a checkpoint restores onto any mesh.
"""

import contextlib
import fcntl
import importlib.metadata
import json
import logging
import os
import pathlib
import shutil
import socket
import subprocess

import grain.python as grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import traverse_util
from jax.experimental import multihost_utils

from diffusion_jax import cli

ITEMS = ("state", "data_iter")
# Orbax saves a replicated array "replica-parallel": each replica writes a slice, cut by one eager op per
# slice (and a compile per new shape). Below this many bytes per slice one replica writes the whole array
# instead: for small arrays the cutting costs more than the parallel write saves.
MIN_REPLICA_SLICE_BYTES = 1 << 20
log = logging.getLogger(__name__)


# orbax's warnings of what `manager` does on purpose: overriding jax.Array's type handler (its replica-parallel
# threshold) and opening the checkpoints read-only (sampling, evaluation)
ORBAX_NOTICES = cli.DroppedNotices('Type handler registry type "%s" overriding %s', "Given directory is read only=%s")


def manager(workdir, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  """The workdir's checkpoint manager (`read_only`: for jobs that only restore, which never save or delete)."""
  logging.getLogger("absl").addFilter(ORBAX_NOTICES)  # (orbax logs through absl; added once)
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES),
      override=True)
  directory = pathlib.Path(workdir).expanduser().resolve() / "checkpoints"
  options = ocp.CheckpointManagerOptions(max_to_keep=None if read_only else keep, create=not read_only,
                                         save_interval_steps=0 if read_only else 1, read_only=read_only)
  return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)


def run_metadata(config) -> dict:
  """What produced a checkpoint: the config, the package version and the git commit (when known)."""
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                            cwd=pathlib.Path(__file__).parent).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    commit = None
  return {"config": json.loads(config.to_json_best_effort()), "git_commit": commit,
          "package_version": importlib.metadata.version("diffusion_jax")}


def save(mngr: ocp.CheckpointManager, step: int, state, data_iter=None, force: bool = False,
         metadata: dict | None = None) -> bool:
  items = {"state": ocp.args.StandardSave(state)}
  if data_iter is not None:
    items["data_iter"] = grain.PyGrainCheckpointSave(data_iter)
  return mngr.save(step, args=ocp.args.Composite(**items), force=force, custom_metadata=metadata)


def abstract(tree):
  """ShapeDtypeStructs carrying each array's sharding: the restore target for `tree`'s layout."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def brief(error: Exception, limit: int = 300) -> str:
  """The first line of an error, cut to `limit` characters (tensorstore's messages run to kilobytes)."""
  line = (str(error).strip().splitlines() or [type(error).__name__])[0]
  return line if len(line) <= limit else line[:limit] + " ..."


class UnreadableCheckpoint(ValueError):
  """A checkpoint's files cannot be restored (damaged storage, a copy cut short)."""


def restore(mngr: ocp.CheckpointManager, target_state, step: int | None = None, partial: bool = False):
  """Restore (state, step) at `step` (default latest) into target_state's structure and shardings (arrays or
  ShapeDtypeStructs); partial: target_state is a dict of some fields of the saved state (e.g. {"ema": [params],
  "frozen": frozen}), and nothing else is read. Returns (None, None) when there is no checkpoint.

  Without an explicit step, an unreadable newest checkpoint (partial or corrupt) is skipped with a
  warning and the one before it is used.
  """
  if step is not None and step not in mngr.all_steps():
    raise ValueError(f"No checkpoint at step {step} in {mngr.directory}; available steps: {mngr.all_steps()}.")
  candidates = [step] if step is not None else sorted(mngr.all_steps(), reverse=True)
  for candidate in candidates:
    try:
      args = fields_restore(abstract(target_state)) if partial else ocp.args.StandardRestore(abstract(target_state))
      restored = mngr.restore(candidate, args=ocp.args.Composite(state=args))
    except Exception as error:  # orbax/tensorstore raise many kinds for a damaged checkpoint
      if step is not None or candidate == candidates[-1]:
        raise UnreadableCheckpoint(
            f"Checkpoint {candidate} in {mngr.directory} cannot be read ({brief(error)}).") from None
      log.warning("Checkpoint %d cannot be read (%s); falling back to an earlier one.", candidate, brief(error))
      continue
    return restored["state"], candidate
  return None, None


def fields_restore(fields: dict) -> ocp.args.PyTreeRestore:
  """Restore arguments reading only `fields` (a dict of some TrainState fields, ShapeDtypeStructs with shardings;
  "ema" a list of its first copies) of a saved state."""
  return ocp.args.PyTreeRestore(item=fields, restore_args=ocp.checkpoint_utils.construct_restore_args(fields),
                                partial_restore=True)


def restore_weights(workdir, step: int, use_ema: bool, params, frozen, setting: str) -> dict:
  """{path: jax.Array} of the model weights in another run's checkpoint, without its optimizer state: `params`
  and `frozen` are pure dicts of ShapeDtypeStructs with shardings (where each array goes) of its trainable
  (with use_ema: its first EMA copy's, which every run keeps: config_checks) and frozen parameters (or of some of
  them; an empty `frozen`: none). step -1: the latest. `setting` names the config field that chose the run, for
  errors."""
  mngr = manager(workdir, read_only=True)
  step = mngr.latest_step() if step == -1 else step
  if step is None or step not in mngr.all_steps():
    raise ValueError(f"{setting}={str(workdir)!r} has no checkpoint at step {'latest' if step is None else step} "
                     f"(available: {mngr.all_steps()}).")
  item = {**({"frozen": frozen} if frozen else {}), **({"ema": [params]} if use_ema else {"params": params})}
  try:
    restored = ocp.PyTreeCheckpointer().restore(mngr.directory / str(step) / "state", args=fields_restore(item))
  except Exception as error:  # orbax raises many kinds for missing keys / shape mismatches
    raise ValueError(f"Cannot restore the model of {setting}={str(workdir)!r} step {step}: {brief(error)}") from None
  weights = restored["ema"][0] if use_ema else restored["params"]
  return traverse_util.flatten_dict(weights) | traverse_util.flatten_dict(restored.get("frozen", {}))


def restore_input_position(mngr: ocp.CheckpointManager, step: int, data_iter) -> str | None:
  """Restore the input iterator's position saved at `step` into `data_iter` (in place). Returns None, or why
  the saved position does not fit this pipeline: grain refuses a position saved with another batch size or
  process count, whose examples are cut differently."""
  try:
    mngr.restore(step, args=ocp.args.Composite(data_iter=grain.PyGrainCheckpointRestore(data_iter)))
  except Exception as error:  # grain raises ValueError for another sampler, orbax others for missing files
    return brief(error)
  return None


def set_aside_newer(mngr: ocp.CheckpointManager, restored_step: int) -> list[int]:
  """Move the checkpoints newer than `restored_step` (restore skipped them as unreadable) from `checkpoints/`
  to `unreadable_checkpoints/` beside it, so that the resumed run can save those steps again; nothing is
  deleted. Returns the steps moved. Called by every process of a training job; process 0 moves."""
  newer = [s for s in mngr.all_steps() if s > restored_step]
  if not newer:
    return []
  if jax.process_index() == 0:
    target = pathlib.Path(mngr.directory).parent / "unreadable_checkpoints"
    target.mkdir(exist_ok=True)
    for s in newer:
      destination = target / str(s)
      while destination.exists():  # set aside before, by an earlier resume
        destination = destination.with_name(destination.name + "_again")
      shutil.move(str(pathlib.Path(mngr.directory) / str(s)), str(destination))
      log.warning("unreadable checkpoint %d moved to %s", s, destination)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("unreadable checkpoints set aside")
  mngr.reload()
  return newer


def local_path(workdir) -> pathlib.Path:
  """The workdir as a local path; a URL is a ValueError (pathlib would make `gs://b/r` a local `gs:/b/r`)."""
  text = str(workdir)
  if "://" in text:
    raise ValueError(f"--workdir={text} is a URL, but workdirs are read and written through the local filesystem: "
                     "mount the bucket (e.g. with gcsfuse, at the same path on every host) or give a shared "
                     "filesystem path.")
  return pathlib.Path(text).expanduser()


def prepare_workdir(workdir, flag: str = "--workdir") -> None:
  """Create the workdir (every process: on a shared filesystem they all see one) before any work is done; a
  URL, a file in the way or a place this user cannot write is a ValueError naming `flag`, not a crash at the first
  save."""
  text = str(workdir)
  path = local_path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as error:  # a file in the way, no permission, a read-only filesystem
    raise ValueError(f"{flag}={text} cannot be made a directory: {error.strerror} ({error.filename}).") from None
  if not os.access(path, os.W_OK | os.X_OK):
    raise ValueError(f"{flag}={text} is not writable by this user.")


@contextlib.contextmanager
def workdir_lock(workdir):
  """Held by process 0 while a training job uses `workdir`: a second job started on the same workdir (the
  command rerun in another terminal, an overlapping requeue) is a ValueError instead of two writers of one
  set of checkpoints. An OS file lock, so a killed job leaves nothing to clean up."""
  if jax.process_index() != 0:
    yield
    return
  path = pathlib.Path(workdir).expanduser() / "train.lock"
  with open(path, "a+") as handle:
    locked = False
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
      locked = True
    except BlockingIOError:
      handle.seek(0)
      holder = handle.read().strip() or "another process"
      raise ValueError(f"--workdir={workdir} is in use by another training job ({holder}); wait for it to "
                       "finish or stop it (Ctrl-C saves a checkpoint), then rerun.") from None
    except OSError as error:  # a filesystem without locks (some FUSE mounts): run unguarded
      log.warning("cannot lock %s (%s): a second job on this workdir would not be noticed.", path, error.strerror)
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    try:
      yield
    finally:
      if locked:
        fcntl.flock(handle, fcntl.LOCK_UN)


def write_config(workdir, config: ml_collections.ConfigDict) -> None:
  path = pathlib.Path(workdir).expanduser() / "config.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(config.to_json_best_effort(indent=2, sort_keys=True))


# Config fields added since workdirs were first written, each with the value that means what the code did
# before the field existed: a config.json without one is read as if it had that value.
ADDED_FIELDS = {
    "text.embedding_cache": "",
    "data.folder": "", "data.captions_file": "", "data.frames": 8,
    "data.image_fraction": 0.0, "model.temporal": False, "model.max_frames": 16, "sample.frames": 0,
    "inflate.image_workdir": "", "inflate.step": -1, "inflate.use_ema": True, "inflate.train_temporal_only": False,
    "superres.lowres_resolution": 0, "superres.lowres_frames": 0, "superres.aug_max": 0.5, "sample.aug_level": 0.1,
    "superres.residual": False, "superres.residual_scale": 0.25,
    "model.coordinate_channels": False,
    "data.heldout_combinations": (),
    "text.t5.position_bias_init": "t5",
    "model.attention": "auto",  # the same function as jax.nn.dot_product_attention, which earlier runs used
    "train.sample_every": 0,
    "model.backbone": "unet", "model.patch_size": 2, "model.depth": 12, "model.position_max_period": 10000.0,
    "latent.autoencoder_path": "", "latent.cache": "",
    "sample.batch_size": 256,  # before it, every sample of a call was generated at once (up to 256 in the tests)
    "sample.negative_prompt": "",
    "sample.strength": 0.8,  # read only when an image is edited, which earlier code could not
    "sample.video_length": 0, "sample.context_frames": 0, "sample.reconstruction_guidance": 0.0,
    "sample.edit_noise": "random",
    "sample.null_text_iterations": 10, "sample.null_text_learning_rate": 0.01,  # read by edits earlier code lacked
    "finetune.workdir": "", "finetune.step": -1, "finetune.use_ema": True, "model.lora_rank": 0,
    "model.lora_convolutions": False, "model.lora_feed_forward": False,
    "model.lora_modulation": False,
    "model.video_attention": "factorised",
    "sample.guidance_interval": (),
    "model.temporal_patch_size": 1,
    "distill.steps": 0, "distill.guidance_scale": -1.0, "distill.threshold": "",
    "model.remat_policy": "full",  # what model.remat did before the field
    "data.wrap_around": False,
    "data.travel": 0.45,
    "text.t5.per_layer_position_bias": False,
    "model.wan_path": "", "model.sd_unet_path": "", "text.tokenizer_path": "",
    "model.wan_low_noise_path": "", "model.wan_boundary": 0.875,
    "model.wan_expert_batches": "mixed",  # what a pair's training did before the field
    "sample.guidance_scale_low_noise": -1.0,
    "model.wan_image_encoder_path": "",
    "model.wan_clean_first_frame": False, "model.wan_first_frame_fraction": 0.0,
    "sample.height": 0, "sample.width": 0, "sample.flow_shift": 0.0, "sample.timestep_spacing": "",
    "sample.steps_offset": 0,
    "data.eval_captions_file": "",
    "data.frame_stride": 1,
    "data.width": 0,
    "mesh.sequence": 1,
    "text.second_tokenizer_path": "", "text.second_encoder_path": "", "data.size_ids": False,
    "model.lora_text_encoder": False,
    "model.sd3_path": "", "text.t5_encoder_path": "", "text.t5_max_length": 256,
    "model.flux_path": "", "model.flux_guidance": 3.5, "sample.resolution_shift": (), "sample.flux_guidance": -1.0,
    "sample.kontext_resize": "preferred",
    "sample.skip_layers": (), "sample.skip_layer_scale": 2.8, "sample.skip_layer_start": 0.01,
    "sample.skip_layer_stop": 0.2, "model.flux_kontext": False,
    "data.aesthetic_score": 0.0, "sample.aesthetic_score": 6.0, "sample.negative_aesthetic_score": 2.5,
    "data.reference_key": "", "model.flux_redux_path": "",
    "sample.redux_prompt_scale": 1.0, "sample.redux_pooled_scale": 1.0,
}


def config_differences(old: ml_collections.ConfigDict, new: ml_collections.ConfigDict) -> list[str]:
  """'field: old -> new' for every field whose value differs between two configs (dotted names, sorted; a
  tuple equals the list config.json makes of it)."""
  def flat(config):
    out, todo = {}, [("", json.loads(config.to_json_best_effort()))]
    while todo:
      prefix, group = todo.pop()
      for key, value in group.items():
        if isinstance(value, dict):
          todo.append((f"{prefix}{key}.", value))
        else:
          out[prefix + key] = value
    return out

  old, new = flat(old), flat(new)
  return [f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}" for k in sorted(old.keys() | new.keys())
          if old.get(k) != new.get(k)]


def read_config(workdir, kind: str = "experiment") -> ml_collections.ConfigDict:
  """The config a workdir was trained with (its config.json; an experiment's fields it predates: ADDED_FIELDS); a
  ValueError when it is of another kind than `kind` (cli.CONFIG_KINDS: an autoencoder trainer's workdir given to
  sample, say)."""
  path = local_path(workdir) / "config.json"
  if not path.exists():
    raise ValueError(f"{str(path)!r} does not exist: {str(workdir)!r} is not a diffusion_jax workdir (train "
                     "first, or give the --workdir of a training run).")
  saved = json.loads(path.read_text())
  if problem := cli.kind_problem(saved, kind):
    raise ValueError(f"--workdir={str(workdir)!r} holds the run of {problem}")
  if kind != "experiment":
    return ml_collections.ConfigDict(saved)
  for field, value in ADDED_FIELDS.items():
    *groups, name = field.split(".")
    group = saved
    for key in groups:
      group = group.setdefault(key, {})
    group.setdefault(name, value)
  return ml_collections.ConfigDict(saved)
