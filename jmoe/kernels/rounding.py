"""Rounding float32 tiles to a store dtype, the same on the GPU and in the interpreter.

Only `@triton.jit` code (no jax import). On the GPU `x.to(tl.bfloat16)` rounds
to nearest even (`cvt.rn.bf16.f32`); Triton 3.6's interpreter truncates
float32 -> bfloat16 instead, which biases every rounded value towards zero and
makes CPU results drift from GPU results where rows are rounded before a sum
(the per-slot rows of the down and dx GEMMs). `EMULATE_RNE` (set for the
interpreter) rounds on the bits instead: `bits + 0x7FFF + lsb`, then the high
half. NaN payloads may turn into infinities there; finite values round as on
the GPU.
"""

import triton
import triton.language as tl


@triton.jit
def round_to(x, dtype: tl.constexpr, EMULATE_RNE: tl.constexpr):
  """`x` (float32 tile) rounded to nearest even in `dtype`."""
  if EMULATE_RNE and dtype == tl.bfloat16:
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
  else:
    return x.to(dtype)
