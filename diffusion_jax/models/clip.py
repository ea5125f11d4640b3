"""CLIP (Radford et al. 2021): its ViT image tower and causal text transformer with their projections, in Flax NNX,
read from local Hugging Face checkpoints (nothing is downloaded, transformers is not needed): a whole CLIPModel
(`from_pretrained`: CLIP score, metrics/clip_score.py), a CLIPVisionModel alone (`load_vision`: the image encoder
of Wan 2.1's image-to-video models, which reads its penultimate layer's states) or a CLIPTextModel alone
(`load_text`: Stable Diffusion's text encoder, whose every token's last states the U-Net reads) or a
CLIPTextModelWithProjection (`load_text`, with_projection: SDXL's second text encoder, models/sdxl_text.py).
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax import local_files
from diffusion_jax.models import abstract_modules, layers, named_tensors

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
# Defaults of a Hugging Face CLIP config (ViT-B/32) for fields a config.json leaves out.
TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                     num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                     eos_token_id=49407, projection_dim=512)
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
ACTIVATIONS = {"quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
               "gelu": lambda x: jax.nn.gelu(x, approximate=False),
               "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True)}  # (SigLIP's: siglip.py)


class Attention(nnx.Module):
  """Self-attention (q_proj, k_proj, v_proj, out_proj) and, with lora_rank, their low-rank updates (`*_lora`)."""

  def __init__(self, width, heads, *, rngs, lora_rank=0):
    self.heads = heads
    self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nnx.Linear(width, width, rngs=rngs) for _ in range(4))
    self.q_proj_lora, self.k_proj_lora, self.v_proj_lora, self.out_proj_lora = (
        layers.lora(width, width, (None, None), lora_rank, rngs, jnp.float32) for _ in range(4))

  def __call__(self, x, causal):
    """x: [n, tokens, width]."""
    split = lambda y: y.reshape(y.shape[:2] + (self.heads, -1))
    project = lambda name, y: layers.adapted(self, name, y)
    out = jax.nn.dot_product_attention(split(project("q_proj", x)), split(project("k_proj", x)),
                                       split(project("v_proj", x)), is_causal=causal)
    return project("out_proj", out.reshape(x.shape))


class MLP(nnx.Module):  # fc1 and fc2 (and their low-rank updates); the activation is applied by EncoderLayer
  def __init__(self, width, hidden, *, rngs, lora_rank=0):
    self.fc1, self.fc2 = nnx.Linear(width, hidden, rngs=rngs), nnx.Linear(hidden, width, rngs=rngs)
    self.fc1_lora = layers.lora(width, hidden, (None, None), lora_rank, rngs, jnp.float32)
    self.fc2_lora = layers.lora(hidden, width, (None, None), lora_rank, rngs, jnp.float32)


class EncoderLayer(nnx.Module):  # pre-norm transformer block
  def __init__(self, c, *, rngs, lora_rank=0):
    self.activation = c["hidden_act"]
    width, eps = c["hidden_size"], c["layer_norm_eps"]
    self.layer_norm1 = nnx.LayerNorm(width, epsilon=eps, rngs=rngs)
    self.self_attn = Attention(width, c["num_attention_heads"], rngs=rngs, lora_rank=lora_rank)
    self.layer_norm2 = nnx.LayerNorm(width, epsilon=eps, rngs=rngs)
    self.mlp = MLP(width, c["intermediate_size"], rngs=rngs, lora_rank=lora_rank)

  def __call__(self, x, causal):
    x = x + self.self_attn(self.layer_norm1(x), causal)
    hidden = ACTIVATIONS[self.activation](layers.adapted(self.mlp, "fc1", self.layer_norm2(x)))
    return x + layers.adapted(self.mlp, "fc2", hidden)


class Encoder(nnx.Module):
  def __init__(self, c, *, rngs, lora_rank=0):
    self.layers = nnx.List([EncoderLayer(c, rngs=rngs, lora_rank=lora_rank) for _ in range(c["num_hidden_layers"])])

  def __call__(self, x, causal):
    for layer in self.layers:
      x = layer(x, causal)
    return x


class TextEmbeddings(nnx.Module):
  def __init__(self, c, *, rngs):
    self.token_embedding = nnx.Embed(c["vocab_size"], c["hidden_size"], rngs=rngs)
    self.position_embedding = nnx.Embed(c["max_position_embeddings"], c["hidden_size"], rngs=rngs)


class TextTransformer(nnx.Module):
  def __init__(self, c, *, rngs, lora_rank=0):
    self.eos_token_id = c["eos_token_id"]
    self.embeddings = TextEmbeddings(c, rngs=rngs)
    self.encoder = Encoder(c, rngs=rngs, lora_rank=lora_rank)
    self.final_layer_norm = nnx.LayerNorm(c["hidden_size"], epsilon=c["layer_norm_eps"], rngs=rngs)

  def embed(self, ids):
    return self.embeddings.token_embedding(ids) + self.embeddings.position_embedding(jnp.arange(ids.shape[1]))

  def states(self, ids):
    """ids [n, tokens] -> every token's last states [n, tokens, width] (transformers' last_hidden_state)."""
    return self.final_layer_norm(self.encoder(self.embed(ids), causal=True))

  def pooled(self, ids, states):
    """The end-of-text token's row [n, width] of states [n, tokens, width] (transformers' pooler_output of the last
    states)."""
    # Configs from before transformers' PR #24773 say eos_token_id=2 and mean the largest id (end of text).
    end = jnp.argmax(ids, axis=-1) if self.eos_token_id == 2 else jnp.argmax(ids == self.eos_token_id, axis=-1)
    return jnp.take_along_axis(states, end[:, None, None], axis=1)[:, 0]

  def __call__(self, ids):
    """ids [n, tokens] (ending in end-of-text, then padding) -> the end-of-text token's state [n, width]."""
    return self.pooled(ids, self.states(ids))

  def penultimate_and_pooled(self, ids):
    """ids [n, tokens] -> (every token's states after all but the last layer [n, tokens, width], transformers'
    hidden_states[-2]; the end-of-text token's last state [n, width], as __call__), in one pass."""
    x = self.embed(ids)
    for layer in self.encoder.layers[:-1]:
      x = layer(x, causal=True)
    return x, self.pooled(ids, self.final_layer_norm(self.encoder.layers[-1](x, causal=True)))


class VisionEmbeddings(nnx.Module):
  def __init__(self, c, *, rngs):
    width, patch = c["hidden_size"], c["patch_size"]
    self.class_embedding = nnx.Param(jnp.zeros((width,)))
    self.patch_embedding = nnx.Conv(3, width, (patch, patch), strides=patch, padding="VALID", use_bias=False,
                                    rngs=rngs)
    self.position_embedding = nnx.Embed((c["image_size"] // patch) ** 2 + 1, width, rngs=rngs)


class VisionTransformer(nnx.Module):
  def __init__(self, c, *, rngs):
    width, eps = c["hidden_size"], c["layer_norm_eps"]
    self.embeddings = VisionEmbeddings(c, rngs=rngs)
    self.pre_layrnorm = nnx.LayerNorm(width, epsilon=eps, rngs=rngs)  # sic: the checkpoints' name
    self.encoder = Encoder(c, rngs=rngs)
    self.post_layernorm = nnx.LayerNorm(width, epsilon=eps, rngs=rngs)

  def tokens(self, pixels):
    """pixels [n, size, size, 3], normalised -> the class and patch tokens [n, 1 + patches, width] entering the
    encoder."""
    patches = self.embeddings.patch_embedding(pixels)
    patches = patches.reshape(patches.shape[0], -1, patches.shape[-1])
    cls = jnp.broadcast_to(self.embeddings.class_embedding[...], (patches.shape[0], 1, patches.shape[-1]))
    x = jnp.concatenate([cls, patches], axis=1)
    return self.pre_layrnorm(x + self.embeddings.position_embedding(jnp.arange(x.shape[1])))

  def __call__(self, pixels):
    """pixels [n, size, size, 3], normalised -> the class token's state [n, width]."""
    return self.post_layernorm(self.encoder(self.tokens(pixels), causal=False)[:, 0])

  def penultimate(self, pixels):
    """pixels [n, size, size, 3], normalised -> every token's state after all but the last encoder layer [n, 1 +
    patches, width] (transformers' hidden_states[-2], what Wan 2.1's image-to-video models read)."""
    x = self.tokens(pixels)
    for layer in self.encoder.layers[:-1]:
      x = layer(x, causal=False)
    return x


class CLIP(nnx.Module):
  """Names follow Hugging Face CLIP checkpoints, so each parameter maps to one tensor of model.safetensors."""

  def __init__(self, text_config, vision_config, projection_dim, *, rngs):
    self.image_size = vision_config["image_size"]
    self.max_length = text_config["max_position_embeddings"]
    self.text_model = TextTransformer(text_config, rngs=rngs)
    self.vision_model = VisionTransformer(vision_config, rngs=rngs)
    self.text_projection = nnx.Linear(text_config["hidden_size"], projection_dim, use_bias=False, rngs=rngs)
    self.visual_projection = nnx.Linear(vision_config["hidden_size"], projection_dim, use_bias=False, rngs=rngs)
    self.logit_scale = nnx.Param(jnp.zeros(()))

  def text_embeds(self, ids):
    return self.text_projection(self.text_model(ids))

  def image_embeds(self, pixels):
    return self.visual_projection(self.vision_model(pixels))


def hf_name(path: tuple, ndim: int) -> tuple[str, tuple | None]:
  """NNX parameter path -> (checkpoint tensor name, transpose from PyTorch layout or None)."""
  *module, leaf = path
  prefix = ".".join(module)
  if leaf in ("class_embedding", "logit_scale"):
    return ".".join(module + [leaf]), None
  if leaf == "kernel":
    return f"{prefix}.weight", named_tensors.kernel_transpose(ndim)
  renamed = {"scale": "weight", "embedding": "weight", "bias": "bias"}[leaf]
  return f"{prefix}.{renamed}", None


def from_pretrained(path) -> CLIP:
  """CLIP from a local Hugging Face checkpoint directory (config.json + model.safetensors)."""
  directory = pathlib.Path(path).expanduser()
  missing = [n for n in ("config.json", "model.safetensors") if not (directory / n).is_file()]
  if missing:
    raise ValueError(f"No {' or '.join(missing)} in {str(directory)!r}; give the local directory of a Hugging Face "
                     "CLIP checkpoint (config.json, model.safetensors, tokenizer.json).")
  config = local_files.read_json(directory / "config.json")
  text = TEXT_DEFAULTS | config.get("text_config", {})
  vision = VISION_DEFAULTS | config.get("vision_config", {})
  problems = [f"hidden_act {c['hidden_act']!r} is not one of {list(ACTIVATIONS)}" for c in (text, vision)
              if c["hidden_act"] not in ACTIVATIONS]
  if problems:
    raise ValueError(f"CLIP checkpoint {str(directory)!r}: " + "; ".join(problems))
  tensors = {k: v for k, v in named_tensors.read_safetensors(directory / "model.safetensors").items()
             if not k.endswith("position_ids")}
  abstract = abstract_modules.of(CLIP, text, vision, config.get("projection_dim", 512))
  return named_tensors.load(abstract, tensors, hf_name,
                            f"CLIP checkpoint {str(directory)!r} does not match its config.json")


class VisionModel(nnx.Module):
  """A CLIPVisionModel (transformers' name: its tensors are vision_model.*) of a config.json's fields."""

  def __init__(self, config: dict, *, rngs):
    self.image_size = config["image_size"]
    self.vision_model = VisionTransformer(config, rngs=rngs)

  def penultimate(self, images):
    """Images [n, h, w, 3] in [-1, 1] -> VisionTransformer.penultimate of them brought to the model's size
    (preprocess_float) and normalised."""
    return self.vision_model.penultimate(preprocess_float((images + 1.0) / 2.0, self.image_size))


class TextModel(nnx.Module):
  """A CLIPTextModel (transformers' name: its tensors are text_model.*) of a config.json's fields, as a text encoder:
  (ids [n, tokens], mask) -> every token's last states [n, tokens, width]. The mask is not read: CLIP's attention is
  causal, and Stable Diffusion's pipelines give its text encoder none. lora_rank: a LoRA's low-rank updates of every
  layer's attention and MLP projections (0: none)."""

  def __init__(self, config: dict, *, rngs, lora_rank=0):
    self.text_model = TextTransformer(config, rngs=rngs, lora_rank=lora_rank)

  def __call__(self, ids, mask=None):
    del mask
    return self.text_model.states(ids)


class TextModelWithProjection(nnx.Module):
  """A CLIPTextModelWithProjection (tensors text_model.* and text_projection.weight): its text transformer and the
  unbiased projection of its pooled state (transformers' text_embeds)."""

  def __init__(self, config: dict, *, rngs, lora_rank=0):
    self.text_model = TextTransformer(config, rngs=rngs, lora_rank=lora_rank)
    self.text_projection = nnx.Linear(config["hidden_size"], config["projection_dim"], use_bias=False, rngs=rngs)


def is_text_model(path) -> bool:
  """Whether a local directory holds a CLIPTextModel (its config.json's model_type)."""
  file = pathlib.Path(path).expanduser() / "config.json"
  return file.is_file() and local_files.read_json(file).get("model_type") == "clip_text_model"


def has_text_projection(path) -> bool:
  """Whether a local CLIP text model directory holds a CLIPTextModelWithProjection (its config.json's
  architectures), as SDXL's text_encoder_2/."""
  file = pathlib.Path(path).expanduser() / "config.json"
  return file.is_file() and "CLIPTextModelWithProjection" in local_files.read_json(file).get("architectures", [])


def read_text_config(path, field: str = "text.pretrained_path") -> dict:
  """The config.json of a local CLIPTextModel directory, with its defaults; a ValueError naming `field`."""
  config = local_files.read_json(pathlib.Path(path).expanduser() / "config.json") if is_text_model(path) else None
  if config is None:
    raise ValueError(f"{field}={str(path)!r} holds no CLIPTextModel (config.json with model_type 'clip_text_model')")
  config = TEXT_DEFAULTS | config
  if config["hidden_act"] not in ACTIVATIONS:
    raise ValueError(f"{field}={str(path)!r}: hidden_act {config['hidden_act']!r} is not one of {list(ACTIVATIONS)}")
  return config


def load_text(path, field: str = "text.pretrained_path", with_projection: bool = False):
  """A TextModel (with_projection: a TextModelWithProjection) with the weights of a local CLIPTextModel (or
  CLIPTextModelWithProjection) directory (config.json, model.safetensors)."""
  return _load_tower(TextModelWithProjection if with_projection else TextModel, read_text_config(path, field), path,
                     field, "text_model.")


def text_tensor_shapes(path, field: str = "text.pretrained_path", with_projection: bool = False) -> dict:
  """{tensor name: shape} of what load_text reads from a local CLIPTextModel (with_projection:
  CLIPTextModelWithProjection) directory's model.safetensors (from its config.json alone; names text_model.*)."""
  config = read_text_config(path, field)
  model_class = TextModelWithProjection if with_projection else TextModel
  return named_tensors.shapes(abstract_modules.of(model_class, config), hf_name)


def text_tensors(module) -> dict:
  """{tensor name: array in PyTorch's layout} of a TextModel's (TextModelWithProjection's) weights: the
  model.safetensors that load_text reads back into them."""
  return named_tensors.tensors(module, hf_name)


def read_vision_config(path, field: str) -> dict:
  """The config.json of a local CLIPVisionModel directory, with its defaults; a ValueError naming `field`."""
  directory = pathlib.Path(path).expanduser()
  if not (directory / "config.json").is_file():
    raise ValueError(f"{field}={str(path)!r} has no config.json: give the local directory of a transformers "
                     "CLIPVisionModel (the image_encoder/ folder of a Wan 2.1 image-to-video checkpoint)")
  config = local_files.read_json(directory / "config.json")
  if "vision_config" in config or config.get("model_type", "clip_vision_model") != "clip_vision_model":
    raise ValueError(f"{field}={str(path)!r} holds a {config.get('model_type')!r}, not a CLIPVisionModel (a whole "
                     "CLIP's vision tower is not read here)")
  config = VISION_DEFAULTS | config
  if config["hidden_act"] not in ACTIVATIONS:
    raise ValueError(f"{field}={str(path)!r}: hidden_act {config['hidden_act']!r} is not one of {list(ACTIVATIONS)}")
  return config


def load_vision(path, field: str = "model.wan_image_encoder_path") -> VisionModel:
  """A VisionModel with the weights of a local CLIPVisionModel directory (config.json, model.safetensors)."""
  return _load_tower(VisionModel, read_vision_config(path, field), path, field, "vision_model.")


def _load_tower(model_class, config: dict, path, field: str, prefix: str):
  """model_class (TextModel, VisionModel) of `config` with the weights of the directory's model.safetensors, whose
  tensors are named `prefix`... (transformers 5 saves them unprefixed)."""
  if not (pathlib.Path(path).expanduser() / "model.safetensors").is_file():
    raise ValueError(f"{field}={str(path)!r} has no model.safetensors (PyTorch .bin files are not read)")
  return named_tensors.load(abstract_modules.of(model_class, config), tower_tensors(path, prefix), hf_name,
                            f"{field}={str(path)!r} does not match its config.json")


def tower_tensors(path, prefix: str) -> dict:
  """{name: array} of a transformers CLIP tower directory's model.safetensors, every name under `prefix`
  (transformers 5 saves a CLIPTextModel's without its text_model.), position ids left out."""
  tensors = {name: value for name, value in
             named_tensors.read_safetensors(pathlib.Path(path).expanduser() / "model.safetensors").items()
             if not name.endswith("position_ids")}
  if not any(name.startswith(prefix) for name in tensors):
    tensors = {f"{prefix}{name}": value for name, value in tensors.items()}
  return tensors


def preprocess_float(images, size: int):
  """Float images [n, h, w, 3] in [0, 1] -> CLIP-normalised [n, size, size, 3]: scaled (bicubic) so that the shorter
  side is `size`, then centre-cropped, as transformers' CLIPImageProcessor does."""
  n, h, w = images.shape[:3]
  scaled = (size, max(size, int(size * w / h))) if h <= w else (max(size, int(size * h / w)), size)
  x = jax.image.resize(images.astype(jnp.float32), (n, *scaled, 3), "bicubic")
  top, left = (scaled[0] - size) // 2, (scaled[1] - size) // 2
  return (jnp.clip(x[:, top:top + size, left:left + size], 0.0, 1.0) - MEAN) / STD


def preprocess(images, size: int):
  """uint8 [n, h, w, 3] -> CLIP-normalised float [n, size, size, 3] (preprocess_float)."""
  return preprocess_float(jnp.asarray(images, jnp.float32) / 255.0, size)
