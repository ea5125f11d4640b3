"""FLUX.1 Redux: an image to vary, read as tokens Flux's transformer attends to after the prompt's, as
FluxPriorReduxPipeline makes them: SigLIP's last states of the image (siglip.py; its image_encoder/ and the
resize and normalisation of its feature_extractor/), each projected to T5's width by diffusers' ReduxImageEncoder
(image_embedder/: up to three times that width, SiLU, down to it), read from a local FLUX.1 Redux root.
"""

import pathlib

import jax
import numpy as np
import PIL.Image
from flax import nnx

from diffusion_jax import local_files
from diffusion_jax.models import abstract_modules, clip, diffusers_directory, named_tensors, siglip

FOLDERS = ("image_encoder", "feature_extractor", "image_embedder")


class Redux(nnx.Module):
  """SigLIP's image tower (image_encoder) and the Redux embedder (redux_up, redux_down)."""

  def __init__(self, siglip_config: dict, embedder_config: dict, preprocessor: dict, *, rngs):
    width = embedder_config["txt_in_features"]
    self.mean, self.std = tuple(preprocessor["image_mean"]), tuple(preprocessor["image_std"])
    self.image_encoder = siglip.VisionModel(siglip_config, rngs=rngs)
    self.redux_up = nnx.Linear(embedder_config["redux_dim"], 3 * width, rngs=rngs)
    self.redux_down = nnx.Linear(3 * width, width, rngs=rngs)

  def __call__(self, images):
    """images [n, size, size, 3] in [-1, 1] (image_size's; image_pixels brings a file's to it) -> their tokens
    [n, patches, T5's width]."""
    pixels = ((images + 1.0) / 2.0 - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
    return self.redux_down(jax.nn.silu(self.redux_up(self.image_encoder(pixels))))


def configs(root, field: str = "model.flux_redux_path") -> tuple[dict, dict, dict]:
  """(SigLIP's config, the embedder's, the preprocessor's) of a local FLUX.1 Redux root; a ValueError naming `field`
  for a missing part."""
  root = pathlib.Path(root).expanduser()
  if missing := [folder for folder in FOLDERS if not (root / folder / (
      "preprocessor_config.json" if folder == "feature_extractor" else "config.json")).is_file()]:
    raise ValueError(f"{field}={str(root)!r} lacks {', '.join(f'{m}/' for m in missing)}: give the root of a FLUX.1 "
                     f"Redux checkpoint ({', '.join(f'{f}/' for f in FOLDERS)})")
  embedder = diffusers_directory.read_config(root / "image_embedder", field, "ReduxImageEncoder", "image_embedder",
                                             "a FLUX.1 Redux root's image_embedder/")
  preprocessor = {"image_mean": (0.5,) * 3, "image_std": (0.5,) * 3} | local_files.read_json(
      root / "feature_extractor" / "preprocessor_config.json")
  return siglip.read_config(root / "image_encoder", field), embedder, preprocessor


def image_size(root) -> tuple[int, int]:
  """(height, width) the root's feature extractor resizes images to (SiglipImageProcessor's size)."""
  siglip_config, _, preprocessor = configs(root)
  size = preprocessor.get("size", {})
  return size.get("height", siglip_config["image_size"]), size.get("width", siglip_config["image_size"])


def image_pixels(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """uint8 [h, w, 3] -> uint8 [height, width, 3]: resized (bicubic, no crop), as SiglipImageProcessor resizes it."""
  if image.shape[:2] == tuple(size):
    return image
  return np.asarray(PIL.Image.fromarray(image).resize((size[1], size[0]), PIL.Image.BICUBIC))


def load(root, field: str = "model.flux_redux_path") -> Redux:
  """The Redux of a local FLUX.1 Redux root's weights (image_encoder/model.safetensors,
  image_embedder/diffusion_pytorch_model.safetensors)."""
  root = pathlib.Path(root).expanduser()
  siglip_config, embedder, preprocessor = configs(root, field)
  if not (root / "image_encoder" / "model.safetensors").is_file():
    raise ValueError(f"{field}={str(root)!r}: image_encoder/ has no model.safetensors (PyTorch .bin files are not "
                     "read)")
  tensors = {f"image_encoder.{k}": v for k, v in siglip.tensors(root / "image_encoder").items()}
  tensors |= diffusers_directory.read_tensors(root / "image_embedder")
  module = abstract_modules.of(Redux, siglip_config, embedder, preprocessor)
  return named_tensors.load(module, tensors, clip.hf_name, f"{field}={str(root)!r} does not match its config.json")
