"""`pytest --compile-report=N`: where each test's time goes in JAX, the N slowest tests in a table after the run.

Per test (its fixtures' set-up included): wall seconds, XLA compile seconds and programs, tracing and lowering
seconds, and persistent-cache hits with the seconds spent reading them, from JAX's monitoring events. Jobs a test
starts as subprocesses are not seen (their wall time is the test's). With xdist, each worker sends its rows to the
controller, which prints one table.
"""

import collections
import time

import pytest

EVENTS = {  # JAX monitoring event -> column
    "/jax/core/compile/backend_compile_duration": "compile",
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/compilation_cache/cache_retrieval_time_sec": "cache_read",
}


def add_option(parser):
  parser.addoption("--compile-report", type=int, default=0, metavar="N",
                   help="after the run, a table of the N slowest tests' JAX compile, trace and lower seconds")


class CompileReport:
  """Collects {test id: {column: seconds, column + '_n': events}} in this process; prints them on the controller."""

  def __init__(self, rows: int):
    self.rows = rows
    self.tests = collections.defaultdict(lambda: collections.defaultdict(float))
    self.current = None

  def listen(self, event, duration, **_):
    column = EVENTS.get(event)
    if column and self.current:
      self.tests[self.current][column] += duration
      self.tests[self.current][column + "_n"] += 1

  @pytest.hookimpl(hookwrapper=True)
  def pytest_runtest_protocol(self, item):
    self.current, start = item.nodeid, time.perf_counter()
    yield
    self.tests[item.nodeid]["wall"] += time.perf_counter() - start
    self.current = None

  def pytest_sessionfinish(self, session):
    if hasattr(session.config, "workeroutput"):  # an xdist worker: the controller prints
      session.config.workeroutput["compile_report"] = {k: dict(v) for k, v in self.tests.items()}

  @pytest.hookimpl(optionalhook=True)  # an xdist hook
  def pytest_testnodedown(self, node):
    for test, columns in getattr(node, "workeroutput", {}).get("compile_report", {}).items():
      self.tests[test].update(columns)

  def pytest_terminal_summary(self, terminalreporter):
    if hasattr(terminalreporter.config, "workeroutput") or not self.tests:
      return  # an xdist worker (its controller prints), or no test ran
    write = terminalreporter.write_line
    totals = collections.Counter()
    for columns in self.tests.values():
      totals.update(columns)
    write("")
    write(f"JAX compile report: the {self.rows} slowest tests (seconds; in-process work only)")
    write("| test | wall | XLA compile (programs) | trace | lower | cache reads (s) |")
    write("|---|---|---|---|---|---|")
    row = lambda name, c: write(
        f"| {name} | {c['wall']:.1f} | {c['compile']:.1f} ({int(c['compile_n'])}) | {c['trace']:.1f} | "
        f"{c['lower']:.1f} | {int(c['cache_read_n'])} ({c['cache_read']:.1f}) |")
    for test, columns in sorted(self.tests.items(), key=lambda kv: -kv[1]["wall"])[:self.rows]:
      row(test, collections.defaultdict(float, columns))
    row(f"all {len(self.tests)} tests", collections.defaultdict(float, totals))


def configure(config):
  """Registers the report when --compile-report asks for one."""
  rows = config.getoption("--compile-report")
  if rows > 0:
    import jax

    report = CompileReport(rows)
    jax.monitoring.register_event_duration_secs_listener(report.listen)
    config.pluginmanager.register(report, "compile_report")
