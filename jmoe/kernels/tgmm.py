"""Transposed grouped GEMM (the weight-gradient GEMM of an MoE) in Triton.

For each group `gi` with rows `r in [offsets[gi], offsets[gi + 1])`:

  out[gi] = sum_r  A_r^T (s_r * B_r)     A_r = a[a_row_index[r]]  [ka]
                                         B_r = b[b_row_index[r]]  [n]

The contraction runs over rows (the token axis), so this is `dW_e = X_e^T dY_e`.

Grid: `(cdiv(ka, BLOCK_K) * cdiv(n, BLOCK_N), g)`. Program `(pid, gi)` owns one
`[BLOCK_K, BLOCK_N]` tile of `out[gi]` and loops over its group's rows in
`BLOCK_M` chunks (masked at the group end), so no two programs write the same
element and no atomics are used: results are bit-identical run to run for a
fixed config. A group with no rows stores a zero tile.

Row scale: `A_r^T (s_r B_r) = (s_r A_r)^T B_r`; the kernel scales the `a` tile
(`[BLOCK_M, BLOCK_K]`) in float32 and rounds it to `a`'s dtype before `tl.dot`
(the tensor cores take operands of one dtype). The scaled tile then feeds the
dot from registers while `b` streams through shared memory, which keeps the
wgmma pipeline asynchronous (scaling the `b` tile instead serialises it). For
float32 operands with `INPUT_PRECISION="ieee"` the only extra rounding is the
float32 product itself; for bf16/fp16 operands it is one rounding of the scaled
row (relative 2^-9 / 2^-12 per element), as in a GEMM on the scaled operand.

`A_COLUMNS` (the op's `gather_mode="xla_columns"`): `a` comes transposed,
`[KA, MA]`, with group `gi`'s rows as the columns from `a_col_offsets[gi]` (a
multiple of 64) and zeros up to the next multiple of 64. wgmma then takes a
K-major `a` tile (contiguous along the contraction) instead of the transposed
(`tnspA`) one; on the H100 this alone ran 9-12 % faster at the Mixtral-like
dW_up shape (`benchmarks/tgmm_layout_probe.py`).

`OUT_TRANSPOSED` stores each group's tile transposed (`out [g, N, KA]`), so
that `dW_down [e, f, d]` can be computed as `dy^T h` with `dy` as the
K-major columns (`h` is the wider operand there).

`HAS_SCALE` is the op's opt-in `row_scale_mode="kernel"` path. On sm_90 it
loads the `a` tile into registers (no cp.async), holds two prefetched tiles
there (186 -> 222-255 registers, spills at 64x256x128) and passes the scaled
tile through shared memory into wgmma's register operand every step. The
default `"prescale"` forms the same scaled rows in XLA and launches this kernel
without `HAS_SCALE` (1.3-1.5x faster on the H100, benchmarks/results/sweep_h100.md).

This file holds only `@triton.jit` code and its autotune configs (no `jax`).
"""

import triton
import triton.language as tl

from jmoe.kernels.swizzle import band_swizzle


@triton.jit
def _tgmm_kernel(
    # Inputs.
    a_ptr,  # [ma, ka] float32 / bfloat16 / float16, row-major
    b_ptr,  # [mb, n] same dtype as a, row-major
    group_offsets_ptr,  # [g + 1] int32, non-decreasing, offsets[0] == 0
    a_row_index_ptr,  # [m] int32 row of `a` for logical row r (if HAS_A_INDEX)
    b_row_index_ptr,  # [m] int32 row of `b` for logical row r (if HAS_B_INDEX)
    row_scale_ptr,  # [m] float32 (if HAS_SCALE)
    a_col_offsets_ptr,  # [g] int32 first column of group gi in a (if A_COLUMNS)
    # Sizes.
    M,  # logical rows (only an autotune key; the offsets bound the loop)
    KA_Q,  # KA // KA_MULT (KA: columns of a = out rows per group)
    N_Q,  # N // N_MULT (N: columns of b = out columns)
    MA_Q,  # (A_COLUMNS) columns of a // 16 (its row stride)
    # Outputs.
    out_ptr,  # [g, KA, N] float32 / bfloat16 / float16
    # Meta-parameters.
    A_COLUMNS: tl.constexpr,  # a is [KA, MA]: logical row r is a column
    OUT_TRANSPOSED: tl.constexpr,  # out is [g, N, KA] (each group transposed)
    HAS_A_INDEX: tl.constexpr,
    HAS_B_INDEX: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    DOT_F32: tl.constexpr,  # upcast dot operands to float32 (interpreter)
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32" (float32 operands only)
    KA_MULT: tl.constexpr,  # a power of two dividing KA (16 when it can)
    N_MULT: tl.constexpr,  # a power of two dividing N
    EVEN_K: tl.constexpr,  # KA % BLOCK_K == 0
    EVEN_N: tl.constexpr,  # N % BLOCK_N == 0
    BLOCK_M: tl.constexpr,  # rows per step of the contraction loop
    BLOCK_K: tl.constexpr,  # output tile rows (columns of a)
    BLOCK_N: tl.constexpr,  # output tile columns (columns of b)
    GROUP_SIZE: tl.constexpr,  # tile swizzle: BLOCK_K-rows of tiles per band
):
  tl.static_assert(not (A_COLUMNS and (HAS_A_INDEX or HAS_SCALE)),
                   "A_COLUMNS takes a pre-gathered, pre-scaled a")
  pid = tl.program_id(0)
  gi = tl.program_id(1)
  # jax-triton gives scalar arguments no divisibility hints, so the row strides
  # come as quotients times a constexpr: the compiler then knows that rows start
  # 16-byte aligned and issues 16-byte cp.async loads (with plain KA / N it
  # falls back to 2-byte loads without pipelining: ~7x slower on the H100).
  KA = KA_Q * KA_MULT
  N = N_Q * N_MULT

  # Swizzle the tiles of one group so that programs running together share
  # row bands of `a` (columns of `a`) and of `b` in L2.
  pid_k, pid_n = band_swizzle(pid, tl.cdiv(KA, BLOCK_K), tl.cdiv(N, BLOCK_N),
                              GROUP_SIZE)

  start = tl.load(group_offsets_ptr + gi)
  end = tl.load(group_offsets_ptr + gi + 1)

  offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
  offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
  offs_k = tl.max_contiguous(tl.multiple_of(offs_k, BLOCK_K), BLOCK_K)
  offs_n = tl.max_contiguous(tl.multiple_of(offs_n, BLOCK_N), BLOCK_N)
  k_mask = offs_k < KA
  n_mask = offs_n < N

  acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
  # Row indices are loaded one step ahead, so the gathered loads of a step
  # depend on a loop-carried value and the pipeliner can keep them in flight.
  rows = start + tl.arange(0, BLOCK_M)
  if HAS_A_INDEX:
    a_rows = tl.load(a_row_index_ptr + rows, mask=rows < end, other=0)
  else:
    a_rows = rows
  if HAS_B_INDEX:
    b_rows = tl.load(b_row_index_ptr + rows, mask=rows < end, other=0)
  else:
    b_rows = rows
  if A_COLUMNS:
    # Column of a for logical row r: r - start + a_start. Every group starts
    # at a multiple of 64 columns and is zero-filled to the next one, so the
    # [BLOCK_K, BLOCK_M] tiles need no row mask and load as 16-byte vectors.
    a_shift = tl.load(a_col_offsets_ptr + gi) - start
  for row0 in range(start, end, BLOCK_M):
    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    b_ptrs = b_ptr + b_rows.to(tl.int64)[:, None] * N + offs_n[None, :]
    if A_COLUMNS:
      cols = tl.multiple_of(row0 + a_shift, 16) + tl.arange(0, BLOCK_M)
      cols = tl.max_contiguous(cols, BLOCK_M)
      a_ptrs = a_ptr + offs_k.to(tl.int64)[:, None] * (MA_Q * 16) + cols[None, :]
      if EVEN_K:
        a = tl.load(a_ptrs)
      else:
        a = tl.load(a_ptrs, mask=k_mask[:, None], other=0.0)
    else:
      a_ptrs = a_ptr + a_rows.to(tl.int64)[:, None] * KA + offs_k[None, :]
      if EVEN_K:
        a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
      else:
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
    if EVEN_N:
      b = tl.load(b_ptrs, mask=row_mask[:, None], other=0.0)
    else:
      b = tl.load(b_ptrs, mask=row_mask[:, None] & n_mask[None, :], other=0.0)
    if HAS_SCALE:
      s = tl.load(row_scale_ptr + rows, mask=row_mask, other=0.0)
      a = a.to(tl.float32) * s[:, None]
      if not DOT_F32:
        # The interpreter rounds float32 -> bf16 towards zero; with DOT_F32 the
        # scaled tile stays float32 (one rounding fewer than on the GPU).
        a = a.to(a_ptr.dtype.element_ty)
    if DOT_F32:
      a = a.to(tl.float32)
      b = b.to(tl.float32)
    if A_COLUMNS:
      acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    else:
      acc = tl.dot(tl.trans(a), b, acc, input_precision=INPUT_PRECISION)
    next_rows = rows + BLOCK_M
    if HAS_A_INDEX:
      a_rows = tl.load(a_row_index_ptr + next_rows, mask=next_rows < end, other=0)
    else:
      a_rows = next_rows
    if HAS_B_INDEX:
      b_rows = tl.load(b_row_index_ptr + next_rows, mask=next_rows < end, other=0)
    else:
      b_rows = next_rows

  out = acc.to(out_ptr.dtype.element_ty)
  if OUT_TRANSPOSED:
    out_ptrs = (
        out_ptr
        + gi.to(tl.int64) * KA * N
        + offs_n.to(tl.int64)[None, :] * KA
        + offs_k[:, None]
    )
  else:
    out_ptrs = (
        out_ptr
        + gi.to(tl.int64) * KA * N
        + offs_k.to(tl.int64)[:, None] * N
        + offs_n[None, :]
    )
  if EVEN_K and EVEN_N:
    tl.store(out_ptrs, out)
  else:
    tl.store(out_ptrs, out, mask=k_mask[:, None] & n_mask[None, :])


def _config(bm, bk, bn, warps, stages, group=8):
  return triton.Config(
      {"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_N": bn, "GROUP_SIZE": group},
      num_warps=warps,
      num_stages=stages,
  )


# Hopper-sized configs for 16-bit operands (BLOCK_M is the contraction depth of
# one step). Shared memory per stage: 2 * BLOCK_M * (BLOCK_K + BLOCK_N) bytes.
TGMM_CONFIGS = (
    _config(64, 128, 256, 8, 3),
    _config(64, 128, 256, 8, 4),
    _config(64, 256, 128, 8, 3),
    _config(64, 128, 128, 8, 4),
    _config(64, 128, 128, 4, 3),  # 2 programs per SM: short K loops
)

# float32 operands take twice the shared memory per tile (and "ieee" dots run
# on the FMA units, not wgmma): smaller tiles.
TGMM_CONFIGS_F32 = (
    _config(32, 128, 128, 8, 3),
    _config(32, 64, 128, 4, 3),
    _config(64, 64, 64, 4, 3),
)

# One small config for Triton's interpreter (tl.dot needs every dim >= 16).
TGMM_INTERPRET_CONFIG = {
    "BLOCK_M": 16,
    "BLOCK_K": 16,
    "BLOCK_N": 16,
    "GROUP_SIZE": 2,
}

def stride_multiple(size: int) -> int:
  """The largest of 16, 8, 4, 2, 1 dividing `size` (pass as KA_MULT / N_MULT)."""
  for mult in (16, 8, 4, 2):
    if size % mult == 0:
      return mult
  return 1


# EVEN_K / EVEN_N derived from the sizes; pass the tile config explicitly.
tgmm_kernel_heuristic = triton.heuristics(
    {
        "EVEN_K": lambda meta: (meta["KA_Q"] * meta["KA_MULT"]) % meta["BLOCK_K"]
        == 0,
        "EVEN_N": lambda meta: (meta["N_Q"] * meta["N_MULT"]) % meta["BLOCK_N"]
        == 0,
    }
)(_tgmm_kernel)

# The GPU entry points: autotuned, EVEN_K / EVEN_N derived. Choose by the
# operand dtype (16-bit or float32).
tgmm_kernel_autotuned = triton.autotune(
    configs=list(TGMM_CONFIGS), key=["M", "KA_Q", "N_Q"]
)(tgmm_kernel_heuristic)

tgmm_kernel_autotuned_f32 = triton.autotune(
    configs=list(TGMM_CONFIGS_F32), key=["M", "KA_Q", "N_Q"]
)(tgmm_kernel_heuristic)
