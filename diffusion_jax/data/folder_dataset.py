"""A user's folder of images or video clips + captions, prepared once into an array_record TFDS dataset.

  python -m diffusion_jax.data.folder_dataset --images=DIR --captions=DIR/captions.jsonl --data_dir=DIR [--references]
  python -m diffusion_jax.data.folder_dataset --clips=DIR --captions=FILE --frames=N --resolution=R [--frame_stride=S]
      --data_dir=DIR

Flags:
  --images      folder of image files (any format PIL reads; sub-folders allowed)
  --clips       folder of video files (any container and codec FFmpeg decodes, through PyAV: .mp4, .webm, .mov,
                .gif, ...; sub-folders allowed), instead of --images
  --captions    captions.jsonl ({"file": "relative/path.jpg", "caption": "..."} per line) or a .csv with
                columns file,caption: the train split
  --references  images: each line also names the image's reference image ("reference": "relative/path.jpg", a
                .csv's column reference), stored beside it: FLUX.1 Kontext's edit pairs (the reference the edit
                starts from, the image it ends at, the instruction as its caption; data.reference_key='reference')
                or FLUX.1 Depth / Canny's (image, control image) pairs; lines without one, or whose reference is
                missing or undecodable, are skipped
  --eval_captions  the same for held-out files of the folder: the validation split, which evaluation reads
                (data.eval_captions_file); default none
  --frames      clips: frames kept of each clip, its first ones (data.frames); shorter clips are skipped
  --frame_stride  clips: keep every S-th frame (data.frame_stride; e.g. 2 takes 30 fps clips to 15 fps); default 1
  --resolution  clips: each frame is stored with its shorter side resized to this (data.resolution); training scales
                it to cover data.resolution x data.width (a square where data.width is 0) and crops
  --data_dir    TFDS data directory to write to (the dataset is `folder_images/<hash of the inputs>`, or
                `folder_clips/<hash>`)

Files that cannot be decoded, clips with fewer frames than --frames, and lines whose file is missing or whose
caption is empty are skipped and counted in the summary; the images' shorter sides are summarised too (min, median,
max: training scales an image smaller than data.resolution up). Train on images with `--config.data.dataset=folder
--config.data.folder=DIR --config.data.captions_file=FILE --config.data.data_dir=DIR`, on clips with
`--config.data.dataset=folder_clips --config.data.image_key=video` and the same fields (plus data.frames and
data.resolution, which decide what is prepared), on edit pairs (--references) with those of images and
`--config.data.reference_key=reference`.
"""

import collections
import csv
import dataclasses
import hashlib
import json
import logging
import pathlib
import sys

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from diffusion_jax import media
from diffusion_jax.data import local_builder

log = logging.getLogger(__name__)


CAPTION_KEYS = ("file", "caption", "reference")


def read_captions(path) -> list[tuple[str, str, str]]:
  """(file, caption, reference file or "") of each line of a captions.jsonl or .csv (UTF-8, a spreadsheet's
  byte-order mark allowed); a ValueError naming a line that is no JSON object of those keys (a caption under another
  key would leave every image uncaptioned, skipped)."""
  path = pathlib.Path(path)
  if not path.exists():
    raise ValueError(f"Captions file {str(path)!r} does not exist.")
  rows = []
  try:
    if path.suffix == ".csv":
      with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not {"file", "caption"} <= set(reader.fieldnames or ()):
          raise ValueError(f"{str(path)!r} needs the columns file,caption; it has {reader.fieldnames}.")
        rows = [(r["file"], r["caption"], r.get("reference") or "") for r in reader]
    else:
      for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if line.strip():
          try:
            record = json.loads(line)
            if not isinstance(record, dict) or set(record) - set(CAPTION_KEYS) or not all(
                isinstance(record.get(key, ""), str) for key in CAPTION_KEYS):
              raise TypeError
            rows.append((record["file"], record.get("caption", ""), record.get("reference", "")))
          except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{str(path)!r} line {number}: expected a JSON object with a 'file' and a 'caption' "
                             f"(and a 'reference'), strings, and no other keys: {line.strip()[:200]}") from None
  except UnicodeDecodeError as error:
    raise ValueError(f"Captions file {str(path)!r} is not UTF-8 text ({error}).") from None
  if not rows:
    raise ValueError(f"Captions file {str(path)!r} lists no images.")
  return rows


@dataclasses.dataclass
class FolderConfig(tfds.core.BuilderConfig):
  folder: str = ""
  captions_file: str = ""
  eval_captions_file: str = ""  # "": no validation split
  references: bool = False  # images: each with the reference image its line names (FLUX.1 Kontext's edit pairs)


@dataclasses.dataclass
class FolderClipsConfig(FolderConfig):
  frames: int = 0
  resolution: int = 0
  frame_stride: int = 1


def read_clip(path, frames: int, resolution: int, stride: int = 1) -> np.ndarray | None:
  """Frames 0, stride, 2 stride, ... of a video file, `frames` of them, each turned as its display matrix says (a
  phone's clip stored sideways; as players and FFmpeg turn it) and resized so that its shorter side is `resolution`:
  uint8 [frames, h, w, 3], or None when the clip is shorter. Decoding errors raise (OSError, ValueError or
  PyAV's)."""
  import av

  kept = []
  with av.open(str(path)) as container:
    for index, frame in enumerate(container.decode(video=0)):
      if index % stride:
        continue
      image = media.upright_frame(frame)
      scale = resolution / min(image.size)
      kept.append(np.asarray(image.resize(
          (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))),
          PIL.Image.BICUBIC)))
      if len(kept) == frames:
        return np.stack(kept)
  return None


class CaptionedFolder(local_builder.LocalBuilder, skip_registration=True):
  """What both folder builders share: a train split of the files captions_file lists and, when eval_captions_file
  is given, a validation split of those it lists; a line whose caption is empty, whose file is missing or which
  `_read(path)` cannot use is skipped and counted."""

  # A new version whenever what is read from a file changes: folders prepared by earlier code are prepared again.
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.1.0": "Images and clips turned upright (EXIF orientation, display matrix), 16-bit grayscale "
                            "scaled to 8 bits, transparent pixels laid over white."}

  def _split_generators(self, dl_manager):
    c = self.builder_config
    splits = {"train": self._generate_examples(c.captions_file)}
    if c.eval_captions_file:
      splits["validation"] = self._generate_examples(c.eval_captions_file)
    return splits

  def _generate_examples(self, captions_file):
    folder, skipped, sides = pathlib.Path(self.builder_config.folder), collections.Counter(), []
    references = self.builder_config.references
    for index, (file, caption, reference) in enumerate(read_captions(captions_file)):
      reason, example = ("empty caption", None) if not caption.strip() else (
          ("missing file", None) if not (folder / file).is_file() else self._read(folder / file))
      if not reason and references:  # (an edit pair's reference: the image it starts from)
        if not reference:
          reason = "no reference"
        elif not (folder / reference).is_file():
          reason = "missing reference"
        elif (referenced := self._read(folder / reference))[0]:
          reason = "undecodable reference"
        else:
          example["reference"] = referenced[1]["image"]
      if reason:
        skipped[reason] += 1
        continue
      if "image" in example:  # (a clip's frames are stored at --resolution)
        sides.append(min(example["image"].size))
      yield index, {**example, "caption": caption, "file": file}
    log.warning("%s: of %s skipped %s", self.name, captions_file, dict(skipped))
    if sum(skipped.values()) == index + 1:
      raise ValueError(f"None of the {index + 1} lines of {str(captions_file)!r} could be used: {dict(skipped)}")
    if sides:  # training scales each image to cover data.resolution x data.width: below it, up
      log.warning("%s: the shorter sides of the %d images of %s: min %d, median %d, max %d px", self.name,
                  len(sides), captions_file, min(sides), int(np.median(sides)), max(sides))

  def _read(self, path) -> tuple[str | None, dict | None]:
    """(None, the example's media features) of a usable file, else (why it is skipped, None)."""
    raise NotImplementedError


class FolderImages(CaptionedFolder):
  """Images from a local folder with captions."""

  BUILDER_CONFIGS = [FolderConfig(name="default")]

  def _info(self):
    image = lambda: tfds.features.Image(shape=(None, None, 3))
    references = {"reference": image()} if self.builder_config.references else {}
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(
        {"image": image(), **references, "caption": tfds.features.Text(), "file": tfds.features.Text()}))

  def _read(self, path):
    try:
      with PIL.Image.open(path) as image:
        return None, {"image": media.upright_rgb(image)}
    except PIL.Image.DecompressionBombError:
      return f"over {2 * PIL.Image.MAX_IMAGE_PIXELS} pixels (PIL's limit against decompression bombs)", None
    except media.FloatPixels:
      return "32-bit float pixels (their range unknown)", None
    except (OSError, ValueError):
      return "undecodable image", None


class FolderClips(CaptionedFolder):
  """Video clips from a local folder with captions: each clip's first `frames` frames."""

  BUILDER_CONFIGS = [FolderClipsConfig(name="default")]
  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {**CaptionedFolder.RELEASE_NOTES,
                   "1.2.0": "A clip's transparent pixels (an alpha channel: a .mov's PNG, QuickTime Animation or "
                            "ProRes 4444) laid over white."}

  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        "video": tfds.features.Sequence(tfds.features.Image(shape=(None, None, 3)), length=self.builder_config.frames),
        "caption": tfds.features.Text(), "file": tfds.features.Text()}))

  def _read(self, path):
    import av

    c = self.builder_config
    try:
      clip = read_clip(path, c.frames, c.resolution, c.frame_stride)
    except (OSError, ValueError, av.FFmpegError):
      return "undecodable clip", None
    if clip is None:
      return f"fewer than {c.frames} frames (every {c.frame_stride})", None
    return None, {"video": [PIL.Image.fromarray(frame) for frame in clip]}


def _prepare(builder_class, config_class, data_dir, inputs: str, **fields):
  """builder_class's dataset for `fields` (a config_class), named by a hash of `inputs`, prepared on first use."""
  config = config_class(name=hashlib.sha256(inputs.encode()).hexdigest()[:12], **fields)
  result = builder_class(config=config, data_dir=str(pathlib.Path(data_dir).expanduser()), file_format="array_record")
  result.download_and_prepare()
  return result


def _inputs(folder, captions_file, eval_captions_file) -> str:
  """What names a prepared folder dataset: the folder and captions files (the held-out one only when given, so
  datasets prepared before it existed keep their names)."""
  paths = [folder, captions_file] + ([eval_captions_file] if eval_captions_file else [])
  return "|".join(str(pathlib.Path(p).resolve()) for p in paths)


def builder(folder, captions_file, data_dir, eval_captions_file="", references: bool = False) -> FolderImages:
  """The prepared images dataset for this folder and captions file(s) (prepared on first use); references: each
  image with the reference image its line names (FLUX.1 Kontext's edit pairs)."""
  if not pathlib.Path(folder).is_dir():
    raise ValueError(f"Image folder {str(folder)!r} does not exist.")
  inputs = _inputs(folder, captions_file, eval_captions_file) + ("|references" if references else "")
  return _prepare(FolderImages, FolderConfig, data_dir, inputs, folder=str(folder), captions_file=str(captions_file),
                  eval_captions_file=str(eval_captions_file), references=references)


def clips_builder(folder, captions_file, frames: int, resolution: int, data_dir, eval_captions_file="",
                  frame_stride: int = 1) -> FolderClips:
  """The prepared clips dataset for this folder, captions file(s), clip length, resolution and frame stride
  (prepared on first use)."""
  if not pathlib.Path(folder).is_dir():
    raise ValueError(f"Clip folder {str(folder)!r} does not exist.")
  if frames < 1 or resolution < 1 or frame_stride < 1:
    raise ValueError(f"frames={frames}, resolution={resolution} and frame_stride={frame_stride} must be positive: "
                     "they decide what is prepared")
  inputs = f"{_inputs(folder, captions_file, eval_captions_file)}|{frames}|{resolution}"
  inputs += f"|stride {frame_stride}" if frame_stride != 1 else ""  # the first datasets keep their names
  return _prepare(FolderClips, FolderClipsConfig, data_dir, inputs, folder=str(folder),
                   captions_file=str(captions_file), eval_captions_file=str(eval_captions_file), frames=frames,
                   resolution=resolution, frame_stride=frame_stride)


def main(argv=None) -> int:
  import argparse

  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  inputs = parser.add_mutually_exclusive_group(required=True)
  inputs.add_argument("--images")
  inputs.add_argument("--clips")
  parser.add_argument("--captions", required=True)
  parser.add_argument("--eval_captions", default="")
  parser.add_argument("--frames", type=int, default=0)
  parser.add_argument("--resolution", type=int, default=0)
  parser.add_argument("--frame_stride", type=int, default=1)
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--references", action="store_true")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  try:
    if args.references and not args.images:
      raise ValueError("--references: edit pairs are images (--images)")
    if args.images:
      prepared = builder(args.images, args.captions, args.data_dir, args.eval_captions, args.references)
    else:
      prepared = clips_builder(args.clips, args.captions, args.frames, args.resolution, args.data_dir,
                               args.eval_captions, args.frame_stride)
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  counts = ", ".join(f"{split.num_examples} {name}" for name, split in prepared.info.splits.items())
  print(f"prepared {counts} examples in {prepared.data_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
