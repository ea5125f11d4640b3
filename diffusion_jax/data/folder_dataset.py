"""A user's folder of images or video clips + captions, prepared once into an array_record TFDS dataset.

  python -m diffusion_jax.data.folder_dataset --images=DIR --captions=DIR/captions.jsonl --data_dir=DIR
  python -m diffusion_jax.data.folder_dataset --clips=DIR --captions=FILE --frames=N --resolution=R --data_dir=DIR

Flags:
  --images      folder of image files (any format PIL reads; sub-folders allowed)
  --clips       folder of video files (any container and codec FFmpeg decodes, through PyAV: .mp4, .webm, .mov,
                .gif, ...; sub-folders allowed), instead of --images
  --captions    captions.jsonl ({"file": "relative/path.jpg", "caption": "..."} per line) or a .csv with
                columns file,caption
  --frames      clips: frames kept of each clip, its first ones (data.frames); shorter clips are skipped
  --resolution  clips: each frame is stored with its shorter side resized to this (data.resolution); training crops
                the square
  --data_dir    TFDS data directory to write to (the dataset is `folder_images/<hash of the inputs>`, or
                `folder_clips/<hash>`)

Files that cannot be decoded, clips with fewer frames than --frames, and lines whose file is missing or whose
caption is empty are skipped and counted in the summary. Train on images with `--config.data.dataset=folder
--config.data.folder=DIR --config.data.captions_file=FILE --config.data.data_dir=DIR`, on clips with
`--config.data.dataset=folder_clips --config.data.image_key=video` and the same fields (plus data.frames and
data.resolution, which decide what is prepared).
"""

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

log = logging.getLogger(__name__)


def read_captions(path) -> list[tuple[str, str]]:
  path = pathlib.Path(path)
  if not path.exists():
    raise ValueError(f"Captions file {str(path)!r} does not exist.")
  rows = []
  if path.suffix == ".csv":
    with open(path, newline="") as f:
      reader = csv.DictReader(f)
      if not {"file", "caption"} <= set(reader.fieldnames or ()):
        raise ValueError(f"{str(path)!r} needs the columns file,caption; it has {reader.fieldnames}.")
      rows = [(r["file"], r["caption"]) for r in reader]
  else:
    for number, line in enumerate(path.read_text().splitlines(), 1):
      if line.strip():
        try:
          record = json.loads(line)
          rows.append((record["file"], record.get("caption") or ""))
        except (json.JSONDecodeError, KeyError, TypeError):
          raise ValueError(f"{str(path)!r} line {number}: expected a JSON object with 'file' and 'caption'.") from None
  if not rows:
    raise ValueError(f"Captions file {str(path)!r} lists no images.")
  return rows


@dataclasses.dataclass
class FolderConfig(tfds.core.BuilderConfig):
  folder: str = ""
  captions_file: str = ""


class FolderImages(tfds.core.GeneratorBasedBuilder):
  """Images from a local folder with captions."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [FolderConfig(name="default")]

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(None, None, 3)),
                                             "caption": tfds.features.Text(), "file": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    c = self.builder_config
    folder = pathlib.Path(c.folder)
    skipped = {"missing file": 0, "empty caption": 0, "undecodable image": 0}
    for index, (file, caption) in enumerate(read_captions(c.captions_file)):
      if not caption.strip():
        skipped["empty caption"] += 1
        continue
      if not (folder / file).is_file():
        skipped["missing file"] += 1
        continue
      try:
        with PIL.Image.open(folder / file) as image:
          image = image.convert("RGB")
      except (OSError, ValueError, PIL.Image.DecompressionBombError):
        skipped["undecodable image"] += 1
        continue
      yield index, {"image": image, "caption": caption, "file": file}
    log.warning("folder dataset: skipped %s", skipped)


@dataclasses.dataclass
class FolderClipsConfig(tfds.core.BuilderConfig):
  folder: str = ""
  captions_file: str = ""
  frames: int = 0
  resolution: int = 0


def read_clip(path, frames: int, resolution: int) -> np.ndarray | None:
  """The first `frames` frames of a video file, each resized so that its shorter side is `resolution`: uint8
  [frames, h, w, 3], or None when the clip is shorter. Decoding errors raise (OSError, ValueError or PyAV's)."""
  import av

  kept = []
  with av.open(str(path)) as container:
    for frame in container.decode(video=0):
      image = frame.to_image()
      scale = resolution / min(image.size)
      kept.append(np.asarray(image.convert("RGB").resize(
          (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))),
          PIL.Image.BICUBIC)))
      if len(kept) == frames:
        return np.stack(kept)
  return None


class FolderClips(tfds.core.GeneratorBasedBuilder):
  """Video clips from a local folder with captions: each clip's first `frames` frames."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [FolderClipsConfig(name="default")]

  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        "video": tfds.features.Sequence(tfds.features.Image(shape=(None, None, 3)), length=self.builder_config.frames),
        "caption": tfds.features.Text(), "file": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    import av

    c = self.builder_config
    folder = pathlib.Path(c.folder)
    skipped = {"missing file": 0, "empty caption": 0, "undecodable clip": 0, f"fewer than {c.frames} frames": 0}
    for index, (file, caption) in enumerate(read_captions(c.captions_file)):
      if not caption.strip():
        skipped["empty caption"] += 1
        continue
      if not (folder / file).is_file():
        skipped["missing file"] += 1
        continue
      try:
        clip = read_clip(folder / file, c.frames, c.resolution)
      except (OSError, ValueError, av.FFmpegError):
        skipped["undecodable clip"] += 1
        continue
      if clip is None:
        skipped[f"fewer than {c.frames} frames"] += 1
        continue
      yield index, {"video": [PIL.Image.fromarray(frame) for frame in clip], "caption": caption, "file": file}
    log.warning("folder clips dataset: skipped %s", skipped)


def clips_builder(folder, captions_file, frames: int, resolution: int, data_dir) -> FolderClips:
  """The prepared clips dataset for this folder, captions file, clip length and resolution (prepared on first
  use)."""
  if not pathlib.Path(folder).is_dir():
    raise ValueError(f"Clip folder {str(folder)!r} does not exist.")
  if frames < 1 or resolution < 1:
    raise ValueError(f"frames={frames} and resolution={resolution} must be positive: they decide what is prepared")
  inputs = f"{pathlib.Path(folder).resolve()}|{pathlib.Path(captions_file).resolve()}|{frames}|{resolution}"
  config = FolderClipsConfig(name=hashlib.sha256(inputs.encode()).hexdigest()[:12], folder=str(folder),
                             captions_file=str(captions_file), frames=frames, resolution=resolution)
  result = FolderClips(config=config, data_dir=str(pathlib.Path(data_dir).expanduser()), file_format="array_record")
  result.download_and_prepare()
  return result


def builder(folder, captions_file, data_dir) -> FolderImages:
  """The prepared dataset for this folder and captions file (prepared on first use)."""
  if not pathlib.Path(folder).is_dir():
    raise ValueError(f"Image folder {str(folder)!r} does not exist.")
  key = hashlib.sha256(f"{pathlib.Path(folder).resolve()}|{pathlib.Path(captions_file).resolve()}".encode())
  config = FolderConfig(name=key.hexdigest()[:12], folder=str(folder), captions_file=str(captions_file))
  result = FolderImages(config=config, data_dir=str(pathlib.Path(data_dir).expanduser()), file_format="array_record")
  result.download_and_prepare()
  return result


def main(argv=None) -> int:
  import argparse

  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  inputs = parser.add_mutually_exclusive_group(required=True)
  inputs.add_argument("--images")
  inputs.add_argument("--clips")
  parser.add_argument("--captions", required=True)
  parser.add_argument("--frames", type=int, default=0)
  parser.add_argument("--resolution", type=int, default=0)
  parser.add_argument("--data_dir", required=True)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  try:
    prepared = (builder(args.images, args.captions, args.data_dir) if args.images else
                clips_builder(args.clips, args.captions, args.frames, args.resolution, args.data_dir))
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  print(f"prepared {prepared.info.splits['train'].num_examples} examples in {prepared.data_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
