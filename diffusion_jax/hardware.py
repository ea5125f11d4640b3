"""Peak FLOP/s and memory bandwidth of accelerators (datasheet, dense) and measured ceilings where no datasheet
applies: the two roofs of a roofline."""

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
# High-bandwidth memory bytes/s per device (chip), same keys.
PEAK_BANDWIDTH = {
    "TPU v4": 1.2e12,
    "TPU v5 lite": 0.82e12,
    "TPU v5e": 0.82e12,
    "TPU v5p": 2.76e12,
    "TPU v5": 2.76e12,
    "TPU v6 lite": 1.64e12,
    "TPU v6e": 1.64e12,
    "NVIDIA H200": 4.8e12,
    "NVIDIA H100": 3.35e12,  # SXM; PCIe is lower (2.0e12)
    "NVIDIA A100": 2.04e12,  # 80 GB; the 40 GB card has 1.56e12
}


def _best_seconds(fn, x, repeats: int) -> float:
  fn(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return best


def _on_cpu() -> bool:
  return jax.devices()[0].platform == "cpu"


def measured_matmul_flops(size: int | None = None, dtype=jnp.float32, repeats: int = 3) -> float:
  """FLOP/s of a jitted size^3 matmul on the default device: the practical ceiling on a CPU. The default size is
  2048 on a CPU and 8192 on an accelerator, where a 2048^3 product is too short to fill it (an H200 ran one at
  120 TFLOP/s in bfloat16; PyTorch's 8192^3 product reached about 790 on the same kind of machine)."""
  size = size or (2048 if _on_cpu() else 8192)
  return 2 * size**3 / _best_seconds(jax.jit(lambda a: a @ a), jnp.ones((size, size), dtype), repeats)


def measured_bandwidth(megabytes: int | None = None, repeats: int = 3) -> float:
  """Bytes/s of a jitted elementwise pass (read and write) over a float32 array on the default device: the
  practical memory roof. The default size is 256 MB on a CPU and 4 GB on an accelerator (far past its caches)."""
  megabytes = megabytes or (256 if _on_cpu() else 4096)
  x = jnp.ones((megabytes * 2**18,), jnp.float32)
  return 2 * x.nbytes / _best_seconds(jax.jit(lambda x: x * 2 + 1), x, repeats)


def datasheet(device=None) -> tuple[float, float] | None:
  """(peak FLOP/s, memory bytes/s) per device from the datasheet of the longest listed name its device_kind starts
  with ("TPU v5 lite" before "TPU v5"), or None for a kind not listed (a CPU)."""
  device = device or jax.devices()[0]
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):
    if device.device_kind.startswith(name):
      return PEAK_FLOPS[name], PEAK_BANDWIDTH[name]
  return None


def peak_flops(device=None) -> tuple[float, str]:
  """(peak FLOP/s per device, where the number comes from)."""
  device = device or jax.devices()[0]
  if (roofs := datasheet(device)) is not None:
    return roofs[0], f"datasheet {device.device_kind}"
  if device.platform == "cpu":
    # A simulated multi-device CPU shares the cores: the ceiling is split among the devices.
    return measured_matmul_flops() / jax.local_device_count(), "measured CPU matmul"
  return float("nan"), f"unknown device kind {device.device_kind!r}"
