"""Single-file Stable Diffusion checkpoints: the original (LDM) layout of one .safetensors that A1111, ComfyUI and
model sites share, read into a diffusers root that every config of configs/stable_diffusion.py reads (`convert`),
and a diffusers root written as one (`write`, what export.py's --single_file runs).

  python -m diffusion_jax.single_file --checkpoint=model.safetensors --like=/path/to/stable-diffusion-v1-5 \\
      --output=/path/to/model-diffusers

Flags:
  --checkpoint  the single file (.safetensors; pickled .ckpt files are not read): SD 1.x (model.diffusion_model.*,
                first_stage_model.*, cond_stage_model.transformer.*), SD 2.x (cond_stage_model.model.*, OpenCLIP's
                layout), SDXL (conditioner.embedders.0.transformer.* and conditioner.embedders.1.model.*) or the
                SDXL refiner (conditioner.embedders.0.model.*: its one text encoder, text_encoder_2/)
  --like        a diffusers root of the same architecture: its config.json files give the parts' structure, and
                everything but the weights of the parts the file holds (model_index.json, tokenizers, scheduler,
                configs, a safety checker) is copied; those weights are not read, so a root without them serves
  --output      the diffusers root to write (must not exist yet): unet/, vae/, text_encoder/ (and SDXL's
                text_encoder_2/; the refiner's alone) with the single file's weights, in its dtype

Every tensor a part's config.json builds must be found with its shape, or the conversion fails naming what is
missing; tensors left over (an EMA copy, SD 2.x's last text layer, which its pipeline does not run) are logged.
The names follow the layouts diffusers' single-file loader reads (tested against its converters).
"""

import logging
import pathlib
import re

import numpy as np
from absl import flags

from diffusion_jax import cli, local_files

log = logging.getLogger(__name__)

UNET, VAE = "model.diffusion_model.", "first_stage_model."
# Each architecture's text encoders: root folder -> (LDM prefix, in OpenCLIP's layout rather than transformers')
LAYOUTS = {"SD 1.x": {"text_encoder": ("cond_stage_model.transformer.", False)},
           "SD 2.x": {"text_encoder": ("cond_stage_model.model.", True)},
           "SDXL": {"text_encoder": ("conditioner.embedders.0.transformer.", False),
                    "text_encoder_2": ("conditioner.embedders.1.model.", True)},
           "SDXL refiner": {"text_encoder_2": ("conditioner.embedders.0.model.", True)}}
WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
           "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors"}
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias"}
OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}

# How a diffusers tensor is made from its LDM one: as it is, one third of a fused q/k/v projection (rows), the
# transpose, or a 1x1 convolution's kernel [out, in, 1, 1] as a linear weight [out, in].
SAME, TRANSPOSE, CONV_1X1 = "same", "transpose", "conv_1x1"
QKV = ("q", "k", "v")


def unet_source(name: str, config: dict) -> str:
  """The LDM name (under model.diffusion_model.) of a diffusers UNet2DConditionModel's tensor `name`."""
  module, _, leaf = name.rpartition(".")
  if module in UNET_FIXED:
    return f"{UNET_FIXED[module]}.{leaf}"
  resnet = lambda rest: ".".join([RESNET.get(rest[0], rest[0])] + rest[1:])
  parts = name.split(".")
  if parts[0] == "mid_block":  # resnet, transformer, resnet
    index, rest = int(parts[2]), parts[3:]
    return f"middle_block.{2 * index}.{resnet(rest)}" if parts[1] == "resnets" else f"middle_block.1.{'.'.join(rest)}"
  # LDM numbers the blocks of both paths in one sequence: the down path's level has layers_per_block layers (a resnet,
  # maybe a transformer) then its downsampler, the up path's one more layer, its upsampler beside the last.
  per_level = config["layers_per_block"] + 1
  level, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
  if parts[0] == "down_blocks":
    if kind == "downsamplers":  # (rest: conv.weight; LDM's is op.weight)
      return f"input_blocks.{(level + 1) * per_level}.0.op.{rest[-1]}"
    block = 1 + level * per_level + index
  else:
    if kind == "upsamplers":  # after the last layer's resnet and, on a level with attention, its transformer
      after = 2 if config["up_block_types"][level].startswith("CrossAttn") else 1
      return f"output_blocks.{level * per_level + per_level - 1}.{after}.{'.'.join(rest)}"
    block = level * per_level + index
  where = "input_blocks" if parts[0] == "down_blocks" else "output_blocks"
  return f"{where}.{block}.0.{resnet(rest)}" if kind == "resnets" else f"{where}.{block}.1.{'.'.join(rest)}"


def vae_source(name: str, config: dict) -> tuple[str, str]:
  """(LDM name under first_stage_model., how) of a diffusers AutoencoderKL's tensor `name`."""
  levels = len(config["block_out_channels"])
  coder, rest = name.split(".", 1)
  if coder not in ("encoder", "decoder"):  # quant_conv, post_quant_conv
    return name, SAME
  parts = rest.split(".")
  if parts[0] == "conv_norm_out":
    return f"{coder}.norm_out.{parts[1]}", SAME
  if parts[0] == "mid_block" and parts[1] == "attentions":
    module, leaf = ".".join(parts[3:-1]), parts[-1]
    how = CONV_1X1 if leaf == "weight" and module != "group_norm" else SAME
    return f"{coder}.mid.attn_1.{VAE_ATTENTION[module]}.{leaf}", how
  if parts[0] == "mid_block":
    return f"{coder}.mid.block_{int(parts[2]) + 1}.{'.'.join(parts[3:]).replace('conv_shortcut', 'nin_shortcut')}", \
        SAME
  if parts[0] in ("down_blocks", "up_blocks"):
    level = int(parts[1]) if parts[0] == "down_blocks" else levels - 1 - int(parts[1])  # LDM's up path: top first
    where = f"{coder}.{'down' if parts[0] == 'down_blocks' else 'up'}.{level}"
    if parts[2] in ("downsamplers", "upsamplers"):
      resampler = "downsample" if parts[2] == "downsamplers" else "upsample"
      return f"{where}.{resampler}.{'.'.join(parts[4:])}", SAME
    return f"{where}.block.{parts[3]}.{'.'.join(parts[4:]).replace('conv_shortcut', 'nin_shortcut')}", SAME
  return name, SAME  # conv_in, conv_out


def open_clip_source(name: str) -> tuple[str, str]:
  """(LDM name under the OpenCLIP prefix, how) of a transformers CLIPTextModel(WithProjection)'s tensor `name`."""
  if name in OPEN_CLIP:
    return OPEN_CLIP[name], SAME
  if name == "text_projection.weight":  # OpenCLIP's [width, projection], applied as x @ it
    return "text_projection", TRANSPOSE
  layer = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
  if layer is None:
    raise ValueError(f"no OpenCLIP tensor holds {name}")
  index, module, leaf = layer.groups()
  where = f"transformer.resblocks.{index}"
  if attention := re.fullmatch(r"self_attn\.([qkv])_proj", module):
    return f"{where}.attn.in_proj_{leaf}", attention.group(1)
  return f"{where}.{OPEN_CLIP_LAYER[module]}.{leaf}", SAME


def taken(tensor: np.ndarray, how: str) -> np.ndarray:
  """The diffusers tensor made from its LDM `tensor` (the `how` of *_source)."""
  if how in QKV:
    return np.split(tensor, 3, axis=0)[QKV.index(how)]
  if how == TRANSPOSE:
    return np.ascontiguousarray(tensor.T)
  if how == CONV_1X1:
    return tensor.reshape(tensor.shape[:2])
  return tensor


def placed(tensor: np.ndarray, how: str) -> np.ndarray:
  """The LDM tensor of a diffusers `tensor` (taken's inverse; the q/k/v thirds are stacked by `write`)."""
  if how == TRANSPOSE:
    return np.ascontiguousarray(tensor.T)
  if how == CONV_1X1:
    return tensor.reshape(tensor.shape + (1, 1))
  return tensor


def layout(root: pathlib.Path, flag: str) -> str:
  """Which of LAYOUTS a diffusers root's text encoders are (SD 2.x's CLIP is OpenCLIP's, with GELU)."""
  if (root / "text_encoder_2").exists():
    return "SDXL" if (root / "text_encoder").exists() else "SDXL refiner"
  text = root / "text_encoder" / "config.json"
  if not text.exists():
    raise ValueError(f"{flag}={str(root)!r} has no text_encoder/config.json: give a Stable Diffusion diffusers root")
  return "SD 2.x" if local_files.read_json(text).get("hidden_act") == "gelu" else "SD 1.x"


def sources(folder: str, names, root: pathlib.Path, open_clip: bool) -> dict:
  """{diffusers name: (LDM name under the part's prefix, how)} of a root folder's tensors `names`."""
  from diffusion_jax.models import autoencoder, sd_unet

  if folder == "unet":
    unet = sd_unet.read_config(root / "unet", f"{root}/unet")
    source = lambda n: (unet_source(n, unet), SAME)
  elif folder == "vae":
    vae = autoencoder.read_config(root / "vae", f"{root}/vae")
    source = lambda n: vae_source(n, vae)
  else:
    source = open_clip_source if open_clip else lambda n: (n, SAME)
  found = {}
  for name in names:
    try:
      found[name] = source(name)
    except (KeyError, IndexError, ValueError):  # a tensor the original layout has no place for
      raise ValueError(f"{folder}/: no single-file name for {name} (not a tensor of diffusers' Stable Diffusion "
                       "layout: write a root that diffusers saved)") from None
  return found


def parts(keys, like: pathlib.Path) -> dict:
  """{root folder: (LDM prefix, {diffusers name: (LDM name, how)}, {diffusers name: shape})} of a single file whose
  tensors are `keys`, for the diffusers root `like`'s config.json files; a ValueError naming what is missing."""
  from diffusion_jax.models import autoencoder, clip, sd_unet

  keys = set(keys)
  has = lambda prefix: any(k.startswith(prefix) for k in keys)
  kinds = [name for name, texts in LAYOUTS.items() if all(has(prefix) for prefix, _ in texts.values())]
  if not has(UNET) or not has(VAE) or len(kinds) != 1:
    raise ValueError(f"no Stable Diffusion checkpoint: a single file holds {UNET}* (the U-Net), {VAE}* (the "
                     "autoencoder) and text encoders (" + "; ".join(
                         f"{name}: {', '.join(p + '*' for p, _ in texts.values())}" for name, texts in LAYOUTS.items())
                     + ")")
  kind = kinds[0]
  if missing := [f for f in ("unet", "vae", *LAYOUTS[kind]) if not (like / f / "config.json").exists()]:
    raise ValueError(f"--like={str(like)!r} has no {', '.join(f + '/config.json' for f in missing)}: give the "
                     f"diffusers root of the single file's architecture ({kind})")
  if (found := layout(like, "--like")) != kind:
    raise ValueError(f"--like={str(like)!r} is {found}'s, the single file {kind}'s: give a root of its architecture")
  found = {}
  for folder, (prefix, open_clip) in {"unet": (UNET, False), "vae": (VAE, False), **LAYOUTS[kind]}.items():
    shapes = (sd_unet.tensor_shapes(like / "unet", "--like's unet/") if folder == "unet" else
              autoencoder.tensor_shapes(like / "vae") if folder == "vae" else
              clip.text_tensor_shapes(like / folder, f"--like's {folder}/", with_projection=folder == "text_encoder_2"))
    found[folder] = (prefix, sources(folder, shapes, like, open_clip), shapes)
  return found


def write(root, output) -> pathlib.Path:
  """Write the single file `output` (.safetensors) of a Stable Diffusion 1.x or SDXL (or SDXL refiner) diffusers
  root's U-Net, VAE and text encoders (ldm_tensors); returns `output`. SD 2.x's is refused: its text encoder in
  diffusers lacks the last of OpenCLIP's layers that its single files hold."""
  from safetensors.numpy import save_file

  root, output = pathlib.Path(root).expanduser(), pathlib.Path(output).expanduser()
  if output.exists():
    raise ValueError(f"--single_file={str(output)!r} exists: give a new file (nothing is overwritten)")
  kind = layout(root, "the root")
  if kind == "SD 2.x":
    raise ValueError("an SD 2.x root is not written as a single file: its text encoder in diffusers lacks the last "
                     "of OpenCLIP's layers that SD 2.x's single files hold")
  tensors = ldm_tensors(root, kind)
  output.parent.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(output))
  log.info("wrote %s (%s, %d tensors)", output, kind, len(tensors))
  return output


def ldm_tensors(root: pathlib.Path, kind: str) -> dict:
  """{LDM name: array} of a diffusers root's U-Net, VAE and text encoders in the layout `convert` reads, with the
  text encoders of LAYOUTS[kind] (tensors keep their dtypes)."""
  from diffusion_jax.models import clip, diffusers_directory

  written, fused = {}, {}
  for folder, (prefix, open_clip) in {"unet": (UNET, False), "vae": (VAE, False), **LAYOUTS[kind]}.items():
    tensors = (clip.tower_tensors(root / folder, "text_model.") if folder.startswith("text_encoder") else
               diffusers_directory.read_tensors(root / folder))
    for name, (source, how) in sources(folder, tensors, root, open_clip).items():
      if how in QKV:
        fused.setdefault(prefix + source, {})[how] = tensors[name]
      else:
        written[prefix + source] = placed(tensors[name], how)
  return written | {name: np.concatenate([thirds[k] for k in QKV]) for name, thirds in fused.items()}


def convert(checkpoint, like, output) -> pathlib.Path:
  """Write the diffusers root `output` holding the single file `checkpoint`'s weights in the structure of the
  diffusers root `like` (whose other files are copied); returns `output`."""
  from safetensors.numpy import save_file

  from diffusion_jax.models import diffusers_directory, named_tensors

  checkpoint, like, output = (pathlib.Path(p).expanduser() for p in (checkpoint, like, output))
  if checkpoint.suffix != ".safetensors":
    raise ValueError(f"--checkpoint={str(checkpoint)!r}: a .safetensors file, please (pickled .ckpt files run code "
                     "when read, and are not read here)")
  if not checkpoint.is_file():
    raise ValueError(f"--checkpoint={str(checkpoint)!r} does not exist")
  if output.exists():
    raise ValueError(f"--output={str(output)!r} exists: give a new directory (nothing is overwritten)")
  stored = named_tensors.read_safetensors(checkpoint)
  keys = set(stored)
  found, used, problems = parts(keys, like), set(), []
  weights = {}
  for folder, (prefix, named, shapes) in found.items():
    weights[folder] = {}
    for name, (source, how) in named.items():
      if prefix + source not in keys:
        problems.append(f"{folder}: no {prefix + source} (for {name})")
        continue
      tensor = taken(np.asarray(stored[prefix + source]), how)
      if tensor.shape != shapes[name]:
        problems.append(f"{folder}: {prefix + source} gives {name} of shape {tensor.shape}, its config.json "
                        f"{shapes[name]}")
      weights[folder][name] = tensor
      used.add(prefix + source)
  if problems:
    raise ValueError(f"{str(checkpoint)!r} does not fit --like={str(like)!r} ({len(problems)} problems): "
                     + "; ".join(problems[:20]))
  prefixes = tuple(prefix for prefix, _, _ in found.values())
  if left := sorted(k for k in keys - used if k.startswith(prefixes)):
    log.info("%d tensors of the single file are not read (%s%s)", len(left), ", ".join(left[:5]),
             ", ..." if len(left) > 5 else "")
  diffusers_directory.copy_root(like, output, weights)
  for folder, tensors in weights.items():
    save_file(tensors, str(output / folder / WEIGHTS[folder]), metadata={"format": "pt"})
  log.info("wrote %s: %s", output, ", ".join(f"{f}/ ({len(t)} tensors)" for f, t in weights.items()))
  return output


def define_flags():
  flags.DEFINE_string("checkpoint", None, "The single-file checkpoint (.safetensors).", required=True)
  flags.DEFINE_string("like", None, "A diffusers root of the same architecture (its configs, tokenizers and "
                      "scheduler are copied; the weights of the parts the file holds are not read).", required=True)
  flags.DEFINE_string("output", None, "The diffusers root to write (a new directory).", required=True)


def main(argv):
  del argv
  f = flags.FLAGS
  cli.print_result(lambda: convert(f.checkpoint, f.like, f.output))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
