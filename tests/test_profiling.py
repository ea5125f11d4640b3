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


def test_gpu_library_calls_count_as_convolutions_and_matmuls():
  """On a GPU, XLA runs convolutions and matmuls as custom calls into cuDNN and cuBLAS (lines as XLA:GPU prints
  them): they are counted as convolution and matmul, other custom calls as elementwise and other."""
  conv = ("%conv.1 = (bf16[8,32,32,64]{3,2,1,0}, u8[0]{0}) custom-call(bf16[8,32,32,64]{3,2,1,0} %p0, "
          "bf16[3,3,64,64]{3,2,1,0} %p1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, "
          'custom_call_target="__cudnn$convForward", '
          'metadata={op_name="jit(step)/transpose(jvp())/conv_general_dilated"}')
  gemm = ("%gemm.2 = (bf16[65536,8]{1,0}, s8[4194304]{0}) custom-call(bf16[65536,64]{1,0} %x, bf16[64,8]{1,0} %p2), "
          'custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(step)/jvp()/dot_general"}')
  other = ("ROOT %kernel.3 = bf16[8,32,32,64]{3,2,1,0} custom-call(bf16[8,32,32,64]{3,2,1,0} %p0), "
           'custom_call_target="SomeOtherKernel"')
  hlo = "\n".join(["HloModule jit_step, entry_computation_layout={()->f32[]}", "",
                   "ENTRY %main.1 (p0: bf16[8,32,32,64], p1: bf16[3,3,64,64], p2: bf16[64,8]) -> bf16[8,32,32,64] {",
                   "  %p0 = bf16[8,32,32,64]{3,2,1,0} parameter(0)", f"  {conv}", f"  {gemm}", f"  {other}", "}"])
  sources = profiling.op_sources(hlo)
  assert sources["conv.1"] == ("convolution", "conv_general_dilated", "backward")
  assert sources["gemm.2"] == ("matmul (attention, linear layers)", "dot_general", "forward")
  assert sources["kernel.3"] == ("elementwise and other", "(custom-call)", "unknown")
