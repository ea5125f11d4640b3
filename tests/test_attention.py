"""The folded attention against jax.nn.dot_product_attention: values and gradients, with masks and biases."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import attention


def arrays(seed=0, batch=3, q_len=10, k_len=7, heads=2, head_dim=8):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
  q, k, v = normal(batch, q_len, heads, head_dim), normal(batch, k_len, heads, head_dim), normal(batch, k_len, heads,
                                                                                                  head_dim)
  mask = jnp.asarray(rng.random((batch, 1, 1, k_len)) > 0.5).at[..., 0].set(True)  # a padded text context
  bias = normal(1, heads, q_len, k_len)  # a learned per-head bias, shared over the batch (temporal attention)
  return q, k, v, mask, bias


# None: all 6 of batch * heads at once; 0.2: one head at a time, 2 of its 10 queries at a time
@pytest.mark.parametrize("chunk_heads", [None, 1, 2, 0.2])
@pytest.mark.parametrize("use_mask,use_bias", [(False, False), (True, False), (False, True), (True, True)])
def test_folded_matches_jax_values_and_gradients(use_mask, use_bias, chunk_heads, monkeypatch):
  q, k, v, mask, bias = arrays()
  if chunk_heads:
    monkeypatch.setattr(attention, "CHUNK_LOGITS", int(chunk_heads * q.shape[1] * k.shape[1]))
  mask = mask if use_mask else None

  def loss(function):  # a nonlinear read-out, so every output element gets a different cotangent
    return lambda q, k, v, bias: jnp.sum(jnp.sin(3 * function(q, k, v, mask=mask, bias=bias if use_bias else None)))

  folded = functools.partial(attention.dot_product_attention, implementation="folded")
  folded = jax.jit(jax.value_and_grad(loss(folded), argnums=(0, 1, 2, 3)))(q, k, v, bias)
  reference = jax.jit(jax.value_and_grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2, 3)))(q, k, v, bias)
  for ours, theirs in zip(jax.tree.leaves(folded), jax.tree.leaves(reference)):
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_a_long_sequence_runs_a_block_of_queries_at_a_time_in_bounded_memory(monkeypatch):
  """4,096 tokens, one head: its 64 MB of logits run 256 queries at a time (4 MB), so the temporary memory of a
  gradient of the attention is a small part of what it is with the whole head at once."""
  q = k = v = jnp.zeros((1, 4096, 1, 8))
  grad = lambda: jax.jit(jax.grad(lambda q, k, v: jnp.sum(attention.dot_product_attention(
      q, k, v, implementation="folded")), argnums=(0, 1, 2))).lower(q, k, v).compile().memory_analysis()
  assert attention._query_block(4096, 4096) == 256
  blocked = grad().temp_size_in_bytes
  monkeypatch.setattr(attention, "CHUNK_LOGITS", 4096 * 4096)
  whole = grad().temp_size_in_bytes
  assert whole > 4096 * 4096 * 4 and blocked < whole / 4, (blocked, whole)


def test_masked_keys_are_ignored():
  q, k, v, mask, _ = arrays(seed=1)
  garbage = jnp.where(mask[:, 0, 0, :, None, None], v, 1e3)
  out = attention.dot_product_attention(q, k, v, mask=mask)
  np.testing.assert_allclose(out, attention.dot_product_attention(q, k, garbage, mask=mask), rtol=1e-6, atol=1e-6)
  assert not np.allclose(out, attention.dot_product_attention(q, k, garbage))


def test_xla_implementation_is_jax_own():
  q, k, v, mask, bias = arrays(seed=2)
  np.testing.assert_array_equal(attention.dot_product_attention(q, k, v, mask=mask, bias=bias, implementation="xla"),
                                jax.nn.dot_product_attention(q, k, v, mask=mask, bias=bias))


def test_auto_is_folded_on_a_cpu():
  q, k, v, mask, _ = arrays(seed=3)
  np.testing.assert_array_equal(attention.dot_product_attention(q, k, v, mask=mask),
                                attention.dot_product_attention(q, k, v, mask=mask, implementation="folded"))


@pytest.mark.parametrize("dtype,head_dim,mask,bias,device,expected", [
    (jnp.bfloat16, 64, None, None, ("cpu", "cpu", None), "folded"),
    (jnp.bfloat16, 64, None, None, ("gpu", "NVIDIA H200", "9.0"), "cudnn"),  # the U-Net's self-attention
    (jnp.float16, 128, None, None, ("gpu", "NVIDIA A100-SXM4-80GB", "8.0"), "cudnn"),
    (jnp.bfloat16, 64, "mask", None, ("gpu", "NVIDIA H200", "9.0"), "xla"),  # cross-attention to a padded text
    (jnp.bfloat16, 64, None, "bias", ("gpu", "NVIDIA H200", "9.0"), "xla"),  # temporal attention's position bias
    (jnp.float32, 64, None, None, ("gpu", "NVIDIA H200", "9.0"), "xla"),
    (jnp.bfloat16, 12, None, None, ("gpu", "NVIDIA H200", "9.0"), "xla"),
    (jnp.bfloat16, 256, None, None, ("gpu", "NVIDIA H200", "9.0"), "xla"),
    (jnp.float16, 64, None, None, ("gpu", "NVIDIA GeForce RTX 2080 Ti", "7.5"), "xla"),  # before Ampere
    (jnp.bfloat16, 64, None, None, ("gpu", "AMD Instinct MI300X", "gfx942"), "xla"),
    (jnp.bfloat16, 64, None, None, ("tpu", "TPU v5 lite", None), "xla"),
])
def test_auto_takes_cudnn_only_where_its_flash_kernel_applies(dtype, head_dim, mask, bias, device, expected):
  platform, kind, capability = device
  device = types.SimpleNamespace(platform=platform, device_kind=kind)  # the attributes a jax Device has
  if capability is not None:
    device.compute_capability = capability
  q = jnp.zeros((2, 16, 4, head_dim), dtype)
  assert attention.resolve("auto", q, mask, bias, device) == expected
  assert attention.resolve("xla", q, mask, bias, device) == "xla"  # a named implementation is kept
