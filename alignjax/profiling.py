"""Where an XLA program's time goes, per op: run it under `jax.profiler.trace` and sum the
durations of the ops that the trace records on XLA's compute threads, grouped by op name with
the trailing instance number removed ("convolution.12" and "convolution.7" are both
"convolution"). A `while` op (lax.scan, lax.map) contains the ops of its body, so its own line
overlaps theirs; the table marks such containers. Used by `benchmarks/sd_sampling.py --profile`.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile

import jax

CONTAINERS = ("while", "call", "conditional")


def op_times(fn) -> tuple[list[tuple[str, float, int]], float]:
  """([(op, seconds, count)] sorted by time, wall seconds) of one run of `fn()` (which must
  block until its results are ready)."""
  with tempfile.TemporaryDirectory() as directory:
    with jax.profiler.trace(directory, create_perfetto_trace=True):
      fn()
    (path,) = glob.glob(os.path.join(directory, "**", "perfetto_trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
      data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  xla_threads = {
      (e["pid"], e["tid"])
      for e in events
      if e.get("ph") == "M"
      and e.get("name") == "thread_name"
      and "XLA" in str(e.get("args", {}).get("name", ""))
  }
  total, count = collections.defaultdict(float), collections.Counter()
  first, last = float("inf"), 0.0
  for e in events:
    if e.get("ph") != "X" or (e.get("pid"), e.get("tid")) not in xla_threads:
      continue
    name = str(e.get("name", ""))
    if name.startswith("end: ") or "::" in name:  # markers and the runtime's own spans
      continue
    op = re.sub(r"\.\d+$", "", name)
    total[op] += float(e.get("dur", 0.0)) * 1e-6
    count[op] += 1
    first = min(first, float(e["ts"]))
    last = max(last, float(e["ts"]) + float(e.get("dur", 0.0)))
  rows = sorted(((op, t, count[op]) for op, t in total.items()), key=lambda r: -r[1])
  return rows, max(last - first, 0.0) * 1e-6


def print_op_times(fn, top: int = 20) -> None:
  """Prints the `top` lines of `op_times(fn)` with their share of the traced span."""
  rows, span = op_times(fn)
  print(f"XLA ops of one run ({span:.2f} s traced on XLA's threads; containers overlap):")
  for op, t, n in rows[:top]:
    tag = "  (container)" if op.split("_")[0] in CONTAINERS or op in CONTAINERS else ""
    print(f"  {op:48s} {t:8.3f} s {100 * t / max(span, 1e-9):5.1f} %  x{n}{tag}")
