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
import contextlib
import statistics
import sys
from collections.abc import Callable

import jax

from benchmarks.gpu_kernels import CASES, ffn_programs, time_fn
from jmoe._env import env_overrides


def add_round_args(parser: argparse.ArgumentParser) -> None:
  """The options of an interleaved timing: `--rounds`, `--reps`,
  `--min-sample-s`, `--backend`."""
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--min-sample-s", type=float, default=0.05,
                      help="each sample runs calls for at least this long (s)")
  parser.add_argument("--backend", default="triton")


def time_interleaved(variants: dict, args, time_ms: Callable, header: str,
                     label: Callable[[str], str] = str) -> dict:
  """Times `variants` in alternating rounds; prints and returns the medians.

  Args:
    variants: `{name: (context, {mode: (fn, fn_args)})}`; `context()` is entered
      around each round's calls of that variant (e.g. `lambda: jax.set_mesh(m)`).
    args: parsed `add_round_args` options.
    time_ms: `time_ms(fn, fn_args, args)`, one round's time per call in ms.
    header: the first printed line.
    label: how a variant's name is printed.

  Returns:
    `{"name mode": median ms over rounds}`.
  """
  times = {(v, m): [] for v, (_, runs) in variants.items() for m in runs}
  for r in range(args.rounds):
    order = list(variants) if r % 2 == 0 else list(reversed(variants))
    for name in order:
      context, runs = variants[name]
      with context():
        for mode, (fn, fn_args) in runs.items():
          times[(name, mode)].append(time_ms(fn, fn_args, args))
  print(header)
  result = {}
  for (name, mode), samples in times.items():
    result[f"{name} {mode}"] = statistics.median(samples)
    print(f"  {label(name):<14} {mode:<8} median {result[f'{name} {mode}']:8.3f} ms  "
          "rounds " + " ".join(f"{s:.3f}" for s in samples), flush=True)
  return result


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--case", default="big", choices=sorted(CASES))
  parser.add_argument("--var", required=True)
  parser.add_argument("--values", required=True, help="comma-separated")
  add_round_args(parser)
  args = parser.parse_args(argv)
  t, d, f, e, top_k, _, _ = CASES[args.case]
  forward, loss, ffn_args = ffn_programs(args.case, args.backend)

  variants = {}
  for value in args.values.split(","):
    with env_overrides({args.var: value}):
      # A fresh function per value, so each is traced with its value set.
      fwd = jax.jit(lambda *a: forward(*a))  # pylint: disable=unnecessary-lambda
      fb = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3)))
      jax.block_until_ready(fwd(*ffn_args))
      jax.block_until_ready(fb(*ffn_args))
      variants[value] = (contextlib.nullcontext,
                         {"fwd": (fwd, ffn_args), "fwd+bwd": (fb, ffn_args)})

  def time_ms(fn, fn_args, args):
    return time_fn(fn, *fn_args, reps=args.reps, min_sample_s=args.min_sample_s)[0] * 1e3

  header = (f"# {jax.devices()[0].device_kind}; case {args.case} t={t} d={d} f={f} e={e} "
            f"k={top_k}; {args.var} in {args.values}; {args.rounds} rounds x {args.reps} "
            f"reps of >= {args.min_sample_s} s")
  return time_interleaved(variants, args, time_ms, header,
                          label=lambda value: f"{args.var}={value}")


if __name__ == "__main__":
  main()
  sys.exit(0)
