"""The text-to-image (and text-to-video) network: T5 text encoder + U-Net, DiT, Wan's transformer, Stable
Diffusion's U-Net, SD3's or Flux's transformer (`model.backbone`), with a frozen autoencoder for latent diffusion
(`latent.autoencoder_path`), and its split into trainable / frozen parameters.

`TextToImage.encode(ids, mask)` -> text [batch, tokens, d_model]; `to_latents(x, key)` / `from_latents(z)`
map images (or videos) to what the network diffuses and back (the identity for a pixel model);
`TextToImage(x, logsnr, text, mask)`
(plus `lowres`, `aug_logsnr` for a super-resolution stage; `condition`, `image_condition(images, frames)`, for an
image-to-video Wan or one that starts clips at images) -> the network's output (x is [batch, h, w, c], or
[batch, frames, h, w, c] for a video model). Parameters live outside the module as pure dicts (see
train.py): `nnx.merge(graphdef, params, frozen)` rebuilds the module inside a jitted function.
"""

import pathlib

import jax.numpy as jnp
from flax import nnx

from diffusion_jax import objectives, schedules
from diffusion_jax.models import (abstract_modules, autoencoder, clip, dit, flux_text, flux_transformer, init_rngs,
                                  redux, sd3_text, sd3_transformer, sd_unet, sdxl_text, t5, unet, wan_transformer)
from diffusion_jax.text import tokenizers


class TextToImage(nnx.Module):

  def __init__(self, config, *, rngs: nnx.Rngs):
    """Every part randomly initialised; a pretrained text encoder (text.pretrained_path; with
    text.second_encoder_path, SDXL's pair; with model.backbone='sd3', SD3's CLIP pair and T5, 'flux' Flux's CLIP
    and T5), autoencoder (latent.autoencoder_path), Wan transformer (model.wan_path), Stable Diffusion U-Net
    (model.sd_unet_path), SD3 or Flux transformer (model.sd3_path, model.flux_path), CLIP image encoder
    (model.wan_image_encoder_path) or FLUX.1 Redux's image encoder and embedder (model.flux_redux_path)
    gets its structure from its config.json, its weights from `pretrained_weights`."""
    text_path, latent_path = config.text.pretrained_path, config.latent.autoencoder_path
    self.empty_prompt_ids = None
    # Where the condition's pooled embedding, repeated beside every token, starts (sdxl_text.split): SD3's and Flux's
    # joint_attention_dim, SDXL's U-Net's cross_attention_dim (set below); 0 for a condition of token states only.
    self.token_width = 0
    text_lora = config.model.lora_rank if config.model.lora_text_encoder else 0
    m = config.model
    if m.backbone in ("sd3", "flux"):  # SD3's two CLIP text transformers and T5, Flux's CLIP and T5; the null
      # condition the empty prompt's encoding
      if m.backbone == "sd3":
        sd3_config = sd3_transformer.read_config(m.sd3_path)
        self.token_width = sd3_config["joint_attention_dim"]
        self.text_encoder = sd3_text.build(config, self.token_width, rngs, text_lora)
      else:
        flux_config = flux_transformer.read_config(m.flux_path)
        self.token_width = flux_config["joint_attention_dim"]
        self.text_encoder = flux_text.build(config, rngs, text_lora)
      ids, _ = tokenizers.from_config(config)([""])
      self.empty_prompt_ids = tuple(int(i) for i in ids[0])
    elif config.text.second_encoder_path:  # SDXL's two CLIP text transformers; its null condition is zeros
      self.text_encoder = sdxl_text.TextEncoders(clip.read_text_config(text_path), clip.read_text_config(
          config.text.second_encoder_path, "text.second_encoder_path"), rngs=rngs, lora_rank=text_lora)
    elif sdxl_refiner(config):  # the SDXL refiner's: SDXL's second encoder alone; its null condition is the empty
      # prompt's encoding
      self.text_encoder = sdxl_text.TextEncoders(None, clip.read_text_config(text_path), rngs=rngs,
                                                 lora_rank=text_lora)
      ids, _ = tokenizers.from_config(config)([""])
      self.empty_prompt_ids = tuple(int(i) for i in ids[0])
    elif text_path and clip.is_text_model(text_path):  # Stable Diffusion's: CLIP's text transformer
      self.text_encoder = clip.TextModel(clip.read_text_config(text_path), rngs=rngs, lora_rank=text_lora)
      ids, _ = tokenizers.from_config(config)([""])
      self.empty_prompt_ids = tuple(int(i) for i in ids[0])  # (a static attribute: part of the graphdef)
    else:
      self.text_encoder = t5.T5Encoder(t5.read_hf_config(text_path, config.text.t5.dtype) if text_path
                                       else config.text.t5, rngs=rngs)
    self.backbone, self.image_to_video, self.first_last_frame, self.inpainting = m.backbone, False, False, False
    self.kontext, self.control = False, False
    self.redux = (redux.Redux(*redux.configs(m.flux_redux_path), rngs=rngs)  # FLUX.1 Redux: an image's tokens
                  if m.backbone == "flux" and m.flux_redux_path else None)
    self.clean_first_frame = m.backbone == "wan" and m.wan_clean_first_frame  # Wan 2.2 TI2V's image-to-video mode
    self.image_encoder = (clip.VisionModel(clip.read_vision_config(m.wan_image_encoder_path,
                                                                   "model.wan_image_encoder_path"), rngs=rngs)
                          if m.backbone == "wan" and m.wan_image_encoder_path else None)  # Wan 2.1 I2V's CLIP
    # A checkpoint's network (Wan, SD3, Flux, SD's U-Net): its config.json's structure, the config's computation
    options = dict(rngs=rngs, dtype=m.dtype, attention=m.attention, remat_policy=m.remat_policy if m.remat else None,
                   lora_rank=m.lora_rank, ff_lora_rank=m.lora_rank if m.lora_feed_forward else 0)
    if self.backbone == "dit":
      self.dit = dit.DiT(m, rngs=rngs)
    elif self.backbone == "wan":  # (with model.wan_low_noise_path, a pair of experts: wan for high noise)
      wan = lambda path: wan_transformer.WanTransformer(wan_transformer.read_config(path), **options)
      self.wan, self.wan_low = wan(m.wan_path), wan(m.wan_low_noise_path) if m.wan_low_noise_path else None
      self.wan_boundary = m.wan_boundary
      wan_config = wan_transformer.read_config(m.wan_path)
      self.image_to_video = wan_transformer.is_image_to_video(wan_config)
      self.first_last_frame = wan_transformer.is_first_last_frame(wan_config)  # Wan 2.1 FLF2V
      self.mask_channels = wan_config["in_channels"] - 2 * wan_config["out_channels"]
    elif self.backbone == "sd3":
      self.sd3 = sd3_transformer.SD3Transformer(sd3_config, **options)  # (sd3_config, flux_config: read above)
    elif self.backbone == "flux":
      self.inpainting = flux_transformer.is_fill(flux_config)  # FLUX.1 Fill
      self.kontext = m.flux_kontext  # FLUX.1 Kontext: a reference image's latents (reference_condition)
      self.control = flux_transformer.is_control(flux_config)  # FLUX.1 Depth / Canny (control_condition)
      self.flux = flux_transformer.FluxTransformer(flux_config, **options)
      self.flux_guidance = m.flux_guidance
    elif self.backbone == "sd_unet":
      unet_config = sd_unet.read_config(m.sd_unet_path)
      self.inpainting = sd_unet.is_inpainting(unet_config)
      self.sd_unet = sd_unet.SDUNet(unet_config, **options)
      if self.sd_unet.add_embedding is not None:  # SDXL's U-Net reads the second encoder's pooled embedding
        self.token_width = self.sd_unet.cross_attention_dim
    else:
      self.unet = unet.UNet(m, rngs=rngs)
    # The SDXL refiner's aesthetic score id where no size_ids are given (data.aesthetic_score); None: not a refiner
    self.aesthetic_score = config.data.aesthetic_score if sdxl_refiner(config) else None
    vae = autoencoder.read_config(latent_path) if latent_path else None
    self.autoencoder = autoencoder.AutoencoderKL(vae, rngs=rngs) if vae else None
    self.pixels_per_latent = autoencoder.downsampling_factor(vae) if vae else 1

  def encode(self, ids, mask):
    return self.text_encoder(ids, mask)

  def null_condition(self, text, mask):
    """(text [batch, tokens, width], mask [batch, tokens]) of the condition classifier-free guidance drops to, for
    a batch like (text, mask): zeros with an all-False mask (SDXL's too); with a CLIP text encoder (Stable Diffusion
    1.x and 2.x's) or SD3's or Flux's encoders, the encoding of the empty prompt, which their pipelines use and their
    networks learnt."""
    if self.empty_prompt_ids is None:
      return jnp.zeros_like(text), jnp.zeros_like(mask)
    empty = self.encode(jnp.asarray(self.empty_prompt_ids, jnp.int32)[None], None).astype(text.dtype)
    return jnp.broadcast_to(empty, text.shape), jnp.zeros_like(mask)

  def with_image_tokens(self, text, mask, images, prompt_scale: float = 1.0, pooled_scale: float = 1.0):
    """FLUX.1 Redux's condition: (text [batch, tokens, width], mask [batch, tokens]) of encode's followed by the
    Redux tokens of images [batch, size, size, 3] in [-1, 1] (redux.image_pixels' size), as FluxPriorReduxPipeline
    appends them to the prompt's T5 states, both times prompt_scale, the pooled embedding times pooled_scale (its
    columns of the image's tokens zero: sdxl_text.split reads token 0's). Images [batch, k, size, size, 3] are
    blended as that pipeline blends k images: the sum of the k conditions (the tokens summed, the text k times)."""
    count = images.shape[1] if images.ndim == 5 else 1
    tokens = self.redux(images.reshape((-1,) + images.shape[-3:]))
    tokens = tokens.reshape((-1, count) + tokens.shape[1:]).sum(axis=1).astype(text.dtype) * prompt_scale
    width = tokens.shape[-1]  # (T5's; the pooled embedding's columns follow)
    text = jnp.concatenate([text[..., :width] * (count * prompt_scale), text[..., width:] * (count * pooled_scale)],
                           axis=-1)
    tokens = jnp.pad(tokens, ((0, 0), (0, 0), (0, text.shape[-1] - width)))
    return (jnp.concatenate([text, tokens], axis=1),
            jnp.concatenate([mask, jnp.ones(tokens.shape[:2], mask.dtype)], axis=1))

  def to_latents(self, x, key=None):
    """Images [batch, (frames,) h, w, c] in [-1, 1] -> what the network diffuses (a posterior draw with a key)."""
    return x if self.autoencoder is None else self.autoencoder.encode(x, key)

  def latents_from_moments(self, mean, logvar, key):
    """A latent model's latents drawn from cached posterior moments (`data/latent_cache.py`)."""
    return self.autoencoder.latents_from_moments(mean, logvar, key)

  def from_latents(self, z):
    return z if self.autoencoder is None else self.autoencoder.decode(z)

  def image_condition(self, images, frames: int, last=None, last_given=None) -> dict:
    """An image-to-video model's condition for clips of `frames` frames that start at images [batch, h, w, c] in
    [-1, 1] (and, where last_given [batch] bool, end at last [batch, h, w, c]): {"latents": [batch, latent frames,
    h, w, mask + latent channels] (wan_transformer.image_condition of the latents' mean of the clip that is the
    image, zero frames and the last image or a zero frame, as Wan's pipelines encode it), and with an image encoder
    (Wan 2.1's) "image": its CLIP tokens [batch, tokens, width]; a first-last-frame model's, which needs `last`:
    the first image's then the last's}. A model that starts clips at images (Wan 2.2
    TI2V's mode; no last image): {"first_latents": the latents' mean of each image alone [batch, 1, h, w, c], its
    clip's first latent frame, "first_given": [batch] True}."""
    if self.clean_first_frame:
      return {"first_latents": self.to_latents(images[:, None]), "first_given": jnp.ones(images.shape[:1], bool)}
    given = jnp.zeros(images.shape[:1], bool) if last is None or frames < 2 else last_given
    end = jnp.where(given[:, None, None, None], images if last is None else last, 0.0)[:, None]
    rest = jnp.zeros((images.shape[0], max(frames - 2, 0)) + images.shape[1:], images.dtype)
    video = jnp.concatenate([images[:, None], rest, end.astype(images.dtype)], axis=1)[:, :frames]
    condition = {"latents": wan_transformer.image_condition(self.to_latents(video), self.mask_channels, given)}
    if self.first_last_frame:
      if last is None:
        raise ValueError("A first-last-frame model (Wan 2.1 FLF2V) needs the last image of each clip too")
      condition["image"] = jnp.concatenate([self.image_encoder.penultimate(images),
                                            self.image_encoder.penultimate(last)], axis=1)
    elif self.image_encoder is not None:
      condition["image"] = self.image_encoder.penultimate(images)
    return condition

  def inpainting_condition(self, images, keep) -> dict:
    """An inpainting model's condition (SD's inpainting U-Net, FLUX.1 Fill: `inpainting`) for images [batch, h, w,
    3] in [-1, 1] whose region keep [batch, h, w, 1] (1: kept, 0: generated anew) marks as known: {"mask": where to
    generate at the latents' size, [batch, h/f, w/f, 1] (nearest, as SD's pipelines shrink it) or, FLUX.1 Fill's,
    [batch, h/f, w/f, f * f] every pixel's (an f x f block of a latent pixel, row-major, as FluxFillPipeline lays it
    out), "masked_latents": the latents' mean of the images with their generated region zeroed [batch, h/f, w/f,
    c]}. Without images (None), all of it is generated (a text-to-image sample)."""
    f = self.pixels_per_latent
    generated = 1.0 - keep.astype(jnp.float32)
    masked = jnp.zeros(keep.shape[:3] + (3,)) if images is None else images * (keep > 0)
    if images is None:
      generated = jnp.ones_like(generated)
    b, h, w, _ = generated.shape
    if self.backbone == "flux":
      mask = generated.reshape(b, h // f, f, w // f, f).transpose(0, 1, 3, 2, 4).reshape(b, h // f, w // f, f * f)
    else:
      mask = generated[:, ::f, ::f]
    return {"mask": mask, "masked_latents": self.to_latents(masked)}

  def reference_condition(self, images) -> dict:
    """FLUX.1 Kontext's condition for reference images [batch, h, w, 3] in [-1, 1]: {"reference_latents": their
    latents' mean [batch, h/f, w/f, c]}, whose tokens the network attends to beside the image's."""
    return {"reference_latents": self.to_latents(images)}

  def control_condition(self, images) -> dict:
    """FLUX.1 Depth / Canny's condition for control images [batch, h, w, 3] in [-1, 1] (depth maps, edge maps) at the
    samples' size: {"control_latents": their latents' mean [batch, h/f, w/f, c]}, read beside the latents
    (FluxControlPipeline draws them from the posterior instead)."""
    return {"control_latents": self.to_latents(images)}

  def paired_condition(self, images) -> dict:
    """The condition of images [batch, h, w, 3] in [-1, 1] paired with what the model makes (a pair's reference
    image, data.reference_key; sampling's --init_image): FLUX.1 Kontext's reference_condition, FLUX.1 Depth /
    Canny's control_condition."""
    return self.reference_condition(images) if self.kontext else self.control_condition(images)

  def own_condition(self, clips) -> dict:
    """An image-to-video model's condition for clips [batch, frames, h, w, c] in [-1, 1] of their own first frame
    (and a first-last-frame model's, last), what training reads."""
    if not self.first_last_frame:
      return self.image_condition(clips[:, 0], clips.shape[1])
    return self.image_condition(clips[:, 0], clips.shape[1], clips[:, -1], jnp.ones(clips.shape[:1], bool))

  def __call__(self, x, logsnr, text, text_mask, lowres=None, aug_logsnr=None, dropout_key=None, is_video=None,
               condition=None, expert=None, size_ids=None, skip_layers=(), flux_guidance=None, aesthetic_score=None):
    """skip_layers: SD3's blocks left out (skip-layer guidance's pass). flux_guidance: the guidance scale FLUX.1 dev (a
    guidance-distilled Flux) is told to follow (None: model.flux_guidance, the one it trained with). size_ids: SDXL's
    size and crop ids [batch, 6] (the refiner's [batch, 5], the last an aesthetic score; data.size_ids; None:
    sdxl_text.time_ids of x's image size, as sampling's, and the refiner's aesthetic_score, default
    data.aesthetic_score; read by the refiner alone). expert:
    with a pair of Wan experts, 'high' or 'low' runs that one on every example (a batch at its noise levels); None gives
    each example its noise level's. condition: an image-to-video model's (image_condition), an inpainting model's
    (inpainting_condition), FLUX.1 Kontext's (reference_condition: optional), FLUX.1 Depth / Canny's
    (control_condition); a model that starts clips at images (Wan
    2.2 TI2V), optionally {"first_latents": [batch, 1, h, w, c], "first_given": [batch] bool}: where given, x's first
    latent frame is read as those latents at timestep 0 (the other frames' tokens at logsnr's, diffusers'
    expand_timesteps) and its output is the velocity toward them from x (a sampler keeps them; the loss on them is 0
    when they are the clip's own)."""
    if self.image_to_video and condition is None:
      raise ValueError("This image-to-video model needs the condition of the images its clips start at "
                       "(image_condition)")
    if self.inpainting and condition is None:
      raise ValueError("This inpainting model needs the condition of the image it completes (inpainting_condition)")
    if self.control and condition is None:
      raise ValueError("This FLUX.1 Depth / Canny model needs the condition of its control image (control_condition)")
    if condition is not None and not (self.image_to_video or self.clean_first_frame or self.inpainting or
                                      self.kontext or self.control):
      raise ValueError("Only an image-to-video, inpainting, FLUX.1 Kontext or Depth / Canny model (or one that "
                       "starts clips at images) reads a condition")
    if self.backbone == "wan":  # clips only, no super-resolution inputs (config_checks.wan_problems)
      timestep, condition = wan_transformer.timestep(logsnr), condition or {}
      x_t, clean = x, None
      if "first_latents" in condition:  # [batch, frames]: the given first frames', at timestep 0
        clean = condition["first_given"][:, None] & (jnp.arange(x.shape[1]) == 0)[None]
        x = jnp.where(clean[..., None, None, None], condition["first_latents"].astype(x.dtype), x)
        timestep = jnp.where(clean, 0.0, timestep[:, None])
      if "latents" in condition:
        x = jnp.concatenate([x, condition["latents"].astype(x.dtype)], axis=-1)
      image = condition.get("image")
      if self.wan_low is None or expert is not None:
        out = (self.wan_low if expert == "low" else self.wan)(x, timestep, text, text_mask, image)
      else:
        out = wan_transformer.experts(self.wan, self.wan_low, 1000 * self.wan_boundary, x, timestep, text, text_mask,
                                      image)
      if clean is None:
        return out
      first = condition["first_latents"].astype(jnp.float32)
      alpha, sigma = schedules.alpha_sigma_from_logsnr(logsnr, "flow")
      toward_first = objectives.eps_from_x0(first, x_t.astype(jnp.float32), alpha, sigma) - first
      return jnp.where(clean[..., None, None, None], toward_first, out)
    if self.backbone in ("sd3", "flux"):  # images only; every text token, as their pipelines (config_checks)
      tokens, pooled = sdxl_text.split(text, self.token_width)
      timestep = wan_transformer.timestep(logsnr)  # (the same flow timestep as Wan's)
      if self.backbone == "sd3":
        return self.sd3(x, timestep, tokens, pooled, skip_layers)
      guidance = (jnp.full(x.shape[:1], self.flux_guidance if flux_guidance is None else flux_guidance, jnp.float32)
                  if self.flux.guided else None)
      if self.inpainting:  # FLUX.1 Fill: the latents, the known image's latents, where to generate (its order)
        x = jnp.concatenate([x, condition["masked_latents"].astype(x.dtype), condition["mask"].astype(x.dtype)], -1)
      if self.control:  # FLUX.1 Depth / Canny: the latents, then the control image's
        x = jnp.concatenate([x, condition["control_latents"].astype(x.dtype)], -1)
      reference = condition["reference_latents"].astype(x.dtype) if self.kontext and condition else None
      return self.flux(x, timestep, tokens, pooled, guidance, reference)
    if self.backbone == "sd_unet":  # images only; every text token, as SD's pipelines (config_checks.sd_unet_problems)
      if self.inpainting:  # the latents, where to generate, the known image's latents (diffusers' channel order)
        x = jnp.concatenate([x, condition["mask"].astype(x.dtype), condition["masked_latents"].astype(x.dtype)], -1)
      if self.sd_unet.add_embedding is None:
        return self.sd_unet(x, sd_unet.timestep(logsnr), text)
      tokens, pooled = sdxl_text.split(text, self.token_width)  # SDXL
      if size_ids is None:
        score = None if self.aesthetic_score is None else (
            self.aesthetic_score if aesthetic_score is None else aesthetic_score)
        size_ids = sdxl_text.time_ids(x.shape[0], *(self.pixels_per_latent * n for n in x.shape[1:3]), score)
      return self.sd_unet(x, sd_unet.timestep(logsnr), tokens, pooled, size_ids)
    network = self.dit if self.backbone == "dit" else self.unet
    return network(x, logsnr, text, text_mask, lowres=lowres, aug_logsnr=aug_logsnr, dropout_key=dropout_key,
                   is_video=is_video)


def image_to_video(config) -> bool:
  """Whether the config's network animates images: an image-to-video Wan (model.wan_path's config.json)."""
  return config.model.backbone == "wan" and wan_transformer.is_image_to_video(
      wan_transformer.read_config(config.model.wan_path))


def first_last_frame(config) -> bool:
  """Whether the config's network makes clips between two given images (a first-last-frame Wan: Wan 2.1 FLF2V)."""
  return config.model.backbone == "wan" and wan_transformer.is_first_last_frame(
      wan_transformer.read_config(config.model.wan_path))


def flux_control(config) -> bool:
  """Whether the config's network is FLUX.1 Depth / Canny's, which samples from a control image (model.flux_path's
  config.json)."""
  return config.model.backbone == "flux" and flux_transformer.is_control(
      flux_transformer.read_config(config.model.flux_path))


def starts_clips_at_images(config) -> bool:
  """Whether the config's network may start clips at given images, reading their latent frame clean (a Wan with
  model.wan_clean_first_frame: Wan 2.2 TI2V's mode); it makes clips from text alone too."""
  return config.model.backbone == "wan" and config.model.wan_clean_first_frame


BUILT_FROM = ("model", "text", "latent")  # the config sections whose paths name what a model is built from


def abstract(config):
  """The model with ShapeDtypeStruct parameters (nothing allocated, no weights file read: a T5-XXL's 19 GB), a new
  module each call; traced once per `model_key` (abstract_modules)."""
  return abstract_modules.cached(lambda: TextToImage(config, rngs=init_rngs.seeded(config.seed)), model_key(config))


def model_key(config) -> tuple:
  """What fixes the config's model (a hashable): the config's JSON and the state of the files it names."""
  return config.to_json_best_effort(sort_keys=True), named_files(config)


def named_files(config) -> tuple:
  """(path, size, modification time) of each file a string field of BUILT_FROM names and of the JSON files in (and
  one folder below) each folder one names: what a model's shapes are read from (not the data's folders)."""
  stamps, fields = [], [config[section].to_dict() for section in BUILT_FROM]
  while fields:
    for value in fields.pop().values():
      if isinstance(value, dict):
        fields.append(value)
      elif isinstance(value, str) and value and (path := pathlib.Path(value)).exists():
        files = [path] if path.is_file() else sorted([*path.glob("*.json"), *path.glob("*/config.json")])
        stamps += [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
  return tuple(stamps)


def pretrained_parts(config) -> dict:
  """{part: a function that reads its weights (a module)} of the parts the config names files for: 'text_encoder',
  'autoencoder', 'wan' (and 'wan_low', 'image_encoder'), 'sd_unet', 'sd3' or 'flux' (and 'redux'). Nothing is
  read."""
  m, t = config.model, config.text
  parts = {}
  if m.backbone == "wan":
    parts["wan"] = lambda: wan_transformer.load_diffusers(m.wan_path)
    if m.wan_image_encoder_path:
      parts["image_encoder"] = lambda: clip.load_vision(m.wan_image_encoder_path)
    if m.wan_low_noise_path:
      parts["wan_low"] = lambda: wan_transformer.load_diffusers(m.wan_low_noise_path, "model.wan_low_noise_path")
  if m.backbone == "sd_unet":
    parts["sd_unet"] = lambda: sd_unet.load_diffusers(m.sd_unet_path)
  if m.backbone == "sd3":
    parts["sd3"] = lambda: sd3_transformer.load_diffusers(m.sd3_path)
    parts["text_encoder"] = lambda: sd3_text.load(config, sd3_transformer.read_config(m.sd3_path)[
        "joint_attention_dim"])
  elif m.backbone == "flux":
    parts["flux"] = lambda: flux_transformer.load_diffusers(m.flux_path)
    parts["text_encoder"] = lambda: flux_text.load(config)
    if m.flux_redux_path:
      parts["redux"] = lambda: redux.load(m.flux_redux_path)
  elif t.second_encoder_path:
    parts["text_encoder"] = lambda: sdxl_text.load(t.pretrained_path, t.second_encoder_path)
  elif sdxl_refiner(config):
    parts["text_encoder"] = lambda: sdxl_text.load("", t.pretrained_path, "text.pretrained_path")
  elif t.pretrained_path and clip.is_text_model(t.pretrained_path):
    parts["text_encoder"] = lambda: clip.load_text(t.pretrained_path)
  elif t.pretrained_path:
    parts["text_encoder"] = lambda: t5.load_hf_encoder(t.pretrained_path, t.t5.dtype)
  if config.latent.autoencoder_path:
    parts["autoencoder"] = lambda: autoencoder.load_diffusers(config.latent.autoencoder_path)
  return parts


def sdxl_refiner(config) -> bool:
  """Whether the config's network is the SDXL refiner's U-Net: SDXL's (addition_embed_type 'text_time') with one
  text encoder, SDXL's second (text.pretrained_path: a CLIPTextModelWithProjection; config_checks)."""
  return (config.model.backbone == "sd_unet" and not config.text.second_encoder_path
          and sd_unet.read_config(config.model.sd_unet_path)["addition_embed_type"] == sd_unet.TEXT_TIME)


def pretrained_weights(config) -> dict:
  """{part: pure dict of its weights} (pretrained_parts, read on the host), to replace those parts of a new model's
  state."""
  return {name: nnx.to_pure_dict(nnx.state(read())) for name, read in pretrained_parts(config).items()}


def is_temporal(path, _) -> bool:
  """Filter: parameters of the temporal layers of a video U-Net or DiT (`unet.temporal_*`, `dit.temporal_*`)."""
  return any(str(key).startswith("temporal_") for key in path)


def is_lora(path, _=None) -> bool:
  """Filter: the low-rank updates of a LoRA (`model.lora_rank`; `*_lora` modules)."""
  return any(str(key).endswith("_lora") for key in path)


def trainable_filter(config):
  """Which parameters the optimizer updates: all but the autoencoder's and an image encoder's (Wan 2.1
  image-to-video's CLIP, FLUX.1 Redux's); also not a frozen text encoder's; or
  only the temporal layers of an inflated video model (`inflate.train_temporal_only`); or only the low-rank
  updates of a LoRA fine-tune (`model.lora_rank`)."""
  if config.model.lora_rank:
    return nnx.All(nnx.Param, is_lora)
  if config.inflate.train_temporal_only:
    return nnx.All(nnx.Param, is_temporal)
  not_autoencoder = nnx.All(nnx.Not(nnx.PathContains("autoencoder")), nnx.Not(nnx.PathContains("image_encoder")),
                            nnx.Not(nnx.PathContains("redux")))
  if config.text.trainable:
    return nnx.All(nnx.Param, not_autoencoder)
  return nnx.All(nnx.Param, not_autoencoder, nnx.Not(nnx.PathContains("text_encoder")))


def split(model, config):
  """model -> (graphdef, trainable nnx.State, frozen nnx.State)."""
  return nnx.split(model, trainable_filter(config), ...)
