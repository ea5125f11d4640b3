"""captioned_shapes and the grain pipeline: determinism, attributes, disjoint shards, exact resume, tokenizers."""

import collections
import json
import pathlib
import threading

import grain.python as grain
import PIL.Image
import numpy as np
import pytest

from configs import t2i_shapes
from diffusion_jax import config_checks
from diffusion_jax.data import captioned_shapes, pipeline
from diffusion_jax.text import tokenizers


@pytest.fixture(scope="session")
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


def test_heldout_combinations_are_absent_from_training_only(tmp_path):
  names = ("red square", "blue circle")
  pairs = captioned_shapes.combinations(names)
  built = captioned_shapes.builder(str(tmp_path), resolution=16, num_train=300, num_eval=200,
                                   heldout_combinations=names)
  train, validation = built.as_data_source("train"), built.as_data_source("validation")
  assert not any(captioned_shapes.shows_any(train[i], pairs) for i in range(len(train)))
  shown = sum(captioned_shapes.shows_any(validation[i], pairs) for i in range(len(validation)))
  assert 20 < shown < len(validation)
  # Red things and squares are still in training, just never a red square.
  objects = {(int(c), int(k)) for i in range(len(train)) for c, k in zip(train[i]["color"], train[i]["shape"])}
  assert any(c == 0 and k != 1 for c, k in objects) and any(k == 1 and c != 0 for c, k in objects)
  with pytest.raises(ValueError, match="'red squares' is not a colour-shape combination"):
    captioned_shapes.combinations(["red squares"])


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
    seen.append({tuple(b["text_ids"][i]) for b in got for i in range(8)})
  # The caption decides the image, and a few captions occur more than once in the split: only those may be
  # in both shards.
  source = pipeline.data_source(config.data, "train")
  counts = collections.Counter(source[i]["caption"].decode() for i in range(len(source)))
  repeated = [caption for caption, count in counts.items() if count > 1]
  repeated_ids = {tuple(ids) for ids in tokenizers.from_config(config)(repeated)[0]} if repeated else set()
  assert seen[0] and seen[1] and not (seen[0] & seen[1]) - repeated_ids


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


def test_size_ids_say_where_each_training_image_came_from(config):
  """data.size_ids (SDXL's micro-conditioning): an image's original height and width, its crop's top and left in the
  scaled image, the training size (the SDXL refiner's: data.aesthetic_score instead); the crop at those ids of the
  scaled (and, when flipped, mirrored) image is the training image itself, for a centre crop and for random crops with
  random flips."""
  data = config.data.copy_and_resolve_references()
  data.update(size_ids=True, resolution=32, width=0)
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (40, 80, 3), np.uint8)
  scaled = np.asarray(PIL.Image.fromarray(image).resize((64, 32), PIL.Image.BICUBIC))  # to cover 32 x 32

  def crop_at(ids, flipped):
    top, left = int(ids[2]), int(ids[3])
    return (scaled[:, ::-1] if flipped else scaled)[top:top + 32, left:left + 32].astype(np.float32) / 127.5 - 1.0

  out = pipeline.Preprocess(data, None).pixels({data.image_key: image}, rng)
  np.testing.assert_array_equal(out["size_ids"], [40, 80, 0, 16, 32, 32])
  np.testing.assert_array_equal(out["image"], crop_at(out["size_ids"], False))
  refiner = data.copy_and_resolve_references()
  refiner.aesthetic_score = 5.5
  np.testing.assert_array_equal(pipeline.Preprocess(refiner, None).pixels({data.image_key: image}, rng)["size_ids"],
                                [40, 80, 0, 16, 5.5])
  data.update(random_crop=True, random_flip=True)
  seen = set()
  for _ in range(12):
    out = pipeline.Preprocess(data, None).pixels({data.image_key: image}, rng)
    left = int(out["size_ids"][3])
    flipped = not np.array_equal(out["image"], crop_at(out["size_ids"], False))
    np.testing.assert_array_equal(out["image"], crop_at(out["size_ids"], flipped))
    seen.add((left, flipped))
  assert len({left for left, _ in seen}) > 3 and {flipped for _, flipped in seen} == {False, True}
  data.size_ids = False
  assert "size_ids" not in pipeline.Preprocess(data, None).pixels({data.image_key: image}, rng)


def test_word_tokenizer_pads_truncates_and_handles_empty(caplog):
  tokenizer = tokenizers.WordTokenizer(captioned_shapes.VOCABULARY, max_length=6)
  ids, mask = tokenizer(["a red circle", "", "a small red circle at the top left"])
  assert mask[0].sum() == 3 and not mask[1].any() and mask[2].all()
  assert "truncated" in caplog.text
  assert (ids[~mask] == 0).all()
  caplog.clear()
  ids, _ = tokenizer(["a crimson circle", "a crimson square"])
  assert ids[0, 1] == ids[1, 1] == 1 and caplog.text.count("vocabulary, each read as one unknown token: crimson") == 1
  tokenizer(["a crimson circle"])
  assert caplog.text.count("crimson") == 1  # (once per word)


def test_sentencepiece_tokenizer(tmp_path):
  captions = [captioned_shapes.caption([(c, s, z, p)]) for c in range(6) for s in range(3) for z in range(2)
              for p in range(4)]
  model_path = tokenizers.train_sentencepiece(captions, tmp_path / "sp", vocab_size=40)
  tokenizer = tokenizers.SentencePieceTokenizer(model_path, max_length=12)
  ids, mask = tokenizer(["a red circle", ""])
  assert mask[0].sum() >= 4 and ids[0, mask[0].sum() - 1] == 1  # ends with EOS
  assert not mask[1].any()
  for missing in (tmp_path / "missing.model", ""):  # ('' read by sentencepiece as an empty model)
    with pytest.raises(ValueError, match="no such file; give the path of a local spiece.model"):
      tokenizers.SentencePieceTokenizer(missing, 8)
  (tmp_path / "damaged.model").write_bytes(pathlib.Path(model_path).read_bytes()[:100])
  with pytest.raises(ValueError, match=r"damaged.model' cannot be read as a sentencepiece model \(text.spiece_path"):
    tokenizers.SentencePieceTokenizer(tmp_path / "damaged.model", 8)
  (tmp_path / "spiece.model").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n")
  with pytest.raises(ValueError, match="spiece.model' is a Git LFS pointer, not the file itself"):  # (as cloned
    tokenizers.SentencePieceTokenizer(tmp_path / "spiece.model", 8)  # without Git LFS: T5's spiece.model is in it)


def test_bad_dataset_settings_are_explained(config):
  bad = config.data.copy_and_resolve_references()
  bad.resolution = 24
  with pytest.raises(ValueError, match="resolution must be 16, 32 or 64"):
    pipeline.data_source(bad, "train")
  bad = config.data.copy_and_resolve_references()
  bad.dataset, bad.name = "tfds", "no_such_dataset"
  with pytest.raises(ValueError, match="array_record"):
    pipeline.data_source(bad, "train")


def test_records_of_any_channel_count_are_read_as_rgb_frames():
  """pipeline.as_frames, which training and the held-out sets read records with: a TFDS dataset's grayscale images
  ([h, w] or [h, w, 1], as MNIST's) get three equal channels, RGBA drops its alpha, a video keeps its frames."""
  rng = np.random.default_rng(0)
  gray, rgba, clip = rng.integers(0, 256, (6, 5), np.uint8), rng.integers(0, 256, (6, 5, 4), np.uint8), rng.integers(
      0, 256, (3, 6, 5), np.uint8)
  for record, frames, is_video in ((gray, np.repeat(gray[None, ..., None], 3, -1), False),
                                   (gray[..., None], np.repeat(gray[None, ..., None], 3, -1), False),
                                   (rgba, rgba[None, ..., :3], False),
                                   (clip, np.repeat(clip[..., None], 3, -1), True),
                                   (rgba[None].repeat(2, 0), rgba[None, ..., :3].repeat(2, 0), True)):
    made, video = pipeline.as_frames(record)
    assert video == is_video and made.dtype == np.uint8
    np.testing.assert_array_equal(made, frames)


def test_shards_are_disjoint_and_cover_the_split(config):
  """Records carry their index in their pixels; two shards for one epoch see every index exactly once."""
  records = [{"image": np.full((16, 16, 3), i, np.uint8), "caption": b"a red circle"} for i in range(64)]
  config = config.copy_and_resolve_references()
  config.data.attribute_keys = ()
  seen = []
  for index in range(2):
    shard = grain.ShardOptions(shard_index=index, shard_count=2, drop_remainder=False)
    loader = pipeline.make_loader(config.data, records, tokenizers.from_config(config), 8, seed=0,
                                  num_epochs=1, shard_options=shard)
    seen.append([int(round((b["image"][i, 0, 0, 0] + 1) * 127.5)) for b in loader for i in range(8)])
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(64))


def test_moving_shapes_motion_matches_caption(tmp_path):
  from diffusion_jax.data import moving_shapes

  source = moving_shapes.builder(str(tmp_path), resolution=32, frames=6, num_train=40, num_eval=4).as_data_source(
      "train")
  for i in range(10):
    example = source[i]
    video = np.asarray(example["video"])
    assert video.shape == (6, 32, 32, 3)
    direction = moving_shapes.DIRECTIONS[int(example["direction"])]
    assert example["caption"].decode().endswith(f"moving {direction}")
    centroids = [np.argwhere(frame.max(-1) > 0).mean(0) for frame in video]
    dy, dx = centroids[-1] - centroids[0]
    expected = {"left": dx < -5, "right": dx > 5, "up": dy < -5, "down": dy > 5}[direction]
    assert expected, (direction, dy, dx)
  from diffusion_jax.metrics import motion_judge

  wrapped = moving_shapes.builder(str(tmp_path), resolution=16, frames=5, num_train=40, num_eval=4, wrap_around=True)
  assert wrapped.builder_config.name.endswith("_wrap")  # its own files
  examples = [wrapped.as_data_source("train")[i] for i in range(40)]
  videos = np.stack([np.asarray(e["video"]) for e in examples])
  assert motion_judge.accuracy(videos, [e["caption"] for e in examples], wrap_around=True)["direction"] == 1.0
  lit = videos.max(-1) > 0
  assert np.any(lit[..., 0] & lit[..., -1])  # one drawn at both edges at once
  slower = moving_shapes.builder(str(tmp_path), resolution=16, frames=5, num_train=8, num_eval=2, wrap_around=True,
                                 travel=0.2)
  assert slower.builder_config.name.endswith("_wrap_t0p2")  # its own files; the default travel's keep their name
  example = slower.as_data_source("train")[0]
  steps = np.diff(motion_judge.track(np.asarray(example["video"]), wrap_around=True)[0], axis=0)
  np.testing.assert_allclose(np.abs((steps + 8) % 16 - 8).sum(-1), 16 * 0.2 / 4, atol=0.6)


def test_video_batches(tmp_path):
  config = t2i_shapes.get_config("test")
  config.data.update(dataset="moving_shapes", data_dir=str(tmp_path), image_key="video", frames=4, num_train=32,
                     num_eval=4)
  source = pipeline.data_source(config.data, "train")
  batch = next(iter(pipeline.make_loader(config.data, source, tokenizers.from_config(config), 4, seed=0)))
  assert batch["video"].shape == (4, 4, 16, 16, 3) and batch["text_mask"].any(axis=1).all()


def write_folder(folder):
  from diffusion_jax.data import captioned_shapes

  folder.mkdir()
  lines = []
  for i in range(6):
    PIL.Image.fromarray(captioned_shapes.render([(i % 6, i % 3, 1, i % 4)], 40)).save(folder / f"{i}.png")
    lines.append({"file": f"{i}.png", "caption": captioned_shapes.caption([(i % 6, i % 3, 1, i % 4)])})
  PIL.Image.fromarray(np.full((20, 30), 128, np.uint8)).save(folder / "gray.png")          # grayscale
  PIL.Image.fromarray(np.full((8, 8, 4), 200, np.uint8)).save(folder / "tiny_rgba.png")   # tiny RGBA
  (folder / "corrupt.png").write_bytes(b"not an image")
  lines += [{"file": "gray.png", "caption": "a grey image"}, {"file": "tiny_rgba.png", "caption": "a tiny image"},
            {"file": "corrupt.png", "caption": "broken"}, {"file": "missing.png", "caption": "gone"},
            {"file": "0.png", "caption": ""}]
  (folder / "captions.jsonl").write_text("\n".join(json.dumps(line) for line in lines))


def test_folder_dataset_skips_bad_files_and_trains_shapes(tmp_path, caplog):
  from diffusion_jax.data import folder_dataset

  write_folder(tmp_path / "images")
  code = folder_dataset.main([f"--images={tmp_path / 'images'}", f"--captions={tmp_path / 'images/captions.jsonl'}",
                              f"--data_dir={tmp_path / 'tfds'}"])
  assert code == 0
  # The kept images' sizes are summarised (what training at data.resolution scales up): six of 40 px, 20 x 30, 8 x 8
  assert "the shorter sides of the 8 images of" in caplog.text and ": min 8, median 40, max 40 px" in caplog.text
  config = t2i_shapes.get_config("test")
  spiece = tokenizers.train_sentencepiece([line["caption"] for line in map(
      json.loads, (tmp_path / "images/captions.jsonl").read_text().splitlines()) if line["caption"]],
      tmp_path / "sp", vocab_size=40)
  config.text.update(tokenizer="sentencepiece", spiece_path=spiece)
  config.data.update(dataset="folder", folder=str(tmp_path / "images"),
                     captions_file=str(tmp_path / "images/captions.jsonl"), data_dir=str(tmp_path / "tfds"))
  # The tokenizer's 40 ids need as many embeddings (the config's T5 has 32: ids beyond them would embed as NaN)
  assert "text.t5.vocab_size=32: the tokenizer (text.spiece_path's model) makes 40 ids" in " ".join(
      config_checks.problems(config, device_count=8))
  config.text.t5.vocab_size = 40
  source = pipeline.data_source(config.data, "train")
  assert len(source) == 8  # 6 shapes + grayscale + tiny RGBA; corrupt, missing and empty-caption skipped
  batch = next(iter(pipeline.make_loader(config.data, source, tokenizers.from_config(config), 8, seed=0)))
  assert batch["image"].shape == (8, 16, 16, 3) and np.isfinite(batch["image"]).all()
  with pytest.raises(ValueError, match="the validation split needs held-out ones: give data.eval_captions_file"):
    pipeline.data_source(config.data, "validation")
  # A super-resolution stage on them, whose training samples start at held-out images, is refused before training:
  # as a folder, and as the TFDS dataset it is prepared as (its splits read from its dataset_info)
  from configs import sr_shapes

  stage = sr_shapes.get_config("test")
  stage.data.update({k: config.data[k] for k in ("dataset", "folder", "captions_file", "data_dir")})
  stage.text, stage.train.sample_at_end = config.text, True
  assert "start at held-out images, but this folder has none: give data.eval_captions_file" in " ".join(
      config_checks.problems(stage, device_count=8))
  [prepared] = (tmp_path / "tfds/folder_images").glob("[0-9a-f]*")
  stage.data.update(dataset="tfds", name=f"folder_images/{prepared.name}")
  assert pipeline.holds_split(stage.data, "train") and not pipeline.holds_split(stage.data, "validation")
  assert f"TFDS dataset 'folder_images/{prepared.name}' in '{tmp_path / 'tfds'}' has no 'validation' split" in (
      " ".join(config_checks.problems(stage, device_count=8)))
  from diffusion_jax import sample, train  # a run on 16 x 24 crops (data.width), and its samples at that size

  config.data.update(width=24, heldout_combinations=())
  config.train.update(steps=2, sample_every=1, batch_size=8)
  train.train_and_evaluate(config, tmp_path / "work")
  logged = [json.loads(line) for line in (tmp_path / "work/logs/train.jsonl").read_text().splitlines()]
  assert logged and np.isfinite(np.array([line["loss"] for line in logged], float)).all()
  grid = sample.run(tmp_path / "work", {}, output_dir=tmp_path / "s")  # (the same program)
  for made in (grid, tmp_path / "work/samples/step_1/grid.png"):
    record = json.loads((made.parent / "manifest.jsonl").read_text().splitlines()[0])
    assert np.asarray(PIL.Image.open(made.parent / record["file"])).shape == (16, 24, 3)


def test_a_folder_of_edit_pairs_holds_each_images_reference_and_skips_pairs_it_cannot_use(tmp_path, caplog):
  """folder_dataset --references (FLUX.1 Kontext's edit pairs): each line's image with the reference its line names
  (a .jsonl's "reference"), brought to the training size as the image is (a wide reference scaled to cover it and
  centre-cropped), flipped with it; lines without a reference, or whose reference is missing or undecodable, are
  skipped and counted; data.reference_key on a folder without references names the keys there are."""
  from diffusion_jax.data import folder_dataset

  folder, rng = tmp_path / "pairs", np.random.default_rng(0)
  folder.mkdir()
  lines = []
  for i in range(4):
    target, source = rng.integers(0, 256, (2, 16, 16, 3), np.uint8)
    PIL.Image.fromarray(target).save(folder / f"edited{i}.png")
    PIL.Image.fromarray(np.repeat(source, 2, axis=1)).save(folder / f"source{i}.png")  # 16 x 32: wider
    lines.append({"file": f"edited{i}.png", "caption": f"make it {i}", "reference": f"source{i}.png"})
  (folder / "broken.png").write_bytes(b"not a png")
  lines += [{"file": "edited0.png", "caption": "no reference"},
            {"file": "edited0.png", "caption": "gone", "reference": "missing.png"},
            {"file": "edited0.png", "caption": "broken", "reference": "broken.png"}]
  (folder / "captions.jsonl").write_text("\n".join(map(json.dumps, lines)))
  code = folder_dataset.main([f"--images={folder}", f"--captions={folder / 'captions.jsonl'}",
                              f"--data_dir={tmp_path / 'tfds'}", "--references"])
  assert code == 0
  assert "{'no reference': 1, 'missing reference': 1, 'undecodable reference': 1}" in caplog.text
  config = t2i_shapes.get_config("test")
  config.data.update(dataset="folder", folder=str(folder), captions_file=str(folder / "captions.jsonl"),
                     data_dir=str(tmp_path / "tfds"), resolution=8, reference_key="reference")
  source = pipeline.data_source(config.data, "train")
  assert len(source) == 4
  element = source[0]
  expected = pipeline.resize_and_crop(np.asarray(element["reference"]), 8, None).astype(np.float32) / 127.5 - 1
  assert np.asarray(element["reference"]).shape == (16, 32, 3)
  image = pipeline.resize_and_crop(np.asarray(element["image"]), 8, None).astype(np.float32) / 127.5 - 1
  made = pipeline.Preprocess(config.data, None).pixels(element, np.random.default_rng(0))
  np.testing.assert_array_equal(made["reference"], expected)
  np.testing.assert_array_equal(made["image"], image)
  config.data.random_flip = True
  flipped = []
  for seed in range(8):  # the reference is flipped with the image
    made = pipeline.Preprocess(config.data, None).pixels(element, np.random.default_rng(seed))
    flipped.append(np.array_equal(made["image"], image[:, ::-1]))
    np.testing.assert_array_equal(made["reference"], expected[:, ::-1] if flipped[-1] else expected)
  assert any(flipped) and not all(flipped)
  batch = next(iter(pipeline.make_loader(config.data, source, None, 4, seed=0)))
  assert batch["reference"].shape == batch["image"].shape == (4, 8, 8, 3)


def test_a_reference_key_the_dataset_lacks_is_named_with_the_keys_it_has(config):
  data = config.data.copy_and_resolve_references()
  data.reference_key = "source_image"
  with pytest.raises(ValueError, match=r"data feature keys \['source_image'\] are not in the dataset; it has "
                                       r"\['caption', .*data.reference_key"):
    pipeline.data_source(data, "train")


def test_folder_of_clips_keeps_each_clips_first_frames_and_skips_what_it_cannot_use(tmp_path):
  """MP4 and GIF clips of moving shapes (24 x 32 px) prepared at 5 frames and shorter side 16: each record holds
  its clip's first 5 frames at 16 x 21, which the loader crops to 16 x 16 clips; a 3-frame clip, a corrupt file,
  a missing file and an empty caption are skipped; a video model's batch reads them (cropped to 16 x 20 with
  data.width); the held-out captions file makes the validation split; data.frame_stride 2 keeps every other
  frame."""
  from configs import t2v_moving_shapes
  from diffusion_jax import media
  from diffusion_jax.data import folder_dataset

  clips = tmp_path / "clips"
  clips.mkdir()
  rng = np.random.default_rng(0)
  lines = []
  for i in range(4):
    frames = np.zeros((7, 24, 32, 3), np.uint8)
    for f in range(7):  # a square moving right, its colour by clip
      frames[f, 8:16, 2 + 3 * f:10 + 3 * f] = (rng.integers(64, 256, 3))
    if i % 2:
      media.save_mp4(clips / f"c{i}.mp4", frames, {}, scale=1)
    else:
      PIL.Image.fromarray(frames[0]).save(clips / f"c{i}.gif", save_all=True,
                                          append_images=[PIL.Image.fromarray(f) for f in frames[1:]])
    lines.append({"file": f"c{i}.{'mp4' if i % 2 else 'gif'}", "caption": f"a square moving right {i}"})
  media.save_mp4(clips / "short.mp4", np.zeros((3, 24, 32, 3), np.uint8), {}, scale=1)
  (clips / "corrupt.mp4").write_bytes(b"not a video")
  lines += [{"file": "short.mp4", "caption": "too short"}, {"file": "corrupt.mp4", "caption": "corrupt"},
            {"file": "gone.mp4", "caption": "missing"}, {"file": "c1.mp4", "caption": ""}]
  (clips / "captions.jsonl").write_text("\n".join(map(json.dumps, lines[1:])))
  (clips / "heldout.jsonl").write_text(json.dumps(lines[0]))
  code = folder_dataset.main([f"--clips={clips}", f"--captions={clips / 'captions.jsonl'}", "--frames=5",
                              "--resolution=16", f"--data_dir={tmp_path / 'tfds'}",
                              f"--eval_captions={clips / 'heldout.jsonl'}"])
  assert code == 0
  config = t2v_moving_shapes.get_config("test")
  config.data.update(dataset="folder_clips", folder=str(clips), captions_file=str(clips / "captions.jsonl"),
                     eval_captions_file=str(clips / "heldout.jsonl"), data_dir=str(tmp_path / "tfds"), frames=5,
                     resolution=16, image_fraction=0.0)
  heldout = pipeline.data_source(config.data, "validation")  # the held-out clip, the validation split
  assert len(heldout) == 1 and heldout[0]["file"] == b"c0.gif"
  source = pipeline.data_source(config.data, "train")
  assert len(source) == 3
  first = np.asarray(source[0]["video"])
  assert first.shape == (5, 16, 21, 3)
  assert np.argmax(first[4].sum(axis=(0, 2))) > np.argmax(first[0].sum(axis=(0, 2)))  # moving right, in order
  config.text.update(tokenizer="sentencepiece", spiece_path=tokenizers.train_sentencepiece(
      [line["caption"] for line in lines if line["caption"]], tmp_path / "sp", vocab_size=30))
  batch = next(iter(pipeline.make_loader(config.data, source, tokenizers.from_config(config), 3, seed=0)))
  assert batch["video"].shape == (3, 5, 16, 16, 3) and np.isfinite(batch["video"]).all()
  config.data.width = 20  # non-square clips (data.resolution x data.width): the 16 x 21 frames' left 20 columns
  wide = next(iter(pipeline.make_loader(config.data, source, tokenizers.from_config(config), 3, seed=0)))
  row = list(wide[pipeline.RECORD_INDEX]).index(0)
  np.testing.assert_allclose(wide["video"][row], first[:, :, :20] / 127.5 - 1, atol=1e-6)
  config.data.update(frames=3, frame_stride=2, width=0)  # every other frame: frames 0, 2 and 4 of each clip
  strided = pipeline.data_source(config.data, "train")
  assert len(strided) == 3 and np.array_equal(np.asarray(strided[0]["video"]), first[::2])
  assert folder_dataset.main([f"--clips={tmp_path / 'none'}", f"--captions={clips / 'captions.jsonl'}",
                              "--frames=5", "--resolution=16", f"--data_dir={tmp_path / 'tfds'}"]) == 2


def test_unreadable_and_uncaptioned_records_are_skipped(config):
  records = [{"image": np.zeros((16, 16, 3), np.uint8), "caption": b"a red circle"} for _ in range(20)]
  records[3]["caption"] = b""
  config = config.copy_and_resolve_references()
  config.data.attribute_keys = ()

  class Flaky(list):
    def __getitem__(self, index):
      if index == 5:
        raise OSError("corrupt PNG")
      return super().__getitem__(index)

  source = pipeline.SkipBadRecords(Flaky(records))
  loader = pipeline.make_loader(config.data, source, tokenizers.from_config(config), 6, seed=0, num_epochs=1,
                                shuffle=False)
  assert sum(len(b["image"]) for b in loader) == 18
  assert source.skipped == 1


def test_wrong_feature_key_lists_the_available_ones(config):
  bad = config.data.copy_and_resolve_references()
  bad.caption_key = "text"
  with pytest.raises(ValueError, match=r"\['text'\] are not in the dataset; it has \['caption', 'color'"):
    pipeline.data_source(bad, "train")


def test_tfds_path_with_mock_data(config):
  import tensorflow_datasets as tfds

  tfds_config = config.data.copy_and_resolve_references()
  tfds_config.update(dataset="tfds", name="captioned_shapes", attribute_keys=())
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    source = pipeline.data_source(tfds_config, "train")
    batch = next(iter(pipeline.make_loader(tfds_config, source, tokenizers.from_config(config), 8, seed=0)))
  assert batch["image"].shape[0] == 8 and batch["text_ids"].shape == (8, config.text.max_length)


def test_process_slices_rebuild_the_single_process_batches(config):
  """P processes' local batches, stacked in process order, are the 1-process global batches."""
  records = [{"image": np.full((16, 16, 3), i, np.uint8), "caption": b"a red circle"} for i in range(64)]
  config = config.copy_and_resolve_references()
  config.data.attribute_keys = ()
  tokenizer = tokenizers.from_config(config)
  decode = lambda batch: [int(round((v + 1) * 127.5)) for v in batch["image"][:, 0, 0, 0]]

  def loader(process_index, process_count):
    inner = grain.IndexSampler(num_records=64, shard_options=grain.NoSharding(), shuffle=True, num_epochs=1, seed=5)
    sampler = pipeline.ProcessSlices(inner, 8 // process_count, process_index, process_count)
    return grain.DataLoader(data_source=records, sampler=sampler,
                            operations=[pipeline.Preprocess(config.data, tokenizer),
                                        grain.Batch(8 // process_count, drop_remainder=True)],
                            shard_options=grain.NoSharding())

  single = [decode(b) for b in loader(0, 1)]
  halves = [[decode(b) for b in loader(p, 2)] for p in range(2)]
  assert len(single) == 8
  assert single == [a + b for a, b in zip(*halves)]


def test_home_in_data_dir_is_expanded(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.chdir(tmp_path)
  data = t2i_shapes.get_config("test").data
  data.update(data_dir="~/datasets", num_train=8, num_eval=8)
  assert len(pipeline.data_source(data, "train")) == 8
  assert (tmp_path / "datasets" / "captioned_shapes").is_dir() and not (tmp_path / "~").exists()


def test_two_jobs_preparing_one_dataset_together_both_open_it(tmp_path):
  data = t2i_shapes.get_config("test").data
  data.update(data_dir=str(tmp_path), num_train=512)
  start = threading.Barrier(2)

  def open_train_split(results, i):
    start.wait()  # both find no dataset and generate it; the second to finish finds the first's in place
    results[i] = pipeline.data_source(data, "train")

  results = [None, None]
  threads = [threading.Thread(target=open_train_split, args=(results, i)) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert all(r is not None for r in results), "a job preparing the dataset at the same time failed"
  np.testing.assert_array_equal(results[0][5]["image"], results[1][5]["image"])
  assert len(results[0]) == len(results[1]) == 512


def test_making_a_builder_of_an_unprepared_dataset_leaves_no_temporary_directory(tmp_path, monkeypatch):
  """TFDS's DatasetInfo looks for an unprepared dataset's info on its GCS bucket through a temporary directory it
  leaves behind; this project's builders (data/local_builder.py) do not look."""
  import tempfile

  from diffusion_jax.data import folder_dataset, moving_shapes

  (scratch := tmp_path / "tmp").mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(scratch))
  made = [captioned_shapes.CaptionedShapes(config=captioned_shapes.CaptionedShapesConfig(name="a", resolution=16),
                                           data_dir=tmp_path / "tfds", file_format="array_record"),
          moving_shapes.MovingShapes(config=moving_shapes.MovingShapesConfig(name="b", resolution=16),
                                     data_dir=tmp_path / "tfds", file_format="array_record"),
          folder_dataset.FolderImages(config=folder_dataset.FolderConfig(name="c", folder=str(tmp_path)),
                                      data_dir=tmp_path / "tfds", file_format="array_record")]
  assert len(made) == 3 and not list(scratch.iterdir())  # (TFDS looks, if it does, as each builder is made)


def test_a_photo_stored_sideways_is_read_upright(tmp_path):
  """A camera's JPEG stored sideways with an EXIF orientation (6: turn 90 degrees clockwise) is read turned, as an
  edit's image (media.read_image) and as a folder dataset's; a 16-bit grayscale PNG is read at its levels; a float
  TIFF is refused (skipped, an edit's an error) naming why."""
  from diffusion_jax import media
  from diffusion_jax.data import folder_dataset

  pixels = np.zeros((8, 16, 3), np.uint8)
  pixels[:, :8] = 255  # as stored: 8 high, 16 wide, the left half white
  exif = PIL.Image.Exif()
  exif[0x0112] = 6
  PIL.Image.fromarray(pixels).save(tmp_path / "photo.jpg", exif=exif, quality=100)
  upright = media.read_image(tmp_path / "photo.jpg")
  assert upright.shape == (16, 8, 3) and upright[:8].mean() > 200 and upright[8:].mean() < 50  # left -> top
  builder = folder_dataset.FolderImages(config=folder_dataset.FolderConfig(name="photos", folder=str(tmp_path)),
                                        data_dir=tmp_path / "tfds", file_format="array_record")
  np.testing.assert_array_equal(np.asarray(builder._read(tmp_path / "photo.jpg")[1]["image"]), upright)
  # A 16-bit grayscale PNG (a scan's, a depth map's): its 0..65535 brought to 0..255, not clipped there (white)
  levels = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
  PIL.Image.fromarray(levels).save(tmp_path / "sixteen.png")
  eight = np.repeat(np.round(levels / 257).astype(np.uint8)[..., None], 3, -1)
  np.testing.assert_array_equal(media.read_image(tmp_path / "sixteen.png"), eight)
  np.testing.assert_array_equal(np.asarray(builder._read(tmp_path / "sixteen.png")[1]["image"]), eight)
  # A float TIFF (0..1 here; PIL's conversion made it black): refused, its range unknown, not read clipped
  from diffusion_jax import edit_inputs

  PIL.Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)).save(tmp_path / "float.tif")
  assert builder._read(tmp_path / "float.tif") == ("32-bit float pixels (their range unknown)", None)
  with pytest.raises(ValueError, match="init_image .*float.tif' cannot be read as an image .32-bit float pixels, "
                                       "whose range no file states"):
    edit_inputs.image_edit({"init_image": str(tmp_path / "float.tif")}, 8)


def test_transparent_pixels_are_read_over_white_and_a_masks_as_keep(tmp_path):
  """A PNG with an alpha channel (a logo, a cut-out product) is read over white, as a folder dataset's image and as
  an edit's, not as whatever its transparent pixels store (black here); so is a palette image with a transparent
  colour (a GIF's). A mask's transparent pixels are read black (keep): strokes painted white on an empty layer."""
  from diffusion_jax import edit_inputs, media
  from diffusion_jax.data import folder_dataset

  rgba = np.zeros((8, 8, 4), np.uint8)  # transparent black
  rgba[:4] = (255, 0, 0, 255)  # the top half opaque red
  rgba[4:, :4, 3] = 128  # the bottom left half-transparent black
  PIL.Image.fromarray(rgba).save(tmp_path / "logo.png")
  expected = np.full((8, 8, 3), 255, np.uint8)
  expected[:4] = (255, 0, 0)
  expected[4:, :4] = 127
  np.testing.assert_allclose(media.read_image(tmp_path / "logo.png"), expected, atol=1)
  builder = folder_dataset.FolderImages(config=folder_dataset.FolderConfig(name="logos", folder=str(tmp_path)),
                                        data_dir=tmp_path / "tfds", file_format="array_record")
  np.testing.assert_array_equal(np.asarray(builder._read(tmp_path / "logo.png")[1]["image"]),
                                media.read_image(tmp_path / "logo.png"))
  palette = PIL.Image.fromarray(rgba[..., :3]).convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=4)
  black = int(np.asarray(palette)[-1, -1])
  palette.save(tmp_path / "palette.png", transparency=black)
  np.testing.assert_array_equal(media.read_image(tmp_path / "palette.png")[4:, 4:], 255)
  palette.save(tmp_path / "clip.gif", save_all=True, append_images=[palette], transparency=black)
  np.testing.assert_array_equal(media.read_gif(tmp_path / "clip.gif")[0][:, 4:, 4:], 255)  # an --init_video's
  # A mask of the image's size: the left half painted white (generate anew), the right half transparent white
  mask = np.zeros((8, 8, 4), np.uint8)
  mask[:, :4] = 255
  mask[:, 4:, :3] = 255
  PIL.Image.fromarray(mask).save(tmp_path / "mask.png")
  image, keep = edit_inputs.image_edit({"init_image": str(tmp_path / "logo.png"),
                                        "mask": str(tmp_path / "mask.png")}, 8)
  np.testing.assert_array_equal(image, media.read_image(tmp_path / "logo.png"))
  assert not keep[:, :4].any() and keep[:, 4:].all()


def test_a_clips_transparent_pixels_are_read_over_white(tmp_path):
  """A clip with an alpha channel (a .mov of PNG frames, as QuickTime Animation and ProRes 4444 hold one) is read over
  white as a folder dataset's clip, as its images are, not as the black its transparent pixels store."""
  import av

  from diffusion_jax.data import folder_dataset

  rgba = np.zeros((16, 16, 4), np.uint8)  # transparent black
  rgba[:8] = (255, 0, 0, 255)  # the top half opaque red
  with av.open(str(tmp_path / "sticker.mov"), "w") as container:
    stream = container.add_stream("png", rate=4)
    stream.width, stream.height, stream.pix_fmt = 16, 16, "rgba"
    for _ in range(2):
      container.mux(stream.encode(av.VideoFrame.from_ndarray(rgba, format="rgba")))
    container.mux(stream.encode())
  clip = folder_dataset.read_clip(tmp_path / "sticker.mov", frames=2, resolution=16)
  expected = np.full((2, 16, 16, 3), 255, np.uint8)
  expected[:, :8] = (255, 0, 0)
  np.testing.assert_array_equal(clip, expected)
  assert folder_dataset.FolderClips.VERSION > folder_dataset.FolderImages.VERSION  # (clip folders prepared again)


def test_an_image_over_pils_pixel_limit_is_named_not_a_traceback(tmp_path, monkeypatch):
  """An image over PIL's limit against decompression bombs (179 million pixels; 20 here) is an --init_image's
  ValueError naming the file and a folder dataset's skip naming the limit, not a traceback or "undecodable"."""
  from diffusion_jax import edit_inputs
  from diffusion_jax.data import folder_dataset

  PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "panorama.png")
  monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 10)
  with pytest.raises(ValueError, match="init_image .*panorama.png' cannot be read as an image .*exceeds limit"):
    edit_inputs.image_edit({"init_image": str(tmp_path / "panorama.png")}, 8)
  builder = folder_dataset.FolderImages(config=folder_dataset.FolderConfig(name="big", folder=str(tmp_path)),
                                        data_dir=tmp_path / "tfds", file_format="array_record")
  assert builder._read(tmp_path / "panorama.png")[0] == "over 20 pixels (PIL's limit against decompression bombs)"


def test_a_folder_prepared_by_earlier_reading_is_prepared_again(tmp_path, monkeypatch):
  """A folder dataset prepared when files were read otherwise (an earlier builder version: sideways photos, white
  16-bit scans) is prepared again rather than reused, and a latent cache built from it no longer opens."""
  import tensorflow_datasets as tfds
  from diffusion_jax.data import folder_dataset, latent_cache

  folder = tmp_path / "images"
  folder.mkdir()
  PIL.Image.fromarray(np.full((8, 8, 4), 0, np.uint8)).save(folder / "cutout.png")  # transparent: black, then white
  (folder / "captions.jsonl").write_text(json.dumps({"file": "cutout.png", "caption": "a cut-out"}))
  prepare = lambda: folder_dataset.builder(folder, folder / "captions.jsonl", tmp_path / "tfds")
  data = t2i_shapes.get_config("test").data
  data.update(dataset="folder", folder=str(folder), captions_file=str(folder / "captions.jsonl"))
  key = lambda: latent_cache.cache_key({}, data)
  with monkeypatch.context() as earlier:
    earlier.setattr(folder_dataset.CaptionedFolder, "VERSION", tfds.core.Version("1.0.0"))
    earlier.setattr(folder_dataset.media, "upright_rgb", lambda image: image.convert("RGB"))
    old, old_key = prepare(), key()
  new = prepare()
  assert old.data_path != new.data_path and str(new.version) == str(folder_dataset.CaptionedFolder.VERSION)
  assert old.as_data_source("train")[0]["image"].max() == 0 and new.as_data_source("train")[0]["image"].min() == 255
  assert key() != old_key


def test_a_clip_stored_sideways_is_read_upright(tmp_path):
  """A phone's MP4 stored sideways with a display matrix that turns it 90 degrees clockwise (its track header's:
  the matrix an iPhone writes for a portrait clip) is read turned, as players turn it: as a folder dataset's clip
  and as a sampling job's --init_video."""
  import struct

  from diffusion_jax import media
  from diffusion_jax.data import folder_dataset

  frames = np.zeros((3, 16, 32, 3), np.uint8)
  frames[:, :, :16] = 255  # as stored: 16 high, 32 wide, the left half white
  media.save_mp4(tmp_path / "clip.mp4", frames, {}, scale=1)
  data = bytearray((tmp_path / "clip.mp4").read_bytes())
  header = data.index(b"tkhd") + 4  # version 0: flags, times, track id, duration, reserved, layer ... then the matrix
  assert data[header] == 0
  matrix = header + 4 + 20 + 8 + 8
  data[matrix:matrix + 36] = struct.pack(">9i", 0, 1 << 16, 0, -(1 << 16), 0, 0, 0, 0, 1 << 30)
  (tmp_path / "clip.mp4").write_bytes(bytes(data))
  clip = folder_dataset.read_clip(tmp_path / "clip.mp4", frames=3, resolution=16)
  assert clip.shape == (3, 32, 16, 3) and clip[:, :16].mean() > 200 and clip[:, 16:].mean() < 50  # left -> top
  np.testing.assert_array_equal(media.read_mp4(tmp_path / "clip.mp4")[0], clip)  # a sampling job's --init_video


def test_a_captions_file_that_would_leave_every_image_uncaptioned_is_refused(tmp_path, capsys):
  """A captions.jsonl line with its caption under another key is refused naming the line (every image would have
  been skipped as uncaptioned); a spreadsheet's CSV with a byte-order mark is read; a file none of whose lines can be
  used is refused with the reasons, not prepared as an empty dataset."""
  from diffusion_jax.data import folder_dataset

  PIL.Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
  (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "a.png", "caption": "a red circle"}) + "\n"
                                           + json.dumps({"file": "a.png", "text": "a red circle"}) + "\n")
  with pytest.raises(ValueError, match="captions.jsonl' line 2: expected a JSON object with a 'file' and a 'caption'"):
    folder_dataset.read_captions(tmp_path / "captions.jsonl")
  (tmp_path / "captions.csv").write_text("file,caption\na.png,a red circle\n", encoding="utf-8-sig")
  assert folder_dataset.read_captions(tmp_path / "captions.csv") == [("a.png", "a red circle", "")]
  (tmp_path / "unusable.jsonl").write_text(json.dumps({"file": "a.png", "caption": " "}) + "\n"
                                           + json.dumps({"file": "gone.png", "caption": "a red circle"}) + "\n")
  assert folder_dataset.main([f"--images={tmp_path}", f"--captions={tmp_path / 'unusable.jsonl'}",
                              f"--data_dir={tmp_path / 'tfds'}"]) == 2
  assert ("error: None of the 2 lines of" in capsys.readouterr().err and
          not list((tmp_path / "tfds").glob("folder_images/[!.]*/*")))  # (no version of it)
