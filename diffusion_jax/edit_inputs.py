"""What an edit reads: the images, masks and clips a prompt names (sample.py's --init_image, --mask, --init_video
and their prompts-file fields), brought to the samples' size as training data is to its and checked before any
checkpoint is read. What the sampler does with them is editing.py's; an image-to-video model (Wan's I2V), or one
that starts clips at images (Wan 2.2 TI2V) given them, reads the image its clip starts at as its condition instead
(`animated_images`), FLUX.1 Kontext its --init_image as a reference image, FLUX.1 Depth / Canny as its control
image and FLUX.1 Redux as an image to vary (`references`).
"""

import pathlib

import numpy as np
import PIL.Image

from diffusion_jax import checkpoint, editing, media
from diffusion_jax.data import pipeline
from diffusion_jax.models import autoencoder, redux, text_to_image


def read(config, sample_config, prompts: list[dict], frames: int, size: tuple[int, int] | None = None) -> dict:
  """{prompt index: (image, keep)} of the prompts with an "init_image" (image_edit; a video model's:
  first_frame_edit's clips) or an "init_video" (video_edit's clips), each file read and every setting checked.
  frames: a video model's frames per clip (0 for an image model); size: (height, width) of the samples
  (sample.image_size; None: the training images', pipeline.image_size)."""
  size = size or pipeline.image_size(config.data)
  if not varies(config) and (listed := [e["prompt"] for e in prompts if isinstance(e.get("init_image"), list)][:3]):
    raise ValueError(f"A list of init_images is FLUX.1 Redux's (model.flux_redux_path) images to blend; this model "
                     f"reads one image a prompt: {listed}")
  if animates(config, prompts):  # every prompt animates its image: clips whose first frame it is
    if problems := animation_problems(config, prompts):
      raise ValueError("; ".join(problems))
    return {i: animated_edit(e, size, frames) for i, e in enumerate(prompts)}
  if any("last_image" in e for e in prompts):
    raise ValueError("--last_image (last_image in a prompts file) is the last frame of an image-to-video Wan's clips; "
                     "this model is not one (a video model animates an --init_image alone)")
  edited = lambda e: "init_image" in e or "init_video" in e
  if without := [e["prompt"] for e in prompts if "strength" in e and not edited(e)][:3]:
    raise ValueError(f"A prompt's 'strength' is the part of the grid run from its image: give it an 'init_image' or "
                     f"'init_video' (or --init_image, --init_video) or leave the strength out: {without}")
  videos = [i for i, e in enumerate(prompts) if "init_video" in e]
  if videos and not config.model.temporal:
    raise ValueError("--init_video (init_video in a prompts file) is a clip for a video model to edit; this model "
                     "makes images (--init_image edits an image).")
  if text_to_image.flux_control(config):  # a control image each, nothing edited in place
    if problems := reference_problems(sample_config, prompts, CONTROL):
      raise ValueError("; ".join(problems))
    return {i: image_edit(e, size) for i, e in enumerate(prompts)}
  if not any(edited(e) for e in prompts):
    return {}
  if config.model.flux_kontext:  # a reference image each, nothing edited in place
    if problems := reference_problems(sample_config, prompts, KONTEXT):
      raise ValueError("; ".join(problems))
    multiple = 2 * autoencoder.downsampling_factor(autoencoder.read_config(config.latent.autoencoder_path))
    return {i: kontext_reference(e, sample_config.kontext_resize, multiple) for i, e in enumerate(prompts)
            if "init_image" in e}
  if varies(config):  # an image to vary each, at the size its image encoder reads, nothing edited in place
    if problems := reference_problems(sample_config, prompts, REDUX):
      raise ValueError("; ".join(problems))
    size = redux.image_size(config.model.flux_redux_path)
    return {i: redux_image(e, size) for i, e in enumerate(prompts) if "init_image" in e}
  for e in prompts:
    if edited(e):
      editing.first_step(sample_config.steps, e.get("strength", sample_config.strength))
  check_editable(config)
  edits = {i: video_edit(prompts[i], size, frames) for i in videos}
  images = {i: image_edit(e, size) for i, e in enumerate(prompts) if "init_image" in e}
  if not config.model.temporal:
    return images
  if any("mask" in prompts[i] for i in images):
    raise ValueError("A video model animates an --init_image as its clips' first frame; --mask is for image models.")
  return edits | {i: first_frame_edit(image, frames) for i, (image, _) in images.items()}


def animates(config, prompts: list[dict]) -> bool:
  """Whether sampling these prompts animates images (the model's condition) rather than editing or generating: an
  image-to-video model's always; a model that starts clips at images (Wan 2.2 TI2V) when a prompt gives one."""
  return text_to_image.image_to_video(config) or (text_to_image.starts_clips_at_images(config) and
                                                  any("init_image" in e for e in prompts))


def animated(config, keep_masks) -> bool:
  """Whether edits whose keep masks are keep_masks [n, frames, h, w] (None: no edits) are images to animate: an
  image-to-video model's always; a model that starts clips at images where the first frames alone are kept (read's
  clips of --init_image; an --init_video's clip, and a video extension's window, are edited)."""
  keep = None if keep_masks is None or not len(keep_masks) else np.asarray(keep_masks, bool)
  return text_to_image.image_to_video(config) or bool(
      text_to_image.starts_clips_at_images(config) and keep is not None and keep[:, 0].all() and
      not keep[:, 1:].any())


def references(config) -> bool:
  """Whether the model reads a prompt's --init_image as a condition to sample beside, from noise (FLUX.1 Kontext's
  reference image, FLUX.1 Depth / Canny's control image, FLUX.1 Redux's image to vary), not as an image to edit."""
  return config.model.flux_kontext or text_to_image.flux_control(config) or varies(config)


def varies(config) -> bool:
  """Whether the model reads a prompt's --init_image as FLUX.1 Redux's image to vary (model.flux_redux_path)."""
  return config.model.backbone == "flux" and bool(config.model.flux_redux_path)


# (the model, what its --init_image is)
KONTEXT = ("FLUX.1 Kontext", "a reference image to follow")
CONTROL = ("FLUX.1 Depth / Canny", "its control image (a depth map, an edge map)")
REDUX = ("FLUX.1 Redux", "an image to vary")


def reference_problems(sample_config, prompts: list[dict], model: tuple[str, str]) -> list[str]:
  """Why a model that reads --init_image as a condition (`model`: KONTEXT, CONTROL) cannot sample these prompts: a
  mask, a strength or an edit's noise (which place an image in the sampling grid) mean nothing to it, and a control
  model needs an image for every prompt."""
  (name, image), found = model, []
  if model == CONTROL and (without := [e["prompt"] for e in prompts if "init_image" not in e][:3]):
    found.append(f"{name} samples from {image}: give each prompt one (--init_image, or init_image in a prompts "
                 f"file): {without}")
  if named := [e["prompt"] for e in prompts if "mask" in e or "strength" in e][:3]:
    found.append(f"{name} reads --init_image as {image}, not an image to edit in place: leave out --mask and "
                 f"'strength' ({named})")
  if sample_config.edit_noise != "random":
    found.append(f"--edit_noise={sample_config.edit_noise!r}: {name} samples from noise beside {image}; leave it "
                 "'random'")
  return found


# FluxKontextPipeline's: the (width, height) FLUX.1 Kontext trained at
KONTEXT_RESOLUTIONS = ((672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184),
                       (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752),
                       (1456, 720), (1504, 688), (1568, 672))


def kontext_reference(entry: dict, resize: str, multiple: int) -> tuple[np.ndarray, np.ndarray]:
  """(image uint8 [height, width, 3], keep: all False) of a prompt entry's "init_image" as FLUX.1 Kontext's reference
  (sample.kontext_resize): resized, as FluxKontextPipeline resizes it (Lanczos, no crop), to the resolution of
  KONTEXT_RESOLUTIONS nearest its aspect ratio ("preferred") or kept at its size ("own"), either rounded down to a
  multiple of `multiple` pixels (2 latents: one token)."""
  image = read_image(entry, "init_image")
  height, width = image.shape[:2]
  if resize == "preferred":
    _, width, height = min((abs(width / height - w / h), w, h) for w, h in KONTEXT_RESOLUTIONS)
  height, width = height // multiple * multiple, width // multiple * multiple
  if not height or not width:
    raise ValueError(f"init_image {entry['init_image']!r} is {image.shape[1]} x {image.shape[0]} pixels: a FLUX.1 "
                     f"Kontext reference kept at its own size (--kontext_resize=own) needs at least {multiple} x "
                     f"{multiple} (one token); give a larger image, or --kontext_resize=preferred")
  if (height, width) != image.shape[:2]:
    image = np.asarray(PIL.Image.fromarray(image).resize((width, height), PIL.Image.LANCZOS))
  return image, np.zeros(image.shape[:2], bool)


def redux_image(entry: dict, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """(image uint8 [height, width, 3], or [images, height, width, 3] of a list of them, keep: all False [height,
  width]) of a prompt entry's "init_image" as FLUX.1 Redux's image to vary (a list: images to blend), each resized
  to its image encoder's `size` (redux.image_pixels)."""
  paths = entry["init_image"]
  if isinstance(paths, list):
    image = np.stack([redux.image_pixels(read_image({"init_image": path}, "init_image"), size) for path in paths])
  else:
    image = redux.image_pixels(read_image(entry, "init_image"), size)
  return image, np.zeros(image.shape[-3:-1], bool)


def check_editable(config):
  """Editing needs a text-to-image or text-to-video model."""
  if config.model.lowres_conditioning:
    raise ValueError("Image-to-image, inpainting, image-to-video and video-to-video (--init_image, --mask, "
                     "--init_video) are for text-to-image and text-to-video models; this is a super-resolution stage.")


def read_image(entry: dict, key: str, background: tuple[int, int, int] = media.WHITE) -> np.ndarray:
  """The uint8 image [h, w, 3] of a prompt entry's file `key` (its transparent pixels `background`); a ValueError
  naming the key when it cannot be read."""
  path = pathlib.Path(entry[key]).expanduser()
  try:
    return media.read_image(path, background)
  except (OSError, ValueError, PIL.Image.DecompressionBombError) as error:  # missing, not an image PIL reads, huge
    raise ValueError(f"{key} {str(path)!r} cannot be read as an image ({error}).") from None


def image_edit(entry: dict, size: int | tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """(image uint8 [height, width, 3], keep bool [height, width]) of a prompt entry's "init_image" and optional
  "mask" files (white: generate anew, black or transparent: keep, as strokes painted on an empty layer say; without
  one nothing is kept), each brought to the samples' size ((height, width), or a square's side) as training images
  are to theirs (scaled to cover it, centre crop)."""
  image = read_image(entry, "init_image")
  if "mask" not in entry:
    image = pipeline.resize_and_crop(image, size, None)
    return image, np.zeros(image.shape[:2], bool)
  mask = read_image(entry, "mask", media.BLACK)
  if mask.shape != image.shape:
    raise ValueError(f"mask {entry['mask']!r} is {mask.shape[1]}x{mask.shape[0]} pixels, its init_image "
                     f"{entry['init_image']!r} {image.shape[1]}x{image.shape[0]}: they must match.")
  mask = pipeline.resize_and_crop(np.repeat(mask.mean(-1, keepdims=True).astype(np.uint8), 3, -1), size, None)
  return pipeline.resize_and_crop(image, size, None), mask[..., 0] < 128


def video_edit(entry: dict, size: int | tuple[int, int], frames: int) -> tuple[np.ndarray, np.ndarray]:
  """(clip uint8 [frames, height, width, 3], keep: all False) of a prompt entry's "init_video" (a GIF or an MP4, its
  first `frames` frames, each brought to the samples' size as training clips are to theirs): a clip to edit as a
  whole (video-to-video, SDEdit over the clip)."""
  path = pathlib.Path(entry["init_video"]).expanduser()
  readers = {".gif": media.read_gif, ".mp4": media.read_mp4}
  if path.suffix.lower() not in readers:
    raise ValueError(f"init_video {str(path)!r}: a .gif or .mp4 clip, please.")
  try:
    clip = readers[path.suffix.lower()](path)[0]
  except Exception as error:  # PIL and PyAV raise many kinds for missing or damaged files
    raise ValueError(f"init_video {str(path)!r} cannot be read as a clip ({checkpoint.brief(error)}).") from None
  if len(clip) < frames:
    raise ValueError(f"init_video {str(path)!r} has {len(clip)} frames; the model makes clips of {frames} (--frames).")
  clip = np.stack([pipeline.resize_and_crop(frame, size, None) for frame in clip[:frames]])
  return clip, np.zeros(clip.shape[:-1], bool)


def first_frame_edit(image: np.ndarray, frames: int, last: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """An image as the first frame of a clip to generate (image-to-video): (the image repeated [frames, h, w, 3],
  keep [frames, h, w], True on the first frame), and with `last` [h, w, 3] that image as its last frame, kept too."""
  keep = np.zeros((frames,) + image.shape[:2], bool)
  keep[0] = True
  clip = np.repeat(image[None], frames, axis=0)
  if last is not None:
    if frames < 2:
      raise ValueError("--last_image: a clip of one frame has no last frame apart from its first (--frames)")
    clip[-1], keep[-1] = last, True
  return clip, keep


ANIMATES = ("This image-to-video model animates an image: give each prompt the image its clip starts at (--init_image, "
            "or \"init_image\" in a .jsonl prompts file)")
NOT_EDITED = "--init_video and --mask edit a clip or inpaint; an image-to-video model animates an --init_image"
MIXED = ("A prompt with an --init_image makes this model (which starts clips at images, Wan 2.2 TI2V's mode) animate "
         "images: give every prompt of the call one, or sample those without in a call of their own")
LAST_NEEDED = ("This first-last-frame model (Wan 2.1 FLF2V) makes clips between two images: give each prompt the "
               "image its clip ends at too (--last_image, or \"last_image\" in a .jsonl prompts file)")
NO_LAST = "--last_image: this model starts clips at images (Wan 2.2 TI2V's mode); it reads no last frame"
ONE_IMAGE = ("--last_image: this image-to-video model reads the CLIP tokens of one image (Wan 2.1's); a last frame is "
             "for one without (Wan 2.2's)")


def animated_edit(entry: dict, size: int | tuple[int, int], frames: int) -> tuple[np.ndarray, np.ndarray]:
  """An image-to-video model's prompt entry as first_frame_edit's clip of its "init_image", and with a
  "last_image" that image as the clip's last frame, kept too (both brought to `size` as image_edit's)."""
  last = pipeline.resize_and_crop(read_image(entry, "last_image"), size, None) if "last_image" in entry else None
  return first_frame_edit(image_edit(entry, size)[0], frames, last)


def animation_problems(config, prompts: list[dict]) -> list[str]:
  """Why an image-to-video model cannot sample these prompts (dicts as sample.read_prompts reads them): each
  animates an image (init_image), making its whole clip from noise (no strength of an edit); last images
  (last_image) as last_image_problem allows."""
  found = []
  if missing := [e["prompt"] for e in prompts if "init_image" not in e][:3]:
    found.append(f"{MIXED if text_to_image.starts_clips_at_images(config) else ANIMATES}: {missing}")
  if any("init_video" in e or "mask" in e for e in prompts):
    found.append(NOT_EDITED)
  if any("strength" in e for e in prompts):
    found.append("a prompt's 'strength': an image-to-video model makes its whole clip from noise (the image is its "
                 "condition, not a start); leave it out")
  given = ["last_image" in e for e in prompts]
  if problem := last_image_problem(config, given):
    missing = [e["prompt"] for e, last in zip(prompts, given) if not last][:3]
    found.append(f"{problem}: {missing}" if problem == LAST_NEEDED else problem)
  return found


def last_image_problem(config, given) -> str | None:
  """Why an image-to-video model cannot make clips that end at last images where `given` (bool per clip) says:
  a first-last-frame model (Wan 2.1 FLF2V) needs one for every clip; one that reads one image's CLIP tokens (Wan
  2.1 I2V) or starts clips at images (Wan 2.2 TI2V) reads none."""
  if text_to_image.first_last_frame(config):
    return None if all(given) else LAST_NEEDED
  if any(given) and text_to_image.starts_clips_at_images(config):
    return NO_LAST
  if any(given) and config.model.wan_image_encoder_path:
    return ONE_IMAGE
  return None


def animated_images(init_images, keep_masks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(first, last, last_given): the images [n, h, w, 3] an image-to-video model's clips start at and end at, and
  bool [n] whether each ends at its last one: the first and last frames of clips init_images [n, frames, h, w, 3]
  whose keep_masks [n, frames, h, w] keep the first frame and maybe the last whole, nothing else (animated_edit's);
  a ValueError for anything else."""
  if init_images is None:
    raise ValueError(ANIMATES + ".")
  keep = np.asarray(keep_masks, bool) if keep_masks is not None else None
  if keep is None or not keep[:, 0].all() or keep[:, 1:-1].any() or np.any(
      keep[:, -1].any(axis=(1, 2)) != keep[:, -1].all(axis=(1, 2))):
    raise ValueError(NOT_EDITED + ".")
  last_given = keep[:, -1].all(axis=(1, 2)) & (keep.shape[1] > 1)  # (a clip of one frame has no other last one)
  return np.asarray(init_images)[:, 0], np.asarray(init_images)[:, -1], last_given
