"""Row-streaming transposed grouped GEMM (MoE weight gradients) in Triton.

The same product as `jmoe.kernels.tgmm._tgmm_kernel`,

  out[gi] = sum_{r in group gi}  A_r^T B_r      A_r = a[r], B_r = b[b_row_index[r]]

but one program owns the `[BLOCK_K, BLOCK_N]` tile of *several consecutive
groups* and runs one flat loop over all their `BLOCK_M`-row steps, storing the
accumulator (and zeroing it) after the last step of each group. The rows of
consecutive groups are consecutive in memory, so the software pipeline keeps
loading across group ends: short groups (64 experts: ~770 rows = 12 steps)
no longer pay a pipeline fill and an exposed epilogue per output tile.

The step schedule comes from XLA (`jmoe.ops.tgmm_stream.step_schedule`): for
step `s`, its first row, the end row of its group and the group; every group
has at least one step (a group with no rows has one fully masked step, so its
tile is stored as zeros). Chunk `c` runs steps `[chunk_steps[c],
chunk_steps[c + 1])`, which always cover whole groups, so no two programs write
the same element and no atomics are used: bit-identical repeats.

Grid: `(cdiv(KA, BLOCK_K) * cdiv(N, BLOCK_N), chunks)`.

This file holds only `@triton.jit` code (no `jax`).
"""

import triton
import triton.language as tl


@triton.jit
def _tgmm_stream_kernel(
    # Inputs.
    a_ptr,  # [m, ka] bfloat16 / float16 / float32, row-major
    b_ptr,  # [mb, n] same dtype as a, row-major
    b_row_index_ptr,  # [m] int32 row of `b` for logical row r (if HAS_B_INDEX)
    step_row0_ptr,  # [s] int32 first row of step s
    step_end_ptr,  # [s] int32 end row (exclusive) of step s's group
    step_group_ptr,  # [s] int32 group of step s
    chunk_steps_ptr,  # [chunks + 1] int32 first step of each chunk
    # Sizes.
    KA_Q,  # KA // KA_MULT (KA: columns of a = out rows per group)
    N_Q,  # N // N_MULT (N: columns of b = out columns)
    # Outputs.
    out_ptr,  # [g, KA, N] float32 / bfloat16 / float16
    # Meta-parameters.
    HAS_B_INDEX: tl.constexpr,
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
  pid = tl.program_id(0)
  chunk = tl.program_id(1)
  # Row strides as quotient times constexpr: see `_tgmm_kernel`.
  KA = KA_Q * KA_MULT
  N = N_Q * N_MULT

  num_pid_k = tl.cdiv(KA, BLOCK_K)
  num_pid_n = tl.cdiv(N, BLOCK_N)
  num_pid_in_band = GROUP_SIZE * num_pid_n
  band = pid // num_pid_in_band
  first_pid_k = band * GROUP_SIZE
  band_k = tl.minimum(num_pid_k - first_pid_k, GROUP_SIZE)
  pid_k = first_pid_k + (pid % num_pid_in_band) % band_k
  pid_n = (pid % num_pid_in_band) // band_k

  offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
  offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
  offs_k = tl.max_contiguous(tl.multiple_of(offs_k, BLOCK_K), BLOCK_K)
  offs_n = tl.max_contiguous(tl.multiple_of(offs_n, BLOCK_N), BLOCK_N)
  k_mask = offs_k < KA
  n_mask = offs_n < N
  out_tile = offs_k.to(tl.int64)[:, None] * N + offs_n[None, :]

  s_begin = tl.load(chunk_steps_ptr + chunk)
  s_end = tl.load(chunk_steps_ptr + chunk + 1)

  acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
  # The step's rows (and gathered `b` rows) are loaded one step ahead, as
  # loop-carried values, so the pipeliner can keep the tile loads in flight.
  row0 = tl.load(step_row0_ptr + s_begin)
  end = tl.load(step_end_ptr + s_begin)
  gi = tl.load(step_group_ptr + s_begin)
  rows = row0 + tl.arange(0, BLOCK_M)
  if HAS_B_INDEX:
    b_rows = tl.load(b_row_index_ptr + rows, mask=rows < end, other=0)
  else:
    b_rows = rows
  for s in range(s_begin, s_end):
    rows = row0 + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * KA + offs_k[None, :]
    b_ptrs = b_ptr + b_rows.to(tl.int64)[:, None] * N + offs_n[None, :]
    if EVEN_K:
      a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
    else:
      a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
    if EVEN_N:
      b = tl.load(b_ptrs, mask=row_mask[:, None], other=0.0)
    else:
      b = tl.load(b_ptrs, mask=row_mask[:, None] & n_mask[None, :], other=0.0)
    if DOT_F32:
      a = a.to(tl.float32)
      b = b.to(tl.float32)
    acc = tl.dot(tl.trans(a), b, acc, input_precision=INPUT_PRECISION)
    if row0 + BLOCK_M >= end:
      # Last step of group `gi`: store its tile, start the next group's sum.
      out_ptrs = out_ptr + gi.to(tl.int64) * KA * N + out_tile
      if EVEN_K and EVEN_N:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty))
      else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty),
                 mask=k_mask[:, None] & n_mask[None, :])
      acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    nxt = tl.minimum(s + 1, s_end - 1)
    row0 = tl.load(step_row0_ptr + nxt)
    end = tl.load(step_end_ptr + nxt)
    gi = tl.load(step_group_ptr + nxt)
    if HAS_B_INDEX:
      next_rows = row0 + tl.arange(0, BLOCK_M)
      b_rows = tl.load(b_row_index_ptr + next_rows, mask=next_rows < end, other=0)
    else:
      b_rows = row0 + tl.arange(0, BLOCK_M)


# EVEN_K / EVEN_N derived from the sizes; the tile config is passed explicitly.
tgmm_stream_kernel = triton.heuristics(
    {
        "EVEN_K": lambda meta: (meta["KA_Q"] * meta["KA_MULT"]) % meta["BLOCK_K"]
        == 0,
        "EVEN_N": lambda meta: (meta["N_Q"] * meta["N_MULT"]) % meta["BLOCK_N"]
        == 0,
    }
)(_tgmm_stream_kernel)
