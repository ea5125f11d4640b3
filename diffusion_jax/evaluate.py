"""Evaluation job: score checkpoints of a training workdir, once each, beside training or on demand; or the
pretrained checkpoints a config reads (a Stable Diffusion, SDXL, SD3, Flux or Wan root), as they are.

  python -m diffusion_jax.evaluate --workdir=DIR [--watch] [--step=N] [--guidance_sweep=1,2,3,5]
                                   [--steps_sweep=10,25,50] [--sampler_sweep=dpmpp_2m:20,ddpm:1000]
                                   [--threshold_sweep=static,dynamic] [--aug_level_sweep=0,0.2]
                                   [--guidance_interval=LOW:HIGH] [--guidance_interval_sweep=none,0.28:5.42]
                                   [--guide_workdir=DIR] [--guide_step=N]
                                   [--image_to_video | --image_to_image | --video_to_video]
                                   [--strength=0.6] [--edit_noise=inversion] [--strength_sweep=0.2,0.4,0.6,0.8,1]
                                   [--edit_noise_sweep=random,inversion,source_inversion,null_text_inversion]
                                   [--edit_toward=own]

  python -m diffusion_jax.evaluate --config=configs/stable_diffusion.py:/path/to/sd-root --output_dir=DIR
                                   [--config.data.folder=...] [--guidance_sweep=...] [--lora=FILE]
                                   [--refiner=configs/stable_diffusion.py:/path/to/refiner [--denoising_end=0.8]]

  python -m diffusion_jax.evaluate --cascade=configs/cascades/shapes_16_32.py [--num_prompts=64]
                                   [--aug_level_sweep=0.1,0.3,0.5] [--guidance_sweep=1,2] [--sweep_stage=-1]

Flags:
  --workdir           training workdir (this, --config or --cascade)
  --config            instead of --workdir: a config file whose every part is read from pretrained checkpoints
                      (configs/stable_diffusion.py:ROOT, stable_diffusion3.py, flux.py, wan_t2v.py),
                      --config.FIELD=VALUE overriding its fields (e.g. the validation data: --config.data.*): its
                      weights as they are (a LoRA's updates at zero; --lora fuses an adapter file) are evaluated
                      once, as step 0, with every metric and sweep a workdir's checkpoint gets; a config that trains
                      a part from scratch (the demo's) is refused, naming the parts; needs --output_dir; no --step,
                      --watch or autoguidance guide
  --output_dir        with --config: where the evaluation goes, as a workdir's: OUTPUT_DIR/config.json (the config
                      evaluated), logs/eval.jsonl (its line's settings with "pretrained": true), logs/eval
                      (TensorBoard) and eval/ (sweep tables and plots)
  --cascade           cascade config (configs/cascades/*.py, fields overridable with --cascade.<field>):
                      sample the whole cascade for the validation captions, one image each, and print
                      the metrics of its final output against the real images (FID, CLIP score, judge), also
                      appended with the chain's provenance to CASCADE_OUTPUT_DIR/eval/cascade.jsonl (the first
                      images above their real ones: eval/cascade_generated.png); the sweep flags then vary
                      the settings of stage --sweep_stage (default the last), the stages below it sampling
                      once, and write CASCADE_OUTPUT_DIR/eval/stageK_NAME_sweep_step_N.{md,png} (N: stage K's
                      step); the flags of a workdir's checkpoints (--step, --watch, ...) are refused
  --step              evaluate this checkpoint only (default: every checkpoint not yet evaluated; an unreadable
                      one is then skipped with a warning)
  --watch             keep polling for new checkpoints until none appears for --max_idle_minutes
  --poll_seconds      polling interval with --watch (default 60)
  --max_idle_minutes  with --watch, stop after this long without a new checkpoint (default 60)
  --num_prompts       validation captions to generate for (default 64); also the FID set size (at most the
                      validation split's examples)
  --batch_size        samples generated at once over all devices (default: the config's sample.batch_size;
                      with --cascade it sets every stage's, one stage's is --cascade.stages[k].batch_size);
                      more are generated batch by batch, with progress; also the held-out loss's examples at once
  --negative_prompt   text guidance steers away from for every caption (default: the config's
                      sample.negative_prompt, "" = none; with --cascade it sets every stage's)
  --heldout_examples  validation examples for the held-out loss (default 64)
  --combination_prompts  configs with data.heldout_combinations: validation captions naming a held-out
                      colour-shape combination to generate for and judge, at the config's sample settings and
                      at every sweep point (default 64; 0: none)
  --combinations      comma-separated colour-shape combinations ("red square,green circle") whose validation
                      captions --combination_prompts judges, for any captioned_shapes run (default: the config's
                      data.heldout_combinations), e.g. those a fine-tune showed that its source run never saw;
                      recorded in the settings
  --lora              FILE[:SCALE], repeatable: a LoRA adapter (lora.py) fused into every checkpoint's weights at
                      SCALE (default 1), e.g. a LoRA's updates evaluated on the run they were trained from;
                      recorded in the settings (a cascade's stages take theirs as --cascade.stages[K].lora)
  --inception_weights local FID Inception-v3 weights, pytorch-fid's pt_inception-2015-12-05-6726825d.pth
                      (needs torch) or the same tensors as .safetensors / .npz: adds fid_inception (the
                      standard FID; for video models per frame). Nothing is downloaded.
  --i3d_weights       local FVD I3D weights, the Kinetics-400 RGB model in the pytorch_i3d layout that FVD code
                      loads (i3d_pretrained_400.pt; needs torch) or the same tensors as .safetensors / .npz:
                      adds fvd_i3d for video models (clips under 9 frames stretched in time to 16)
  --lpips_weights     super-resolution stages: a local LPIPS weights directory (torchvision's vgg16-397923af.pth
                      and the lpips package's weights/v0.1/vgg.pth; metrics/lpips.py): adds lpips, the stage's
                      perceptual distance from the real images, beside lpips_bicubic, that of bicubic upsampling
                      (lower is closer; video: per frame)
  --clip_weights      local Hugging Face CLIP directory (config.json, model.safetensors, tokenizer.json, e.g.
                      openai/clip-vit-base-patch32): adds clip_score, 100 * max(cosine, 0) of each generated
                      image (video: each frame) with its caption, averaged
  --image_to_video    video models: each caption's real clip's first frame is given (image-to-video; sample.py
                      --init_image) and kept; recorded in the settings
  --image_to_image    image models: each caption's real image is edited as a whole (image-to-image, SDEdit; sample.py
                      --init_image) toward another caption: on captioned_shapes its own with every object in the next
                      colour, on other data the next image's. The metrics judge the edits by those captions, and add
                      psnr_source (each edit's PSNR against its image) and accuracy_source/* (the judge against the
                      image's own caption): what the edit kept. Recorded in the settings; WORKDIR/eval/
                      edits_step_N.png shows the first real images above their edits
  --video_to_video    video models: the same for each real clip, edited as a whole (video-to-video; sample.py
                      --init_video); on moving_shapes toward its own caption with the direction reversed; not with
                      --video_length
  --edit_toward       with --image_to_image or --video_to_video: other (default: the caption those flags name) or own
                      (each image or clip edited toward its own caption: a reconstruction, whose psnr_source says how
                      much of it the edit gives back; recorded in the settings)
  --strength          with --image_to_video, --image_to_image or --video_to_video: the part of the sampling grid run
                      (default: the config's sample.strength)
  --edit_noise        with those: what the edits start from, random (SDEdit), inversion (DDIM inversion of the
                      given media), source_inversion (inversion with each real image's or clip's own caption as
                      the source prompt) or null_text_inversion (that, with guidance's other text optimised per
                      step; DDIM only); sample.py's flag (default: the config's sample.edit_noise)
  --null_text_iterations
                      with those and null_text_inversion: Adam steps on guidance's other text per sampler step
                      (sample.py's flag; default: the config's sample.null_text_iterations)
  --video_length      video models: make this many frames by autoregressive extension (video_extension.py) and score
                      the last clip's worth, the frames the extension made (default: the config's, 0 = one clip)
  --context_frames    with --video_length: frames each window keeps (default: the config's, 0 = half a clip; on a
                      causal autoencoder's latents 1 + a multiple of 4, by default the one nearest half a clip)
  --guidance_interval LOW:HIGH: guide only the steps whose noise level sigma/alpha is in (LOW, HIGH] (sample.py's
                      flag; default: the config's); the sweeps run with it, e.g. --guidance_sweep at this interval
  --guide_workdir, --guide_step
                      autoguidance (autoguidance.py, as sample.py's flags): the weaker model whose prediction for
                      each caption is guidance's other branch, the same for every checkpoint; recorded in the settings
                      (with --cascade: each stage's --cascade.stages[K].guide_workdir and guide_step fields)
  --reconstruction_guidance
                      with --image_to_video or --video_length: reconstruction guidance weight (editing.py; default:
                      the config's, 0 = replacement only)
  --guidance_sweep    comma-separated guidance scales: also write a table and a plot of the metrics
                      against guidance (WORKDIR/eval/guidance_sweep_step_N.{md,png})
  --steps_sweep       comma-separated sampler step counts, written the same way (steps_sweep_step_N)
  --sampler_sweep     comma-separated SAMPLER[:STEPS] settings compared side by side (sampler_sweep_step_N),
                      e.g. dpmpp_2m:20,ddpm:1000
  --threshold_sweep   comma-separated thresholding kinds (none, static, dynamic) compared side by side
  --guidance_interval_sweep
                      comma-separated guidance intervals LOW:HIGH (or none = every step) compared side by side
                      (guidance_interval_sweep_step_N), e.g. none,0.28:5.42,1:5
  --strength_sweep    with --image_to_video, --image_to_image or --video_to_video: comma-separated edit strengths
                      (strength_sweep_step_N; for an edit toward another caption, the trade-off between following it
                      and keeping the real image)
  --edit_noise_sweep  with those: random,inversion,source_inversion,null_text_inversion (or some) side by side
                      (edit_noise_sweep_step_N)
  --aug_level_sweep   super-resolution stages: comma-separated noise-augmentation levels of the low-res
                      input (sample.aug_level), written as aug_level_sweep_step_N.{md,png}; with --workdir the
                      input is the real images downsampled, with --cascade what the stage below generates (the
                      level a cascade needs)
  --sweep_stage       with --cascade: the stage whose settings the sweeps vary (default -1, the last; 0 = the
                      base model, e.g. its guidance scale judged on the cascade's final output)
  --refiner           an ensemble of experts (sample.py's flag; refiner.py): a config read from pretrained
                      checkpoints (configs/stable_diffusion.py:/path/to/stable-diffusion-xl-refiner-1.0) whose model
                      runs the last part of every sample's grid from the model's latents, at every sample setting and
                      sweep point, with its config's aesthetic scores (--refiner.sample.aesthetic_score=...); the
                      held-out loss stays the model's; recorded in the settings; not with edits, --video_length or
                      autoguidance
  --denoising_end     with --refiner (or --refiner_workdir): the part of the grid the model runs, in (0, 1)
                      (default 0.8)
  --refiner_lora      with --refiner (or --refiner_workdir): FILE[:SCALE], repeatable: a LoRA adapter fused into the
                      refiner's weights (sample.py's flag); recorded in the settings
  --refiner_workdir   instead of --refiner: a training workdir of the refiner (sample.py's flag), its checkpoint's
                      EMA copy as its config's sample.use_ema says; recorded in the settings
  --refiner_step      with --refiner_workdir: its checkpoint's step (default: the latest)
  --mesh              AXIS=SIZE,... of the mesh each checkpoint (and a guide) is restored onto and sampled on, over
                      the default data=-1 (every device a whole copy): e.g. fsdp=8, sequence=4 (a video model's
                      frames split over 4); with --cascade, every stage's (sample.py's flag)
  --coordinator, --num_processes, --process_id, --auto_distributed
                      a multi-process job, as the main job's (`launch/local.py --module=diffusion_jax.evaluate`):
                      every process generates its part of each batch and follows process 0's list of checkpoints;
                      process 0 writes
Every swept value is checked before any checkpoint is loaded; the others keep the config's sample settings.

Per checkpoint it writes one line of `WORKDIR/logs/eval.jsonl` and TensorBoard scalars (`logs/eval`):
held-out loss per log-SNR level, FID (random-conv features) of generated vs real validation images
(video models: per frame, plus FVD with random-conv frame and motion features), and the judge's
per-attribute accuracy on captioned_shapes (shapes_judge, also split by object count; with
data.heldout_combinations also on --combination_prompts validation captions naming a combination the
model never saw,
accuracy_heldout_combinations/*; and heldout_loss_binding_gap, the held-out loss with the colours of a
two-object caption's objects swapped minus that with the true caption: 0 when the model does not bind
colours to objects) or
moving_shapes (motion_judge: direction of motion, object attributes, appearance change between frames; and
heldout_loss_direction_gap, the held-out loss with every caption's direction reversed minus that with the
true captions: 0 when the model ignores the direction word). A super-resolution stage is given the
validation images downsampled to its input size (at sample.aug_level) and judged on what it makes of
them, with its PSNR (and with --lpips_weights its LPIPS) against the real images next to that of bicubic
upsampling. Each eval.jsonl line also records the settings its numbers depend on (evaluation_settings); checkpoints
already evaluated under the same settings are skipped, so the job is resumable, and other settings evaluate them
again.
"""

import itertools
import json
import logging
import pathlib
import sys
import time

import jax
import numpy as np
import psutil
from absl import app, flags
from ml_collections import config_flags

from diffusion_jax import (autoguidance, cascade, checkpoint, cli, config_checks, distributed, edit_inputs, editing,
                           lora, media, metric_writers, sample, samplers, sharding)
from diffusion_jax import refiner as refiners
from diffusion_jax.data import captioned_shapes, pipeline
from diffusion_jax.metrics import (clip_score, fid, fvd, heldout_loss, i3d, inception, judges, lpips,
                                   motion_judge, psnr, shapes_judge)
from diffusion_jax.models import text_to_image
from diffusion_jax.text import tokenizers

log = logging.getLogger(__name__)


def validation_set(config, count: int, keep=None):
  """The first `count` validation examples (that `keep(example)` accepts, when given), in order: (batch for the
  model, uint8 images [n, h, w, 3] or videos [n, frames, h, w, 3], captions), at the training size (validation_media
  and model_batch)."""
  images, captions, references = validation_media(config, count, keep)
  return model_batch(config, images, captions, references), images, captions


def validation_media(config, count: int, keep=None):
  """(uint8 images [n, h, w, 3] or videos [n, frames, h, w, 3], captions, references) of the first `count`
  validation examples (that `keep(example)` accepts, when given; none: an empty array), in order, at the training
  size, each brought to it as it is read (a set of large files is never held whole); references: with
  data.reference_key (FLUX.1 Kontext's edit pairs, Depth / Canny's control images) each image's uint8 [h, w, 3],
  brought to the training size as training brings it, else None."""
  source = pipeline.data_source(config.data, "validation")
  examples = (source[i] for i in range(len(source)))
  size = pipeline.image_size(config.data)
  images, captions, references = [], [], []
  for example in itertools.islice(examples if keep is None else filter(keep, examples), count):
    frames, is_video = pipeline.as_frames(np.asarray(example[config.data.image_key]))
    frames = np.stack([pipeline.resize_and_crop(f, size, None) for f in frames])
    images.append(frames if is_video else frames[0])
    captions.append(example[config.data.caption_key].decode())
    if config.data.reference_key:
      references.append(pipeline.resize_and_crop(pipeline.rgb(np.asarray(example[config.data.reference_key])), size,
                                                 None))
  if not images:  # (none accepted)
    return np.zeros((0,), np.uint8), [], None
  return np.stack(images), captions, np.stack(references) if config.data.reference_key else None


def model_batch(config, images, captions: list[str], references=None) -> dict:
  """The batch the model reads (its held-out loss) of validation_media's uint8 media, captions and references."""
  ids, mask = tokenizers.from_config(config)(captions)
  batch = {"video" if images.ndim == 5 else "image": media.to_float(images), "text_ids": ids, "text_mask": mask}
  if references is not None:
    batch["reference"] = media.to_float(references)
  return batch


def metric_features(inception_weights=None, i3d_weights=None) -> dict:
  """{metric name: feature function} of the Fréchet distances to report: `fid_*` take uint8 images
  [n, h, w, 3] (video frames), `fvd_*` uint8 videos [n, frames, h, w, 3]. Random-conv features always;
  Inception-v3 (fid_inception) and I3D (fvd_i3d) when given their local weights files."""
  fns = {"fid_random_conv": fid.random_conv_features, "fvd_random_conv": fvd.random_video_features}
  if inception_weights:
    fns["fid_inception"] = inception.feature_fn(str(inception_weights))
  if i3d_weights:
    fns["fvd_i3d"] = i3d.feature_fn(str(i3d_weights))
  return fns


def frames(x: np.ndarray) -> np.ndarray:
  """Images [n, h, w, c] as they are; videos [n, frames, h, w, c] as their frames [n * frames, h, w, c]."""
  return x.reshape((-1,) + x.shape[-3:])


def frechet_distances(images, feature_fns=None):
  """A function generated uint8 media -> {metric name: Fréchet distance to the real `images`} for each of
  `feature_fns` (metric_features; default: random-conv features): FID over frames (of videos: all their
  frames), FVD for videos only. The real set's feature statistics are computed here, once, so an evaluation
  job builds this once and scores every checkpoint and sweep point with it."""
  fns = {name: fn for name, fn in (feature_fns or metric_features()).items()
         if name.startswith("fid_") or images.ndim == 5}
  media = lambda name, v: frames(v) if name.startswith("fid_") else v
  reference = {name: fid.statistics(fn(media(name, images))) for name, fn in fns.items()}

  def distances(generated) -> dict:
    return {name: fid.frechet_distance(*fid.statistics(fn(media(name, generated))), *reference[name])
            for name, fn in fns.items()}

  return distances


def media_metrics(config, generated, captions, frechet, clip=None) -> dict:
  """Metrics of generated uint8 media [n, (frames,) h, w, 3] for `captions`: the Fréchet distances that
  `frechet` (frechet_distances of the real media) gives, CLIP score with `clip` (clip_score.load), and the
  dataset's judge (per-attribute accuracy) where it has one."""
  metrics = frechet(generated)
  if clip is not None:  # videos: every frame against its caption
    metrics["clip_score"] = clip(frames(generated), np.repeat(captions, len(frames(generated)) // len(captions)))
  metrics.update(judges.accuracy(config, generated, captions))
  return metrics


def _generate(config, graphdef, params, frozen, mesh, captions, sample_config, lowres=None, edit=None,
              guide=None, sources=None, refiner=None) -> np.ndarray:
  """uint8 media [n, (frames,) h, w, 3], one per caption. Each caption its own noise (seed + index): the same
  noise for every caption would make the set far less diverse than real data (FID) and let the noise, not the
  caption, decide what the judge sees. edit: (init uint8 [n, (frames,) h, w, 3], keep bool [n, (frames,) h, w]),
  media to edit at sample_config.strength (editing.py; given_media). A video model with sample.video_length makes
  that many frames (video_extension.py) and returns the last clip's worth, the frames the extension made.
  guide: an autoguidance.Guide or None. sources: the source prompts of edits inverted with them (what the given
  media show), or None. refiner: a refiner.Refiner the model hands its latents to, or None."""
  seeds = sample_config.seed + np.arange(len(captions))
  tokenizer = tokenizers.from_config(config)
  if refiner is not None:  # (no edits, guide or video: sample.checked_refiner)
    return sample.handed_over(refiner, config, graphdef, params, frozen, tokenizer, captions, sample_config, mesh,
                              seeds)[:, 0]
  init, keep = edit if edit is not None else (None, None)
  clips = sample.generate(config, graphdef, params, frozen, tokenizer, captions, sample_config, mesh, seeds=seeds,
                          lowres=lowres, init_images=init, keep_masks=keep, guide=guide, source_prompts=sources)
  if not (config.model.temporal and sample_config.video_length):
    return clips[:, 0]
  videos = sample.extended(config, graphdef, params, frozen, tokenizer, captions, sample_config, mesh, seeds,
                           [sample_config.negative_prompt] * len(captions), clips, guide)
  return videos[:, 0, -clips.shape[2]:]


def given_media(config, sample_config, real, image_to_video=False, edit_real=None):
  """What the model is given of the real uint8 media `real` [n, (frames,) h, w, 3] (_generate's edit): with
  edit_real each image or clip whole, nothing kept (SDEdit, as sample.py's --init_image and --init_video); with
  image_to_video each clip's first frame, kept (edit_inputs.first_frame_edit; a first-last-frame model's, its
  last frame too); otherwise None."""
  if edit_real:
    return real, np.zeros(real.shape[:-1], bool)
  if image_to_video:
    frames, last = sample.clip_frames(config, sample_config), text_to_image.first_last_frame(config)
    return tuple(np.stack(a) for a in zip(*[edit_inputs.first_frame_edit(v[0], frames, v[:frames][-1] if last else None)
                                            for v in real]))
  return None


# What an --image_to_image or --video_to_video evaluation asks of each real image or clip: its caption rewritten so
# that the image no longer fits it in one respect the judge reads.
EDITS = {"captioned_shapes": shapes_judge.recoloured,  # every object in the next colour, nothing else changed
         "moving_shapes": motion_judge.reversed_direction}  # the same object, moving the other way


def edit_captions(config, captions: list[str], toward: str = "other") -> list[str]:
  """The captions an --image_to_image or --video_to_video evaluation edits the real images toward: toward "own",
  their own; toward "other", on a dataset of EDITS each image's caption rewritten (captioned_shapes: recoloured;
  moving_shapes: the direction reversed), on others the next image's caption (the last image: the first's)."""
  if toward == "own":
    return list(captions)
  if config.data.dataset in EDITS:
    return [EDITS[config.data.dataset](c) for c in captions]
  return captions[1:] + captions[:1]


def heldout_combination_accuracy(config, graphdef, weights, mesh, count: int, sample_config, combinations=(),
                                 guide=None, refiner=None) -> dict:
  """The judge's per-attribute accuracy, as `accuracy_heldout_combinations/<attribute>`, on the first `count`
  validation captions that name a colour-shape combination of `combinations` ("red square", ...; default: those
  the train split never showed, data.heldout_combinations), sampled from `weights` (sample.Weights) with
  `sample_config`; empty when there are none or count is 0."""
  combinations = tuple(combinations or config.data.heldout_combinations)
  if not combinations or count == 0:
    return {}
  pairs = captioned_shapes.combinations(combinations)
  shows_one = lambda example: captioned_shapes.shows_any(example, pairs)
  images, captions, _ = validation_media(config, count, keep=shows_one)
  if not captions:
    log.warning("No validation caption names one of %s: their accuracy is not measured (raise data.num_eval).",
                combinations)
    return {}
  lowres = cascade.downsampled(images, config)[:, None] if config.model.lowres_conditioning else None
  generated = _generate(config, graphdef, weights.params, weights.frozen, mesh, captions, sample_config, lowres,
                        guide=guide, refiner=refiner)
  return {f"accuracy_heldout_combinations/{k}": v for k, v in shapes_judge.accuracy(generated, captions).items()}


def bicubic_metrics(config, images, perceptual=None) -> dict:
  """psnr_bicubic (with `perceptual`, lpips.load, also lpips_bicubic) of bicubic upsampling of the real `images`
  downsampled to a super-resolution stage's input: what the stage's psnr and lpips are measured against."""
  bicubic = psnr.bicubic(cascade.downsampled(images, config), images)
  metrics = {"psnr_bicubic": psnr.psnr(bicubic, images)}
  if perceptual is not None:
    metrics["lpips_bicubic"] = lpips.mean_distance(perceptual, bicubic, images)
  return metrics


def generation_metrics(config, graphdef, weights, mesh, images, captions, sample_config, frechet=None,
                       clip=None, perceptual=None, bicubic=None, image_to_video=False,
                       guide=None, edit_real=None, edit_toward="other", refiner=None,
                       references=None) -> tuple[dict, np.ndarray]:
  """({metric: value}, generated uint8 media) of `weights` (sample.Weights) for one sample setting (media_metrics
  against the real `images`; `frechet`: their frechet_distances, made here when not given; for super-resolution
  stages, given the real images downsampled, also PSNR and, with `perceptual` (lpips.load), LPIPS next to bicubic
  upsampling's, whose bicubic_metrics are made here when not given; image_to_video: a video model is given each
  real clip's first frame; edit_real ("image_to_image", "video_to_video" or None): each real image or clip is
  edited toward edit_captions' caption (edit_toward="own": its own), which the metrics judge it by, with psnr_source
  (its PSNR against the real one) and the judge's accuracy_source/* (against the real one's caption) for what the
  edit kept; guide: an autoguidance.Guide or None; refiner: a refiner.Refiner the model hands its latents to, or
  None; references: uint8 [n, h, w, 3] the real images' reference images (data.reference_key: FLUX.1 Kontext's edit
  sources, Depth / Canny's control images), which the model samples beside (unless edit_real gives it the real
  images instead), adding psnr_target, the PSNR of what it made against the real image the pair ends at, or
  None)."""
  lowres = None
  if config.model.lowres_conditioning:  # a super-resolution stage upsamples the real images, downsampled
    lowres = cascade.downsampled(images, config)[:, None]
  asked = edit_captions(config, captions, edit_toward) if edit_real else captions
  edit = given_media(config, sample_config, images, image_to_video, edit_real)
  paired = references is not None and not edit_real
  if paired:
    edit = references, np.zeros(references.shape[:-1], bool)
  sources = captions if edit is not None and sample_config.edit_noise in editing.SOURCE_PROMPTED else None
  generated = _generate(config, graphdef, weights.params, weights.frozen, mesh, asked, sample_config, lowres, edit,
                        guide, sources, refiner)
  metrics = media_metrics(config, generated, asked, frechet or frechet_distances(images), clip)
  if paired:  # (against the image each reference's pair ends at)
    metrics["psnr_target"] = psnr.psnr(generated, images)
  if edit_real:  # what the edit kept of the real image
    metrics["psnr_source"] = psnr.psnr(generated, images)
    metrics.update(judges.accuracy(config, generated, captions, "accuracy_source/"))
  if lowres is not None:  # what the stage adds over bicubic upsampling of the same input
    metrics["psnr"] = psnr.psnr(generated, images)
    if perceptual is not None:
      metrics["lpips"] = lpips.mean_distance(perceptual, generated, images)
    metrics.update(bicubic or bicubic_metrics(config, images, perceptual))
  return metrics, generated


def cascade_metrics(cascade_config, num_prompts: int, feature_fns=None, clip=None, sweeps=None,
                    sweep_stage: int = -1) -> dict:
  """media_metrics of a whole cascade (base -> super-resolution stages, one sample per caption) for the first
  `num_prompts` validation captions, against the real validation images at the final resolution.
  sweeps: {name in SWEEPS: values} of stage `sweep_stage`'s settings (default the last), each written as a table
  and a plot, `cascade_config.output_dir`/eval/stage<K>_<name>_sweep_step_<its step>.{md,png}: the stages below
  it sample once, those above it again for every point.
  The metrics are also appended to `output_dir`/eval/cascade.jsonl with the chain and every stage's settings,
  and the first generated images are shown above their real ones in `output_dir`/eval/cascade_generated.png."""
  cascade_config = cascade_config.copy_and_resolve_references()
  cascade_config.num_per_prompt = 1
  configs = cascade.stage_configs(cascade_config)  # swept values checked before any checkpoint is restored
  if not -len(configs) <= sweep_stage < len(configs):
    raise ValueError(f"--sweep_stage={sweep_stage}: the cascade has stages 0 to {len(configs) - 1}")
  k = sweep_stage % len(configs)
  settings = sweep_settings(sweeps or {}, configs[k].sample_config, configs[k].config)
  stages = cascade.load(cascade_config)
  final = stages[-1].config
  images, captions, _ = validation_media(final, num_prompts)
  frechet = frechet_distances(images, feature_fns)
  below = cascade.generate(stages[:k], captions, distinct_noise=True)

  def scored(sample_config):
    generated = cascade.generate_stage(stages[k], captions, below[-1] if below else None, True, sample_config)
    for stage in stages[k + 1:]:
      generated = cascade.generate_stage(stage, captions, generated, True)
    return media_metrics(final, generated[:, 0], captions, frechet, clip), generated[:, 0]

  for name, points in settings.items():
    sweep = [(value, scored(swept)[0]) for value, swept in points]
    if jax.process_index() == 0:
      path = write_sweep(cascade_config.output_dir, stages[k].step, name, sweep, stem=f"stage{k}_{name}_sweep")
      log.info("%s sweep plot: %s", name, path)
  metrics, generated = scored(stages[k].sample_config)
  if jax.process_index() == 0:
    directory = pathlib.Path(cascade_config.output_dir) / "eval"
    directory.mkdir(parents=True, exist_ok=True)
    chain = [{**link, **{key: stage.sample_config[key] for key in cascade.STAGE_SETTINGS}}
             for link, stage in zip(cascade.provenance(stages), stages)]
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "num_prompts": len(captions), "cascade": chain, **metrics}
    with open(directory / "cascade.jsonl", "a") as log_file:
      log_file.write(json.dumps(record) + "\n")
    shown = 8 if generated.ndim == 4 else 2  # images, or clips (a row of their frames)
    rows = [frames(generated[:shown]), frames(images[:shown])]
    media.save_png(directory / "cascade_generated.png", media.labelled_grid(rows, ["generated", "real"]),
                   {"cascade": chain, "captions": captions[:shown]})
  return metrics


def _sampler_and_steps(value: str) -> dict:
  sampler, _, steps = value.partition(":")
  return {"sampler": sampler, **({"steps": int(steps)} if steps else {})}


# The evaluation's edits of the real validation media, one at a time (the model is given them instead of noise).
EDIT_FLAGS = ("image_to_video", "image_to_image", "video_to_video")
EDITING = "--image_to_video, --image_to_image or --video_to_video"
# What --image_to_image and --video_to_video edit toward: another caption (edit_captions) or each image's own.
EDIT_TOWARD = ("other", "own")

# Sample settings that can be swept: name -> (axis label, value string -> the sample-config fields it sets).
# `--NAME_sweep=v1,v2` writes WORKDIR/eval/NAME_sweep_step_N.{md,png}.
SWEEPS = {
    "guidance": ("guidance scale", lambda value: {"guidance_scale": float(value)}),
    "steps": ("sampler steps", lambda value: {"steps": int(value)}),
    "sampler": ("sampler:steps", _sampler_and_steps),
    "threshold": ("thresholding", lambda value: {"threshold": value}),
    "aug_level": ("noise-augmentation level", lambda value: {"aug_level": float(value)}),
    "guidance_interval": ("guidance interval (sigma/alpha)", lambda value: {
        "guidance_interval": samplers.parse_guidance_interval(value)}),
    "strength": ("strength (part of the grid run from the given media)", lambda value: {"strength": float(value)}),
    "edit_noise": ("what an edit starts from", lambda value: {"edit_noise": value}),
}


def evaluation_sample_config(config, overrides=None):
  """The config's sample settings with one image per validation caption, at the training size (the real images'),
  and `overrides` ({field: value}, e.g. the command line's batch_size and negative_prompt; None values are left to the
  config)."""
  sample_config = config.sample.copy_and_resolve_references()
  sample_config.update(num_per_prompt=1, height=0, width=0)
  sample_config.update({k: v for k, v in (overrides or {}).items() if v is not None})
  return sample_config


def sweep_settings(sweeps: dict, sample_config, config, edits: bool = False) -> dict:
  """{name in SWEEPS: [values]} -> {name: [(value string, sample config)]} for the experiment `config`; all bad
  values in one ValueError. edits: the evaluation edits given media (EDIT_FLAGS), whose strength can be swept."""
  settings, problems = {}, []
  if "aug_level" in sweeps and not config.model.lowres_conditioning:
    problems.append("--aug_level_sweep: the model is not a super-resolution stage (model.lowres_conditioning)")
  problems += [f"--{name}_sweep: only with {EDITING}, which edit given media" for name in ("strength", "edit_noise")
               if name in sweeps and not edits]
  for name, values in sweeps.items():
    settings[name] = []
    for value in map(str, values):
      swept = sample_config.copy_and_resolve_references()
      try:
        swept.update(SWEEPS[name][1](value))
      except ValueError as error:
        problems.append(f"--{name}_sweep value {value!r}: {error}")
        continue
      problems += [f"--{name}_sweep value {value!r}: {problem}"
                   for problem in config_checks.sample_problems(swept, "--") + edit_problems(swept, edits)]
      settings[name].append((value, swept))
  if problems:
    raise ValueError("; ".join(problems))
  return settings


# Held-out loss with each caption rewritten minus with the true caption: 0 when the model ignores what changed.
CAPTION_GAPS = {
    "moving_shapes": ("heldout_loss_direction_gap", motion_judge.reversed_direction),  # reads the direction?
    "captioned_shapes": ("heldout_loss_binding_gap", shapes_judge.swapped_colours),  # binds colours to objects?
}


def caption_gap(config, heldout, params, frozen, batch, captions, rewrite, losses):
  """Mean held-out loss with `rewrite(caption)` minus with the true caption, over the examples whose caption
  the rewrite changes; None when it changes none. `losses`: heldout(params, frozen, batch). The whole batch is
  scored again, the unchanged captions as they are (the same program, no compile for a new batch size): those
  examples add the same loss to both means, so the difference of the means, times the batch size over the
  number changed, is the mean difference over the changed ones."""
  rewritten = [rewrite(c) for c in captions]
  changed = sum(r != c for r, c in zip(rewritten, captions))
  if not changed:
    return None
  ids, mask = tokenizers.from_config(config)(rewritten)
  difference = np.asarray(heldout(params, frozen, {**batch, "text_ids": ids, "text_mask": mask})) - np.asarray(losses)
  return float(difference.mean() * len(captions) / changed)


def evaluate_step(workdir, step, num_prompts, heldout_examples, settings=None, frechet=None, clip=None,
                  combination_prompts=64, sample_overrides=None, perceptual=None, image_to_video=False,
                  combinations=(), adapters=(), guide=None, edit_real=None, edit_toward="other", mesh_config=None,
                  pretrained=None, refiner=None, validation=None):
  """(step, metrics, generated, {sweep name: [(value, metrics)]}) of one checkpoint of `workdir` (or, with
  `pretrained`, a validated config, of the pretrained checkpoints it reads: sample.load_pretrained, step 0); `settings`
  as made by sweep_settings, `frechet` by frechet_distances of the first `num_prompts` validation images (made here when
  not given), `clip` by clip_score.load, `perceptual` by lpips.load; `combination_prompts` captions naming one of
  `combinations` for heldout_combination_accuracy at each sample setting; `sample_overrides`: as
  evaluation_sample_config's; image_to_video, edit_real, edit_toward, guide and refiner: as generation_metrics';
  adapters: lora.Adapters fused into the weights; mesh_config: sample.load_checkpoint's; validation: validation_media
  of max(num_prompts, heldout_examples) examples (read here when not given: a job reads them once)."""
  if pretrained is None:
    config, weights, graphdef, step, mesh = sample.load_checkpoint(workdir, step, mesh_config=mesh_config)
  else:
    config, step, (weights, graphdef, mesh) = pretrained, 0, sample.load_pretrained(pretrained, mesh_config)
  weights = lora.fused(weights, adapters)
  # (references: each held-out image's, Kontext's edit source or Depth / Canny's control)
  images, captions, references = validation or validation_media(config, max(num_prompts, heldout_examples))
  small = model_batch(config, images[:heldout_examples], captions[:heldout_examples],
                      None if references is None else references[:heldout_examples])  # (in floats: these alone)
  batch_size = evaluation_sample_config(config, sample_overrides).batch_size  # examples at once, sharded
  heldout = heldout_loss.make_heldout_loss_fn(config, graphdef, mesh, batch_size)
  losses = heldout(weights.params, weights.frozen, small)
  metrics = heldout_loss.as_metrics(losses)
  if config.data.dataset in CAPTION_GAPS:
    name, rewrite = CAPTION_GAPS[config.data.dataset]
    gap = caption_gap(config, heldout, weights.params, weights.frozen, small, captions[:heldout_examples], rewrite,
                      losses)
    if gap is not None:
      metrics[name] = gap
  images, captions = images[:num_prompts], captions[:num_prompts]
  references = None if references is None else references[:num_prompts]
  frechet = frechet or frechet_distances(images)
  bicubic = bicubic_metrics(config, images, perceptual) if config.model.lowres_conditioning else None  # once

  def scored(sample_config):
    setting_metrics, generated = generation_metrics(config, graphdef, weights, mesh, images, captions, sample_config,
                                                    frechet, clip, perceptual, bicubic, image_to_video, guide,
                                                    edit_real, edit_toward, refiner, references)
    setting_metrics.update(heldout_combination_accuracy(config, graphdef, weights, mesh, combination_prompts,
                                                        sample_config, combinations, guide, refiner))
    return setting_metrics, generated

  generated_metrics, generated = scored(evaluation_sample_config(config, sample_overrides))
  metrics.update(generated_metrics)
  results = {name: [(value, scored(swept)[0]) for value, swept in points] for name, points in (settings or {}).items()}
  return step, metrics, generated, results


# Sample fields an evaluation's numbers do not depend on: each caption has its own noise whatever the batch.
UNRECORDED_SAMPLE_FIELDS = ("batch_size", "prompts", "num_per_prompt")
# What an eval.jsonl line written before a sample field existed was made with: the field's old-behaviour value.
ADDED_SAMPLE_SETTINGS = json.loads(json.dumps({
    field.split(".", 1)[1]: value for field, value in checkpoint.ADDED_FIELDS.items()
    if field.startswith("sample.") and field.split(".", 1)[1] not in UNRECORDED_SAMPLE_FIELDS}))


def evaluation_settings(sample_config, num_prompts, heldout_examples, combination_prompts, optional_metrics,
                        image_to_video=False, combinations=(), adapters=(), guide=None, edit_real=None,
                        edit_toward="other", refiner=None) -> dict:
  """What an eval.jsonl line's numbers depend on besides the checkpoint, recorded in it as "settings" (JSON
  values): a checkpoint counts as evaluated only under the same settings. `optional_metrics`: the names of
  those added by local weights (fid_inception, fvd_i3d, clip_score, lpips); combinations and adapters (recorded
  only when given): --combinations, lora.Adapters; guide (recorded only when given): an autoguidance.Guide;
  edit_real (recorded only when given): "image_to_image" or "video_to_video", the flag given; edit_toward (recorded
  only when "own"); refiner (recorded only when given): a refiner.Refiner."""
  sample_settings = {k: v for k, v in sample_config.to_dict().items() if k not in UNRECORDED_SAMPLE_FIELDS}
  settings = {"num_prompts": num_prompts, "heldout_examples": heldout_examples,
              "combination_prompts": combination_prompts, "metrics": sorted(optional_metrics),
              "image_to_video": image_to_video, "sample": sample_settings}
  if combinations:
    settings["combinations"] = list(combinations)
  if adapters:
    settings["lora"] = lora.provenance(adapters)
  if guide is not None:
    settings["guide"] = autoguidance.provenance(guide)
  if edit_real:
    settings[edit_real] = True
  if edit_toward == "own":
    settings["edit_toward"] = "own"
  if refiner is not None:
    settings["refiner"] = sample.refiner_provenance(refiner)
  return json.loads(json.dumps(settings))


def video_problems(config, sample_config, image_to_video: bool, edit_real: str | None = None) -> None:
  """A ValueError naming what asks a model for what it does not make (a video model's settings of an image model, an
  image edit of a video model), a bad video length, or an edit that cannot run. edit_real: "image_to_image" or
  "video_to_video" when given."""
  found = []
  if image_to_video and edit_real:
    found.append(f"--image_to_video and --{edit_real}: one kind of edit at a time")
  if edit_real and sample_config.video_length:
    found.append(f"--{edit_real} scores the edits themselves; not with --video_length (which scores the frames an "
                 "extension makes)")
  if not config.model.temporal:
    hint = "this model makes images (give a video model's workdir)"
    found += [f"--image_to_video: {hint}"] if image_to_video else []
    found += [f"--video_to_video: {hint}; --image_to_image edits images"] if edit_real == "video_to_video" else []
    found += [f"--video_length: {hint}"] if sample_config.video_length else []
  else:
    if edit_real == "image_to_image":
      found.append("--image_to_image: this model makes clips; --video_to_video edits its clips whole")
    found += sample.extension_problems(config, sample_config)
  if text_to_image.image_to_video(config):
    if not image_to_video or edit_real:
      found.append("this is an image-to-video model: evaluate it with --image_to_video (each caption's real clip's "
                   f"first frame given){f', not --{edit_real}' if edit_real else ''}")
  if image_to_video or edit_real:
    try:
      edit_inputs.check_editable(config)
    except ValueError as error:
      found.append(f"--{edit_real or 'image_to_video'}: {error}")
  found += edit_problems(sample_config, bool(image_to_video or edit_real))
  if found:
    raise ValueError("; ".join(found))


def edit_problems(sample_config, edits: bool) -> list[str]:
  """When the evaluation edits given media: a strength that runs none of the sampler's steps (one outside (0, 1] is
  config_checks.sample_problems'), or source-prompt inversion with a negative prompt."""
  if not edits:
    return []
  found = []
  if sample_config.edit_noise in editing.SOURCE_PROMPTED and sample_config.negative_prompt:
    found.append(f"--edit_noise={sample_config.edit_noise}: guidance's other branch reads each image's caption, so "
                 "not with a negative prompt (leave it out, or edit with --edit_noise=inversion)")
  if 0 < sample_config.strength <= 1:
    try:
      editing.first_step(sample_config.steps, sample_config.strength)
    except ValueError as error:
      found.append(f"--{error}")
  return found


def changed_settings(old: dict, new: dict, prefix: str = "") -> list[str]:
  """`field: old -> new` for each field (nested ones as sample.field) that differs between two settings."""
  changes = []
  for key in sorted(old.keys() | new.keys()):
    before, after = old.get(key), new.get(key)
    if isinstance(before, dict) and isinstance(after, dict):
      changes += changed_settings(before, after, f"{prefix}{key}.")
    elif before != after:
      changes.append(f"{prefix}{key}: {before!r} -> {after!r}")
  return changes


def evaluated(workdir) -> list[dict]:
  """The records of WORKDIR/logs/eval.jsonl, oldest first."""
  path = pathlib.Path(workdir) / "logs" / "eval.jsonl"
  lines = path.read_text().splitlines() if path.exists() else []
  return [json.loads(line) for line in lines if line.strip()]


def as_of(recorded: dict, settings: dict) -> dict:
  """An eval.jsonl line's `recorded` settings with each sample field of `settings` that the line predates at its
  old-behaviour value (ADDED_SAMPLE_SETTINGS): what the line was made with, comparable with `settings`."""
  if "sample" not in recorded or "sample" not in settings:
    return recorded
  predated = {k: v for k, v in ADDED_SAMPLE_SETTINGS.items() if k in settings["sample"]}
  return {**recorded, "sample": {**predated, **recorded["sample"]}}


def done_steps(workdir, settings: dict) -> set:
  """Steps evaluated under `settings` (evaluation_settings); lines written before settings were recorded count
  for any."""
  return {r["step"] for r in evaluated(workdir) if as_of(r.get("settings", settings), settings) == settings}


def write_sweep(workdir, step, name, sweep, stem=None) -> pathlib.Path:
  """Markdown table and PNG plot of metrics against a swept sample setting (SWEEPS), WORKDIR/eval/
  <stem>_step_<step>.{md,png} (stem: default <name>_sweep); `sweep` is [(value string, metrics)]. Numeric values
  share a numeric axis, others (sampler:steps) are categories."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  directory = pathlib.Path(workdir) / "eval"
  directory.mkdir(parents=True, exist_ok=True)
  label = SWEEPS[name][0]
  keys = sorted(sweep[0][1])
  lines = [f"| {name} | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
  lines += [f"| {value} | " + " | ".join(f"{m[k]:.3f}" for k in keys) + " |" for value, m in sweep]
  stem = f"{stem or f'{name}_sweep'}_step_{step}"
  (directory / f"{stem}.md").write_text("\n".join(lines) + "\n")
  values = [value for value, _ in sweep]
  try:
    positions = [float(value) for value in values]
  except ValueError:
    positions = list(range(len(values)))
  # One panel per kind of metric present: FID, the judge's accuracies (an edit's also against its real image's
  # caption), a super-resolution stage's PSNR and LPIPS (each beside bicubic upsampling's), an edit's PSNR against
  # its real image, a paired model's against the image its reference pairs with.
  panels = [("FID (random-conv features)", ["fid_random_conv"]),
            ("judge accuracy", [k for k in keys if k.startswith("accuracy/")]),
            ("judge accuracy, source caption", [k for k in keys if k.startswith("accuracy_source/")]),
            ("PSNR (dB)", [k for k in ("psnr", "psnr_bicubic", "psnr_source", "psnr_target") if k in keys]),
            ("LPIPS", [k for k in ("lpips", "lpips_bicubic") if k in keys])]
  panels = [panel for panel in panels if panel[1]]
  figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
  axes = axes[0]
  for axis, (ylabel, panel_keys) in zip(axes, panels):
    for key in panel_keys:
      axis.plot(positions, [m[key] for _, m in sweep], "o-", label=key.split("/")[-1])
    axis.set(xlabel=label, ylabel=ylabel)
    if len(panel_keys) > 1:
      axis.legend(fontsize=7)
  axes[0].set_title(f"step {step}")
  if positions == list(range(len(values))):
    for axis in axes:
      axis.set_xticks(positions, values)
  figure.tight_layout()
  path = directory / f"{stem}.png"
  figure.savefig(path, dpi=100)
  plt.close(figure)
  return path


def write_edits(workdir, step, real, edited, asked, sample_config) -> pathlib.Path:
  """WORKDIR/eval/edits_step_<step>.png: the first real images (of videos: two clips' frames) above their edits
  (uint8 [n, (frames,) h, w, 3]), with the captions `asked` and the edit's settings in its text chunks."""
  shown = 8 if real.ndim == 4 else 2
  label = f"edited at strength {sample_config.strength} from {sample_config.edit_noise} noise"
  path = pathlib.Path(workdir) / "eval" / f"edits_step_{step}.png"
  media.save_png(path, media.labelled_grid([frames(real[:shown]), frames(edited[:shown])], ["real", label]),
                 {"step": step, "captions": asked[:shown], "strength": sample_config.strength,
                  "edit_noise": sample_config.edit_noise})
  return path


def run(workdir, step=None, watch=False, poll_seconds=60, max_idle_minutes=60, num_prompts=64,
        heldout_examples=64, sweeps=None, inception_weights=None, clip_weights=None, i3d_weights=None,
        combination_prompts=64, sample_overrides=None, lpips_weights=None, image_to_video=False, combinations=(),
        adapters=(), guide_workdir=None, guide_step=None, edit_real=None, edit_toward="other", mesh_config=None,
        config=None, refiner_config=None, denoising_end=None, refiner_adapters=(), refiner_workdir=None,
        refiner_step=None):
  """Evaluate the requested (or every not-yet-evaluated) checkpoint; returns the metrics written.
  config: instead of the workdir's checkpoints, the pretrained checkpoints this config reads (sample.load_pretrained),
  evaluated as they are, once, as step 0; `workdir` is then where the results go (its config.json, logs/eval.jsonl and
  eval/, as a workdir's), and step, watch and an autoguidance guide are refused.
  sweeps: {name in SWEEPS: values}, each also written as a table and a plot per checkpoint.
  inception_weights: a local FID Inception weights file; adds fid_inception.
  i3d_weights: a local FVD I3D weights file; adds fvd_i3d (video models).
  clip_weights: a local Hugging Face CLIP directory; adds clip_score.
  lpips_weights: a local LPIPS weights directory; adds lpips and lpips_bicubic (super-resolution stages only).
  combination_prompts: held-out-combination captions judged per sample setting (0: none).
  combinations: the colour-shape combinations those captions name ("red square", ...; default:
  data.heldout_combinations), e.g. those a fine-tune showed that its source run never saw.
  adapters: lora.Adapters fused into every checkpoint's weights.
  sample_overrides: {sample field: value} over the config's, e.g. batch_size (samples generated at once),
  negative_prompt, and a video model's video_length (its last clip's worth of frames scored); sweeps vary the result.
  image_to_video: a video model is given each real clip's first frame (at sample.strength).
  edit_real: "image_to_image" (image models) or "video_to_video" (video models): each real image or clip is edited
  (at sample.strength) toward edit_captions' caption; adds psnr_source and accuracy_source/* (generation_metrics).
  edit_toward: with edit_real, "other" (edit_captions' other caption) or "own" (each image's own: a reconstruction).
  guide_workdir (with guide_step alone: this workdir) and guide_step (default: its latest): the autoguidance
  guide's checkpoint (autoguidance.py), the same for every checkpoint evaluated; recorded in the settings.
  mesh_config: the mesh each checkpoint (and the guide) is restored onto and sampled on (sample.load_checkpoint).
  refiner_config: a config read from pretrained checkpoints whose model finishes every sample from the model's
  latents at denoising_end of the grid (refiner.py; default refiner.DENOISING_END), at every sample setting, with
  refiner_adapters (lora.Adapters) fused into its weights; recorded in the settings; refiner_workdir instead: a
  training run of the refiner, its checkpoint refiner_step (default: the latest). The held-out loss stays the
  model's."""
  pretrained = config is not None
  if not pretrained:
    config = checkpoint.read_config(workdir)
  if text_to_image.flux_control(config) and not config.data.reference_key:  # (before anything is written)
    raise ValueError("FLUX.1 Depth / Canny samples from control images, which evaluation's captions do not come "
                     "with: give the data's (data.reference_key: each held-out image's control image), or sample "
                     "it with --init_image=CONTROL (python -m diffusion_jax.sample)")
  if pretrained:
    config, step = pretrained_config(config, workdir, step, watch, guide_workdir, guide_step), 0
  if lpips_weights and not config.model.lowres_conditioning:  # before any weights are read
    raise ValueError("--lpips_weights: LPIPS compares a super-resolution stage's output with the real image it was "
                     "given downsampled; this model is not a super-resolution stage (model.lowres_conditioning)")
  if combinations:
    if config.data.dataset != "captioned_shapes":
      raise ValueError(f"--combinations names colour-shape combinations of captioned_shapes; this run's data.dataset "
                       f"is {config.data.dataset!r}")
    captioned_shapes.combinations(combinations)  # a ValueError naming the words there are
  lora.check(adapters, config)
  if edit_toward not in EDIT_TOWARD:
    raise ValueError(f"--edit_toward={edit_toward!r}: one of {', '.join(EDIT_TOWARD)}")
  if edit_toward == "own" and not edit_real:
    raise ValueError("--edit_toward=own: only with --image_to_image or --video_to_video, which edit the real media")
  sample_config = evaluation_sample_config(config, sample_overrides)
  video_problems(config, sample_config, image_to_video, edit_real)
  frames = sample.clip_frames(config, sample_config) if config.model.temporal else 0
  field = "sample.frames" if sample_config.frames else "data.frames"  # (the clips evaluate_step samples)
  if problems := sample.mesh_problems(config, mesh_config, frames, field):
    raise ValueError("; ".join(problems))
  settings = sweep_settings(sweeps or {}, sample_config, config, bool(image_to_video or edit_real))
  problem = host_memory_problem(config, sample_config, num_prompts, heldout_examples, bool(settings),
                                psutil.virtual_memory().available)
  if distributed.any_process(problem is not None):  # (every process stops: free memory differs between hosts)
    raise ValueError(problem or "another process's host has too little free memory for the job: see its error")
  given = [flag for flag, value in (("--image_to_video", image_to_video), ("--" + str(edit_real), edit_real),
                                    ("--video_length", sample_config.video_length),
                                    ("--guide_workdir / --guide_step", guide_workdir or guide_step is not None))
           if value]
  refiner = sample.checked_refiner(  # before any checkpoint is read
      config, refiner_config, denoising_end, [sample_config] + [c for points in settings.values() for _, c in points],
      {}, [f"{', '.join(given)}: not with a refiner (a handover starts from noise, one model's): evaluate them "
           "without --refiner"] if given else [],
      refiner_adapters, refiner_workdir, refiner_step)
  optional = {"fid_inception": inception_weights, "fvd_i3d": i3d_weights, "clip_score": clip_weights,
              "lpips": lpips_weights}
  guide = None
  if guide_workdir or guide_step is not None:
    autoguidance.check_negative_prompts([sample_config.negative_prompt])  # before any checkpoint is read
    edit_noises = [sample_config.edit_noise] + list((sweeps or {}).get("edit_noise", []))
    if (image_to_video or edit_real) and (prompted := set(editing.SOURCE_PROMPTED) & set(edit_noises)):
      raise ValueError(f"--edit_noise={'/'.join(sorted(prompted))}: guidance's other branch reads each image's "
                       "caption, so not with an autoguidance guide (leave the guide out, or edit with "
                       "--edit_noise=inversion)")
    guide = autoguidance.load(config, guide_workdir or workdir, guide_step, sample_config.use_ema, mesh_config)
  if refiner is not None:
    refiner = sample.load_refiner(refiner, mesh_config)
  recorded = evaluation_settings(sample_config, num_prompts, heldout_examples, combination_prompts,
                                 [name for name, weights in optional.items() if weights], image_to_video,
                                 combinations, adapters, guide, edit_real, edit_toward, refiner)
  feature_fns = metric_features(inception_weights, i3d_weights)
  frechet = validation = None  # made at the first checkpoint (training may still be writing the dataset before it)
  clip = clip_score.load(str(clip_weights)) if clip_weights else None
  perceptual = lpips.load(str(lpips_weights)) if lpips_weights else None
  if pretrained:
    recorded["pretrained"] = True  # the line's weights: the config's pretrained checkpoints (config.json says which)
    if jax.process_index() == 0:
      checkpoint.write_config(workdir, config)
  writer = metric_writers.MetricWriter(workdir, config.train.steps, name="eval")
  written, unreadable, idle_since = [], set(), time.time()
  while True:
    mngr = None if pretrained else checkpoint.manager(workdir, read_only=True)
    todo = [step] if step is not None else distributed.from_process_zero(
        sorted(set(mngr.all_steps()) - done_steps(workdir, recorded) - unreadable))
    if step is None and not todo and not watch:
      if not mngr.all_steps():
        raise ValueError(f"No checkpoints in {str(workdir)!r}/checkpoints; train first.")
      log.info("Every checkpoint of %s is already evaluated under these settings (logs/eval.jsonl); --step=N "
               "evaluates one again (with any sweeps).", workdir)
    if step is None and jax.process_index() == 0:
      _log_settings_changes(workdir, todo, recorded)
    for s in todo:
      if frechet is None:  # the real images' features, once for every checkpoint and sweep point
        check_validation_size(config, num_prompts, heldout_examples)
        validation = validation_media(config, max(num_prompts, heldout_examples))
        real, captions = validation[0][:num_prompts], validation[1][:num_prompts]
        frechet = frechet_distances(real, feature_fns)
      try:
        s, metrics, generated, swept = evaluate_step(workdir, s, num_prompts, heldout_examples, settings, frechet,
                                                     clip, combination_prompts, sample_overrides, perceptual,
                                                     image_to_video, combinations, adapters, guide, edit_real,
                                                     edit_toward, mesh_config, config if pretrained else None,
                                                     refiner, validation)
      except checkpoint.UnreadableCheckpoint as error:
        if step is not None:  # the one asked for
          raise
        log.warning("%s Skipped; evaluating the others.", error)
        unreadable.add(s)
        continue
      writer.write(s, metrics, fields={"settings": recorded})
      first = generated[:8] if generated.ndim == 4 else generated[:4].reshape((-1,) + generated.shape[-3:])
      writer.write_image(s, "eval/generated", media.labelled_grid([first], [f"step {s}"]))
      if edit_real and jax.process_index() == 0:
        log.info("edits: %s", write_edits(workdir, s, real, generated, edit_captions(config, captions, edit_toward),
                                          sample_config))
      for name, sweep in swept.items():
        if jax.process_index() == 0:
          log.info("%s sweep plot: %s", name, write_sweep(workdir, s, name, sweep))
      written.append({"step": s, **metrics, "settings": recorded})
      idle_since = time.time()
    if not watch or step is not None or distributed.any_process(time.time() - idle_since > max_idle_minutes * 60):
      break
    time.sleep(poll_seconds)
  writer.close()
  return written


def host_memory_problem(config, sample_config, num_prompts: int, heldout_examples: int, swept: bool,
                        available: int) -> str | None:
  """Why the job would run out of host memory (`available` bytes free), before any checkpoint is read: it holds the
  real media and the generated (uint8, at the training size), the generated twice while a batch list is stacked,
  and a sweep point's beside the evaluation's; None where they fit. (An out-of-memory kill would come after hours of
  sampling, with nothing written.)"""
  height, width = pipeline.image_size(config.data)
  frames = sample.clip_frames(config, sample_config) if config.model.temporal else 1
  item = frames * height * width * 3
  needed = item * (max(num_prompts, heldout_examples) + num_prompts * (3 if swept else 2))
  if needed <= available:
    return None
  fit = max(1, int(available // (item * (4 if swept else 3))))
  return (f"--num_prompts={num_prompts}: the job would hold about {needed / 1e9:.1f} GB of {height} x {width} "
          f"{'clips' if frames > 1 else 'images'} in host memory (the real and the generated, uint8), and "
          f"{available / 1e9:.1f} GB is free; give at most about {fit}, or run it on a machine with more memory")


def check_validation_size(config, num_prompts: int, heldout_examples: int) -> None:
  """A ValueError where the validation split holds fewer examples than --num_prompts or --heldout_examples ask for
  (its FID and held-out loss would be of fewer, under the settings' numbers)."""
  available = len(pipeline.data_source(config.data, "validation"))
  asked = [f"--{flag}={count}" for flag, count in (("num_prompts", num_prompts), ("heldout_examples",
                                                                                  heldout_examples))
           if count > available]
  if asked:
    raise ValueError(f"{', '.join(asked)}: the validation split holds {available} examples; give at most "
                     f"{available} (or hold out more: data.num_eval of a built-in dataset, data.eval_captions_file "
                     "of a folder)")


def pretrained_config(config, output_dir, step, watch, guide_workdir, guide_step):
  """`config` resolved and validated for evaluating the pretrained checkpoints it reads (run's `config`); a ValueError
  naming what that cannot take: no output directory, a step, --watch, an autoguidance guide, or a part no
  pretrained checkpoint names (sample.check_pretrained)."""
  if output_dir is None:
    raise ValueError("Evaluating a config's pretrained checkpoints (--config) needs an output directory "
                     "(--output_dir) for its config.json, logs/eval.jsonl and eval/")
  taken = [name for name, value in (("--step", step is not None), ("--watch", watch),
                                    ("--guide_workdir", guide_workdir), ("--guide_step", guide_step is not None))
           if value]
  if taken:
    raise ValueError(f"{', '.join(taken)}: not used with --config, whose weights are the pretrained checkpoints' "
                     "(one evaluation, recorded as step 0), no training's checkpoints (evaluate a --workdir)")
  config = config.copy_and_resolve_references()
  config_checks.validate(config, reads_data=True)
  sample.check_pretrained(config)  # before the validation set is read
  return config


def _log_settings_changes(workdir, steps, settings):
  """Say which of `steps` were evaluated before under other settings, and what changed."""
  before = {r["step"]: as_of(r["settings"], settings) for r in evaluated(workdir)
            if "settings" in r and r["step"] in steps}
  for step, old in sorted(before.items()):
    log.info("Checkpoint %d was evaluated under other settings; evaluating it again (%s).", step,
             "; ".join(changed_settings(old, settings)))


# Sample settings of the edits (EDIT_FLAGS) and of a video model's long videos that the command line sets.
VIDEO_SAMPLE_FLAGS = ("strength", "edit_noise", "null_text_iterations", "video_length", "context_frames",
                      "reconstruction_guidance")


def define_flags():
  flags.DEFINE_string("workdir", None, "Training workdir.")
  config_flags.DEFINE_config_file("config", None, "Instead of --workdir: a config whose every part is read from "
                                  "pretrained checkpoints (configs/flux.py:ROOT, ...), evaluated as they are, once, "
                                  "as step 0 (needs --output_dir).")
  flags.DEFINE_string("output_dir", None, "With --config: where its config.json, logs/eval.jsonl and eval/ go.")
  config_flags.DEFINE_config_file("cascade", None, "Cascade config: evaluate the whole cascade's final output.")
  flags.DEFINE_integer("step", None, "Evaluate only this checkpoint.")
  flags.DEFINE_bool("watch", False, "Keep polling for new checkpoints.")
  flags.DEFINE_integer("poll_seconds", 60, "Polling interval with --watch.", lower_bound=1)
  flags.DEFINE_float("max_idle_minutes", 60, "With --watch, stop after this long without a new checkpoint.",
                     lower_bound=0)
  flags.DEFINE_integer("num_prompts", 64, "Validation captions to generate for (also the FID set size).",
                       lower_bound=1)
  flags.DEFINE_integer("heldout_examples", 64, "Validation examples for the held-out loss.", lower_bound=1)
  flags.DEFINE_integer("combination_prompts", 64, "Validation captions naming a held-out colour-shape combination "
                       "to judge at each sample setting (configs with data.heldout_combinations); 0: none.",
                       lower_bound=0)
  flags.DEFINE_list("combinations", [], "Colour-shape combinations ('red square,green circle') whose validation "
                    "captions --combination_prompts judges (default: data.heldout_combinations).")
  flags.DEFINE_multi_string("lora", [], "FILE[:SCALE], repeatable: a LoRA adapter fused into every checkpoint's "
                            "weights at SCALE (default 1); ours, or a Wan LoRA in diffusers', Wan's or musubi-tuner's "
                            "layout (low_noise=FILE[:SCALE]: of Wan 2.2 A14B's low-noise expert).")
  flags.DEFINE_string("inception_weights", None, "Local FID Inception-v3 weights (.pth, .safetensors, .npz): adds "
                      "fid_inception.")
  flags.DEFINE_string("i3d_weights", None, "Local FVD I3D weights (i3d_pretrained_400.pt, .safetensors, .npz): adds "
                      "fvd_i3d for video models.")
  flags.DEFINE_string("lpips_weights", None, "Super-resolution stages: local LPIPS weights directory "
                      "(vgg16-397923af.pth and the lpips package's vgg.pth): adds lpips and lpips_bicubic.")
  flags.DEFINE_string("clip_weights", None, "Local Hugging Face CLIP directory (config.json, model.safetensors, "
                      "tokenizer.json): adds clip_score.")
  flags.DEFINE_string("mesh", None, sample.MESH_HELP.replace("sampled on", "evaluated on"))
  config_flags.DEFINE_config_file("refiner", None, "A config read from pretrained checkpoints whose model finishes "
                                  "every sample from the model's latents (an ensemble of experts, sample.py's flag).")
  flags.DEFINE_float("denoising_end", None, "With --refiner (or --refiner_workdir): the part of the grid the model "
                     f"runs, in (0, 1) (default {refiners.DENOISING_END}).")
  flags.DEFINE_multi_string("refiner_lora", [], "With --refiner (or --refiner_workdir): FILE[:SCALE], repeatable: a "
                            "LoRA adapter fused into the refiner's weights (sample.py's flag).")
  flags.DEFINE_string("refiner_workdir", None, "Instead of --refiner: a training workdir of the refiner whose "
                      "checkpoint finishes every sample (sample.py's flag).")
  flags.DEFINE_integer("refiner_step", None, "With --refiner_workdir: its checkpoint (default: the latest).")
  flags.DEFINE_integer("batch_size", None, "Samples generated at once over all devices (default: the config's "
                       "sample.batch_size; with --cascade: every stage's).", lower_bound=1)
  flags.DEFINE_string("negative_prompt", None, "Text guidance steers away from, for every caption (default: the "
                      "config's sample.negative_prompt; with --cascade: every stage's).")
  flags.DEFINE_bool("image_to_video", False, "Video models: give each caption's real clip's first frame "
                    "(image-to-video, at --strength).")
  flags.DEFINE_bool("image_to_image", False, "Image models: edit each caption's real image toward another caption "
                    "(captioned_shapes: recoloured; others: the next image's) at --strength; adds psnr_source and "
                    "accuracy_source/*.")
  flags.DEFINE_bool("video_to_video", False, "Video models: edit each caption's real clip toward another caption "
                    "(moving_shapes: its direction reversed; others: the next clip's) at --strength; adds psnr_source "
                    "and accuracy_source/*.")
  flags.DEFINE_enum("edit_toward", "other", list(EDIT_TOWARD), "With --image_to_image or --video_to_video: other "
                    "(the caption they name) or own (each image's own caption: a reconstruction, scored by "
                    "psnr_source).")
  flags.DEFINE_float("strength", None, f"With {EDITING}: the part of the sampling grid run (default: the config's "
                     "sample.strength).")
  flags.DEFINE_enum("edit_noise", None, list(editing.EDIT_NOISE), f"With {EDITING}: random (SDEdit), inversion "
                    "(DDIM inversion of the given media), source_inversion (inversion with their own captions) or "
                    "null_text_inversion (that, with guidance's other text optimised per step; DDIM only) (default: "
                    "the config's sample.edit_noise).")
  flags.DEFINE_integer("null_text_iterations", None, f"With {EDITING} and --edit_noise=null_text_inversion: Adam "
                       "steps on guidance's other text per sampler step.", lower_bound=0)
  flags.DEFINE_integer("video_length", None, "Video models: make this many frames by extension and score the last "
                       "clip's worth.", lower_bound=0)
  flags.DEFINE_integer("context_frames", None, "With --video_length: frames each window keeps (on a causal "
                       "autoencoder's latents 1 + a multiple of 4).", lower_bound=0)
  flags.DEFINE_float("reconstruction_guidance", None, "With --image_to_video or --video_length: reconstruction "
                     "guidance weight.", lower_bound=0)
  flags.DEFINE_string("guidance_interval", None, "LOW:HIGH: guide only the steps whose noise level sigma/alpha is "
                      "in (LOW, HIGH]; none = every step (default: the config's sample.guidance_interval).")
  autoguidance.define_flags()
  flags.DEFINE_list("guidance_sweep", [], "Guidance scales for a metric-vs-guidance table and plot.")
  flags.DEFINE_list("steps_sweep", [], "Sampler step counts for a metric-vs-steps table and plot.")
  flags.DEFINE_list("sampler_sweep", [], "SAMPLER[:STEPS] settings to compare, e.g. dpmpp_2m:20,ddpm:1000.")
  flags.DEFINE_list("threshold_sweep", [], f"Thresholding kinds to compare, of {list(samplers.THRESHOLDS)}.")
  flags.DEFINE_list("guidance_interval_sweep", [], "Guidance intervals LOW:HIGH (or none) to compare, e.g. "
                    "none,0.28:5.42.")
  flags.DEFINE_list("aug_level_sweep", [], "Super-resolution stages: noise-augmentation levels to sweep.")
  flags.DEFINE_list("strength_sweep", [], f"With {EDITING}: edit strengths to sweep.")
  flags.DEFINE_list("edit_noise_sweep", [], f"With {EDITING}: what edits start from, side by side "
                    "(random,inversion,source_inversion,null_text_inversion).")
  flags.DEFINE_integer("sweep_stage", -1, "With --cascade: the stage whose settings the sweeps vary (default -1, "
                       "the last).")
  distributed.define_flags()


def main(argv):
  del argv
  f = flags.FLAGS
  with cli.refusals():  # every flag the command line must drop, named at once
    if sum(map(bool, (f.workdir, f.cascade, f.config))) != 1:
      raise app.UsageError("Give one of --workdir (a training run's checkpoints), --config (the pretrained checkpoints "
                           "a config reads) or --cascade (a whole cascade).")
    if f.config:
      cli.refuse(("step", "watch", "poll_seconds", "max_idle_minutes"), "not used with --config, whose weights are the "
                 "pretrained checkpoints' (one evaluation, recorded as step 0)")
      cli.refuse(("guide_workdir", "guide_step"), "not used with --config: autoguidance's guide is a training "
                 "checkpoint of the model (evaluate a --workdir)")
      if not f.output_dir:
        raise app.UsageError("--config needs --output_dir (there is no workdir to write the evaluation into).")
    else:
      cli.refuse(("output_dir",), "only with --config (a workdir's evaluation goes to WORKDIR/logs and WORKDIR/eval, a "
                 "cascade's to its output_dir)")
    if f.step is not None:
      cli.refuse(("watch", "poll_seconds", "max_idle_minutes"), "not used with --step, which evaluates one checkpoint "
                 "and stops")
    elif f.workdir and not f.watch:
      cli.refuse(("poll_seconds", "max_idle_minutes"), "only with --watch (without it the checkpoints there now are "
                 "evaluated once)")
    if f.cascade:
      cli.refuse(("step", "watch", "poll_seconds", "max_idle_minutes", "heldout_examples", "combination_prompts",
                  "combinations"),
                 "not used with --cascade, which scores the cascade's final output once (a stage's checkpoint: "
                 "--cascade.stages[k].step=N)")
      cli.refuse(("lora",), "not used with --cascade: an adapter fits one model; give it to its stage "
                 "(--cascade.stages[K].lora=FILE[:SCALE])")
      cli.refuse(("guidance_interval",), "not used with --cascade: give it to the stage it guides "
                 "(--cascade.stages[K].guidance_interval=(LOW,HIGH))")
      cli.refuse(("guide_workdir", "guide_step"), autoguidance.WITH_CASCADE)
      cli.refuse(EDIT_FLAGS + VIDEO_SAMPLE_FLAGS + ("strength_sweep", "edit_noise_sweep", "edit_toward"),
                 "not used with --cascade: "
                 "evaluate a model's edits and a video model's long videos with --workdir")
      cli.refuse(("refiner", "refiner_workdir", "refiner_step", "denoising_end", "refiner_lora"), "not used with "
                 "--cascade, whose stages are super-resolution models")
      cli.refuse(("lpips_weights",), "not used with --cascade: LPIPS compares a super-resolution stage's output with "
                 "the real image it was given downsampled, and a cascade's output has no such image (evaluate the "
                 "stage with --workdir)")
    else:
      cli.refuse(("sweep_stage",), "only with --cascade")
      if f.combination_prompts == 0:
        cli.refuse(("combinations",), "not used with --combination_prompts=0, which judges no combination's captions")
      if f.image_to_image:
        cli.refuse(("video_to_video",), "not with --image_to_image: one kind of edit at a time")
      if not any(f[name].value for name in EDIT_FLAGS):
        cli.refuse(("strength", "edit_noise", "null_text_iterations"), f"only with {EDITING}, which edit given media")
      if not (f.image_to_image or f.video_to_video):
        cli.refuse(("edit_toward",), "only with --image_to_image or --video_to_video, which edit the real media "
                   "toward a caption")
      if not f.video_length:
        cli.refuse(("context_frames",), "only with --video_length (the frames each extension window keeps)")
      if not (f.image_to_video or f.video_length):
        cli.refuse(("reconstruction_guidance",), "only with --image_to_video or --video_length, which keep frames "
                   "for it to agree with")
  distributed.initialize()
  sweeps = {name: f[f"{name}_sweep"].value for name in SWEEPS if f[f"{name}_sweep"].value}
  try:
    overrides = {name: f[name].value for name in ("batch_size", "negative_prompt") + VIDEO_SAMPLE_FLAGS}
    if f.guidance_interval is not None:
      overrides["guidance_interval"] = samplers.parse_guidance_interval(f.guidance_interval, "--guidance_interval=")
    if f.cascade:
      cascade.set_every_stage(f.cascade, batch_size=f.batch_size, negative_prompt=f.negative_prompt, mesh=f.mesh)
      results = [cascade_metrics(f.cascade, f.num_prompts, metric_features(f.inception_weights, f.i3d_weights),
                                 clip_score.load(f.clip_weights) if f.clip_weights else None, sweeps, f.sweep_stage)]
    else:
      results = run(f.workdir or f.output_dir, f.step, f.watch, f.poll_seconds, f.max_idle_minutes, f.num_prompts,
                    f.heldout_examples, sweeps, f.inception_weights, f.clip_weights, f.i3d_weights,
                    f.combination_prompts, overrides, f.lpips_weights, f.image_to_video,
                    f.combinations, [lora.read(spec) for spec in f.lora], f.guide_workdir, f.guide_step,
                    "image_to_image" if f.image_to_image else "video_to_video" if f.video_to_video else None,
                    f.edit_toward, f.mesh and sharding.mesh_from_flag(f.mesh), f.config, f.refiner, f.denoising_end,
                    [lora.read(spec, "--refiner_lora") for spec in f.refiner_lora], f.refiner_workdir,
                    f.refiner_step)
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:  # how a --watch job is usually ended
    where = f"; finished checkpoints are in {f.workdir}/logs/eval.jsonl" if f.workdir else ""
    print(f"interrupted{where}", file=sys.stderr)
    sys.exit(130)
  for result in results:
    print(json.dumps(result))


if __name__ == "__main__":
  define_flags()
  cli.run(main, config_kinds={"config": "experiment", "refiner": "experiment", "cascade": "cascade"})
