"""Grouped ("banded") tile order shared by the GEMM kernels.

Only `@triton.jit` code (no jax import).
"""

import triton
import triton.language as tl


@triton.jit
def band_swizzle(pid, num_pid_m, num_pid_n, GROUP: tl.constexpr):
  """`(pid_m, pid_n)` of program `pid` on a `num_pid_m x num_pid_n` tile grid
  walked in bands of `GROUP` tile rows, down each column of a band first, so
  that programs running together share row bands of both operands in L2."""
  in_band = GROUP * num_pid_n
  first_m = (pid // in_band) * GROUP
  band_m = tl.minimum(num_pid_m - first_m, GROUP)
  pid_m = first_m + (pid % in_band) % band_m
  pid_n = (pid % in_band) // band_m
  return pid_m, pid_n
