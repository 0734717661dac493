"""Summarises a `jax.profiler` trace: where device (or host) time went.

Reads the `*.xplane.pb` files that `jax.profiler.trace(log_dir)` writes (with
`jax.profiler.ProfileData`, no TensorBoard needed) and prints, per plane whose
name matches `--planes` (default: GPU devices, else the host CPU):

- each line (GPU stream, "XLA Ops", "XLA Modules", ...) with its event count,
  summed event time and the span from its first event start to its last end;
- the top `--top` event names by summed time over the stream lines (the
  kernels; on the host plane, every line).

Usage::

  python -m benchmarks.trace_summary /tmp/trace_dir [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import sys

from jax.profiler import ProfileData


def _planes(path: pathlib.Path, pattern: str):
  data = ProfileData.from_file(str(path))
  planes = [p for p in data.planes if pattern in p.name]
  if not planes:
    planes = [p for p in data.planes if "CPU" in p.name]
  return planes


def summarize(log_dir: str, top: int = 25, pattern: str = "/device:GPU") -> dict:
  """Prints the summary of every xplane file under `log_dir`; returns
  `{plane name: {"lines": {line: (events, sum_ms, span_ms)}, "top": [(name,
  sum_ms, count)]}}`."""
  out = {}
  for path in sorted(pathlib.Path(log_dir).rglob("*.xplane.pb")):
    for plane in _planes(path, pattern):
      lines = {}
      per_name = collections.defaultdict(lambda: [0.0, 0])
      for line in plane.lines:
        events = list(line.events)
        if not events:
          continue
        total = sum(e.duration_ns for e in events) / 1e6
        span = (max(e.start_ns + e.duration_ns for e in events)
                - min(e.start_ns for e in events)) / 1e6
        lines[line.name] = (len(events), total, span)
        if "Stream" in line.name or "/device:GPU" not in plane.name:
          for e in events:
            acc = per_name[e.name]
            acc[0] += e.duration_ns / 1e6
            acc[1] += 1
      ranked = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]
      print(f"== {path.name}: plane {plane.name}", flush=True)
      for name, (n, total, span) in lines.items():
        print(f"  line {name[:60]:<60} {n:7d} events {total:10.2f} ms summed "
              f"{span:10.2f} ms span")
      for name, (total, n) in ranked:
        print(f"  {total:10.3f} ms {n:6d}x  {name[:110]}")
      out[plane.name] = {"lines": lines,
                         "top": [(k, v[0], v[1]) for k, v in ranked]}
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("log_dir")
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--planes", default="/device:GPU")
  args = parser.parse_args(argv)
  summarize(args.log_dir, args.top, args.planes)
  return 0


if __name__ == "__main__":
  sys.exit(main())
