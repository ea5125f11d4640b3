"""Every command-line flag is documented: in its program's docstring (what `--help` heads) and in README."""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
ABSL_FLAG = re.compile(r'DEFINE_\w+\(\s*"(\w+)"')
ARGPARSE_FLAG = re.compile(r'add_argument\(\s*"--(\w+)"')
PROGRAMS = sorted(path for path in [*(ROOT / "diffusion_jax").rglob("*.py"), *(ROOT / "launch").glob("*.py")]
                  if ABSL_FLAG.search(path.read_text()) or ARGPARSE_FLAG.search(path.read_text()))


def flag_names(source: str) -> set[str]:
  return set(ABSL_FLAG.findall(source)) | set(ARGPARSE_FLAG.findall(source))


def test_the_programs_with_flags_are_found():
  found = {path.relative_to(ROOT).as_posix() for path in PROGRAMS}
  assert {"diffusion_jax/main.py", "diffusion_jax/sample.py", "diffusion_jax/evaluate.py",
          "launch/local.py"} <= found
  assert len(flag_names((ROOT / "diffusion_jax" / "sample.py").read_text())) > 40


@pytest.mark.parametrize("path", PROGRAMS, ids=lambda path: path.relative_to(ROOT).as_posix())
def test_every_flag_is_in_its_programs_docstring_and_in_readme(path):
  source = path.read_text()
  docstring = ast.get_docstring(ast.parse(source)) or ""
  names = flag_names(source)
  assert [name for name in sorted(names) if f"--{name}" not in docstring] == [], "not in the module docstring"
  assert [name for name in sorted(names) if f"--{name}" not in README] == [], "not in README.md"
