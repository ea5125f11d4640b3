"""Check an experiment config before anything compiles; all problems are reported in one error."""

import jax

from diffusion_jax import distillation, editing, objectives, optimizer, samplers, schedules, sharding
from diffusion_jax.data import captioned_shapes, moving_shapes, pipeline
from diffusion_jax.models import (attention, autoencoder, clip, flux_transformer, layers, redux, sd3_transformer,
                                  sd_unet, t5, text_to_image, wan_transformer)
from diffusion_jax.text import tokenizers

BUILT_IN_DATASETS = ("captioned_shapes", "moving_shapes")  # drawn here, at 16, 32 or 64 px squares


def network_frames(config, frames: int) -> int:
  """Frames of what a video model diffuses for clips of `frames` frames (a causal autoencoder's latent frames)."""
  path = config.latent.autoencoder_path
  try:
    return autoencoder.latent_frames(autoencoder.read_config(path), frames) if path else frames
  except ValueError:  # latent_problems says why
    return frames


def tubelet_problems(config) -> list[str]:
  """Why model.temporal_patch_size (frames per token) does not fit the model or the clips."""
  t = config.model.temporal_patch_size
  if t == 1:
    return []
  if t < 1:
    return [f"model.temporal_patch_size={t} must be >= 1"]
  found = []
  if config.model.video_attention != "spacetime":
    found.append(f"model.temporal_patch_size={t} makes tokens of several frames, which only a spacetime DiT's "
                 "attention reads (model.video_attention='spacetime'; the factorised model attends frame by frame)")
  for field, frames in (("data.frames", config.data.frames), ("sample.frames", config.sample.frames)):
    if (network := network_frames(config, frames)) % t:
      latent = f" ({network} latent frames)" if network != frames else ""
      found.append(f"{field}={frames}{latent} must be a multiple of model.temporal_patch_size={t}")
  return found


def sequence_problems(config, sequence: int, clips=None) -> list[str]:
  """Why mesh.sequence (the devices a video model's frames, or Wan's tokens, are split over) does not fit the
  clips (field, frames) (default: data.frames and sample.frames)."""
  if sequence == 1:
    return []
  m = config.model
  if not m.temporal:
    return [f"mesh.sequence={sequence} splits a video model's frames over devices; an image model has none: "
            "use mesh.data or mesh.fsdp"]
  found = []
  for field, frames in clips or (("data.frames", config.data.frames), ("sample.frames", config.sample.frames)):
    network = network_frames(config, frames)
    latent = f" ({network} latent frames)" if network != frames else ""
    if frames and m.backbone == "wan":
      try:
        patch = wan_transformer.read_config(m.wan_path)["patch_size"]
        factor = autoencoder.downsampling_factor(autoencoder.read_config(config.latent.autoencoder_path)) if (
            config.latent.autoencoder_path) else 1
      except ValueError:  # wan_problems and latent_problems say why
        continue
      height, width = pipeline.image_size(config.data)
      tokens = network // patch[0] * (height // factor // patch[1]) * (width // factor // patch[2])
      if tokens % sequence:
        found.append(f"{field}={frames}{latent} makes {tokens} tokens a clip in Wan's transformer, which "
                     f"mesh.sequence={sequence} devices do not divide")
    elif frames and (network // m.temporal_patch_size) % sequence:
      rows = (f"{network // m.temporal_patch_size} tubelets of {m.temporal_patch_size} frames" if
              m.temporal_patch_size > 1 else f"{network} frames")
      found.append(f"{field}={frames}{latent}: a clip's {rows} must be a multiple of mesh.sequence={sequence}")
  return found


def held_out(data_config) -> bool:
  """Whether the data hold a validation split (pipeline.holds_split): a folder's only with data.eval_captions_file,
  a TFDS dataset's where its dataset_info lists one, the built-in datasets' always."""
  return pipeline.holds_split(data_config, "validation")


def training_sample_problems(config) -> list[str]:
  """Why the run's training samples (train.sample_every, train.sample_at_end) cannot be made: a super-resolution
  stage's start at held-out images, an image-to-video model's at held-out clips' first frames and FLUX.1 Depth /
  Canny's at held-out control images, which data without a validation split lack (found before training, not at
  the first sample)."""
  t, d = config.train, config.data
  if not (t.sample_every or t.sample_at_end):
    return []
  try:
    if config.model.lowres_conditioning:
      reads = "a super-resolution stage's training samples start at held-out images"
    elif text_to_image.image_to_video(config):
      reads = "an image-to-video model's training samples start at held-out clips' first frames"
    elif d.reference_key and text_to_image.flux_control(config):
      reads = "FLUX.1 Depth / Canny's training samples read held-out control images"
    else:
      return []
  except ValueError:  # (wan_problems, flux_problems name the path)
    return []
  if held_out(d):  # (read only here: a TFDS dataset's dataset_info)
    return []
  lacks = (f"TFDS dataset {d.name!r} in {d.data_dir!r} has no 'validation' split" if d.dataset == "tfds" else
           "this folder has none: give data.eval_captions_file (a captions file of held-out files)")
  instead = ("in a cascade above the stage below (sample --cascade)" if config.model.lowres_conditioning else
             "with `sample --init_image`")
  return [f"train.sample_every, train.sample_at_end: {reads}, but {lacks}; or set train.sample_every=0 and "
          f"train.sample_at_end=False and sample the run's checkpoints {instead}"]


def reference_problems(config) -> list[str]:
  """Why data.reference_key (FLUX.1 Kontext's edit pairs, FLUX.1 Depth / Canny's control images) cannot be trained
  on with this config."""
  d = config.data
  if not d.reference_key:
    return []
  found, control = [], False
  if config.model.backbone == "flux":
    try:
      control = flux_transformer.is_control(flux_transformer.read_config(config.model.flux_path))
    except ValueError:
      pass  # (flux_problems names the path)
  if not (config.model.flux_kontext or control):
    found.append(f"data.reference_key={d.reference_key!r}: reference images are read by FLUX.1 Kontext "
                 "(model.flux_kontext) and control images by FLUX.1 Depth / Canny; this model reads neither: leave "
                 "it empty")
  if d.dataset in ("folder", "folder_clips") and (d.dataset == "folder_clips" or d.reference_key != "reference"):
    found.append(f"data.reference_key={d.reference_key!r}: a folder of images holds its edit pairs' references as "
                 "'reference' (folder_dataset --references): set data.reference_key='reference'; a folder of clips "
                 "has none: leave it empty")
  if config.latent.cache:
    found.append("data.reference_key with latent.cache: the cache holds the images' latents alone; leave "
                 "latent.cache empty")
  return found


def latent_problems(config) -> list[str]:
  """What a latent diffusion model (latent.autoencoder_path) cannot do with this config."""
  try:
    vae = autoencoder.read_config(config.latent.autoencoder_path)
  except ValueError as error:
    return [str(error)]
  found = []
  if (channels := autoencoder.image_channels(vae)) != (3, 3):
    found.append(f"the autoencoder maps {channels[0]}-channel images to {channels[1]}-channel ones; "
                 "the data are RGB (3)")
  if config.model.in_channels != vae["latent_channels"]:
    found.append(f"model.in_channels={config.model.in_channels} must equal the autoencoder's latent_channels="
                 f"{vae['latent_channels']}")
  if config.sample.threshold != "none":
    found.append(f"sample.threshold={config.sample.threshold!r} would clip latents, which are not in [-1, 1]: set "
                 "sample.threshold='none'")
  if config.superres.residual:
    found.append("superres.residual adds detail to the upsampled low-resolution image in pixels; a latent stage "
                 "diffuses latents: turn superres.residual off or leave latent.autoencoder_path empty")
  views = [f"data.{f}" for f in ("random_crop", "random_flip") if config.data[f]]
  views += ["data.image_fraction > 0"] if config.data.image_fraction > 0 else []
  if config.latent.cache and views:
    found.append(f"latent.cache holds one view of each example, but {' and '.join(views)} make new ones every "
                 "epoch: turn them off or leave latent.cache empty")
  if autoencoder.is_causal(vae) and config.model.temporal:
    for field, frames in (("data.frames", config.data.frames), ("sample.frames", config.sample.frames)):
      found += [problem] if frames and (problem := autoencoder.frames_problem(vae, field, frames)) else []
    if config.superres.lowres_frames:
      found.append("superres.lowres_frames: a temporal super-resolution stage on a causal autoencoder's latents "
                   "is not supported; leave superres.lowres_frames at 0")
  return found


def text_width(config) -> int:
  """The width of the text encoder's states: a pretrained one's (text.pretrained_path: a T5's d_model, a CLIP text
  model's hidden_size; with text.second_encoder_path, SDXL's, both CLIP models' summed), else text.t5.d_model; a
  ValueError where its config.json cannot be read."""
  path = config.text.pretrained_path
  if config.text.second_encoder_path:
    return (clip.read_text_config(path)["hidden_size"]
            + clip.read_text_config(config.text.second_encoder_path, "text.second_encoder_path")["hidden_size"])
  if path and clip.is_text_model(path):
    return clip.read_text_config(path)["hidden_size"]
  return t5.read_hf_config(path).d_model if path else config.text.t5.d_model


def network_size_problems(config) -> list[str]:
  """Why a U-Net or DiT built from the config's sizes (and the T5 it trains from scratch) cannot be: a width or
  count below 1, a dropout rate outside [0, 1), a U-Net's attention width model.heads does not divide (a DiT's:
  dit_problems); and a text length below 1."""
  m, found = config.model, []
  if config.text.max_length < 1:
    found.append(f"text.max_length={config.text.max_length} must be >= 1")
  if m.backbone not in ("unet", "dit"):
    return found
  sizes = [("model.channels", m.channels), ("model.heads", m.heads), ("model.ff_mult", m.ff_mult)]
  if not config.text.pretrained_path:
    sizes += [(f"text.t5.{key}", config.text.t5[key]) for key in ("d_model", "d_kv", "d_ff", "num_heads",
                                                                   "num_buckets")]
  found += [f"{field}={value} must be >= 1" for field, value in sizes if value < 1]
  if not 0 <= m.dropout < 1:
    found.append(f"model.dropout={m.dropout} must be in [0, 1)")
  if m.channels < 1 or m.heads < 1 or m.backbone == "dit":  # (dit_problems: the DiT's width)
    return found
  levels = set(m.attention_levels) | {len(m.channel_mults) - 1} | (set(range(len(m.channel_mults))) if m.temporal
                                                                    else set())
  widths = sorted({m.channels * m.channel_mults[level] for level in levels if 0 <= level < len(m.channel_mults)})
  if undivided := [width for width in widths if width % m.heads]:
    found.append(f"model.heads={m.heads} must divide every attention width (model.channels x model.channel_mults "
                 f"at the attention levels, the middle's, a video model's every level): not {undivided}")
  return found


def tokenizer_problems(config) -> list[str]:
  """Why the tokenizer (text.tokenizer 'words' or 'sentencepiece') cannot serve the config: the words tokenizer on
  data other than the built-in datasets', a sentencepiece tokenizer without its model, or ids without an embedding
  in the U-Net's or DiT's T5 encoder (text.t5.vocab_size, or a pretrained T5's, text.pretrained_path): they would
  embed as NaN."""
  t = config.text
  if t.tokenizer == "words" and config.data.dataset not in BUILT_IN_DATASETS:
    return [f"text.tokenizer='words' knows only the built-in datasets' words ({', '.join(BUILT_IN_DATASETS)}), not "
            f"the captions of data.dataset={config.data.dataset!r}: use text.tokenizer='sentencepiece' with "
            "text.spiece_path (a T5's spiece.model), or 'clip'"]
  if t.tokenizer == "sentencepiece" and not t.spiece_path:
    return ["text.tokenizer='sentencepiece' needs text.spiece_path, a local spiece.model (a T5's; or one trained on "
            "the captions: tokenizers.train_sentencepiece)"]
  if config.model.backbone not in ("unet", "dit") or t.tokenizer not in ("words", "sentencepiece"):
    return []
  try:
    if t.pretrained_path and clip.is_text_model(t.pretrained_path):
      return []  # (clip_text_problems: a CLIP encoder reads CLIP's tokens)
    embedded, field = ((t5.read_hf_config(t.pretrained_path).vocab_size, "text.pretrained_path's T5 vocab_size")
                       if t.pretrained_path else (t.t5.vocab_size, "text.t5.vocab_size"))
    ids = tokenizers.from_config(config).vocab_size
  except ValueError:  # (an unreadable tokenizer or encoder says why where it is read)
    return []
  if ids <= embedded:
    return []
  made_by = "text.spiece_path's model" if t.tokenizer == "sentencepiece" else f"{config.data.dataset}'s words"
  return [f"{field}={embedded}: the tokenizer ({made_by}) makes {ids} ids, and those beyond the encoder's embedding "
          f"table would embed as NaN; set text.t5.vocab_size >= {ids} (a model trained from scratch) or give a "
          "tokenizer of the encoder's vocabulary"]


def clip_text_problems(config) -> list[str]:
  """Why a CLIP text encoder (text.pretrained_path) or tokenizer (text.tokenizer='clip') does not fit the config."""
  t, found = config.text, []
  if t.tokenizer == "clip":
    try:
      tokenizers.CLIPTokenizer(t.tokenizer_path, t.max_length)
    except ValueError as error:
      found.append(str(error))
  if t.pretrained_path and clip.is_text_model(t.pretrained_path):
    try:
      positions = clip.read_text_config(t.pretrained_path)["max_position_embeddings"]
    except ValueError as error:
      return found + [str(error)]
    if t.tokenizer != "clip":
      found.append(f"text.tokenizer={t.tokenizer!r}: a CLIP text encoder (text.pretrained_path) reads CLIP's tokens; "
                   "set text.tokenizer='clip' and text.tokenizer_path (SD's tokenizer/ folder)")
    if t.max_length > positions:
      found.append(f"text.max_length={t.max_length} exceeds the CLIP text encoder's {positions} positions")
  return found + sdxl_text_problems(config)


def sdxl_text_problems(config) -> list[str]:
  """Why SDXL's second text encoder and tokenizer (text.second_encoder_path, text.second_tokenizer_path) do not fit."""
  t = config.text
  if not (t.second_encoder_path or t.second_tokenizer_path):
    return []
  if not (t.second_encoder_path and t.second_tokenizer_path and t.tokenizer == "clip"):
    return ["text.second_encoder_path and text.second_tokenizer_path go together (SDXL's text_encoder_2/ and "
            "tokenizer_2/), with text.tokenizer='clip'"]
  if not (t.pretrained_path and clip.is_text_model(t.pretrained_path)):
    return [f"text.second_encoder_path is SDXL's second text encoder: text.pretrained_path={t.pretrained_path!r} "
            "must hold its first, a CLIPTextModel (text_encoder/)"]
  try:
    second = clip.read_text_config(t.second_encoder_path, "text.second_encoder_path")
    tokenizers.CLIPTokenizer(t.second_tokenizer_path, t.max_length, "text.second_tokenizer_path")
  except ValueError as error:
    return [str(error)]
  return ([f"text.max_length={t.max_length} exceeds the second CLIP text encoder's "
           f"{second['max_position_embeddings']} positions"] if t.max_length > second["max_position_embeddings"]
          else [])


def wan_problems(config) -> list[str]:
  """What Wan's transformer (model.backbone='wan', model.wan_path) cannot do with this config."""
  m, d, found = config.model, config.diffusion, []
  try:
    wan = wan_transformer.read_config(m.wan_path)
    text_dim = text_width(config)
  except ValueError as error:
    return [str(error)]
  if (d.path, d.prediction) != ("flow", "flow"):
    found.append(f"diffusion.path={d.path!r}, diffusion.prediction={d.prediction!r}: Wan's transformer predicts the "
                 "velocity eps - x0 on the flow path; set both to 'flow'")
  if not m.temporal:
    found.append("model.temporal=False: Wan's transformer is a video model; set model.temporal=True")
  found += wan_channel_problems(config, wan) + wan_image_encoder_problems(m, wan) + clean_first_frame_problems(
      config, wan)
  if text_dim != wan["text_dim"]:
    found.append(f"the text encoder's width {text_dim} (text.pretrained_path's, or text.t5.d_model) must "
                 f"equal Wan's text_dim={wan['text_dim']} (its text encoder: UMT5-XXL, 4096)")
  frames_patch = wan["patch_size"][0]
  for field, frames in (("data.frames", config.data.frames), ("sample.frames", config.sample.frames)):
    if frames and network_frames(config, frames) % frames_patch:
      found.append(f"{field}={frames}: the network's frames must be a multiple of Wan's patch_size in time "
                   f"({frames_patch})")
  unsupported = [field for field, value in (("model.lowres_conditioning", m.lowres_conditioning),
                                            ("data.image_fraction", config.data.image_fraction),
                                            ("model.lora_modulation", m.lora_modulation)) if value]
  if unsupported:
    found.append(f"{', '.join(unsupported)}: not supported with model.backbone='wan' yet (super-resolution inputs, "
                 "stills in video batches, a LoRA of the modulation); turn off or set to 0")
  return found + wan_expert_problems(m, wan)


def sd_unet_problems(config) -> list[str]:
  """What Stable Diffusion's U-Net (model.backbone='sd_unet', model.sd_unet_path) cannot do with this config."""
  m, d, found = config.model, config.diffusion, []
  try:
    unet = sd_unet.read_config(m.sd_unet_path)
    text_dim = text_width(config)
  except ValueError as error:
    return [str(error)]
  if d.path != "vp":
    found.append(f"diffusion.path={d.path!r}: SD's U-Net reads the timesteps of its variance-preserving table; set "
                 "diffusion.path='vp' (and diffusion.prediction to what it was trained for: eps for SD 1.x and "
                 "SD 2.x base, v for SD 2.x at 768 px)")
  if m.in_channels != unet["out_channels"] or unet["in_channels"] not in (unet["out_channels"],
                                                                          2 * unet["out_channels"] + 1):
    found.append(f"model.in_channels={m.in_channels}: SD's U-Net maps {unet['in_channels']} channels to "
                 f"{unet['out_channels']}; the data's (an autoencoder's latent_channels, or 3 for pixels) must be the "
                 "latter, and the former the same (or, an inpainting U-Net, twice as many and a mask)")
  if sd_unet.is_inpainting(unet) and (config.latent.cache or not config.latent.autoencoder_path):
    found.append("SD's inpainting U-Net reads the latents of each training image with a masked region: it needs "
                 "latent.autoencoder_path and the pixels (no latent.cache)")
  if text_dim != unet["cross_attention_dim"]:
    found.append(f"the text encoder's width {text_dim} (text.pretrained_path's, or text.t5.d_model; SDXL's, both "
                 f"encoders') must equal the U-Net's cross_attention_dim={unet['cross_attention_dim']}")
  return found + sdxl_unet_problems(config, unet) + image_checkpoint_problems(m)


def image_checkpoint_problems(m) -> list[str]:
  """What an image checkpoint's network (SD's U-Net, SD3's or Flux's transformer) does not read: clips,
  super-resolution inputs, a LoRA of our modulation layers."""
  unsupported = [field for field, value in (("model.temporal", m.temporal),
                                            ("model.lowres_conditioning", m.lowres_conditioning),
                                            ("model.lora_modulation", m.lora_modulation)) if value]
  return [f"{', '.join(unsupported)}: not supported with model.backbone={m.backbone!r} yet (clips, super-resolution "
          "inputs, a LoRA of our modulation layers); turn off"] if unsupported else []


def sdxl_unet_problems(config, unet: dict) -> list[str]:
  """Whether SDXL's U-Net (addition_embed_type 'text_time') and SDXL's pair of text encoders come together, and its
  added embedding reads the second encoder's pooled embedding beside 6 time ids; or the SDXL refiner's U-Net, its
  one text encoder SDXL's second (text.pretrained_path) and 5 time ids, the last an aesthetic score
  (data.aesthetic_score)."""
  sdxl, second = unet["addition_embed_type"] == sd_unet.TEXT_TIME, config.text.second_encoder_path
  refiner = sdxl and not second
  if second and not sdxl:
    return [f"text.second_encoder_path={second!r}: only SDXL's U-Net (addition_embed_type='text_time') reads a "
            "second text encoder; leave it and text.second_tokenizer_path empty"]
  if not sdxl:
    return (["data.size_ids: only SDXL's U-Net reads an image's size and crop; turn it off"] if config.data.size_ids
            else []) + aesthetic_problems(config, refiner)
  if config.data.size_ids and config.latent.cache:
    return ["data.size_ids with latent.cache: the cache holds one view of each image, whose size and crop it does "
            "not keep; turn one off"]
  pooled_path, field = (config.text.pretrained_path, "text.pretrained_path") if refiner else (
      second, "text.second_encoder_path")
  if refiner and not (pooled_path and clip.has_text_projection(pooled_path)):
    return ["SDXL's U-Net (addition_embed_type='text_time') reads a second text encoder's pooled embedding: set "
            "text.second_encoder_path and text.second_tokenizer_path (the checkpoint's text_encoder_2/ and "
            "tokenizer_2/); the SDXL refiner's U-Net, whose root has no text_encoder/, reads text_encoder_2/ as "
            "text.pretrained_path"]
  pooled, width = clip.read_text_config(pooled_path, field)["projection_dim"], unet["addition_time_embed_dim"]
  added = unet["projection_class_embeddings_input_dim"]
  ids, reads = (5 if refiner else 6), (added - pooled) / width  # (reads: the time ids beside this pooled embedding)
  if reads != ids:
    hint = {5: "; an SDXL refiner's U-Net reads 5: its one text encoder (text_encoder_2/) is text.pretrained_path",
            6: "; an SDXL base U-Net reads 6: set text.second_encoder_path and text.second_tokenizer_path, and "
               "text.pretrained_path to its text_encoder/"}.get(reads, "")
    return [f"SDXL's U-Net reads {added} added features (projection_class_embeddings_input_dim), not the {field} "
            f"encoder's pooled {pooled} beside {ids} time ids of {width} ({pooled + ids * width}){hint}"]
  return aesthetic_problems(config, refiner)


def aesthetic_problems(config, refiner: bool) -> list[str]:
  """Whether data.aesthetic_score is given exactly when the SDXL refiner's U-Net reads it."""
  if refiner and not config.data.aesthetic_score > 0:
    return ["The SDXL refiner's U-Net reads its images' aesthetic score as a time id: set data.aesthetic_score "
            "(> 0; 6 as its pipeline samples with)"]
  if not refiner and config.data.aesthetic_score:
    return [f"data.aesthetic_score={config.data.aesthetic_score}: only the SDXL refiner's U-Net reads an aesthetic "
            "score; leave it 0"]
  return []


def sd3_problems(config) -> list[str]:
  """What SD3's transformer (model.backbone='sd3', model.sd3_path) cannot do with this config: its channels and its
  three text encoders' widths (text.pretrained_path, text.second_encoder_path: CLIP models with projections;
  text.t5_encoder_path, a T5, or none), beside flow_transformer_problems."""
  m, t = config.model, config.text
  try:
    sd3 = sd3_transformer.read_config(m.sd3_path)
    if not (t.second_encoder_path and t.second_tokenizer_path):
      return ["SD3's transformer reads two CLIP text encoders and a T5: set text.second_encoder_path and "
              "text.second_tokenizer_path (the checkpoint's text_encoder_2/ and tokenizer_2/) beside "
              "text.pretrained_path and text.tokenizer_path"]
    clips = [clip.read_text_config(t.pretrained_path),
             clip.read_text_config(t.second_encoder_path, "text.second_encoder_path")]
    t5_width = t5.read_hf_config(t.t5_encoder_path).d_model if t.t5_encoder_path else None
  except ValueError as error:
    return [str(error)]
  found = flow_transformer_problems(config, "SD3")
  if m.in_channels != sd3["out_channels"] or sd3["in_channels"] != sd3["out_channels"]:
    found.append(f"model.in_channels={m.in_channels}: SD3's transformer maps {sd3['in_channels']} channels to "
                 f"{sd3['out_channels']}; the data's (an autoencoder's latent_channels) must be both")
  width, pooled = sd3["joint_attention_dim"], sd3["pooled_projection_dim"]
  if sum(c["hidden_size"] for c in clips) > width or t5_width not in (None, width):
    widths = " + ".join(str(c["hidden_size"]) for c in clips)
    found.append(f"SD3's transformer reads tokens {width} wide (joint_attention_dim): the CLIP encoders' widths "
                 f"({widths}) must fit in it and the T5's (text.t5_encoder_path) be it, not {t5_width}")
  if sum(c["projection_dim"] for c in clips) != pooled:
    found.append(f"SD3's transformer reads a pooled embedding {pooled} wide (pooled_projection_dim), not the CLIP "
                 f"encoders' projections, {' + '.join(str(c['projection_dim']) for c in clips)}")
  return found


def flux_problems(config) -> list[str]:
  """What Flux's transformer (model.backbone='flux', model.flux_path) cannot do with this config: its latent
  channels and its text encoders' widths (text.pretrained_path: a CLIPTextModel; text.t5_encoder_path: a T5),
  beside flow_transformer_problems."""
  m, t = config.model, config.text
  try:
    flux = flux_transformer.read_config(m.flux_path)
    if not t.t5_encoder_path or t.second_encoder_path or t.second_tokenizer_path:
      return ["Flux's transformer reads a CLIP text encoder's pooled embedding and a T5's states: set "
              "text.pretrained_path and text.tokenizer_path (the checkpoint's text_encoder/ and tokenizer/), "
              "text.t5_encoder_path and text.spiece_path (text_encoder_2/ and tokenizer_2/spiece.model), and leave "
              "text.second_encoder_path and text.second_tokenizer_path empty"]
    clip_width = clip.read_text_config(t.pretrained_path)["hidden_size"]
    t5_width = t5.read_hf_config(t.t5_encoder_path).d_model
  except ValueError as error:
    return [str(error)]
  found = flow_transformer_problems(config, "Flux")
  if m.in_channels != flux_transformer.latent_channels(flux):
    out = flux["out_channels"] or flux["in_channels"]
    found.append(f"model.in_channels={m.in_channels}: Flux's transformer diffuses latents of "
                 f"{flux_transformer.latent_channels(flux)} channels (its out_channels {out}, 2 x 2 packed); the "
                 "autoencoder's latent_channels must be as many")
  if flux_transformer.is_control(flux) and m.flux_kontext:
    found.append("model.flux_kontext: this transformer is FLUX.1 Depth / Canny's (in_channels twice out_channels), "
                 "which reads a control image, not FLUX.1 Kontext's reference image: leave it False")
  if flux_transformer.is_fill(flux):
    found += flux_fill_problems(config, flux)
    if m.flux_kontext:
      found.append("model.flux_kontext: this transformer is FLUX.1 Fill's (in_channels above out_channels), which "
                   "reads an image to complete, not FLUX.1 Kontext's reference image: leave it False")
  if (t5_width, clip_width) != (flux["joint_attention_dim"], flux["pooled_projection_dim"]):
    found.append(f"Flux's transformer reads T5 states {flux['joint_attention_dim']} wide (joint_attention_dim) and a "
                 f"pooled CLIP embedding {flux['pooled_projection_dim']} wide (pooled_projection_dim), not "
                 f"{t5_width} and {clip_width} (text.t5_encoder_path's, text.pretrained_path's)")
  if not m.flux_guidance >= 0:
    found.append(f"model.flux_guidance={m.flux_guidance} must be >= 0 (FLUX.1 dev's pipelines: 3.5)")
  if m.flux_redux_path:
    found += redux_problems(config, flux)
  return found


def redux_problems(config, flux: dict) -> list[str]:
  """Why FLUX.1 Redux (model.flux_redux_path) cannot give this Flux (its transformer's config.json `flux`) images'
  tokens: a root it cannot read, an embedder of another width than the T5 states the transformer reads, or a
  transformer that reads an image of its own (Fill, Depth / Canny, Kontext)."""
  try:
    _, embedder, _ = redux.configs(config.model.flux_redux_path)
  except ValueError as error:
    return [str(error)]
  found = []
  if embedder["txt_in_features"] != flux["joint_attention_dim"]:
    found.append(f"model.flux_redux_path: its embedder makes tokens {embedder['txt_in_features']} wide "
                 f"(txt_in_features); Flux's transformer reads T5 states {flux['joint_attention_dim']} wide: give the "
                 "Redux root made for this Flux (FLUX.1 Redux dev for FLUX.1 dev and schnell)")
  if flux_transformer.is_fill(flux) or flux_transformer.is_control(flux) or config.model.flux_kontext:
    found.append("model.flux_redux_path: FLUX.1 Redux varies an image with FLUX.1 dev or schnell; this transformer "
                 "reads an image of its own (Fill, Depth / Canny or Kontext): leave it empty")
  return found


def redux_sampling_problem(config, sample_config, prefix: str) -> str | None:
  """Why sample_config's guidance_scale (named prefix + field) cannot apply with FLUX.1 Redux, whose image tokens
  lengthen the condition that guidance's other branch would lack, or its Redux scales without it."""
  redux = config.model.backbone == "flux" and config.model.flux_redux_path
  if redux and sample_config.guidance_scale != 1:
    return (f"{prefix}guidance_scale={sample_config.guidance_scale}: with FLUX.1 Redux (model.flux_redux_path) "
            "sampling is unguided, as its pipeline's (the image's tokens have no unconditional branch): leave it 1 "
            "(FLUX.1 dev follows --flux_guidance)")
  scaled = [f"{prefix}{name}={sample_config[name]}" for name in ("redux_prompt_scale", "redux_pooled_scale")
            if sample_config[name] != 1]
  if scaled and not redux:
    return f"{', '.join(scaled)}: FLUX.1 Redux's scales (model.flux_redux_path); this model has none: leave them 1"
  return None


def kontext_resize_problem(config, sample_config, prefix: str) -> str | None:
  """Why sample_config's kontext_resize (named prefix + field) has nothing to size: a model without FLUX.1 Kontext's
  reference images."""
  if sample_config.kontext_resize != "preferred" and not (config.model.backbone == "flux"
                                                          and config.model.flux_kontext):
    return (f"{prefix}kontext_resize={sample_config.kontext_resize!r}: the size of FLUX.1 Kontext's reference images "
            f"(model.flux_kontext); this model reads none: leave it {'out' if prefix == '--' else 'preferred'}")
  return None


def flux_fill_problems(config, flux: dict) -> list[str]:
  """Why FLUX.1 Fill's transformer (it reads the known image's latents and a mask of every pixel beside the latents)
  does not fit: it needs the autoencoder and the pixels, and its mask channels are the autoencoder's f x f pixels a
  latent pixel."""
  if config.latent.cache or not config.latent.autoencoder_path:
    return ["FLUX.1 Fill's transformer reads the latents of each training image with a masked region: it needs "
            "latent.autoencoder_path and the pixels (no latent.cache)"]
  try:
    factor = autoencoder.downsampling_factor(autoencoder.read_config(config.latent.autoencoder_path))
  except ValueError as error:
    return [str(error)]
  latent = flux_transformer.latent_channels(flux)
  mask = flux["in_channels"] // flux_transformer.PACK ** 2 - 2 * latent
  return [] if mask == factor ** 2 else [
      f"FLUX.1 Fill's transformer reads {mask} mask channels a latent pixel beside its 2 x {latent} latent ones; the "
      f"autoencoder's {factor} x {factor} pixels a latent pixel give {factor ** 2}"]


def flow_transformer_problems(config, name: str) -> list[str]:
  """What SD3's and Flux's transformers (`name`) share: the flow path, T5's tokenizer and length, and the fields
  they do not support."""
  m, d, t, found = config.model, config.diffusion, config.text, []
  if (d.path, d.prediction) != ("flow", "flow"):
    found.append(f"diffusion.path={d.path!r}, diffusion.prediction={d.prediction!r}: {name}'s transformer predicts "
                 "the velocity eps - x0 on the flow path; set both to 'flow'")
  if t.t5_encoder_path and not t.spiece_path:
    found.append("text.t5_encoder_path reads T5's ids: set text.spiece_path (the checkpoint's T5 tokenizer's "
                 "spiece.model)")
  if t.t5_max_length < 1:
    found.append(f"text.t5_max_length={t.t5_max_length} must be >= 1 (SD3's pipelines: 256, FLUX.1 dev's 512)")
  return found + image_checkpoint_problems(m)


def wan_channel_problems(config, wan: dict) -> list[str]:
  """Why the data's (or latents') channels do not fit Wan's transformer: a text-to-video model maps them to
  themselves; an image-to-video one (wan_transformer.is_image_to_video) reads them, a mask of as many channels as
  frames a latent frame holds, and the latents of the image a clip starts at."""
  m, out = config.model, wan["out_channels"]
  if m.in_channels != out:
    return [f"model.in_channels={m.in_channels}: Wan's transformer predicts {out} channels; the data's (or "
            "latents') channels must be as many"]
  if not wan_transformer.is_image_to_video(wan):
    return [] if wan["in_channels"] == out else [f"Wan's transformer reads {wan['in_channels']} channels but "
                                                 f"predicts {out}: no Wan pipeline runs such a model; give "
                                                 "model.wan_path a text-to-video or image-to-video one"]
  try:
    compression = autoencoder.time_compression(autoencoder.read_config(config.latent.autoencoder_path)) if (
        config.latent.autoencoder_path) else 1
  except ValueError:  # latent_problems says why
    return []
  found = []
  if wan["in_channels"] != 2 * out + compression:
    found.append(f"Wan's image-to-video transformer reads {wan['in_channels']} channels: it must read the clip's "
                 f"{out}, a mask of {compression} (the frames a latent frame holds) and the image's {out} latents, "
                 f"{2 * out + compression} (are model.wan_path and latent.autoencoder_path from different "
                 "checkpoints?)")
  unsupported = [field for field, value in (("latent.cache", config.latent.cache),
                                            ("distill.steps", config.distill.steps),
                                            ("sample.video_length", config.sample.video_length)) if value]
  if unsupported:
    found.append(f"{', '.join(unsupported)}: not supported for an image-to-video Wan yet (the latent cache keeps no "
                 "first frames; distillation and video extension pass no image); turn off or set to 0")
  return found


def clean_first_frame_problems(config, wan: dict) -> list[str]:
  """Why a Wan transformer cannot start clips at images by reading their latent frame clean
  (model.wan_clean_first_frame, Wan 2.2 TI2V's mode), or train so (model.wan_first_frame_fraction)."""
  m, found = config.model, []
  if not 0 <= m.wan_first_frame_fraction <= 1:
    found.append(f"model.wan_first_frame_fraction={m.wan_first_frame_fraction} must be in [0, 1]")
  if m.wan_first_frame_fraction and not m.wan_clean_first_frame:
    found.append("model.wan_first_frame_fraction: the share of training clips given their first frame, for a model "
                 "that starts clips at images; set model.wan_clean_first_frame=True (Wan 2.2 TI2V) or leave it at 0")
  if not m.wan_clean_first_frame:
    return found
  if wan_transformer.is_image_to_video(wan):
    found.append("model.wan_clean_first_frame: an image-to-video Wan reads its image as a condition of its own; "
                 "turn it off")
  if m.wan_low_noise_path:
    found.append("model.wan_clean_first_frame: not with a pair of experts (model.wan_low_noise_path); turn it off")
  if wan["patch_size"][0] != 1:
    found.append(f"model.wan_clean_first_frame: Wan's patch_size in time is {wan['patch_size'][0]}; a clean first "
                 "frame needs tokens of one latent frame (1)")
  if m.wan_first_frame_fraction and config.distill.steps:
    found.append("model.wan_first_frame_fraction with distill.steps: distillation's teacher passes no first frames "
                 "yet; set the fraction to 0")
  return found


def wan_image_encoder_problems(m, wan: dict) -> list[str]:
  """Why model.wan_image_encoder_path does not fit Wan's transformer: Wan 2.1's image-to-video models (image_dim)
  read the penultimate states of a CLIP vision model that wide; no other reads one."""
  if wan["image_dim"] is None:
    return [] if not m.wan_image_encoder_path else [
        "model.wan_image_encoder_path: only a Wan 2.1 image-to-video transformer (image_dim) reads an image "
        "encoder's tokens; leave it empty"]
  if not m.wan_image_encoder_path:
    return [f"Wan's transformer reads CLIP tokens of the image (image_dim={wan['image_dim']}): set "
            "model.wan_image_encoder_path to its image encoder (the checkpoint's image_encoder/)"]
  try:
    vision = clip.read_vision_config(m.wan_image_encoder_path, "model.wan_image_encoder_path")
  except ValueError as error:
    return [str(error)]
  found = [] if vision["hidden_size"] == wan["image_dim"] else [
      f"model.wan_image_encoder_path's hidden_size={vision['hidden_size']} differs from Wan's "
      f"image_dim={wan['image_dim']}"]
  tokens = (vision["image_size"] // vision["patch_size"]) ** 2 + 1  # its patches and the class token
  if wan_transformer.is_first_last_frame(wan) and wan["pos_embed_seq_len"] != 2 * tokens:
    found.append(f"Wan's first-last-frame transformer embeds pos_embed_seq_len={wan['pos_embed_seq_len']} image "
                 f"tokens, two images' of model.wan_image_encoder_path's {tokens}: they must be {2 * tokens} (are "
                 "the transformer and image encoder from different checkpoints?)")
  return found


EXPERT_BATCHES = ("routed", "mixed")  # model.wan_expert_batches


def low_noise_guidance_problem(config, sample_config, prefix: str) -> str | None:
  """Why sample_config's guidance_scale_low_noise (named prefix + field) cannot apply: a model without a pair of
  Wan experts."""
  if sample_config.guidance_scale_low_noise == -1 or (config.model.backbone == "wan" and
                                                      config.model.wan_low_noise_path):
    return None
  return (f"{prefix}guidance_scale_low_noise={sample_config.guidance_scale_low_noise}: the guidance scale of a pair "
          "of Wan experts' low-noise steps (model.wan_low_noise_path); this model has one network: leave it at -1")


def wan_expert_problems(m, wan: dict) -> list[str]:
  """What keeps model.wan_low_noise_path's transformer from being the low-noise expert of model.wan_path's `wan`."""
  if not m.wan_low_noise_path:
    return []
  try:
    low = wan_transformer.read_config(m.wan_low_noise_path, "model.wan_low_noise_path")
  except ValueError as error:
    return [str(error)]
  found = [f"model.wan_low_noise_path's {field}={low[field]} differs from model.wan_path's {wan[field]}: the two "
           "experts denoise the same latents for the same text" for field in ("in_channels", "out_channels",
                                                                             "patch_size", "text_dim")
           if low[field] != wan[field]]
  if m.wan_expert_batches not in EXPERT_BATCHES:
    found.append(f"model.wan_expert_batches={m.wan_expert_batches!r} must be one of {list(EXPERT_BATCHES)}")
  if not 0 < m.wan_boundary < 1:
    found.append(f"model.wan_boundary={m.wan_boundary}: the sigma (timestep / 1000) where the low-noise expert takes "
                 "over must be in (0, 1) (Wan 2.2's T2V: 0.875, its I2V: 0.9)")
  return found


def dit_problems(config) -> list[str]:
  """What a DiT (model.backbone='dit') cannot do with this config (its grid: size_problems)."""
  m, found = config.model, []
  if m.patch_size < 1:
    found.append(f"model.patch_size={m.patch_size} must be >= 1")
  if m.heads >= 1 and (m.channels % 4 or m.channels % m.heads):  # (heads below 1: network_size_problems)
    found.append(f"model.channels={m.channels} (the DiT's width) must be divisible by 4 and by model.heads={m.heads}")
  if m.depth < 1:
    found.append(f"model.depth={m.depth} must be >= 1")
  if m.coordinate_channels:
    found.append("model.coordinate_channels is a U-Net input (a DiT's patches carry position embeddings): switch "
                 "it off or use model.backbone='unet'")
  if m.video_attention == "spacetime" and config.inflate.train_temporal_only:
    found.append("inflate.train_temporal_only would train only the frame-index embedding of a spacetime DiT "
                 "(model.video_attention='spacetime' has no temporal layers: its blocks attend across frames)")
  return found


def dataset_problems(data_config) -> list[str]:
  """A data.dataset name the pipeline does not know."""
  if data_config.dataset not in pipeline.DATASETS:
    return [f"data.dataset={data_config.dataset!r} is not one of {list(pipeline.DATASETS)}"]
  return []


def data_source_problems(data_config) -> list[str]:
  """Why a job that reads the data (training, evaluation) cannot open them, found before anything is built: a folder
  dataset without its folder or captions file, a TFDS dataset without its name. (Sampling a pretrained config reads
  no data: its configs leave them to the command line.)"""
  d = data_config
  if d.dataset in ("folder", "folder_clips"):
    return [f"data.dataset={d.dataset!r} reads data.{field} ({what}): set it" for field, what in (
        ("folder", "the local folder of files"), ("captions_file", "its captions.jsonl or .csv")) if not d[field]]
  if d.dataset == "tfds" and not d.name:
    return ["data.dataset='tfds' opens the prepared TFDS dataset data.name (in data.data_dir): set it"]
  return []


def built_in_data_problems(data_config) -> list[str]:
  """Why a built-in dataset (captioned_shapes, moving_shapes) cannot be drawn: no training or held-out examples,
  a captioned_shapes object count outside what its captions name (found before the model is built)."""
  d = data_config
  if d.dataset not in BUILT_IN_DATASETS:
    return []
  found = [f"data.{key}={d[key]} must be >= 1" for key in ("num_train", "num_eval") if d[key] < 1]
  if d.dataset == "captioned_shapes" and not 1 <= d.max_objects <= captioned_shapes.MAX_OBJECTS:
    found.append(f"data.max_objects={d.max_objects} must be in 1..{captioned_shapes.MAX_OBJECTS}")
  return found


def moving_shapes_problems(data_config) -> list[str]:
  """data.wrap_around on a dataset without moving_shapes' paths; a data.travel those paths cannot take."""
  wrap_around = data_config.get("wrap_around", False)
  if data_config.dataset == "moving_shapes":
    travel = data_config.get("travel", moving_shapes.TRAVEL)
    return [f"data.{p}" for p in moving_shapes.travel_problems(travel, data_config.frames, wrap_around)]
  if wrap_around:
    return [f"data.wrap_around makes moving_shapes' frames a torus; data.dataset={data_config.dataset!r} has no "
            "paths to wrap (leave it False)"]
  return []


def flux_guidance_problem(config, sample_config, prefix: str) -> str | None:
  """Why sample_config's flux_guidance (named prefix + field) cannot apply: negative, or a model that reads no
  guidance scale (FLUX.1 dev's guidance_embeds)."""
  guidance = sample_config.flux_guidance
  if guidance == -1:
    return None
  if not guidance >= 0:
    return f"{prefix}flux_guidance={guidance} must be >= 0 (or -1: model.flux_guidance)"
  try:
    guided = (config.model.backbone == "flux"
              and flux_transformer.read_config(config.model.flux_path)["guidance_embeds"])
  except ValueError:  # flux_problems says why
    return None
  if not guided:
    return (f"{prefix}flux_guidance={guidance}: the guidance scale a guidance-distilled Flux (FLUX.1 dev: "
            "guidance_embeds) is told to follow; this model reads none: leave it at -1 (classifier-free guidance: "
            "guidance_scale)")
  return None


def skip_layer_problem(config, sample_config, prefix: str) -> str | None:
  """Why sample_config's skip-layer guidance (skip_layers, skip_layer_scale, skip_layer_start, skip_layer_stop; named
  prefix + field) cannot apply: a model other than SD3's, blocks it lacks, a negative scale, a window outside
  [0, 1], or no classifier-free guidance to add it to."""
  s = sample_config
  if not s.skip_layers:
    return None
  layers = f"{prefix}skip_layers={','.join(map(str, s.skip_layers))}"
  if config.model.backbone != "sd3":
    return f"{layers}: skip-layer guidance leaves blocks of SD3's transformer out; this model is no SD3: leave it empty"
  try:
    blocks = sd3_transformer.read_config(config.model.sd3_path)["num_layers"]
  except ValueError:  # sd3_problems says why
    return None
  if not all(0 <= layer < blocks for layer in s.skip_layers):
    return f"{layers}: the transformer has blocks 0 to {blocks - 1}"
  if not s.skip_layer_scale >= 0:
    return f"{prefix}skip_layer_scale={s.skip_layer_scale} must be >= 0"
  if not 0 <= s.skip_layer_start < s.skip_layer_stop <= 1:
    return (f"{prefix}skip_layer_start={s.skip_layer_start}, {prefix}skip_layer_stop={s.skip_layer_stop}: fractions "
            "of the steps, 0 <= start < stop <= 1")
  if s.guidance_scale == 1:
    return (f"{layers}: skip-layer guidance is added to classifier-free guidance, which guidance_scale=1 turns off "
            "(as StableDiffusion3Pipeline)")
  return None


def flow_shift_problem(config, sample_config, prefix: str) -> str | None:
  """Why sample_config's flow_shift (named prefix + field) cannot apply: negative, or a schedule other than flow."""
  shift = sample_config.flow_shift
  if not shift >= 0:
    return f"{prefix}flow_shift={shift} must be >= 0 (0: diffusion.schedule_params.shift)"
  if shift and config.diffusion.schedule != "flow":
    return (f"{prefix}flow_shift={shift}: the time shift of a flow schedule's sampling grid; this model's schedule is "
            f"{config.diffusion.schedule!r}: leave it at 0")
  resolution = tuple(sample_config.get("resolution_shift", ()))
  if resolution and (len(resolution) != 4 or config.diffusion.schedule != "flow" or config.model.backbone not in (
      "sd3", "flux") or not 0 < resolution[0] < resolution[1]):
    return (f"{prefix}resolution_shift={resolution}: (base_tokens, max_tokens, base_shift, max_shift), base_tokens < "
            "max_tokens, shifts a flow schedule's grid by the samples' token count (an sd3 or flux backbone's); "
            "leave it empty")
  return None


DISCRETE_TABLES = ("linear", "scaled_linear")  # continuous schedules that are a DDPM table's limit (schedules.betas)


def timestep_spacing_problem(config, sample_config, prefix: str) -> str | None:
  """Why sample_config's timestep_spacing and steps_offset (named prefix + field) cannot apply."""
  spacing, offset = sample_config.timestep_spacing, sample_config.steps_offset
  if spacing and spacing not in schedules.SPACINGS:
    return f"{prefix}timestep_spacing={spacing!r} is not one of {['', *schedules.SPACINGS]}"
  if spacing and config.diffusion.schedule not in DISCRETE_TABLES:
    return (f"{prefix}timestep_spacing={spacing!r} spaces a DDPM table's timesteps; this model's schedule is "
            f"{config.diffusion.schedule!r}, not one of {list(DISCRETE_TABLES)}: leave it empty")
  if offset and spacing != "leading" or offset < 0:
    return f"{prefix}steps_offset={offset}: shifts leading timesteps (timestep_spacing='leading') by >= 0"
  return None


def spatial_multiple(config) -> tuple[int, str] | None:
  """(what the network's height and width must be multiples of, what that is): a U-Net's 2 ** (levels - 1), a
  DiT's patch, Wan's spatial patch (None where Wan's config.json cannot be read: wan_problems says why)."""
  m = config.model
  if m.backbone == "dit":
    return max(m.patch_size, 1), f"the DiT's patch, model.patch_size={m.patch_size}"
  if m.backbone == "wan":
    try:
      patch = wan_transformer.read_config(m.wan_path)["patch_size"]
    except ValueError:
      return None
    return patch[1], f"Wan's patch {patch[1]}x{patch[2]}"
  if m.backbone == "sd_unet":
    try:
      levels = len(sd_unet.read_config(m.sd_unet_path)["block_out_channels"])
    except ValueError:
      return None
    return 2 ** (levels - 1), f"SD's U-Net's 2 ** (levels - 1), {levels} levels"
  if m.backbone == "sd3":
    try:
      patch = sd3_transformer.read_config(m.sd3_path)["patch_size"]
    except ValueError:
      return None
    return patch, f"SD3's patch {patch}x{patch}"
  if m.backbone == "flux":
    return flux_transformer.PACK, f"Flux's token of {flux_transformer.PACK}x{flux_transformer.PACK} latent pixels"
  return 2 ** (len(m.channel_mults) - 1), f"the U-Net's 2 ** (levels - 1), {len(m.channel_mults)} levels"


def sample_size_problems(config, sample_config, prefix: str) -> list[str]:
  """Why the network cannot make samples of sample_config's height and width (each named prefix + field; 0: the
  training images'): size_problems, or a super-resolution stage (its input is the stage below's square)."""
  if not (sample_config.height or sample_config.width):
    return []
  if config.model.lowres_conditioning:
    return [f"{prefix}height, {prefix}width: a super-resolution stage samples at data.resolution (its input is the "
            "stage below's); leave them at 0"]
  return size_problems(config, {f"{prefix}height": sample_config.height, f"{prefix}width": sample_config.width},
                       "the training images'")


def optimizer_problems(optimizer_config) -> list[str]:
  """What is wrong with an optimizer section (the diffusion trainer's and the autoencoder trainer's): a schedule it
  does not know, a learning rate that is not positive (NaN included), Adam's betas outside [0, 1), negative warm-up,
  weight decay or clipping, an end factor outside [0, 1]."""
  o, found = optimizer_config, []
  if o.schedule not in optimizer.SCHEDULES:
    found.append(f"optimizer.schedule={o.schedule!r} is not one of {list(optimizer.SCHEDULES)}")
  if not o.learning_rate > 0:
    found.append(f"optimizer.learning_rate={o.learning_rate} must be > 0")
  for key in ("b1", "b2"):
    if not 0 <= o[key] < 1:
      found.append(f"optimizer.{key}={o[key]} must be in [0, 1)")
  for key in ("warmup_steps", "weight_decay", "grad_clip"):
    if not o[key] >= 0:
      found.append(f"optimizer.{key}={o[key]} must be >= 0")
  if not 0 <= o.end_learning_rate_factor <= 1:
    found.append(f"optimizer.end_learning_rate_factor={o.end_learning_rate_factor} must be in [0, 1]")
  return found


def built_in_size_problems(data_config) -> list[str]:
  """Why a built-in dataset (captioned_shapes, moving_shapes) cannot be drawn at data.resolution x data.width: it
  draws 16, 32 or 64 px squares (their captions name what a crop would cut)."""
  d = data_config
  if d.dataset not in BUILT_IN_DATASETS:
    return []
  found = [] if d.resolution in (16, 32, 64) else [f"data.resolution={d.resolution}: {d.dataset} draws images of "
                                                    "16, 32 or 64 px"]
  if d.width:
    found.append(f"data.width={d.width}: {d.dataset} draws square images whose captions name what a crop would "
                 "cut; non-square training reads folder, folder_clips or tfds data")
  return found


def data_size_problems(config) -> list[str]:
  """Why the network cannot train on images data.resolution high and data.width wide (0: square): size_problems
  of both sides; a built-in dataset's size (built_in_size_problems), a width of a super-resolution stage (its input
  is the stage below's square)."""
  d = config.data
  if d.resolution < 1:
    return [f"data.resolution={d.resolution} must be >= 1"]
  found, sides = built_in_size_problems(d), {"data.resolution": d.resolution}
  width = d.width if d.dataset not in BUILT_IN_DATASETS else 0  # (else built_in_size_problems)
  if width and config.model.lowres_conditioning:
    found.append(f"data.width={d.width}: a super-resolution stage trains on squares (its input is the stage "
                 "below's); leave it at 0")
  elif width:
    sides["data.width"] = width
  return found + size_problems(config, sides, "data.resolution")


def size_problems(config, sides: dict, zero: str) -> list[str]:
  """Why the network cannot see images of these sides ({field: pixels}; 0 is `zero`, left as it is): a side the
  autoencoder's downsampling times spatial_multiple does not divide, a DiT grid longer than its position periods,
  an SD3 grid longer than its position table."""
  try:
    factor = (autoencoder.downsampling_factor(autoencoder.read_config(config.latent.autoencoder_path))
              if config.latent.autoencoder_path else 1)
  except ValueError:  # latent_problems says why
    return []
  if (spatial := spatial_multiple(config)) is None:
    return []
  multiple, what = spatial[0], ("the autoencoder's downsampling x " if factor > 1 else "") + spatial[1]
  found = [f"{name}={side} must be a multiple of {factor * multiple} ({what})" if side > 0 else
           f"{name}={side} must be >= 0 (0: {zero})"
           for name, side in sides.items() if side < 0 or side % (factor * multiple)]
  grid = max(sides.values()) // (factor * multiple)
  if config.model.backbone == "dit" and config.model.position_max_period < grid:
    found.append(f"{', '.join(sides)}: the DiT's patch grid's longer side ({grid}) is past "
                 f"model.position_max_period={config.model.position_max_period} (even the slowest position features "
                 "would wrap around within the image)")
  if config.model.backbone == "sd3":
    table = sd3_transformer.read_config(config.model.sd3_path)["pos_embed_max_size"]
    found += [f"{name}={side} is {side // (factor * multiple)} of SD3's patches, and its position table covers at "
              f"most {table} a side: at most {table * factor * multiple} pixels"
              for name, side in sides.items() if side // (factor * multiple) > table]
  return found


def sample_problems(sample_config, prefix: str) -> list[str]:
  """What is wrong with a sample section's sampler, steps, guidance scale, batch size, thresholding,
  noise-augmentation level and editing strength; each named `prefix` + field ("sample." in a config, "--" on a
  command line)."""
  s, found = sample_config, []
  if s.sampler not in samplers.SAMPLERS:
    found.append(f"{prefix}sampler={s.sampler!r} is not one of {list(samplers.SAMPLERS)}")
  if s.threshold not in samplers.THRESHOLDS:
    found.append(f"{prefix}threshold={s.threshold!r} is not one of {list(samplers.THRESHOLDS)}")
  if s.steps < 1:
    found.append(f"{prefix}steps={s.steps} must be >= 1")
  if not s.guidance_scale >= 0:
    found.append(f"{prefix}guidance_scale={s.guidance_scale} must be >= 0")
  if not s.guidance_scale_low_noise >= 0 and s.guidance_scale_low_noise != -1:
    found.append(f"{prefix}guidance_scale_low_noise={s.guidance_scale_low_noise} must be >= 0 (or -1: "
                 f"{prefix}guidance_scale)")
  if problem := samplers.guidance_interval_problem(s.guidance_interval):
    found.append(f"{prefix}guidance_interval={problem}")
  if s.batch_size < 1:
    found.append(f"{prefix}batch_size={s.batch_size} must be >= 1")
  if s.num_per_prompt < 1:
    found.append(f"{prefix}num_per_prompt={s.num_per_prompt} must be >= 1")
  if not 0 <= s.eta <= 1:
    found.append(f"{prefix}eta={s.eta} must be in [0, 1] (DDIM's share of fresh noise a step)")
  if not 0 <= s.guidance_rescale <= 1:
    found.append(f"{prefix}guidance_rescale={s.guidance_rescale} must be in [0, 1] (the rescaled prediction's share)")
  if not 0 < s.threshold_percentile <= 100:
    found.append(f"{prefix}threshold_percentile={s.threshold_percentile} must be in (0, 100] (a percentile of |x0|)")
  if not 0 <= s.aug_level <= 1:
    found.append(f"{prefix}aug_level={s.aug_level} must be in [0, 1]")
  if not 0 < s.strength <= 1:
    found.append(f"{prefix}strength={s.strength} must be in (0, 1]")
  if s.edit_noise not in editing.EDIT_NOISE:
    found.append(f"{prefix}edit_noise={s.edit_noise!r} is not one of {list(editing.EDIT_NOISE)}")
  if s.kontext_resize not in ("preferred", "own"):
    found.append(f"{prefix}kontext_resize={s.kontext_resize!r} is not 'preferred' or 'own'")
  for field in ("video_length", "context_frames", "reconstruction_guidance", "null_text_iterations"):
    if not s[field] >= 0:
      found.append(f"{prefix}{field}={s[field]} must be >= 0")
  if not s.null_text_learning_rate > 0:
    found.append(f"{prefix}null_text_learning_rate={s.null_text_learning_rate} must be > 0")
  if problem := null_text_problem(s, prefix):
    found.append(problem)
  return found


def null_text_problem(sample_config, prefix: str = "sample.") -> str | None:
  """Why null-text inversion cannot edit with these sample settings (its texts are fitted to deterministic DDIM's
  steps), or None."""
  s = sample_config
  if s.edit_noise == "null_text_inversion" and (s.sampler != "ddim" or s.eta):
    return (f"{prefix}edit_noise='null_text_inversion' optimises guidance's text for deterministic DDIM steps: set "
            f"sampler='ddim' and eta=0 (not sampler={s.sampler!r}, eta={s.eta})")
  return None


def problems(config, device_count: int | None = None, process_count: int | None = None) -> list[str]:
  device_count = jax.device_count() if device_count is None else device_count
  process_count = jax.process_count() if process_count is None else process_count
  found = []

  def option(value, valid, key):
    if value not in valid:
      found.append(f"{key}={value!r} is not one of {list(valid)}")

  d = config.diffusion
  option(d.path, ("vp", "flow"), "diffusion.path")
  option(d.prediction, objectives.PREDICTIONS, "diffusion.prediction")
  option(d.weighting, objectives.WEIGHTINGS, "diffusion.weighting")
  option(d.time_sampler, objectives.TIME_SAMPLERS, "diffusion.time_sampler")
  try:
    schedules.logsnr_schedule(d.schedule, **d.schedule_params)
  except ValueError as error:
    found.append(f"diffusion.schedule: {error}")
  if not 0 <= d.cond_drop_prob <= 1:
    found.append(f"diffusion.cond_drop_prob={d.cond_drop_prob} must be in [0, 1]")
  found += optimizer_problems(config.optimizer)
  found += sample_problems(config.sample, "sample.") + sample_size_problems(config, config.sample, "sample.")
  for problem in (flow_shift_problem(config, config.sample, "sample."),
                  flux_guidance_problem(config, config.sample, "sample."),
                  redux_sampling_problem(config, config.sample, "sample."),
                  kontext_resize_problem(config, config.sample, "sample."),
                  skip_layer_problem(config, config.sample, "sample."),
                  timestep_spacing_problem(config, config.sample, "sample.")):
    found += [problem] if problem else []
  if config.train.sample_every < 0:
    found.append(f"train.sample_every={config.train.sample_every} must be >= 0 (0: no samples during training)")

  m = config.model
  option(m.backbone, ("unet", "dit", "wan", "sd_unet", "sd3", "flux"), "model.backbone")
  option(m.video_attention, ("factorised", "spacetime"), "model.video_attention")
  if m.video_attention == "spacetime" and not (m.temporal and m.backbone == "dit"):
    found.append("model.video_attention='spacetime' is the video DiT's full attention over a clip: it needs "
                 "model.backbone='dit' and model.temporal=True")
  found += tubelet_problems(config)
  if config.latent.autoencoder_path:
    found += latent_problems(config)
  else:
    if config.latent.cache:
      found.append("latent.cache needs latent.autoencoder_path (it caches that autoencoder's latents)")
    if m.in_channels != 3:
      found.append(f"model.in_channels={m.in_channels} must be 3 for a pixel model (the data are RGB); a latent "
                   "model's are its autoencoder's latent_channels (latent.autoencoder_path)")
  if config.data.size_ids and m.backbone != "sd_unet":
    found.append("data.size_ids: only SDXL's U-Net (model.backbone='sd_unet') reads an image's size and crop; turn it "
                 "off")
  if config.data.aesthetic_score and m.backbone != "sd_unet":
    found += aesthetic_problems(config, refiner=False)
  if m.flux_kontext and m.backbone != "flux":
    found.append(f"model.flux_kontext: FLUX.1 Kontext's reference images are read by Flux's transformer; "
                 f"model.backbone={m.backbone!r}: leave it False")
  found += reference_problems(config)
  found += training_sample_problems(config)
  if m.backbone == "dit":
    found += dit_problems(config)
  elif m.backbone == "wan":
    found += wan_problems(config)
  elif m.backbone == "sd_unet":
    found += sd_unet_problems(config)
  elif m.backbone == "sd3":
    found += sd3_problems(config)
  elif m.backbone == "flux":
    found += flux_problems(config)
  else:
    if len(m.num_res_blocks) != len(m.channel_mults):
      found.append(f"model.num_res_blocks {tuple(m.num_res_blocks)} needs one entry per level of "
                   f"model.channel_mults {tuple(m.channel_mults)}")
    if any(level >= len(m.channel_mults) for level in m.attention_levels):
      found.append(f"model.attention_levels {tuple(m.attention_levels)} names a level beyond "
                   f"{len(m.channel_mults) - 1}")
  if m.backbone != "wan" and (m.wan_clean_first_frame or m.wan_first_frame_fraction):
    found.append("model.wan_clean_first_frame, model.wan_first_frame_fraction: Wan 2.2 TI2V's image-to-video mode "
                 "(model.backbone='wan'); leave them off")
  if m.text_dim != config.text.t5.d_model and not config.text.pretrained_path and m.backbone in ("unet", "dit"):
    found.append(f"model.text_dim={m.text_dim} must equal text.t5.d_model={config.text.t5.d_model}")
  option(config.text.t5.position_bias_init, t5.POSITION_BIAS_INITS, "text.t5.position_bias_init")
  found += clip_text_problems(config)
  found += tokenizer_problems(config) + network_size_problems(config)
  option(m.dtype, ("float32", "bfloat16", "float16"), "model.dtype")
  if config.text.embedding_cache and config.text.trainable:
    found.append("text.embedding_cache needs a frozen encoder: set text.trainable=False")
  option(m.skips, ("block", "level"), "model.skips")
  option(m.attention, attention.IMPLEMENTATIONS, "model.attention")
  option(m.remat_policy, layers.REMAT_POLICIES, "model.remat_policy")
  if m.attention == "cudnn" and jax.default_backend() != "gpu":
    found.append(f"model.attention='cudnn' needs an NVIDIA GPU (this backend is {jax.default_backend()}); "
                 "use 'auto', 'folded' or 'xla'")
  video_data = config.data.dataset in ("moving_shapes", "folder_clips")
  if m.temporal and video_data and config.data.frames < 1:
    found.append(f"data.frames={config.data.frames} must be >= 1 (the frames of a training clip)")
  elif m.temporal and config.sample.frames < 0:
    found.append(f"sample.frames={config.sample.frames} must be >= 0 (0: data.frames)")
  elif m.temporal:
    for field, frames in (("data.frames", config.data.frames), ("sample.frames", config.sample.frames)):
      if m.backbone != "wan" and (network := network_frames(config, frames)) > m.max_frames:
        latent = f" ({network} latent frames)" if network != frames else ""
        found.append(f"{field}={frames}{latent} exceeds model.max_frames={m.max_frames}")
  video_settings = [f"sample.{field}={config.sample[field]}" for field in ("frames", "video_length", "context_frames")
                    if config.sample[field]]
  if video_settings and not m.temporal:
    found.append(f"{', '.join(video_settings)}: a video model's settings, which an image model (model.temporal=False) "
                 "does not read; leave them at 0")
  if video_data and not m.temporal and m.backbone in ("unet", "dit"):
    found.append(f"data.dataset={config.data.dataset!r} holds clips, which an image model (model.temporal=False) "
                 "cannot read: set model.temporal=True (a video model), or train on images")
  if config.data.heldout_combinations:
    if config.data.dataset != "captioned_shapes":
      found.append("data.heldout_combinations needs data.dataset='captioned_shapes'")
    else:
      try:
        captioned_shapes.combinations(config.data.heldout_combinations)
      except ValueError as error:
        found.append(f"data.heldout_combinations: {error}")
  found += data_size_problems(config)
  if config.data.frame_stride < 1:
    found.append(f"data.frame_stride={config.data.frame_stride} must be >= 1 (1: every frame of a clip)")
  if not 0 <= config.data.image_fraction <= 1:
    found.append(f"data.image_fraction={config.data.image_fraction} must be in [0, 1]")
  found += dataset_problems(config.data) + moving_shapes_problems(config.data) + built_in_data_problems(config.data)
  if m.wan_low_noise_path and m.backbone != "wan":
    found.append(f"model.wan_low_noise_path: a low-noise expert of Wan's transformer; model.backbone={m.backbone!r}")
  if problem := low_noise_guidance_problem(config, config.sample, "sample."):
    found.append(problem)
  if m.lora_rank < 0:
    found.append(f"model.lora_rank={m.lora_rank} must be >= 0")
  elif m.lora_rank and not config.finetune.workdir and m.backbone in ("unet", "dit"):  # (others: a checkpoint's)
    found.append("model.lora_rank adapts a trained model, whose other weights it freezes: set finetune.workdir")
  if m.lora_convolutions and not m.lora_rank:
    found.append("model.lora_convolutions: the convolutions' updates need model.lora_rank > 0")
  elif m.lora_convolutions and m.backbone != "unet":
    found.append(f"model.lora_convolutions: the updated convolutions are the U-Net's residual blocks; "
                 f"model.backbone={m.backbone!r} has none")
  if m.lora_feed_forward and not m.lora_rank:
    found.append("model.lora_feed_forward: the feed-forward's updates need model.lora_rank > 0")
  if m.lora_text_encoder and not (m.lora_rank and config.text.pretrained_path and clip.is_text_model(
      config.text.pretrained_path)):
    found.append("model.lora_text_encoder: updates of a CLIP text encoder (text.pretrained_path, Stable Diffusion's) "
                 "need model.lora_rank > 0 and that encoder")
  if m.lora_text_encoder and config.text.embedding_cache:
    found.append("model.lora_text_encoder trains the text encoder's updates: its embeddings cannot be cached "
                 "(text.embedding_cache); turn one off")
  if m.lora_modulation and not m.lora_rank:
    found.append("model.lora_modulation: the scale-shift projections' updates need model.lora_rank > 0")
  if config.finetune.workdir and config.inflate.image_workdir:
    found.append("finetune.workdir and inflate.image_workdir both name a run to start from; set one")
  found += distillation.problems(config)
  if config.inflate.train_temporal_only and not (m.temporal and config.inflate.image_workdir):
    found.append("inflate.train_temporal_only needs a video model (model.temporal=True) inflated from "
                 "inflate.image_workdir")

  sr = config.superres
  if m.lowres_conditioning != (sr.lowres_resolution > 0):
    found.append("a super-resolution stage needs both model.lowres_conditioning=True and "
                 f"superres.lowres_resolution > 0 (got {m.lowres_conditioning} and {sr.lowres_resolution})")
  if sr.lowres_frames and not (m.temporal and 0 < sr.lowres_frames < config.data.frames
                               and config.data.frames % sr.lowres_frames == 0):
    found.append(f"superres.lowres_frames={sr.lowres_frames} needs a video model (model.temporal) whose "
                 f"data.frames={config.data.frames} it divides and is below")
  if sr.lowres_resolution > config.data.resolution or (sr.lowres_resolution == config.data.resolution
                                                       and not sr.lowres_frames):
    found.append(f"superres.lowres_resolution={sr.lowres_resolution} must be below data.resolution="
                 f"{config.data.resolution} (or equal to it in a temporal super-resolution stage)")
  if sr.residual and not (m.lowres_conditioning and sr.residual_scale > 0):
    found.append(f"superres.residual needs a super-resolution stage and superres.residual_scale > 0 (got "
                 f"{sr.residual_scale})")
  if not 0 <= sr.aug_max <= 1:
    found.append(f"superres.aug_max={sr.aug_max} must be in [0, 1]")

  t = config.train
  try:
    shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, device_count)))
  except ValueError as error:
    found.append(str(error))
  else:
    found += sequence_problems(config, shape["sequence"])
    group, local = shape["sequence"] * shape["tensor"], device_count // process_count
    if group > 1 and local % group:
      found.append(f"mesh.sequence * mesh.tensor = {group} devices share each example, but a process has {local}: "
                   "every process reads examples of its own, so those devices must be one process's; make the "
                   f"product divide {local}")
    data_parallel = shape["data"] * shape["fsdp"]
    if t.batch_size % data_parallel:
      found.append(f"train.batch_size={t.batch_size} is not divisible by the data-parallel size "
                   f"{data_parallel} (mesh.data * mesh.fsdp)")
    if (t.batch_size // max(t.grad_accum, 1)) % data_parallel:
      found.append(f"each micro-batch (train.batch_size / train.grad_accum = "
                   f"{t.batch_size // max(t.grad_accum, 1)}) must be divisible by {data_parallel} devices")
  if t.grad_accum < 1 or t.batch_size % t.grad_accum:
    found.append(f"train.grad_accum={t.grad_accum} must be >= 1 and divide train.batch_size={t.batch_size}")
  if t.batch_size % process_count:
    found.append(f"train.batch_size={t.batch_size} is not divisible by {process_count} processes")
  if not t.ema_decays or any(not 0 < decay < 1 for decay in t.ema_decays):
    found.append(f"train.ema_decays={tuple(t.ema_decays)} needs at least one decay in (0, 1)")
  for key in ("steps", "log_every", "checkpoint_every", "max_nonfinite"):
    if t[key] < 1:
      found.append(f"train.{key}={t[key]} must be >= 1")
  return found


def validate(config, device_count: int | None = None, process_count: int | None = None,
             reads_data: bool = False) -> None:
  """A ValueError listing the config's problems; reads_data: a job that reads the data, its data_source_problems
  too."""
  found = problems(config, device_count, process_count) + (data_source_problems(config.data) if reads_data else [])
  if found:
    raise ValueError("Invalid config:\n  - " + "\n  - ".join(found))
