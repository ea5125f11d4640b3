"""Input pipeline: TFDS array_record source -> grain (shard, shuffle, preprocess, batch) -> global jax.Array.

Each process reads its own rows of every global batch; the iterator state is small and checkpointable
(`iterator.get_state()` / `set_state()`), so a resumed run sees exactly the batches it would have seen.

Batch (per process): image [batch, height, width, 3] float32 in [-1, 1] (`image_size`; video datasets: video
[batch, frames, height, width, 3] and is_video [batch] bool, False for stills mixed in), text_ids [batch, tokens] int32
(or text_embeddings [batch, tokens, dim] float32 from a text-embedding cache), text_mask [batch, tokens]
bool, plus the dataset's integer attributes when present.
"""

import logging
import os

import grain.python as grain
import jax
import numpy as np
from jax.experimental import multihost_utils
import PIL.Image
import tensorflow_datasets as tfds

from diffusion_jax.data import captioned_shapes, folder_dataset, moving_shapes
from diffusion_jax.models import sdxl_text
from diffusion_jax.text import tokenizers

DATASETS = ("captioned_shapes", "moving_shapes", "folder", "folder_clips", "tfds")
# Batch keys the train step consumes (attribute keys are for evaluation only).
MODEL_INPUTS = ("image", "video", "is_video", "text_ids", "text_embeddings", "text_mask", "latent_mean",
                "latent_logvar", "lowres", "size_ids")
RECORD_INDEX = "record_index"


def _generated_once(build):
  """build(), which generates the dataset's files if they are missing. Two jobs started together on one
  data_dir both generate them; the second to finish finds the first's files in place (TFDS refuses the
  rename) and opens those."""
  try:
    return build()
  except FileExistsError:
    return build()


def _prepared(build):
  """Process 0 generates the files; the others open them once they exist."""
  if jax.process_index() == 0:
    builder = _generated_once(build)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("dataset prepared")
  if jax.process_index() != 0:
    builder = build()
  return builder


def _open(config, split: str):
  config = config.copy_and_resolve_references()
  config.data_dir = os.path.expanduser(config.data_dir)  # "~/tensorflow_datasets", not ./~/
  if config.dataset == "captioned_shapes":
    return _prepared(lambda: captioned_shapes.builder(
        config.data_dir, resolution=config.resolution, max_objects=config.max_objects, num_train=config.num_train,
        num_eval=config.num_eval, seed=config.seed,
        heldout_combinations=config.heldout_combinations)).as_data_source(split)
  if config.dataset == "moving_shapes":
    return _prepared(lambda: moving_shapes.builder(
        config.data_dir, resolution=config.resolution, frames=config.frames, num_train=config.num_train,
        num_eval=config.num_eval, seed=config.seed, wrap_around=config.wrap_around,
        travel=config.travel)).as_data_source(split)
  if config.dataset in ("folder", "folder_clips"):
    if split != "train" and not config.eval_captions_file:
      raise ValueError(f"data.dataset={config.dataset!r} holds only the files data.captions_file lists, which it "
                       f"trains on; the {split} split needs held-out ones: give data.eval_captions_file, a captions "
                       "file of other files in data.folder.")
    if config.dataset == "folder":
      return _prepared(lambda: folder_dataset.builder(config.folder, config.captions_file, config.data_dir,
                                                      config.eval_captions_file, bool(config.reference_key))
                       ).as_data_source(split)
    return _prepared(lambda: folder_dataset.clips_builder(
        config.folder, config.captions_file, config.frames, config.resolution, config.data_dir,
        config.eval_captions_file, config.frame_stride)).as_data_source(split)
  if config.dataset == "tfds":
    try:
      return tfds.data_source(config.name, split=split, data_dir=config.data_dir)
    except Exception as error:  # TFDS raises many kinds; the user needs the name, split and dir.
      raise ValueError(f"Cannot open TFDS dataset {config.name!r} split {split!r} in data_dir "
                       f"{config.data_dir!r} as array_record ({error}). Prepare it with "
                       "file_format='array_record' (see README, 'Datasets').") from None
  raise ValueError(f"Unknown data.dataset {config.dataset!r}; valid options: {list(DATASETS)}.")


def holds_split(config, split: str) -> bool:
  """Whether `config.data` holds `split`: a folder's held-out splits only with data.eval_captions_file; a prepared
  TFDS dataset's as its dataset_info lists (one not found or not prepared: taken to, opening it says why not);
  the built-in datasets' always."""
  if config.dataset in ("folder", "folder_clips"):
    return split == "train" or bool(config.eval_captions_file)
  if config.dataset == "tfds":
    try:
      splits = tfds.builder(config.name, data_dir=os.path.expanduser(config.data_dir)).info.splits
    except Exception:  # TFDS raises many kinds; data_source names the dataset and directory
      return True
    return not splits or split in splits
  return True


def data_source(config, split: str):
  """A random-access source of examples for `config.data` (see configs/base.py); the configured
  feature keys are checked against what the dataset has."""
  source = _open(config, split)
  if len(source) == 0:
    raise ValueError(f"Split {split!r} of data.dataset={config.dataset!r} is empty.")
  available = sorted(source[0])
  wanted = (config.image_key, config.caption_key, *config.attribute_keys) + ((config.reference_key,) if
                                                                              config.reference_key else ())
  missing = [k for k in wanted if k not in available]
  if missing:
    raise ValueError(f"data feature keys {missing} are not in the dataset; it has {available} "
                     "(set data.image_key / data.caption_key / data.attribute_keys / data.reference_key).")
  return SkipBadRecords(source)


class SkipBadRecords(grain.RandomAccessDataSource):
  """Wraps a source: a record that cannot be read (e.g. corrupt image bytes) becomes None and is
  dropped by the pipeline's filter, and counted in `skipped` (per process, in-process workers). Records carry
  their index (RECORD_INDEX), which per-record caches look up."""

  def __init__(self, source):
    self.source = source
    self.skipped = 0

  def __len__(self):
    return len(self.source)

  def __repr__(self):  # grain checks the source's repr when restoring an iterator
    return f"SkipBadRecords({self.source!r})"

  def __getitem__(self, index):
    try:
      element = self.source[index]
    except Exception as error:  # decoders raise many kinds; one bad record must not stop training
      self.skipped += 1
      logging.warning("skipping unreadable record %d: %s", index, error)
      return None
    return {**element, RECORD_INDEX: index}


class KeepUsable(grain.FilterTransform):
  """Drops unreadable records and records with an empty caption."""

  def __init__(self, caption_key):
    self.caption_key = caption_key

  def filter(self, element) -> bool:
    return element is not None and len(element[self.caption_key]) > 0


def image_size(data_config) -> tuple[int, int]:
  """(height, width) of the training images: data.resolution by data.width (0: data.resolution, a square)."""
  return data_config.resolution, data_config.width or data_config.resolution


def resize_and_crop(image: np.ndarray, size: int | tuple[int, int], rng: np.random.Generator | None) -> np.ndarray:
  """uint8 [h, w, 3] -> [height, width, 3] (size: (height, width), or the side of a square): scaled (bicubic) to
  cover it (a square: the shorter side to it), then a centre (rng None) or random crop."""
  return resized_and_cropped(image, size, rng)[0]


def resized_and_cropped(image: np.ndarray, size: int | tuple[int, int], rng: np.random.Generator | None):
  """resize_and_crop's image, and (top, left) of the crop in the scaled image and the scaled image's width."""
  height, width = (size, size) if isinstance(size, int) else size
  h, w = image.shape[:2]
  if (h, w) != (height, width):
    scale = max(height / h, width / w)
    image = np.asarray(PIL.Image.fromarray(image).resize((max(width, round(w * scale)), max(height, round(h * scale))),
                                                         PIL.Image.BICUBIC))
    h, w = image.shape[:2]
  top = (h - height) // 2 if rng is None else int(rng.integers(0, h - height + 1))
  left = (w - width) // 2 if rng is None else int(rng.integers(0, w - width + 1))
  return image[top:top + height, left:left + width], (top, left, w)


def rgb(image: np.ndarray) -> np.ndarray:
  """uint8 [h, w] (grayscale) or [..., h, w, 1, 3 or 4 channels] -> [..., h, w, 3]."""
  image = image[..., None] if image.ndim == 2 else image
  return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]


def as_frames(visual: np.ndarray) -> tuple[np.ndarray, bool]:
  """(uint8 frames [f, h, w, 3], whether a video) of a record's image [h, w(, 1, 3 or 4)] (one frame) or video
  [f, h, w(, 1, 3 or 4)]."""
  is_video = visual.ndim == 4 or (visual.ndim == 3 and visual.shape[-1] not in (1, 3, 4))
  frames = visual if is_video else visual[None]
  return rgb(frames[..., None] if frames.ndim == 3 else frames), is_video


class Preprocess(grain.RandomMapTransform):
  """Decode, resize/crop, optional flip, scale to [-1, 1] (or look up the record's cached autoencoder posterior
  when `latent_cache` is given), tokenize the caption (or look up its cached text embeddings when `text_cache` is
  given; neither when both are None: images only)."""

  def __init__(self, config, tokenizer, text_cache=None, latent_cache=None):
    self.config = config
    self.tokenizer = tokenizer
    self.text_cache = text_cache
    self.latent_cache = latent_cache

  def pixels(self, element, rng: np.random.Generator) -> dict:
    """{"image": [height, width, 3]} or {"video": [frames, height, width, 3], "is_video": bool}, float32 in
    [-1, 1]; with data.reference_key, the image's "reference" [height, width, 3] too (FLUX.1 Kontext's: scaled to
    cover the training size, centre-cropped, flipped with the image); with data.size_ids, an image's "size_ids" [6]
    float32: its original height and width, the crop's top and left in the scaled image (of the flipped image when
    it is flipped), the training height and width (SDXL's micro-conditioning; the refiner's [5]:
    data.aesthetic_score instead of the training size)."""
    config = self.config
    frames, is_video = as_frames(np.asarray(element[config.image_key]))
    crop_seed = int(rng.integers(2**31))  # one crop for all frames of a video
    original = frames.shape[1:3]
    cropped = [resized_and_cropped(f, image_size(config),
                                   np.random.default_rng(crop_seed) if config.random_crop else None) for f in frames]
    frames, (top, left, scaled_width) = np.stack([f for f, _ in cropped]), cropped[0][1]
    height, width = image_size(config)
    flip = config.random_flip and rng.random() < 0.5
    if flip:
      frames, left = frames[:, :, ::-1], scaled_width - left - width
    score = config.aesthetic_score or None  # (0: SDXL base's ids, which end with the training size)
    size_ids = ({"size_ids": sdxl_text.size_ids(original, (top, left), (height, width), score)} if config.size_ids
                else {})
    frames = frames.astype(np.float32) / 127.5 - 1.0
    still = is_video and config.image_fraction > 0 and rng.random() < config.image_fraction
    if still:  # joint image-video training: one frame as a static clip, temporal layers switched off
      frames = np.broadcast_to(frames[rng.integers(len(frames))], frames.shape).copy()
    if is_video:
      return {"video": frames, "is_video": np.bool_(not still)}
    out = {"image": frames[0], **size_ids}
    if config.reference_key:
      reference = resize_and_crop(rgb(np.asarray(element[config.reference_key])), (height, width), None)
      out["reference"] = (reference[:, ::-1] if flip else reference).astype(np.float32) / 127.5 - 1.0
    return out

  def random_map(self, element, rng: np.random.Generator):
    config = self.config
    if self.latent_cache is not None:  # one view per record: crops, flips and stills are refused with a cache
      out = self.latent_cache(element[RECORD_INDEX])
      if out["latent_mean"].ndim == 4:  # [frames, h, w, c]
        out["is_video"] = np.bool_(True)
    else:
      out = self.pixels(element, rng)
    if self.text_cache is not None:
      out["text_embeddings"], out["text_mask"] = self.text_cache(element[config.caption_key])
    elif self.tokenizer is not None:
      ids, mask = self.tokenizer([element[config.caption_key]])
      out["text_ids"], out["text_mask"] = ids[0], mask[0]
    for key in config.attribute_keys:
      out[key] = np.asarray(element[key])
    if RECORD_INDEX in element:  # from `data_source` (SkipBadRecords)
      out[RECORD_INDEX] = np.int64(element[RECORD_INDEX])
    return out


class ProcessSlices:
  """A grain sampler giving process p the rows [p*L, (p+1)*L) of every global batch of P*L examples.

  Every process walks the same seeded global order, so the global batch at each step (and each
  example's preprocessing randomness) is the same whatever the process count: a 2-process run trains
  on exactly the batches of a 1-process run. Each process reads only its own records.
  """

  def __init__(self, sampler, batch_per_process: int, process_index: int, process_count: int):
    self.sampler = sampler
    self.batch_per_process = batch_per_process
    self.process_index = process_index
    self.process_count = process_count

  def __getitem__(self, index: int) -> grain.RecordMetadata:
    step, row = divmod(index, self.batch_per_process)
    global_index = (step * self.process_count + self.process_index) * self.batch_per_process + row
    record = self.sampler[global_index]
    return grain.RecordMetadata(index=index, record_key=record.record_key, rng=record.rng)

  def __repr__(self):  # grain checks the sampler's repr when restoring an iterator
    return (f"ProcessSlices({self.sampler!r}, batch_per_process={self.batch_per_process}, "
            f"process_index={self.process_index}, process_count={self.process_count})")


def make_loader(config, source, tokenizer, batch_per_process: int, seed: int, shuffle: bool = True,
                num_epochs: int | None = None, shard_options=None, text_cache=None, latent_cache=None,
                drop_remainder: bool = True) -> grain.DataLoader:
  """A grain loader batched to batch_per_process. By default this process gets its slice of every
  global batch (`ProcessSlices`); an explicit `shard_options` instead gives it a contiguous shard of
  the records."""
  if len(source) < batch_per_process * jax.process_count():
    raise ValueError(f"The dataset has {len(source)} examples, fewer than one global batch of "
                     f"{batch_per_process * jax.process_count()}; lower the batch size or use more data.")
  sampler = grain.IndexSampler(num_records=len(source), shard_options=shard_options or grain.NoSharding(),
                               shuffle=shuffle, num_epochs=num_epochs, seed=seed)
  if shard_options is None:
    sampler = ProcessSlices(sampler, batch_per_process, jax.process_index(), jax.process_count())
  operations = [KeepUsable(config.caption_key), Preprocess(config, tokenizer, text_cache, latent_cache),
                grain.Batch(batch_per_process, drop_remainder=drop_remainder)]
  return grain.DataLoader(data_source=source, sampler=sampler, operations=operations,
                          worker_count=config.worker_count, shard_options=shard_options or grain.NoSharding())


def to_global(local_batch: dict, sharding) -> dict:
  """Assemble per-process numpy batches into global jax.Arrays sharded over the batch axis."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def synthetic_batch(config) -> dict:
  """An all-zero global batch with the model inputs' shapes and dtypes (benchmarks, FLOP counts)."""
  b, n, (h, w) = config.train.batch_size, config.text.max_length, image_size(config.data)
  visual = (b, config.data.frames, h, w, 3) if config.model.temporal else (b, h, w, 3)
  batch = {"video" if config.model.temporal else "image": np.zeros(visual, np.float32),
           "text_ids": np.ones((b, tokenizers.ids_per_prompt(config)), np.int32), "text_mask": np.ones((b, n), bool)}
  if config.model.temporal:
    batch["is_video"] = np.ones((b,), bool)
  if config.data.reference_key:
    batch["reference"] = np.zeros(visual, np.float32)
  if config.data.size_ids:
    batch["size_ids"] = np.tile(sdxl_text.size_ids((h, w), (0, 0), (h, w), config.data.aesthetic_score or None), (b, 1))
  return batch
