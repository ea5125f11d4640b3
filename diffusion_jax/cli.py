"""Entry point of every command-line job: absl's `app.run`, with a config override that cannot be applied
(a mistyped `--config.<field>` or `--cascade.<field>`, a config file that fails to load) reported as one line on
stderr with exit code 2 instead of a traceback (ml_collections raises those while the flags are parsed), and usage
errors (`refuse`) as lines of their own with exit code 2."""

import contextlib
import logging
import sys

from absl import app, flags
from absl import logging as absl_logging


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing; an error raised by a config flag's parser (ml_collections' "Did you mean" included) or by
  absl's (an unknown flag, a value out of its bounds) is one line, `error: ...`, and exit code 2."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError, TypeError, ValueError, OSError) as error:
    while error.args and isinstance(error.args[0], BaseException):  # ml_collections wraps its KeyError
      error = error.args[0]
    message = " ".join(str(error.args[0] if error.args else error).split())
    print(f"error: {'no such config field: ' if isinstance(error, KeyError) else ''}{message}", file=sys.stderr)
    sys.exit(2)
  except flags.Error as error:
    print(f"error: {flag_error(error)}\n(--help lists every flag)", file=sys.stderr)
    sys.exit(2)


CONFIG_FILE_ERROR = "Error whilst parsing config file:"  # ml_collections' words, before the config's traceback


def flag_error(error: Exception) -> str:
  """absl's error of a flag, on one line; a config file's error (one its get_config raised, which ml_collections
  passes on with the whole traceback as text) as the flag and the error's own message."""
  text = str(error)
  if CONFIG_FILE_ERROR in text:
    flag, _, trace = text.partition(CONFIG_FILE_ERROR)
    text = flag + trace.strip().splitlines()[-1].split(": ", 1)[-1]
  return " ".join(text.split())


class DroppedNotices(logging.Filter):
  """Drops a library's log records whose message (its format string) is one of `messages`: its warnings of what this
  project does on purpose, which every job would print. Added to the "absl" logger, which orbax and TFDS log
  through."""

  def __init__(self, *messages: str):
    super().__init__()
    self.messages = messages

  def filter(self, record: logging.LogRecord) -> bool:
    return record.msg not in self.messages


# The kinds of config the jobs read, each known by a section no other kind has: (that section, whose config it is,
# where such configs are, what reads it).
CONFIG_KINDS = {
    "experiment": ("diffusion", "a diffusion experiment's", "configs/t2i_shapes.py, stable_diffusion.py, ...",
                   "the main job trains it"),
    "autoencoder": ("autoencoder", "an autoencoder's", "configs/autoencoder_*.py",
                    "python -m diffusion_jax.train_autoencoder trains it"),
    "cascade": ("stages", "a cascade's", "configs/cascades/", "sample and evaluate read it as --cascade"),
    "sweep": ("budgets", "a scaling sweep's", "configs/scaling/", "python -m diffusion_jax.scaling.run runs it"),
}


def config_kind_problems(kinds: dict[str, str]) -> list[str]:
  """'--FLAG=FILE is ...' for each config flag given ({flag name: CONFIG_KINDS key}) whose config is of another kind
  (the job's fields would be missing from it: a traceback deep in the job otherwise)."""
  found = []
  for name, kind in kinds.items():
    if flags.FLAGS[name].value is not None and (problem := kind_problem(flags.FLAGS[name].value, kind)):
      found.append(f"--{name}={flags.FLAGS[name].config_filename} is {problem}")
  return found


def kind_problem(config, kind: str) -> str | None:
  """What `config` (a ConfigDict or dict) is when it is not of `kind` (a CONFIG_KINDS key): "an autoencoder's config
  (... trains it), not a diffusion experiment's (configs/...)"."""
  section, whose, where, _ = CONFIG_KINDS[kind]
  if section in config:
    return None
  other = next((CONFIG_KINDS[k] for k, (s, *_) in CONFIG_KINDS.items() if s in config), None)
  what = f"{other[1]} config ({other[3]})" if other else f"no config of the jobs' kinds (no {section} section)"
  return f"{what}, not {whose} ({where})"


def run(main, config_kinds: dict[str, str] | None = None) -> None:
  """absl's app.run of `main`; a usage error (flags that do not go together, a missing one, a config flag given a
  config of another kind than `config_kinds` says, {flag name: CONFIG_KINDS key}) is `error: ...` a line, then a
  pointer to --help, and exit code 2, rather than the whole usage text with the error under it. The job's own log
  (diffusion_jax's loggers) is at INFO, the libraries' (orbax, TFDS, JAX, through absl) at WARNING unless
  --verbosity says otherwise."""

  def main_or_usage_error(argv):
    if not flags.FLAGS["verbosity"].present:
      absl_logging.set_verbosity(absl_logging.WARNING)  # libraries say only what matters
    for own in ("diffusion_jax", "__main__"):  # (a job's module run with -m logs as __main__)
      logging.getLogger(own).setLevel(logging.INFO)
    try:
      if problems := config_kind_problems(config_kinds or {}):
        raise app.UsageError("\n".join(problems))
      return main(argv)
    except app.UsageError as error:
      for line in str(error).splitlines():
        print(f"error: {line}", file=sys.stderr)
      print("(--help lists every flag)", file=sys.stderr)
      sys.exit(2)

  app.run(main_or_usage_error, flags_parser=parse_flags)


def print_result(job) -> None:
  """Print what `job()` returns; a ValueError (input that cannot work) is one line, `error: ...`, and exit code 2."""
  try:
    print(job())
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


_collected: list[list[str]] = []  # the refusals of the enclosing `refusals()` blocks


def refuse(names: tuple[str, ...], reason: str) -> None:
  """A usage error naming those of the flags `names` that the command line set, when any: `reason` says why
  they do not apply (a flag that would be silently ignored is refused instead). Inside `refusals()`, collected."""
  given = [f"--{name}" for name in names if flags.FLAGS[name].present]
  if given and _collected:
    _collected[-1].append(f"{', '.join(given)}: {reason}")
  elif given:
    raise app.UsageError(f"{', '.join(given)}: {reason}")


@contextlib.contextmanager
def refusals():
  """The `refuse` calls of its block collected into one usage error at its end, a line each: every flag a
  command line must drop, named at once."""
  _collected.append([])
  try:
    yield
  finally:
    found = _collected.pop()
  if found:
    raise app.UsageError("\n".join(found))
