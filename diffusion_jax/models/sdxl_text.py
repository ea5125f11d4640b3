"""SDXL's text condition (Podell et al. 2023; diffusers' StableDiffusionXLPipeline.encode_prompt): two CLIP text
encoders, text_encoder/ (a CLIPTextModel, CLIP ViT-L's) and text_encoder_2/ (a CLIPTextModelWithProjection,
OpenCLIP ViT-bigG's), each reading its own tokenizer's ids. The U-Net cross-attends to every token's states after
all but the last layer of both, concatenated, and adds to its time embedding the second's projected end-of-text
state (the pooled embedding) beside the image's size and crop (`time_ids`).

The SDXL refiner has the second encoder alone (its root has no text_encoder/): it cross-attends to that encoder's
penultimate states, and its time ids end with an aesthetic score instead of the target size. Its null condition is
the empty prompt's encoding (its pipeline's force_zeros_for_empty_prompt is false).

As one text condition (what training, sampling, guidance and the text-embedding cache pass around as `text`) the
two travel together: [n, tokens, width_1 + width_2 + projection_dim], the pooled embedding repeated beside every
token; `split` takes it apart. Its null condition is zeros, as SDXL's pipelines' (force_zeros_for_empty_prompt).
"""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax.models import abstract_modules, clip


class TextEncoders(nnx.Module):
  """(ids [n, 2 tokens]: the first tokenizer's ids, then the second's; mask, not read) -> the text condition
  [n, tokens, width_1 + width_2 + projection_dim]. Without a first encoder (first_config None: the refiner's), ids
  [n, tokens] of the second's tokenizer -> [n, tokens, width_2 + projection_dim]. lora_rank: both encoders' LoRA
  (clip.TextModel)."""

  def __init__(self, first_config: dict | None, second_config: dict, *, rngs: nnx.Rngs, lora_rank=0):
    self.first = clip.TextModel(first_config, rngs=rngs, lora_rank=lora_rank) if first_config else None
    self.second = clip.TextModelWithProjection(second_config, rngs=rngs, lora_rank=lora_rank)

  def __call__(self, ids, mask=None):
    del mask
    first_ids, second_ids = jnp.split(ids, 2, axis=1) if self.first is not None else (None, ids)
    second, pooled = self.second.text_model.penultimate_and_pooled(second_ids)
    states = [self.first.text_model.penultimate_and_pooled(first_ids)[0]] if self.first is not None else []
    pooled = self.second.text_projection(pooled)
    pooled = jnp.broadcast_to(pooled[:, None], second.shape[:2] + pooled.shape[-1:])
    return jnp.concatenate(states + [second, pooled], axis=-1)


def load(first_path, second_path, second_field: str = "text.second_encoder_path") -> TextEncoders:
  """TextEncoders with the weights of SDXL's text_encoder/ (text.pretrained_path) and text_encoder_2/
  (text.second_encoder_path) folders; first_path empty: the refiner's, its text_encoder_2/ alone (at `second_field`,
  text.pretrained_path)."""
  encoders = abstract_modules.of(TextEncoders, clip.read_text_config(first_path) if first_path else None,
                                 clip.read_text_config(second_path, second_field))
  encoders.first = clip.load_text(first_path) if first_path else None
  encoders.second = clip.load_text(second_path, second_field, with_projection=True)
  return encoders


def split(text, width: int):
  """The text condition [n, tokens, width + projection_dim] -> (the tokens' states [n, tokens, width], the pooled
  embedding [n, projection_dim])."""
  return text[..., :width], text[:, 0, width:]


def size_ids(original, top_left, target, aesthetic_score=None) -> np.ndarray:
  """SDXL's size and crop condition of one image, [6] float32: its original (height, width), the (top, left) of its
  crop, the target (height, width); with an aesthetic_score, the refiner's [5]: the score instead of the target."""
  last = tuple(target) if aesthetic_score is None else (aesthetic_score,)
  return np.array([*original, *top_left, *last], np.float32)


def time_ids(batch: int, height: int, width: int, aesthetic_score=None):
  """[batch, 6] float32 (the refiner's, with an aesthetic_score: [batch, 5]): size_ids of an image of height x width
  pixels, uncropped and made at its own size (the pipelines' default: original size, crop top-left (0, 0), target
  size)."""
  ids = size_ids((height, width), (0, 0), (height, width), aesthetic_score)
  return jnp.broadcast_to(jnp.asarray(ids), (batch,) + ids.shape)
