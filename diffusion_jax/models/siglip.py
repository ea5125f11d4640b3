"""SigLIP's image tower (Zhai et al. 2023) in Flax NNX, read from a local transformers SiglipVisionModel directory
(nothing is downloaded): the image encoder of FLUX.1 Redux (redux.py), which reads every patch token's last state.
Its blocks are CLIP's (clip.Encoder, GELU's tanh form); it has no class token, no layer norm before the blocks and
a patch embedding with a bias; its attention-pooling head is not read.
"""

import pathlib

import jax.numpy as jnp
from flax import nnx

from diffusion_jax import local_files
from diffusion_jax.models import clip

# Defaults of a transformers SiglipVisionConfig for fields a config.json leaves out.
DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
                patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)


class VisionEmbeddings(nnx.Module):
  def __init__(self, c, *, rngs):
    width, patch = c["hidden_size"], c["patch_size"]
    self.patch_embedding = nnx.Conv(3, width, (patch, patch), strides=patch, padding="VALID", rngs=rngs)
    self.position_embedding = nnx.Embed((c["image_size"] // patch) ** 2, width, rngs=rngs)


class VisionTransformer(nnx.Module):
  def __init__(self, c, *, rngs):
    self.embeddings = VisionEmbeddings(c, rngs=rngs)
    self.encoder = clip.Encoder(c, rngs=rngs)
    self.post_layernorm = nnx.LayerNorm(c["hidden_size"], epsilon=c["layer_norm_eps"], rngs=rngs)

  def __call__(self, pixels):
    """pixels [n, size, size, 3], normalised -> every patch token's last state [n, patches, width] (transformers'
    last_hidden_state)."""
    patches = self.embeddings.patch_embedding(pixels)
    x = patches.reshape(patches.shape[0], -1, patches.shape[-1])
    x = x + self.embeddings.position_embedding(jnp.arange(x.shape[1]))
    return self.post_layernorm(self.encoder(x, causal=False))


class VisionModel(nnx.Module):
  """A SiglipVisionModel (its tensors vision_model.*) of a config.json's fields."""

  def __init__(self, config: dict, *, rngs):
    self.vision_model = VisionTransformer(config, rngs=rngs)

  def __call__(self, pixels):
    return self.vision_model(pixels)


def read_config(path, field: str) -> dict:
  """The config.json of a local SiglipVisionModel directory, with its defaults; a ValueError naming `field`."""
  file = pathlib.Path(path).expanduser() / "config.json"
  if not file.is_file():
    raise ValueError(f"{field}: {str(file.parent)!r} has no config.json: give the local directory of a transformers "
                     "SiglipVisionModel (a FLUX.1 Redux root's image_encoder/)")
  config = local_files.read_json(file)
  if config.get("model_type") != "siglip_vision_model":
    raise ValueError(f"{field}: {str(file.parent)!r} holds a {config.get('model_type')!r}, not a SiglipVisionModel")
  config = DEFAULTS | config
  if config["hidden_act"] not in clip.ACTIVATIONS:
    raise ValueError(f"{field}: {str(file.parent)!r}: hidden_act {config['hidden_act']!r} is not one of "
                     f"{list(clip.ACTIVATIONS)}")
  return config


HEAD = "vision_model.head."  # the attention-pooling head's tensors, which nothing here reads


def tensors(path) -> dict:
  """{name: array} of a SiglipVisionModel directory's model.safetensors, named vision_model.* (transformers 5 saves
  them unprefixed), the head's left out."""
  return {name: value for name, value in clip.tower_tensors(path, "vision_model.").items()
          if not name.startswith(HEAD)}
