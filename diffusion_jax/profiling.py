"""Where a compiled program's time goes: a profiler trace of a few executions, each executed HLO op's time
attributed to the JAX primitive it came from (the op_name in its metadata), to forward / backward /
other (optimizer, EMA, loss bookkeeping), and to a coarse kind (convolution, matmul, reduction, copy).

Op times are summed over the threads that ran them, so on a multi-threaded CPU they can add up to more
than the wall time; shares of the summed time are what to compare.
"""

import collections
import re
import tempfile
import time

import jax

# HLO opcode of an op (or of the heaviest op a fusion calls) -> kind of work, heaviest first.
KINDS = {"convolution": "convolution", "dot": "matmul (attention, linear layers)",
         "reduce": "reductions (norms, softmax, loss)", "reduce-window": "reductions (norms, softmax, loss)",
         "copy": "layout copies", "transpose": "layout copies"}
OTHER = "elementwise and other"
# A GPU runs convolutions and matmuls as custom calls into cuDNN / cuBLAS: (target substring, opcode it stands for).
LIBRARY_CALLS = (("conv", "convolution"), ("fmha", "dot"), ("gemm", "dot"), ("matmul", "dot"))


def _instructions(hlo_text: str):
  """(computation, instruction name, opcode, called computation or None, op_name or None) per HLO line."""
  computation = None
  for line in hlo_text.splitlines():
    header = re.match(r"(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$", line)
    if header:
      computation = header.group(1)
      continue
    match = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+) = (.*)", line)
    if not match:
      continue
    name, rest = match.groups()
    opcode = re.search(r"(?:^|[\s}\])])([a-z][a-z0-9\-]*)\(", rest)
    opcode = opcode.group(1) if opcode else "?"
    if opcode == "custom-call":
      target = re.search(r'custom_call_target="([^"]*)"', rest)
      target = target.group(1).lower() if target else ""
      opcode = next((stands_for for part, stands_for in LIBRARY_CALLS if part in target), opcode)
    calls = re.search(r"calls=%?([\w.\-]+)", rest)
    op_name = re.search(r'op_name="([^"]*)"', rest)
    yield (computation, name, opcode, calls.group(1) if calls else None, op_name.group(1) if op_name else None)


def _phase(op_name) -> str:
  if op_name is None:
    return "unknown"
  return "backward" if "transpose(" in op_name else "forward" if "jvp(" in op_name else "other"


def op_sources(hlo_text: str) -> dict:
  """HLO instruction name -> (kind, label, phase) from a compiled module's text. A fusion is described by the
  heaviest op it calls (convolution, then dot, reduce, copy); label is that op's JAX primitive (from its
  metadata) or its HLO opcode in brackets; phase is forward / backward / other (optimizer, EMA, loss) /
  unknown (ops XLA added without metadata)."""
  instructions = list(_instructions(hlo_text))
  inside = collections.defaultdict(list)
  for computation, _, opcode, _, op_name in instructions:
    inside[computation].append((opcode, op_name))
  sources = {}
  for _, name, opcode, calls, op_name in instructions:
    ops = inside.get(calls, []) if calls else [(opcode, op_name)]
    heaviest = next((op for wanted in KINDS for op in ops if op[0] == wanted), ops[-1] if ops else (opcode, op_name))
    named = heaviest[1] or op_name or next((n for _, n in ops if n), None)
    label = re.sub(r"\[.*", "", heaviest[1].rsplit("/", 1)[-1]) if heaviest[1] else f"({heaviest[0]})"
    sources[name] = (KINDS.get(heaviest[0], OTHER), label, _phase(named))
  return sources


def op_seconds(trace_dir: str, module: str) -> dict:
  """{HLO op name: summed seconds} of `module`'s ops in the profiler trace under trace_dir."""
  import glob

  from jax.profiler import ProfileData

  totals = collections.Counter()
  for path in glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True):
    for plane in ProfileData.from_file(path).planes:
      for line in plane.lines:
        for event in line.events:
          stats = dict(event.stats)
          if "hlo_op" in stats and stats.get("hlo_module", module) == module:
            totals[str(stats["hlo_op"])] += event.duration_ns * 1e-9
  return totals


def profile(compiled, args: tuple, steps: int = 3, advance=None) -> tuple[dict, float]:
  """({(kind, label, phase): seconds per execution}, wall seconds per execution) of `compiled(*args)`.
  `advance(args, outputs) -> args` feeds outputs back in (a train step's new state); by default the same
  args are reused."""
  hlo = compiled.as_text()
  module = re.search(r"HloModule\s+([\w.\-]+)", hlo).group(1)
  sources = op_sources(hlo)
  advance = advance or (lambda args, outputs: args)
  args = advance(args, jax.block_until_ready(compiled(*args)))  # warm-up outside the trace
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    start = time.perf_counter()
    for _ in range(steps):
      args = advance(args, jax.block_until_ready(compiled(*args)))
    wall = (time.perf_counter() - start) / steps
    jax.profiler.stop_trace()
    totals = op_seconds(trace_dir, module)
  by_source = collections.Counter()
  for op, seconds in totals.items():
    by_source[sources.get(op, (OTHER, f"({op})", "unknown"))] += seconds / steps
  return dict(by_source), wall


def table(by_source: dict, wall: float, top: int = 12) -> str:
  """Markdown: time per kind of op, per phase, then the `top` (label, phase) pairs by time."""
  total = sum(by_source.values())
  lines = [f"wall time per execution {wall * 1e3:.1f} ms; op time summed over threads {total * 1e3:.1f} ms"]
  for title, key in (("kind of op", lambda source: source[0]), ("phase", lambda source: source[2]),
                     ("op | phase", lambda source: f"{source[1]} | {source[2]}")):
    grouped = collections.Counter()
    for source, seconds in by_source.items():
      grouped[key(source)] += seconds
    columns = title.count("|") + 1
    lines += ["", f"| {title} | ms | share |", "|---" * (columns + 2) + "|"]
    lines += [f"| {k} | {s * 1e3:.1f} | {s / total:.0%} |" for k, s in grouped.most_common(top)]
  return "\n".join(lines)
