"""Datasheet roofs are found by device kind; the measured roofs are positive rates."""

import types

from diffusion_jax import hardware


def fake_device(kind: str, platform: str = "gpu"):
  return types.SimpleNamespace(device_kind=kind, platform=platform)


def test_datasheet_roofs_match_the_longest_device_kind_prefix():
  assert hardware.datasheet(fake_device("NVIDIA H100 80GB HBM3")) == (989e12, 3.35e12)
  flops, source = hardware.peak_flops(fake_device("NVIDIA H100 80GB HBM3"))
  assert (flops, source) == (989e12, "datasheet NVIDIA H100 80GB HBM3")
  # "TPU v5 lite" (v5e) must not be read as "TPU v5" (v5p).
  assert hardware.datasheet(fake_device("TPU v5 lite", "tpu")) == (197e12, 0.82e12)
  assert set(hardware.PEAK_FLOPS) == set(hardware.PEAK_BANDWIDTH)


def test_an_unknown_device_kind_has_no_datasheet_and_no_peak_flops():
  assert hardware.datasheet(fake_device("Some NPU")) is None
  flops, source = hardware.peak_flops(fake_device("Some NPU"))
  assert flops != flops and "unknown device kind 'Some NPU'" in source  # NaN


def test_measured_roofs_are_rates_of_the_given_sizes():
  assert hardware.measured_matmul_flops(size=256, repeats=1) > 0
  assert hardware.measured_bandwidth(megabytes=16, repeats=1) > 0
