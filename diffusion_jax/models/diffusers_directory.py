"""A local diffusers model directory (a pipeline checkpoint's transformer/ or unet/ folder): its config.json,
checked against the class a config field expects, and its safetensors files (one, or the shards an index lists),
loaded into the module that config builds.
"""

import pathlib

from diffusion_jax import local_files
from diffusion_jax.models import abstract_modules, named_tensors

WEIGHTS_FILE, WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"


def read_config(path, field: str, class_name: str, folder: str, what: str) -> dict:
  """The config.json of a local diffusers `class_name` directory (`what`: e.g. "the unet/ folder of a Stable
  Diffusion checkpoint"); a ValueError naming `field` when there is none (a whole pipeline's root: naming its
  `folder`) or it holds another class."""
  directory = pathlib.Path(path).expanduser()
  if not (directory / "config.json").exists():
    hint = (f": it is a whole pipeline's checkpoint; give its {folder}/ folder, {str(directory / folder)!r}"
            if (directory / folder / "config.json").exists() else
            f": give the local directory of a diffusers {class_name} ({what})")
    raise ValueError(f"{field}={str(path)!r} has no config.json{hint}")
  config = local_files.read_json(directory / "config.json")
  if config.get("_class_name") != class_name:
    raise ValueError(f"{field}={str(path)!r} holds a {config.get('_class_name')!r}, not a {class_name}")
  return config


def read_checked_config(path, field: str, class_name: str, folder: str, what: str, defaults: dict,
                        config_problems) -> dict:
  """read_config, completed with the class's `defaults`; a ValueError naming `field` that lists
  `config_problems(config)` (what the module cannot build) when there are any."""
  config = read_config(path, field, class_name, folder, what)
  if problems := config_problems(config):
    raise ValueError(f"{field}={str(path)!r}: " + "; ".join(problems))
  return defaults | config


def weight_files(path) -> list[pathlib.Path]:
  """The safetensors files of a local diffusers directory: WEIGHTS_FILE, or the shards WEIGHTS_INDEX lists."""
  directory = pathlib.Path(path).expanduser()
  if (directory / WEIGHTS_INDEX).exists():
    return [directory / name for name in sorted(set(local_files.read_json(directory / WEIGHTS_INDEX)[
        "weight_map"].values()))]
  if (directory / WEIGHTS_FILE).exists():
    return [directory / WEIGHTS_FILE]
  raise ValueError(f"No {WEIGHTS_FILE} or {WEIGHTS_INDEX} in {str(path)!r} (PyTorch .bin files are not read)")


def read_tensors(path) -> dict:
  """{PyTorch name: numpy array} of a local diffusers directory's weights (every file of weight_files)."""
  tensors = {}
  for file in weight_files(path):
    tensors.update(named_tensors.read_safetensors(file))
  return tensors


# safetensors' names of the floating dtypes weights are stored in
STORED_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def stored_dtype(files) -> str:
  """The floating dtype ('float32', 'float16' or 'bfloat16') most of the tensors in safetensors `files` are stored
  in (read from their headers; 'float32' when none is floating)."""
  from collections import Counter

  from safetensors import SafetensorError, safe_open

  counts = Counter()
  for file in files:
    try:
      with safe_open(file, "numpy") as f:
        counts.update(STORED_DTYPES[d] for d in (f.get_slice(k).get_dtype() for k in f.keys()) if d in STORED_DTYPES)
    except SafetensorError as error:
      raise local_files.unreadable(file, "safetensors", error) from None
  return counts.most_common(1)[0][0] if counts else "float32"


def copy_root(root: pathlib.Path, output: pathlib.Path, replaced) -> None:
  """Copy a pipeline's root (model_index.json, tokenizers, scheduler, every part) to `output`, leaving out the weight
  files of the parts (folder names) `replaced`, whose weights the caller writes."""
  import shutil

  weights = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")
  shutil.copytree(root, output, ignore=lambda folder, names: [
      n for n in names if pathlib.Path(folder).name in replaced and pathlib.Path(folder).parent == root
      and n.endswith(weights)])


def tensor_shapes(module_class, config: dict) -> dict:
  """{tensor name: shape} of what `load` reads into `module_class(config, rngs)` (nothing allocated)."""
  return named_tensors.shapes(abstract_modules.of(module_class, config), named_tensors.torch_name)


def load(path, module_class, config: dict):
  """A `module_class(config, rngs)` holding the weights of the local diffusers directory `path` (its safetensors,
  by PyTorch names); a ValueError when they do not match the module `config` (its config.json) builds."""
  return named_tensors.load(abstract_modules.of(module_class, config), read_tensors(path),
                            named_tensors.torch_name,
                            f"{str(pathlib.Path(path).expanduser())!r} does not match its config.json")
