"""k-way gather-sum of per-copy rows back to tokens (only `@triton.jit` code).

`pos [T, TOP_K]` int32 holds, for each copy `(t, j)` of a token, the row
("slot") where its result sits in `src [rows, D]`, or -1 when the copy was
dropped. `out[t] = sum_{j, pos >= 0} src[pos[t, j]]`, added in float32 in the
order j = 0, 1, ...: no atomics, so results are bit-identical run to run.
"""

import triton
import triton.language as tl


@triton.jit
def _combine_kernel(
    # Inputs.
    src_ptr,  # [rows, D]
    pos_ptr,  # [T, TOP_K] int32, -1 = dropped
    dwp_ptr,  # [rows, DWP_COLS] float32 (WITH_DW), else unused
    # Outputs.
    out_ptr,  # [T, D]
    dw_ptr,  # [T, TOP_K] float32 (WITH_DW), else unused [1]
    # Sizes.
    T: tl.constexpr,
    D: tl.constexpr,
    TOP_K: tl.constexpr,
    STRIDE_SRC: tl.constexpr,
    DWP_COLS: tl.constexpr,
    # Switches and tiles.
    WITH_DW: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DW: tl.constexpr,
):
  """`out[t] = sum_j src[pos[t, j]]`; with WITH_DW also `dw[t, j] = sum dwp[pos]`.

  Grid: `(cdiv(T, BLOCK_T), cdiv(D, BLOCK_D))`. The dweights sums are done by
  the programs of the first column block (BLOCK_DW >= DWP_COLS, a power of 2).
  """
  pid_t = tl.program_id(0)
  pid_d = tl.program_id(1)
  offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
  mask_t = offs_t < T
  offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
  mask_d = offs_d < D
  acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
  for j in tl.static_range(TOP_K):
    p = tl.load(pos_ptr + offs_t * TOP_K + j, mask=mask_t, other=-1)
    valid = p >= 0
    src_ptrs = (
        src_ptr
        + tl.maximum(p, 0).to(tl.int64)[:, None] * STRIDE_SRC
        + offs_d[None, :]
    )
    v = tl.load(src_ptrs, mask=valid[:, None] & mask_d[None, :], other=0.0)
    acc += v.to(tl.float32)
  out_ptrs = out_ptr + offs_t.to(tl.int64)[:, None] * D + offs_d[None, :]
  tl.store(
      out_ptrs,
      acc.to(out_ptr.dtype.element_ty),
      mask=mask_t[:, None] & mask_d[None, :],
  )
  if WITH_DW:
    if pid_d == 0:
      offs_c = tl.arange(0, BLOCK_DW)
      mask_c = offs_c < DWP_COLS
      for j in tl.static_range(TOP_K):
        p = tl.load(pos_ptr + offs_t * TOP_K + j, mask=mask_t, other=-1)
        valid = p >= 0
        dwp_ptrs = (
            dwp_ptr
            + tl.maximum(p, 0).to(tl.int64)[:, None] * DWP_COLS
            + offs_c[None, :]
        )
        part = tl.load(dwp_ptrs, mask=valid[:, None] & mask_c[None, :], other=0.0)
        tl.store(dw_ptr + offs_t * TOP_K + j, tl.sum(part, axis=1), mask=mask_t)
