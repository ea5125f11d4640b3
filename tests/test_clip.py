"""CLIP's vision tower alone (models/clip.py): a local transformers CLIPVisionModel directory (Wan 2.1
image-to-video's image_encoder/) loads, its penultimate layer's states are transformers' hidden_states[-2], and
what is not one is refused naming why."""

import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from diffusion_jax.models import clip


def test_a_vision_models_penultimate_states_are_transformers_and_other_directories_are_refused(tmp_path):
  torch.manual_seed(0)
  reference = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
      hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8,
      hidden_act="gelu")).eval()
  reference.save_pretrained(tmp_path / "image_encoder", safe_serialization=True)
  model = clip.load_vision(tmp_path / "image_encoder")
  pixels = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    expected = reference(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2), output_hidden_states=True)
  np.testing.assert_allclose(model.vision_model.penultimate(pixels), expected.hidden_states[-2].numpy(), atol=1e-5)
  # as transformers 4 saved them (Wan's checkpoints): every name under vision_model.
  prefixed = tmp_path / "prefixed"
  prefixed.mkdir()
  (prefixed / "config.json").write_text((tmp_path / "image_encoder" / "config.json").read_text())
  save_file({f"vision_model.{k}": v for k, v in load_file(tmp_path / "image_encoder" / "model.safetensors").items()},
            prefixed / "model.safetensors")
  np.testing.assert_array_equal(clip.load_vision(prefixed).vision_model.penultimate(pixels),
                                model.vision_model.penultimate(pixels))
  images = np.random.default_rng(1).uniform(-1, 1, size=(2, 32, 32, 3)).astype(np.float32)
  np.testing.assert_allclose(model.penultimate(images),  # images in [-1, 1], normalised as CLIP's processor does
                             model.vision_model.penultimate(clip.preprocess_float((images + 1) / 2, 32)), atol=1e-6)
  with pytest.raises(ValueError, match="has no config.json: give the local directory of a transformers "
                                       "CLIPVisionModel"):
    clip.load_vision(tmp_path)
  config = json.loads((tmp_path / "image_encoder" / "config.json").read_text())
  (tmp_path / "image_encoder" / "config.json").write_text(json.dumps(config | {"hidden_act": "relu"}))
  with pytest.raises(ValueError, match="hidden_act 'relu' is not one of"):
    clip.load_vision(tmp_path / "image_encoder")
  (tmp_path / "image_encoder" / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 4}))
  with pytest.raises(ValueError, match="does not match its config.json"):
    clip.load_vision(tmp_path / "image_encoder")
