"""SIGTERM and Ctrl-C as a request to stop at the next step boundary, after a checkpoint is saved.

SIGTERM is the preemption notice of most clusters; Ctrl-C (SIGINT) is a user stopping a local run. Neither
should cost the steps since the last periodic checkpoint. A second Ctrl-C interrupts at once
(KeyboardInterrupt), for a user who will not wait for the save. In a multi-process job the processes must stop
at the same step: `job_signals` and `all_stop` say which signals a trainer handles itself and when all agree.
"""

import logging
import signal

import jax

from diffusion_jax import distributed

log = logging.getLogger(__name__)


class StopSignals:
  """Context manager: while active, `signals` (default SIGTERM and SIGINT) set `received` (the first one's
  name, e.g. "SIGTERM") instead of ending the process; the previous handlers come back on exit. Outside the
  main thread, where Python cannot install handlers, it does nothing."""

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self.signals = signals
    self.received = None
    self._previous = {}

  def __enter__(self):
    try:
      self._previous = {s: signal.signal(s, self._handler) for s in self.signals}
    except ValueError:  # not the main thread
      self._previous = {}
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def _handler(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.received is not None:
      raise KeyboardInterrupt
    if self.received is None:
      self.received = signal.Signals(signum).name
      hint = " (Ctrl-C again to stop without saving)" if signum == signal.SIGINT else ""
      log.warning("%s received: saving a checkpoint after this step, then stopping%s.", self.received, hint)


def job_signals() -> tuple:
  """The signals a job's StopSignals handles. With several processes SIGTERM stays with JAX's preemption service,
  whose sync point (the checkpoint manager's `reached_preemption`, every step, no device work) all processes
  reach at the same step."""
  return (signal.SIGINT,) if jax.process_count() > 1 else (signal.SIGTERM, signal.SIGINT)


def all_stop(stop: StopSignals, step: int, interval: int) -> bool:
  """Whether every process stops after this step: one that got a stop signal asks, and all agree (one gather
  every `interval` steps) so that they save the same step and none waits in a collective for the others."""
  if jax.process_count() > 1 and step % interval:
    return False
  return distributed.any_process(stop.received is not None)
