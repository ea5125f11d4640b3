"""Stable Diffusion LoRA files as the PyTorch world shares them, read into our low-rank updates (lora.py's
{'sd_unet/down_blocks/0/attentions/0/transformer_blocks/0/attn1/to_q_lora/lora_a': a [in, rank], ..._b: b [rank,
out]}: the kernel's update is a @ b), of the U-Net (model.backbone='sd_unet') and the CLIP text encoder; and our
U-Net and text-encoder updates written in diffusers' layout (`to_diffusers`) or kohya's (`to_kohya`).

- kohya's layout (sd-scripts; most shared SD LoRAs): 'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_
  attn1_to_q.lora_down.weight' [rank, in] and '...lora_up.weight' [out, rank], diffusers' module names with their
  dots written as underscores, the text encoder's as 'lora_te_text_model_encoder_layers_0_self_attn_q_proj...', an
  optional '...alpha' scaling the update by alpha / rank; convolutions too (LoCon: a 3x3 ResNet convolution's down
  [rank, in, 3, 3], up [out, rank, 1, 1]; a 1x1 projection's [rank, in, 1, 1]). SDXL's files (sd-scripts trains
  SDXL on the original SGM U-Net) name the U-Net's modules as that U-Net does ('lora_unet_input_blocks_4_1_
  transformer_blocks_0_attn1_to_q', 'output_blocks_2_0_in_layers_2', 'middle_block_1_proj_in'), numbered as SDXL's
  blocks are (2 ResNet blocks a level: `diffusers_parts`), and the text encoders' 'lora_te1_' and 'lora_te2_'.
- diffusers' (PEFT's) layout: 'unet.<module>.lora_A.weight' / 'lora_B.weight' and 'text_encoder.<module>...' (SDXL's
  and SD3's also 'text_encoder_2.'; SD3's and Flux's transformer 'transformer.<module>...', a name that does not say
  whose: read as 'transformer/...', which lora.resolved matches to the model's), scaled by the lora_alpha / r of each
  model's PEFT config in the file's metadata where there is one (else 1, as diffusers reads a file without one).
  SD 1.x, 2.x, SDXL, SD3 and Flux pipelines' load_lora_weights read it.

Which layers a file may update is our model's business: lora.check refuses updates of layers the model lacks or of
another shape (an SDXL LoRA on SD 1.5), naming them. Tensors that are not low-rank updates (biases, whole weights,
diffusers' old attention-processor names) are refused here, naming the keys.
"""

import numpy as np

from diffusion_jax import diffusers_lora

KOHYA_PREFIXES = {"lora_unet_": "sd_unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder/first",
                  "lora_te2_": "text_encoder/second"}  # (te1, te2: SDXL's pair, models/sdxl_text.py)
DIFFUSERS_PREFIXES = {"unet.": "sd_unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder/second",
                      "transformer.": "transformer"}  # (an MMDiT's, SD3's or Flux's: lora.resolved finds which)
SDXL_LAYERS_PER_BLOCK = 2  # the SGM U-Net's block numbers in SDXL's files count 2 ResNet blocks a level
# The SGM U-Net's names of modules outside its numbered blocks (a name's first parts) -> diffusers'
SGM_OUTER = {("input_blocks", "0", "0"): ["conv_in"], ("time_embed", "0"): ["time_embedding", "linear_1"],
             ("time_embed", "2"): ["time_embedding", "linear_2"],
             ("label_emb", "0", "0"): ["add_embedding", "linear_1"],
             ("label_emb", "0", "2"): ["add_embedding", "linear_2"], ("out", "2"): ["conv_out"]}
# ... and of layers inside a ResNet block or resampler (anywhere in a name)
SGM_INNER = {("in_layers", "2"): ["conv1"], ("out_layers", "3"): ["conv2"], ("emb_layers", "1"): ["time_emb_proj"],
             ("skip_connection",): ["conv_shortcut"], ("op",): ["conv"]}
# Module names that contain underscores (diffusers' U-Net, transformers' CLIP text model): kohya's names join every
# part with underscores, so these are matched as wholes, longest first.
NAMES = sorted({"down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
                "proj_in", "proj_out", "conv_shortcut", "time_emb_proj", "conv_in", "conv_out", "time_embedding",
                "linear_1", "linear_2", "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj",
                "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers",
                "skip_connection", "time_embed", "label_emb"},
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


def diffusers_parts(parts: list[str]) -> list[str]:
  """The parts of a module of SDXL's U-Net as the SGM U-Net names it -> diffusers' (other names unchanged):
  ['input_blocks', '4', '1', 'transformer_blocks', '0', ...] -> ['down_blocks', '1', 'attentions', '0',
  'transformer_blocks', '0', ...]. Input block 0 is conv_in, then each level's ResNet blocks (inner module 0; its
  transformer: 1) and downsampler; the middle block's ResNet, transformer, ResNet; each output block a level's
  ResNet (0), transformer (1) and, last, upsampler (2; 1 at a level without transformers, such as the SDXL
  refiner's outermost: ['output_blocks', '2', '1', 'conv'] -> ['up_blocks', '0', 'upsamplers', '0', 'conv'])."""
  n, (head, *rest) = SDXL_LAYERS_PER_BLOCK, parts
  if head == "input_blocks" and rest[:2] != ["0", "0"]:
    index, inner, *rest = rest
    level, block = divmod(int(index) - 1, n + 1)
    parts = ["down_blocks", str(level)] + (["downsamplers", "0"] if block == n else
                                           [("resnets", "attentions")[int(inner)], str(block)]) + rest
  elif head == "middle_block":
    index, *rest = rest
    parts = ["mid_block"] + [["resnets", "0"], ["attentions", "0"], ["resnets", "1"]][int(index)] + rest
  elif head == "output_blocks":
    index, inner, *rest = rest
    level, block = divmod(int(index), n + 1)
    upsampler = inner == "2" or (inner == "1" and rest[:1] == ["conv"])  # (a transformer has no `conv`)
    parts = ["up_blocks", str(level)] + (["upsamplers", "0"] if upsampler else
                                         [("resnets", "attentions")[int(inner)], str(block)]) + rest
  for old, new in SGM_OUTER.items():
    if tuple(parts[:len(old)]) == old:
      parts = new + parts[len(old):]
  for old, new in SGM_INNER.items():
    at = next((i for i in range(len(parts)) if tuple(parts[i:i + len(old)]) == old), None)
    if at is not None:
      parts = parts[:at] + new + parts[at + len(old):]
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


# Our models' updates -> the prefixes of their keys in diffusers' and kohya's layouts (SDXL, SD3: text_encoder/first,
# text_encoder/second; Flux: text_encoder/clip; SD3's and Flux's transformers have no kohya layout here)
WRITTEN = {"sd_unet": ("unet.", "lora_unet_"), "text_encoder": ("text_encoder.", "lora_te_"),
           "text_encoder/first": ("text_encoder.", "lora_te1_"),
           "text_encoder/second": ("text_encoder_2.", "lora_te2_"), "text_encoder/clip": ("text_encoder.", None),
           "sd3": ("transformer.", None), "flux": ("transformer.", None)}


def written_parts(name: str, x, layout: str) -> tuple[str, list[str], str]:
  """An update's name -> (its model in WRITTEN, its layer's parts without the _lora marks, 'lora_a' or 'lora_b'); a
  ValueError for what `layout` does not hold (convolutions' updates, other models')."""
  parts = name.split("/")
  model = "/".join(parts[:2]) if "/".join(parts[:2]) in WRITTEN else parts[0]
  if model not in WRITTEN or np.ndim(x) != 2 or WRITTEN[model][layout == "kohya"] is None:
    raise ValueError(f"{name}: only the updates of the dense layers of SD's U-Net, SD3's and Flux's transformers and "
                     f"CLIP text encoders are written in {layout}'s layout (kohya's: not the transformers'); write "
                     "this adapter in ours (--format=diffusion_jax.lora)")
  return model, [part.removesuffix("_lora") for part in parts[model.count("/") + 1:-1]], parts[-1]


def to_diffusers(updates: dict) -> dict:
  """Our updates {name: array} of SD's U-Net or SD3's or Flux's transformer, and text encoder(s) -> diffusers'
  (PEFT's) layout {key: float32 array}: 'unet.<module>.lora_A.weight' (or 'transformer.', 'text_encoder.', SDXL's and
  SD3's second 'text_encoder_2.') = a^T [rank, in] and
  '.lora_B.weight' = b^T [out, rank], at scale 1 (no alpha)."""
  tensors = {}
  for name, x in updates.items():
    model, parts, leaf = written_parts(name, x, "diffusers")
    tensors[f"{WRITTEN[model][0]}{'.'.join(parts)}.lora_{leaf[-1].upper()}.weight"] = np.ascontiguousarray(
        np.asarray(x, np.float32).T)
  return tensors


def sgm_parts(parts: list[str]) -> list[str]:
  """diffusers_parts' inverse for the modules of a transformer: ['down_blocks', '1', 'attentions', '0', ...] ->
  ['input_blocks', '4', '1', ...]; ['mid_block', 'attentions', '0', ...] -> ['middle_block', '1', ...]; ['up_blocks',
  '0', 'attentions', '2', ...] -> ['output_blocks', '2', '1', ...] (SDXL's numbering: 2 ResNet blocks a level)."""
  n = SDXL_LAYERS_PER_BLOCK
  if parts[0] == "mid_block" and parts[1] == "attentions":
    return ["middle_block", "1"] + parts[3:]
  if parts[0] in ("down_blocks", "up_blocks") and parts[2] == "attentions":
    level, block = int(parts[1]), int(parts[3])
    index = 1 + level * (n + 1) + block if parts[0] == "down_blocks" else level * (n + 1) + block
    return ["input_blocks" if parts[0] == "down_blocks" else "output_blocks", str(index), "1"] + parts[4:]
  raise ValueError(f"{'.'.join(parts)}: only the updates of SDXL's transformers are written in kohya's SDXL layout; "
                   "write this adapter in diffusers' (--format=diffusers)")


def to_kohya(updates: dict, sdxl: bool) -> dict:
  """Our updates {name: array} of SD's U-Net and text encoder(s) -> kohya's layout {key: float32 array}:
  'lora_unet_<module>.lora_down.weight' (or 'lora_te_', SDXL's 'lora_te1_' and 'lora_te2_') = a^T [rank, in],
  '.lora_up.weight' = b^T [out, rank] and '.alpha' = rank (scale 1), the module named as diffusers (transformers)
  names it with underscores or, an SDXL U-Net's, as the SGM U-Net does (sgm_parts), as sd-scripts writes them."""
  tensors = {}
  for name, x in updates.items():
    model, parts, leaf = written_parts(name, x, "kohya")
    module = WRITTEN[model][1] + "_".join(sgm_parts(parts) if sdxl and model == "sd_unet" else parts)
    x = np.ascontiguousarray(np.asarray(x, np.float32).T)
    tensors[f"{module}.lora_{'down' if leaf == 'lora_a' else 'up'}.weight"] = x
    if leaf == "lora_a":
      tensors[f"{module}.alpha"] = np.array(x.shape[0], np.float32)
  return tensors


def from_file(tensors: dict, metadata: dict | None = None) -> dict:
  """The updates {name: float32 array} of an SD LoRA file (its tensors and safetensors metadata) in kohya's or
  diffusers' layout, alpha / rank folded into a; a ValueError naming the keys that are not a layer's low-rank
  update."""
  pairs, alphas, scales, unread = {}, {}, {}, []
  sdxl = any(key.startswith("text_encoder_2.") for key in tensors)  # then text_encoder. is SDXL's first
  text_models = DIFFUSERS_PREFIXES | ({"text_encoder.": "text_encoder/first"} if sdxl else {})
  for key, value in tensors.items():
    value = np.asarray(value, np.float32)
    kohya = next((p for p in KOHYA_PREFIXES if key.startswith(p)), None)
    if kohya:
      layer, _, part = key.partition(".")
      parts = module_path(layer.removeprefix(kohya))
      module = update_module(KOHYA_PREFIXES[kohya], diffusers_parts(parts) if kohya == "lora_unet_" else parts)
      kind = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(part)
    else:
      prefix = next((p for p in DIFFUSERS_PREFIXES if key.startswith(p)), "")
      layer, _, part = key.removeprefix(prefix).rpartition(".lora_")
      module = update_module(text_models.get(prefix, ""), layer.split("."))
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
    updates[f"{module}/lora_a"], updates[f"{module}/lora_b"] = read_pair(module, pair, alphas.get(module),
                                                                         scales.get(module, 1.0))
  return updates


def read_pair(module: str, pair: dict, alpha: float | None, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
  """A file's {'down': ..., 'up': ...} of `module` -> our (a, b) (as_pair), scaled by alpha / rank where the file
  gives an alpha, else by `scale`; a ValueError for a down without its up, or the reverse."""
  if set(pair) != {"down", "up"}:
    raise ValueError(f"{module}: a down (lora_A) without its up (lora_B), or the reverse")
  return as_pair(pair["down"], pair["up"], alpha / pair["down"].shape[0] if alpha is not None else scale)
