"""LoRA files of Wan's transformer as the PyTorch world writes them, to and from our low-rank updates (lora.py's
{'wan/blocks/0/attn1/to_q_lora/lora_a': a [in, rank], ..._b: b [rank, out]}: the kernel's update is a @ b).

- diffusers' (PEFT's) layout, which `WanPipeline.load_lora_weights` reads: 'transformer.blocks.0.attn1.to_q.lora_A.
  weight' = a^T [rank, in] and '...lora_B.weight' = b^T [out, rank], named as diffusers names the layer (our Wan
  modules carry the same names: models/wan_transformer.py); the update is scaled by lora_alpha / r of the PEFT
  config diffusers may write into the file's metadata ('lora_adapter_metadata'), else by 1.
- Wan's original layout (ComfyUI's, most shared Wan LoRAs'): 'diffusion_model.blocks.0.self_attn.q.lora_down.weight'
  (or lora_A) and '...lora_up.weight' (or lora_B), with an optional '...alpha' that scales the update by
  alpha / rank; and musubi-tuner's, the same names flattened ('lora_unet_blocks_0_self_attn_q.lora_down.weight').

Each file holds one transformer's updates: a LoRA of Wan 2.2 A14B's pair of experts is two files (`per_expert`:
the high-noise expert's, and the low-noise one's, which diffusers loads with load_into_transformer_2=True), and
`from_file` reads a file into either (`expert`).

An image-to-video LoRA's updates of the image tokens' projections ('cross_attn.k_img' / 'v_img', diffusers'
'attn2.add_k_proj' / 'add_v_proj') and image embedder ('img_emb.proj.1' / '.3') are read as those of any layer.
Updates of biases or whole weights ('.diff', '.diff_b', '.lora_B.bias') are not low-rank updates of a kernel:
such files are refused, naming the keys.
"""

import json
import re

import numpy as np

PREFIX = "transformer."
EXPERTS = {"wan": "", "wan_low": "_low_noise"}  # our model's transformers -> the suffix of their files' names
ORIGINAL_PREFIX, MUSUBI_PREFIX = "diffusion_model.", "lora_unet_blocks_"
# Wan's original module names -> diffusers', inside a block ...
ORIGINAL_BLOCK_LAYERS = {**{f"{attention}.{o}": f"{ours}.{c}" for attention, ours in (("self_attn", "attn1"),
                                                                                       ("cross_attn", "attn2"))
                            for o, c in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))},
                         "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
                         # Wan 2.1 image-to-video's projections of the image tokens
                         "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj"}
# ... and outside the blocks
ORIGINAL_LAYERS = {"time_projection.1": "condition_embedder.time_proj", "head.head": "proj_out",
                   "text_embedding.0": "condition_embedder.text_embedder.linear_1",
                   "text_embedding.2": "condition_embedder.text_embedder.linear_2",
                   "time_embedding.0": "condition_embedder.time_embedder.linear_1",
                   "time_embedding.2": "condition_embedder.time_embedder.linear_2",
                   "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
                   "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2"}


def is_wan_lora(keys) -> bool:
  """Whether a file's tensor names are a Wan LoRA in diffusers' or Wan's original layout."""
  return any(k.startswith((PREFIX + "blocks.", ORIGINAL_PREFIX, MUSUBI_PREFIX)) for k in keys)


def update_module(layer: str, expert: str = "wan") -> str:
  """Our update's module of a diffusers layer name: 'blocks.0.attn1.to_out.0' -> 'wan/blocks/0/attn1/to_out_lora/0'
  (the last named part marked _lora; lora.kernel_of undoes it), in `expert` ('wan_low': the low-noise expert)."""
  parts = layer.split(".")
  last = max(i for i, part in enumerate(parts) if not part.isdigit())
  return "/".join([expert] + parts[:last] + [parts[last] + "_lora"] + parts[last + 1:])


def diffusers_layer(update_name: str) -> str:
  """update_module's inverse: 'wan/blocks/0/attn1/to_out_lora/0/lora_a' -> 'blocks.0.attn1.to_out.0' (or an
  update of the low-noise expert, 'wan_low/...')."""
  parts = update_name.split("/")
  if parts[0] not in EXPERTS:
    raise ValueError(f"{update_name} is not an update of Wan's transformer: only Wan LoRAs have a diffusers layout")
  return ".".join(part.removesuffix("_lora") for part in parts[1:-1])


def to_diffusers(updates: dict) -> dict:
  """One transformer's updates {name: array} -> diffusers' {key: float32 array} (a^T as lora_A, b^T as lora_B)."""
  return {f"{PREFIX}{diffusers_layer(name)}.lora_{name[-1].upper()}.weight": np.ascontiguousarray(
      np.asarray(x, np.float32).T) for name, x in updates.items()}


def per_expert(updates: dict) -> dict:
  """{file name suffix: diffusers' tensors}: one file's for each transformer the updates adapt ('' for model.
  wan_path's, '_low_noise' for model.wan_low_noise_path's)."""
  return {suffix: to_diffusers({n: x for n, x in updates.items() if n.split("/")[0] == expert})
          for expert, suffix in EXPERTS.items() if any(n.split("/")[0] == expert for n in updates)}


def original_name(key: str) -> str:
  """A key of musubi-tuner's layout -> Wan's original ('lora_unet_blocks_3_self_attn_q.lora_down.weight' ->
  'blocks.3.self_attn.q.lora_down.weight'); others without their 'diffusion_model.'."""
  if not key.startswith(MUSUBI_PREFIX):
    return key.removeprefix(ORIGINAL_PREFIX)
  module, dot, rest = key.removeprefix("lora_unet_").partition(".")
  match = re.fullmatch(r"blocks_(\d+)_(self_attn|cross_attn|ffn)_(\w+)", module)
  return (f"blocks.{match[1]}.{match[2]}.{match[3]}" if match else module) + dot + rest


def diffusers_name(key: str) -> str:
  """A key of Wan's original (or musubi-tuner's) layout -> diffusers' ('diffusion_model.blocks.3.self_attn.q.
  lora_down.weight' -> 'blocks.3.attn1.to_q.lora_A.weight'); unchanged past its prefix when it names nothing of
  ours."""
  key = original_name(key).replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B.")
  parts = key.split(".")
  inner = 2 if parts[0] == "blocks" else 0
  for layers in (ORIGINAL_BLOCK_LAYERS, ORIGINAL_LAYERS):
    for original, name in layers.items():
      width = original.count(".") + 1
      if ".".join(parts[inner:inner + width]) == original:
        return ".".join(parts[:inner] + [name] + parts[inner + width:])
  return key


def peft_scale(metadata: dict, prefix: str = PREFIX) -> float:
  """lora_alpha / r of the PEFT config diffusers writes into a LoRA file's metadata (its keys bare, or prefixed by
  a pipeline's save_lora_weights with the model's name: 'transformer.', SD's 'unet.' or 'text_encoder.'); 1 without
  one."""
  config = json.loads((metadata or {}).get("lora_adapter_metadata") or "{}")
  field = lambda name: config.get(f"{prefix}{name}", config.get(name))
  if field("alpha_pattern") or field("rank_pattern"):
    raise ValueError("its LoRA config gives some layers their own alpha or rank (alpha_pattern, rank_pattern), "
                     "which is not read")
  return field("lora_alpha") / field("r") if field("lora_alpha") and field("r") else 1.0


def from_file(tensors: dict, metadata: dict | None = None, expert: str = "wan") -> dict:
  """The updates {name: float32 array} of a Wan LoRA file (its tensors and safetensors metadata) in diffusers' or
  Wan's original layout (alpha / rank folded into a), of `expert` ('wan_low': the low-noise expert); a ValueError
  naming the keys that are not a kernel's low-rank update."""
  original = any(k.startswith((ORIGINAL_PREFIX, MUSUBI_PREFIX)) for k in tensors)
  default_scale = peft_scale(metadata)
  named = {(diffusers_name(k) if original else k.removeprefix(PREFIX)): np.asarray(v, np.float32)
           for k, v in tensors.items()}
  alphas = {k.removesuffix(".alpha"): v.item() for k, v in named.items() if k.endswith(".alpha")}
  updates, unread = {}, []
  for key, value in named.items():
    layer, _, part = key.rpartition(".lora_")
    if part not in ("A.weight", "B.weight") or value.ndim != 2:
      unread += [] if key.endswith(".alpha") else [key]
      continue
    a = part == "A.weight"
    scale = (alphas[layer] / value.shape[0] if layer in alphas else default_scale) if a else 1.0  # (rank: A's rows)
    updates[f"{update_module(layer, expert)}/lora_{'a' if a else 'b'}"] = value.T * np.float32(scale)
  if unread:
    raise ValueError(f"{len(unread)} tensors are not low-rank updates of a layer of Wan's transformer (updates of "
                     f"biases or whole weights), e.g. {', '.join(unread[:3])}")
  return updates
