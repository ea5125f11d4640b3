"""The benchmark command builds its table from real measurements (no timing is asserted)."""

from conftest import tiny_config
from diffusion_jax import bench


def test_input_benchmark_table(tmp_path_factory):
  table = bench.input_table(tiny_config(tmp_path_factory), steps=4, workers=0).splitlines()
  assert table[0] == "| what | examples/s | / train step |" and len(table) == 5
  for row in table[2:]:
    assert float(row.split("|")[2]) > 0
