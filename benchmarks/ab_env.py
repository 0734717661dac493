"""A/B timing of one `JMOE_*` switch on `expert_ffn`, interleaved (GPU).

Run-to-run spread on the big MoE shapes reaches 5-10 % between separate runs
(clocks, allocator, L2 state), which hides 1-3 % effects. This tool compiles
the expert FFN forward and forward+backward once per value of `--var` (the
switches are read at trace time), then times the variants in alternating
rounds in one process, so slow drifts hit every variant alike, and prints the
median over rounds of each (each round: `gpu_kernels.time_fn`, median of
`--reps` samples). Inputs are those of `benchmarks/gpu_kernels.py`.

Usage::

  python -m benchmarks.ab_env --case big --var JMOE_ROUTER_SCALE --values up,down
"""

from __future__ import annotations

import argparse
import statistics
import sys

import jax

from benchmarks.gpu_kernels import CASES, ffn_programs, time_fn
from jmoe._env import env_overrides


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--case", default="big", choices=sorted(CASES))
  parser.add_argument("--var", required=True)
  parser.add_argument("--values", required=True, help="comma-separated")
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--min-sample-s", type=float, default=0.05,
                      help="each sample runs calls for at least this long (s)")
  parser.add_argument("--backend", default="triton")
  args = parser.parse_args(argv)
  t, d, f, e, top_k, _, _ = CASES[args.case]
  forward, loss, ffn_args = ffn_programs(args.case, args.backend)

  fns = {}
  for value in args.values.split(","):
    with env_overrides({args.var: value}):
      # A fresh function per value, so each is traced with its value set.
      fwd = jax.jit(lambda *a: forward(*a))  # pylint: disable=unnecessary-lambda
      fb = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3)))
      jax.block_until_ready(fwd(*ffn_args))
      jax.block_until_ready(fb(*ffn_args))
      fns[value] = {"fwd": fwd, "fwd+bwd": fb}
  times = {(v, m): [] for v in fns for m in ("fwd", "fwd+bwd")}
  for r in range(args.rounds):
    order = list(fns) if r % 2 == 0 else list(reversed(fns))
    for value in order:
      for mode, fn in fns[value].items():
        ms, _, _ = time_fn(fn, *ffn_args, reps=args.reps,
                           min_sample_s=args.min_sample_s)
        times[(value, mode)].append(ms * 1e3)
  print(f"# {jax.devices()[0].device_kind}; case {args.case} t={t} d={d} f={f} e={e} "
        f"k={top_k}; {args.var} in {args.values}; {args.rounds} rounds x {args.reps} reps "
        f"of >= {args.min_sample_s} s")
  result = {}
  for (value, mode), samples in times.items():
    med = statistics.median(samples)
    result[f"{value} {mode}"] = med
    print(f"  {args.var}={value:<10} {mode:<8} median {med:8.3f} ms  rounds "
          + " ".join(f"{s:.3f}" for s in samples), flush=True)
  return result


if __name__ == "__main__":
  main()
  sys.exit(0)
