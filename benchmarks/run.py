"""The jmoe benchmark: `python -m benchmarks.run` (one command, sensible defaults).

On a CPU it runs the tiny configurations (reference forms vs jmoe under Triton's
interpreter) in about a minute; on a CUDA GPU the full set (`--preset gpu-full`:
the three main configurations, their skewed-routing twins, and the E, top_k and
token sweeps). Either way it prints a table and writes, under the results
directory (default `benchmarks/results/<device-slug>/`):

  results.json  every number, with device, versions, date and the exact command
  report.md     tables, targets vs measured, memory, profile, what was skipped
  *.png         speed-up per configuration, TFLOP/s across the E sweep, memory,
                per-stage profile

Examples::

  python -m benchmarks.run                                  # CPU: tiny; GPU: full
  python -m benchmarks.run --gpu-full --out /tmp/bench      # the lead's full H100 run
  python -m benchmarks.run --cases main --impls jmoe,ref-sorted --modes fwd
  python -m benchmarks.run --list                           # cases, groups, impls

See `benchmarks/cases.py` (configurations), `implementations.py` (what is
compared), `timing.py` (how), `memory.py`, `profile.py` and `report.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.metadata
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from typing import Any

# Memory is allocated on demand (not 75% up front) so that the fresh-process memory
# probes (`benchmarks/memory.py`) can run beside this process. Set before jax starts.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import cases as cases_lib  # noqa: E402
from benchmarks import dense_bound as bound_lib  # noqa: E402
from benchmarks import grouping_cost as grouping_lib  # noqa: E402
from benchmarks import implementations as impls_lib  # noqa: E402
from benchmarks import memory as memory_lib  # noqa: E402
from benchmarks import stage_profile as profile_lib  # noqa: E402
from benchmarks import report as report_lib  # noqa: E402
from benchmarks import timing as timing_lib  # noqa: E402
from jmoe._env import env_overrides  # noqa: E402
from jmoe.ops.grouped_matmul import block_m_for as gmm_block_m  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EINSUM_IMPLS = ("ref-einsum", "ref-einsum-bf16")
# Cases whose GEMMs are also timed as dense dots (`Runner.dense_bound`) and as
# grouped GEMMs with other group sizes (`Runner.grouping_cost`): those with
# targets, and the CPU's tiny ones (so the path runs there too).
DENSE_BOUND_GROUPS = ("main", "cpu")
GIB = report_lib.GIB
# The staged jmoe profile launches the fused op's kernels; beyond this relative
# difference (autotuning may pick other tiles, changing rounding) it is flagged.
PROFILE_CHECK_TOLERANCE = 1e-2
PROFILED = ("jmoe", "ref-sorted")


@dataclasses.dataclass
class Preset:
  """Defaults of one kind of run; command-line flags override each field."""

  cases: str
  impls: str = "jmoe,ref-einsum,ref-einsum-bf16,ref-sorted,tokamax"
  modes: str = "fwd,fwdbwd"
  repeats: int = 5
  warmup: int = 1
  min_sample_s: float = 0.02
  dense_n: int = 8192
  profile_cases: str = "main"
  profile_impls: str = "jmoe,ref-sorted"
  memory_process_cases: str = ""
  # Implementations left out of the sweep groups. The sweeps compare jmoe with the
  # fastest others (the bf16 one-hot einsums and tokamax); the float32 HIGHEST
  # one-hot oracle and the lax.ragged_dot form are slower than those at every main
  # case on the H100 (3-60x), so they cannot be the fastest other at a sweep point,
  # and XLA takes 5-35 s to compile each of their programs (GEMM autotuning).
  sweep_skip_impls: str = "ref-einsum,ref-sorted"
  # jmoe on sweeps: autotuned kernels ("on") or the pinned default tiles ("off",
  # JMOE_AUTOTUNE=0: no candidate compiles and timing runs per shape).
  sweep_autotune: str = "off"
  einsum_max_elements: int = 2 ** 31
  ragged_dot_vjp_max_bytes: int = 8 * 2 ** 30
  energy_s: float = 0.5
  energy_cases: str = "main,skewed"
  compile_workers: int = 8
  budget_s: float = 420.0


PRESETS = {
    "cpu": Preset(cases="cpu", repeats=3, min_sample_s=0.01, dense_n=512,
                  profile_cases="tiny", sweep_skip_impls="", energy_s=0.0,
                  energy_cases="", compile_workers=2, budget_s=150.0),
    "gpu-quick": Preset(cases="main", budget_s=240.0),
    # ~13 minutes on the H100 in one process; split by --cases and joined by
    # `benchmarks.merge` where a machine is lent in shorter calls.
    "gpu-full": Preset(cases="all-gpu", budget_s=1800.0),
}


def device_slug(device) -> str:
  kind = device.device_kind if device.platform != "cpu" else "cpu"
  return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or device.platform


def _version(dist: str) -> str | None:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def _git(*args) -> str | None:
  try:
    out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=10, check=True)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip()


def environment(argv: list[str], preset: str) -> dict[str, Any]:
  """Device, versions, date, command and git state of this run."""
  device = jax.devices()[0]
  dists = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "triton",
           "jax-triton", "flax", "numpy", "tokamax", "nvidia-ml-py")
  status = _git("status", "--porcelain", "--untracked-files=no")
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "command": "python -m benchmarks.run " + shlex.join(argv),
      "preset": preset,
      "platform": device.platform,
      "device_kind": device.device_kind,
      "device_count": jax.device_count(),
      "slug": device_slug(device),
      "nvml": timing_lib.nvml_info(),
      "host": platform.node(),
      "cpu_count": os.cpu_count(),
      "python": platform.python_version(),
      "versions": {d: v for d in dists if (v := _version(d)) is not None},
      # A copy without .git, or with a stale one (the device machine's), names
      # its commit in JMOE_GIT_COMMIT.
      "git_commit": os.environ.get("JMOE_GIT_COMMIT") or _git("rev-parse", "HEAD"),
      # Unknown (None) where the commit is named: that copy's git status is stale.
      "git_dirty": (None if status is None or os.environ.get("JMOE_GIT_COMMIT")
                    else bool(status)),
      "jmoe_backend": impls_lib.jmoe_backend(),
      "env": {k: v for k, v in os.environ.items()
              if k.startswith("JMOE_") or k in ("XLA_PYTHON_CLIENT_PREALLOCATE",
                                                "XLA_FLAGS")},
  }


def _short(e: BaseException) -> str:
  msg = str(e).strip().splitlines()
  return f"{type(e).__name__}: {msg[0][:300] if msg else ''}"


class Runner:
  """Runs the selected measurements and collects the results dict."""

  def __init__(self, args, env: dict[str, Any]):
    self.args = args
    self.start = time.perf_counter()
    self.time_kwargs = dict(repeats=args.repeats, warmup=args.warmup,
                            min_sample_s=args.min_sample_s)
    self.results: dict[str, Any] = {
        "meta": env, "timing": dict(self.time_kwargs), "dense_peak": None,
        "impls": {}, "cases": [], "results": [], "profile": [], "profile_checks": [],
        "memory_process": [], "notes": [],
    }
    self.energy_cases = {c.name for c in cases_lib.select(_split(args.energy_cases))}
    self._reuse: dict[tuple, list] = {}  # shape_key -> result rows
    self._compiled: dict[tuple, Any] = {}  # (compile_key, impl, mode, pinned) -> step
    self._compiled_from: dict[tuple, str] = {}

  # -- bookkeeping ---------------------------------------------------------------
  def note(self, text: str) -> None:
    print(f"note: {text}", flush=True)
    self.results["notes"].append(text)

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def over_budget(self, what: str) -> bool:
    if self.args.budget_s and self.elapsed() > self.args.budget_s:
      self.note(f"skipped {what}: time budget of {self.args.budget_s:.0f} s spent "
                f"({self.elapsed():.0f} s elapsed)")
      return True
    return False

  # -- phases --------------------------------------------------------------------
  def check_impls(self, names: list[str]) -> list[str]:
    usable = []
    for name in names:
      impl = impls_lib.IMPLS[name]
      reason = impl.unavailable()
      self.results["impls"][name] = {"description": impl.description,
                                     "dropless": impl.dropless,
                                     "available": reason is None, "reason": reason}
      if name == "jmoe":
        self.results["impls"][name]["backend"] = impls_lib.jmoe_backend()
        if reason is None and impls_lib.jmoe_backend() == "interpret":
          self.note("jmoe runs under Triton's interpreter here (Python, one program at "
                    "a time): its times check the path, they say nothing of kernel "
                    "speed; 1 sample, no warm-up")
      if reason is None:
        usable.append(name)
      else:
        self.note(f"{name} skipped: {reason}")
    return usable

  def dense_peak(self) -> None:
    n = self.args.dense_n
    peak = timing_lib.dense_peak(n, **self.time_kwargs)
    self.results["dense_peak"] = peak
    print(f"dense {n}^3 bf16 jnp.dot: {peak['median_s'] * 1e3:.3f} ms = "
          f"{peak['tflops']:.1f} TFLOP/s", flush=True)

  def dense_bound(self, case) -> dict[str, Any]:
    """The case's six GEMMs as dense bf16 XLA dots (`benchmarks.dense_bound`),
    timed like the implementations: `{"gemms": {name: ms}, "fwd": ms,
    "fwdbwd": ms}` (the sums of the mode's GEMMs)."""
    gemms = bound_lib.ffn_gemms(case.tokens, case.d_model, case.d_ff, case.experts,
                                case.top_k, case.gated)
    ms = {}
    for gemm in gemms:
      fn, args = bound_lib.dense_program(gemm, jnp.dtype(case.dtype))
      ms[gemm.name] = timing_lib.time_fn(fn, *args, **self.time_kwargs).median_s * 1e3
    sums = bound_lib.phase_sums(ms, gemms)
    print(f"  dense GEMMs of the shape: fwd {sums['fwd']:.3f} ms, fwd+bwd "
          f"{sums['fwd+bwd']:.3f} ms ({', '.join(f'{k} {v:.3f}' for k, v in ms.items())})",
          flush=True)
    return {"gemms": ms, "fwd": sums["fwd"], "fwdbwd": sums["fwd+bwd"]}

  def grouping_cost(self, case, counts) -> dict[str, Any]:
    """The case's forward GEMMs as `jmoe.grouped_matmul` with the routed,
    uniform and one-group sizes (`benchmarks.grouping_cost`), timed like the
    implementations, with jmoe's pinned tiles (`JMOE_AUTOTUNE=0`: the same
    config for the three variants, and no autotuning time):
    `{"gemms": {name: {variant: ms}}, "padded_rows": fraction, "block_m": rows
    per tile}`."""
    backend = impls_lib.jmoe_backend()
    gemms = [g for g in bound_lib.ffn_gemms(case.tokens, case.d_model, case.d_ff,
                                            case.experts, case.top_k, case.gated)
             if g.phase == "fwd"]
    kwargs = self._time_kwargs("jmoe")
    out = {gemm.name: {} for gemm in gemms}
    with env_overrides({"JMOE_AUTOTUNE": "0"}):
      for gemm in gemms:
        for variant in grouping_lib.VARIANTS:
          sizes = grouping_lib.group_sizes(counts, variant)
          fn, args = grouping_lib.grouped_program(gemm, sizes, jnp.dtype(case.dtype),
                                                  backend)
          out[gemm.name][variant] = timing_lib.time_fn(fn, *args, **kwargs).median_s * 1e3
    block_m = gmm_block_m(sum(counts), len(counts), backend)
    print("  grouped GEMMs (routed / uniform / one group): " + ", ".join(
        f"{name} " + " / ".join(f"{v:.3f}" for v in ms.values()) for name, ms in out.items())
          + " ms", flush=True)
    return {"gemms": out, "block_m": block_m,
            "padded_rows": grouping_lib.padded_rows(counts, block_m)}

  def memory_probes(self, case_list, impls: list[str]) -> None:
    for case in case_list:
      for name in impls:
        if self.over_budget(f"memory probe {case.name}/{name}"):
          return
        if self._einsum_too_big(case, name):
          continue
        res = memory_lib.process_peak(case.name, name, "fwdbwd", seed=self.args.seed)
        res.update(case=case.name, impl=name, mode="fwdbwd")
        self.results["memory_process"].append(res)
        shown = (f"{res['peak_bytes'] / GIB:.2f} GiB" if "peak_bytes" in res
                 else res["error"])
        print(f"memory (fresh process) {case.name} {name} fwdbwd: {shown}", flush=True)

  def _einsum_too_big(self, case, impl: str) -> bool:
    return (impl in EINSUM_IMPLS
            and case.einsum_dispatch_elements() > self.args.einsum_max_elements)

  def _skip_reason(self, case, impl: str, mode: str) -> str | None:
    if (impl == "ref-sorted" and mode == "fwdbwd"
        and case.ragged_dot_vjp_bytes() > self.args.ragged_dot_vjp_max_bytes):
      limit = self.args.ragged_dot_vjp_max_bytes / GIB
      return (f"lax.ragged_dot's VJP would materialise "
              f"{case.ragged_dot_vjp_bytes() / GIB:.0f} GiB > "
              f"--ragged-dot-vjp-max-bytes {limit:.0f} GiB (out of memory on the H100 "
              "at deepseek)")
    if self._einsum_too_big(case, impl):
      return (f"[t, e, c] one-hot dispatch has {case.einsum_dispatch_elements():.3g} "
              f"elements > --einsum-max-elements {self.args.einsum_max_elements:.3g}")
    if case.group.startswith("sweep") and impl in self.args.sweep_skip_impls:
      return "left out of sweeps (--sweep-skip-impls)"
    return None

  def _jmoe_pinned(self, case) -> bool:
    """Whether jmoe runs with pinned tiles (JMOE_AUTOTUNE=0) on this case."""
    if os.environ.get("JMOE_AUTOTUNE", "1").strip() in ("0", "false", "False"):
      return True
    return case.group.startswith("sweep") and self.args.sweep_autotune == "off"

  def run_case(self, case, impls: list[str], modes: list[str]) -> None:
    case_row = {"name": case.name, "group": case.group, "describe": case.describe(),
                **{k: getattr(case, k) for k in ("tokens", "d_model", "d_ff", "experts",
                                                 "top_k", "routing", "zipf", "dtype",
                                                 "activation")},
                "flops_fwd": case.flops("fwd"), "target_ms": dict(case.target_ms or {}),
                "einsum_capacity": case.capacity(), "utilisation": None}
    self.results["cases"].append(case_row)
    print(f"\n== [{self.elapsed():.0f} s] {case.name}: {case.describe()}", flush=True)
    cached = self._reuse.get(case.shape_key)
    if cached:
      self.note(f"{case.name} has the shape and routing of {cached[0]['case']}: its "
                "results are reused")
      src = next(c for c in self.results["cases"] if c["name"] == cached[0]["case"])
      case_row["utilisation"] = src["utilisation"]
      for key in ("dense_bound", "grouping_cost"):
        if key in src:
          case_row[key] = src[key]
      self.results["results"].extend(
          {**r, "case": case.name, "reused_from": r["case"]} for r in cached)
      return
    if case.group in DENSE_BOUND_GROUPS:
      case_row["dense_bound"] = self.dense_bound(case)
    x, params = cases_lib.make_inputs(case, self.args.seed)
    dy = impls_lib.make_cotangent(case, self.args.seed + 1)
    pinned = self._jmoe_pinned(case)
    rows, jobs = [], []
    for name in sorted(impls, key=lambda n: n != impls_lib.ORACLE):  # oracle first
      for mode in modes:
        row = {"case": case.name, "impl": name, "mode": mode, "status": "ok"}
        if name == "jmoe":
          row["jmoe_autotune"] = not pinned and impls_lib.jmoe_backend() == "triton"
        rows.append(row)
        reason = self._skip_reason(case, name, mode)
        if reason:
          row.update(status="skipped", reason=reason)
        else:
          jobs.append(row)
    compiled = self._compile(case, jobs, x, params, dy, pinned)
    oracle_out: dict[str, Any] = {}
    for row in jobs:
      name, mode = row["impl"], row["mode"]
      try:
        step = compiled[(name, mode)]
        if isinstance(step, Exception):
          raise step
        self._measure(case, step, row, x, params, dy, oracle_out, case_row)
      except Exception as e:  # noqa: BLE001  (recorded, shown, never hidden)
        row.update(status="error", reason=_short(e))
      gc.collect()
      if row["status"] == "ok":
        shown = (f"{row['median_ms']:.3f} ms (compile {row['compile_s']:.1f} s, first "
                 f"call {row['first_call_s']:.1f} s)")
      else:
        shown = f"{row['status']}: {row.get('reason')}"
      print(f"  {name:16s} {mode:7s} {shown}", flush=True)
    for row in rows:
      if row["status"] == "skipped":
        print(f"  {row['impl']:16s} {row['mode']:7s} skipped: {row['reason']}")
    del x, params, dy, oracle_out
    gc.collect()
    if case.group in DENSE_BOUND_GROUPS and case_row["utilisation"]:
      try:
        case_row["grouping_cost"] = self.grouping_cost(
            case, case_row["utilisation"]["tokens_per_expert"])
      except Exception as e:  # noqa: BLE001  (recorded, shown, never hidden)
        self.note(f"{case.name}: grouping cost not measured: {_short(e)}")
      gc.collect()
    self.results["results"].extend(rows)
    self._reuse[case.shape_key] = rows

  def _compile(self, case, jobs, x, params, dy, pinned) -> dict[tuple, Any]:
    """Compiled steps for the jobs' (impl, mode), `compile_workers` at a time.

    Steps are kept by shape: the twin with other routing reuses them.
    """
    out, todo = {}, []
    for row in jobs:
      key = (case.compile_key, row["impl"], row["mode"], pinned)
      if key in self._compiled:
        out[(row["impl"], row["mode"])] = self._compiled[key]
        row["compile_s"] = 0.0
        row["compiled_with"] = self._compiled_from[key]
        continue
      forward = impls_lib.IMPLS[row["impl"]].make(case)
      step, _ = impls_lib.make_step(forward, row["mode"])
      args = (x, params) if row["mode"] == "fwd" else (x, params, dy)
      todo.append((key, row, (step, args)))
    # JMOE_AUTOTUNE is read by jmoe.ops when tracing.
    with env_overrides({"JMOE_AUTOTUNE": "0"} if pinned else {}):
      results = timing_lib.compile_all([job for _, _, job in todo],
                                       self.args.compile_workers)
    for (key, row, _), (compiled, seconds) in zip(todo, results):
      row["compile_s"] = seconds
      out[(row["impl"], row["mode"])] = compiled
      if not isinstance(compiled, Exception):
        self._compiled[key] = compiled
        self._compiled_from[key] = case.name
    return out

  def _time_kwargs(self, impl: str) -> dict[str, Any]:
    if impl == "jmoe" and impls_lib.jmoe_backend() == "interpret":
      return dict(self.time_kwargs, repeats=1, warmup=0)
    return self.time_kwargs

  def _measure(self, case, step, row, x, params, dy, oracle_out, case_row):
    name, mode = row["impl"], row["mode"]
    args = (x, params) if mode == "fwd" else (x, params, dy)
    row["memory_compiled"] = memory_lib.compiled_stats(step)

    def check(out):
      for a in jax.tree.leaves(out):
        if jnp.issubdtype(a.dtype, jnp.floating) and not bool(jnp.all(jnp.isfinite(a))):
          raise FloatingPointError("non-finite values in the output")
      if mode == "fwd":
        y, aux = out
        tpe = np.asarray(aux.tokens_per_expert)
        row["dropped_fraction"] = float(aux.dropped_fraction)
        row["tokens_per_expert"] = tpe.tolist()
        if impls_lib.IMPLS[name].dropless and case_row["utilisation"] is None:
          case_row["utilisation"] = {"tokens_per_expert": tpe.tolist(),
                                     **cases_lib.expert_load(tpe)}
        compare = y
      else:
        compare = out[1]
      if name == impls_lib.ORACLE:
        oracle_out[mode] = compare
      elif impls_lib.IMPLS[name].dropless and mode in oracle_out:
        row["rel_err_vs_oracle"] = impls_lib.rel_err(compare, oracle_out[mode])

    t = timing_lib.time_fn(step, *args, on_first=check, **self._time_kwargs(name))
    row.update(
        median_ms=t.median_s * 1e3, min_ms=t.min_s * 1e3, max_ms=t.max_s * 1e3,
        spread=t.spread, repeats=len(t.samples_s), calls_per_sample=t.calls_per_sample,
        first_call_s=t.first_call_s, tokens_per_s=case.tokens / t.median_s,
        tflops=case.flops(mode) / t.median_s / 1e12,
    )
    peak = self.results["dense_peak"]
    if peak:
      row["frac_dense_peak"] = row["tflops"] / peak["tflops"]
    if self.args.energy_s > 0 and case.name in self.energy_cases:
      energy = timing_lib.measure_energy(step, *args, call_s=t.median_s,
                                         duration_s=self.args.energy_s)
      if energy is not None:
        row["energy"] = energy
        row["energy_j_per_token"] = energy["energy_j_per_call"] / case.tokens

  def profile(self, case_list) -> None:
    for case in case_list:
      if self.over_budget(f"profile of {case.name}"):
        return
      print(f"-- [{self.elapsed():.0f} s] per-stage profile of {case.name}", flush=True)
      x, params = cases_lib.make_inputs(case, self.args.seed)
      builders = []
      if "jmoe" in self.args.profile_impls:
        if self.results["impls"].get("jmoe", {}).get("available", False):
          builders.append(("jmoe", lambda: profile_lib.jmoe_stages(
              case, x, params, impls_lib.jmoe_backend())))
        else:
          self.note(f"profile of jmoe on {case.name} skipped: jmoe not available or "
                    "not selected")
      if "ref-sorted" in self.args.profile_impls:
        no_bwd = case.ragged_dot_vjp_bytes() > self.args.ragged_dot_vjp_max_bytes
        if no_bwd:
          self.note(f"profile of ref-sorted on {case.name}: no backward "
                    f"({self._skip_reason(case, 'ref-sorted', 'fwdbwd')})")
        builders.append(("ref-sorted", lambda: profile_lib.reference_stages(
            case, x, params, with_bwd=not no_bwd)))
      for name, build in builders:
        try:
          stages, checks = build()
          rows = profile_lib.profile(stages, workers=self.args.compile_workers,
                                     **self._time_kwargs(name))
        except Exception as e:  # noqa: BLE001
          self.note(f"profile of {name} on {case.name} skipped: {_short(e)}")
          continue
        if checks:
          self.results["profile_checks"].append({"case": case.name, "impl": name,
                                                 **checks})
          worst = max(checks.values())
          if not worst <= PROFILE_CHECK_TOLERANCE:
            self.note(f"profile of {name} on {case.name}: the stages differ from the "
                      f"fused op by {worst:.2e} (relative): {checks}")
        for r in rows:
          for part in ("fwd", "bwd"):
            if r.get(f"{part}_error"):
              self.note(f"profile of {name} on {case.name}, {r['stage']} {part}: "
                        f"{r[f'{part}_error']}")
          row = {"case": case.name, "impl": name, "stage": r["stage"],
                 **{f"{p}_ms": None if r[f"{p}_s"] is None else r[f"{p}_s"] * 1e3
                    for p in ("fwd", "bwd")}}
          self.results["profile"].append(row)
          print(f"  profile {case.name} {name:10s} {r['stage']:22s} fwd "
                f"{report_lib.fmt(row['fwd_ms'], '9.3f')} ms  bwd "
                f"{report_lib.fmt(row['bwd_ms'], '9.3f')} ms", flush=True)
      del x, params
      gc.collect()


def _split(s: str) -> list[str]:
  return [p.strip() for p in s.split(",") if p.strip()]


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.run", description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="Defaults come from the preset (cpu on a CPU, gpu-full on a GPU).")
  parser.add_argument("--preset", choices=sorted(PRESETS),
                      help="defaults for the run (default: by platform)")
  parser.add_argument("--gpu-full", action="store_true", help="= --preset gpu-full")
  parser.add_argument("--cases", help="comma-separated case and group names")
  parser.add_argument("--impls",
                      help=f"comma-separated, from {sorted(impls_lib.IMPLS)}")
  parser.add_argument("--modes", help="comma-separated, from fwd,fwdbwd")
  parser.add_argument("--repeats", type=int, help="timed samples (median reported)")
  parser.add_argument("--warmup", type=int, help="untimed calls after compiling")
  parser.add_argument("--min-sample-s", type=float,
                      help="each sample runs calls for at least this long")
  parser.add_argument("--dense-n", type=int, help="size of the dense peak matmul")
  parser.add_argument("--profile-cases", help="cases to profile per stage ('' = none)")
  parser.add_argument("--profile-impls",
                      help="implementations profiled per stage (jmoe, ref-sorted)")
  parser.add_argument("--memory-process-cases",
                      help="cases whose fwd+bwd peak memory is also measured in fresh "
                           "processes ('' = none; GPU only)")
  parser.add_argument("--sweep-skip-impls", help="implementations left out of sweeps")
  parser.add_argument("--sweep-autotune", choices=("on", "off"),
                      help="jmoe on sweeps: autotuned, or pinned tiles "
                           "(JMOE_AUTOTUNE=0)")
  parser.add_argument("--energy-s", type=float,
                      help="seconds of back-to-back calls per energy measurement "
                           "(0: none)")
  parser.add_argument("--energy-cases", help="cases whose energy is measured")
  parser.add_argument("--compile-workers", type=int,
                      help="compilations run in parallel (1: one at a time, XLA's GEMM "
                           "autotuning undisturbed)")
  parser.add_argument("--einsum-max-elements", type=float,
                      help="skip one-hot einsum forms whose [t, e, c] tensor is larger")
  parser.add_argument("--ragged-dot-vjp-max-bytes", type=float,
                      help="skip ref-sorted fwd+bwd where lax.ragged_dot's VJP would "
                           "materialise a larger float32 buffer")
  parser.add_argument("--budget-s", type=float,
                      help="stop starting new measurements after this many seconds")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no-plots", action="store_true")
  parser.add_argument("--out", help="results directory "
                      "(default benchmarks/results/<device-slug>/)")
  parser.add_argument("--list", action="store_true", help="list cases and impls, exit")
  args = parser.parse_args(argv)
  if args.gpu_full:
    if args.preset not in (None, "gpu-full"):
      parser.error("--gpu-full contradicts --preset " + args.preset)
    args.preset = "gpu-full"
  return parser, args


def main(argv: list[str] | None = None) -> dict[str, Any]:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser, args = parse_args(argv)
  if args.list:
    for name, case in cases_lib.CASES.items():
      print(f"{name:18s} {case.group:13s} {case.describe()}")
    print("groups:", ", ".join(sorted(cases_lib.GROUPS)))
    for impl in impls_lib.IMPLS.values():
      print(f"{impl.name:16s} {impl.description}")
    return {}
  preset_name = args.preset or ("gpu-full" if impls_lib.on_gpu() else "cpu")
  preset = PRESETS[preset_name]
  for field in dataclasses.fields(Preset):
    if getattr(args, field.name, None) is None:
      setattr(args, field.name, getattr(preset, field.name))
  args.einsum_max_elements = int(args.einsum_max_elements)
  args.ragged_dot_vjp_max_bytes = int(args.ragged_dot_vjp_max_bytes)
  args.sweep_skip_impls = _split(args.sweep_skip_impls)
  args.profile_impls = _split(args.profile_impls)
  for name in args.profile_impls:
    if name not in PROFILED:
      parser.error(f"--profile-impls: {name!r} has no stage profile; known: {PROFILED}")
  try:
    case_list = cases_lib.select(_split(args.cases))
    profile_cases = cases_lib.select(_split(args.profile_cases))
    memory_cases = cases_lib.select(_split(args.memory_process_cases))
    cases_lib.select(_split(args.energy_cases))
  except ValueError as e:
    parser.error(str(e))
  impl_names = _split(args.impls)
  modes = _split(args.modes)
  for name in impl_names:
    if name not in impls_lib.IMPLS:
      parser.error(f"unknown implementation {name!r}; known: {sorted(impls_lib.IMPLS)}")
  for mode in modes:
    if mode not in cases_lib.MODES:
      parser.error(f"unknown mode {mode!r}; known: {cases_lib.MODES}")

  env = environment(argv, preset_name)
  out_dir = args.out or os.path.join(ROOT, "benchmarks", "results", env["slug"])
  os.makedirs(out_dir, exist_ok=True)
  print(f"jmoe benchmark ({preset_name}) on {env['device_kind']} [{env['platform']}], "
        f"jmoe backend {env['jmoe_backend']}; results -> {out_dir}", flush=True)
  runner = Runner(args, env)
  impl_names = runner.check_impls(impl_names)
  runner.results["settings"] = {
      k: getattr(args, k) for k in (
          "repeats", "warmup", "min_sample_s", "dense_n", "compile_workers",
          "sweep_skip_impls", "sweep_autotune", "einsum_max_elements",
          "ragged_dot_vjp_max_bytes", "energy_s",
          "budget_s", "seed")}
  if any(c.group.startswith("sweep") for c in case_list):
    runner.note(f"sweeps leave out {', '.join(args.sweep_skip_impls) or 'nothing'} "
                "(--sweep-skip-impls)" + (
                    "; jmoe runs its pinned default tiles there (JMOE_AUTOTUNE=0, "
                    "--sweep-autotune off), the main and skewed cases are autotuned"
                    if args.sweep_autotune == "off" and "jmoe" in impl_names else ""))
  if args.compile_workers > 1 and env["platform"] == "gpu":
    runner.note(f"programs of a shape compile {args.compile_workers} at a time: XLA's "
                "GEMM autotuning (reference forms) then times candidates beside other "
                "compilations; --compile-workers 1 avoids that")
  if memory_cases and env["platform"] == "gpu":
    runner.memory_probes(memory_cases, impl_names)  # before this process fills memory
  runner.dense_peak()
  for case in case_list:
    if runner.over_budget(f"case {case.name}"):
      continue
    runner.run_case(case, impl_names, modes)
    if case.name in {c.name for c in profile_cases}:
      runner.profile([case])
  runner.results["meta"]["total_s"] = runner.elapsed()
  results = runner.results
  report_lib.finish(results, out_dir, plots=not args.no_plots)
  return results


if __name__ == "__main__":
  main()
