"""Filling a module's parameters from a checkpoint's named tensors (PyTorch, Hugging Face, diffusers).

`load(abstract_module, tensors, locate, what)`: `locate(path, ndim)` gives the checkpoint's name of the parameter
at an NNX path (a tuple of strings) with `ndim` axes, and the axes permutation from the checkpoint's layout to ours
(None: the same layout; PyTorch's conv kernel [out, in, *window] is Flax's [*window, in, out]). Every parameter must
be found with its shape and every tensor used (or named in `ignored`): all mismatches are listed in one ValueError.
`torch_name` is that `locate` for modules whose attribute paths mirror the PyTorch module's names.
`read_safetensors` reads a checkpoint file's tensors in the dtypes they are stored in, bfloat16 too.
"""

import json
from typing import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax import local_files

Locate = Callable[[tuple, int], tuple[str, tuple | None]]
# NNX variable name -> PyTorch parameter or buffer name.
TORCH_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def read_safetensors(path) -> dict:
  """{name: numpy array} of every tensor in a safetensors file, in its stored dtype. safetensors' numpy reader has
  no bfloat16 (FLUX.1's and SD 3.5's files hold it): those tensors are ml_dtypes' bfloat16 mapped from the file's
  bytes, where its header places them. (Through JAX instead, each tensor's shape would compile a program.)
  A file that is no safetensors, or one cut short, is a ValueError naming it."""
  from safetensors import SafetensorError, safe_open

  try:
    with safe_open(path, "numpy") as file:
      names = list(file.keys())
      bfloat16 = {name for name in names if file.get_slice(name).get_dtype() == "BF16"}
      tensors = {name: file.get_tensor(name) for name in names if name not in bfloat16}
  except SafetensorError as error:
    raise local_files.unreadable(path, "safetensors", error) from None
  if bfloat16:
    with open(path, "rb") as file:
      size = int.from_bytes(file.read(8), "little")
      header = json.loads(file.read(size))
    for name in bfloat16:
      begin, end = header[name]["data_offsets"]
      tensors[name] = np.memmap(path, np.uint16, "r", 8 + size + begin, ((end - begin) // 2,)).view(
          jnp.bfloat16).reshape(header[name]["shape"])
  return {name: tensors[name] for name in names}


def kernel_transpose(ndim: int) -> tuple:
  """The permutation from PyTorch's [out, in, *window] to Flax's [*window, in, out] (linear: [out, in] -> [in, out])."""
  return tuple(range(2, ndim)) + (1, 0)


def torch_name(path: tuple, ndim: int) -> tuple[str, tuple | None]:
  """NNX path -> (PyTorch name, transpose): `conv.kernel` is `conv.weight` (transposed), `bn.mean` `bn.running_mean`,
  any other variable its own name."""
  *module, leaf = path
  return ".".join(module + [TORCH_NAMES.get(leaf, leaf)]), kernel_transpose(ndim) if leaf == "kernel" else None


def located(state: nnx.State, locate: Locate):
  """(checkpoint name, transpose from its layout to ours, variable) of each parameter in a module's state."""
  for path, variable in nnx.to_flat_state(state):
    yield *locate(tuple(str(p) for p in path), variable.get_value().ndim), variable


def checkpoint_shape(shape: tuple, transpose: tuple | None) -> tuple:
  """A parameter's shape in the checkpoint's layout (`transpose` goes from that layout to ours)."""
  return tuple(shape[i] for i in np.argsort(transpose)) if transpose else tuple(shape)


def shapes(abstract_module: nnx.Module, locate: Locate) -> dict:
  """{checkpoint name: shape in the checkpoint's layout} of every parameter `load` fills (what a checkpoint of the
  module holds); nothing is allocated."""
  return {name: checkpoint_shape(variable.get_value().shape, transpose)
          for name, transpose, variable in located(nnx.state(abstract_module), locate)}


def tensors(module: nnx.Module, locate: Locate) -> dict:
  """{checkpoint name: numpy array in the checkpoint's layout} of a module's parameters: what `load` reads back into
  them."""
  arrays = {}
  for name, transpose, variable in located(nnx.state(module), locate):
    value = np.asarray(variable.get_value())
    arrays[name] = np.ascontiguousarray(np.transpose(value, np.argsort(transpose)) if transpose else value)
  return arrays


def load(abstract_module: nnx.Module, tensors: dict, locate: Locate, what: str, ignored=()) -> nnx.Module:
  """The module with every parameter taken from `tensors` {name: array}, as host (numpy) arrays that its user places
  (e.g. on their shards: train.initial_weights); `what` says what failed to match
  (e.g. "CLIP checkpoint '/w/clip' does not match its config.json"); names starting with `ignored` may go unused."""
  graphdef, state = nnx.split(abstract_module)
  used, problems = set(), []
  for name, transpose, variable in located(state, locate):
    target = variable.get_value()
    expected = checkpoint_shape(target.shape, transpose)
    if tensors.get(name) is None:
      problems.append(f"missing {name}")
    elif tuple(tensors[name].shape) != expected:
      problems.append(f"{name} has shape {tuple(tensors[name].shape)}, expected {expected}")
    else:
      value = np.asarray(tensors[name]).astype(target.dtype, copy=False)  # (on the host: no program per shape)
      # Kept on the host: placed where it belongs when used (sharded by train.initial_weights, not staged whole on
      # one device first; jnp.asarray would also compile a program per shape)
      variable.set_value(np.ascontiguousarray(np.transpose(value, transpose)) if transpose else value)
      used.add(name)
  problems += [f"unknown tensor {k}" for k in sorted(set(tensors) - used) if not k.startswith(tuple(ignored))]
  if problems:
    raise ValueError(f"{what} ({len(problems)} problem{'s' * (len(problems) > 1)}): " + "; ".join(problems[:20]))
  return nnx.merge(graphdef, state)
