"""Text-embedding cache: lookups equal the encoder's output, stale caches are refused, training reads it."""

import logging

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from diffusion_jax import sharding, train
from diffusion_jax.text import embedding_cache, tokenizers


def test_cache_lookup_matches_encoder_and_refuses_a_stale_key(tmp_path_factory, tmp_path, caplog):
  config = tiny_config(tmp_path_factory)
  config.text.trainable = False
  state, graphdef = train.init_state(config, sharding.make_mesh(config.mesh))
  tokenizer = tokenizers.from_config(config)
  encode = jax.jit(lambda ids, mask: nnx.merge(graphdef, state.params, state.frozen).encode(ids, mask))
  captions = ["a large red circle at the top left", "a small blue square at the bottom right"] * 3
  key = embedding_cache.cache_key(state.frozen["text_encoder"], "words", config.text.max_length)
  caplog.set_level(logging.INFO)
  cache = embedding_cache.build(tmp_path / "cache", captions, tokenizer, encode, key)
  assert len(cache.rows) == 2  # each distinct caption encoded once
  assert "text-embedding cache: 2 of 2 captions (100%), elapsed" in caplog.text  # progress, every tenth
  assert not list((tmp_path / "cache").glob("*.partial"))  # (written a batch at a time, then renamed)
  ids, mask = tokenizer(captions[:1])
  embeddings, cached_mask = cache(captions[0].encode())
  np.testing.assert_array_equal(cached_mask, mask[0])
  np.testing.assert_allclose(embeddings[mask[0]], np.asarray(encode(ids, mask))[0][mask[0]], rtol=1e-2, atol=1e-2)
  with pytest.raises(ValueError, match="another encoder"):
    embedding_cache.EmbeddingCache(tmp_path / "cache", "0" * 16)
  with pytest.raises(KeyError, match="not in the text-embedding cache"):
    cache("a green triangle")


def test_a_pooled_embedding_beside_every_token_is_stored_once(tmp_path):
  """With token_width (SDXL's, SD3's, Flux's condition: tokens' states, then a pooled embedding repeated beside each
  token), the cache holds the tokens' columns and the pooled embedding once, and a lookup gives the whole condition
  back; a condition whose last columns differ between tokens is refused."""
  rng = np.random.default_rng(0)
  tokenizer = lambda captions: (np.array([[len(c), 1, 0, 0] for c in captions]),
                                np.array([[1, 1, 0, 0]] * len(captions), bool))

  def encode(ids, mask):  # [n, 4 tokens, 6 + 3]: states, then each caption's pooled embedding beside every token
    states, pooled = rng.normal(size=(len(ids), 4, 6)), rng.normal(size=(len(ids), 1, 3))
    return np.concatenate([states, np.broadcast_to(pooled, (len(ids), 4, 3))], -1).astype(np.float16)

  captions = ["a red circle", "two blue squares", "a red circle"]
  encoded = {}
  cache = embedding_cache.build(tmp_path / "cache", captions, tokenizer,
                                lambda ids, mask: encoded.setdefault(len(encoded), encode(ids, mask)), "k",
                                token_width=6, batch_size=1)  # a caption a batch: each written where it belongs
  encoded["all"] = np.concatenate([encoded[0], encoded[1]])
  assert np.load(tmp_path / "cache" / "embeddings.npy").shape == (2, 4, 6)
  assert np.load(tmp_path / "cache" / "pooled.npy").shape == (2, 3)
  for row, caption in enumerate(["a red circle", "two blue squares"]):  # (sorted: the cache's row order)
    embeddings, mask = cache(caption)
    np.testing.assert_array_equal(embeddings, encoded["all"][row].astype(np.float32))
    np.testing.assert_array_equal(mask, [1, 1, 0, 0])
  with pytest.raises(ValueError, match="columns from 5 on differ between tokens"):
    embedding_cache.build(tmp_path / "other", captions, tokenizer, encode, "k", token_width=5)


def test_training_from_the_cache(tmp_path_factory, tmp_path):
  config = tiny_config(tmp_path_factory)
  config.text.trainable = False
  config.text.embedding_cache = str(tmp_path / "cache")
  config.train.update(steps=2, sample_at_end=False)
  state, _ = train.train_and_evaluate(config, tmp_path / "work")
  assert int(state.step) == 2 and int(state.nonfinite_total) == 0
  assert (tmp_path / "cache" / "embeddings.npy").exists()
  assert "text_encoder" not in state.params and "text_encoder" in state.frozen
