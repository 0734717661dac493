"""Runs `expert_ffn` forward+backward once per case: a target for profilers (ncu).

Nsight Compute replays each profiled kernel many times, so a timing loop is not
wanted there; this compiles and runs the op exactly once per case (inputs of
`benchmarks/gpu_kernels.py`). Example (on the GPU machine)::

  ncu --kernel-name regex:"_tgmm_kernel|_grouped_gemm_act_kernel" --launch-count 3 \\
      --section SpeedOfLight --section WarpStateStats \\
      python -m benchmarks.one_call --cases e64
"""

from __future__ import annotations

import argparse
import sys

import jax

from benchmarks.gpu_kernels import ffn_programs


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default="e64")
  parser.add_argument("--backend", default="triton")
  args = parser.parse_args(argv)
  for case in args.cases.split(","):
    _, loss, ffn_args = ffn_programs(case, args.backend)
    jax.block_until_ready(jax.jit(jax.grad(loss, (0, 1, 2, 3)))(*ffn_args))
    print(f"# {case}: one expert_ffn forward+backward ran", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
