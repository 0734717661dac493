"""Gather rows of `x` into the columns of a transposed copy, in Triton.

`out[:, c] = x[index[c]]` (zeros where `index[c] >= T`), i.e. `out [D, MP]` is
`take(x, index, fill 0).T` in one pass: each program loads a `[BLOCK_C,
BLOCK_D]` tile of gathered rows (contiguous along `D`) and stores it transposed
(contiguous along the columns). It feeds the tgmm's `A_COLUMNS` mode
(`jmoe.ops.tgmm.group_columns`), where XLA's gather + transpose fusion ran at
about a fifth of the copy rate on the H100.

This file holds only `@triton.jit` code (no `jax`).
"""

import triton
import triton.language as tl


@triton.jit
def _gather_columns_kernel(
    x_ptr,  # [T, D] any dtype, row-major
    index_ptr,  # [MP] int32: row of x for column c; >= T gives a zero column
    T,  # rows of x
    D_Q,  # D // D_MULT
    MP_Q,  # MP // BLOCK_C (MP: columns of out)
    out_ptr,  # [D, MP] x's dtype
    D_MULT: tl.constexpr,  # a power of two dividing D (16-byte rows when it can)
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
  pid_c = tl.program_id(0)
  pid_d = tl.program_id(1)
  D = D_Q * D_MULT
  MP = MP_Q * BLOCK_C
  cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
  cols = tl.max_contiguous(tl.multiple_of(cols, BLOCK_C), BLOCK_C)
  offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
  offs_d = tl.max_contiguous(tl.multiple_of(offs_d, BLOCK_D), BLOCK_D)
  d_mask = offs_d < D
  src = tl.load(index_ptr + cols)
  valid = src < T
  rows = tl.load(
      x_ptr + src.to(tl.int64)[:, None] * D + offs_d[None, :],
      mask=valid[:, None] & d_mask[None, :],
      other=0.0,
  )
  tl.store(
      out_ptr + offs_d.to(tl.int64)[:, None] * MP + cols[None, :],
      tl.trans(rows),
      mask=d_mask[:, None],
  )
