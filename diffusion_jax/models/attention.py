"""Softmax attention, computed as batched matrix products over [batch * heads, tokens, head_dim].

`dot_product_attention(q, k, v, mask=None, bias=None, implementation="auto")`:
q [batch, q_len, heads, head_dim], k and v [batch, k_len, heads, head_dim]; mask (bool, True = attend)
and bias (added to the logits) broadcast to [batch, heads, q_len, k_len] -> [batch, q_len, heads, head_dim].

The "folded" implementation is the same function as `jax.nn.dot_product_attention` (tests/test_attention.py
compares values and gradients). It folds the heads into the batch, so XLA runs plain batched GEMMs;
divides by the softmax sum after the value product ([q_len, head_dim] divisions, not [q_len, k_len]);
computes in float32 whatever the inputs' dtype; and its backward pass recomputes the probabilities from
the saved log-sum-exp, as flash attention does, instead of keeping them. It runs a few heads at a time, and where
one head's [q_len, k_len] logits pass CHUNK_LOGITS (long clips: 32,760 tokens are 4.3 GB of logits a head) blocks of
queries at a time, so its memory stays bounded however long the sequence. On XLA:CPU it is the faster
one (README: Benchmarks). "xla" and "cudnn" are `jax.nn.dot_product_attention`'s own implementations
(cuDNN's fused kernel on NVIDIA GPUs). "auto" (`resolve`) is "folded" on a CPU; on an NVIDIA GPU (Ampere or
later) it is "cudnn" where cuDNN's flash attention takes the call (no mask or bias, bfloat16 or float16, a head
dimension that is a multiple of 8 up to 128: the U-Net's self-attention), which never writes the [q_len, k_len]
probabilities to memory; elsewhere "xla" (GPUs and TPUs, whose compilers fuse attention themselves and would run
the folded implementation's chunks one after another).
"""

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "folded", "xla", "cudnn")

# Logit elements per chunk of [batch * heads] (4 MB in float32): the folded implementation runs the
# attention of that many heads at a time, so its [chunk, q_len, k_len] arrays stay in cache (and of that many
# queries at a time where one head's logits are more).
CHUNK_LOGITS = 2 ** 20


def resolve(implementation, q, mask, bias, device):
  """The implementation "auto" means for a call with q [.., head_dim] on `device` (a jax Device: its platform,
  kind and, on CUDA, compute capability; cuDNN's flash attention needs Ampere or later)."""
  if implementation != "auto":
    return implementation
  if device.platform == "cpu":
    return "folded"
  capability = str(getattr(device, "compute_capability", ""))
  ampere_or_later = device.device_kind.startswith("NVIDIA") and capability[:1].isdigit() and float(capability) >= 8
  fits = mask is None and bias is None and q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] % 8 == 0
  return "cudnn" if ampere_or_later and fits and q.shape[-1] <= 128 else "xla"


def dot_product_attention(q, k, v, mask=None, bias=None, implementation="auto"):
  implementation = resolve(implementation, q, mask, bias, jax.devices()[0])
  if implementation != "folded":
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation=implementation)
  f32 = jnp.float32
  batch, q_len, heads, _ = q.shape
  if mask is not None:
    bias = jnp.where(mask, 0 if bias is None else bias, jnp.finfo(f32).min)
  if bias is not None:
    bias = jnp.broadcast_to(bias.astype(f32), (batch, heads, q_len, k.shape[1])).reshape(batch * heads, q_len, -1)
  out = _folded(_fold(q.astype(f32)), _fold(k.astype(f32)), _fold(v.astype(f32)), bias)
  return _unfold(out, batch).astype(q.dtype)


def _fold(x):
  """[batch, tokens, heads, head_dim] -> [batch * heads, tokens, head_dim]."""
  b, n, h, d = x.shape
  return x.transpose(0, 2, 1, 3).reshape(b * h, n, d)


def _unfold(x, batch):
  """[batch * heads, tokens, head_dim] -> [batch, tokens, heads, head_dim]."""
  g, n, d = x.shape
  return x.reshape(batch, g // batch, n, d).transpose(0, 2, 1, 3)


def _by_chunks(function, q_len, k_len, *arrays):
  """function(*arrays) over chunks of the leading [batch * heads] axis (None arrays stay None).

  Chunk i holds every (groups / chunk)-th group from i, so a batch axis sharded over devices stays
  sharded inside each chunk rather than splitting the loop."""
  groups = arrays[0].shape[0]
  chunk = max(c for c in range(1, groups + 1) if groups % c == 0 and (c * q_len * k_len <= CHUNK_LOGITS or c == 1))
  if chunk == groups:
    return function(*arrays)
  split = lambda x: None if x is None else x.reshape(chunk, groups // chunk, *x.shape[1:]).swapaxes(0, 1)
  outs = jax.lax.map(lambda chunked: function(*chunked), tuple(map(split, arrays)))
  return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(groups, *x.shape[2:]), outs)


def _query_block(q_len: int, k_len: int) -> int:
  """Queries a block of one head's attention holds: all of them, or where [q_len, k_len] logits pass CHUNK_LOGITS
  the most that q_len's divisors allow within it (at least 1)."""
  if q_len * k_len <= CHUNK_LOGITS:
    return q_len
  return max([b for b in range(1, q_len + 1) if q_len % b == 0 and b * k_len <= CHUNK_LOGITS], default=1)


def _as_blocks(x, block):
  """[g, q_len, ...] -> [q_len / block, g, block, ...] (None stays None)."""
  return None if x is None else jnp.moveaxis(x.reshape(x.shape[0], -1, block, *x.shape[2:]), 1, 0)


def _from_blocks(x):
  """_as_blocks' inverse."""
  return jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1, *x.shape[3:])


def _blocked_forward(q, k, v, bias):
  """_chunk_forward a block of queries at a time (_query_block): each query's softmax reads every key."""
  block = _query_block(q.shape[1], k.shape[1])
  if block == q.shape[1]:
    return _chunk_forward(q, k, v, bias)
  out, log_total = jax.lax.map(lambda blocks: _chunk_forward(blocks[0], k, v, blocks[1]),
                               (_as_blocks(q, block), _as_blocks(bias, block)))
  return _from_blocks(out), _from_blocks(log_total)


def _blocked_backward(q, k, v, bias, out, log_total, d_out):
  """_chunk_backward a block of queries at a time: their gradients per block, the keys' and values' summed."""
  block = _query_block(q.shape[1], k.shape[1])
  if block == q.shape[1]:
    return _chunk_backward(q, k, v, bias, out, log_total, d_out)

  def step(d_kv, blocks):
    d_q, d_k, d_v, d_logits = _chunk_backward(blocks[0], k, v, *blocks[1:])
    return (d_kv[0] + d_k, d_kv[1] + d_v), (d_q, None if bias is None else d_logits)

  blocks = tuple(_as_blocks(x, block) for x in (q, bias, out, log_total, d_out))
  (d_k, d_v), (d_q, d_logits) = jax.lax.scan(step, (jnp.zeros_like(k), jnp.zeros_like(v)), blocks)
  return _from_blocks(d_q), d_k, d_v, None if bias is None else _from_blocks(d_logits)


def _logits(q, k, bias):
  """q [g, q, d] (already scaled), k [g, k, d], bias [g, q, k] or None -> [g, q, k]."""
  logits = jnp.einsum("gqd,gkd->gqk", q, k)
  return logits if bias is None else logits + bias


def _chunk_forward(q, k, v, bias):
  """-> (out [g, q, d], log of the softmax sum [g, q, 1])."""
  logits = _logits(q, k, bias)
  peak = logits.max(-1, keepdims=True)
  weights = jnp.exp(logits - peak)
  total = weights.sum(-1, keepdims=True)
  return jnp.einsum("gqk,gkd->gqd", weights, v) / total, peak + jnp.log(total)


def _chunk_backward(q, k, v, bias, out, log_total, d_out):
  """-> gradients of (scaled q, k, v, logits)."""
  probs = jnp.exp(_logits(q, k, bias) - log_total)
  d_v = jnp.einsum("gqk,gqd->gkd", probs, d_out)
  d_probs = jnp.einsum("gqd,gkd->gqk", d_out, v)
  d_logits = probs * (d_probs - jnp.sum(d_out * out, -1, keepdims=True))
  return jnp.einsum("gqk,gkd->gqd", d_logits, k), jnp.einsum("gqk,gqd->gkd", d_logits, q), d_v, d_logits


@jax.custom_vjp
def _folded(q, k, v, bias):
  """Folded q [g, q, d], k and v [g, k, d], bias [g, q, k] or None -> [g, q, d]."""
  return _forward(q, k, v, bias)[0]


def _forward(q, k, v, bias):
  scaled = q * q.shape[-1] ** -0.5
  out, log_total = _by_chunks(_blocked_forward, q.shape[1], k.shape[1], scaled, k, v, bias)
  return out, (scaled, k, v, bias, out, log_total)


def _backward(residuals, d_out):
  scaled, k, v, bias, out, log_total = residuals
  d_scaled, d_k, d_v, d_logits = _by_chunks(_blocked_backward, scaled.shape[1], k.shape[1], scaled, k, v, bias,
                                            out, log_total, d_out)
  return d_scaled * scaled.shape[-1] ** -0.5, d_k, d_v, None if bias is None else d_logits


_folded.defvjp(_forward, _backward)
