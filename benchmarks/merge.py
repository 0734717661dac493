"""One report from several `benchmarks.run` invocations on the same device.

A full GPU run (`python -m benchmarks.run --gpu-full`) can be split into parts by
`--cases` (for example where a machine is lent in 10-minute calls), each part
writing its own `results.json`; this joins them and writes the usual outputs:

  python -m benchmarks.run --gpu-full --cases main,skewed --out /tmp/p1
  python -m benchmarks.run --gpu-full --cases sweep-e --out /tmp/p2
  python -m benchmarks.merge --out benchmarks/results/<device> /tmp/p1 /tmp/p2

Every comparison stays inside one part (all implementations of a case are timed
in the same process, one after another); the report lists each part's command,
date, commit and dense-matmul peak, and each row's `%peak` is against its own
part's peak. Parts must come from the same device kind and package versions,
and a case may appear in one part only.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from typing import Any

from benchmarks import report as report_lib

# Keys of `meta` that must agree between parts.
SAME_META = ("device_kind", "platform", "device_count", "versions", "jmoe_backend")
# Per-part lists that are concatenated.
LISTS = ("results", "profile", "profile_checks", "memory_process")


def load(path: str) -> dict[str, Any]:
  """The `results.json` of a part (a directory or the file itself)."""
  if os.path.isdir(path):
    path = os.path.join(path, "results.json")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _part_summary(part: dict[str, Any]) -> dict[str, Any]:
  meta = part["meta"]
  return {
      "command": meta.get("command"), "date": meta.get("date"),
      "total_s": meta.get("total_s"), "git_commit": meta.get("git_commit"),
      "git_dirty": meta.get("git_dirty"), "env": meta.get("env"),
      "cases": [c["name"] for c in part["cases"]],
      "dense_peak_tflops": (part.get("dense_peak") or {}).get("tflops"),
      "timing": part.get("timing"), "settings": part.get("settings"),
  }


def merge(parts: list[dict[str, Any]], names: list[str] | None = None) -> dict[str, Any]:
  """Joins part results (dicts of `results.json`) into one results dict.

  Args:
    parts: at least one part, in report order.
    names: a label per part for error messages (default `part 0`, ...).

  Returns:
    A results dict for `benchmarks.report.finish`: the first part's metadata,
    timing and dense peak, `meta["parts"]` describing every part, cases,
    results and profiles concatenated, notes prefixed by their part.

  Raises:
    ValueError: no parts, parts from different devices or versions, or a case
      in more than one part.
  """
  if not parts:
    raise ValueError("merge needs at least one part")
  names = names or [f"part {i}" for i in range(len(parts))]
  merged = copy.deepcopy(parts[0])
  for name, part in zip(names[1:], parts[1:]):
    for key in SAME_META:
      if part["meta"].get(key) != merged["meta"].get(key):
        raise ValueError(f"{name}: meta[{key!r}] is {part['meta'].get(key)!r}, but "
                         f"{names[0]} has {merged['meta'].get(key)!r}")
  seen: dict[str, str] = {}
  merged["cases"], merged["notes"] = [], []
  for key in LISTS:
    merged[key] = []
  for number, (name, part) in enumerate(zip(names, parts), 1):
    for case in part["cases"]:
      if case["name"] in seen:
        raise ValueError(f"case {case['name']!r} is in both {seen[case['name']]} and "
                         f"{name}")
      seen[case["name"]] = name
      merged["cases"].append(case)
    for key in LISTS:
      merged[key] += part.get(key, [])
    merged["notes"] += [f"part {number}: {n}" if len(parts) > 1 else n
                        for n in part.get("notes", [])]
    for impl, info in part["impls"].items():
      if info.get("available") and not merged["impls"].get(impl, {}).get("available"):
        merged["impls"][impl] = info
  merged["meta"]["parts"] = [_part_summary(p) for p in parts]
  merged["meta"]["total_s"] = sum(p["meta"].get("total_s") or 0 for p in parts)
  merged["meta"]["command"] = " ; ".join(p["meta"].get("command", "?") for p in parts)
  merged["meta"]["git_dirty"] = any(p["meta"].get("git_dirty") for p in parts)
  commits = {p["meta"].get("git_commit") for p in parts}
  merged["meta"]["git_commit"] = commits.pop() if len(commits) == 1 else ", ".join(
      sorted(str(c) for c in commits))
  merged.pop("targets", None)  # recomputed by report.finish
  for r in merged["results"]:
    r.pop("jmoe_speedup", None)
  return merged


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.merge",
      description="Join the results of several benchmarks.run parts into one report.")
  parser.add_argument("parts", nargs="+", help="part directories (or results.json)")
  parser.add_argument("--out", required=True, help="directory for the joined outputs")
  parser.add_argument("--no-plots", action="store_true")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  merged = merge([load(p) for p in args.parts], names=list(args.parts))
  os.makedirs(args.out, exist_ok=True)
  report_lib.finish(merged, args.out, plots=not args.no_plots)
  return merged


if __name__ == "__main__":
  main()
