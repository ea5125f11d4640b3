"""Text-embedding cache: lookups equal the encoder's output, stale caches are refused, training reads it."""

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config
from diffusion_jax import sharding, train
from diffusion_jax.text import embedding_cache, tokenizers


def test_cache_lookup_matches_encoder_and_refuses_a_stale_key(tmp_path_factory, tmp_path):
  config = tiny_config(tmp_path_factory)
  config.text.trainable = False
  state, graphdef = train.init_state(config, sharding.make_mesh(config.mesh))
  tokenizer = tokenizers.from_config(config)
  encode = jax.jit(lambda ids, mask: nnx.merge(graphdef, state.params, state.frozen).encode(ids, mask))
  captions = ["a large red circle at the top left", "a small blue square at the bottom right"] * 3
  key = embedding_cache.cache_key(state.frozen["text_encoder"], "words", config.text.max_length)
  cache = embedding_cache.build(tmp_path / "cache", captions, tokenizer, encode, key)
  assert len(cache.rows) == 2  # each distinct caption encoded once
  ids, mask = tokenizer(captions[:1])
  embeddings, cached_mask = cache(captions[0].encode())
  np.testing.assert_array_equal(cached_mask, mask[0])
  np.testing.assert_allclose(embeddings[mask[0]], np.asarray(encode(ids, mask))[0][mask[0]], rtol=1e-2, atol=1e-2)
  with pytest.raises(ValueError, match="another encoder"):
    embedding_cache.EmbeddingCache(tmp_path / "cache", "0" * 16)
  with pytest.raises(KeyError, match="not in the text-embedding cache"):
    cache("a green triangle")


def test_training_from_the_cache(tmp_path_factory, tmp_path):
  config = tiny_config(tmp_path_factory)
  config.text.trainable = False
  config.text.embedding_cache = str(tmp_path / "cache")
  config.train.update(steps=2, sample_at_end=False)
  state, _ = train.train_and_evaluate(config, tmp_path / "work")
  assert int(state.step) == 2 and int(state.nonfinite_total) == 0
  assert (tmp_path / "cache" / "embeddings.npy").exists()
  assert "text_encoder" not in state.params and "text_encoder" in state.frozen
