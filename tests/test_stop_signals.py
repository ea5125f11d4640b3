"""SIGTERM and Ctrl-C become a stop request while the training loop runs (test_main sends one to a real run)."""

import signal

import pytest

from diffusion_jax import stop_signals


def test_first_signal_is_a_request_a_second_ctrl_c_interrupts_and_handlers_come_back():
  before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  with stop_signals.StopSignals() as stop:
    assert stop.received is None
    signal.raise_signal(signal.SIGTERM)
    assert stop.received == "SIGTERM"
    signal.raise_signal(signal.SIGTERM)  # repeated notices change nothing
    assert stop.received == "SIGTERM"
    with pytest.raises(KeyboardInterrupt):
      signal.raise_signal(signal.SIGINT)
  assert {s: signal.getsignal(s) for s in before} == before


def test_ctrl_c_is_a_stop_request():
  with stop_signals.StopSignals() as stop:
    signal.raise_signal(signal.SIGINT)
  assert stop.received == "SIGINT"
