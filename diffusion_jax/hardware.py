"""Peak FLOP/s of accelerators (datasheet, dense) and a measured ceiling where no datasheet applies."""

import time

import jax
import jax.numpy as jnp

# Dense peak FLOP/s per device (chip), bf16 unless noted. Matched against `device.device_kind`.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H100": 989e12,  # SXM; PCIe is lower (756e12)
    "NVIDIA A100": 312e12,
}


def measured_matmul_flops(size: int | None = None, dtype=jnp.float32, repeats: int = 3) -> float:
  """FLOP/s of a jitted size^3 matmul on the default device: the practical ceiling on a CPU. The default size is
  2048 on a CPU and 8192 on an accelerator, where a 2048^3 product is too short to fill it (an H200 ran one at
  120 TFLOP/s in bfloat16; PyTorch's 8192^3 product reached about 790 on the same kind of machine)."""
  size = size or (2048 if jax.devices()[0].platform == "cpu" else 8192)
  a = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda a: a @ a)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best


def peak_flops(device=None) -> tuple[float, str]:
  """(peak FLOP/s per device, where the number comes from)."""
  device = device or jax.devices()[0]
  kind = device.device_kind
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):
    if kind.startswith(name):
      return PEAK_FLOPS[name], f"datasheet {name}"
  if device.platform == "cpu":
    # A simulated multi-device CPU shares the cores: the ceiling is split among the devices.
    return measured_matmul_flops() / jax.local_device_count(), "measured CPU matmul"
  return float("nan"), f"unknown device kind {kind!r}"
