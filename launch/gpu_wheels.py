"""Fetch, on this machine, the wheels a lent GPU machine lacks for launch/gpu_bench.sh, into .whl/ (git-ignored,
emptied first).

  .venv/bin/python launch/gpu_wheels.py [--dry_run]

The lent machine (the `device` tool's nvidia-h200: Python 3.12, x86-64, no network) has jax with CUDA, torch,
numpy, absl, etils, matplotlib and many more, but not tensorflow-datasets, grain, ml-collections, diffusers and
what they need. This walks the requirements of this package (and diffusers, for `bench peer`) through the
packages installed in this .venv, keeps those the lent machine lacks (DEVICE_HAS) and those whose version we
test with (PINNED), and downloads each at the version installed here, as a wheel for that Python and platform.

Flags:
  --dry_run   print the name==version list instead of downloading
"""

import argparse
import importlib.metadata
import pathlib
import subprocess
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# The lent machine's Python packages (the device tool's KINDS.md, read there on 2026-11-17).
DEVICE_HAS = set(map(canonicalize_name, """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split()))
# Carried although the machine has them: the versions our code is tested with (its jax and jaxlib stay its own).
# Not flax: flax follows jax's internals, and ours (0.12.8) fails to import under the machine's jax 0.11.2
# (jax.experimental.hijax has no HiPrimitive; seen there 2026-12-04), so its own flax (0.12.10) serves.
PINNED = {canonicalize_name(n) for n in ("optax", "orbax-checkpoint")}
# Left behind: PyAV writes MP4s (imported only then; no benchmark does) and its wheel is most of the 64 MiB.
LEFT = {"av"}
ROOTS = ("diffusion_jax", "diffusers")
# The lent machine's interpreter and platform, for the environment markers and the wheel tags.
MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_24_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64",
             "manylinux_2_35_x86_64")


def installed_requirements(name: str) -> list[str]:
  """The packages `name` (installed here) needs on the lent machine (its markers evaluated there)."""
  found = []
  for line in importlib.metadata.requires(name) or ():
    requirement = Requirement(line)
    if requirement.marker is None or requirement.marker.evaluate(MARKERS):
      found.append(canonicalize_name(requirement.name))
  return found


def to_carry(roots=ROOTS) -> dict[str, str]:
  """{name: version installed here} of every package reachable from `roots` that the lent machine lacks, and of
  the PINNED ones, but the LEFT ones; packages it has (but PINNED) are not walked: their own needs are there too."""
  carry, todo, seen = {}, list(roots), set()
  while todo:
    name = canonicalize_name(todo.pop())
    if name in seen:
      continue
    seen.add(name)
    if name in LEFT or (name in DEVICE_HAS and name not in PINNED):
      continue
    try:
      version = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      continue  # not installed here: nothing here needs it
    if name != "diffusion-jax":
      carry[name] = version
    todo += installed_requirements(name)
  return dict(sorted(carry.items()))


def download(carry: dict[str, str], directory: pathlib.Path) -> None:
  """Each name==version as a wheel for CPython 3.12 on x86-64 Linux (pure-Python wheels match any platform); a
  package published only as source (promise) is built here, which must give a pure-Python wheel."""
  platforms = [flag for platform in PLATFORMS for flag in ("--platform", platform)]
  pip = [sys.executable, "-m", "pip"]
  for name, version in carry.items():
    fetched = subprocess.run(pip + ["download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                                    "--implementation", "cp", *platforms, "-d", str(directory), f"{name}=={version}"],
                             capture_output=True, text=True)
    if fetched.returncode:
      subprocess.run(pip + ["wheel", "-q", "--no-deps", "-w", str(directory), f"{name}=={version}"],
                     capture_output=True)
      built = [w.name for w in directory.glob("*.whl") if canonicalize_name(w.name.split("-")[0]) == name]
      if not built or not all(w.endswith("-none-any.whl") for w in built):
        sys.exit(f"error: {name}=={version}: pip found no wheel for the lent machine ({fetched.stderr.strip()[-300:]}) "
                 f"and building one here gave {built or 'none'}, not a pure-Python wheel. Is the package registry "
                 "reachable?")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dry_run", action="store_true", help="print the name==version list instead of downloading")
  args = parser.parse_args()
  carry = to_carry()
  if args.dry_run:
    print("\n".join(f"{name}=={version}" for name, version in carry.items()))
    return
  directory = pathlib.Path(__file__).resolve().parents[1] / ".whl"
  directory.mkdir(exist_ok=True)
  for stale in directory.glob("*.whl"):  # two versions of one package stop the whole install there
    stale.unlink()
  download(carry, directory)
  size = sum(p.stat().st_size for p in directory.glob("*.whl"))
  print(f"{len(carry)} wheels in {directory}: {size / 2**20:.1f} MiB (the device tool carries at most 64 MiB)")


if __name__ == "__main__":
  main()
