"""T5 encoder against transformers' PyTorch T5EncoderModel and UMT5EncoderModel (random tiny weights saved as
safetensors)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from diffusion_jax.models import t5


# Two different small configurations: T5 v1.1 (gated GELU) and original T5 (ReLU).
CONFIGS = {
    "gated-gelu": dict(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                       relative_attention_max_distance=16),
    "relu": dict(d_model=24, d_kv=6, d_ff=40, num_layers=3, num_heads=3, relative_attention_num_buckets=16,
                 relative_attention_max_distance=32),
}


def save_tiny_t5(directory, feed_forward_proj, max_shard_size="10GB"):
  config = transformers.T5Config(vocab_size=64, feed_forward_proj=feed_forward_proj, dropout_rate=0.0,
                                 **CONFIGS[feed_forward_proj])
  torch.manual_seed(0)
  model = transformers.T5EncoderModel(config).eval()
  model.save_pretrained(directory, safe_serialization=True, max_shard_size=max_shard_size)
  return model


@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-gelu"])
def test_encoder_matches_transformers(tmp_path, feed_forward_proj):
  reference = save_tiny_t5(tmp_path, feed_forward_proj)
  ours = t5.load_hf_encoder(tmp_path)
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 64, (3, 11)).astype(np.int32)
  mask = np.ones_like(ids, bool)
  mask[1, 7:] = False
  mask[2, 3:] = False
  ids[~mask] = 0
  with torch.no_grad():
    expected = reference(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
  expected = expected.last_hidden_state.numpy()
  got = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
  np.testing.assert_allclose(got[mask], expected[mask], rtol=1e-4, atol=1e-4)


def test_umt5_encoder_with_a_position_bias_in_every_layer_matches_transformers(tmp_path):
  """UMT5 (the text encoder of Wan) learns a relative-position bias table in every layer; read from its config.json's
  model_type, each layer adds its own, as transformers' UMT5EncoderModel does."""
  config = transformers.UMT5Config(vocab_size=64, dropout_rate=0.0, **CONFIGS["gated-gelu"])
  torch.manual_seed(0)
  reference = transformers.UMT5EncoderModel(config).eval()
  reference.save_pretrained(tmp_path, safe_serialization=True)
  ours = t5.load_hf_encoder(tmp_path)
  tables = [np.asarray(block.position_bias[...]) for block in ours.blocks]
  assert len(tables) == 2 and np.abs(tables[0] - tables[1]).max() > 0.1
  ids = np.random.default_rng(0).integers(1, 64, (2, 9)).astype(np.int32)
  mask = np.ones_like(ids, bool)
  mask[1, 5:] = False
  ids[~mask] = 0
  with torch.no_grad():
    expected = reference(input_ids=torch.from_numpy(ids).long(),
                         attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()
  np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))[mask], expected[mask], rtol=1e-4,
                             atol=1e-4)


def test_sharded_checkpoint_with_index(tmp_path):
  reference = save_tiny_t5(tmp_path, "relu", max_shard_size="20KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  ours = t5.load_hf_encoder(tmp_path)
  ids = np.arange(1, 9, dtype=np.int32)[None]
  with torch.no_grad():
    expected = reference(input_ids=torch.from_numpy(ids).long()).last_hidden_state.numpy()
  np.testing.assert_allclose(ours(jnp.asarray(ids), jnp.ones_like(ids, bool)), expected, rtol=1e-4, atol=1e-4)


def test_padding_does_not_change_real_tokens(tmp_path):
  save_tiny_t5(tmp_path, "gated-gelu")
  ours = t5.load_hf_encoder(tmp_path)
  ids = jnp.array([[5, 9, 13, 0, 0, 0, 0, 0]], jnp.int32)
  short = ours(ids[:, :3], ids[:, :3] > 0)
  long = ours(ids, ids > 0)
  np.testing.assert_allclose(long[:, :3], short, rtol=1e-5, atol=1e-5)


def test_bad_checkpoints_are_named(tmp_path):
  with pytest.raises(ValueError, match="config.json"):
    t5.load_hf_encoder(tmp_path)
  save_tiny_t5(tmp_path / "pipeline" / "text_encoder", "relu")  # a whole checkpoint: its text_encoder/ is named
  with pytest.raises(ValueError, match="its text encoder is its text_encoder/ folder: text.pretrained_path='.*/"
                                       "pipeline/text_encoder'"):
    t5.load_hf_encoder(tmp_path / "pipeline")
  save_tiny_t5(tmp_path, "relu")
  config = json.loads((tmp_path / "config.json").read_text())
  config["d_ff"] += 8
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="DenseReluDense.wi.weight has shape"):
    t5.load_hf_encoder(tmp_path)


def test_random_initialisation_follows_t5s(tmp_path):
  """Trained from scratch, the encoder starts as T5 does (transformers' T5 initialisation is the oracle): the
  query scaled down by sqrt(d_kv), unit-variance word vectors (generic LeCun init scored 0.79 against 0.97 on
  single-object captions after the demo's 800 steps)."""
  import jax
  from flax import nnx

  config = transformers.T5Config(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4,
                                 feed_forward_proj="gated-gelu", relative_attention_num_buckets=64)
  torch.manual_seed(0)
  transformers.T5EncoderModel(config).save_pretrained(tmp_path, safe_serialization=True)
  theirs = dict(jax.tree_util.tree_leaves_with_path(nnx.state(t5.load_hf_encoder(tmp_path), nnx.Param)))
  ours = nnx.state(t5.T5Encoder(t5.config_from_hf(config.to_dict()), rngs=nnx.Rngs(0)), nnx.Param)
  rms = lambda x: float(np.sqrt(np.mean(np.square(np.asarray(x)))))
  for path, value in jax.tree_util.tree_leaves_with_path(ours):
    assert 0.8 < rms(value) / rms(theirs[path]) < 1.25, (jax.tree_util.keystr(path), rms(value), rms(theirs[path]))


def test_local_position_bias_mixes_each_word_with_its_neighbours():
  """With `position_bias_init='local'` a word's encoding starts mixed with the words beside it: changing one
  word moves its neighbours' encodings more than far words' (T5's random init mixes near and far alike,
  which leaves a caption a bag of words: nothing ties a colour to its object)."""
  import ml_collections
  from flax import nnx

  config = ml_collections.ConfigDict(dict(vocab_size=32, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                          num_buckets=32, max_distance=128, position_bias_init="local", gated=True,
                                          layer_norm_epsilon=1e-6, dtype="float32",
                                          per_layer_position_bias=False))
  encoder = t5.T5Encoder(config, rngs=nnx.Rngs(0))
  ids = np.random.default_rng(0).integers(1, 32, (64, 16)).astype(np.int32)
  changed = ids.copy()
  changed[:, 8] = ids[:, 8] % 31 + 1
  mask = np.ones_like(ids, bool)
  moved = np.linalg.norm(np.asarray(encoder(ids, mask)) - np.asarray(encoder(changed, mask)), axis=-1).mean(0)
  assert min(moved[7], moved[9]) > 2.5 * max(moved[1], moved[15]), moved
  bias = np.asarray(t5.local_position_bias(32, 128, 4))
  assert (bias[0] == 0).all() and (np.diff(bias[:16], axis=0) < 0).all(), bias  # largest at offset 0, falling
