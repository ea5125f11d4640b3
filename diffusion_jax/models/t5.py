"""T5 encoder (original T5 with ReLU, T5 v1.1 with gated GELU, UMT5 with a relative-position bias in every layer)
in Flax NNX, and Hugging Face import.

`load_hf_encoder(path)` reads `config.json` and `model.safetensors` (or sharded safetensors with
`model.safetensors.index.json`) from a local directory, without transformers. Decoder and LM-head
tensors of a full T5 checkpoint are ignored; any other unknown, missing or mis-shaped tensor is an error
that names it.

Call: ids [batch, tokens] int32, mask [batch, tokens] bool -> embeddings [batch, tokens, d_model] float32.
"""

import math
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from diffusion_jax import local_files
from diffusion_jax.models import abstract_modules, layers, named_tensors


def relative_position_bucket(relative_position, num_buckets: int, max_distance: int):
  """T5's bidirectional bucketing of key - query offsets [q, k] -> bucket ids [q, k]."""
  num_buckets //= 2
  buckets = (relative_position > 0).astype(jnp.int32) * num_buckets
  distance = jnp.abs(relative_position)
  max_exact = num_buckets // 2
  large = max_exact + (jnp.log(jnp.maximum(distance, 1) / max_exact) / math.log(max_distance / max_exact)
                       * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(distance < max_exact, distance, large)


POSITION_BIAS_INITS = ("t5", "local")  # text.t5.position_bias_init: T5's random normal, or local_position_bias


def local_position_bias(num_buckets: int, max_distance: int, num_heads: int):
  """A locality prior for the relative-position bias table -> [num_buckets, num_heads].

  Head h starts with bias -|offset| / 2**h (head 0 looks at the word and its neighbours, later heads
  further), so each word's encoding starts mixed with the words around it. T5's random init starts every
  head near uniform attention, which gives every word the same sentence average: a bag of words.
  """
  offsets = jnp.arange(-max_distance, max_distance + 1)
  buckets = relative_position_bucket(offsets, num_buckets, max_distance)
  distance = jnp.full((num_buckets,), max_distance, jnp.float32).at[buckets].min(jnp.abs(offsets).astype(jnp.float32))
  slopes = 2.0 ** -jnp.arange(num_heads, dtype=jnp.float32)
  return -distance[:, None] * slopes[None, :]


class RMSNorm(nnx.Module):
  def __init__(self, dim, eps):
    self.weight = nnx.Param(jnp.ones((dim,)), **layers.names("norm"))
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32**2, axis=-1, keepdims=True) + self.eps)
    return (normed * self.weight[...]).astype(x.dtype)


class T5Block(nnx.Module):
  def __init__(self, config, *, has_position_bias, dtype, rngs):
    inner, d = config.num_heads * config.d_kv, config.d_model
    # T5's initialisation (Raffel et al. 2020): normal with std 1/sqrt(fan-in), the query's also divided by
    # sqrt(d_kv) in place of the attention's missing 1/sqrt(d_kv), so content logits start small next to the
    # relative-position bias (LeCun init made them ~16x larger).
    dense = lambda i, o, axes, std: layers.dense(i, o, axes, rngs, dtype, use_bias=False, stddev=std)
    self.heads, self.d_kv = config.num_heads, config.d_kv
    self.attn_norm = RMSNorm(d, config.layer_norm_epsilon)
    self.q = dense(d, inner, ("text_embed", "heads"), (d * config.d_kv) ** -0.5)
    self.k, self.v = (dense(d, inner, ("text_embed", "heads"), d**-0.5) for _ in range(2))
    self.o = dense(inner, d, ("heads", "text_embed"), inner**-0.5)
    table = lambda: (local_position_bias(config.num_buckets, config.max_distance, config.num_heads)
                     if config.position_bias_init == "local"
                     else jax.random.normal(rngs.params(), (config.num_buckets, config.num_heads)) * d**-0.5)
    self.position_bias = nnx.Param(table(), **layers.names(None, None)) if has_position_bias else None
    self.ff_norm = RMSNorm(d, config.layer_norm_epsilon)
    self.gated = config.gated
    self.wi_0 = dense(d, config.d_ff, ("text_embed", "mlp"), d**-0.5)
    self.wi_1 = dense(d, config.d_ff, ("text_embed", "mlp"), d**-0.5) if config.gated else None
    self.wo = dense(config.d_ff, d, ("mlp", "text_embed"), config.d_ff**-0.5)

  def __call__(self, x, bias):
    b, n, _ = x.shape
    h = self.attn_norm(x)
    split = lambda t: t.reshape(b, n, self.heads, self.d_kv)
    q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) + bias  # T5: no 1/sqrt(d) scaling
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1).astype(v.dtype), v)
    x = x + self.o(out.reshape(b, n, -1))
    h = self.ff_norm(x)
    hidden = nnx.gelu(self.wi_0(h), approximate=True) * self.wi_1(h) if self.gated else nnx.relu(self.wi_0(h))
    return x + self.wo(hidden)


class T5Encoder(nnx.Module):

  def __init__(self, config, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(config.dtype)
    self.embed = nnx.Embed(config.vocab_size, config.d_model, dtype=dtype, rngs=rngs,
                           embedding_init=nnx.initializers.normal(1.0),  # T5's: unit-variance word vectors
                           embedding_metadata=layers.names("vocab", "text_embed"))
    # T5 learns one relative-position bias table, in the first layer, which every layer adds; UMT5 one per layer.
    self.blocks = nnx.List([T5Block(config, has_position_bias=config.per_layer_position_bias or i == 0, dtype=dtype,
                                    rngs=rngs) for i in range(config.num_layers)])
    self.final_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
    self.num_buckets, self.max_distance = config.num_buckets, config.max_distance

  def __call__(self, ids, mask):
    n = ids.shape[1]
    positions = jnp.arange(n)
    buckets = relative_position_bucket(positions[None, :] - positions[:, None], self.num_buckets, self.max_distance)
    padding = jnp.where(mask[:, None, None, :], 0.0, jnp.finfo(jnp.float32).min)
    x = self.embed(ids)
    for block in self.blocks:
      if block.position_bias is not None:  # [1, heads, q, k]: this layer's table, kept by the layers after it
        bias = jnp.transpose(block.position_bias[...][buckets], (2, 0, 1))[None] + padding
      x = block(x, bias)
    return self.final_norm(x).astype(jnp.float32)


# ----------------------------------------------------------------------------- Hugging Face import


def config_from_hf(hf: dict, dtype: str = "float32") -> ml_collections.ConfigDict:
  proj = hf.get("feed_forward_proj", "relu")
  if proj not in ("relu", "gated-gelu"):
    raise ValueError(f"Unsupported T5 feed_forward_proj {proj!r}; supported: 'relu', 'gated-gelu'.")
  return ml_collections.ConfigDict(dict(
      vocab_size=hf["vocab_size"], d_model=hf["d_model"], d_kv=hf["d_kv"], d_ff=hf["d_ff"],
      num_layers=hf["num_layers"], num_heads=hf["num_heads"],
      num_buckets=hf.get("relative_attention_num_buckets", 32),
      max_distance=hf.get("relative_attention_max_distance", 128),
      position_bias_init="t5", gated=proj == "gated-gelu", layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
      per_layer_position_bias=hf.get("model_type") == "umt5", dtype=dtype))


def _hf_name(path: tuple, gated: bool) -> tuple[str, tuple | None]:
  """Our parameter path -> (HF tensor name, transpose from HF's layout or None)."""
  if path[0] == "embed":
    return "shared.weight", None
  if path[0] == "final_norm":
    return "encoder.final_layer_norm.weight", None
  i, part = path[1], path[2]
  prefix = f"encoder.block.{i}.layer"
  if part in ("q", "k", "v", "o"):
    return f"{prefix}.0.SelfAttention.{part}.weight", (1, 0)
  if part in ("wi_0", "wi_1", "wo"):
    hf_part = "wi" if part == "wi_0" and not gated else part
    return f"{prefix}.1.DenseReluDense.{hf_part}.weight", (1, 0)
  return {"attn_norm": f"{prefix}.0.layer_norm.weight",
          "position_bias": f"{prefix}.0.SelfAttention.relative_attention_bias.weight",
          "ff_norm": f"{prefix}.1.layer_norm.weight"}[part], None


def _read_safetensors(directory: pathlib.Path) -> dict:
  index = directory / "model.safetensors.index.json"
  if index.exists():
    files = sorted(set(local_files.read_json(index)["weight_map"].values()))
  elif (directory / "model.safetensors").exists():
    files = ["model.safetensors"]
  else:
    raise ValueError(f"No model.safetensors or model.safetensors.index.json in {str(directory)!r}; a Hugging Face "
                     "T5 checkpoint directory is needed (PyTorch .bin files are not read).")
  tensors = {}
  for name in files:
    tensors.update(named_tensors.read_safetensors(directory / name))
  return tensors


def read_hf_config(path, dtype: str = "float32") -> ml_collections.ConfigDict:
  """The T5Encoder config of a local Hugging Face checkpoint directory (its config.json only)."""
  directory = pathlib.Path(path)
  if not (directory / "config.json").exists() and (directory / "text_encoder" / "config.json").exists():
    raise ValueError(f"{str(directory)!r} is a whole pipeline's checkpoint; its text encoder is its text_encoder/ "
                     f"folder: text.pretrained_path={str(directory / 'text_encoder')!r}")
  if not (directory / "config.json").exists():
    raise ValueError(f"No config.json in {str(directory)!r}; give the local directory of a Hugging Face T5 (or "
                     "UMT5) checkpoint.")
  hf = local_files.read_json(directory / "config.json")
  if missing := [key for key in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads") if key not in hf]:
    raise ValueError(f"{str(directory)!r} holds no T5 encoder: its config.json (model_type {hf.get('model_type')!r}) "
                     f"lacks {', '.join(missing)}")
  return config_from_hf(hf, dtype)


def load_hf_encoder(path, dtype: str = "float32") -> T5Encoder:
  """Build a T5Encoder from a local Hugging Face checkpoint directory."""
  directory = pathlib.Path(path)
  config = read_hf_config(path, dtype)
  tensors = _read_safetensors(directory)
  if "shared.weight" not in tensors and "encoder.embed_tokens.weight" in tensors:  # an encoder-only checkpoint
    tensors["shared.weight"] = tensors["encoder.embed_tokens.weight"]
  return named_tensors.load(abstract_modules.of(T5Encoder, config), tensors,
                            lambda path, ndim: _hf_name(path, config.gated),
                            f"T5 checkpoint {str(directory)!r} does not match the encoder",
                            ignored=("decoder.", "lm_head.", "encoder.embed_tokens.weight"))
