"""Reading the files users give (checkpoints' weights, tokenizers, configs) with errors that name them: a file that
cannot be read is a ValueError (the jobs' `error: ...` line) naming it and what it was read as, and one that a
repository cloned without Git LFS holds in its place (a pointer: a few lines of text) is said to be that."""

import json
import pathlib

LFS_POINTER = b"version https://git-lfs"  # how a Git LFS pointer file begins


def unreadable(path, form: str, error: Exception) -> ValueError:
  """The error of a file that cannot be read as `form`: a Git LFS pointer said to be one, another file said to be
  damaged, cut short or of another format, with the reader's `error`."""
  with open(path, "rb") as file:
    if file.read(len(LFS_POINTER)) == LFS_POINTER:
      return ValueError(f"{str(path)!r} is a Git LFS pointer, not the file itself (a repository cloned without Git "
                        "LFS): fetch it (`git lfs pull` in the repository) or download the file")
  return ValueError(f"{str(path)!r} cannot be read as {form} (damaged, cut short or another format): "
                    f"{' '.join(str(error).split())[:300]}")


def read_json(path) -> dict:
  """The JSON object of a local file (a model's config.json, an index of weight shards); a ValueError naming it
  when it is no JSON object."""
  try:
    value = json.loads(pathlib.Path(path).read_bytes())
  except (UnicodeDecodeError, json.JSONDecodeError) as error:
    raise unreadable(path, "JSON", error) from None
  if not isinstance(value, dict):
    raise ValueError(f"{str(path)!r} holds a JSON {type(value).__name__}, not an object")
  return value
