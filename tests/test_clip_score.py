"""CLIP score: a local Hugging Face CLIP directory loads into the Flax model, which computes what
transformers' PyTorch CLIPModel computes (the tiny random-weight model of conftest.tiny_clip as the oracle)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from diffusion_jax.metrics import clip_score  # noqa: E402


def test_embeddings_and_scores_match_transformers(tiny_clip):
  directory, torch_model = tiny_clip
  model = clip_score.from_pretrained(directory)
  encode = clip_score.tokenizer(directory, model.max_length)
  prompts = ["a red circle", "a large blue square at the top left"]  # the second is cut to 8 tokens
  ids = encode(prompts)
  # End of text (the last id) kept last, and padding.
  assert ids.shape == (2, 8) and ids[1, -1] == ids[0, 4] == ids.max()
  images = np.random.default_rng(0).integers(0, 256, (2, 20, 20, 3), dtype=np.uint8)
  pixels = np.asarray(clip_score.preprocess(images, model.image_size))
  with torch.no_grad():
    text = torch_model.get_text_features(input_ids=torch.from_numpy(ids).long()).pooler_output.numpy()
    image = torch_model.get_image_features(
        pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).pooler_output.numpy()
  np.testing.assert_allclose(np.asarray(model.text_embeds(ids)), text, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(model.image_embeds(pixels)), image, atol=1e-4, rtol=1e-4)
  cosine = (image * text).sum(-1) / np.linalg.norm(image, axis=-1) / np.linalg.norm(text, axis=-1)
  np.testing.assert_allclose(clip_score.scores(model, encode, images, prompts), 100 * np.maximum(cosine, 0),
                             atol=1e-2)
  assert clip_score.load(str(directory))(images, prompts) == pytest.approx(100 * np.maximum(cosine, 0).mean(),
                                                                          abs=1e-2)


@pytest.mark.parametrize("height, width", [(32, 32), (32, 50), (45, 24)])
def test_preprocessing_matches_the_clip_image_processor(height, width):
  """Squares, and other shapes scaled by their shorter side and centre-cropped."""
  images = np.random.default_rng(1).integers(0, 256, (2, height, width, 3), dtype=np.uint8)
  processor = transformers.CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
  theirs = processor(images=list(images), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
  ours = np.asarray(clip_score.preprocess(images, 224))
  # PIL rounds the resized image to uint8 (1/255 = 0.015 after normalisation) and treats borders its own way.
  assert np.abs(ours - theirs).mean() < 0.02 and np.abs(ours - theirs).max() < 0.3


def test_bad_checkpoints_are_refused_with_every_problem_named(tiny_clip, tmp_path):
  from safetensors.numpy import load_file, save_file

  directory, _ = tiny_clip
  with pytest.raises(ValueError, match="No config.json or model.safetensors"):
    clip_score.from_pretrained(tmp_path)
  tensors = load_file(directory / "model.safetensors")
  del tensors["visual_projection.weight"]
  tensors["text_projection.weight"] = np.zeros((3, 3), np.float32)
  save_file(tensors, tmp_path / "model.safetensors")
  (tmp_path / "config.json").write_text((directory / "config.json").read_text())
  with pytest.raises(ValueError) as error:
    clip_score.from_pretrained(tmp_path)
  assert "missing visual_projection.weight" in str(error.value)
  assert "text_projection.weight has shape (3, 3), expected (16, 32)" in str(error.value)
  with pytest.raises(ValueError, match="No tokenizer.json"):
    clip_score.tokenizer(tmp_path, 8)
