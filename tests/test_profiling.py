"""The profiler attributes a compiled program's op time to kinds of op, phases and JAX primitives."""

import jax
import jax.numpy as jnp

from diffusion_jax import profiling


def test_profile_attributes_op_time_to_kinds_phases_and_primitives():
  def loss(w, x):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.mean(jax.nn.relu(y) @ jnp.ones((64, 8)))

  x, w = jnp.ones((8, 32, 32, 64)), jnp.full((3, 3, 64, 64), 0.01)
  compiled = jax.jit(jax.grad(loss)).lower(w, x).compile()
  sources = profiling.op_sources(compiled.as_text())
  assert ("convolution", "conv_general_dilated", "forward") in sources.values()
  assert any(kind.startswith("matmul") and phase == "backward" for kind, _, phase in sources.values())
  by_source, wall = profiling.profile(compiled, (w, x), steps=5)
  by_kind = {}
  for (kind, _, _), seconds in by_source.items():
    by_kind[kind] = by_kind.get(kind, 0.0) + seconds
  # Two 64-channel 3x3 convolutions outweigh a 64x8 matmul and the layout copies (about 3/4 of the op time when
  # idle; the largest kind even beside a busy test worker, where a share threshold was not reliable).
  assert wall > 0 and max(by_kind, key=by_kind.get) == "convolution", by_kind
  text = profiling.table(by_source, wall)
  assert "| convolution |" in text and "| conv_general_dilated | forward |" in text
