"""LoRA adapters: the low-rank updates of a LoRA fine-tune (model.lora_rank) as a file of their own, and added
to another model's weights.

A LoRA run's checkpoints hold its whole model, the frozen weights too. `export` writes only the updates, each
projection's a [in, rank] and b [rank, out] (attention's; the feed-forward's with model.lora_feed_forward; the
scale-shift projections' with model.lora_modulation) and each convolution's a [k, k, in, rank] and b
(model.lora_convolutions; a video U-Net's convolutions over frames: a [3, in, rank]), float32 (the first EMA copy
when the run samples with EMA), to a safetensors file with what made them in its metadata: a small file to share,
where a checkpoint holds the whole model.
`fuse` adds scale * a @ b to the kernel each update belongs to (Hu et al. 2021, sec. 4.1: merged, the model
computes what the LoRA model computes at scale 1, at no extra cost): a model with the same
projections (the source run, or another run of the same architecture) takes one or several adapters,
each at its own scale (0: the model as it was; the updates of several add up). `sample.py --lora=FILE[:SCALE]`
and `evaluate.py --lora=FILE[:SCALE]` fuse them into a workdir's model.

A LoRA of Wan's transformer also travels in the PyTorch world's files (diffusers_lora.py): `--format=diffusers`
writes diffusers' layout (WanPipeline.load_lora_weights reads it), and `--lora` reads that layout, Wan's
original one (ComfyUI's) and musubi-tuner's, as shared Wan LoRAs come (`--lora=low_noise=FILE` for Wan 2.2
A14B's low-noise expert's file). `--lora` also reads Stable Diffusion 1.x / 2.x LoRAs in kohya's and diffusers'
layouts (sd_lora.py: the U-Net's and the CLIP text encoder's updates, LoCon's convolutions too), SDXL's in the
same (kohya's with the SGM U-Net's module names), SD3's and Flux's in diffusers' layout (their transformers' updates
named 'transformer.', matched to the model's by `resolved`), and Flux's in kohya's and BFL's names (flux_lora.py:
fused layers split); `--format=diffusers` writes a LoRA of SD's U-Net (1.x, 2.x or SDXL) or SD3's or Flux's
transformer, and of their CLIP text encoders, in diffusers' layout, which their pipelines' load_lora_weights read,
and `--format=kohya` an SD U-Net's in kohya's, or a Flux transformer's in kohya's names (flux_lora.to_kohya: fused
layers' parts stacked, as ComfyUI and Forge load Flux LoRAs), `--format=bfl` a Flux transformer's in BFL's own
names (flux_lora.to_bfl: 'diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight', as ComfyUI and ai-toolkit
write them).

  python -m diffusion_jax.lora --workdir=LORA_RUN --output=adapter.safetensors [--step=N] [--use_ema=false]
                               [--format=diffusers|kohya|bfl]
  python -m diffusion_jax.lora --inspect=adapter.safetensors

Flags:
  --workdir   a LoRA fine-tune's workdir (model.lora_rank > 0)
  --output    the adapter file to write (.safetensors; an existing file is refused, not overwritten)
  --step      checkpoint step (default: the latest)
  --use_ema   take the updates' first EMA copy (default: the run's sample.use_ema) or, false, the trained ones
  --format    diffusion_jax (default: ours, with what made it), diffusers (a LoRA of Wan's, SD3's or Flux's
              transformer or of Stable Diffusion's U-Net; of Wan 2.2 A14B's pair, a second file,
              OUTPUT_low_noise.safetensors, for the low-noise expert) or kohya (a LoRA of Stable Diffusion's
              U-Net and text encoders, SDXL's named as sd-scripts names them, or of Flux's transformer and CLIP in
              kohya's names for BFL's layers) or bfl (a LoRA of Flux's transformer in BFL's own module names,
              'diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight', its CLIP's in kohya's)
  --inspect   print what an adapter file holds instead (`describe`): what made it, the model it was made for,
              and how many layers of each kind it updates with how many weights
"""

import dataclasses
import json
import logging
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from flax import traverse_util

from diffusion_jax import checkpoint, cli, diffusers_lora, finetune, flux_lora, local_files, sd_lora
from diffusion_jax.models import named_tensors, sd_unet, text_to_image

FORMAT = "diffusion_jax.lora"
LAYOUTS = (FORMAT, "diffusers", "kohya", "bfl")
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Adapter:
  """One adapter file's updates {name 'path/to/q_lora/lora_a': float32 array} at `scale`; `metadata`: what
  made them (export's)."""
  file: str
  updates: dict
  metadata: dict
  scale: float = 1.0


def name(path) -> str:
  return "/".join(map(str, path))


# Prefixes PyTorch-layout files give updates without saying whose (diffusers' 'transformer.' of SD3 and Flux; Flux's
# CLIP, or SD3's first, as 'text_encoder.' in a file without a second) -> the models' own, tried in turn (resolved)
ALIASES = {"transformer/": ("sd3/", "flux/"), "text_encoder/": ("text_encoder/clip/", "text_encoder/first/")}


def resolved(kernel: str, kernels) -> str:
  """The name of the model's kernel an update's `kernel` names: itself where the model has it, else, for a name a
  PyTorch-layout file gives without saying whose (ALIASES), the model's own one that it has (unchanged if none)."""
  if kernel in kernels:
    return kernel
  for prefix, models in ALIASES.items():
    for model in models if kernel.startswith(prefix) else ():
      if (candidate := model + kernel.removeprefix(prefix)) in kernels:
        return candidate
  return kernel


def kernel_of(update_name: str) -> str:
  """The kernel a low-rank update adapts: '.../attn/q_lora/lora_a' -> '.../attn/q/kernel', and for a layer in a
  list (Wan's), '.../attn1/to_out_lora/0/lora_a' -> '.../attn1/to_out/0/kernel'."""
  return "/".join([part.removesuffix("_lora") for part in update_name.split("/")[:-1]] + ["kernel"])


LOW_NOISE = "low_noise="  # --lora=low_noise=FILE: a PyTorch-layout file of Wan 2.2 A14B's low-noise expert


def parse(spec: str) -> tuple[str, float]:
  """'FILE' or 'FILE:SCALE' (either after LOW_NOISE) -> (file, scale)."""
  spec = spec.removeprefix(LOW_NOISE)
  file, colon, scale = spec.rpartition(":")
  if colon and file:
    try:
      return file, float(scale)
    except ValueError:
      pass
  return spec, 1.0


def at_scales(adapters: list[Adapter], scale=None) -> list[Adapter]:
  """The adapters at a prompt's 'lora_scale': None (each at its own scale), one number (all at it) or a list with
  one scale per adapter; a ValueError for a scale without adapters or a list of another length."""
  if scale is None:
    return list(adapters)
  if not adapters:
    raise ValueError(f"lora_scale {scale}: no --lora adapter to scale (give --lora=FILE[:SCALE], or drop it)")
  scales = [float(scale)] * len(adapters) if isinstance(scale, (int, float)) else [float(s) for s in scale]
  if len(scales) != len(adapters):
    raise ValueError(f"lora_scale {list(scale)}: one scale per --lora adapter ({len(adapters)}), or one number")
  return [dataclasses.replace(adapter, scale=s) for adapter, s in zip(adapters, scales)]


def read(spec: str, flag: str = "--lora") -> Adapter:
  """The adapter of a --lora=[low_noise=]FILE[:SCALE] flag (or `flag`): ours, a Wan LoRA in diffusers' or Wan's
  original layout (diffusers_lora.py; with low_noise=, of Wan 2.2 A14B's low-noise expert) or a Stable Diffusion one
  in kohya's or diffusers' (sd_lora.py; SD3's and Flux's in diffusers'), or a Flux one in kohya's or BFL's names
  (flux_lora.py); ValueError when the file is missing or not an adapter."""
  from safetensors import SafetensorError, safe_open

  file, scale = parse(spec)
  if not pathlib.Path(file).is_file():
    raise ValueError(f"{flag}={spec}: no file {file!r} (write one with python -m diffusion_jax.lora).")
  try:
    with safe_open(file, "numpy") as f:
      metadata = f.metadata() or {}
    updates = {key: np.asarray(x, np.float32) for key, x in named_tensors.read_safetensors(file).items()}  # (bf16)
  except SafetensorError as error:
    raise ValueError(f"{flag}={spec}: {local_files.unreadable(file, 'safetensors', error)}") from None
  except OSError as error:
    raise ValueError(f"{flag}={spec}: {file!r} cannot be read: {checkpoint.brief(error)}") from None
  low_noise = spec.startswith(LOW_NOISE)
  if metadata.get("format") != FORMAT and flux_lora.is_flux_lora(updates) and not low_noise:  # (before Wan's, whose
    try:  # original names share BFL's 'diffusion_model.' prefix)
      updates = flux_lora.from_file(updates)
    except ValueError as error:
      raise ValueError(f"{flag}={spec}: {file!r} is a Flux LoRA that cannot be read: {error}") from None
    return Adapter(file, updates, {"format": "Flux LoRA (kohya's or BFL's names)"}, scale)
  if metadata.get("format") != FORMAT and diffusers_lora.is_wan_lora(updates):
    try:
      updates = diffusers_lora.from_file(updates, metadata, "wan_low" if low_noise else "wan")
    except ValueError as error:
      raise ValueError(f"{flag}={spec}: {file!r} is a Wan LoRA that cannot be read: {error}") from None
    made_here = metadata if metadata.get("written_by") == FORMAT else {}  # (export's provenance, when it wrote it)
    layout = f"Wan LoRA (PyTorch layout){', low-noise expert' * low_noise}"
    return Adapter(file, updates, made_here | {"format": layout}, scale)
  if metadata.get("format") != FORMAT and sd_lora.is_sd_lora(updates) and not low_noise:
    try:
      updates = sd_lora.from_file(updates, metadata)
    except ValueError as error:
      raise ValueError(f"{flag}={spec}: {file!r} is a Stable Diffusion LoRA that cannot be read: {error}") from None
    return Adapter(file, updates, {"format": "Stable Diffusion LoRA (PyTorch layout)"}, scale)
  if low_noise:
    raise ValueError(f"{flag}={spec}: {LOW_NOISE} names the expert a Wan LoRA file in a PyTorch layout updates; "
                     f"{file!r} is not one (ours name their layers themselves)")
  if metadata.get("format") != FORMAT:
    raise ValueError(f"{flag}={spec}: {file!r} is not a diffusion_jax LoRA adapter (no '{FORMAT}' format in its "
                     "metadata) nor a Wan, Stable Diffusion or Flux LoRA in a PyTorch layout; python -m "
                     "diffusion_jax.lora writes them from a LoRA run's workdir.")
  return Adapter(file, updates, metadata, scale)


def problems(adapter: Adapter, kernels: dict) -> list[str]:
  """What keeps `adapter` from a model whose kernels are `kernels` ({name: shape}): updates of projections or
  convolutions it lacks, a and b whose product has another shape than the kernel."""
  found = []
  pairs = sorted({key.rsplit("/", 1)[0] for key in adapter.updates})
  for module in pairs:
    a, b = (adapter.updates.get(f"{module}/lora_{part}") for part in "ab")
    kernel = resolved(kernel_of(f"{module}/lora_a"), kernels)
    if a is None or b is None or a.ndim < 2 or b.ndim != 2 or a.shape[-1] != b.shape[0]:
      found.append(f"{module} is not an a [..., in, rank], b [rank, out] pair")
    elif kernel not in kernels:
      found.append(f"{kernel} is not in this model")
    elif tuple(kernels[kernel]) != a.shape[:-1] + b.shape[1:]:
      found.append(f"{kernel} has shape {tuple(kernels[kernel])} here, the update {a.shape[:-1] + b.shape[1:]}")
  return found


def model_differences(adapter: Adapter, config) -> list[str]:
  """'field: adapter's -> config's' for the model, text and latent fields (but the LoRA's own) in which the model
  an adapter was trained on differs from `config`'s; [] when its metadata does not say."""
  if "config" not in adapter.metadata:
    return []
  made = ml_collections.ConfigDict(json.loads(adapter.metadata["config"]))
  this = ml_collections.ConfigDict({k: json.loads(config[k].to_json_best_effort()) for k in finetune.MODEL_SECTIONS})
  return [d for d in checkpoint.config_differences(made, this) if not d.startswith("model.lora_")]


def check(adapters: list[Adapter], config, flag: str = "--lora") -> None:
  """A ValueError naming the first mismatches when an adapter (of `flag`) does not fit `config`'s model, and the
  fields in which the model it was made for differs (nothing read)."""
  params, frozen = finetune.abstract_parameters(config)
  kernels = {name(p): x.shape for p, x in (params | frozen).items() if p[-1] == "kernel"}
  for adapter in adapters:
    if found := problems(adapter, kernels):
      made = adapter.metadata.get("workdir", "another model")
      said = [f"{flag}={adapter.file}: its updates (from {made}) do not fit this model: "
              f"{'; '.join(found[:5])}{' ...' if len(found) > 5 else ''}"]
      if differences := model_differences(adapter, config):
        said.append(f"It was made for a model that differs in: {'; '.join(differences)} (adapter's -> this one's)")
      if source := adapter.metadata.get("source_workdir"):
        said.append(f"It fits its source run, {source}, and runs of that model")
      raise ValueError(". ".join(said) + ".")


def fuse(tree: dict, adapters: list[Adapter]) -> dict:
  """A nested parameter dict with scale * a @ b of every adapter added to the kernels it holds (each keeping its
  kernel's dtype and sharding); kernels it does not hold are left to the other trees of the model."""
  flat = traverse_util.flatten_dict(tree)
  names = {name(p): p for p in flat}
  total = {}
  for adapter in adapters:
    for key, a in adapter.updates.items():
      if key.endswith("/lora_a") and (kernel := resolved(kernel_of(key), names)) in names:
        b = adapter.updates[key.removesuffix("a") + "b"]
        update = adapter.scale * (a.astype(np.float64) @ b.astype(np.float64))
        total[kernel] = total.get(kernel, 0) + update
  for key, update in total.items():
    flat[names[key]] = _added(flat[names[key]], update.astype(np.float32))
  return traverse_util.unflatten_dict(flat)


@jax.jit
def _added(kernel, update):
  """kernel + update in float32, in the kernel's dtype and (elementwise) its sharding; one program per shape."""
  return (kernel.astype(jnp.float32) + update).astype(kernel.dtype)


def fused(weights, adapters: list[Adapter]):
  """sample.Weights (sampling's and evaluation's) with the adapters fused into them."""
  if not adapters:
    return weights
  return weights._replace(params=fuse(weights.params, adapters), frozen=fuse(weights.frozen, adapters))


def provenance(adapters: list[Adapter]) -> list[dict]:
  """What sample and evaluation outputs record of the adapters they used."""
  return [{"file": str(pathlib.Path(a.file).resolve()), "scale": a.scale, "workdir": a.metadata.get("workdir"),
           "step": int(a.metadata.get("step", -1)), "ema": a.metadata.get("ema") == "True"} for a in adapters]


def export(workdir, output, step: int | None = None, use_ema: bool | None = None, layout: str = FORMAT) -> dict:
  """Write the low-rank updates of a LoRA run's checkpoint (default: the latest; use_ema default: its
  sample.use_ema) to `output` (safetensors), in our layout, or (a LoRA of Wan's transformer or SD's U-Net, layout
  'diffusers') diffusers' (of Wan 2.2 A14B's pair, the low-noise expert's to OUTPUT_low_noise too), or (SD's U-Net,
  Flux's transformer, 'kohya') kohya's, or (Flux's, 'bfl') Black Forest Labs' module names. Returns the files'
  metadata and, as 'files', their paths."""
  from safetensors.numpy import save

  config = checkpoint.read_config(workdir)
  if not config.model.lora_rank:
    raise ValueError(f"--workdir={str(workdir)!r} is not a LoRA fine-tune (model.lora_rank is 0): its checkpoints are "
                     "the whole model; sample or fine-tune it as a workdir.")
  if layout not in LAYOUTS:
    raise ValueError(f"--format={layout!r}: one of {list(LAYOUTS)}")
  if layout == "kohya" and config.model.backbone not in ("sd_unet", "flux"):
    raise ValueError(f"--format=kohya: only a LoRA of Stable Diffusion's U-Net or Flux's transformer has a kohya "
                     f"layout; --workdir={str(workdir)!r} is a LoRA of a {config.model.backbone}")
  if layout == "bfl" and config.model.backbone != "flux":
    raise ValueError(f"--format=bfl: Black Forest Labs' names are Flux's; --workdir={str(workdir)!r} is a LoRA of a "
                     f"{config.model.backbone}")
  unet = sd_unet.read_config(config.model.sd_unet_path) if config.model.backbone == "sd_unet" else {}
  sdxl = unet.get("addition_embed_type") == sd_unet.TEXT_TIME  # kohya names SDXL's modules as the SGM U-Net does
  if layout == "kohya" and sdxl and unet["layers_per_block"] != sd_lora.SDXL_LAYERS_PER_BLOCK:
    raise ValueError(f"--format=kohya: kohya's SDXL names number SDXL's blocks ({sd_lora.SDXL_LAYERS_PER_BLOCK} "
                     f"ResNet blocks a level); this U-Net's layers_per_block={unet['layers_per_block']} has no such "
                     "names (write diffusers' layout)")
  if layout == "diffusers" and config.model.backbone not in ("wan", "sd_unet", "sd3", "flux"):
    raise ValueError(f"--format=diffusers: only a LoRA of Wan's, SD3's or Flux's transformer or SD's U-Net has a "
                     f"diffusers layout; --workdir={str(workdir)!r} is a LoRA of a {config.model.backbone} (write "
                     f"{FORMAT}'s)")
  output = pathlib.Path(output)
  pair = layout == "diffusers" and config.model.backbone == "wan" and config.model.wan_low_noise_path
  written = [output.with_name(output.stem + suffix + output.suffix)  # (before the checkpoint is read)
             for suffix in (diffusers_lora.EXPERTS.values() if pair else [""])]
  if existing := [str(file) for file in written if file.exists()]:
    raise ValueError(f"--output: {', '.join(existing)} exists: give a new path (nothing is overwritten)")
  adapter = run_adapter(workdir, config, step, use_ema)
  metadata, tensors = adapter.metadata, adapter.updates
  output.parent.mkdir(parents=True, exist_ok=True)
  files = {output: tensors}
  if layout == "diffusers" and config.model.backbone == "wan":  # one file per expert of Wan 2.2 A14B's pair
    files = {output.with_name(output.stem + suffix + output.suffix): part
             for suffix, part in diffusers_lora.per_expert(tensors).items()}
  elif layout == "diffusers":
    files = {output: sd_lora.to_diffusers(tensors)}
  elif layout == "kohya" and config.model.backbone == "flux":
    files = {output: flux_lora.to_kohya(tensors)}
  elif layout == "bfl":
    files = {output: flux_lora.to_bfl(tensors)}
  elif layout == "kohya":
    files = {output: sd_lora.to_kohya(tensors, sdxl)}
  if layout != FORMAT:  # the PyTorch world's format tag, our provenance beside it
    metadata |= {"format": "pt", "written_by": FORMAT}
  for file, part in files.items():
    file.write_bytes(save(part, metadata=metadata))  # the umask's permissions (save_file: 0600)
  return metadata | {"files": ", ".join(map(str, files))}


def run_adapter(workdir, config, step: int | None = None, use_ema: bool | None = None) -> Adapter:
  """The adapter of a LoRA run's (`config`: its, model.lora_rank > 0) checkpoint `step` (default: the latest; use_ema
  default: its sample.use_ema): its low-rank updates in float32, with what made them as metadata (export writes
  both)."""
  use_ema = config.sample.use_ema if use_ema is None else use_ema
  mngr = checkpoint.manager(workdir, read_only=True)
  step = mngr.latest_step() if step is None else step
  params, _ = finetune.abstract_parameters(config)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  wanted = {p: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=device) for p, x in params.items()
            if text_to_image.is_lora(p)}
  weights = checkpoint.restore_weights(workdir, -1 if step is None else step, use_ema,
                                       traverse_util.unflatten_dict(wanted), {}, "--workdir")
  metadata = {"format": FORMAT, "rank": str(config.model.lora_rank), "workdir": str(pathlib.Path(workdir).resolve()),
              "step": str(step), "ema": str(use_ema), "source_workdir": config.finetune.workdir,
              "config": json.dumps({k: json.loads(config[k].to_json_best_effort()) for k in finetune.MODEL_SECTIONS})}
  return Adapter(str(workdir), {name(p): np.asarray(x, np.float32) for p, x in weights.items()}, metadata)


def without_updates(config):
  """A LoRA run's config without its low-rank updates (model.lora_*): the model they adapt."""
  base = config.copy_and_resolve_references()
  base.model.update(lora_rank=0, lora_feed_forward=False, lora_convolutions=False, lora_text_encoder=False,
                    lora_modulation=False)
  return base


def layer_kind(update_name: str) -> str:
  """Which kind of layer an update adapts: 'temporal attention', 'self-attention', 'cross-attention',
  'feed-forward', 'convolution', 'temporal convolution', 'modulation', 'temporal modulation', (Wan's) 'embedding
  or output', 'text encoder' or (SD3's, Flux's) 'joint attention' (by its path)."""
  parts = update_name.split("/")
  if parts[0] == "text_encoder":  # a CLIP text encoder's (Stable Diffusion's)
    return "text encoder"
  if parts[0] in ("sd3", "flux"):  # attention over image and text tokens together; a feed-forward per stream (and
    # Flux's single blocks' MLP and output projection)
    feed_forward = {"ff", "ff_context", "proj_mlp_lora", "proj_out_lora"}
    return "feed-forward" if feed_forward & set(parts) else "joint attention"
  if parts[-2] in ("film_lora", "modulation_lora", "final_modulation_lora"):  # the embedding's scale and shift
    return "temporal modulation" if any(part.startswith("temporal") for part in parts) else "modulation"
  if parts[-2] in ("conv1_lora", "conv2_lora"):
    return "convolution"
  if parts[-2] in ("conv_lora", "conv_out_lora"):  # a video U-Net's temporal block's
    return "temporal convolution"
  if parts[-2] in ("proj_in_lora", "proj_out_lora") or "ffn" in parts or "ff" in parts:  # (Wan's: ffn; SD's: ff)
    return "feed-forward"
  if parts[0] in ("wan", "wan_low") and "blocks" not in parts:
    return "embedding or output"  # (Wan's time and text embedders and output projection)
  if any(part.startswith("temporal") for part in parts):
    return "temporal attention"
  return "cross-attention" if "cross_attn" in parts or "attn2" in parts else "self-attention"


def describe(adapter: Adapter) -> str:
  """A few lines on what an adapter holds: what made it (run, step, EMA, source run), the model it was made for
  (backbone, width, video or not), and per kind of layer the updates and weights."""
  m = adapter.metadata
  model = json.loads(m["config"])["model"] if "config" in m else {}
  kinds = {}
  for key, a in adapter.updates.items():
    if key.endswith("/lora_a"):
      b = adapter.updates[key.removesuffix("a") + "b"]
      count, weights = kinds.get(layer_kind(key), (0, 0))
      kinds[layer_kind(key)] = count + 1, weights + a.size + b.size
  ranks = sorted({a.shape[-1] for key, a in adapter.updates.items() if key.endswith("/lora_a")})
  lines = [f"{adapter.file}: rank {'/'.join(map(str, ranks))} LoRA updates of {sum(c for c, _ in kinds.values())} "
           f"layers, {sum(w for _, w in kinds.values()):,} weights",
           f"  made from: {m['workdir']} step {m.get('step', '?')} "
           f"({'EMA' if m.get('ema') == 'True' else 'trained weights'}), a LoRA of {m.get('source_workdir', '?')}"
           if "workdir" in m else f"  made elsewhere ({m.get('format', 'no provenance in its metadata')})"]
  if model:
    checkpoint = {"wan": f"Wan's transformer of {model.get('wan_path')}",
                  "sd_unet": f"Stable Diffusion's U-Net of {model.get('sd_unet_path')}",
                  "sd3": f"Stable Diffusion 3's transformer of {model.get('sd3_path')}",
                  "flux": f"Flux's transformer of {model.get('flux_path')}"}.get(model.get("backbone"))
    lines.append(f"  for a model: {checkpoint}" if checkpoint else
                 f"  for a model: {model.get('backbone', 'unet')}, channels {model.get('channels')}, "
                 f"{'video' if model.get('temporal') else 'image'}"
                 f"{', DiT depth ' + str(model.get('depth')) if model.get('backbone') == 'dit' else ''}")
  lines += [f"  {kind}: {count} layers, {weights:,} weights" for kind, (count, weights) in sorted(kinds.items())]
  return "\n".join(lines)


def define_flags():
  flags.DEFINE_string("workdir", None, "A LoRA fine-tune's workdir (model.lora_rank > 0).")
  flags.DEFINE_string("output", None, "Adapter file to write (.safetensors).")
  flags.DEFINE_integer("step", None, "Checkpoint step; default latest.")
  flags.DEFINE_bool("use_ema", None, "Export the first EMA copy (default: the run's sample.use_ema).")
  flags.DEFINE_string("inspect", None, "Print what this adapter file holds (instead of exporting one).")
  flags.DEFINE_enum("format", FORMAT, list(LAYOUTS), "The file's layout: ours, diffusers' (a LoRA of Wan's, "
                    "SD3's or Flux's transformer or Stable Diffusion's U-Net: their pipelines' load_lora_weights read "
                    "it) or kohya's "
                    "(a LoRA of SD's U-Net and text encoders, as sd-scripts writes them, for ComfyUI and "
                    "AUTOMATIC1111; of Flux's transformer in kohya's names for BFL's layers) or BFL's (Flux's "
                    "transformer in Black Forest Labs' own module names).")


def main(argv):
  del argv
  f = flags.FLAGS
  if f.inspect:
    cli.refuse(("workdir", "output", "step", "use_ema", "format"), "not used with --inspect, which reads an adapter "
               "file")
    try:
      print(describe(read(f.inspect, "--inspect")))
    except ValueError as error:
      print(f"error: {error}", file=sys.stderr)
      sys.exit(2)
    return
  if not f.workdir or not f.output:
    raise app.UsageError("--workdir and --output are required (or --inspect=FILE).")
  try:
    metadata = export(f.workdir, f.output, f.step, f.use_ema, f.format)
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  files = metadata["files"].split(", ")
  size = sum(pathlib.Path(file).stat().st_size for file in files)
  log.info("wrote the rank-%s updates of %s step %s (%s) to %s: %.0f KB", metadata["rank"], f.workdir,
           metadata["step"], "EMA" if metadata["ema"] == "True" else "trained weights", " and ".join(files),
           size / 1024)
  print("\n".join(files))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
