"""Sustained-load timing with board power and SM clock (GPU): what bounds the wall.

The H100 holds its board power limit (700 W) by lowering the SM clock, so a
kernel's time in a short trace and its time inside a long run of back-to-back
calls differ. For a dense `jnp.dot` (cuBLAS) and the expert FFN forward and
forward+backward of `--case` (inputs of `benchmarks/gpu_kernels.py`), under
each value of `--var`, this tool measures:

- `cool ms`: ms per call over a ~`--cool-s` burst after `--idle-s` of idle;
- `ms`, `TFLOP/s`: ms per call over `--seconds` of back-to-back calls, while
  `timing.PowerSampler` samples the board power, the SM clock and the driver's
  clock-event reasons;
- `W`, `SM MHz`, `cap %`: mean power, mean SM clock, and the share of samples
  in which the driver reports the power cap (software power cap or power
  brake) as a reason for the clock.

With `--dense-bound` it also times the case's six GEMMs as dense XLA dots
(`benchmarks.dense_bound`) under the same load and prints their sums per
phase beside the case's targets and the FFN's times: the time left for
everything but library-speed GEMMs.

Variants are interleaved over `--rounds` (as `benchmarks/ab_env.py`), so slow
drifts hit every variant alike; the medians over rounds are printed.

Usage::

  python -m benchmarks.power_probe --case big --var JMOE_GEMM_TMA \
      --values "auto;act=tiles" --seconds 2
  python -m benchmarks.power_probe --case e64 --var JMOE_GEMM_CONFIG \
      --values ";act:block_k=64,num_stages=3" --modes fwd
  python -m benchmarks.power_probe --case e64 --dense-bound --rounds 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax

from benchmarks import dense_bound as bound_lib
from benchmarks import timing as timing_lib
from benchmarks.gpu_kernels import CASES, ffn_programs
from jmoe._env import env_overrides

COLUMNS = ("cool ms", "ms", "TFLOP/s", "W", "SM MHz", "cap %")


def _burst(fn, args, seconds: float, per_call_s: float) -> float:
  """Seconds per call over back-to-back calls lasting about `seconds`."""
  calls = max(1, round(seconds / max(per_call_s, 1e-6)))
  return timing_lib.run_calls(fn, *args, calls=calls) / calls


def sustained(fn, args, flops: float, seconds: float, idle_s: float, cool_s: float
              ) -> dict[str, float]:
  """One measurement of a warm `fn(*args)`: the columns of `COLUMNS`."""
  per_call = _burst(fn, args, 0.0, 1.0)  # one call: sizes the loops
  time.sleep(idle_s)
  cool = _burst(fn, args, cool_s, per_call)
  sampler = timing_lib.PowerSampler()
  with sampler:
    hot = _burst(fn, args, seconds, cool)
  clocks = sampler.clocks() or {}
  return {"cool ms": cool * 1e3, "ms": hot * 1e3, "TFLOP/s": flops / hot / 1e12,
          "W": sampler.mean_w or float("nan"),
          "SM MHz": clocks.get("mean_sm_mhz", float("nan")),
          "cap %": 100 * clocks.get("power_cap_share", float("nan"))}


BOUND_PREFIX = "dense-bound "


def programs(case: str, var: str | None, values: list[str], modes: list[str],
             dense_n: int = 8192, backend: str = "triton",
             dense_bound: bool = False) -> dict[str, tuple]:
  """`{label: (fn, args, flops)}`: the dense bf16 `dense_n`^3 matmul (none if
  0), with `dense_bound` the case's GEMMs as dense dots (`BOUND_PREFIX` +
  name), then the FFN's `modes` (`fwd`, `fwd+bwd`) per value of `var`."""
  out = {}
  if dense_n:
    square = bound_lib.DenseGemm("fwd", "dense", 1, dense_n, dense_n, dense_n)
    fn, args = bound_lib.dense_program(square, seed=timing_lib.DENSE_PEAK_SEED)
    out[f"dense {dense_n}^3"] = (fn, args, square.flops)
  t, d, f, e, top_k, _, _ = CASES[case]
  if dense_bound:
    for gemm in bound_lib.ffn_gemms(t, d, f, e, top_k):
      fn, args = bound_lib.dense_program(gemm)
      out[BOUND_PREFIX + gemm.name] = (fn, args, gemm.flops)
  forward, loss, args = ffn_programs(case, backend)
  fwd_flops = 6.0 * t * top_k * d * f
  for value in values:
    with env_overrides({var: value} if var else {}):
      # Fresh functions per value, traced (compiled here) with the value set.
      fns = {"fwd": (jax.jit(lambda *a: forward(*a)), fwd_flops),  # pylint: disable=unnecessary-lambda
             "fwd+bwd": (jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3))), 3 * fwd_flops)}
      for mode in modes:
        fn, flops = fns[mode]
        jax.block_until_ready(fn(*args))
        out[f"{f'{var}={value}' if var else 'default'} {mode}"] = (fn, args, flops)
  return out


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--case", default="big", choices=sorted(CASES))
  parser.add_argument("--var", help="a JMOE_* switch to vary (default: none)")
  parser.add_argument("--values", default="",
                      help="values of --var separated by ';' (an empty one: unset)")
  parser.add_argument("--modes", default="fwd,fwd+bwd")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--seconds", type=float, default=2.0)
  parser.add_argument("--idle-s", type=float, default=1.0)
  parser.add_argument("--cool-s", type=float, default=0.03)
  parser.add_argument("--dense-n", type=int, default=8192, help="0: no dense matmul")
  parser.add_argument("--backend", default="triton")
  parser.add_argument("--dense-bound", action="store_true",
                      help="also time the case's GEMMs as dense dots and print their sums")
  args = parser.parse_args(argv)
  values = args.values.split(";") if args.var else [""]
  modes = args.modes.split(",")
  if not set(modes) <= {"fwd", "fwd+bwd"}:
    raise ValueError(f"--modes must be fwd and/or fwd+bwd, got {args.modes!r}")
  progs = programs(args.case, args.var, values, modes, args.dense_n, args.backend,
                   args.dense_bound)
  for fn, fn_args, _ in progs.values():
    jax.block_until_ready(fn(*fn_args))
  rows: dict[str, list[dict[str, float]]] = {label: [] for label in progs}
  for r in range(args.rounds):
    order = list(progs) if r % 2 == 0 else list(reversed(progs))
    for label in order:
      fn, fn_args, flops = progs[label]
      rows[label].append(sustained(fn, fn_args, flops, args.seconds, args.idle_s,
                                   args.cool_s))
  t, d, f, e, top_k, target_fwd, target_all = CASES[args.case]
  info = timing_lib.nvml_info() or {}
  print(f"# {jax.devices()[0].device_kind}; power limit {info.get('power_limit_w')} W; "
        f"case {args.case} t={t} d={d} f={f} e={e} k={top_k}; {args.rounds} rounds, "
        f"{args.seconds:g} s sustained after {args.idle_s:g} s idle; medians over rounds")
  print(f"  {'program':<44}" + "".join(f"{c:>10}" for c in COLUMNS))
  result = {}
  for label, samples in rows.items():
    med = {c: statistics.median(s[c] for s in samples) for c in COLUMNS}
    result[label] = med
    print(f"  {label:<44}" + "".join(f"{med[c]:>10.4g}" for c in COLUMNS), flush=True)
  if args.dense_bound:
    result["bound"] = _print_bound(result, bound_lib.ffn_gemms(t, d, f, e, top_k),
                                   {"fwd": target_fwd, "fwd+bwd": target_all}, modes)
  return result


def _print_bound(result: dict, gemms, targets: dict, modes: list[str]) -> dict:
  """Prints and returns `{mode: {"dense GEMMs ms", "target ms", label: ms}}`:
  per mode, the sum of its dense GEMMs' sustained ms beside the target and
  each measured FFN program of that mode."""
  ms = {g.name: result[BOUND_PREFIX + g.name]["ms"] for g in gemms}
  sums = bound_lib.phase_sums(ms, gemms)
  out = {}
  print("  dense-GEMM bound: the sum of the mode's GEMMs as dense dots, same load")
  for mode in modes:
    row = {"dense GEMMs ms": sums[mode], "target ms": targets[mode]}
    row.update({label.rsplit(" ", 1)[0]: r["ms"] for label, r in result.items()
                if label.endswith(f" {mode}")})
    out[mode] = row
    target = f"{targets[mode]:g} ms" if targets[mode] else "none"
    ffn = ", ".join(f"{label} {v:.4g} ms ({v / sums[mode]:.2f}x)"
                    for label, v in row.items() if label not in ("dense GEMMs ms", "target ms"))
    print(f"  {mode:<8} dense GEMMs {sums[mode]:.4g} ms; target {target}; {ffn}")
  return out


if __name__ == "__main__":
  main()
  sys.exit(0)
