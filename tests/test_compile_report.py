"""`pytest --compile-report=N` (compile_report.py) counts each test's own compiles, in one process or under xdist."""

import pathlib
import subprocess
import sys

import pytest

TESTS = pathlib.Path(__file__).resolve().parent

INNER_TESTS = '''
import jax
import numpy as np


def test_compiles_two_programs():
  jax.jit(lambda x: x + 1)(np.ones(3, np.float32))
  jax.jit(lambda x: x * 2)(np.ones(3, np.float32))


def test_compiles_nothing():
  assert sum(range(3)) == 3
'''


@pytest.mark.parametrize("workers", [[], ["-n", "2"]])
def test_the_report_counts_each_tests_compiles(tmp_path, workers):
  (tmp_path / "conftest.py").write_text(
      f"import sys\nsys.path.insert(0, {str(TESTS)!r})\nimport compile_report\n\n\n"
      "def pytest_addoption(parser):\n  compile_report.add_option(parser)\n\n\n"
      "def pytest_configure(config):\n  compile_report.configure(config)\n")
  (tmp_path / "test_inner.py").write_text(INNER_TESTS)
  result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *workers,
                           "--compile-report=5", "test_inner.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stdout[-3000:]
  rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in result.stdout.splitlines()
          if line.startswith("| test_inner.py::") or line.startswith("| all ")}
  assert rows["test_inner.py::test_compiles_two_programs"][2].endswith("(2)"), result.stdout
  assert rows["test_inner.py::test_compiles_nothing"][2] == "0.0 (0)"
  assert rows["all 2 tests"][2].endswith("(2)")
