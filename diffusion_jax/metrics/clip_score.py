"""CLIP score of generated images against their prompts, with CLIP weights from a local directory.

The directory is a Hugging Face CLIP checkpoint (e.g. openai/clip-vit-base-patch32 downloaded by the user):
`config.json`, `model.safetensors` and `tokenizer.json`; nothing is downloaded and transformers is not
needed. The model (Flax NNX) is CLIP's ViT image tower and causal text transformer with their projections;
images are resized (bicubic) to the model's resolution and normalised with CLIP's mean and std, prompts
are tokenised by `tokenizers` and cut to the text model's length.

CLIP score = 100 * max(cos(image embedding, text embedding), 0), averaged over images (torchmetrics'
convention; Hessel et al.'s CLIPScore is 2.5 * max(cos, 0)).

  scorer = clip_score.load("~/weights/clip-vit-base-patch32")
  scorer(images_uint8 [n, h, w, 3], prompts) -> float
"""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax.models import init_rngs, named_tensors

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
# Defaults of a Hugging Face CLIP config (ViT-B/32) for fields a config.json leaves out.
TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                     num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                     eos_token_id=49407)
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
ACTIVATIONS = {"quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
               "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


class Attention(nnx.Module):
  def __init__(self, width, heads, *, rngs):
    self.heads = heads
    self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nnx.Linear(width, width, rngs=rngs) for _ in range(4))

  def __call__(self, x, causal):
    """x: [n, tokens, width]."""
    split = lambda y: y.reshape(y.shape[:2] + (self.heads, -1))
    out = jax.nn.dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                       is_causal=causal)
    return self.out_proj(out.reshape(x.shape))


class MLP(nnx.Module):  # fc1 and fc2; the activation is applied by EncoderLayer
  def __init__(self, width, hidden, *, rngs):
    self.fc1, self.fc2 = nnx.Linear(width, hidden, rngs=rngs), nnx.Linear(hidden, width, rngs=rngs)


class EncoderLayer(nnx.Module):  # pre-norm transformer block
  def __init__(self, c, *, rngs):
    self.activation = c["hidden_act"]
    width, eps = c["hidden_size"], c["layer_norm_eps"]
    self.layer_norm1 = nnx.LayerNorm(width, epsilon=eps, rngs=rngs)
    self.self_attn = Attention(width, c["num_attention_heads"], rngs=rngs)
    self.layer_norm2 = nnx.LayerNorm(width, epsilon=eps, rngs=rngs)
    self.mlp = MLP(width, c["intermediate_size"], rngs=rngs)

  def __call__(self, x, causal):
    x = x + self.self_attn(self.layer_norm1(x), causal)
    hidden = ACTIVATIONS[self.activation](self.mlp.fc1(self.layer_norm2(x)))
    return x + self.mlp.fc2(hidden)


class Encoder(nnx.Module):
  def __init__(self, c, *, rngs):
    self.layers = nnx.List([EncoderLayer(c, rngs=rngs) for _ in range(c["num_hidden_layers"])])

  def __call__(self, x, causal):
    for layer in self.layers:
      x = layer(x, causal)
    return x


class TextEmbeddings(nnx.Module):
  def __init__(self, c, *, rngs):
    self.token_embedding = nnx.Embed(c["vocab_size"], c["hidden_size"], rngs=rngs)
    self.position_embedding = nnx.Embed(c["max_position_embeddings"], c["hidden_size"], rngs=rngs)


class TextTransformer(nnx.Module):
  def __init__(self, c, *, rngs):
    self.eos_token_id = c["eos_token_id"]
    self.embeddings = TextEmbeddings(c, rngs=rngs)
    self.encoder = Encoder(c, rngs=rngs)
    self.final_layer_norm = nnx.LayerNorm(c["hidden_size"], epsilon=c["layer_norm_eps"], rngs=rngs)

  def __call__(self, ids):
    """ids [n, tokens] (ending in end-of-text, then padding) -> the end-of-text token's state [n, width]."""
    x = self.embeddings.token_embedding(ids) + self.embeddings.position_embedding(jnp.arange(ids.shape[1]))
    x = self.final_layer_norm(self.encoder(x, causal=True))
    # Configs from before transformers' PR #24773 say eos_token_id=2 and mean the largest id (end of text).
    end = jnp.argmax(ids, axis=-1) if self.eos_token_id == 2 else jnp.argmax(ids == self.eos_token_id, axis=-1)
    return jnp.take_along_axis(x, end[:, None, None], axis=1)[:, 0]


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

  def __call__(self, pixels):
    """pixels [n, size, size, 3], normalised -> the class token's state [n, width]."""
    patches = self.embeddings.patch_embedding(pixels)
    patches = patches.reshape(patches.shape[0], -1, patches.shape[-1])
    cls = jnp.broadcast_to(self.embeddings.class_embedding[...], (patches.shape[0], 1, patches.shape[-1]))
    x = jnp.concatenate([cls, patches], axis=1)
    x = x + self.embeddings.position_embedding(jnp.arange(x.shape[1]))
    x = self.encoder(self.pre_layrnorm(x), causal=False)
    return self.post_layernorm(x[:, 0])


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


def _hf_name(path: tuple, ndim: int) -> tuple[str, tuple | None]:
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
  from safetensors.numpy import load_file

  directory = pathlib.Path(path).expanduser()
  missing = [n for n in ("config.json", "model.safetensors") if not (directory / n).is_file()]
  if missing:
    raise ValueError(f"No {' or '.join(missing)} in {str(directory)!r}; give the local directory of a Hugging Face "
                     "CLIP checkpoint (config.json, model.safetensors, tokenizer.json).")
  config = json.loads((directory / "config.json").read_text())
  text = TEXT_DEFAULTS | config.get("text_config", {})
  vision = VISION_DEFAULTS | config.get("vision_config", {})
  problems = [f"hidden_act {c['hidden_act']!r} is not one of {list(ACTIVATIONS)}" for c in (text, vision)
              if c["hidden_act"] not in ACTIVATIONS]
  if problems:
    raise ValueError(f"CLIP checkpoint {str(directory)!r}: " + "; ".join(problems))
  tensors = {k: v for k, v in load_file(directory / "model.safetensors").items() if not k.endswith("position_ids")}
  abstract = nnx.eval_shape(lambda: CLIP(text, vision, config.get("projection_dim", 512), rngs=init_rngs.seeded(0)))
  return named_tensors.load(abstract, tensors, _hf_name,
                            f"CLIP checkpoint {str(directory)!r} does not match its config.json")


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


def preprocess(images, size: int):
  """uint8 [n, h, w, 3] -> CLIP-normalised float [n, size, size, 3] (bicubic resize of square images)."""
  x = jnp.asarray(images, jnp.float32) / 255.0
  x = jax.image.resize(x, (x.shape[0], size, size, 3), "bicubic")
  return (jnp.clip(x, 0.0, 1.0) - MEAN) / STD


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
  cosines = [np.asarray(_cosines(graphdef, state, preprocess(images[i:i + batch], model.image_size),
                                 encode(prompts[i:i + batch]))) for i in range(0, len(images), batch)]
  return 100.0 * np.maximum(np.concatenate(cosines), 0.0)


@functools.cache
def load(path: str):
  """A scorer (uint8 images [n, h, w, 3], n prompts) -> mean CLIP score, from a local CLIP directory."""
  model = from_pretrained(path)
  encode = tokenizer(path, model.max_length)
  return lambda images, prompts: float(scores(model, encode, images, list(prompts)).mean())
