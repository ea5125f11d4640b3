"""Run a job (the main job by default) as N processes on this machine (multi-host simulation over 127.0.0.1).

  python launch/local.py --num_processes=2 --devices_per_process=4 [--module=diffusion_jax.main] [--dry_run] -- \
      --config=configs/t2i_shapes.py --workdir=DIR [--config.x=y ...]

Flags:
  --num_processes        processes to start (default 2)
  --devices_per_process  simulated CPU devices per process (default 4)
  --port                 coordinator port on 127.0.0.1 (default 0: a free one)
  --module               the job: diffusion_jax.main (default), diffusion_jax.train_autoencoder,
                         diffusion_jax.sample or diffusion_jax.evaluate
  --dry_run              print the commands instead of running them
Everything after `--` goes to `python -m MODULE`. Exits non-zero if any process fails. Ctrl-C
or a SIGTERM to the launcher makes every process save a checkpoint and stop (the launcher waits for them).
"""

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys

MODULES = ("diffusion_jax.main", "diffusion_jax.train_autoencoder", "diffusion_jax.sample",  # the multi-process jobs
           "diffusion_jax.evaluate")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def xla_flags(flags: str, devices: int) -> str:
  """The caller's XLA_FLAGS with its simulated device count, if any, replaced by `devices`."""
  kept = [f for f in flags.split() if not f.startswith("--xla_force_host_platform_device_count=")]
  return " ".join([*kept, f"--xla_force_host_platform_device_count={devices}"])


def commands(module: str, num_processes: int, port: int, main_args: list[str]) -> list[list[str]]:
  return [[sys.executable, "-m", module, f"--coordinator=127.0.0.1:{port}",
           f"--num_processes={num_processes}", f"--process_id={i}", *main_args] for i in range(num_processes)]


def int_in(low: int, high: int | None = None):
  """argparse's type of an integer flag in [low, high]: out of it, the usage error names the bounds."""

  def parse(text: str) -> int:
    value = int(text)
    if value < low or (high is not None and value > high):
      most = f" and at most {high}" if high is not None else ""
      raise argparse.ArgumentTypeError(f"{value}: at least {low}{most}")
    return value

  parse.__name__ = "integer"  # (how argparse names the type in its message of a non-integer)
  return parse


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_processes", type=int_in(1), default=2)
  parser.add_argument("--devices_per_process", type=int_in(1), default=4)
  parser.add_argument("--port", type=int_in(0, 65535), default=0)
  parser.add_argument("--module", default="diffusion_jax.main", choices=MODULES)
  parser.add_argument("--dry_run", action="store_true")
  parser.add_argument("main_args", nargs=argparse.REMAINDER)
  args = parser.parse_args()
  main_args = args.main_args[1:] if args.main_args[:1] == ["--"] else args.main_args
  flags = xla_flags(os.environ.get("XLA_FLAGS", ""), args.devices_per_process)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
  todo = commands(args.module, args.num_processes, args.port or free_port(), main_args)
  if args.dry_run:
    for command in todo:
      print(f"XLA_FLAGS={shlex.quote(flags)} JAX_PLATFORMS=cpu {shlex.join(command)}")
    return 0
  processes = [subprocess.Popen(command, env=env) for command in todo]
  # Ctrl-C in the terminal reaches every process of the group: the jobs save a checkpoint and stop, and this
  # launcher waits for them instead of leaving them behind. A SIGTERM sent to the launcher alone is passed on.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, lambda *_: [p.send_signal(signal.SIGTERM) for p in processes])
  return max(p.wait() for p in processes) and 1


if __name__ == "__main__":
  sys.exit(main())
