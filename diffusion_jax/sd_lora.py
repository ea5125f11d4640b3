"""Stable Diffusion LoRA files as the PyTorch world shares them, read into our low-rank updates (lora.py's
{'sd_unet/down_blocks/0/attentions/0/transformer_blocks/0/attn1/to_q_lora/lora_a': a [in, rank], ..._b: b [rank,
out]}: the kernel's update is a @ b), of the U-Net (model.backbone='sd_unet') and the CLIP text encoder; and our
U-Net updates written in diffusers' layout (`to_diffusers`).

- kohya's layout (sd-scripts; most shared SD LoRAs): 'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_
  attn1_to_q.lora_down.weight' [rank, in] and '...lora_up.weight' [out, rank], diffusers' module names with their
  dots written as underscores, the text encoder's as 'lora_te_text_model_encoder_layers_0_self_attn_q_proj...', an
  optional '...alpha' scaling the update by alpha / rank; convolutions too (LoCon: a 3x3 ResNet convolution's down
  [rank, in, 3, 3], up [out, rank, 1, 1]; a 1x1 projection's [rank, in, 1, 1]).
- diffusers' (PEFT's) layout: 'unet.<module>.lora_A.weight' / 'lora_B.weight' and 'text_encoder.<module>...',
  scaled by the lora_alpha / r of each model's PEFT config in the file's metadata where there is one (else 1, as
  diffusers reads a file without one). SD 1.x, 2.x and SDXL pipelines' load_lora_weights read it.

Which layers a file may update is our model's business: lora.check refuses updates of layers the model lacks or of
another shape (an SDXL LoRA on SD 1.5), naming them. Tensors that are not low-rank updates (biases, whole weights,
diffusers' old attention-processor names) are refused here, naming the keys.
"""

import numpy as np

from diffusion_jax import diffusers_lora

KOHYA_PREFIXES = {"lora_unet_": "sd_unet", "lora_te_": "text_encoder"}
DIFFUSERS_PREFIXES = {"unet.": "sd_unet", "text_encoder.": "text_encoder"}
# Module names that contain underscores (diffusers' U-Net, transformers' CLIP text model): kohya's names join every
# part with underscores, so these are matched as wholes, longest first.
NAMES = sorted({"down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
                "proj_in", "proj_out", "conv_shortcut", "time_emb_proj", "conv_in", "conv_out", "time_embedding",
                "linear_1", "linear_2", "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj"},
               key=lambda name: -name.count("_"))


def is_sd_lora(keys) -> bool:
  """Whether a file's tensor names are an SD LoRA in kohya's or diffusers' layout (not a Wan one)."""
  return not diffusers_lora.is_wan_lora(keys) and any(
      k.startswith(tuple(KOHYA_PREFIXES) + tuple(DIFFUSERS_PREFIXES)) for k in keys)


def module_path(kohya: str) -> list[str]:
  """kohya's flattened module name -> its parts: 'down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0' ->
  ['down_blocks', '0', 'attentions', '0', 'transformer_blocks', '0', 'attn1', 'to_out', '0']."""
  parts = []
  while kohya:
    name = next((n for n in NAMES if kohya == n or kohya.startswith(n + "_")), None) or kohya.split("_")[0]
    parts.append(name)
    kohya = kohya[len(name) + 1:]
  return parts


def update_module(model: str, parts: list[str]) -> str:
  """Our update's module of a layer's parts in `model` ('sd_unet' or 'text_encoder'): the last named part marked
  _lora ('to_out', '0' -> 'to_out_lora', '0'; lora.kernel_of undoes it)."""
  last = max(i for i, part in enumerate(parts) if not part.isdigit())
  return "/".join([model] + parts[:last] + [parts[last] + "_lora"] + parts[last + 1:])


def as_pair(down, up, scale: float) -> tuple[np.ndarray, np.ndarray]:
  """PyTorch's down [rank, in(, kh, kw)] and up [out, rank(, 1, 1)] -> our a [(kh, kw,) in, rank] (scaled), b [rank,
  out]."""
  a = down.T if down.ndim == 2 else down.transpose(2, 3, 1, 0)
  b = (up if up.ndim == 2 else up[:, :, 0, 0]).T
  return np.ascontiguousarray(a * np.float32(scale)), np.ascontiguousarray(b)


def to_diffusers(updates: dict) -> dict:
  """Our U-Net updates {name: array} -> diffusers' (PEFT's) layout {key: float32 array}: 'unet.<module>.lora_A.weight'
  = a^T [rank, in] and '.lora_B.weight' = b^T [out, rank], at scale 1 (no alpha); a ValueError for updates of other
  than the dense layers of SD's U-Net."""
  tensors = {}
  for name, x in updates.items():
    model, *parts, leaf = name.split("/")
    if model != "sd_unet" or np.ndim(x) != 2:
      raise ValueError(f"{name}: only the updates of SD's U-Net's dense layers are written in diffusers' layout")
    layer = ".".join(part.removesuffix("_lora") for part in parts)
    tensors[f"unet.{layer}.lora_{leaf[-1].upper()}.weight"] = np.ascontiguousarray(np.asarray(x, np.float32).T)
  return tensors


def from_file(tensors: dict, metadata: dict | None = None) -> dict:
  """The updates {name: float32 array} of an SD LoRA file (its tensors and safetensors metadata) in kohya's or
  diffusers' layout, alpha / rank folded into a; a ValueError naming the keys that are not a layer's low-rank
  update."""
  pairs, alphas, scales, unread = {}, {}, {}, []
  for key, value in tensors.items():
    value = np.asarray(value, np.float32)
    kohya = next((p for p in KOHYA_PREFIXES if key.startswith(p)), None)
    if kohya:
      layer, _, part = key.partition(".")
      module = update_module(KOHYA_PREFIXES[kohya], module_path(layer.removeprefix(kohya)))
      kind = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(part)
    else:
      prefix = next((p for p in DIFFUSERS_PREFIXES if key.startswith(p)), "")
      layer, _, part = key.removeprefix(prefix).rpartition(".lora_")
      module = update_module(DIFFUSERS_PREFIXES.get(prefix, ""), layer.split("."))
      kind = {"A.weight": "down", "B.weight": "up"}.get(part) if prefix else None
      scales[module] = diffusers_lora.peft_scale(metadata, prefix) if prefix else 1.0
    if kind == "alpha":
      alphas[module] = value.item()
    elif kind is None or value.ndim not in (2, 4):
      unread.append(key)
    else:
      pairs.setdefault(module, {})[kind] = value
  if unread:
    raise ValueError(f"{len(unread)} tensors are not low-rank updates of a layer of SD's U-Net or text encoder "
                     f"(updates of biases or whole weights, or another layout), e.g. {', '.join(unread[:3])}")
  updates = {}
  for module, pair in pairs.items():
    if set(pair) != {"down", "up"}:
      raise ValueError(f"{module}: a down (lora_A) without its up (lora_B), or the reverse")
    rank = pair["down"].shape[0]
    a, b = as_pair(pair["down"], pair["up"], alphas[module] / rank if module in alphas else scales.get(module, 1.0))
    updates[f"{module}/lora_a"], updates[f"{module}/lora_b"] = a, b
  return updates
