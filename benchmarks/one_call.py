"""Runs `expert_ffn` forward+backward once per case: a target for profilers (ncu).

Nsight Compute replays each profiled kernel many times, so a timing loop is not
wanted there; this compiles and runs the op exactly once per case (inputs of
`benchmarks/gpu_kernels.py`). Example (on the GPU machine)::

  ncu --kernel-name regex:"_tgmm_kernel|_grouped_gemm_act_kernel" --launch-count 3 \\
      --section SpeedOfLight --section WarpStateStats \\
      python -m benchmarks.one_call --cases e64

`--dense` also runs the case's six GEMMs as dense XLA dots, once each (set
`XLA_FLAGS=--xla_gpu_autotune_level=0` under ncu, or it profiles the
autotuner's candidates too).
"""

from __future__ import annotations

import argparse
import sys

import jax

from benchmarks.dense_bound import dense_program, ffn_gemms
from benchmarks.gpu_kernels import CASES, ffn_programs


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default="e64")
  parser.add_argument("--backend", default="triton")
  parser.add_argument("--dense", action="store_true",
                      help="also run the case's six GEMMs once each as dense XLA "
                           "dots (benchmarks/dense_bound.py), to profile beside them")
  args = parser.parse_args(argv)
  for case in args.cases.split(","):
    _, loss, ffn_args = ffn_programs(case, args.backend)
    jax.block_until_ready(jax.jit(jax.grad(loss, (0, 1, 2, 3)))(*ffn_args))
    print(f"# {case}: one expert_ffn forward+backward ran", flush=True)
    if args.dense:
      for gemm in ffn_gemms(*CASES[case][:5]):
        fn, operands = dense_program(gemm)
        jax.block_until_ready(fn(*operands))
        print(f"# {case}: dense {gemm.name} {gemm.batch}x{gemm.m}x{gemm.k}x{gemm.n} ran",
              flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
