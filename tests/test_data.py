"""captioned_shapes and the grain pipeline: determinism, attributes, disjoint shards, exact resume, tokenizers."""

import grain.python as grain
import numpy as np
import pytest

from configs import t2i_shapes
from diffusion_jax.data import captioned_shapes, pipeline
from diffusion_jax.text import tokenizers


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  config = t2i_shapes.get_config("test")
  config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
  config.data.attribute_keys = ("color", "shape", "position", "num_objects")
  return config


def test_render_matches_attributes():
  image = captioned_shapes.render([(0, 1, 1, 3)], 32)  # large red square at the bottom right
  red = np.all(image == captioned_shapes.COLORS["red"], axis=-1)
  ys, xs = np.nonzero(red)
  assert red.sum() > 30 and ys.min() >= 16 and xs.min() >= 16
  assert image[:16].max() == 0 and image[:, :16].max() == 0
  assert captioned_shapes.caption([(0, 1, 1, 3)]) == "a large red square at the bottom right"


def test_dataset_is_deterministic_and_carries_attributes(config):
  source = pipeline.data_source(config.data, "train")
  assert len(source) == config.data.num_train
  again = pipeline.data_source(config.data, "train")
  for i in (0, 7, 100):
    np.testing.assert_array_equal(source[i]["image"], again[i]["image"])
    example = source[i]
    count = int(example["num_objects"])
    objects = list(zip(*(example[k][:count] for k in ("color", "shape", "size", "position"))))
    assert example["caption"].decode() == captioned_shapes.caption(objects)
    np.testing.assert_array_equal(example["image"], captioned_shapes.render(objects, config.data.resolution))


def batches(config, n, shard_options=None, state=None):
  source = pipeline.data_source(config.data, "train")
  loader = pipeline.make_loader(config.data, source, tokenizers.from_config(config), 8, seed=3,
                                shard_options=shard_options)
  iterator = iter(loader)
  if state is not None:
    iterator.set_state(state)
  return [next(iterator) for _ in range(n)], iterator


def test_batches_have_the_documented_layout(config):
  (batch,), _ = batches(config, 1)
  r = config.data.resolution
  assert batch["image"].shape == (8, r, r, 3) and batch["image"].dtype == np.float32
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  assert batch["text_ids"].shape == (8, config.text.max_length) and batch["text_mask"].dtype == bool
  assert set(config.data.attribute_keys) <= set(batch)


def test_process_shards_are_disjoint(config):
  seen = []
  for index in range(2):
    shard = grain.ShardOptions(shard_index=index, shard_count=2, drop_remainder=True)
    got, _ = batches(config, 4, shard)
    seen.append({(tuple(b["text_ids"][i]), b["image"][i].tobytes()) for b in got for i in range(8)})
  assert not seen[0] & seen[1]


def test_iterator_resumes_exactly(config):
  first, iterator = batches(config, 3)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(2)]
  resumed, _ = batches(config, 2, state=state)
  for a, b in zip(expected, resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["text_ids"], b["text_ids"])


def test_resize_and_crop():
  image = np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3)
  assert pipeline.resize_and_crop(image, 32, None).shape == (32, 32, 3)
  assert pipeline.resize_and_crop(image, 32, np.random.default_rng(0)).shape == (32, 32, 3)


def test_word_tokenizer_pads_truncates_and_handles_empty(caplog):
  tokenizer = tokenizers.WordTokenizer(captioned_shapes.VOCABULARY, max_length=6)
  ids, mask = tokenizer(["a red circle", "", "a small red circle at the top left"])
  assert mask[0].sum() == 3 and not mask[1].any() and mask[2].all()
  assert "truncated" in caplog.text
  assert (ids[~mask] == 0).all()


def test_sentencepiece_tokenizer(tmp_path):
  captions = [captioned_shapes.caption([(c, s, z, p)]) for c in range(6) for s in range(3) for z in range(2)
              for p in range(4)]
  model_path = tokenizers.train_sentencepiece(captions, tmp_path / "sp", vocab_size=40)
  tokenizer = tokenizers.SentencePieceTokenizer(model_path, max_length=12)
  ids, mask = tokenizer(["a red circle", ""])
  assert mask[0].sum() >= 4 and ids[0, mask[0].sum() - 1] == 1  # ends with EOS
  assert not mask[1].any()
  with pytest.raises(ValueError, match="spiece.model"):
    tokenizers.SentencePieceTokenizer(tmp_path / "missing.model", 8)


def test_bad_dataset_settings_are_explained(config):
  bad = config.data.copy_and_resolve_references()
  bad.resolution = 24
  with pytest.raises(ValueError, match="resolution must be 16, 32 or 64"):
    pipeline.data_source(bad, "train")
  bad = config.data.copy_and_resolve_references()
  bad.dataset, bad.name = "tfds", "no_such_dataset"
  with pytest.raises(ValueError, match="array_record"):
    pipeline.data_source(bad, "train")
