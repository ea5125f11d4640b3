"""A user's folder of images + captions, prepared once into an array_record TFDS dataset.

  python -m diffusion_jax.data.folder_dataset --images=DIR --captions=DIR/captions.jsonl --data_dir=DIR

Flags:
  --images    folder of image files (any format PIL reads; sub-folders allowed)
  --captions  captions.jsonl ({"file": "relative/path.jpg", "caption": "..."} per line) or a .csv with
              columns file,caption
  --data_dir  TFDS data directory to write to (the dataset is `folder_images/<hash of the inputs>`)

Images that cannot be decoded, and lines whose file is missing or whose caption is empty, are skipped
and counted in the summary. Train on it with `--config.data.dataset=folder --config.data.folder=DIR
--config.data.captions_file=FILE --config.data.data_dir=DIR`.
"""

import csv
import dataclasses
import hashlib
import json
import logging
import pathlib
import sys

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
  parser.add_argument("--images", required=True)
  parser.add_argument("--captions", required=True)
  parser.add_argument("--data_dir", required=True)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  try:
    prepared = builder(args.images, args.captions, args.data_dir)
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  print(f"prepared {prepared.info.splits['train'].num_examples} examples in {prepared.data_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
