"""Cache of a frozen autoencoder's posterior for every training example (`latent.cache`), so latent training reads
it instead of running the encoder at every step.

A cache directory holds `mean.npy` and `logvar.npy` [records, (frames,) h/f, w/f, latent_channels] (float16,
memory-mapped; row i is record i of the train split, zeros for a record that could not be read), for a latent
super-resolution stage also `lowres.npy`, its clean low-resolution input [records, (frames,) r, r, 3]
(`superres.lowres_input` of the pixels), and `meta.json` with the key: a hash of the autoencoder's weights, of
the data fields that decide each example's pixels (and of a folder builder's version) and of the stage's low-res
input size. The train step still draws a new latent from the posterior (and new augmentation noise) at every step,
as it does from an image.
Opening a cache with another key is refused: its latents would silently belong to another autoencoder or dataset.
"""

import hashlib
import json
import logging
import pathlib
import time

import jax
import numpy as np

from diffusion_jax.data import folder_dataset, moving_shapes

log = logging.getLogger(__name__)
# data.* fields that decide the pixels of a training example (random crops and flips are refused with a cache).
DATA_FIELDS = ("dataset", "name", "folder", "captions_file", "image_key", "resolution", "max_objects",
               "heldout_combinations", "frames", "num_train", "seed")
# superres.* fields that decide a super-resolution stage's low-res input.
SUPERRES_FIELDS = ("lowres_resolution", "lowres_frames")
# Cached array (file NAME.npy) -> the batch key the train step reads it as.
BATCH_KEYS = {"mean": "latent_mean", "logvar": "latent_logvar", "lowres": "lowres"}


def cache_key(autoencoder_params, data_config, superres_config=None) -> str:
  """The hash a cache is built and opened with; `superres_config` for a super-resolution stage (its low-res
  input is cached too)."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(autoencoder_params):
    digest.update(np.asarray(leaf).tobytes())
  # Fields added later enter the key only when set, so earlier caches keep their keys.
  wrapped = ["wrap_around"] if data_config.get("wrap_around", False) else []
  travel = data_config.get("travel", moving_shapes.TRAVEL)
  travelled = [f"travel={travel}"] if travel != moving_shapes.TRAVEL else []
  strided = [f"frame_stride={stride}"] if (stride := data_config.get("frame_stride", 1)) != 1 else []
  wide = [f"width={width}"] if (width := data_config.get("width", 0)) else []
  builders = {"folder": folder_dataset.FolderImages, "folder_clips": folder_dataset.FolderClips}
  # (a folder prepared again reads its files anew)
  read = [f"version={builders[data_config.dataset].VERSION}"] if data_config.dataset in builders else []
  digest.update(json.dumps([str(data_config[f]) for f in DATA_FIELDS] + wrapped + travelled + strided + wide + read
                           ).encode())
  if superres_config is not None:
    digest.update(json.dumps([str(superres_config[f]) for f in SUPERRES_FIELDS]).encode())
  return digest.hexdigest()[:16]


def build(directory, records: int, batches, encode_fn, key: str) -> "LatentCache":
  """Encode every record once. batches: (record indices [n], pixels [n, (frames,) h, w, 3]) pairs covering the
  readable records; encode_fn(pixels) -> {name in BATCH_KEYS: array [n, ...]} (mean and logvar [n, (frames,)
  h/f, w/f, c], and lowres for a super-resolution stage). Written under a temporary name, then renamed: an
  interrupted build leaves no cache that looks complete."""
  directory = pathlib.Path(directory).expanduser()
  directory.mkdir(parents=True, exist_ok=True)
  arrays, filled, start, reported = {}, 0, time.perf_counter(), 0
  for indices, pixels in batches:
    for name, value in encode_fn(pixels).items():
      if name not in arrays:
        arrays[name] = np.lib.format.open_memmap(directory / f"{name}.npy.partial", "w+", np.float16,
                                                 (records,) + np.shape(value)[1:])
      arrays[name][np.asarray(indices)] = np.asarray(value, np.float16)
    filled += len(indices)
    if filled * 10 // records > reported:  # every tenth of the records
      reported, elapsed = filled * 10 // records, time.perf_counter() - start
      log.info("latent cache: %d of %d records (%d%%), elapsed %.0fs eta %.0fs", filled, records,
               100 * filled // records, elapsed, elapsed / filled * (records - filled))
  if not arrays:
    raise ValueError("No readable training examples to cache.")
  for name, array in arrays.items():
    array.flush()
    (directory / f"{name}.npy.partial").rename(directory / f"{name}.npy")
  (directory / "meta.json").write_text(json.dumps({"key": key, "records": records, "encoded": filled}))
  return LatentCache(directory, key)


class LatentCache:
  """Read-only lookup record index -> {batch key: float32 array}: latent_mean and latent_logvar [(frames,) h/f,
  w/f, c], and for a super-resolution stage lowres [(frames,) r, r, 3]."""

  def __init__(self, directory, expected_key: str):
    directory = pathlib.Path(directory).expanduser()
    meta_path = directory / "meta.json"
    if not meta_path.exists():
      raise ValueError(f"{str(directory)!r} is not a latent cache (no meta.json); it is built on first use.")
    key = json.loads(meta_path.read_text())["key"]
    if key != expected_key:
      raise ValueError(f"The latent cache in {str(directory)!r} was built for another autoencoder or dataset (key "
                       f"{key}, expected {expected_key}); delete it to rebuild, or set latent.cache to a new "
                       "directory.")
    self.arrays = {BATCH_KEYS[name]: np.load(directory / f"{name}.npy", mmap_mode="r") for name in BATCH_KEYS
                   if (directory / f"{name}.npy").exists()}

  def __call__(self, index: int) -> dict:
    return {key: np.asarray(array[index], np.float32) for key, array in self.arrays.items()}
