"""Flux LoRA files in Black Forest Labs' module names, as most shared Flux LoRAs come, read into our low-rank updates
of Flux's transformer (lora.py's {'flux/transformer_blocks/0/attn/to_q_lora/lora_a': a [in, rank], ..._b: b [rank,
out]}: the kernel's update is a @ b) and its CLIP text encoder.

- kohya's layout (sd-scripts, most trainers): 'lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight' [rank, in],
  '...lora_up.weight' [out, rank] and an optional '...alpha' scaling the update by alpha / rank; the CLIP text
  encoder's 'lora_te1_text_model_encoder_layers_0_self_attn_q_proj...'.
- BFL's own names (ComfyUI's, ai-toolkit's): 'diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight' (or
  lora_down) and '...lora_B.weight' (or lora_up), with an optional '...alpha'.

BFL's transformer fuses layers that diffusers' (and ours) keep apart: a double block's `img_attn.qkv` is the image
stream's query, key and value projections, its `txt_attn.qkv` the text stream's, and a single block's `linear1` the
query, key, value and MLP input projections side by side. An update of a fused layer (up @ down) is the updates of
its parts stacked, each its rows of `up` times the shared `down`: read as one update per part with the same a. Its
final modulation (`final_layer.adaLN_modulation.1`) gives (shift, scale) where diffusers' gives (scale, shift): the
halves of its update's rows are swapped. Tensors that are not low-rank updates of a layer named here are refused,
naming the keys.

Written (to_kohya, to_bfl: `lora --format=kohya` or `--format=bfl` of a Flux LoRA), a fused layer's parts' updates
become one of their summed ranks: down their a's stacked, up block-diagonal (a part without an update: zero rows),
so that up @ down is each part's update in its rows; BFL's names carry no alpha (scale 1), and the CLIP text
encoder's updates keep kohya's names beside them, as files in BFL's names come.
"""

import re

import numpy as np

from diffusion_jax import sd_lora

KOHYA_PREFIX, KOHYA_TEXT_PREFIX, BFL_PREFIX = "lora_unet_", "lora_te1_", "diffusion_model."
# BFL's layers -> diffusers' (inside a double block, a single block, or outside them); a fused layer's parts in order
DOUBLE = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "img_attn.proj": ("attn.to_out.0",),
          "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
          "txt_attn.proj": ("attn.to_add_out",), "img_mlp.0": ("ff.net.0.proj",), "img_mlp.2": ("ff.net.2",),
          "txt_mlp.0": ("ff_context.net.0.proj",), "txt_mlp.2": ("ff_context.net.2",),
          "img_mod.lin": ("norm1.linear",), "txt_mod.lin": ("norm1_context.linear",)}
SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",),
          "modulation.lin": ("norm.linear",)}
OUTER = {"img_in": ("x_embedder",), "txt_in": ("context_embedder",),
         "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
         "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
         "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
         "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
         "guidance_in.in_layer": ("time_text_embed.guidance_embedder.linear_1",),
         "guidance_in.out_layer": ("time_text_embed.guidance_embedder.linear_2",),
         "final_layer.linear": ("proj_out",), "final_layer.adaLN_modulation.1": ("norm_out.linear",)}
SWAPPED = "final_layer.adaLN_modulation.1"  # (shift, scale) in BFL's order, (scale, shift) in diffusers'
PART_WIDTHS = {"linear1": (1, 1, 1, 4)}  # a fused layer's parts' widths, in model widths (qkv: equal thirds)


def is_flux_lora(keys) -> bool:
  """Whether a file's tensor names are a Flux LoRA in kohya's or BFL's names."""
  return any(k.startswith((KOHYA_PREFIX + "double_blocks_", KOHYA_PREFIX + "single_blocks_",
                           BFL_PREFIX + "double_blocks.", BFL_PREFIX + "single_blocks.")) for k in keys)


def bfl_layer(key: str) -> tuple[str, str]:
  """A key -> (BFL's layer name, e.g. 'double_blocks.0.img_attn.qkv', or the text encoder's 'te:<kohya name>'; the
  rest: 'lora_down.weight', 'lora_A.weight', 'alpha', ...)."""
  if key.startswith(KOHYA_TEXT_PREFIX):
    layer, _, rest = key.partition(".")
    return "te:" + layer.removeprefix(KOHYA_TEXT_PREFIX), rest
  if key.startswith(BFL_PREFIX):
    name = key.removeprefix(BFL_PREFIX)
    if ".lora_" in name:
      layer, _, rest = name.rpartition(".lora_")
      return layer, "lora_" + rest
    layer, _, rest = name.rpartition(".")
    return layer, rest
  layer, _, rest = key.removeprefix(KOHYA_PREFIX).partition(".")
  for block in ("double_blocks", "single_blocks"):
    if match := re.fullmatch(rf"{block}_(\d+)_(\w+)", layer):
      inner = {name.replace(".", "_"): name for name in (DOUBLE if block == "double_blocks" else SINGLE)}
      return f"{block}.{match[1]}.{inner.get(match[2], match[2])}", rest
  return {name.replace(".", "_"): name for name in OUTER}.get(layer, layer), rest


def parts(layer: str) -> tuple[tuple[str, ...], tuple[int, ...]] | None:
  """BFL's layer -> (the diffusers layers it holds, their widths in model widths), or None when it is none of
  Flux's."""
  block, _, rest = layer.partition(".")
  number, _, inner = rest.partition(".")
  table = {"double_blocks": DOUBLE, "single_blocks": SINGLE}.get(block)
  if table is not None and number.isdigit() and inner in table:
    prefix = {"double_blocks": "transformer_blocks", "single_blocks": "single_transformer_blocks"}[block]
    names = tuple(f"{prefix}.{number}.{name}" for name in table[inner])
    return names, PART_WIDTHS.get(inner, (1,) * len(names))
  if layer in OUTER:
    return OUTER[layer], (1,)
  return None


def from_file(tensors: dict) -> dict:
  """The updates {name: float32 array} of a Flux LoRA file in kohya's or BFL's names, alpha / rank folded into a;
  a ValueError naming the keys that are not a low-rank update of a layer of Flux's transformer or CLIP encoder."""
  pairs, alphas, unread = {}, {}, []
  for key, value in tensors.items():
    layer, rest = bfl_layer(key)
    kind = {"lora_down.weight": "down", "lora_A.weight": "down", "lora_up.weight": "up", "lora_B.weight": "up",
            "alpha": "alpha"}.get(rest)
    if kind is None or not (layer.startswith("te:") or parts(layer)) or (kind != "alpha" and np.ndim(value) != 2):
      unread.append(key)
    elif kind == "alpha":
      alphas[layer] = float(np.asarray(value))
    else:
      pairs.setdefault(layer, {})[kind] = np.asarray(value, np.float32)
  if unread:
    raise ValueError(f"{len(unread)} tensors are not low-rank updates of a layer of Flux's transformer or CLIP text "
                     f"encoder in kohya's or BFL's names, e.g. {', '.join(unread[:3])}")
  updates = {}
  for layer, pair in pairs.items():
    a, b = sd_lora.read_pair(layer, pair, alphas.get(layer))
    if layer.startswith("te:"):
      module = sd_lora.update_module("text_encoder/clip", sd_lora.module_path(layer.removeprefix("te:")))
      updates[f"{module}/lora_a"], updates[f"{module}/lora_b"] = a, b
      continue
    if layer == SWAPPED:
      b = np.concatenate(np.split(b, 2, axis=1)[::-1], axis=1)
    names, widths = parts(layer)
    unit = b.shape[1] // sum(widths)
    for name, columns in zip(names, np.split(b, np.cumsum([w * unit for w in widths])[:-1], axis=1)):
      module = sd_lora.update_module("flux", name.split("."))
      updates[f"{module}/lora_a"], updates[f"{module}/lora_b"] = a, np.ascontiguousarray(columns)
  return updates


def bfl_part(name: str) -> tuple[str, int]:
  """A layer of diffusers' Flux transformer ('single_transformer_blocks.1.attn.to_k') -> (BFL's layer holding it,
  its part's index there): ('single_blocks.1.linear1', 1); a ValueError for a layer BFL's names do not hold."""
  for block, prefix, table in (("double_blocks", "transformer_blocks.", DOUBLE),
                               ("single_blocks", "single_transformer_blocks.", SINGLE)):
    number, _, inner = name.removeprefix(prefix).partition(".")
    if name.startswith(prefix) and number.isdigit():
      for layer, names in table.items():
        if inner in names:
          return f"{block}.{number}.{layer}", names.index(inner)
  for layer, names in OUTER.items():
    if name in names:
      return layer, 0
  raise ValueError(f"flux/{name}: no layer of Flux's in kohya's names holds it; write this adapter in diffusers' "
                   "layout (--format=diffusers)")


def to_kohya(updates: dict) -> dict:
  """Our updates {name: array} of Flux's transformer and its CLIP text encoder -> kohya's names {key: float32
  array}: 'lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight' [rank, in], '.lora_up.weight' [out, rank] and
  '.alpha' = rank (scale 1); a fused layer's parts stacked (module docstring), the final modulation's halves in BFL's
  (shift, scale) order; CLIP's 'lora_te1_text_model_...'."""
  tensors, layers = written_layers(updates)
  for layer, (down, up) in layers.items():
    key = KOHYA_PREFIX + layer.replace(".", "_")
    tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                    f"{key}.alpha": np.array(down.shape[0], np.float32)})
  return tensors


def to_bfl(updates: dict) -> dict:
  """Our updates {name: array} of Flux's transformer and its CLIP text encoder -> BFL's names {key: float32 array}:
  'diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight' [rank, in] and '.lora_B.weight' [out, rank] (no
  alpha: scale 1), laid out as to_kohya's; CLIP's in kohya's names ('lora_te1_text_model_...')."""
  tensors, layers = written_layers(updates)
  for layer, (down, up) in layers.items():
    tensors.update({f"{BFL_PREFIX}{layer}.lora_A.weight": down, f"{BFL_PREFIX}{layer}.lora_B.weight": up})
  return tensors


def written_layers(updates: dict) -> tuple[dict, dict]:
  """Our updates of Flux's transformer and its CLIP text encoder -> (the text encoder's in kohya's names {key:
  float32 array}, {BFL's layer: (down [rank, in], up [out, rank])}: a fused layer's parts stacked, the final
  modulation's halves in BFL's order)."""
  fused, tensors, layers = {}, {}, {}
  for name, x in updates.items():
    model, path, leaf = sd_lora.written_parts(name, x, "diffusers")
    if model == "text_encoder/clip":
      key = KOHYA_TEXT_PREFIX + "_".join(path)
      tensors[f"{key}.lora_{'down' if leaf == 'lora_a' else 'up'}.weight"] = np.ascontiguousarray(
          np.asarray(x, np.float32).T)
      if leaf == "lora_a":
        tensors[f"{key}.alpha"] = np.array(np.shape(x)[1], np.float32)
      continue
    layer, index = bfl_part(".".join(path))
    fused.setdefault(layer, {}).setdefault(index, {})[leaf] = np.asarray(x, np.float32)
  for layer, given in fused.items():
    _, widths = parts(layer)
    unit = next(pair["lora_b"].shape[1] // widths[i] for i, pair in given.items())
    starts = np.cumsum([0, *widths]) * unit
    down = np.concatenate([given[i]["lora_a"].T for i in sorted(given)])
    up, column = np.zeros((starts[-1], down.shape[0]), np.float32), 0
    for i in sorted(given):
      rank = given[i]["lora_a"].shape[1]
      up[starts[i]:starts[i + 1], column:column + rank] = given[i]["lora_b"].T
      column += rank
    if layer == SWAPPED:
      up = np.concatenate(np.split(up, 2)[::-1])
    layers[layer] = np.ascontiguousarray(down), up
  return tensors, layers
