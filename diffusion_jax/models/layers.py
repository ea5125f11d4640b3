"""Building blocks shared by the image and video U-Nets and the DiT: residual block, attention, feed-forward.

Every parameter carries logical axis names in its `out_sharding` metadata (see `sharding.py`):
`conv_in`, `conv_out` (convolution channels), `embed` (model width), `heads` (attention projections),
`mlp` (feed-forward hidden), `text_embed` (text encoder width), `norm` (normalisation scales).
Activations are [batch, height, width, channels] unless stated.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from diffusion_jax.models import attention

# Parameters are created with logical names only; shardings come from the rules in sharding.py.
nnx.use_eager_sharding(False)


REMAT_POLICIES = ("full", "matmuls")


def saves_matmuls(primitive, *args, **params) -> bool:
  """Remat policy 'matmuls': the outputs of convolutions and of projections (dot_generals without batch axes) are
  kept for the backward pass; the rest is recomputed (attention's scores, batched dot_generals, are not kept)."""
  return (primitive.name == "conv_general_dilated"
          or jax.checkpoint_policies.dots_with_no_batch_dims_saveable(primitive, *args, **params))


def rematerialised(function, policy: str):
  """`function(module, *args)` recomputed in the backward pass (jax.checkpoint under a REMAT_POLICIES policy). The
  module's state enters as an argument and is not written back (no block mutates any), so the call also works inside
  another transform's trace, such as the sampler's scan over steps, where nnx.remat's write-back fails."""
  checkpoint_policy = saves_matmuls if policy == "matmuls" else None

  def call(module, *args):
    graphdef, state = nnx.split(module)
    pure = lambda state, *args: function(nnx.merge(graphdef, state), *args)
    return jax.checkpoint(pure, policy=checkpoint_policy)(state, *args)

  return call


def names(*axes):
  return {"out_sharding": axes}


def conv(in_ch, out_ch, kernel, rngs, dtype, stride=1, zero_init=False, padding="SAME", module=nnx.Conv):
  """A convolution (`module`: nnx.Conv or a subclass); `kernel` k is a k x k window, a tuple any window (e.g.
  (3, 1, 1): over time only)."""
  window = kernel if isinstance(kernel, tuple) else (kernel, kernel)
  init = nnx.initializers.zeros_init() if zero_init else nnx.initializers.lecun_normal()
  return module(in_ch, out_ch, window, strides=stride, padding=padding, dtype=dtype, kernel_init=init, rngs=rngs,
                  kernel_metadata=names(*(None,) * len(window), "conv_in", "conv_out"),
                  bias_metadata=names("conv_out"))


class Dense(nnx.Linear):
  """nnx.Linear (same parameters, same function) applied to its input seen as a matrix [rows, in_features].

  The weight gradient of a [batch, tokens, features] input contracts two axes, which XLA:CPU runs slower than
  the same contraction over one merged axis (README: Benchmarks); elsewhere the reshape of a row-major array
  is free."""

  def __call__(self, x):
    return super().__call__(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.out_features)


def dense(in_dim, out_dim, axes, rngs, dtype, use_bias=True, zero_init=False, stddev=None):
  """Dense with logical axis names; LeCun-normal kernel, zeros when zero_init, normal(stddev) when given."""
  if stddev is not None:
    init = nnx.initializers.normal(stddev)
  else:
    init = nnx.initializers.zeros_init() if zero_init else nnx.initializers.lecun_normal()
  return Dense(in_dim, out_dim, use_bias=use_bias, dtype=dtype, kernel_init=init, rngs=rngs,
               kernel_metadata=names(*axes), bias_metadata=names(axes[-1]))


def lora(in_dim, out_dim, axes, rank, rngs, dtype):
  """A low-rank update x @ a @ b of a Dense layer [in_dim -> out_dim] (Hu et al. 2021: a [in_dim, rank],
  b [rank, out_dim] zeros, so it starts at nothing), or None for rank 0. Its parameters are nnx.LoRAParams."""
  if not rank:
    return None
  return nnx.LoRA(in_dim, rank, out_dim, dtype=dtype, rngs=rngs, a_metadata=names(axes[0], None),
                  b_metadata=names(None, axes[1]))


def adapted(module, name, x):
  """Layer `name` of `module` applied to x, plus its low-rank update (`<name>_lora`, lora / ConvLoRA) when there
  is one."""
  out, update = getattr(module, name)(x), getattr(module, f"{name}_lora")
  return out if update is None else out + update(x).astype(out.dtype)


def adapted_in_list(module, name, index, x):
  """Layer `index` of list `name` of `module` (diffusers' `to_out.0`) applied to x, plus its low-rank update
  (`<name>_lora[index]`) when there is one."""
  out, updates = getattr(module, name)[index](x), getattr(module, f"{name}_lora")
  return out if updates[index] is None else out + updates[index](x).astype(out.dtype)


class ConvLoRA(nnx.Module):
  """A low-rank update of a `kernel` x `kernel` convolution [in_ch -> out_ch] (LoCon): the convolution with
  lora_a [kernel, kernel, in_ch, rank], then lora_b [rank, out_ch] (zeros, so it starts at nothing). Merged into
  the convolution's kernel it is lora_a @ lora_b; its parameters are nnx.LoRAParams, named as nnx.LoRA's.

  x: [batch, h, w, in_ch] -> [batch, h, w, out_ch]."""

  def __init__(self, in_ch, out_ch, kernel, rank, rngs, dtype):
    a = nnx.initializers.lecun_normal()(rngs.params(), (kernel, kernel, in_ch, rank))
    self.lora_a = nnx.LoRAParam(a, **names(None, None, "conv_in", None))
    self.lora_b = nnx.LoRAParam(jnp.zeros((rank, out_ch)), **names(None, "conv_out"))
    self.dtype = dtype

  def __call__(self, x):
    dtype = self.dtype or x.dtype
    h = jax.lax.conv_general_dilated(x.astype(dtype), self.lora_a[...].astype(dtype), (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return h @ self.lora_b[...].astype(dtype)


class GroupNorm(nnx.GroupNorm):
  """nnx.GroupNorm (same parameters, same function) with statistics gathered per channel first.

  x: [batch, ..., channels] -> same shape. Sums of x and x^2 over the non-batch axes with the channels
  kept minor, then over each group's channels; nnx.GroupNorm reduces [..., groups, group_size] arrays
  instead, which XLA:CPU runs 2-8x slower when a group has few channels (README: Benchmarks).
  """

  def __call__(self, x):
    f32 = jnp.float32
    batch, channels = x.shape[0], x.shape[-1]
    axes = tuple(range(1, x.ndim - 1))
    count = math.prod(x.shape[1:-1]) * self.group_size
    x32 = x.astype(f32)
    by_group = lambda per_channel: per_channel.reshape(batch, self.num_groups, self.group_size).sum(-1) / count
    mean = by_group(x32.sum(axes))
    variance = jnp.maximum(by_group(jnp.square(x32).sum(axes)) - jnp.square(mean), 0.0)  # as use_fast_variance
    per_channel = lambda per_group: jnp.repeat(per_group, self.group_size, axis=-1).reshape(
        (batch,) + (1,) * len(axes) + (channels,))
    scale = per_channel(jax.lax.rsqrt(variance + self.epsilon)) * self.scale[...].astype(f32)
    out = (x32 - per_channel(mean)) * scale + self.bias[...].astype(f32)
    return out.astype(self.dtype or x.dtype)


def group_norm(channels, rngs, dtype, groups=32, epsilon=1e-6):
  groups = math.gcd(groups, channels)
  return GroupNorm(channels, num_groups=groups, epsilon=epsilon, dtype=dtype, rngs=rngs,
                   scale_metadata=names("norm"), bias_metadata=names("norm"))


def layer_norm(dim, rngs, dtype):
  return nnx.LayerNorm(dim, dtype=dtype, rngs=rngs, scale_metadata=names("norm"), bias_metadata=names("norm"))


def dropout(x, rate, key):
  """Inverted dropout; identity when key is None (inference) or rate is 0."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class ResBlock(nnx.Module):
  """GroupNorm-SiLU-Conv twice, with FiLM (scale-shift) conditioning on the embedding.

  x: [batch, h, w, in_ch], emb: [batch, emb_dim] -> [batch, h, w, out_ch].
  lora_rank: low-rank updates (ConvLoRA) of both convolutions, as `conv1_lora` and `conv2_lora`; film_lora_rank:
  of the FiLM projection, as `film_lora` (`lora`) (0: none).
  """

  def __init__(self, in_ch, out_ch, emb_dim, *, dropout_rate, skip_scale, dtype, rngs, lora_rank=0,
               film_lora_rank=0):
    self.norm1 = group_norm(in_ch, rngs, dtype)
    self.conv1 = conv(in_ch, out_ch, 3, rngs, dtype)
    self.film = dense(emb_dim, 2 * out_ch, ("embed", "conv_out"), rngs, dtype)
    self.film_lora = lora(emb_dim, 2 * out_ch, ("embed", "conv_out"), film_lora_rank, rngs, dtype)
    self.norm2 = group_norm(out_ch, rngs, dtype)
    self.conv2 = conv(out_ch, out_ch, 3, rngs, dtype, zero_init=True)
    self.conv1_lora, self.conv2_lora = ((ConvLoRA(i, out_ch, 3, lora_rank, rngs, dtype) if lora_rank else None)
                                        for i in (in_ch, out_ch))
    self.skip = conv(in_ch, out_ch, 1, rngs, dtype) if in_ch != out_ch else None
    self.dropout_rate = dropout_rate
    self.skip_scale = skip_scale

  def __call__(self, x, emb, dropout_key=None):
    h = adapted(self, "conv1", nnx.silu(self.norm1(x)))
    scale, shift = jnp.split(adapted(self, "film", nnx.silu(emb))[:, None, None, :], 2, axis=-1)
    h = self.norm2(h) * (1 + scale) + shift
    h = adapted(self, "conv2", dropout(nnx.silu(h), self.dropout_rate, dropout_key))
    skip = self.skip(x) if self.skip is not None else x
    return (skip + h) * self.skip_scale


class Attention(nnx.Module):
  """Multi-head attention; queries from x [batch, q, dim], keys/values from context [batch, k, ctx_dim].

  mask: [batch, k] bool (True = attend). A learned null key/value is always attended, so a fully
  masked context (the empty prompt) is well defined and padding never changes the output.
  implementation: models/attention.py IMPLEMENTATIONS. zero_out: the output projection starts at zero (a
  residual branch that starts as the identity); off where a zero gate multiplies the branch (DiT's adaLN-Zero).
  lora_rank: low-rank updates (`lora`) of the four projections, as `q_lora` ... `out_lora` (0: none).
  """

  def __init__(self, dim, context_dim, heads, *, dtype, rngs, context_axis="embed", null_kv=False,
               implementation="auto", zero_out=True, lora_rank=0):
    if dim % heads:
      raise ValueError(f"attention width {dim} is not divisible by heads={heads}.")
    self.heads = heads
    self.implementation = implementation
    shapes = {"q": (dim, dim, ("embed", "heads")), "k": (context_dim, dim, (context_axis, "heads")),
              "v": (context_dim, dim, (context_axis, "heads")), "out": (dim, dim, ("heads", "embed"))}
    self.q = dense(*shapes["q"], rngs, dtype, use_bias=False)
    self.k = dense(*shapes["k"], rngs, dtype, use_bias=False)
    self.v = dense(*shapes["v"], rngs, dtype, use_bias=False)
    self.out = dense(*shapes["out"], rngs, dtype, zero_init=zero_out)
    self.q_lora, self.k_lora, self.v_lora, self.out_lora = (lora(*shapes[name], lora_rank, rngs, dtype)
                                                            for name in ("q", "k", "v", "out"))
    self.null_kv = nnx.Param(jnp.zeros((2, dim)), **names(None, "heads")) if null_kv else None

  def __call__(self, x, context, mask=None, bias=None):
    b, q_len, dim = x.shape
    split = lambda t: t.reshape(b, t.shape[1], self.heads, dim // self.heads)
    q, k, v = split(adapted(self, "q", x)), split(adapted(self, "k", context)), split(adapted(self, "v", context))
    if self.null_kv is not None:
      null = self.null_kv[...].astype(k.dtype).reshape(2, 1, 1, self.heads, dim // self.heads)
      k = jnp.concatenate([jnp.broadcast_to(null[0], (b, 1) + k.shape[2:]), k], axis=1)
      v = jnp.concatenate([jnp.broadcast_to(null[1], (b, 1) + v.shape[2:]), v], axis=1)
      if mask is not None:
        mask = jnp.concatenate([jnp.ones((b, 1), bool), mask], axis=1)
    if mask is not None:
      mask = mask[:, None, None, :]
    out = attention.dot_product_attention(q, k, v, mask=mask, bias=bias, implementation=self.implementation)
    return adapted(self, "out", out.reshape(b, q_len, dim))


class FeedForward(nnx.Module):
  """GEGLU feed-forward: [.., dim] -> [.., dim]; zero_out as in Attention; dropout_rate on the hidden units
  (only when called with a dropout_key). lora_rank: low-rank updates (`lora`) of both projections, as
  `proj_in_lora` and `proj_out_lora` (0: none)."""

  def __init__(self, dim, mult, *, dtype, rngs, zero_out=True, dropout_rate=0.0, lora_rank=0):
    shapes = {"proj_in": (dim, 2 * mult * dim, ("embed", "mlp")), "proj_out": (mult * dim, dim, ("mlp", "embed"))}
    self.proj_in = dense(*shapes["proj_in"], rngs, dtype)
    self.proj_out = dense(*shapes["proj_out"], rngs, dtype, zero_init=zero_out)
    self.proj_in_lora, self.proj_out_lora = (lora(*shapes[name], lora_rank, rngs, dtype)
                                             for name in ("proj_in", "proj_out"))
    self.dropout_rate = dropout_rate

  def __call__(self, x, dropout_key=None):
    h, gate = jnp.split(adapted(self, "proj_in", x), 2, axis=-1)
    return adapted(self, "proj_out", dropout(h * nnx.gelu(gate), self.dropout_rate, dropout_key))


class TransformerBlock(nnx.Module):
  """Spatial self-attention, text cross-attention and feed-forward over the pixels of a feature map.

  x: [batch, h, w, ch]; text: [batch, tokens, text_dim]; text_mask: [batch, tokens] bool. lora_rank: low-rank
  updates of the attention projections; ff_lora_rank: of the feed-forward's (0: none).
  """

  def __init__(self, channels, text_dim, heads, *, ff_mult, dtype, rngs, implementation="auto", lora_rank=0,
               ff_lora_rank=0):
    self.norm_in = group_norm(channels, rngs, dtype)
    self.norm_self = layer_norm(channels, rngs, dtype)
    self.self_attn = Attention(channels, channels, heads, dtype=dtype, rngs=rngs, implementation=implementation,
                               lora_rank=lora_rank)
    self.norm_cross = layer_norm(channels, rngs, dtype)
    self.cross_attn = Attention(channels, text_dim, heads, dtype=dtype, rngs=rngs, context_axis="text_embed",
                                null_kv=True, implementation=implementation, lora_rank=lora_rank)
    self.norm_ff = layer_norm(channels, rngs, dtype)
    self.ff = FeedForward(channels, ff_mult, dtype=dtype, rngs=rngs, lora_rank=ff_lora_rank)

  def __call__(self, x, text, text_mask):
    b, h, w, c = x.shape
    tokens = self.norm_in(x).reshape(b, h * w, c)
    normed = self.norm_self(tokens)
    tokens = tokens + self.self_attn(normed, normed)
    tokens = tokens + self.cross_attn(self.norm_cross(tokens), text, text_mask)
    tokens = tokens + self.ff(self.norm_ff(tokens))
    return x + tokens.reshape(b, h, w, c)


def sinusoidal_embedding(values, dim, max_period=10000.0):
  """values [batch] -> [batch, dim] sin/cos features (Transformer / DDPM timestep embedding)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half) / half)
  args = values[:, None].astype(jnp.float32) * freqs[None]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def masked_mean(tokens, mask):
  """tokens [batch, n, d], mask [batch, n] -> [batch, d]; zeros where nothing is unmasked."""
  weights = mask.astype(tokens.dtype)[..., None]
  return (tokens * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
