"""Turns the results dict of `benchmarks/run.py` into a table, JSON, Markdown and PNGs.

`finish(results, out_dir)` adds the derived numbers (speed-up of jmoe over every
other implementation, targets vs measured) and writes `results.json`,
`report.md` and the plots (`speedup.png`, `tflops.png`, `memory.png`,
`profile.png`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from typing import Any

from benchmarks import cases as cases_lib
from benchmarks import grouping_cost

JMOE = "jmoe"
GIB = 2 ** 30
# Relative error bound of a bf16 computation against the dropless reference (the
# test suite's bound for bf16); rows over it are listed in the report.
REL_ERR_BOUND = 1e-2
# A row whose median time is this far above its fastest sample had most of its
# samples slowed by something besides the program (the host, the board's state):
# session 21's 1k-token forward had a median of 0.803 ms, a fastest sample of
# 0.611, and took 0.521 ms when timed again alone. Such rows are flagged, not
# dropped or re-timed.
NOISY_MEDIAN_OVER_MIN = 1.2


def _ok(rows: Iterable[dict]) -> list[dict]:
  return [r for r in rows if r.get("status") == "ok"]


def is_noisy(row: dict[str, Any]) -> bool:
  """Whether a timed row's median is over `NOISY_MEDIAN_OVER_MIN` x its fastest sample."""
  return bool(row.get("min_ms")) and (
      row["median_ms"] > NOISY_MEDIAN_OVER_MIN * row["min_ms"])


def noisy(results: dict[str, Any]) -> list[str]:
  """One line per measured row whose samples are too spread to trust its median."""
  return [f"{r['impl']} {r['case']} {r['mode']}: median {r['median_ms']:.4g} ms is "
          f"{r['median_ms'] / r['min_ms']:.2f}x its fastest sample ({r['min_ms']:.4g} ms; "
          f"over {NOISY_MEDIAN_OVER_MIN:g}x): noisy, time it again alone before trusting it"
          for r in _ok(results["results"]) if is_noisy(r)]


def add_speedups(results: dict[str, Any]) -> None:
  """Sets `jmoe_speedup = time(impl) / time(jmoe)` on every measured non-jmoe row."""
  jmoe_ms = {(r["case"], r["mode"]): r["median_ms"] for r in _ok(results["results"])
             if r["impl"] == JMOE}
  for r in _ok(results["results"]):
    base = jmoe_ms.get((r["case"], r["mode"]))
    if r["impl"] != JMOE and base:
      r["jmoe_speedup"] = r["median_ms"] / base


def best_other(results: dict[str, Any]) -> list[dict[str, Any]]:
  """For every (case, mode) where jmoe and at least one other implementation were
  timed: the fastest other one, its time, and `ratio = time(jmoe) / time(best)`
  (<= 1: jmoe at least as fast); `noisy`: either time is (`is_noisy`)."""
  ok = _ok(results["results"])
  jmoe_rows = {(r["case"], r["mode"]): r for r in ok if r["impl"] == JMOE}
  best: dict[tuple[str, str], dict] = {}
  for r in ok:
    key = (r["case"], r["mode"])
    if r["impl"] != JMOE and key in jmoe_rows and (
        key not in best or r["median_ms"] < best[key]["median_ms"]):
      best[key] = r
  order = [c["name"] for c in results["cases"]]
  return [{"case": c, "mode": m, "impl": r["impl"], "best_ms": r["median_ms"],
           "jmoe_ms": jmoe_rows[(c, m)]["median_ms"],
           "ratio": jmoe_rows[(c, m)]["median_ms"] / r["median_ms"],
           "noisy": is_noisy(r) or is_noisy(jmoe_rows[(c, m)]),
           "others": sorted(o["impl"] for o in ok
                            if (o["case"], o["mode"]) == (c, m) and o["impl"] != JMOE)}
          for (c, m), r in sorted(best.items(), key=lambda kv: (order.index(kv[0][0]),
                                                                 kv[0][1]))]


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
  """Target vs measured rows for the timing targets and the memory target.

  `ratio` is measured / target (<= 1 meets a time target); `met` is None where
  nothing was measured.
  """
  rows = []
  by_key = {(r["case"], r["impl"], r["mode"]): r for r in results["results"]}
  for case in results["cases"]:
    for mode, target in (case.get("target_ms") or {}).items():
      r = by_key.get((case["name"], JMOE, mode))
      measured = r.get("median_ms") if r and r.get("status") == "ok" else None
      rows.append({"what": f"{case['name']} {mode} time", "target": target,
                   "measured": measured, "unit": "ms",
                   "ratio": None if measured is None else measured / target,
                   "met": None if measured is None else measured <= target})
  versus = best_other(results)
  if versus:
    worst = max(versus, key=lambda v: v["ratio"])
    rows.append({
        "what": f"jmoe time / best other implementation's, worst of {len(versus)} "
                f"measured points ({worst['case']} {worst['mode']} vs {worst['impl']}"
                f"{'; noisy samples, see the notes' if worst['noisy'] else ''})",
        "target": 1.0, "measured": worst["ratio"], "unit": "x",
        "ratio": worst["ratio"], "met": worst["ratio"] <= 1.0})
  spec = cases_lib.MEMORY_TARGET
  if any(c["name"] == spec["case"] for c in results["cases"]):
    for source in ("memory_process", "memory_compiled"):
      impl_peak = _peak_bytes(results, spec["case"], spec["impl"], source)
      baseline, base_peak = next(
          ((b, p) for b in spec["baselines"]
           if (p := _peak_bytes(results, spec["case"], b, source)) is not None),
          (spec["baselines"][0], None))
      if impl_peak is None and base_peak is None:
        continue
      target = None if base_peak is None else spec["max_ratio"] * base_peak / GIB
      measured = None if impl_peak is None else impl_peak / GIB
      ok = target is not None and measured is not None
      rows.append({
          "what": f"{spec['case']} fwdbwd peak memory ({source.replace('_', ' ')}), "
                  f"<= {spec['max_ratio']:g} x {baseline}",
          "target": target, "measured": measured, "unit": "GiB",
          "ratio": measured / target if ok else None,
          "met": measured <= target if ok else None})
  return rows


def _peak_bytes(results, case: str, impl: str, source: str) -> float | None:
  if source == "memory_process":
    for r in results.get("memory_process", []):
      if (r["case"], r["impl"]) == (case, impl) and "peak_bytes" in r:
        return r["peak_bytes"]
    return None
  for r in results["results"]:
    if (r["case"], r["impl"], r["mode"]) == (case, impl, "fwdbwd") and r.get(
        "memory_compiled"):
      return r["memory_compiled"].get("peak")
  return None


# -- formatting ----------------------------------------------------------------------
def fmt(v, fmt: str = ".3g", none: str = "-") -> str:
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return none
  return format(v, fmt)


TABLE_COLUMNS = ("case", "mode", "impl", "ms", "tok/s", "TFLOP/s", "%peak",
                 "jmoe x", "mem GiB", "mJ/tok", "rel err")


def table_rows(results: dict[str, Any]) -> list[list[str]]:
  rows = []
  for r in results["results"]:
    if r["status"] != "ok":
      rows.append([r["case"], r["mode"], r["impl"], r["status"], "", "", "", "", "", "",
                   (r.get("reason") or "")[:60]])
      continue
    mem = (r.get("memory_compiled") or {}).get("peak")
    energy = r.get("energy_j_per_token")
    rows.append([
        r["case"], r["mode"], r["impl"], fmt(r["median_ms"], ".4g"),
        fmt(r["tokens_per_s"], ".3g"), fmt(r["tflops"], ".3g"),
        fmt(None if r.get("frac_dense_peak") is None else 100 * r["frac_dense_peak"],
            ".3g"),
        fmt(r.get("jmoe_speedup"), ".3g"),
        fmt(None if mem is None else mem / GIB, ".3g"),
        fmt(None if energy is None else energy * 1e3, ".3g"),
        fmt(r.get("rel_err_vs_oracle"), ".1e"),
    ])
  return rows


def print_table(results: dict[str, Any]) -> None:
  rows = table_rows(results)
  try:
    from rich.console import Console  # pylint: disable=import-outside-toplevel
    from rich.table import Table  # pylint: disable=import-outside-toplevel
  except ImportError:
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c)
              for i, c in enumerate(TABLE_COLUMNS)]
    print("  ".join(c.ljust(w) for c, w in zip(TABLE_COLUMNS, widths)))
    for r in rows:
      print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
    return
  table = Table(title="jmoe benchmark (median per call)")
  for c in TABLE_COLUMNS:
    table.add_column(c, justify="left" if c in ("case", "mode", "impl") else "right")
  for r in rows:
    table.add_row(*r)
  Console(width=160).print(table)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
  out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  out += ["| " + " | ".join(str(v).replace("|", "/") for v in r) + " |" for r in rows]
  return "\n".join(out)


def markdown(results: dict[str, Any], plots: list[str]) -> str:
  meta = results["meta"]
  peak = results.get("dense_peak") or {}
  t = results["timing"]
  lines = [
      f"# jmoe benchmark: {meta['device_kind']}",
      "",
      f"- Date (UTC): {meta['date']}; total {meta.get('total_s', 0):.0f} s",
      f"- Command: `{meta['command']}` (preset `{meta['preset']}`)",
      f"- Device: {meta['device_kind']} ({meta['platform']}, {meta['device_count']} "
      f"device(s))" + (f"; NVML: {meta['nvml']}" if meta.get("nvml") else ""),
      f"- Versions: Python {meta['python']}, "
      + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
      f"- Git: {meta.get('git_commit') or 'unknown'}"
      + (" (uncommitted changes)" if meta.get("git_dirty") else ""),
      f"- jmoe backend: `{meta['jmoe_backend']}`; environment: {meta.get('env') or {}}",
      *_parts_lines(meta),
      "",
      "## Method",
      "",
      f"- Time: median of {t['repeats']} samples after compilation and {t['warmup']} "
      f"warm-up call(s); each sample dispatches enough asynchronous calls to last "
      f">= {t['min_sample_s'] * 1e3:g} ms and ends with one `block_until_ready`.",
      "- fwd: `y, aux = moe(x, params)`. fwdbwd: `jax.value_and_grad` of "
      "`sum(y * dy) + 1e-2 * lb_loss + 1e-3 * z_loss` w.r.t. x and all parameters.",
      "- Useful FLOPs: `2*t*k*3*d*f` forward (SwiGLU: gate, up, down), 3x for fwd+bwd;"
      " router and padding not counted.",
      f"- Dense peak: `jnp.dot` of {peak.get('n', '?')}^3 {peak.get('dtype', '')} "
      f"measured in this run: {fmt(peak.get('tflops'), '.1f')} TFLOP/s "
      f"({fmt(peak.get('median_s', 0) * 1e3, '.3f')} ms). `%peak` = TFLOP/s over it.",
      "- Memory: `mem GiB` is XLA's compiled plan (`memory_analysis()`: arguments + "
      "outputs + temporaries - aliased; it does not see allocations inside custom "
      "calls); `fresh process` is `memory_stats()['peak_bytes_in_use']` after one "
      "fwd+bwd call in a new process (inputs included).",
      "- Energy (`mJ/tok`): a separate loop of back-to-back calls lasting >= "
      f"{results.get('settings', {}).get('energy_s', 0):g} s while a thread samples "
      "the "
      "board power through NVML every 5 ms (the instantaneous-power field where the "
      "driver has it, else the 1 s-average power); mean power x loop time / calls / "
      "tokens. Whole board, idle power included; only for the cases in "
      "`--energy-cases` (`results.json` keeps the source, samples and the NVML energy "
      "counter as a cross-check).",
      "- Compilation: ahead of time, all programs of a shape together "
      f"({results.get('settings', {}).get('compile_workers', 1)} at a time); the twin "
      "case with the other routing reuses them (so jmoe's autotuned tiles come from "
      "the first routing measured).",
      "- `rel err`: relative Frobenius error of y (fwd) or of the largest-error "
      "gradient (fwdbwd) against `ref-sorted`, for the dropless implementations.",
      "",
      "## Implementations",
      "",
      _md_table(["name", "what", "dropless", "status"], [
          [n, i["description"], "yes" if i["dropless"] else "no (capacity 1.25)",
           "ok" if i["available"] else f"skipped: {i['reason']}"]
          for n, i in results["impls"].items()]),
      "",
  ]
  tgt = targets(results)
  if tgt:
    lines += ["## Targets (jmoe)", "", _md_table(
        ["target", "goal", "measured", "measured / goal", "met"],
        [[r["what"], f"{fmt(r['target'], '.4g')} {r['unit']}",
          f"{fmt(r['measured'], '.4g')} {r['unit']}", fmt(r["ratio"], ".2f"),
          {True: "yes", False: "**MISSED**", None: "not measured"}[r["met"]]]
         for r in tgt]), ""]
  lines += ["## Results", "", _md_table(list(TABLE_COLUMNS), table_rows(results)), ""]
  lines += _dense_bound_section(results)
  lines += _grouping_cost_section(results)
  lines += _speedup_section(results)
  lines += _best_other_section(results)
  lines += _utilisation_section(results)
  lines += _memory_section(results)
  lines += _power_section(results)
  lines += _profile_section(results)
  if plots:
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
  notes = over_error_bound(results) + noisy(results) + results["notes"]
  if notes:
    lines += ["## Notes and skipped measurements", ""]
    lines += [f"- {n}" for n in notes] + [""]
  return "\n".join(lines)


def over_error_bound(results: dict[str, Any]) -> list[str]:
  """One line per measured row whose `rel err` exceeds `REL_ERR_BOUND`."""
  return [f"{r['impl']} {r['case']} {r['mode']}: rel err {r['rel_err_vs_oracle']:.1e} is "
          f"over the {REL_ERR_BOUND:g} bf16 bound (largest-error output or gradient "
          "against ref-sorted)"
          for r in _ok(results["results"])
          if (r.get("rel_err_vs_oracle") or 0.0) > REL_ERR_BOUND]


def _parts_lines(meta: dict[str, Any]) -> list[str]:
  """Header lines for a report joined from several runs (`benchmarks.merge`)."""
  parts = meta.get("parts") or []
  if len(parts) < 2:
    return []
  lines = [f"- Joined from {len(parts)} runs on this device (`python -m benchmarks.merge`;"
           " comparisons stay inside a run, `%peak` is against the run's own dense "
           "peak):"]
  for i, p in enumerate(parts, 1):
    lines.append(
        f"  {i}. `{p['command']}`: {p['date']}, {fmt(p.get('total_s'), '.0f')} s, "
        f"git {p.get('git_commit') or 'unknown'}, dense peak "
        f"{fmt(p.get('dense_peak_tflops'), '.1f')} TFLOP/s; cases "
        + ", ".join(p["cases"]))
  return lines


def dense_bound_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
  """Per case with a dense-GEMM bound (`benchmarks.dense_bound`) and mode:
  the dense GEMMs' summed ms beside the target and jmoe's measured time."""
  by_key = {(r["case"], r["impl"], r["mode"]): r for r in _ok(results["results"])}
  rows = []
  for case in results["cases"]:
    bound = case.get("dense_bound")
    if not bound:
      continue
    for mode in ("fwd", "fwdbwd"):
      jmoe = by_key.get((case["name"], JMOE, mode))
      target = (case.get("target_ms") or {}).get(mode)
      rows.append({"case": case["name"], "mode": mode, "dense_ms": bound[mode],
                   "target_ms": target,
                   "jmoe_ms": jmoe["median_ms"] if jmoe else None})
  return rows


def _dense_bound_section(results) -> list[str]:
  rows = dense_bound_rows(results)
  if not rows:
    return []
  ratio = grouping_cost.ratio
  return [
      "## Dense-GEMM bound", "",
      "The case's six GEMMs (up, down; dh, dx, dW_up, dW_down) as dense bf16 XLA "
      "dots of the same flops (`benchmarks/dense_bound.py`: no grouping, no padded or "
      "gathered rows, no activation, router or combine), timed like the rest, summed "
      "per mode: what an implementation would take if its grouped GEMMs ran at the "
      "device's dense library speed and everything else were free. `target / dense` "
      "is the time a target leaves per unit of that.", "",
      _md_table(["case", "mode", "dense GEMMs ms", "target ms", "target / dense",
                 "jmoe ms", "jmoe / dense"],
                [[r["case"], r["mode"], fmt(r["dense_ms"], ".4g"),
                  fmt(r["target_ms"], ".4g"), fmt(ratio(r["target_ms"], r["dense_ms"]),
                                                   ".2f"),
                  fmt(r["jmoe_ms"], ".4g"), fmt(ratio(r["jmoe_ms"], r["dense_ms"]), ".2f")]
                 for r in rows]), ""]


def grouping_cost_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
  """Per case with a grouping cost (`benchmarks.grouping_cost`) and forward
  GEMM: the grouped kernel's ms per group-size variant, the dense dot's ms
  (`dense_bound`) and the ratios that split the gap."""
  rows = []
  for case in results["cases"]:
    cost = case.get("grouping_cost")
    if not cost:
      continue
    dense = (case.get("dense_bound") or {}).get("gemms", {})
    for name, ms in cost["gemms"].items():
      rows.append({"case": case["name"], "gemm": name, "dense_ms": dense.get(name),
                   **{f"{v}_ms": ms.get(v) for v in grouping_cost.VARIANTS},
                   **grouping_cost.ratios(ms, dense.get(name)),
                   "padded_rows": cost["padded_rows"], "block_m": cost["block_m"]})
  return rows


def _grouping_cost_section(results) -> list[str]:
  rows = grouping_cost_rows(results)
  if not rows:
    return []
  return [
      "## What grouping costs (forward GEMMs)", "",
      "Each forward GEMM as `jmoe.grouped_matmul` (the plain grouped kernel on rows "
      "sorted by expert, pinned tiles; `benchmarks/grouping_cost.py`) with the case's routed group "
      "sizes, uniform ones (`rows / e` each) and one group, beside the dense XLA dot "
      "of the Dense-GEMM bound. `kernel` = one group / dense (the kernel against the "
      "library), `weights` = uniform / one group (streaming `e` weight matrices), "
      "`padding` = routed / uniform (the experts' part-empty last tiles), `total` = "
      "routed / dense. `padded rows`: rows the tiles compute beyond the routed ones.", "",
      _md_table(["case", "GEMM", "dense ms", "one group ms", "uniform ms", "routed ms",
                 "kernel", "weights", "padding", "total", "padded rows"],
                [[r["case"], r["gemm"], fmt(r["dense_ms"], ".4g"),
                  fmt(r["one_group_ms"], ".4g"), fmt(r["uniform_ms"], ".4g"),
                  fmt(r["routed_ms"], ".4g"), fmt(r["kernel"], ".3f"),
                  fmt(r["weights"], ".3f"), fmt(r["padding"], ".3f"),
                  fmt(r["total"], ".3f"),
                  f"{r['padded_rows']:.1%} ({r['block_m']}-row tiles)"]
                 for r in rows]), ""]


def _speedup_section(results) -> list[str]:
  rows = [r for r in _ok(results["results"]) if "jmoe_speedup" in r]
  if not rows:
    return []
  impls = sorted({r["impl"] for r in rows})
  keys = sorted({(r["case"], r["mode"]) for r in rows},
                key=lambda k: ([c["name"] for c in results["cases"]].index(k[0]), k[1]))
  by = {(r["case"], r["mode"], r["impl"]): r["jmoe_speedup"] for r in rows}
  return ["## Speed-up of jmoe (time of other / time of jmoe)", "", _md_table(
      ["case", "mode", *impls],
      [[c, m, *(fmt(by.get((c, m, i)), ".3g") for i in impls)] for c, m in keys]), ""]


def _best_other_section(results) -> list[str]:
  versus = best_other(results)
  if not versus:
    return []
  return ["## jmoe against the fastest other implementation, per point", "",
          "`ratio` = time(jmoe) / time(fastest other measured there); <= 1 means jmoe "
          "is at least as fast. `others` lists what was measured at that point "
          "(sweeps leave out `--sweep-skip-impls`).", "", _md_table(
              ["case", "mode", "fastest other", "its ms", "jmoe ms", "ratio", "others"],
              [[v["case"], v["mode"], v["impl"], fmt(v["best_ms"], ".4g"),
                fmt(v["jmoe_ms"], ".4g"),
                fmt(v["ratio"], ".3f") + (" (noisy)" if v["noisy"] else ""),
                ", ".join(v["others"])] for v in versus]), ""]


def _utilisation_section(results) -> list[str]:
  rows = []
  drop = {(r["case"], r["impl"]): r.get("dropped_fraction")
          for r in _ok(results["results"])
          if r["mode"] == "fwd" and not results["impls"][r["impl"]]["dropless"]}
  for c in results["cases"]:
    u = c.get("utilisation")
    if not u:
      continue
    drops = ", ".join(f"{i} {100 * v:.1f}%" for (cn, i), v in drop.items()
                      if cn == c["name"] and v is not None)
    rows.append([c["name"], c["routing"], fmt(u["max_over_mean"], ".2f"),
                 fmt(u["min_over_mean"], ".2f"), fmt(u["cv"], ".2f"),
                 str(int(u["empty_experts"])), drops or "-"])
  if not rows:
    return []
  return ["## Per-expert utilisation (routed copies / mean)", "", _md_table(
      ["case", "routing", "max/mean", "min/mean", "CV", "empty experts",
       "dropped by capacity"], rows),
      "", "Full per-expert counts are in `results.json` (`cases[].utilisation`).", ""]


def _memory_section(results) -> list[str]:
  rows = []
  for r in results["results"]:
    if r["mode"] != "fwdbwd" or r["status"] != "ok":
      continue
    m = r.get("memory_compiled") or {}
    proc = next((p for p in results.get("memory_process", [])
                 if (p["case"], p["impl"]) == (r["case"], r["impl"])), None)
    proc_s = "-"
    if proc:
      proc_s = (f"{proc['peak_bytes'] / GIB:.3g}" if "peak_bytes" in proc
                else proc.get("error", "-"))
    rows.append([r["case"], r["impl"], fmt(m.get("peak", 0) / GIB, ".3g"),
                 fmt(m.get("temp", 0) / GIB, ".3g"), proc_s])
  if not rows:
    return []
  return ["## Memory, fwd+bwd (GiB)", "", _md_table(
      ["case", "impl", "compiled plan peak", "of which temporaries",
       "fresh-process peak"],
      rows), ""]


def _power_section(results) -> list[str]:
  rows = []
  for r in _ok(results["results"]):
    e = r.get("energy") or {}
    c = e.get("clocks")
    if not c:
      continue
    rows.append([r["case"], r["mode"], r["impl"], fmt(e.get("mean_power_w"), ".0f"),
                 fmt(c.get("mean_sm_mhz"), ".0f"),
                 f"{fmt(c.get('min_sm_mhz'), '.0f')}-{fmt(c.get('max_sm_mhz'), '.0f')}",
                 fmt(100 * c.get("power_cap_share", float("nan")), ".0f"),
                 fmt(100 * c.get("thermal_share", float("nan")), ".0f")])
  if not rows:
    return []
  limit = (results["meta"].get("nvml") or {}).get("power_limit_w")
  return ["## Power and SM clock (energy loops)", "", _md_table(
      ["case", "mode", "impl", "mean W", "mean SM MHz", "SM MHz range",
       "power-capped %", "thermal %"], rows), "",
      f"Sampled with the energy loops (NVML, every 5 ms); board power limit "
      f"{fmt(limit, '.0f')} W. `power-capped %`: share of samples in which the "
      "driver gives the power cap (software power cap or power brake) as a reason "
      "for the SM clock. Where it is near 100 %, time per call follows energy per "
      "call: the clock drops until the board draws its limit.", ""]


def _profile_section(results) -> list[str]:
  prof = results.get("profile") or []
  if not prof:
    return []
  return ["## Per-stage profile (each stage its own jitted function)", "", _md_table(
      ["case", "impl", "stage", "fwd ms", "bwd ms"],
      [[p["case"], p["impl"], p["stage"], fmt(p["fwd_ms"], ".4g"),
        fmt(p["bwd_ms"], ".4g")]
       for p in prof]), ""] + [
      f"- {c['impl']} stages vs the fused op on {c['case']} (relative error): "
      + ", ".join(f"{k} {v:.1e}" for k, v in c.items() if k not in ("case", "impl"))
      for c in results.get("profile_checks", [])] + [""]


# -- plots -----------------------------------------------------------------------------
def write_plots(results: dict[str, Any], out_dir: str) -> list[str]:
  """Writes the PNGs; returns their file names (relative to `out_dir`)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  written = []
  ok = _ok(results["results"])
  impls = list(results["impls"])
  modes = [m for m in cases_lib.MODES if any(r["mode"] == m for r in ok)]
  case_names = [c["name"] for c in results["cases"]]
  title = results["meta"]["device_kind"]

  def save(fig, name):
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    plt.close(fig)
    written.append(name)

  # 1. Speed-up of jmoe per configuration (main + skewed, else every case).
  shown = [c for c in case_names if not c.startswith("sweep")] or case_names
  fig, axes = plt.subplots(1, max(1, len(modes)), figsize=(6 * max(1, len(modes)), 4),
                           squeeze=False)
  others = [i for i in impls if i != JMOE and any(
      r["impl"] == i and "jmoe_speedup" in r for r in ok)]
  for ax, mode in zip(axes[0], modes or ["fwd"]):
    width = 0.8 / max(1, len(others))
    for j, impl in enumerate(others):
      vals = [next((r.get("jmoe_speedup", math.nan) for r in ok if r["case"] == c
                    and r["mode"] == mode and r["impl"] == impl), math.nan)
              for c in shown]
      ax.bar([i + j * width for i in range(len(shown))], vals, width, label=impl)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shown))])
    ax.set_xticklabels(shown, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("time(other) / time(jmoe), log scale")
    ax.set_title(f"jmoe speed-up, {mode}")
    ax.set_yscale("log")
    if others:
      ax.legend(fontsize=7)
    else:
      ax.text(0.5, 0.5, "no jmoe timings to compare", transform=ax.transAxes,
              ha="center")
  fig.suptitle(title, fontsize=9)
  save(fig, "speedup.png")

  # 2. TFLOP/s across the E sweep (else across all cases).
  sweep = [c for c in results["cases"] if c["group"] == "sweep-e"]
  fig, axes = plt.subplots(1, max(1, len(modes)), figsize=(6 * max(1, len(modes)), 4),
                           squeeze=False)
  for ax, mode in zip(axes[0], modes or ["fwd"]):
    xs_cases = sweep or results["cases"]
    for impl in impls:
      pts = [(c, next((r["tflops"] for r in ok if r["case"] == c["name"]
                       and r["mode"] == mode and r["impl"] == impl), None))
             for c in xs_cases]
      pts = [(c, v) for c, v in pts if v is not None]
      if not pts:
        continue
      if sweep:
        ax.plot([c["experts"] for c, _ in pts], [v for _, v in pts], "o-", label=impl)
      else:
        ax.plot([case_names.index(c["name"]) for c, _ in pts], [v for _, v in pts],
                "o-", label=impl)
    peak = (results.get("dense_peak") or {}).get("tflops")
    if peak:
      ax.axhline(peak, color="k", ls="--", lw=0.8, label="dense jnp.dot")
    if sweep:
      ax.set_xscale("log", base=2)
      c0 = sweep[0]
      ax.set_xlabel(f"experts E (t={c0['tokens']} d={c0['d_model']} f={c0['d_ff']} "
                    f"k={c0['top_k']})")
    else:
      ax.set_xticks(range(len(case_names)))
      ax.set_xticklabels(case_names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("useful TFLOP/s")
    ax.set_title(f"TFLOP/s, {mode}" + ("" if sweep else " (no E sweep in this run)"))
    ax.legend(fontsize=7)
  fig.suptitle(title, fontsize=9)
  save(fig, "tflops.png")

  # 3. Peak memory of fwd+bwd.
  fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(shown)), 4))
  width = 0.8 / max(1, len(impls))
  for j, impl in enumerate(impls):
    vals = []
    for c in shown:
      proc = _peak_bytes(results, c, impl, "memory_process")
      comp = _peak_bytes(results, c, impl, "memory_compiled")
      vals.append((proc or comp or math.nan) / GIB)
    ax.bar([i + j * width for i in range(len(shown))], vals, width, label=impl)
  ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shown))])
  ax.set_xticklabels(shown, rotation=30, ha="right", fontsize=8)
  ax.set_ylabel("GiB (fresh-process peak where measured, else compiled plan)")
  ax.set_title("fwd+bwd peak device memory")
  ax.legend(fontsize=7)
  save(fig, "memory.png")

  # 4. Per-stage profile: one panel per (case, impl), fwd and bwd stacked by stage.
  prof = results.get("profile") or []
  if prof:
    groups = list(dict.fromkeys((p["case"], p["impl"]) for p in prof))
    stages = list(dict.fromkeys(p["stage"] for p in prof))
    fig, axes = plt.subplots(1, len(groups), figsize=(2.6 * len(groups) + 1.5, 4),
                             squeeze=False)
    for ax, group in zip(axes[0], groups):
      for x, part in enumerate(("fwd_ms", "bwd_ms")):
        bottom = 0.0
        for k, stage in enumerate(stages):
          v = next((p[part] or 0.0 for p in prof if (p["case"], p["impl"]) == group
                    and p["stage"] == stage), 0.0)
          ax.bar(x, v, 0.7, bottom=bottom, color=f"C{k}",
                 label=stage if x == 0 else None)
          bottom += v
      ax.set_xticks([0, 1])
      ax.set_xticklabels(["fwd", "bwd"])
      ax.set_title(f"{group[0]}\n{group[1]}", fontsize=8)
    axes[0][0].set_ylabel("ms per stage (stacked)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"per-stage time, {title}", fontsize=9)
    save(fig, "profile.png")
  return written


def _jsonable(obj):
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  if isinstance(obj, dict):
    return {k: _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  return obj


def finish(results: dict[str, Any], out_dir: str, *, plots: bool = True) -> None:
  """Adds derived numbers, prints the table and writes every output file."""
  add_speedups(results)
  results["targets"] = targets(results)
  print()
  print_table(results)
  written = write_plots(results, out_dir) if plots else []
  with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
    json.dump(_jsonable(results), f, indent=1)
  with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
    f.write(markdown(results, written))
  for line in over_error_bound(results):
    print("ACCURACY: " + line)
  for line in noisy(results):
    print("NOISY: " + line)
  for r in results["targets"]:
    if r["met"] is False:
      print(f"MISSED target: {r['what']}: goal {fmt(r['target'], '.4g')} {r['unit']}, "
            f"measured {fmt(r['measured'], '.4g')} {r['unit']} "
            f"(ratio {fmt(r['ratio'], '.2f')})")
  print(f"\nwrote {out_dir}/results.json, report.md"
        + (", " + ", ".join(written) if written else ""))
