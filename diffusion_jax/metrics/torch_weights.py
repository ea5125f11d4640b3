"""Feature networks from local PyTorch-format weights (FID's Inception-v3, FVD's I3D).

`read` gives {tensor name: float32 array} from a .pth / .pt state dict (needs torch), a .safetensors or
a .npz file; `load` puts them into a Flax NNX module whose attribute paths mirror the PyTorch module's
names (PyTorch `conv.weight` is NNX `conv.kernel`, `bn.running_mean` is `bn.mean`), transposing kernels
from PyTorch's [out, in, *window] to Flax's [*window, in, out]. Nothing is downloaded.
"""

import pathlib
import zipfile

import numpy as np
from flax import nnx

from diffusion_jax import local_files
from diffusion_jax.models import named_tensors


def read(path, model: str, standard_file: str) -> dict:
  """{tensor name: float32 array} of a .pth / .pt (needs torch), .safetensors or .npz weights file; a ValueError
  naming a file that is missing, damaged or cut short.

  model and standard_file name what is expected, for the error messages."""
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise ValueError(f"No {model} weights file at {str(path)!r}; give the local path of the standard weights "
                     f"({standard_file}) or the same tensors as .safetensors / .npz.")
  if path.suffix in (".pth", ".pt"):
    try:
      import torch
    except ImportError:
      raise ValueError(f"Reading {path.name} needs torch; install it, or save the same tensors as "
                       ".safetensors.") from None
    try:
      state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # (torch raises RuntimeError, pickle's errors, EOFError, ... for a damaged file)
      raise local_files.unreadable(path, f"{model} weights (a PyTorch state dict)", error) from None
    if not isinstance(state, dict):
      raise ValueError(f"{model} weights {str(path)!r} hold a {type(state).__name__}, not a state dict of tensors.")
    return {k: v.float().numpy() for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
  if path.suffix == ".safetensors":
    return {k: v.astype(np.float32) for k, v in named_tensors.read_safetensors(path).items()}
  if path.suffix == ".npz":
    try:
      with np.load(path) as data:
        return {k: data[k].astype(np.float32) for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
      raise local_files.unreadable(path, f"{model} weights (.npz)", error) from None
  raise ValueError(f"Unknown {model} weights format {path.suffix!r} ({str(path)!r}); use .pth, .safetensors or "
                   ".npz.")


def load(abstract_module: nnx.Module, tensors: dict, model: str, unused_prefixes=()) -> nnx.Module:
  """The module with every parameter and statistic taken from `tensors` (PyTorch names); every mismatch
  (missing, wrong shape, unknown name not under `unused_prefixes`) is listed in one ValueError."""
  return named_tensors.load(abstract_module, tensors, named_tensors.torch_name, f"The weights do not match {model}",
                            unused_prefixes)
