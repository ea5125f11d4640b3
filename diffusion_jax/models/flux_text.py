"""Flux's text condition (diffusers' FluxPipeline.encode_prompt): a CLIP text encoder, text_encoder/ (CLIP ViT-L's
CLIPTextModel), and a T5 encoder, text_encoder_2/ (T5 v1.1 XXL's), each reading its own tokenizer's ids. The
transformer attends to T5's last states of every position (its padding included: the pipelines give T5 no mask) and
adds CLIP's pooled embedding (the end-of-text token's final state, unprojected) to its time embedding.

As one text condition (what training, sampling, guidance and the text-embedding cache pass around as `text`) they
travel together: [n, t5 tokens, T5 width + CLIP width], the pooled embedding repeated beside every token
(sdxl_text.split takes it apart). Its null condition is the empty prompt's encoding (what FLUX.1's pipelines encode
as a negative prompt; FLUX.1 dev itself is guidance-distilled and samples without one).
"""

import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models import abstract_modules, clip, t5


class TextEncoders(nnx.Module):
  """(ids [n, clip_tokens + t5_tokens]: the CLIP tokenizer's ids, then T5's; mask, not read) -> the text condition
  [n, t5_tokens, T5 width + CLIP width]. lora_rank: the CLIP encoder's LoRA (clip.TextModel)."""

  def __init__(self, clip_config: dict, t5_config, t5_tokens: int, *, rngs: nnx.Rngs, lora_rank=0):
    self.clip = clip.TextModel(clip_config, rngs=rngs, lora_rank=lora_rank)
    self.t5 = t5.T5Encoder(t5_config, rngs=rngs)
    self.t5_tokens = t5_tokens

  def __call__(self, ids, mask=None):
    del mask
    clip_ids, t5_ids = ids[:, :-self.t5_tokens], ids[:, -self.t5_tokens:]
    pooled = self.clip.text_model(clip_ids).astype(jnp.float32)
    states = self.t5(t5_ids, jnp.ones(t5_ids.shape, bool))
    return jnp.concatenate([states, jnp.broadcast_to(pooled[:, None], states.shape[:2] + pooled.shape[-1:])], -1)


def build(config, rngs: nnx.Rngs, lora_rank=0) -> TextEncoders:
  """The TextEncoders of config.text's folders (text.pretrained_path, text.t5_encoder_path), randomly initialised."""
  return TextEncoders(*arguments(config), rngs=rngs, lora_rank=lora_rank)


def arguments(config) -> tuple:
  """TextEncoders' configs and sizes (before rngs) for config.text's folders."""
  text = config.text
  return (clip.read_text_config(text.pretrained_path), t5.read_hf_config(text.t5_encoder_path, text.t5.dtype),
          text.t5_max_length)


def load(config) -> TextEncoders:
  """TextEncoders with the weights of Flux's text_encoder/ and text_encoder_2/ folders."""
  encoders = abstract_modules.of(TextEncoders, *arguments(config))
  encoders.clip = clip.load_text(config.text.pretrained_path)
  encoders.t5 = t5.load_hf_encoder(config.text.t5_encoder_path, config.text.t5.dtype)
  return encoders
