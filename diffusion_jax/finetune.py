"""Fine-tuning: a run that starts from the weights of another run's checkpoint instead of random ones.

`finetune.workdir` names that run. Every parameter of its model (the trainable ones, or with `finetune.use_ema`
its first EMA copy, and the frozen ones: a pretrained text encoder, the autoencoder) is restored into the same
path of this run's model, placed directly with this run's shardings; the optimizer state, step count, learning-rate
schedule, EMA copies (of the restored weights) and input pipeline start afresh. So the data, the resolution (no
U-Net or DiT parameter depends on the image size), the optimizer, its schedule and the objective may differ from
the other run's; the parameters may not. Progressive resolution training (Imagen, Stable Diffusion) is a fine-tune
of a run at a lower resolution. With `model.lora_rank` the fine-tune is a LoRA: this model's low-rank updates
of its attention projections, which the other run's model lacks, start at zero and are all that trains
(models/layers.py `lora`). A video model from an image model is an inflation instead (models/inflation.py).
"""

import jax
from flax import nnx, traverse_util

from diffusion_jax import checkpoint
from diffusion_jax.models import text_to_image

MODEL_SECTIONS = ("model", "text", "latent")  # whose differences explain parameters that do not match


def text_problems(source_config, config) -> list[str]:
  """Why text ids of `config`'s tokenizer would not mean to a model trained with `source_config`'s what they
  meant there (empty when they would)."""
  found = []
  source_text, text = source_config.text, config.text
  if source_text.tokenizer != text.tokenizer:
    found.append(f"text.tokenizer differs ({source_text.tokenizer!r} vs {text.tokenizer!r})")
  elif source_text.tokenizer == "sentencepiece" and source_text.spiece_path != text.spiece_path:
    found.append(f"text.spiece_path differs ({source_text.spiece_path!r} vs {text.spiece_path!r})")
  elif source_text.tokenizer == "words":
    from diffusion_jax.text import tokenizers

    source_words = tokenizers.from_config(source_config).vocabulary
    if tokenizers.from_config(config).vocabulary[:len(source_words)] != source_words:
      found.append(f"the word vocabulary of data.dataset={config.data.dataset!r} does not extend that of "
                   f"{source_config.data.dataset!r}, so word ids would change meaning")
  return found


def abstract_parameters(config) -> tuple[dict, dict]:
  """({path: ShapeDtypeStruct} of the trainable parameters, the same of the frozen ones) of `config`'s model,
  nothing allocated."""
  _, params, frozen = text_to_image.split(text_to_image.abstract(config), config)
  flat = lambda state: traverse_util.flatten_dict(nnx.to_pure_dict(state))
  return flat(params), flat(frozen)


def placed(flat: dict, targets: dict) -> dict:
  """Nested ShapeDtypeStructs of `flat`'s paths and shapes with the dtype and sharding of `targets` at each path:
  where a restore puts each array."""
  return traverse_util.unflatten_dict({p: jax.ShapeDtypeStruct(x.shape, targets[p].dtype, sharding=targets[p].sharding)
                                       for p, x in flat.items()})


def mismatches(source: dict, target: dict) -> list[str]:
  """What keeps parameters `source` ({path: array-like}) from filling `target` path by path: paths only one
  has, shapes that differ."""
  name = lambda path: "/".join(map(str, path))
  found = [f"{name(p)} is only in this model" for p in target if p not in source]
  found += [f"{name(p)} is only in the other model" for p in source if p not in target]
  found += [f"{name(p)} has shape {tuple(source[p].shape)} there, {tuple(target[p].shape)} here"
            for p in source if p in target and tuple(source[p].shape) != tuple(target[p].shape)]
  return found


def abstract_targets(abstract_params: nnx.State, abstract_frozen: nnx.State, shardings) -> dict:
  """{path: ShapeDtypeStruct with sharding} of every parameter of a model, before it exists.
  shardings: (params, frozen) NamedShardings as pure dicts (sharding.state_shardings)."""
  targets = {}
  for state, placement in zip((abstract_params, abstract_frozen), shardings):
    flat_placement = traverse_util.flatten_dict(placement)
    for path, variable in nnx.to_flat_state(state):
      value = variable.get_value()
      targets[path] = jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=flat_placement[path])
  return targets


def load_weights(config, targets: dict) -> dict:
  """{path: jax.Array} of the checkpoint config.finetune names, each placed with this model's sharding at that
  path. targets: {path: ShapeDtypeStruct with sharding} of every parameter of this model (trainable and frozen).
  A run whose model differs is refused before anything is read, naming the parameters and config fields."""
  c = config.finetune
  source_config = checkpoint.read_config(c.workdir)
  if problems := text_problems(source_config, config):
    raise ValueError(f"finetune.workdir={c.workdir!r} cannot initialise this model: {'; '.join(problems)}.")
  source_params, source_frozen = abstract_parameters(source_config)
  source = source_params | source_frozen  # this model's new low-rank updates (model.lora_rank) start at nothing
  if found := mismatches(source, {p: t for p, t in targets.items() if p in source or not text_to_image.is_lora(p)}):
    sections = [k for k in checkpoint.config_differences(source_config, config) if k.split(".")[0] in MODEL_SECTIONS]
    hint = (" A video model from an image model: inflate.image_workdir."
            if config.model.temporal and not source_config.model.temporal else "")
    raise ValueError(f"The model in finetune.workdir={c.workdir!r} does not match this one: {'; '.join(found[:5])}"
                     f"{' ...' if len(found) > 5 else ''} (its config differs in: "
                     f"{'; '.join(sections) or 'no model field'}).{hint}")
  return checkpoint.restore_weights(c.workdir, c.step, c.use_ema, placed(source_params, targets),
                                    placed(source_frozen, targets), "finetune.workdir")


def start_from(weights: dict, params: dict, frozen: dict) -> tuple[dict, dict]:
  """(params, frozen) pure dicts of a freshly initialised model with every parameter replaced by `weights`'."""
  replace = lambda tree: traverse_util.unflatten_dict({p: weights.get(p, x)
                                                       for p, x in traverse_util.flatten_dict(tree).items()})
  return replace(params), replace(frozen)
