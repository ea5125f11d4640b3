"""CLIP score of generated images against their prompts, with CLIP weights from a local directory.

The directory is a Hugging Face CLIP checkpoint (e.g. openai/clip-vit-base-patch32 downloaded by the user):
`config.json`, `model.safetensors` and `tokenizer.json`; nothing is downloaded and transformers is not
needed. The model (Flax NNX, models/clip.py) is CLIP's ViT image tower and causal text transformer with their
projections; images are resized (bicubic) to the model's resolution and normalised with CLIP's mean and std, prompts
are tokenised by `tokenizers` and cut to the text model's length.

CLIP score = 100 * max(cos(image embedding, text embedding), 0), averaged over images (torchmetrics'
convention; Hessel et al.'s CLIPScore is 2.5 * max(cos, 0)).

  scorer = clip_score.load("~/weights/clip-vit-base-patch32")
  scorer(images_uint8 [n, h, w, 3], prompts) -> float
"""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax.models.clip import CLIP, from_pretrained, preprocess


def tokenizer(path, max_length: int):
  """prompts -> int32 ids [n, max_length]: tokenizer.json's encoding (with its start / end tokens), cut to
  max_length with the end-of-text token kept last, padded with end-of-text as CLIP's tokenizer does."""
  from tokenizers import Tokenizer

  file = pathlib.Path(path).expanduser() / "tokenizer.json"
  if not file.is_file():
    raise ValueError(f"No tokenizer.json in {str(file.parent)!r}; the CLIP checkpoint directory needs it.")
  tok = Tokenizer.from_file(str(file))
  end = tok.token_to_id("<|endoftext|>")
  if end is None:
    raise ValueError(f"{str(file)!r} has no <|endoftext|> token; is it a CLIP tokenizer?")

  def encode(prompts):
    ids = np.full((len(prompts), max_length), end, np.int32)
    for row, encoding in enumerate(tok.encode_batch(list(prompts))):
      tokens = encoding.ids if len(encoding.ids) <= max_length else encoding.ids[:max_length - 1] + [end]
      ids[row, :len(tokens)] = tokens
    return ids

  return encode




@functools.partial(jax.jit, static_argnames="graphdef")
def _cosines(graphdef, state, pixels, ids):
  model = nnx.merge(graphdef, state)
  normalise = lambda v: v / jnp.linalg.norm(v, axis=-1, keepdims=True)
  return jnp.sum(normalise(model.image_embeds(pixels)) * normalise(model.text_embeds(ids)), axis=-1)


def scores(model: CLIP, encode, images, prompts, batch: int = 64) -> np.ndarray:
  """Per-image CLIP score [n]: 100 * max(cosine similarity of image and prompt embeddings, 0)."""
  if len(images) != len(prompts):
    raise ValueError(f"{len(images)} images but {len(prompts)} prompts; CLIP score pairs them one to one.")
  graphdef, state = nnx.split(model)
  state = jax.device_put(state)  # once, not every batch (loaded weights are on the host)
  cosines = [np.asarray(_cosines(graphdef, state, preprocess(images[i:i + batch], model.image_size),
                                 encode(prompts[i:i + batch]))) for i in range(0, len(images), batch)]
  return 100.0 * np.maximum(np.concatenate(cosines), 0.0)


@functools.cache
def load(path: str):
  """A scorer (uint8 images [n, h, w, 3], n prompts) -> mean CLIP score, from a local CLIP directory."""
  model = from_pretrained(path)
  encode = tokenizer(path, model.max_length)
  return lambda images, prompts: float(scores(model, encode, images, list(prompts)).mean())
