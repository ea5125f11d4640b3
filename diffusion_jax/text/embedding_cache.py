"""Cache of frozen text-encoder outputs, so training reads embeddings instead of running the encoder.

A cache directory holds `embeddings.npy` [captions, tokens, dim] (float16, memory-mapped), `mask.npy`
[captions, tokens] bool, `captions.json` (the distinct captions, row order) and `meta.json` with the key:
a hash of the encoder weights, the tokenizer's identity and max_length. Opening a cache with a different
key is refused: the embeddings would silently belong to another encoder. A condition whose last columns hold a
pooled embedding repeated beside every token (SDXL's, SD3's, Flux's: sdxl_text.split) keeps the tokens' columns in
`embeddings.npy` [captions, tokens, token_width] and the pooled embedding once in `pooled.npy` [captions, pooled].
"""

import hashlib
import json
import logging
import pathlib
import time

import jax
import numpy as np

log = logging.getLogger(__name__)


def cache_key(encoder_params, tokenizer_name: str, max_length: int) -> str:
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(encoder_params):
    digest.update(np.asarray(leaf).tobytes())
  digest.update(f"{tokenizer_name}|{max_length}".encode())
  return digest.hexdigest()[:16]


def build(directory, captions, tokenizer, encode_fn, key: str, batch_size: int = 256,
          token_width: int = 0) -> "EmbeddingCache":
  """Encode each distinct caption once, a batch at a time into memory-mapped files (the encoder's states of a million
  captions are far larger than a host's memory), logging progress and ETA. encode_fn(ids, mask) -> embeddings [n,
  tokens, dim]; token_width: where the pooled embedding repeated beside every token starts (0: none), stored once.
  Written under temporary names, then renamed; meta.json last: an interrupted build leaves no cache that opens."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  distinct = sorted({c.decode() if isinstance(c, bytes) else c for c in captions})
  if not distinct:
    raise ValueError("No captions to cache.")
  arrays, start_time, reported = {}, time.perf_counter(), 0
  for start in range(0, len(distinct), batch_size):
    ids, mask = tokenizer(distinct[start:start + batch_size])
    embeddings = np.asarray(encode_fn(ids, mask), np.float16)
    parts = {"embeddings": embeddings, "mask": np.asarray(mask)}
    if token_width:
      pooled = embeddings[:, 0, token_width:]
      if not np.array_equal(embeddings[..., token_width:], np.broadcast_to(pooled[:, None], pooled.shape[:1] + (
          embeddings.shape[1],) + pooled.shape[1:])):
        raise ValueError(f"The text condition's columns from {token_width} on differ between tokens: no pooled "
                         "embedding repeated beside each token to store once.")
      parts.update(embeddings=embeddings[..., :token_width], pooled=pooled)
    for name, value in parts.items():
      if name not in arrays:
        arrays[name] = np.lib.format.open_memmap(directory / f"{name}.npy.partial", "w+", value.dtype,
                                                 (len(distinct),) + value.shape[1:])
      arrays[name][start:start + len(value)] = value
    done = min(start + batch_size, len(distinct))
    if done * 10 // len(distinct) > reported:  # every tenth of the captions
      reported, elapsed = done * 10 // len(distinct), time.perf_counter() - start_time
      log.info("text-embedding cache: %d of %d captions (%d%%), elapsed %.0fs eta %.0fs", done, len(distinct),
               100 * done // len(distinct), elapsed, elapsed / done * (len(distinct) - done))
  for name, array in arrays.items():
    array.flush()
    (directory / f"{name}.npy.partial").rename(directory / f"{name}.npy")
  (directory / "captions.json").write_text(json.dumps(distinct))
  (directory / "meta.json").write_text(json.dumps({"key": key, "count": len(distinct)}))
  return EmbeddingCache(directory, key)


class EmbeddingCache:
  """Read-only lookup caption -> (embeddings [tokens, dim] float32, mask [tokens] bool)."""

  def __init__(self, directory, expected_key: str):
    directory = pathlib.Path(directory)
    meta_path = directory / "meta.json"
    if not meta_path.exists():
      raise ValueError(f"{str(directory)!r} is not a text-embedding cache (no meta.json); build one first.")
    key = json.loads(meta_path.read_text())["key"]
    if key != expected_key:
      raise ValueError(f"The text-embedding cache in {str(directory)!r} was built for another encoder, tokenizer "
                       f"or max_length (key {key}, expected {expected_key}); rebuild it or point to the right one.")
    self.embeddings = np.load(directory / "embeddings.npy", mmap_mode="r")
    self.mask = np.load(directory / "mask.npy", mmap_mode="r")
    self.pooled = np.load(directory / "pooled.npy", mmap_mode="r") if (directory / "pooled.npy").exists() else None
    self.rows = {caption: i for i, caption in enumerate(json.loads((directory / "captions.json").read_text()))}

  def __call__(self, caption):
    caption = caption.decode() if isinstance(caption, bytes) else caption
    row = self.rows.get(caption)
    if row is None:
      raise KeyError(f"Caption not in the text-embedding cache: {caption!r}; rebuild the cache for this dataset.")
    embeddings = np.asarray(self.embeddings[row], np.float32)
    if self.pooled is not None:  # beside every token again
      pooled = np.asarray(self.pooled[row], np.float32)
      embeddings = np.concatenate([embeddings, np.broadcast_to(pooled, embeddings.shape[:1] + pooled.shape)], -1)
    return embeddings, np.asarray(self.mask[row])
