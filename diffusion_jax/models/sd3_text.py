"""Stable Diffusion 3's text condition (Esser et al. 2024; diffusers' StableDiffusion3Pipeline.encode_prompt): two
CLIP text encoders with projections, text_encoder/ (CLIP ViT-L's) and text_encoder_2/ (OpenCLIP ViT-bigG's), and a
T5 encoder, text_encoder_3/ (T5 v1.1 XXL's), each reading its own tokenizer's ids. The transformer attends to the
CLIP tokens' states after all but the last layer of both, concatenated and zero-padded to the T5's width, followed by
the T5's last states of every position (its padding included: the pipelines give T5 no mask); its time embedding
adds both CLIPs' projected end-of-text states (the pooled embedding, concatenated). Without a T5 (the pipelines'
text_encoder_3=None; text.t5_encoder_path empty) its tokens are zeros.

As one text condition (what training, sampling, guidance and the text-embedding cache pass around as `text`) they
travel together: [n, clip tokens + t5 tokens, width + pooled width], the pooled embedding repeated beside every token
(sdxl_text.split takes it apart). Its null condition is the empty prompt's encoding, as SD3's pipelines' default
negative prompt "".
"""

import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models import abstract_modules, clip, t5


class TextEncoders(nnx.Module):
  """(ids [n, 2 clip_tokens + t5_tokens]: the first CLIP tokenizer's ids, the second's, then T5's; mask, not read)
  -> the text condition [n, clip_tokens + t5_tokens, width + pooled width]. `width`: the transformer's
  joint_attention_dim (the T5's d_model); t5_config None: no T5, its t5_tokens tokens zeros. lora_rank: both CLIP
  encoders' LoRA (clip.TextModel)."""

  def __init__(self, first_config: dict, second_config: dict, t5_config, t5_tokens: int, width: int, *,
               rngs: nnx.Rngs, lora_rank=0):
    self.first = clip.TextModelWithProjection(first_config, rngs=rngs, lora_rank=lora_rank)
    self.second = clip.TextModelWithProjection(second_config, rngs=rngs, lora_rank=lora_rank)
    self.t5 = t5.T5Encoder(t5_config, rngs=rngs) if t5_config is not None else None
    self.t5_tokens, self.width = t5_tokens, width

  def __call__(self, ids, mask=None):
    del mask
    clip_tokens = (ids.shape[1] - self.t5_tokens) // 2
    first_ids, second_ids, t5_ids = jnp.split(ids, [clip_tokens, 2 * clip_tokens], axis=1)
    states, pooled = [], []
    for encoder, encoder_ids in ((self.first, first_ids), (self.second, second_ids)):
      penultimate, end = encoder.text_model.penultimate_and_pooled(encoder_ids)
      states.append(penultimate.astype(jnp.float32))
      pooled.append(encoder.text_projection(end).astype(jnp.float32))
    states = jnp.concatenate(states, axis=-1)
    states = jnp.pad(states, ((0, 0), (0, 0), (0, self.width - states.shape[-1])))
    t5_states = (jnp.zeros(t5_ids.shape + (self.width,)) if self.t5 is None
                 else self.t5(t5_ids, jnp.ones(t5_ids.shape, bool)))
    tokens = jnp.concatenate([states, t5_states], axis=1)
    pooled = jnp.concatenate(pooled, axis=-1)
    return jnp.concatenate([tokens, jnp.broadcast_to(pooled[:, None], tokens.shape[:2] + pooled.shape[-1:])], -1)


def build(config, width: int, rngs: nnx.Rngs, lora_rank=0) -> TextEncoders:
  """The TextEncoders of config.text's folders (text.pretrained_path, text.second_encoder_path, text.t5_encoder_path)
  for a transformer reading `width`-wide tokens, randomly initialised."""
  return TextEncoders(*arguments(config, width), rngs=rngs, lora_rank=lora_rank)


def arguments(config, width: int) -> tuple:
  """TextEncoders' configs and sizes (before rngs) for config.text's folders and a `width`-wide transformer."""
  text = config.text
  t5_config = t5.read_hf_config(text.t5_encoder_path, text.t5.dtype) if text.t5_encoder_path else None
  return (clip.read_text_config(text.pretrained_path),
          clip.read_text_config(text.second_encoder_path, "text.second_encoder_path"), t5_config, text.t5_max_length,
          width)


def load(config, width: int) -> TextEncoders:
  """TextEncoders with the weights of SD3's text_encoder/, text_encoder_2/ and text_encoder_3/ folders."""
  text = config.text
  encoders = abstract_modules.of(TextEncoders, *arguments(config, width))
  encoders.first = clip.load_text(text.pretrained_path, with_projection=True)
  encoders.second = clip.load_text(text.second_encoder_path, "text.second_encoder_path", with_projection=True)
  if text.t5_encoder_path:
    encoders.t5 = t5.load_hf_encoder(text.t5_encoder_path, text.t5.dtype)
  return encoders
