"""Sampling job: generate images (or videos) for prompts from a training workdir's checkpoint, or from the
pretrained checkpoints a config reads (a Stable Diffusion, SDXL, SD3, Flux or Wan root), as they are.

  python -m diffusion_jax.sample --workdir=DIR --prompts=prompts.txt [--output_dir=DIR/samples/...]
  python -m diffusion_jax.sample --config=configs/flux.py:/path/to/FLUX.1-dev --output_dir=DIR --prompts=...
  python -m diffusion_jax.sample --config=configs/stable_diffusion.py:/path/to/sdxl-base --output_dir=DIR
                                 --refiner=configs/stable_diffusion.py:/path/to/sdxl-refiner [--denoising_end=0.8]

Flags:
  --workdir         training workdir (holds config.json and checkpoints/); this, --config or --cascade is required
  --config          instead of --workdir: a config file whose every part is read from pretrained checkpoints
                    (configs/stable_diffusion.py:ROOT, stable_diffusion3.py, flux.py, wan_t2v.py: a LoRA's updates
                    start at zero), sampled without training, --config.FIELD=VALUE overriding its fields; a config
                    that trains a part from scratch (the demo's) is refused, naming the parts; needs --output_dir;
                    no --step or autoguidance guide
  --step            checkpoint step (default: the latest)
  --prompts         text file, one prompt per line, or .jsonl with {"prompt", "seed"?, "guidance_scale"?,
                    "guidance_interval"? ("LOW:HIGH", [low, high] or "none"), "negative_prompt"?, "init_image"?
                    (FLUX.1 Redux: a list of images to blend), "mask"?, "init_video"?, "last_image"?, "strength"?,
                    "source_prompt"?, "lora_scale"? (with --lora: every adapter's scale for this prompt, or a list
                    with one per --lora)} (per-prompt settings; image and clip paths relative to the file); default:
                    the config's sample.prompts
  --output_dir      where PNGs, grid.png and manifest.jsonl go (default: WORKDIR/samples/step_<N>, or where that
                    holds samples already, the training run's say, step_<N>.2, .3, ...: none is overwritten)
  --sampler         one of samplers.SAMPLERS (default: config sample.sampler)
  --steps           sampler steps, >= 1 (default: config sample.steps)
  --guidance_scale  classifier-free guidance scale, >= 0 (default: config sample.guidance_scale)
  --guidance_scale_low_noise a pair of Wan experts (Wan 2.2 A14B): the guidance scale of the steps the low-noise
                    expert takes (diffusers' guidance_scale_2), >= 0; -1 = --guidance_scale (default: config
                    sample.guidance_scale_low_noise, -1); a prompt's guidance_scale sets the high-noise steps'
  --guidance_interval LOW:HIGH: guidance only at the steps whose noise level sigma/alpha (EDM's sigma, exp(-logsnr/2))
                    is in (LOW, HIGH], the others unguided and without the unconditional pass (Kynkaanniemi et al.
                    2024); none = every step (default: config sample.guidance_interval, () = every step)
  --num_per_prompt  images per prompt (default: config sample.num_per_prompt)
  --negative_prompt text that classifier-free guidance steers away from: the unconditional branch reads it
                    instead of the null condition (default: config sample.negative_prompt, "" = none; no effect
                    at guidance scale 1, where that branch is not run)
  --seed            noise seed (default: config sample.seed)
  --use_ema         sample with the first EMA copy of the weights (default: config sample.use_ema)
  --frames          video models: frames per clip, up to model.max_frames (a causal autoencoder's latent model:
                    1 + a multiple of 4, its latent frames up to model.max_frames; default: config sample.frames,
                    0 = data.frames)
  --flow_shift      a flow schedule's sampling grid shifted by this (sigma = s t / (1 + (s - 1) t); default: config
                    sample.flow_shift, 0 = the training schedule's diffusion.schedule_params.shift, or with
                    sample.resolution_shift (Flux's) the shift for the samples' token count; Wan's pipelines
                    sample 480p at 3 and 720p at 5)
  --flux_guidance   FLUX.1 dev (a guidance-distilled Flux, guidance_embeds): the guidance scale it is told to follow,
                    >= 0, what its pipelines call guidance_scale (default: config sample.flux_guidance, -1 =
                    model.flux_guidance, 3.5 in configs/flux.py); refused for other models. Its --guidance_scale
                    is classifier-free guidance (diffusers' true_cfg_scale), 1 (none) in configs/flux.py
  --skip_layers     SD3 (model.backbone='sd3'): skip-layer guidance, the comma-separated indices of the transformer
                    blocks a third pass leaves out (SD 3.5 Medium's model card: 7,8,9), guided away from at the
                    steps between sample.skip_layer_start and sample.skip_layer_stop (fractions of the steps: 0.01,
                    0.2) by --skip_layer_scale, as StableDiffusion3Pipeline's skip_guidance_layers; none = off
                    (default: config sample.skip_layers, () = off); with classifier-free guidance only
  --skip_layer_scale skip-layer guidance's scale, >= 0 (default: config sample.skip_layer_scale, 2.8: the pipeline's)
  --aesthetic_score the SDXL refiner (--config's or --refiner's): the aesthetic score its U-Net is told the sample
                    has, a time id (default: its config's sample.aesthetic_score, 6: its pipeline's); refused for
                    other models
  --negative_aesthetic_score  the SDXL refiner: the aesthetic score guidance's other branch is told (default: its
                    config's sample.negative_aesthetic_score, 2.5: its pipeline's); refused for other models
  --height, --width the samples' size in pixels, any the network divides (its autoencoder's downsampling times
                    the U-Net's levels' or the patch of a DiT or Wan: Wan's 480 x 832, say); --init_image, --mask
                    and --init_video are brought to it (default: config sample.height and sample.width, 0 = the
                    training images', data.resolution and data.width; not a super-resolution stage's)
  --batch_size      samples generated at once over all devices, rounded up to a multiple of the device count
                    (default: config sample.batch_size); more are generated batch by batch, with progress
  --video_length    video models: frames per video, more than a clip's (--frames) by autoregressive extension
                    (video_extension.py): each window keeps the last --context_frames frames made so far and
                    generates the rest of a clip after them (default: config sample.video_length, 0 = one clip)
  --context_frames  with --video_length: frames each window keeps, 1 to a clip's frames - 1; on a causal
                    autoencoder's latents 1 + a multiple of 4, whole latent frames (default: config
                    sample.context_frames, 0 = half a clip; causal: the 1 + a multiple of 4 nearest half a clip)
  --init_image      an image (any size: scaled to cover the samples' size, centre crop) to edit for every
                    prompt without its own, instead of generating from noise (image-to-image, SDEdit; editing.py):
                    it is noised to --strength and the rest of the sampling grid is run; a video model animates it
                    (image-to-video): it is every clip's first frame, the other frames start from it noised; an
                    image-to-video Wan (Wan 2.1 or 2.2 I2V) reads it as its condition and makes the whole clip from
                    noise (every prompt needs one; no --strength, --edit_noise, --mask), and so does a Wan that
                    starts clips at images (model.wan_clean_first_frame, Wan 2.2 TI2V), reading its latent frame
                    clean as the clip's first (every prompt of the call then needs one; no --last_image); FLUX.1
                    Kontext (model.flux_kontext) reads it as a reference image to follow, sampling from noise
                    beside it (no --mask, --strength, --edit_noise), at the size --kontext_resize says; FLUX.1
                    Depth / Canny reads it as its control image (a depth map, an edge map: every prompt needs one),
                    brought to the samples' size, sampling from noise beside it (no --mask, --strength,
                    --edit_noise); FLUX.1 Redux (model.flux_redux_path) reads it as an image to vary, its
                    SigLIP tokens after the prompt's (the same refused; unguided)
  --kontext_resize  FLUX.1 Kontext: the size of its reference images, "preferred" (the resolution it trained at
                    nearest the image's aspect ratio, as FluxKontextPipeline) or "own" (the image's), either
                    rounded down to 16 pixels (default: config sample.kontext_resize, "preferred")
  --redux_prompt_scale  FLUX.1 Redux: the scale of the prompt's T5 states and the image's tokens after them
                    (FluxPriorReduxPipeline's prompt_embeds_scale; below 1, a looser variation; default: config
                    sample.redux_prompt_scale, 1)
  --redux_pooled_scale  FLUX.1 Redux: the scale of the pooled CLIP embedding (its pooled_prompt_embeds_scale;
                    default: config sample.redux_pooled_scale, 1)
  --init_video      video models: a clip (.gif or .mp4, its first --frames frames, each brought to the samples'
                    size as --init_image) to edit for every prompt without an edit of its own (video-to-video:
                    SDEdit over the whole clip, nothing kept)
  --last_image      with --init_image, an image-to-video Wan without CLIP tokens (Wan 2.2 I2V) or a first-last-frame
                    one (Wan 2.1 FLF2V, which needs it): the image every clip ends at, its last frame (diffusers'
                    last_image; read as --init_image is)
  --mask            with --init_image, image models: inpainting mask of the same size, white = generate anew,
                    black or transparent = keep (the kept pixels of the output are the image's)
  --strength        with --init_image or --init_video: the part of the sampling grid run, in (0, 1], for every edit
                    without a "strength" of its own (default: config sample.strength, 0.8): 1 starts from pure
                    noise, lower keeps more of the image; with --mask, 1 ignores what the masked region held
  --edit_noise      with --init_image or --init_video: what the edit starts from at --strength: random (SDEdit:
                    the image plus fresh noise), inversion (DDIM inversion: the noise from which the unconditional
                    model's deterministic path leads back to the image, found by running it backwards; keeps more of
                    the image at a strength), source_inversion (the same for the model given --source_prompt, which
                    guidance's other branch then reads: under guidance it keeps more still) or null_text_inversion
                    (source inversion, then guidance's other text optimised step by step so that the source prompt's
                    guided steps retrace the inversion: config sample.null_text_iterations Adam steps of
                    sample.null_text_learning_rate per step; needs --sampler=ddim; editing.py) (default: config
                    sample.edit_noise, random)
  --null_text_iterations
                    with --edit_noise=null_text_inversion: Adam steps on guidance's other text per sampler step, >= 0
                    (0 = source inversion; default: config sample.null_text_iterations, 10)
  --source_prompt   with --edit_noise=source_inversion or null_text_inversion: what the image or clip to edit shows,
                    for every edit without a "source_prompt" of its own (e.g. "a red square" to edit toward "a blue
                    square")
  --reconstruction_guidance
                    with --init_image or --video_length: > 0 also moves the estimate of what is generated along the
                    gradient that makes the kept part's estimate agree with it (Ho et al. 2022; a backward pass
                    through the network at every step; default: config sample.reconstruction_guidance, 0 = none)
  --lora            FILE[:SCALE], repeatable: a LoRA adapter (lora.py; python -m diffusion_jax.lora exports one from a
                    LoRA fine-tune) fused into the workdir's weights at SCALE (default 1; 0 = without it; several
                    add up), e.g. a LoRA's updates applied to the run it was trained from at half strength (a
                    cascade's stages take theirs as --cascade.stages[K].lora=FILE[:SCALE],...)
  --guide_workdir   autoguidance (autoguidance.py): a workdir of this experiment whose weaker model (an earlier
                    checkpoint, a smaller run) conditioned on the prompt is guidance's other branch instead of the
                    unconditional model; refused with negative prompts and when it does not see or predict what
                    the model does (autoguidance.GUIDE_FIELDS)
  --guide_step      the guide's checkpoint (default: its latest); without --guide_workdir, a checkpoint of --workdir
                    (a cascade's stages take theirs as --cascade.stages[K].guide_workdir=DIR and guide_step=N)
  --refiner         an ensemble of experts (refiner.py; SDXL's base and refiner): a config read from pretrained
                    checkpoints, as --config's (configs/stable_diffusion.py:/path/to/stable-diffusion-xl-refiner-1.0;
                    --refiner.FIELD=VALUE overriding its fields), whose model runs the last part of every sample's
                    grid from the model's latents, with the model's sampler, steps, guidance, size and negative
                    prompts and its own aesthetic scores; both must share the latents' shape and the schedule; no
                    edits, autoguidance or --cascade
  --denoising_end   with --refiner (or --refiner_workdir): the part of the grid the model runs, in (0, 1): the
                    steps at the training schedule's noise level at t = 1 - it and noisier (on SD's DDPM table:
                    timestep round(1000 (1 - it)) and above, the cutoff of diffusers' denoising_end and
                    denoising_start) (default 0.8)
  --refiner_lora    with --refiner (or --refiner_workdir): FILE[:SCALE], repeatable: a LoRA adapter fused into the
                    refiner's weights (as --lora into the model's; a prompt's lora_scale sets the model's alone);
                    recorded in the provenance
  --refiner_workdir instead of --refiner: a training workdir of the refiner (a fine-tuned SDXL refiner, say): its
                    checkpoint runs the last part of the grid as --refiner's model does, its EMA copy as --use_ema
                    (default: its config's sample.use_ema) says; recorded in the provenance (workdir and step)
  --refiner_step    with --refiner_workdir: its checkpoint's step (default: the latest)
  --cascade         a cascade config (`configs/cascades/*.py`, fields overridable with --cascade.<field>):
                    sample its base stage, then each super-resolution stage from the one below, with
                    per-stage sampler, steps, guidance, thresholding and augmentation level; replaces
                    --workdir. Writes OUTPUT_DIR/stage_<k>/ for every stage and OUTPUT_DIR/cascade.png
                    (--output_dir defaults to the cascade's output_dir; --prompts to its prompts, a .jsonl's
                    lines giving their "prompt" alone;
                    --batch_size and --negative_prompt set every stage's; the flags of one workdir's settings
                    are refused)
  --mesh            AXIS=SIZE,... of the mesh the checkpoint is restored and sampled on, over the default data=-1
                    (every device a whole copy of the weights): e.g. fsdp=8 (the weights sharded over 8 devices),
                    sequence=4 (a video model's frames split over 4), one axis -1 for the devices left; axes data,
                    fsdp, sequence, tensor; with --cascade, every stage's (one stage's: --cascade.stages[K].mesh)
  --coordinator, --num_processes, --process_id, --auto_distributed
                    a multi-process job, as the main job's (`launch/local.py --module=diffusion_jax.sample`):
                    every process generates its part of each batch, process 0 writes

Every PNG carries its provenance (prompt, negative prompt if any, an edit's init image, mask and strength, seed,
sampler, steps, guidance, FLUX.1 dev's --flux_guidance, SD3's skip-layer guidance, the SDXL refiner's aesthetic
scores, a --refiner's handoff, config hash and scores, checkpoint step, config hash, LoRA adapters) as PNG text
chunks, and the same record is a line of manifest.jsonl. A video model writes each clip as an animated GIF
(provenance in the GIF comment), an H.264 MP4 (provenance in its comment tag) and a PNG strip of its frames, plus
grid.gif and grid.mp4. Samples are written as they are made: an interrupted job keeps every sample it made, each
listed in manifest.jsonl.
"""

import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import pathlib
import sys
import time
import typing

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from flax import nnx
from jax.experimental import multihost_utils

from diffusion_jax import (autoguidance, checkpoint, cli, config_checks, distillation, distributed, edit_inputs,
                           editing, lora, media, samplers, schedules, sharding, superres, video_extension)
from diffusion_jax import refiner as refiners
from diffusion_jax.data import pipeline
from diffusion_jax.models import autoencoder, text_to_image, wan_transformer

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 2000
# Flags that override a workdir's sample settings (a cascade sets them per stage).
WORKDIR_SETTINGS = ("sampler", "steps", "guidance_scale", "guidance_scale_low_noise", "guidance_interval",
                    "num_per_prompt", "seed", "use_ema", "frames", "height", "width", "flow_shift", "flux_guidance",
                    "kontext_resize", "redux_prompt_scale", "redux_pooled_scale", "skip_layers", "skip_layer_scale",
                    "strength", "edit_noise", "video_length",
                    "context_frames", "reconstruction_guidance", "null_text_iterations", "aesthetic_score",
                    "negative_aesthetic_score")
# a prompt's image to edit, its inpainting mask, a clip to edit, the last frame of an image-to-video model's clip
EDIT_FILES = ("init_image", "mask", "init_video", "last_image")
GRID_PROMPTS = 64  # prompts shown in grid.png (a prompts file of an evaluation set may hold thousands)
# The sample settings that change the compiled sampler (prompts, seeds, the batch and weights are arguments).
COMPILED_SETTINGS = ("sampler", "steps", "eta", "guidance_scale", "guidance_scale_low_noise", "guidance_rescale",
                     "guidance_interval", "threshold", "threshold_percentile", "frames", "height", "width",
                     "flow_shift", "flux_guidance", "skip_layers", "skip_layer_scale", "skip_layer_start",
                     "skip_layer_stop", "resolution_shift", "timestep_spacing", "steps_offset", "aug_level",
                     "strength", "edit_noise", "redux_prompt_scale", "redux_pooled_scale",
                     "reconstruction_guidance", "null_text_iterations", "null_text_learning_rate", "aesthetic_score",
                     "negative_aesthetic_score")
_compiled_samplers = {}
MESH_HELP = ("AXIS=SIZE,... of the mesh the checkpoint is restored and sampled on, over the default data=-1 (every "
             "device a whole copy of the weights): e.g. fsdp=8 (the weights sharded over 8 devices), sequence=4 (a "
             "video model's frames split over 4), one axis -1 for the devices left; axes data, fsdp, sequence, "
             "tensor. With --cascade: every stage's (one stage's: --cascade.stages[K].mesh=AXIS=SIZE,...)")


def clip_frames(config, sample_config) -> int:
  """Frames of a video model's clips (--frames, else data.frames); a ValueError when the model cannot make them."""
  frames = sample_config.frames or config.data.frames
  vae = autoencoder.read_config(config.latent.autoencoder_path) if config.latent.autoencoder_path else {}
  if problem := autoencoder.frames_problem(vae, "--frames", frames):
    raise ValueError(problem)
  latent = autoencoder.latent_frames(vae, frames)
  what = "" if latent == frames else f" ({latent} latent frames)"
  if not 1 <= latent <= config.model.max_frames:
    raise ValueError(f"--frames={frames}{what} must be in 1..{config.model.max_frames} (model.max_frames).")
  if latent % config.model.temporal_patch_size:
    raise ValueError(f"--frames={frames}{what} must be a multiple of model.temporal_patch_size="
                     f"{config.model.temporal_patch_size} (the frames of one token).")
  return frames


def time_compression(config) -> int:
  """Frames a latent frame of the model's autoencoder holds (1 but on a causal autoencoder's latents)."""
  path = config.latent.autoencoder_path
  return autoencoder.time_compression(autoencoder.read_config(path)) if path else 1


def extension_problems(config, sample_config) -> list[str]:
  """What is wrong with a video model's sample.video_length and sample.context_frames (video_extension.py)."""
  return video_extension.problems(sample_config, clip_frames(config, sample_config), time_compression(config))


def extension_context(config, sample_config) -> int:
  """Frames each window of a video model's extension keeps (video_extension.context_frames)."""
  return video_extension.context_frames(sample_config, clip_frames(config, sample_config), time_compression(config))


def sampling_logsnr(config, sample_config):
  """The sampling grid's log-SNRs [steps + 1], noisiest first, ending clean: the training schedule's at t from 1
  down to 0 in equal steps (schedules.continuous_logsnr_grid), a flow schedule's shifted by sample.flow_shift
  instead where that is set, else by sample.resolution_shift's shift for the samples' token count; with
  sample.timestep_spacing, its DDPM table's at the timesteps diffusers' Euler scheduler takes (Stable Diffusion's:
  leading, steps_offset 1)."""
  params = {**config.diffusion.schedule_params}
  if sample_config.timestep_spacing:
    alphas_cumprod = schedules.alphas_cumprod_from_betas(schedules.betas(config.diffusion.schedule, **params))
    timesteps = schedules.discrete_timesteps(len(alphas_cumprod), sample_config.steps, sample_config.timestep_spacing,
                                             sample_config.steps_offset)
    return jnp.asarray(np.concatenate([schedules.logsnr_at_timesteps(alphas_cumprod, timesteps), [np.inf]]),
                       jnp.float32)
  if sample_config.flow_shift:
    params["shift"] = sample_config.flow_shift
  elif sample_config.resolution_shift:
    rows, columns = output_shape(config, sample_config)[-3:-1]
    patch = config_checks.spatial_multiple(config)[0]  # (a transformer's patch: config_checks allows no other)
    params["shift"] = schedules.resolution_flow_shift(rows * columns // patch ** 2, *sample_config.resolution_shift)
  return schedules.continuous_logsnr_grid(schedules.logsnr_schedule(config.diffusion.schedule, **params),
                                          sample_config.steps)


def image_size(config, sample_config) -> tuple[int, int]:
  """(height, width) of the samples: sample.height and sample.width, each the training images' where 0."""
  height, width = pipeline.image_size(config.data)
  return sample_config.height or height, sample_config.width or width


def output_shape(config, sample_config) -> tuple:
  """Shape of what the diffusion of one sample runs on: [height, width, c] (image_size; a latent model: the shape
  of its latents), with a leading frames axis for a video (temporal) model (a causal autoencoder's latent
  frames)."""
  path, (height, width) = config.latent.autoencoder_path, image_size(config, sample_config)
  shape = (autoencoder.latent_shape(path, height, width) if path else (height, width, config.model.in_channels))
  if not config.model.temporal:
    return shape
  vae = autoencoder.read_config(path) if path else {}
  return (autoencoder.latent_frames(vae, clip_frames(config, sample_config)),) + shape


def make_generate_fn(config, graphdef, sample_config, guide_graphdef=None, handoff=None):
  """(params, frozen, keys [n, 2] uint32, ids [n, tokens], mask [n, tokens], lowres, negative, init, first_frames,
  guide, latents) -> samples
  [n, (frames,) h, w, c] in [-1, 1] (image_size; a latent model's decoded latents). Each sample's starting noise (and a
  stochastic sampler's noise at every step) comes from its own key, so a sample does not depend on the batch
  it is generated in (nor on the device count). lowres: a super-resolution stage's input [n, (frames,) r, r, c]
  in [-1, 1] (None otherwise), noise-augmented to sample.aug_level. negative: (ids, mask) of negative prompts,
  read by guidance's unconditional branch instead of the null condition (rows whose mask is all 0 keep the
  null condition), or None. init: (images [n, (frames,) h, w, c] in [-1, 1], keep [n, (frames,) h, w, 1]) to
  edit (editing.py: the last sample.strength of the grid from the images noised, the region keep marks kept), and
  with sample.edit_noise "source_inversion" the (ids, mask) of the source prompts the images are inverted with and
  guidance's other branch reads (instead of the null condition or negative prompts), or None. first_frames: (first
  [n, h, w, c], last [n, h, w, c] in [-1, 1], last_given [n] bool), the images an image-to-video model's clips start
  at and, where last_given, end at (both guidance branches read their condition), or None. guide: (params,
  frozen) of the autoguidance model of `guide_graphdef` (autoguidance.py), whose prediction for the prompt is
  guidance's other branch instead of the unconditional one, or None. handoff: an ensemble of experts' (refiner.py)
  index into the grid: without latents, the model runs the grid to it and returns its latents there [n, (frames,)
  h', w', c'] as they are (output_shape); with latents (those), it runs the rest of the grid from them."""
  d, s = config.diffusion, sample_config
  logsnr = sampling_logsnr(config, sample_config)
  # numpy: still concrete inside the jitted function, where editing.inverted reads whether the grid ends clean
  alpha, sigma = (np.asarray(a) for a in schedules.alpha_sigma_from_logsnr(logsnr, d.path))
  shape = output_shape(config, sample_config)
  frames = clip_frames(config, sample_config) if config.model.temporal else 1

  def generate(params, frozen, keys, ids, mask, lowres=None, negative=None, init=None, first_frames=None, guide=None,
               latents=None):
    model = nnx.merge(graphdef, params, frozen)
    # The network's prediction: FLUX.1 dev told another guidance scale than it trained with where sample.flux_guidance
    predict = model if s.flux_guidance == -1 else functools.partial(model, flux_guidance=s.flux_guidance)
    condition = None if first_frames is None else model.image_condition(first_frames[0], frames, *first_frames[1:])
    text = model.encode(ids, mask)
    null_text, null_mask = model.null_condition(text, mask)
    if negative is not None:
      negative_ids, negative_mask = negative
      given = jnp.any(negative_mask > 0, axis=-1)
      null_text = jnp.where(given[:, None, None], model.encode(negative_ids, negative_mask), null_text)
      null_mask = jnp.where(given[:, None], negative_mask, null_mask)
    if init is not None and s.edit_noise in editing.SOURCE_PROMPTED:  # (images, keep, source ids, source mask)
      init, (source_ids, source_mask) = init[:2], init[2:]
      null_text, null_mask = model.encode(source_ids, source_mask), source_mask
    if (model.kontext or model.control) and init is not None:  # FLUX.1 Kontext's references, Depth / Canny's
      condition, init = model.paired_condition(init[0]), None  # control images: sampled beside, no edit's start
    if model.redux is not None and init is not None:  # FLUX.1 Redux: the image's tokens after the prompt's (unguided:
      (text, mask), init = model.with_image_tokens(  # config_checks.redux_sampling_problem)
          text, mask, init[0], s.redux_prompt_scale, s.redux_pooled_scale), None
    if model.inpainting:  # SD's inpainting U-Net reads the kept image and where to generate (all of it, unedited)
      condition = model.inpainting_condition(*(init[:2] if init is not None else
                                               (None, jnp.zeros((keys.shape[0], *image_size(config, s), 1)))))
    aug_logsnr, clean_lowres = None, lowres
    if config.model.lowres_conditioning:  # both guidance branches see the low-res input
      lowres_keys = jax.vmap(lambda k: jax.random.fold_in(k, 2))(keys)
      lowres, aug_logsnr = superres.sampling_condition(lowres, lowres_keys, config, s.aug_level)

    if guide is not None:
      guide_model = nnx.merge(guide_graphdef, *guide)
      guide_text = guide_model.encode(ids, mask)

    def make_denoise(cond, uncond_text_at):
      """The guided (thresholded) denoiser for cond (text, mask) and, in guidance's other branch, uncond_text_at(
      logsnr [batch]) with null_mask, unless an autoguidance guide fills that branch."""

      def network_fn(x, logsnr, conditional):  # (the SDXL refiner's aesthetic score: each branch's own)
        if conditional:
          return predict(x, logsnr, *cond, lowres=lowres, aug_logsnr=aug_logsnr, condition=condition,
                         aesthetic_score=s.aesthetic_score)
        if guide is not None:
          return guide_model(x, logsnr, guide_text, mask, lowres=lowres, aug_logsnr=aug_logsnr, condition=condition)
        return predict(x, logsnr, uncond_text_at(logsnr), null_mask, lowres=lowres, aug_logsnr=aug_logsnr,
                       condition=condition, aesthetic_score=s.negative_aesthetic_score)

      skip_layer_window = samplers.skip_layer_window(logsnr, s.skip_layer_start, s.skip_layer_stop)
      skip_layer_guidance = (  # SD3's: the conditional pass without sample.skip_layers, guided away from
          (lambda x, logsnr: predict(x, logsnr, *cond, condition=condition, skip_layers=tuple(s.skip_layers)),
           s.skip_layer_scale, skip_layer_window) if s.skip_layers and skip_layer_window else None)
      guided_at = lambda scale: samplers.make_denoiser(network_fn, d.prediction, scale, s.guidance_rescale,
                                                       "none" if residual else s.threshold, s.threshold_percentile,
                                                       d.sigma_data, s.guidance_interval, skip_layer_guidance)
      guided = guided_at(s.guidance_scale)
      if s.guidance_scale_low_noise not in (-1, s.guidance_scale):  # a pair of experts' low-noise steps' own scale
        guided = samplers.switched_at(guided, guided_at(s.guidance_scale_low_noise),
                                      wan_transformer.boundary_logsnr(config.model.wan_boundary))
      if not residual:
        return guided

      def denoise(x, alpha_t, sigma_t):  # thresholding acts on the image the residual belongs to
        image = superres.from_residual(guided(x, alpha_t, sigma_t), clean_lowres, config)
        image = samplers.threshold_x0(image, s.threshold, s.threshold_percentile)
        return superres.to_residual(image, clean_lowres, config)

      return denoise

    residual = superres.is_residual(config)
    denoise = make_denoise((text, mask), lambda _: null_text)
    noise = jax.vmap(lambda k: jax.random.normal(k, shape))(keys)
    grid_alpha, grid_sigma, x_init = alpha, sigma, sigma[0] * noise
    if init is not None:  # an edit: the rest of the grid from the given images noised, their kept region kept
      given, keep = init
      start = editing.first_step(s.steps, s.strength)
      grid_alpha, grid_sigma, known = alpha[start:], sigma[start:], model.to_latents(given)
      keep_latent = editing.keep_at(keep, shape[-3:-1], shape[0] if keep.ndim == 5 else None)
      if s.edit_noise != "random":  # the deterministic path back to the given images
        # of the unconditional model (null text), or of the model for the source prompts (null_text holds them)
        inverted_text, inverted_mask = ((null_text, null_mask) if s.edit_noise in editing.SOURCE_PROMPTED else
                                        model.null_condition(text, mask))
        walked = lambda x, logsnr, _: predict(x, logsnr, inverted_text, inverted_mask, condition=condition)
        path = editing.inversion_path(samplers.make_denoiser(walked, d.prediction, sigma_data=d.sigma_data), known,
                                      grid_alpha, grid_sigma)
        x_init = path[0]
      else:
        x_init = grid_alpha[0] * known + grid_sigma[0] * noise
      if s.edit_noise == "null_text_inversion":  # per step, the other branch's text that retraces the path
        step = null_text_step(make_denoise, (null_text, null_mask), known, keep_latent, s.reconstruction_guidance,
                              grid_alpha, grid_sigma)
        nulls = editing.optimised_nulls(step, path, null_text, s.null_text_iterations, s.null_text_learning_rate,
                                        on_step=SamplingProgress(len(grid_alpha) - 1, "null-text inversion"))
        grid_logsnr = jnp.log(jnp.square(grid_alpha[:-1] / grid_sigma[:-1]))
        denoise = make_denoise((text, mask), lambda logsnr: nulls[editing.step_of(logsnr, grid_logsnr),
                                                           jnp.arange(logsnr.shape[0])])
      denoise = editing.inpainting_denoiser(denoise, known, keep_latent, s.reconstruction_guidance)
    if handoff is not None:  # an ensemble of experts: the model's noisy part of the grid, or the refiner's rest
      grid_alpha, grid_sigma = (alpha[:handoff + 1], sigma[:handoff + 1]) if latents is None else (
          alpha[handoff:], sigma[handoff:])
      x_init = x_init if latents is None else latents
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)  # each sample's own stochastic-sampler noise
    images = samplers.sample(denoise, x_init, grid_alpha, grid_sigma, s.sampler, key=step_keys, eta=s.eta,
                             on_step=SamplingProgress(len(grid_alpha) - 1, s.sampler))
    if handoff is not None and latents is None:
      return images
    if residual:
      images = superres.from_residual(images, clean_lowres, config)
    images = jnp.clip(model.from_latents(images), -1.0, 1.0)
    return images if init is None else jnp.where(keep > 0, given, images)

  return generate


def null_text_step(make_denoise, source, known, keep, reconstruction_guidance, alpha, sigma):
  """guided_step(x, null, i) for editing.optimised_nulls: one deterministic DDIM step of an edit's grid (alpha,
  sigma [steps + 1]) from level i, guided for the source prompts' (text, mask) with `null` in the other branch, the
  kept region of `known` kept as the edit's sampling keeps it (with its reconstruction guidance)."""
  alpha, sigma = jnp.asarray(alpha), jnp.asarray(sigma)

  def guided_step(x, null, i):
    denoise = editing.inpainting_denoiser(make_denoise(source, lambda _: null), known, keep, reconstruction_guidance)
    estimate = denoise(x, jnp.full(x.shape[:1], alpha[i]), jnp.full(x.shape[:1], sigma[i]))
    return samplers.ddim_step(x, estimate, alpha[i], sigma[i], alpha[i + 1], sigma[i + 1], 0.0, jnp.zeros_like(x))

  return guided_step


class SamplingProgress:
  """Host-side progress of a compiled sampling loop: once sampling has run for `every` seconds, logs the step
  reached with an ETA (e.g. 1000 DDPM steps on a CPU); short sampling stays silent."""

  def __init__(self, steps: int, sampler: str, every: float = 15.0):
    self.steps, self.sampler, self.every = steps, sampler, every
    self.start = self.last_report = time.time()
    self.step = -1

  def __call__(self, step):
    step, now = int(step), time.time()
    if step == 0:  # a new sampling run
      self.start, self.last_report, self.step = now, now, 0
      return
    if step <= self.step:  # the same step reported by another device
      return
    self.step = step
    if now - self.last_report >= self.every:
      self.last_report = now
      elapsed = now - self.start
      log.info("sampling (%s): step %d/%d (%d%%), elapsed %.0fs, eta %.0fs", self.sampler, step, self.steps,
               100 * step // self.steps, elapsed, elapsed * (self.steps - step) / step)


def compiled_sampler(config, graphdef, sample_config, mesh, guide=None, handoff=None):
  """The jitted `make_generate_fn` for this experiment and these settings (and the architecture of the
  autoguidance.Guide `guide`, and the handoff of an ensemble of experts), built once per process: an evaluation job
  reuses one compiled program for every checkpoint, and samples of other prompts, seeds or counts of the same
  experiment and COMPILED_SETTINGS share one."""
  hashable = lambda value: tuple(value) if isinstance(value, (list, tuple)) else value  # config.json: lists
  key = (model_hash(config), tuple(hashable(sample_config[k]) for k in COMPILED_SETTINGS), mesh,
         guide and model_hash(guide.config), handoff)
  if key not in _compiled_samplers:
    _compiled_samplers[key] = jax.jit(make_generate_fn(config, graphdef, sample_config, guide and guide.graphdef,
                                                       handoff),
                                      out_shardings=sharding.batch_sharding(mesh))
  return _compiled_samplers[key]


def example_keys(seeds, num_per_prompt: int) -> np.ndarray:
  """Raw keys [len(seeds) * num_per_prompt, 2]: image j of a prompt with seed s gets fold_in(key(s), j)."""
  keys = [np.asarray(jax.random.fold_in(jax.random.PRNGKey(seed), j)) for seed in seeds for j in range(num_per_prompt)]
  return np.stack(keys) if keys else np.zeros((0, 2), np.uint32)


def generate(config, graphdef, params, frozen, tokenizer, prompts, sample_config, mesh, seeds=None,
             lowres=None, negative_prompts=None, init_images=None, keep_masks=None, keys=None,
             guide=None, source_prompts=None, handoff=None, latents=None, on_batch=None,
             kept_prompts=None) -> np.ndarray:
  """Samples [len(prompts), num_per_prompt, (frames,) h, w, c] uint8 (image_size), sample.batch_size at a time
  (rounded up to a multiple of the device count), each batch sharded over all devices; one compiled program
  serves every batch (the last is padded), and more than one batch logs progress with an ETA.

  seeds: one per prompt (default: sample_config.seed for all). lowres: a super-resolution stage's inputs,
  uint8 [len(prompts), num_per_prompt, (frames,) r, r, c] (the stage below's samples). negative_prompts: one per
  prompt, "" for none (default: sample_config.negative_prompt for all); with none at all, guidance's
  unconditional branch is the null condition and the compiled program has no second text encoding.
  init_images: images (clips) to edit instead of generating from noise, uint8 [len(prompts), (frames,) h, w, 3] at
  image_size (editing.py, at sample_config.strength), with keep_masks bool [len(prompts), (frames,) h, w], True
  where the image is kept (inpainting; default: nothing kept); an image-to-video model's: clips whose first frame (and
  maybe last) alone is kept (edit_inputs.animated_edit), the images its clip starts (and ends) at. keys: raw keys
  [len(prompts) * num_per_prompt, 2] of the samples' noise instead of those of their seeds (example_keys). guide: an
  autoguidance.Guide, guidance's other branch instead of the unconditional model (refused with negative prompts,
  which that branch would read).
  source_prompts: with sample.edit_noise "source_inversion" or "null_text_inversion", what each init image shows,
  one per prompt (editing.py). handoff: an ensemble of experts' index into the grid (refiner.py): without latents,
  the model's latents there, float32 [len(prompts), num_per_prompt, *output_shape], instead of samples; with latents
  (those), the samples the rest of the grid makes from them. on_batch(first, samples): called with each batch's
  samples as they are made (uint8 [k, ...], samples first .. first + k - 1 in prompt-major order), but for latents.
  kept_prompts: return the samples of the first kept_prompts prompts only (the others given to on_batch alone: a
  job of many prompts does not hold every image in memory)."""
  if init_images is not None:
    edit_inputs.check_editable(config)
  first_frames = None
  if edit_inputs.animated(config, None if init_images is None else keep_masks):
    # the edit's first frames are the condition; the clips come from noise
    first_frames = edit_inputs.animated_images(init_images, keep_masks)
    init_images = keep_masks = None
    if problem := edit_inputs.last_image_problem(config, first_frames[2]):
      raise ValueError(problem + ".")
  sources = list(source_prompts or [])
  inverting_with_sources = init_images is not None and sample_config.edit_noise in editing.SOURCE_PROMPTED
  if inverting_with_sources:
    check_source_inversion(prompts, sources, negative_prompts or [sample_config.negative_prompt], guide is not None)
  elif any(sources):
    raise ValueError("Source prompts are read by edits with --edit_noise=source_inversion or null_text_inversion only: "
                     "set one, or leave the source prompts out.")
  if init_images is not None and (problem := config_checks.null_text_problem(sample_config, "--")):
    raise ValueError(problem)
  for problem in distillation.off_grid(config, sample_config):
    log.warning("%s", problem)
  n = sample_config.num_per_prompt
  seeds = [sample_config.seed] * len(prompts) if seeds is None else list(seeds)
  repeated = [p for p in prompts for _ in range(n)]
  chunk = -(-min(sample_config.batch_size, max(len(repeated), 1)) // mesh.size) * mesh.size
  pad = -len(repeated) % chunk
  ids, mask = tokenizer(repeated + [""] * pad)
  keys = np.concatenate([example_keys(seeds, n) if keys is None else np.asarray(keys),
                         example_keys([0] * pad, 1)])  # padding rows are dropped
  inputs = [keys, np.asarray(ids), np.asarray(mask)]
  if config.model.lowres_conditioning:
    if lowres is None:
      raise ValueError("This is a super-resolution stage: it needs the low-resolution images of the stage below "
                       "(sample it as part of a cascade: --cascade).")
    lowres = media.to_float(np.asarray(lowres).reshape((len(repeated),) + np.shape(lowres)[2:]))
    inputs.append(np.concatenate([lowres, np.zeros((pad,) + lowres.shape[1:], lowres.dtype)]))
  else:
    inputs.append(None)
  negatives = [sample_config.negative_prompt] * len(prompts) if negative_prompts is None else list(negative_prompts)
  if guide is not None:
    autoguidance.check_negative_prompts(negatives)
  if any(negatives) and sample_config.guidance_scale == 1:
    log.warning("negative prompts have no effect at guidance scale 1 (guidance's unconditional branch, which reads "
                "them, is not run)")
  negative = None
  if any(negatives) and sample_config.guidance_scale != 1:
    negative_ids, negative_mask = tokenizer([p for p in negatives for _ in range(n)] + [""] * pad)
    given = np.array([bool(p) for p in negatives for _ in range(n)] + [False] * pad)
    negative = (np.asarray(negative_ids), np.asarray(negative_mask) * given[:, None])  # no text: null
  inputs.append(negative)
  rows = lambda a: np.concatenate([np.repeat(a, n, axis=0), np.zeros((pad,) + a.shape[1:], a.dtype)])
  if init_images is not None:
    keep = np.zeros(np.shape(init_images)[:-1], bool) if keep_masks is None else np.asarray(keep_masks, bool)
    init = (rows(media.to_float(init_images)), rows(keep[..., None].astype(np.float32)))
    if inverting_with_sources:
      init += tuple(map(np.asarray, tokenizer([p for p in sources for _ in range(n)] + [""] * pad)))
    inputs.append(init)
  else:
    inputs.append(None)
  inputs.append(None if first_frames is None else (rows(media.to_float(first_frames[0])),
                                                   rows(media.to_float(first_frames[1])), rows(first_frames[2])))
  generate_fn = compiled_sampler(config, graphdef, sample_config, mesh, guide, handoff)
  batch = sharding.batch_sharding(mesh)
  guide_weights = None if guide is None else jax.device_put((guide.params, guide.frozen), sharding.replicated(mesh))
  handed = None
  if latents is not None:  # a sample's row each, as the keys, padded
    handed = np.asarray(latents, np.float32).reshape((-1,) + np.shape(latents)[2:])
    handed = np.concatenate([handed, np.zeros((pad,) + handed.shape[1:], handed.dtype)])
  place = lambda a, first: None if a is None else jax.device_put(jax.tree.map(lambda x: x[first:first + chunk], a),
                                                                   batch)
  outputs, nonfinite, start = [], 0, time.time()
  kept = len(repeated) if kept_prompts is None else min(kept_prompts, len(prompts)) * n  # (samples returned)
  for first in range(0, len(keys), chunk):
    with jax.set_mesh(mesh):  # traced under the mesh the models' sharding.constrain reads (sequence parallelism)
      images = generate_fn(params, frozen, *(place(a, first) for a in inputs), guide_weights,
                           place(handed, first))
    images = np.asarray(multihost_utils.process_allgather(images, tiled=True))
    real = images[:len(repeated) - first]  # (not the padding)
    nonfinite += int((~np.isfinite(real.reshape(len(real), -1))).any(axis=1).sum())
    made = images if handoff is not None and latents is None else media.to_uint8(images)
    if on_batch is not None and made.dtype == np.uint8:
      on_batch(first, made[:len(real)])
    outputs.append(made[:max(kept - first, 0)])
    if len(keys) > chunk:
      done, elapsed = min(first + chunk, len(repeated)), time.time() - start
      log.info("sampled %d of %d (%d%%), elapsed %.0fs, eta %.0fs", done, len(repeated),
               100 * done // len(repeated), elapsed, elapsed * (len(repeated) - done) / done)
  if nonfinite:
    log.warning("%d of %d samples hold non-finite values (NaN or inf), written as black pixels: the weights make "
                "them (is the training log's loss finite?)", nonfinite, len(repeated))
  images = np.concatenate(outputs)[:kept]
  return images.reshape((kept // n, n) + images.shape[1:])


def check_source_inversion(prompts, sources, negatives, guided: bool) -> None:
  """A ValueError unless every edit with --edit_noise=source_inversion (or null_text_inversion) has a source prompt
  and guidance's other branch, which reads it, is free: no negative prompt, no autoguidance guide."""
  missing = [p for i, p in enumerate(prompts) if i >= len(sources) or not sources[i]]
  if missing:
    raise ValueError(f"--edit_noise=source_inversion and null_text_inversion invert each image with a prompt of "
                     f"what it shows: give every edit one (--source_prompt, or 'source_prompt' in a .jsonl prompts "
                     f"file); none for {missing[:3]}")
  if any(negatives) or guided:
    raise ValueError("--edit_noise=source_inversion or null_text_inversion: guidance's other branch reads the source "
                     f"prompt, so not with {'a negative prompt' if any(negatives) else 'an autoguidance guide'}, "
                     "which that branch would read too: leave it out, or edit with --edit_noise=inversion")


def config_hash(config) -> str:
  return hashlib.sha256(config.to_json_best_effort(sort_keys=True).encode()).hexdigest()[:12]


def model_hash(config) -> str:
  """config_hash of all but the config's sample settings (what a compiled sampler reads of those: COMPILED_SETTINGS)."""
  fields = json.loads(config.to_json_best_effort())
  fields.pop("sample", None)
  return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def sample_record(provenance: dict, entry: dict, p: int, i: int, is_video: bool) -> dict:
  """The provenance record of prompt p's sample i (its PNG's text chunks, its manifest.jsonl line), naming its files."""
  record = {**provenance, **entry, "index": i, "file": f"p{p:03d}_{i:02d}.png"}
  if is_video:
    record["animation"], record["video"] = f"p{p:03d}_{i:02d}.gif", f"p{p:03d}_{i:02d}.mp4"
  return record


def write_sample(output_dir: pathlib.Path, record: dict, sample: np.ndarray) -> None:
  """A sample's files as its record names them: uint8 [h, w, 3] a PNG; [frames, h, w, 3] a GIF, an MP4 and a PNG strip
  of its frames."""
  if sample.ndim == 4:
    media.save_gif(output_dir / record["animation"], sample, record)
    media.save_mp4(output_dir / record["video"], sample, record)
    sample = np.concatenate(list(sample), axis=1)  # frames left to right
  media.save_png(output_dir / record["file"], sample, record)


def write_outputs(output_dir, entries: list[dict], images, provenance: dict, edits=None,
                  given: str = "the edited image") -> pathlib.Path:
  """One PNG per sample (videos: a GIF, an MP4 and a PNG strip of its frames), manifest.jsonl, and grid.png
  of the first GRID_PROMPTS prompts (videos: also grid.gif and grid.mp4); entries carry each prompt's
  prompt/seed/guidance_scale. Returns the grid path.
  images: uint8 [prompts, n, h, w, 3] or [prompts, n, frames, h, w, 3]. edits, given: as write_grid reads them."""
  files = SampleFiles(pathlib.Path(output_dir), provenance, entries)
  for p, row in enumerate(images):  # (in prompt order: the manifest's)
    for i, sample in enumerate(row):
      files.write(p, i, sample)
  files.close()
  return write_grid(files.output_dir, entries, images, provenance, edits, given)


def write_manifest(output_dir: pathlib.Path, records: list[dict]) -> None:
  """manifest.jsonl: the records, a line each, in order (replacing the file at once)."""
  partial = output_dir / "manifest.jsonl.partial"
  partial.write_text("".join(json.dumps(record) + "\n" for record in records))
  partial.replace(output_dir / "manifest.jsonl")


def write_grid(output_dir: pathlib.Path, entries: list[dict], images, provenance: dict, edits=None,
               given: str = "the edited image") -> pathlib.Path:
  """grid.png of the first GRID_PROMPTS prompts' samples (videos: also grid.gif and grid.mp4); returns its path.
  images: uint8 [prompts, n, h, w, 3] or [prompts, n, frames, h, w, 3]. edits: {prompt index: (image, keep)} of
  the prompts that edited an image or clip (edit_inputs.read): their grid rows show it first (inpainting: the region
  generated anew dark; image-to-video: the given first frame; video-to-video: the given clip), labelled `given`; an
  image of another size than the samples (FLUX.1 Kontext's reference, Redux's image) brought to theirs."""
  is_video = images.ndim == 6
  grid_path, images = output_dir / "grid.png", images[:GRID_PROMPTS]
  prompts = [e["prompt"] for e in entries[:GRID_PROMPTS]]
  rows = [row.reshape((-1,) + row.shape[-3:]) for row in images]  # a video row: its clips' frames in order
  labels = list(prompts)
  for p, (image, keep) in (edits or {}).items():
    if p < GRID_PROMPTS and is_video:  # image-to-video: the given first frame; video-to-video: the given clip
      rows[p] = np.concatenate([image[:1] if keep.any() else image, rows[p]])
      labels[p] = f"{prompts[p]} (the given {'frame' if keep.any() else 'clip'} first)"
    elif p < GRID_PROMPTS:
      shown = np.where(keep[..., None], image, image // 4) if keep.any() else image  # inpainting: the mask shown
      shown = np.stack([f if f.shape[:2] == rows[p].shape[1:3] else pipeline.resize_and_crop(f, rows[p].shape[1:3],
                                                                                             None)
                        for f in shown.reshape((-1,) + shown.shape[-3:])])  # (FLUX.1 Redux's to blend: each)
      rows[p] = np.concatenate([shown, rows[p]])
      labels[p] = f"{prompts[p]} ({given} first)"
  media.save_png(grid_path, media.labelled_grid(rows, labels), {**provenance, "prompts": prompts})
  if is_video:  # animated grid: frame k of every clip, one row per prompt
    frames = [media.labelled_grid([row[:, k] for row in images], prompts) for k in range(images.shape[2])]
    media.save_gif(output_dir / "grid.gif", np.stack(frames), {**provenance, "prompts": prompts})
    media.save_mp4(output_dir / "grid.mp4", np.stack(frames), {**provenance, "prompts": prompts}, scale=1)
  return grid_path


def parse_skip_layers(values: list[str]) -> tuple[int, ...]:
  """--skip_layers' comma-separated block indices (["7", "8", "9"]) as ints; "none" or nothing: () (off)."""
  if [v.strip().lower() for v in values] in ([], ["none"], [""]):
    return ()
  try:
    return tuple(int(v) for v in values)
  except ValueError:
    raise ValueError(f"--skip_layers={','.join(values)!r} is not comma-separated block indices (e.g. 7,8,9) or "
                     "none") from None


def prompt_guidance_interval(value) -> list:
  """A prompts file's "guidance_interval" ("LOW:HIGH", "none", or [low, high] / []) as a JSON list of floats."""
  if isinstance(value, str):
    return list(samplers.parse_guidance_interval(value))
  interval = [float(v) for v in value]
  if problem := samplers.guidance_interval_problem(interval):
    raise ValueError(f"guidance_interval {problem}")
  return interval


PROMPT_KEYS = ("prompt", "seed", "guidance_scale", "guidance_interval", "negative_prompt", "strength", "source_prompt",
               "lora_scale") + EDIT_FILES


def prompt_entry(line: dict, directory: pathlib.Path) -> dict:
  """One line of a .jsonl prompts file, checked and typed (image paths relative to `directory` made whole); a
  ValueError (KeyError, TypeError) saying what is wrong with it: not an object, a key it does not know (a
  misspelt "seed" would be dropped), a prompt that is no text, a value out of range."""
  if not isinstance(line, dict):
    raise ValueError(f"a JSON {type(line).__name__}, not an object")
  if unknown := sorted(set(line) - set(PROMPT_KEYS)):
    raise ValueError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} (known: "
                     f"{', '.join(PROMPT_KEYS)})")
  entry = dict(line)
  for key in ("prompt", "negative_prompt", "source_prompt"):
    if key in entry and not isinstance(entry[key], str):
      raise ValueError(f"'{key}' {entry[key]!r} is not a string")
  entry["prompt"] = entry["prompt"][:MAX_PROMPT_CHARS]
  for key in ("mask", "last_image"):
    if key in entry and "init_image" not in entry:
      raise ValueError(f"a '{key}' needs the 'init_image' it belongs to")
  if "init_image" in entry and "init_video" in entry:
    raise ValueError("an 'init_image' or an 'init_video' to edit, not both")
  if "strength" in entry:
    entry["strength"] = float(entry["strength"])
    if not 0 < entry["strength"] <= 1:
      raise ValueError(f"strength {entry['strength']} must be in (0, 1]")
  whole = lambda file: str(directory / pathlib.Path(file).expanduser())  # an absolute path stays
  for key in EDIT_FILES:
    if key == "init_image" and isinstance(entry.get(key), list) and entry[key]:  # FLUX.1 Redux's to blend
      entry[key] = [whole(str(file)) for file in entry[key]]
    elif key in entry:
      entry[key] = whole(entry[key])
  for key in ("negative_prompt", "source_prompt"):
    if key in entry:
      entry[key] = entry[key][:MAX_PROMPT_CHARS]
  if not float(entry.get("guidance_scale", 0.0)) >= 0:  # (NaN too)
    raise ValueError(f"guidance_scale {entry['guidance_scale']} must be >= 0")
  if "seed" in entry:
    seed = entry["seed"]
    if isinstance(seed, bool) or not (isinstance(seed, int) or isinstance(seed, float) and seed.is_integer()):
      raise ValueError(f"seed {seed!r} is not an integer")
    entry["seed"] = int(seed)
  if "guidance_interval" in entry:
    entry["guidance_interval"] = prompt_guidance_interval(entry["guidance_interval"])
  if "lora_scale" in entry:
    scale = entry["lora_scale"]
    entry["lora_scale"] = [float(s) for s in scale] if isinstance(scale, list) else float(scale)
  return entry


def read_prompts(path) -> list[dict]:
  """Prompts file -> [{"prompt", optional "seed", "guidance_scale", "negative_prompt", "init_image", "mask",
  "init_video", "last_image", "strength", "source_prompt", "lora_scale"}]: a text file's lines, or a .jsonl file's
  objects (prompt_entry); a ValueError naming the file and the line that cannot be read."""
  path = pathlib.Path(path)
  if not path.exists():
    raise ValueError(f"Prompts file {str(path)!r} does not exist.")
  try:
    lines = [(number, line.strip()) for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
  except UnicodeDecodeError as error:
    raise ValueError(f"Prompts file {str(path)!r} is not UTF-8 text ({error}).") from None
  entries = []
  for number, line in lines:
    if path.suffix != ".jsonl":
      entries.append({"prompt": line[:MAX_PROMPT_CHARS]})
      continue
    try:
      entries.append(prompt_entry(json.loads(line), path.parent))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
      problem = f"no {error}" if isinstance(error, KeyError) else str(error)
      raise ValueError(f"{str(path)!r}, line {number}: {problem}. Each line must be a JSON object with a "
                       f"'prompt' and optionally an integer 'seed', a 'guidance_scale' >= 0, a 'guidance_interval' "
                       f"(\"LOW:HIGH\", [low, high] or \"none\"), a 'negative_prompt', an 'init_image' (with its "
                       f"'mask') or 'init_video' to edit at a 'strength' (with a 'source_prompt'; an image-to-video "
                       f"model's 'init_image' with a 'last_image'; FLUX.1 Redux's: a list of images to blend), and a "
                       f"'lora_scale' (a number, or a list of one per --lora adapter).") from None
  if not entries:
    raise ValueError(f"Prompts file {str(path)!r} has no prompts.")
  return entries


# ----------------------------------------------------------------------------- CLI

class Weights(typing.NamedTuple):
  """What sampling reads of a model: one copy of its trainable parameters (the first EMA copy or the trained
  ones) and its frozen ones, pure dicts of arrays."""
  params: dict
  frozen: dict


def weights_of(state, use_ema: bool) -> Weights:
  """A TrainState's Weights (its first EMA copy with use_ema)."""
  return Weights(state.ema[0] if use_ema else state.params, state.frozen)


def load_checkpoint(workdir, step=None, use_ema=None, mesh_config=None):
  """(config, Weights, graphdef, step, mesh) of a training workdir's checkpoint (default: latest), restored
  onto the mesh of `mesh_config` (default sharding.SAMPLING_MESH: data-parallel over all devices, each a whole
  copy; a --mesh flag's, sharding.mesh_from_flag); use_ema (default: the config's sample.use_ema): its first EMA
  copy, else its trained parameters. Only those and the frozen weights are read (no optimizer state, no other
  copy): a third to a quarter of the train state with Adam."""
  from diffusion_jax import train  # the state layout lives with the trainer

  config = checkpoint.read_config(workdir)
  use_ema = config.sample.use_ema if use_ema is None else use_ema  # every run keeps an EMA copy (config_checks)
  mngr = checkpoint.manager(workdir, read_only=True)
  if not mngr.all_steps():
    raise ValueError(f"No checkpoints in {str(workdir)!r}/checkpoints; train first.")
  mesh = sharding.make_mesh(mesh_config or sharding.SAMPLING_MESH)
  target, graphdef = train.abstract_state(config, mesh)
  fields = {"frozen": target.frozen, **({"ema": [target.ema[0]]} if use_ema else {"params": target.params})}
  restored, step = checkpoint.restore(mngr, fields, step=step, partial=True)
  params = restored["ema"][0] if use_ema else restored["params"]
  log.info("restored %s step %d onto the mesh %s", workdir, step, dict(mesh.shape))
  return config, Weights(params, restored.get("frozen", {})), graphdef, step, mesh


def check_pretrained(config, flag: str = "--config"):
  """(graphdef, abstract params, abstract frozen weights) of a config whose every part is read from pretrained
  checkpoints (a Stable Diffusion, SDXL, SD3, Flux or Wan root's configs/*.py); nothing is read. A ValueError naming
  the parts that would be used at their random initialisation (a model trained from scratch: train it, then give its
  workdir)."""
  graphdef, abstract_params, abstract_frozen = text_to_image.split(text_to_image.abstract(config), config)
  if random := sorted((set(abstract_params) | set(abstract_frozen)) - set(text_to_image.pretrained_parts(config))):
    raise ValueError(f"{flag}: this config's {', '.join(random)} would be used at their random initialisation "
                     "(no pretrained checkpoint names them): train it (python -m diffusion_jax.main) and give its "
                     "--workdir")
  return graphdef, abstract_params, abstract_frozen


def load_pretrained(config, mesh_config=None, flag: str = "--config"):
  """(Weights, graphdef, mesh) of a config whose every part is read from pretrained checkpoints (check_pretrained's
  ValueError, before anything is read, otherwise; a LoRA's updates start at zero), placed on the mesh of
  `mesh_config` (load_checkpoint's)."""
  from diffusion_jax import train  # the weights' layout lives with the trainer

  graphdef, abstract_params, abstract_frozen = check_pretrained(config, flag)
  mesh = sharding.make_mesh(mesh_config or sharding.SAMPLING_MESH)
  shardings = (sharding.state_shardings(abstract_params, mesh), sharding.state_shardings(abstract_frozen, mesh))
  params, frozen = train.initial_weights(config, shardings)
  log.info("read the pretrained weights onto the mesh %s", dict(mesh.shape))
  return Weights(params, frozen), graphdef, mesh


def run(workdir, overrides: dict, prompts_path=None, step=None, output_dir=None, init_image=None,
        mask=None, adapters=(), init_video=None, guide_workdir=None, guide_step=None,
        source_prompt=None, last_image=None, mesh_config=None, config=None, refiner_config=None,
        denoising_end=None, refiner_adapters=(), refiner_workdir=None, refiner_step=None):
  """Sample a workdir's checkpoint (or, with `config` and no workdir, the pretrained checkpoints a config reads:
  load_pretrained; output_dir then required) for a prompts file (default: the config's prompts) with `overrides` of its
  sample settings; init_image and mask (or an image-to-video model's last_image), or init_video: files every
  prompt without its own edits (edit_inputs.py),
  and source_prompt what they show, for each edit without its own (edit_noise "source_inversion");
  adapters: lora.Adapters fused into its weights; guide_workdir (with guide_step alone: this workdir) and
  guide_step (default: its latest): the autoguidance guide's checkpoint; mesh_config: the mesh the weights (and the
  guide's) are restored onto and sampled on (load_checkpoint); refiner_config: a config read from pretrained
  checkpoints (load_pretrained) whose model finishes the model's samples from its latents at denoising_end of the
  grid (default refiner.DENOISING_END; refiner.py), refiner_adapters (lora.Adapters) fused into its weights;
  refiner_workdir instead of refiner_config: a training run of the refiner, its checkpoint refiner_step (default:
  the latest)."""
  from diffusion_jax.text import tokenizers

  if config is None:
    config = checkpoint.read_config(workdir)
  elif workdir is not None or output_dir is None:
    raise ValueError("Sampling a config's pretrained checkpoints (--config) takes no workdir and needs an output "
                     "directory (--output_dir)")
  else:  # the pretrained checkpoints a config reads, no training
    config = config.copy_and_resolve_references()
    config_checks.validate(config)
  sample_config = config.sample
  refiner_seen = refiner_config if refiner_workdir is None else refiner_checkpoint_config(refiner_workdir, refiner_step)
  # (the aesthetic scores are a --refiner's where the model reads none: its sampler is not compiled again for them)
  scores_elsewhere = refiner_seen is not None and not text_to_image.sdxl_refiner(config)
  sample_config.update({k: v for k, v in overrides.items()
                        if v is not None and not (scores_elsewhere and k in refiners.AESTHETIC_SETTINGS)})
  problems = config_checks.sample_problems(sample_config, "--") + config_checks.sample_size_problems(
      config, sample_config, "--")
  for problem in (config_checks.low_noise_guidance_problem(config, sample_config, "--"),
                  config_checks.flow_shift_problem(config, sample_config, "--"),
                  config_checks.flux_guidance_problem(config, sample_config, "--"),
                  config_checks.redux_sampling_problem(config, sample_config, "--"),
                  config_checks.kontext_resize_problem(config, sample_config, "--"),
                  config_checks.skip_layer_problem(config, sample_config, "--")):
    if problem:
      problems.append(problem)
  scores = [f"--{name}" for name in ("aesthetic_score", "negative_aesthetic_score") if overrides.get(name) is not None]
  if scores and not any(c is not None and text_to_image.sdxl_refiner(c) for c in (config, refiner_seen)):
    problems.append(f"{' and '.join(scores)}: only the SDXL refiner's U-Net reads an aesthetic score; leave "
                    f"{'them' if len(scores) > 1 else 'it'} out")
  if problems:
    raise ValueError("; ".join(problems))
  if sample_config.video_length and not config.model.temporal:
    raise ValueError("--video_length extends the clips of a video model; this workdir's model makes images.")
  if config.model.temporal:
    if problems := extension_problems(config, sample_config):
      raise ValueError("; ".join(problems))
  prompts = read_prompts(prompts_path) if prompts_path else [{"prompt": p} for p in sample_config.prompts]
  given = {"init_image": str(init_image), **({"mask": str(mask)} if mask else {}),
           **({"last_image": str(last_image)} if last_image else {})} if init_image else (
      {"init_video": str(init_video)} if init_video else {})
  for entry in prompts if given else []:
    if "init_image" not in entry and "init_video" not in entry:
      entry.update(given)
  frames = clip_frames(config, sample_config) if config.model.temporal else 0
  if problems := mesh_problems(config, mesh_config, frames, "--frames"):
    raise ValueError("; ".join(problems))
  # before a checkpoint is read
  edits = edit_inputs.read(config, sample_config, prompts, frames, image_size(config, sample_config))
  check_source_prompts(prompts, edits, sample_config, source_prompt, bool(guide_workdir or guide_step is not None))
  lora.check(adapters, config)
  for i, entry in enumerate(prompts):  # a prompt's lora_scale that fits no --lora is refused before a checkpoint
    try:
      lora.at_scales(adapters, entry.get("lora_scale"))
    except ValueError as error:
      raise ValueError(f"{prompts_path}, prompt {i + 1} ({entry['prompt']!r}): {error}") from None
  # (an image-to-video model animates, FLUX.1 Kontext follows a reference image, Depth / Canny a control image: no
  # edits)
  edited = {} if edit_inputs.animates(config, prompts) or edit_inputs.references(config) else edits
  unused = [f"--{name}" for name, applies in (("strength", any("strength" not in prompts[i] for i in edited)),
                                              ("edit_noise", edited),
                                              ("null_text_iterations",
                                               edited and sample_config.edit_noise == "null_text_inversion"),
                                              ("context_frames", sample_config.video_length),
                                              ("reconstruction_guidance", edited or sample_config.video_length))
            if overrides.get(name) is not None and not applies]
  if unused:
    raise ValueError(f"{', '.join(unused)}: not used here: --strength, --edit_noise and --reconstruction_guidance "
                     "apply to edits (--init_image or --init_video, or such lines of a .jsonl prompts file; --strength "
                     "to those without a strength of their own; an image-to-video model's --init_image is not an "
                     "edit: it makes the whole clip from noise, nor is FLUX.1 Kontext's, a reference image), "
                     "--null_text_iterations to edits with "
                     "--edit_noise=null_text_inversion, --context_frames and --reconstruction_guidance to "
                     "--video_length")
  stochastic = sample_config.sampler == "ddpm" or (sample_config.sampler == "ddim" and sample_config.eta > 0)
  if edited and sample_config.edit_noise != "random" and sample_config.num_per_prompt > 1 and not stochastic:
    log.warning("--edit_noise=%s starts every sample of an edited prompt from the same noise, its image's, and "
                "the %s sampler is deterministic: its %d samples are one image", sample_config.edit_noise,
                sample_config.sampler, sample_config.num_per_prompt)
  refiner = checked_refiner(config, refiner_config, denoising_end, [sample_config], overrides, [
      problem for problem, given in (
          ("the prompts edit images (--init_image, --init_video, or such lines of a .jsonl prompts file); a handover "
           "starts from noise: edit without --refiner", edits),
          ("an autoguidance guide fits one model; sample without --guide_workdir and --guide_step",
           guide_workdir or guide_step is not None)) if given], refiner_adapters, refiner_workdir, refiner_step)
  guide = None
  if guide_workdir or guide_step is not None:  # refused before any checkpoint is read, as misfit guides are
    autoguidance.check_negative_prompts([sample_config.negative_prompt] + [p.get("negative_prompt") for p in prompts])
    guide = autoguidance.load(config, guide_workdir or workdir, guide_step, sample_config.use_ema, mesh_config)
  if workdir is None:
    (weights, graphdef, mesh), step = load_pretrained(config, mesh_config), None
  else:
    config, weights, graphdef, step, mesh = load_checkpoint(workdir, step, sample_config.use_ema, mesh_config)
  if refiner is not None:
    refiner = load_refiner(refiner, mesh_config)
    log.info("the model hands its latents to the refiner at step %d of %d", refiners.handoff_step(
        config, sample_config, sampling_logsnr(config, sample_config), refiner.denoising_end), sample_config.steps)
  return write_samples(config, graphdef, weights.params, weights.frozen, tokenizers.from_config(config), prompts,
                       sample_config, mesh, step, output_dir or free_output_dir(workdir, step),
                       edits=edits, adapters=adapters, guide=guide, refiner=refiner)


def free_output_dir(workdir, step: int) -> pathlib.Path:
  """A sampling job's default output directory: WORKDIR/samples/step_<N>, or where that already holds samples (the
  training run's own at that step, an earlier job's), the first of step_<N>.2, step_<N>.3, ... that does not: a job
  never overwrites samples it was not pointed at."""
  default = pathlib.Path(workdir) / "samples" / f"step_{step}"
  candidates = itertools.chain([default], (default.with_name(f"{default.name}.{k}") for k in itertools.count(2)))
  return next(path for path in candidates if not (path / "manifest.jsonl").exists())


def checked_refiner(config, refiner_config, denoising_end, sample_configs, overrides, problems=(), adapters=(),
                    workdir=None, step=None):
  """The refiner.Refiner (weights not read yet) of a --refiner config, or of a --refiner_workdir `workdir` (a
  training run of the refiner: its checkpoint `step`, default the latest, with the EMA copy as `overrides`'
  use_ema or its config's sample.use_ema says) (neither: none; --denoising_end and adapters are then refused) at
  denoising_end (None: refiner.DENOISING_END) with the aesthetic scores `overrides` give (else its config's) and
  lora.Adapters to fuse into its weights (--refiner_lora); before any checkpoint is read, a ValueError naming
  `problems` (what the caller does that a handover does not) and why the model cannot hand its latents to it on the
  grid of each of sample_configs (refiner.py), or an adapter does not fit it."""
  if step is not None and workdir is None:
    raise ValueError("--refiner_step: a checkpoint of a --refiner_workdir; give the workdir (a --refiner config reads "
                     "pretrained checkpoints)")
  if refiner_config is not None and workdir is not None:
    raise ValueError("--refiner and --refiner_workdir: give one refiner, a config read from pretrained checkpoints or "
                     "a training workdir")
  if refiner_config is None and workdir is None:
    for flag, given in (("--denoising_end: the part of the grid the model runs before", denoising_end is not None),
                        ("--refiner_lora: an adapter fused into", adapters)):
      if given:
        raise ValueError(f"{flag} a --refiner; give the refiner")
    return None
  if workdir is None:
    refiner_config = refiner_config.copy_and_resolve_references()
    config_checks.validate(refiner_config)
  else:
    refiner_config = refiner_checkpoint_config(workdir, step)
  scores = tuple(refiner_config.sample[k] if overrides.get(k) is None else overrides[k]
                 for k in refiners.AESTHETIC_SETTINGS)
  use_ema = refiner_config.sample.use_ema if overrides.get("use_ema") is None else overrides["use_ema"]
  refiner = refiners.Refiner(refiner_config, refiners.DENOISING_END if denoising_end is None else denoising_end,
                             scores, list(adapters), workdir and str(workdir), step, use_ema)
  problems = list(problems) + refiners.problems(config, refiner_config)
  for sample_config in sample_configs if not problems else ():
    settings = refiners.sample_config(refiner_config, sample_config, image_size(config, sample_config), scores)
    problems += refiners.sampling_problems(config, refiner_config, *(
        (sampling_logsnr(c, s), output_shape(c, s)) for c, s in ((config, sample_config), (refiner_config, settings))))
  if problems:
    raise ValueError(f"--refiner{'' if workdir is None else '_workdir'}: {'; '.join(dict.fromkeys(problems))}")
  for sample_config in sample_configs:
    refiners.handoff_step(config, sample_config, sampling_logsnr(config, sample_config), refiner.denoising_end)
  if workdir is None:
    check_pretrained(refiner_config, "--refiner")
  lora.check(adapters, refiner_config, "--refiner_lora")
  return refiner


def refiner_checkpoint_config(workdir, step=None):
  """The config of the training run in `workdir` (--refiner_workdir), a ValueError where it has no checkpoint
  `step` (None: none at all); nothing but its config.json and its checkpoints' steps is read."""
  try:
    config = checkpoint.read_config(workdir)
  except ValueError as error:
    raise ValueError(f"--refiner_workdir: {error}") from None
  steps = checkpoint.manager(workdir, read_only=True).all_steps()
  if (step is None and not steps) or (step is not None and step not in steps):
    raise ValueError(f"--refiner_workdir={str(workdir)!r} has no checkpoint at step "
                     f"{'latest' if step is None else step} (available: {list(steps)}): train it first, or give "
                     "--refiner_step one of those")
  return config


def load_refiner(refiner, mesh_config=None):
  """A checked_refiner's Refiner with its weights read onto the mesh of `mesh_config` (load_pretrained's, or
  load_checkpoint's from its workdir, its step then the one read), its adapters fused."""
  from diffusion_jax.text import tokenizers

  step = refiner.step
  if refiner.workdir is None:
    weights, graphdef, _ = load_pretrained(refiner.config, mesh_config, "--refiner")
  else:
    _, weights, graphdef, step, _ = load_checkpoint(refiner.workdir, step, refiner.use_ema, mesh_config)
  return dataclasses.replace(refiner, weights=lora.fused(weights, refiner.adapters), graphdef=graphdef,
                             tokenizer=tokenizers.from_config(refiner.config), step=step)


def refiner_provenance(refiner) -> dict:
  """What a sample's record (and an evaluation's settings) says of the refiner.Refiner that finished it."""
  record = {"denoising_end": refiner.denoising_end, "config_hash": config_hash(refiner.config)}
  if refiner.workdir is not None:
    record.update(workdir=refiner.workdir, step=int(refiner.step), use_ema=refiner.use_ema)
  if text_to_image.sdxl_refiner(refiner.config):
    record["aesthetic_scores"] = list(refiner.aesthetic_scores)
  if refiner.adapters:
    record["lora"] = lora.provenance(refiner.adapters)
  return record


def mesh_problems(config, mesh_config, frames: int, field: str) -> list[str]:
  """Why a job cannot sample the config's model on the mesh of `mesh_config` (None: sharding.SAMPLING_MESH, which
  always can): the devices it names, or (mesh.sequence) clips of `frames` frames (given by `field`) it cannot
  split."""
  if not mesh_config:
    return []
  try:
    shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(mesh_config, jax.device_count())))
  except ValueError as error:
    return [f"--mesh: {error}"]
  return config_checks.sequence_problems(config, shape["sequence"], ((field, frames),))


def check_source_prompts(prompts: list[dict], edits: dict, sample_config, default: str | None, guided: bool):
  """Gives each edit of `prompts` without a "source_prompt" the `default` (--source_prompt); a ValueError, before
  any checkpoint is read, for a source prompt outside an edit with sample.edit_noise "source_inversion" or
  "null_text_inversion", or for such edits that check_source_inversion refuses (guided: an autoguidance guide is
  given)."""
  inverting = bool(edits) and sample_config.edit_noise in editing.SOURCE_PROMPTED
  for i in edits if inverting and default else ():
    prompts[i].setdefault("source_prompt", default)
  what = ("A source prompt (--source_prompt, 'source_prompt' in a .jsonl prompts file) says what an edit's image "
          "shows, read by edits with --edit_noise=source_inversion or null_text_inversion alone")
  if not inverting and (default or any("source_prompt" in e for e in prompts)):
    raise ValueError(f"{what}; here {'--edit_noise is ' + sample_config.edit_noise if edits else 'nothing is edited'}: "
                     "leave the source prompt out, or edit with --edit_noise=source_inversion")
  if stray := [e["prompt"] for i, e in enumerate(prompts) if "source_prompt" in e and i not in edits]:
    raise ValueError(f"{what}; these prompts edit nothing (give them an init_image or init_video, or no "
                     f"source_prompt): {stray[:3]}")
  if inverting:
    edited = sorted(edits)
    check_source_inversion([prompts[i]["prompt"] for i in edited],
                           [prompts[i].get("source_prompt", "") for i in edited],
                           [prompts[i].get("negative_prompt", sample_config.negative_prompt) for i in edited], guided)


def extended(config, graphdef, params, frozen, tokenizer, prompts, sample_config, mesh, seeds, negative_prompts,
             first, guide=None) -> np.ndarray:
  """Clips [len(prompts), num_per_prompt, frames, h, w, 3] (as `generate` made them with these arguments) extended
  to sample.video_length frames (video_extension.py), each sample window by window with its own noise."""
  n = sample_config.num_per_prompt
  rows = lambda values: [value for value in values for _ in range(n)]
  window_config = sample_config.copy_and_resolve_references()
  window_config.update(num_per_prompt=1, strength=1.0, edit_noise="random")  # the new frames from noise

  def generate_window(init, keep, keys):
    return generate(config, graphdef, params, frozen, tokenizer, rows(prompts), window_config, mesh,
                    negative_prompts=rows(negative_prompts), init_images=init, keep_masks=keep, keys=keys,
                    guide=guide)[:, 0]

  clips = first.reshape((-1,) + first.shape[2:])
  videos = video_extension.extend(clips, generate_window, example_keys(seeds, n), sample_config.video_length,
                                  extension_context(config, sample_config))
  return videos.reshape(first.shape[:2] + videos.shape[1:])


def skip_layer_guidance_absent(sample_config, edit: bool) -> str | None:
  """Why SD3's skip-layer guidance (sample.skip_layers) acts at none of a sampling's steps: its guidance scale is 1
  (a prompt's own), or its window (samplers.skip_layer_steps) holds none of them (an edit's, `edit`: the last ones of
  the grid); None where it acts or is not asked for."""
  s = sample_config
  if not s.skip_layers:
    return None
  if s.guidance_scale == 1:
    return "guidance scale 1 (it is added to classifier-free guidance)"
  inside = samplers.skip_layer_steps(s.steps, s.skip_layer_start, s.skip_layer_stop)
  first = editing.first_step(s.steps, s.strength) if edit else 0
  if not inside or first > inside[-1]:
    window = f"skip_layer_start / stop {s.skip_layer_start} / {s.skip_layer_stop}: " + (
        f"steps {inside[0]} to {inside[-1]} of {s.steps}" if inside else f"none of {s.steps} steps")
    return f"its window ({window}) holds none of " + (
        f"the steps an edit at strength {s.strength} runs ({first} to {s.steps - 1})" if edit else "them")
  return None


def write_samples(config, graphdef, params, frozen, tokenizer, prompts, sample_config, mesh, step, output_dir,
                  lowres=None, edits=None, adapters=(), guide=None, refiner=None):
  """Generate for prompts (strings, or dicts with per-prompt seed / guidance_scale / guidance_interval /
  negative_prompt / lora_scale, and the init_image / mask / init_video files of an edit) and write outputs.
  edits: {prompt index: (image, keep)} as edit_inputs.read reads them, the prompts to edit instead of generating
  for.
  lowres: a super-resolution stage's inputs, uint8 [len(prompts), num_per_prompt, ...]. adapters: lora.Adapters
  fused into the weights (params, frozen), each at its scale or at a prompt's lora_scale (lora.at_scales), recorded
  in the provenance. guide: an autoguidance.Guide (recorded too). refiner: a refiner.Refiner the model hands its
  latents to (an ensemble of experts; recorded too)."""
  entries = [{"prompt": p} if isinstance(p, str) else dict(p) for p in prompts]
  for entry in entries:
    entry.setdefault("seed", sample_config.seed)
    entry.setdefault("guidance_scale", sample_config.guidance_scale)
    if entry.get("negative_prompt", sample_config.negative_prompt):  # recorded only when there is one
      entry.setdefault("negative_prompt", sample_config.negative_prompt)
  interval = lambda i: tuple(entries[i].get("guidance_interval", sample_config.guidance_interval))
  unused = [name for name, given in (("--guidance_interval", any(map(interval, range(len(entries))))),
                                     ("the autoguidance guide", guide is not None)) if given]
  if unused and all(float(e["guidance_scale"]) == 1 for e in entries):
    log.warning("%s: no effect at guidance scale 1 (no step is guided)", " and ".join(unused))
  edits = edits or {}
  animated = edit_inputs.animated(config, [keep for _, keep in edits.values()] if edits else None)
  references = edit_inputs.references(config)  # FLUX.1 Kontext's and Depth / Canny's: sampled from noise beside
  for i in edits if not (animated or references) else ():  # (an image-to-video model's are not edits)
    entries[i].setdefault("strength", sample_config.strength)
    entries[i]["edit_noise"] = sample_config.edit_noise
  images, fused = [None] * len(entries), (None, None)  # (LoRA scales, the weights with the adapters fused at them)
  # One compiled sampler per (guidance scale, guidance interval), and for edits per strength too (FLUX.1 Kontext's
  # references: per size); the adapters fused once per set of LoRA scales (sorted first: one fused copy of the
  # weights at a time).
  lora_scales = lambda i: tuple(a.scale for a in lora.at_scales(adapters, entries[i].get("lora_scale")))
  settings = [(lora_scales(i), entries[i]["guidance_scale"], interval(i),
               (1.0 if references else entries[i].get("strength", sample_config.strength)) if i in edits else -1.0,
               edits[i][0].shape[:-1] if references and i in edits else ())
              for i in range(len(entries))]
  output_dir = pathlib.Path(output_dir)
  provenance = samples_provenance(config, sample_config, step, adapters, guide, refiner)
  files = SampleFiles(output_dir, provenance, entries) if jax.process_index() == 0 else None  # (process 0 writes)
  try:
    for setting in sorted(set(settings)):
      scales, scale, group_interval, strength, _ = setting
      group = [i for i, other in enumerate(settings) if other == setting]
      if fused[0] != scales:
        fused = scales, lora.fused(Weights(params, frozen),
                                   lora.at_scales(adapters, entries[group[0]].get("lora_scale")))
      group_params, group_frozen = fused[1]
      edited = strength >= 0
      group_config = sample_config.copy_and_resolve_references()
      group_config.guidance_scale = float(scale)
      group_config.guidance_interval = group_interval
      group_config.strength = strength if edited else sample_config.strength
      if why := skip_layer_guidance_absent(group_config, edited and not references):
        log.warning("skip-layer guidance acts at no step of prompts %s: %s", [entries[i]["prompt"] for i in group],
                    why)
        for i in group:  # (their provenance says so instead of the settings)
          entries[i]["skip_layer_guidance"] = f"none: {why}"
      init_images, keep_masks = (np.stack([edits[i][k] for i in group]) for k in (0, 1)) if edited else (None, None)
      group_prompts, seeds = [entries[i]["prompt"] for i in group], [entries[i]["seed"] for i in group]
      negatives = [entries[i].get("negative_prompt", "") for i in group]
      sources = [entries[i].get("source_prompt", "") for i in group] if edited else None
      common = dict(seeds=seeds, negative_prompts=negatives)
      n, extending = group_config.num_per_prompt, config.model.temporal and sample_config.video_length
      written_as_made = files is not None and refiner is None and not extending  # (else each group once it is done)
      on_batch = (lambda first, batch, group=group: [files.write(group[(first + k) // n], (first + k) % n, sample)
                                                     for k, sample in enumerate(batch)]) if written_as_made else None
      if refiner is not None:  # an ensemble of experts: the model's latents, still noisy, finished by the refiner
        generated = handed_over(refiner, config, graphdef, group_params, group_frozen, tokenizer, group_prompts,
                                group_config, mesh, **common)
      else:
        generated = generate(config, graphdef, group_params, group_frozen, tokenizer, group_prompts, group_config, mesh,
                             lowres=None if lowres is None else np.asarray(lowres)[group], init_images=init_images,
                             keep_masks=keep_masks, guide=guide, source_prompts=sources, on_batch=on_batch,
                             kept_prompts=sum(i < GRID_PROMPTS for i in group) if written_as_made else None,
                             **common)
      if extending:
        generated = extended(config, graphdef, group_params, group_frozen, tokenizer, group_prompts, group_config, mesh,
                             seeds, negatives, generated, guide)
      for i, row in zip(group, generated):  # (written as made: the grid's prompts' rows alone)
        images[i] = row
        for k, sample in enumerate(row) if files is not None and not written_as_made else ():
          files.write(i, k, sample)
  except KeyboardInterrupt:
    if files is not None:
      log.warning("interrupted: the %d samples made so far are in %s (manifest.jsonl lists them; no grid)",
                  len(files.records), output_dir)
    raise
  finally:
    if files is not None:
      files.close()
  if files is None:  # every process samples its shard; process 0 writes
    return output_dir / "grid.png"
  write_manifest(output_dir, [files.records[key] for key in sorted(files.records)])  # (in prompt order)
  return write_grid(output_dir, entries, np.stack(images[:GRID_PROMPTS]), provenance, edits,
                    "the given image" if references else "the edited image")


def samples_provenance(config, sample_config, step, adapters=(), guide=None, refiner=None) -> dict:
  """What every sample of a sampling job records of how it was made (its own prompt, seed and guidance aside)."""
  provenance = {"sampler": sample_config.sampler, "steps": sample_config.steps,
                "checkpoint_step": "none: the pretrained checkpoints" if step is None else int(step),
                "ema": bool(sample_config.use_ema), "config_hash": config_hash(config)}
  if adapters:
    provenance["lora"] = lora.provenance(adapters)
  if sample_config.guidance_interval:
    provenance["guidance_interval"] = list(sample_config.guidance_interval)
  if sample_config.flux_guidance != -1:
    provenance["flux_guidance"] = sample_config.flux_guidance
  if text_to_image.sdxl_refiner(config):
    provenance["aesthetic_scores"] = [sample_config.aesthetic_score, sample_config.negative_aesthetic_score]
  if sample_config.skip_layers:
    s = sample_config
    provenance["skip_layer_guidance"] = {"layers": list(s.skip_layers), "scale": s.skip_layer_scale,
                                         "start": s.skip_layer_start, "stop": s.skip_layer_stop}
  if guide is not None:
    provenance["guide"] = autoguidance.provenance(guide)
  if refiner is not None:
    provenance["refiner"] = refiner_provenance(refiner)
  if config.model.temporal and sample_config.video_length:
    clip = clip_frames(config, sample_config)
    provenance.update(video_length=sample_config.video_length, clip_frames=clip,
                      context_frames=extension_context(config, sample_config))
  return provenance


class SampleFiles:
  """A sampling job's samples written as they are made: each one's files, and its line appended to manifest.jsonl at
  once, so that a job interrupted (Ctrl-C, a lost machine) keeps every sample it made."""

  def __init__(self, output_dir: pathlib.Path, provenance: dict, entries: list[dict]):
    output_dir.mkdir(parents=True, exist_ok=True)
    self.output_dir, self.provenance, self.entries = output_dir, provenance, entries
    self.records = {}  # (prompt index, sample index) -> record
    self.manifest = open(output_dir / "manifest.jsonl", "w")

  def write(self, p: int, i: int, sample: np.ndarray) -> None:
    """Prompt p's sample i: uint8 [h, w, 3], or a clip [frames, h, w, 3]."""
    record = sample_record(self.provenance, self.entries[p], p, i, sample.ndim == 4)
    write_sample(self.output_dir, record, sample)
    self.manifest.write(json.dumps(record) + "\n")
    self.manifest.flush()
    self.records[p, i] = record

  def close(self) -> None:
    self.manifest.close()


def handed_over(refiner, config, graphdef, params, frozen, tokenizer, prompts, sample_config, mesh, seeds=None,
                negative_prompts=None) -> np.ndarray:
  """Samples (as generate's) of an ensemble of experts (refiner.py): the model runs the grid to the handoff, the
  refiner (a refiner.Refiner) the rest from the model's latents, each reading the prompts with its own encoders."""
  refiner_settings = refiners.sample_config(refiner.config, sample_config, image_size(config, sample_config),
                                            refiner.aesthetic_scores)
  step = refiners.handoff_step(config, sample_config, sampling_logsnr(config, sample_config), refiner.denoising_end)
  latents = generate(config, graphdef, params, frozen, tokenizer, prompts, sample_config, mesh, seeds=seeds,
                     negative_prompts=negative_prompts, handoff=step)
  return generate(refiner.config, refiner.graphdef, refiner.weights.params, refiner.weights.frozen, refiner.tokenizer,
                  prompts, refiner_settings, mesh, seeds=seeds, negative_prompts=negative_prompts, handoff=step,
                  latents=latents)


def write_training_samples(config, weights: Weights, graphdef, step: int, workdir):
  """Samples of the config's prompts from a run's weights at `step` (a super-resolution stage: as many real
  validation images, downsampled, with their captions; an image-to-video model: the first frames of as many
  validation clips, with their captions; a run on reference images, data.reference_key: as many validation
  references, FLUX.1 Kontext's edit sources or Depth / Canny's control images, with their captions, where the data
  hold a validation split, config_checks.held_out), at the training images' size, into WORKDIR/samples/step_N and
  TensorBoard; returns the grid path. Every process takes part; process 0 writes."""
  from diffusion_jax import metric_writers
  from diffusion_jax.text import tokenizers

  mesh = sharding.make_mesh(config.mesh)
  prompts, lowres = list(config.sample.prompts), None
  sample_config = config.sample.copy_and_resolve_references()
  sample_config.update(height=0, width=0)  # (at the training size, as the validation images they may start at)
  if config.model.lowres_conditioning:
    from diffusion_jax import cascade

    prompts, lowres = cascade.validation_lowres(config, len(prompts), config.sample.num_per_prompt)
  edits = None
  if text_to_image.image_to_video(config):  # animates the first frames of as many validation clips
    from diffusion_jax import evaluate

    clips, prompts, _ = evaluate.validation_media(config, len(prompts))
    frames = clip_frames(config, config.sample)
    last = text_to_image.first_last_frame(config)  # (and a first-last-frame model, their last frames)
    edits = dict(enumerate(edit_inputs.first_frame_edit(clip[0], frames, clip[:frames][-1] if last else None)
                           for clip in clips))
  if config.data.reference_key and config_checks.held_out(config.data):  # (else Kontext's: text-to-image)
    from diffusion_jax import evaluate

    _, prompts, references = evaluate.validation_media(config, len(prompts))
    edits = {i: (reference, np.zeros(reference.shape[:2], bool)) for i, reference in enumerate(references)}
  grid = write_samples(config, graphdef, weights.params, weights.frozen, tokenizers.from_config(config), prompts,
                       sample_config, mesh, step, f"{workdir}/samples/step_{step}", lowres=lowres, edits=edits)
  if jax.process_index() == 0:
    writer = metric_writers.MetricWriter(workdir, config.train.steps, name="samples")
    writer.write_image(step, "samples/grid", media.read_image(grid))
    writer.close()
  return grid


def define_flags():
  """Flags of the sampling CLI (defined only when this module is the program)."""
  flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/).")
  config_flags.DEFINE_config_file("config", None, "Instead of --workdir: a config whose every part is read from "
                                  "pretrained checkpoints (configs/flux.py:ROOT, ...), sampled as they are, without "
                                  "training (needs --output_dir).")
  flags.DEFINE_integer("step", None, "Checkpoint step; default latest.")
  flags.DEFINE_string("prompts", None, "Prompts file (.txt one per line, or .jsonl); default config prompts.")
  flags.DEFINE_string("output_dir", None, "Output directory; default WORKDIR/samples/step_<N> (step_<N>.2, .3, ... "
                      "where that holds samples already).")
  flags.DEFINE_string("sampler", None, f"Sampler, one of {list(samplers.SAMPLERS)}.")
  flags.DEFINE_integer("steps", None, "Sampler steps (>= 1).")
  flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale (>= 0).")
  flags.DEFINE_float("guidance_scale_low_noise", None, "A pair of Wan experts: the guidance scale of the low-noise "
                     "expert's steps (>= 0; -1 = --guidance_scale; default: config sample.guidance_scale_low_noise).")
  flags.DEFINE_string("guidance_interval", None, "LOW:HIGH: guide only the steps whose noise level sigma/alpha is in "
                      "(LOW, HIGH], e.g. 0.28:5.42; none = every step (default: config sample.guidance_interval).")
  autoguidance.define_flags()
  flags.DEFINE_integer("num_per_prompt", None, "Images per prompt.")
  flags.DEFINE_integer("seed", None, "Noise seed.")
  flags.DEFINE_string("negative_prompt", None, "Text guidance steers away from (default: config "
                      "sample.negative_prompt; \"\" = none).")
  flags.DEFINE_bool("use_ema", None, "Use EMA weights (default: config sample.use_ema).")
  flags.DEFINE_integer("frames", None, "Video models: frames per clip, up to model.max_frames (on a causal "
                       "autoencoder: 1 + a multiple of 4, its latent frames up to model.max_frames).")
  flags.DEFINE_float("flow_shift", None, "Flow schedule: the sampling grid's time shift (default: config "
                     "sample.flow_shift, 0 = diffusion.schedule_params.shift, or with sample.resolution_shift "
                     "Flux's shift for the samples' token count; Wan's pipelines: 3 at 480p, 5 at 720p).",
                     lower_bound=0)
  flags.DEFINE_list("skip_layers", None, "SD3: skip-layer guidance's transformer blocks, e.g. 7,8,9; none = off "
                    "(default: config sample.skip_layers).")
  flags.DEFINE_float("skip_layer_scale", None, "SD3: skip-layer guidance's scale (>= 0; default: config "
                     "sample.skip_layer_scale).")
  flags.DEFINE_float("flux_guidance", None, "FLUX.1 dev: the guidance scale it is told to follow (>= 0; its "
                     "pipelines' guidance_scale; -1 = model.flux_guidance; default: config sample.flux_guidance).")
  flags.DEFINE_enum("kontext_resize", None, ["preferred", "own"], "FLUX.1 Kontext: its reference images at the "
                    "resolution it trained at nearest their aspect ratio, or at their own size (default: config "
                    "sample.kontext_resize).")
  flags.DEFINE_float("redux_prompt_scale", None, "FLUX.1 Redux: the scale of the prompt's T5 states and the image's "
                     "tokens (FluxPriorReduxPipeline's prompt_embeds_scale; default: config "
                     "sample.redux_prompt_scale, 1).")
  flags.DEFINE_float("redux_pooled_scale", None, "FLUX.1 Redux: the scale of the pooled CLIP embedding "
                     "(FluxPriorReduxPipeline's pooled_prompt_embeds_scale; default: config "
                     "sample.redux_pooled_scale, 1).")
  flags.DEFINE_float("aesthetic_score", None, "The SDXL refiner: the aesthetic score its U-Net is told the sample has "
                     "(default: config sample.aesthetic_score, 6).")
  flags.DEFINE_float("negative_aesthetic_score", None, "The SDXL refiner: the aesthetic score guidance's other branch "
                     "is told (default: config sample.negative_aesthetic_score, 2.5).")
  flags.DEFINE_integer("height", None, "Height of the samples in pixels, any the model divides (default: config "
                       "sample.height, 0 = data.resolution).", lower_bound=0)
  flags.DEFINE_integer("width", None, "Width of the samples in pixels, any the model divides (default: config "
                       "sample.width, 0 = data.width, or data.resolution where that is 0).", lower_bound=0)
  flags.DEFINE_integer("batch_size", None, "Samples generated at once over all devices (default: config "
                       "sample.batch_size).")
  flags.DEFINE_integer("video_length", None, "Video models: frames per video, beyond a clip's by autoregressive "
                       "extension (default: config sample.video_length, 0 = one clip).", lower_bound=0)
  flags.DEFINE_integer("context_frames", None, "With --video_length: frames of the video so far each new window "
                       "keeps; on a causal autoencoder's latents 1 + a multiple of 4 (default: config "
                       "sample.context_frames, 0 = half a clip, or the 1 + a multiple of 4 nearest it).", lower_bound=0)
  flags.DEFINE_float("reconstruction_guidance", None, "Edits and video extension: > 0 also steers what is "
                     "generated to agree with what is kept, at a backward pass per step (default: config "
                     "sample.reconstruction_guidance, 0 = replacement only).", lower_bound=0)
  flags.DEFINE_string("init_image", None, "Image to edit for every prompt without its own (image-to-image; a "
                      "video model: the clips' first frame; an image-to-video Wan's, or Wan 2.2 TI2V's, condition; "
                      "FLUX.1 Kontext's reference, FLUX.1 Depth / Canny's control image).")
  flags.DEFINE_string("init_video", None, "Video models: a clip (.gif, .mp4) to edit for every prompt without an "
                      "edit of its own (video-to-video, at --strength).")
  flags.DEFINE_string("mask", None, "With --init_image: inpainting mask, white = generate anew, black (or "
                      "transparent) = keep.")
  flags.DEFINE_string("last_image", None, "With --init_image, an image-to-video Wan: the image every clip ends at "
                      "(its last frame; Wan 2.2's, whose condition has no CLIP tokens, or Wan 2.1 FLF2V's).")
  flags.DEFINE_float("strength", None, "With --init_image or --init_video: the part of the sampling grid run from "
                     "it noised, in (0, 1] (default: config sample.strength).")
  flags.DEFINE_enum("edit_noise", None, list(editing.EDIT_NOISE), "With --init_image or --init_video: random (SDEdit), "
                    "inversion (DDIM inversion of the image), source_inversion (inversion with --source_prompt, "
                    "which guidance then steers from) or null_text_inversion (that, with guidance's other text "
                    "optimised per step to retrace the inversion; DDIM only) (default: config sample.edit_noise).")
  flags.DEFINE_integer("null_text_iterations", None, "With --edit_noise=null_text_inversion: Adam steps on "
                       "guidance's other text per sampler step (default: config sample.null_text_iterations).",
                       lower_bound=0)
  flags.DEFINE_string("source_prompt", None, "With --edit_noise=source_inversion or null_text_inversion: what the "
                      "image or clip to edit shows, for every edit without its own.")
  flags.DEFINE_multi_string("lora", [], "FILE[:SCALE], repeatable: a LoRA adapter fused into the weights at SCALE "
                            "(default 1); ours, or a Wan LoRA in diffusers', Wan's or musubi-tuner's layout "
                            "(low_noise=FILE[:SCALE]: of Wan 2.2 A14B's low-noise expert).")
  flags.DEFINE_string("mesh", None, MESH_HELP)
  config_flags.DEFINE_config_file("refiner", None, "A config read from pretrained checkpoints (e.g. "
                                  "configs/stable_diffusion.py:/path/to/stable-diffusion-xl-refiner-1.0) whose model "
                                  "finishes every sample from the model's latents (an ensemble of experts; "
                                  "--refiner.FIELD=VALUE overrides its fields).")
  flags.DEFINE_float("denoising_end", None, "With --refiner (or --refiner_workdir): the part of the grid the model "
                     "runs, in (0, 1), before the refiner runs the rest from its latents (default "
                     f"{refiners.DENOISING_END}).")
  flags.DEFINE_multi_string("refiner_lora", [], "With --refiner (or --refiner_workdir): FILE[:SCALE], repeatable: "
                            "a LoRA adapter fused into the refiner's weights at SCALE (default 1), as --lora into the "
                            "model's.")
  flags.DEFINE_string("refiner_workdir", None, "Instead of --refiner: a training workdir of the refiner (a fine-tuned "
                      "SDXL refiner, say) whose checkpoint runs the last part of every sample's grid.")
  flags.DEFINE_integer("refiner_step", None, "With --refiner_workdir: its checkpoint (default: the latest).")
  config_flags.DEFINE_config_file("cascade", None, "Cascade config: sample base -> super-resolution stages.")
  distributed.define_flags()


def sample_cascade(cascade, prompts_path=None, output_dir=None) -> pathlib.Path:
  from diffusion_jax import cascade as cascades

  entries = read_prompts(prompts_path) if prompts_path else [{"prompt": p} for p in cascade.prompts]
  if settings := sorted({key for entry in entries for key in entry} - {"prompt"}):
    raise ValueError(f"{prompts_path}: with --cascade a line gives its 'prompt' alone (the cascade config sets the "
                     f"seed and each stage's settings, e.g. --cascade.seed, --cascade.stages[K].guidance_scale); "
                     f"lines here also give {', '.join(settings)}")
  prompts = [entry["prompt"] for entry in entries]
  if not prompts:
    raise ValueError("The cascade has no prompts: give --prompts or set prompts in the cascade config.")
  stages = cascades.load(cascade)
  outputs = cascades.generate(stages, prompts)
  if jax.process_index() != 0:
    return pathlib.Path(output_dir or cascade.output_dir) / "cascade.png"
  return cascades.write(stages, prompts, outputs, output_dir or cascade.output_dir)


def main(argv):
  del argv
  f = flags.FLAGS
  with cli.refusals():  # every flag the command line must drop, named at once
    if f.cascade is None and not f.workdir and f.config is None:
      raise app.UsageError("--workdir (or --config, or --cascade) is required.")
    if f.config is not None:
      if f.workdir or f.cascade is not None:
        raise app.UsageError("--config samples the pretrained checkpoints a config reads: not with --workdir or "
                             "--cascade.")
      cli.refuse(("step",), "not used with --config: its weights are the pretrained checkpoints', no training's")
      cli.refuse(("guide_workdir", "guide_step"), "not used with --config: autoguidance's guide is a training "
                 "checkpoint of the model (sample a --workdir)")
      if not f.output_dir:
        raise app.UsageError("--config needs --output_dir (there is no workdir to write samples into).")
    if f.cascade is not None:
      cli.refuse(("workdir", "step") + WORKDIR_SETTINGS, "not used with --cascade, which names each stage's workdir, "
                 "checkpoint and settings (e.g. --cascade.stages[1].steps=50, --cascade.stages[1].step=N, "
                 "--cascade.seed, --cascade.num_per_prompt)")
      cli.refuse(("init_image", "mask", "init_video", "last_image", "source_prompt"), "not used with --cascade: "
                 "images and clips are edited by one model (--workdir)")
      cli.refuse(("lora",), "not used with --cascade: an adapter fits one model; give it to its stage "
                 "(--cascade.stages[K].lora=FILE[:SCALE])")
      cli.refuse(("guide_workdir", "guide_step"), autoguidance.WITH_CASCADE)
      cli.refuse(("refiner", "refiner_workdir", "refiner_step", "denoising_end", "refiner_lora"), "not used with "
                 "--cascade, whose stages are super-resolution models")
  if f.cascade is not None:
    from diffusion_jax import cascade

    cascade.set_every_stage(f.cascade, batch_size=f.batch_size, negative_prompt=f.negative_prompt, mesh=f.mesh)
  for name in ("mask", "last_image"):
    if f[name].value and not f.init_image:
      raise app.UsageError(f"--{name} needs the --init_image it belongs to.")
  if f.init_image and f.init_video:
    raise app.UsageError("--init_image or --init_video: an image or a clip to edit, not both.")
  distributed.initialize()
  overrides = {name: f[name].value for name in WORKDIR_SETTINGS + ("batch_size", "negative_prompt")}
  try:
    if f.guidance_interval is not None:
      overrides["guidance_interval"] = samplers.parse_guidance_interval(f.guidance_interval, "--guidance_interval=")
    if f.skip_layers is not None:
      overrides["skip_layers"] = parse_skip_layers(f.skip_layers)
    if f.cascade is not None:
      path = sample_cascade(f.cascade, f.prompts, f.output_dir)
    else:
      path = run(f.workdir, overrides, f.prompts, f.step, f.output_dir, f.init_image, f.mask,
                 [lora.read(spec) for spec in f.lora], f.init_video, f.guide_workdir, f.guide_step,
                 f.source_prompt, f.last_image, f.mesh and sharding.mesh_from_flag(f.mesh), f.config, f.refiner,
                 f.denoising_end, [lora.read(spec, "--refiner_lora") for spec in f.refiner_lora], f.refiner_workdir,
                 f.refiner_step)
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)
  logging.info("wrote %s", path)
  print(path)


if __name__ == "__main__":
  define_flags()
  cli.run(main, config_kinds={"config": "experiment", "refiner": "experiment", "cascade": "cascade"})
