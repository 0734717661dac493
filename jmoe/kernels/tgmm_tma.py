"""Persistent tgmm with tensor-memory-accelerator (TMA) loads, columns layout only.

Same product as `jmoe.kernels.tgmm._tgmm_kernel` with `A_COLUMNS`: for each
group `gi` with logical rows `r in [offsets[gi], offsets[gi + 1])`,

  out[gi] = sum_r a[:, r - offsets[gi] + a_col_offsets[gi]] (x) b[r]

where `a [KA, MA]` holds each group's rows as columns from a multiple of 64,
zero-filled to the next one (`jmoe.ops.tgmm.group_columns`), and `b [MB, N]`
is row-major. With `A_ROWS`, `a [MB, KA]` is row-major instead, logical row
`r` at row `r` (`gather_mode="xla_rows"`: e.g. the sorted copy a grouped GEMM
read by TMA, no transposed copy), and the `[BLOCK_M, BLOCK_K]` tile is fed to
the dot transposed (an MN-major wgmma operand in shared memory). There are no
zero columns then, so exactly one operand's per-tile descriptor ends at the
group's last row: `b`'s with `B_BOUNDED`, else `a`'s. The other operand's rows
past the group's end (finite values) meet TMA's zeros.

Why a second kernel: the plain-pointer tgmm loses 3-4 us per 128x256 output
tile to pipeline fill and epilogue (benchmarks/results/sweep_h100.md, session
5 probe), ~10 % of the Mixtral-like weight gradients and ~25 % at 64 experts,
and issues ~2.5x the instructions per step of the forward GEMMs (address and
mask arithmetic of cp.async). Here:

- `NUM_PROGRAMS` programs (one per SM) walk the tiles `pid, pid + NUM_PROGRAMS,
  ...` of all groups, group-major, banded inside a group (`band_swizzle`).
- Both operand tiles come by TMA (`tl.make_tensor_descriptor`: one
  instruction per tile, no address registers). Rows of `b` past the group's
  end read whatever follows (the next group, or TMA's zeros past `MB`); the
  matching columns of `a` are zeros, so they add nothing unless `b` holds
  inf / NaN there. `B_BOUNDED` gives each tile a descriptor that ends at the
  group's last row instead (TMA then reads zeros past it: no cross-group
  reads at all) at the cost of one descriptor write per tile.
- `TMA_STORE` stores the tile through a 3-D `[g, KA, N]` descriptor (`[g, N, KA]`
  with `OUT_TRANSPOSED`), which clips partial tiles; else a masked st.global.

Device-side descriptors live in Triton's hidden global-scratch argument; the
jax-triton launch fills it through `jmoe.ops._call.kernel_call(...,
scratch_bytes_per_program=...)` (see there for the version guard).

This file holds only `@triton.jit` code (no `jax`).
"""

import triton
import triton.language as tl

from jmoe.kernels.swizzle import band_swizzle


@triton.jit
def _tgmm_tma_kernel(
    # Inputs.
    a_ptr,  # [KA, MA] bfloat16 / float16: group rows as columns ([MB, KA] rows: A_ROWS)
    b_ptr,  # [MB, N] same dtype, row-major
    group_offsets_ptr,  # [g + 1] int32, non-decreasing, offsets[0] == 0
    a_col_offsets_ptr,  # [g] int32, first column of group gi in a (unread: A_ROWS)
    # Sizes.
    G,  # groups
    MB,  # rows of b
    KA_Q,  # KA // 16
    N_Q,  # N // 16
    MA_Q,  # MA // 16 (unread: A_ROWS)
    # Outputs.
    out_ptr,  # [g, KA, N] (or [g, N, KA] with OUT_TRANSPOSED)
    # Meta-parameters.
    OUT_TRANSPOSED: tl.constexpr,
    A_ROWS: tl.constexpr,  # a is [MB, KA] row-major (see above)
    B_BOUNDED: tl.constexpr,  # per-tile b descriptor ending at the group end
                              # (A_ROWS: else a's)
    TMA_STORE: tl.constexpr,  # store the tile by TMA (else st.global)
    DOT_F32: tl.constexpr,  # upcast dot operands to float32 (interpreter)
    INPUT_PRECISION: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
    FLATTEN: tl.constexpr,  # tl.range(..., flatten=) of the tile loop
    BLOCK_M: tl.constexpr,  # rows per step (divides 64)
    BLOCK_K: tl.constexpr,  # output tile rows
    BLOCK_N: tl.constexpr,  # output tile columns
    GROUP_SIZE: tl.constexpr,
):
  KA = KA_Q * 16
  N = N_Q * 16
  MA = MA_Q * 16
  if A_ROWS:
    a_desc = tl.make_tensor_descriptor(
        a_ptr, shape=[MB, KA], strides=[KA, 1], block_shape=[BLOCK_M, BLOCK_K])
  else:
    a_desc = tl.make_tensor_descriptor(
        a_ptr, shape=[KA, MA], strides=[MA, 1], block_shape=[BLOCK_K, BLOCK_M])
  b_desc = tl.make_tensor_descriptor(
      b_ptr, shape=[MB, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])

  if TMA_STORE:
    if OUT_TRANSPOSED:
      out_desc = tl.make_tensor_descriptor(
          out_ptr, shape=[G, N, KA], strides=[N * KA, KA, 1],
          block_shape=[1, BLOCK_N, BLOCK_K])
    else:
      out_desc = tl.make_tensor_descriptor(
          out_ptr, shape=[G, KA, N], strides=[KA * N, N, 1],
          block_shape=[1, BLOCK_K, BLOCK_N])

  tiles_k = tl.cdiv(KA, BLOCK_K)
  tiles_n = tl.cdiv(N, BLOCK_N)
  per_group = tiles_k * tiles_n
  for tile in tl.range(tl.program_id(0), G * per_group, NUM_PROGRAMS,
                       flatten=FLATTEN):
    gi = tile // per_group
    pid_k, pid_n = band_swizzle(tile % per_group, tiles_k, tiles_n, GROUP_SIZE)
    start = tl.load(group_offsets_ptr + gi)
    end = tl.load(group_offsets_ptr + gi + 1)
    k0 = pid_k * BLOCK_K
    n0 = pid_n * BLOCK_N
    if B_BOUNDED:
      tile_b = tl.make_tensor_descriptor(
          b_ptr, shape=[end, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    else:
      tile_b = b_desc
    tile_a = a_desc
    if A_ROWS:
      if not B_BOUNDED:
        tile_a = tl.make_tensor_descriptor(
            a_ptr, shape=[end, KA], strides=[KA, 1], block_shape=[BLOCK_M, BLOCK_K])
      a_start = start
    else:
      a_start = tl.load(a_col_offsets_ptr + gi)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for r in range(0, end - start, BLOCK_M):
      if A_ROWS:
        a = tl.trans(tile_a.load([a_start + r, k0]))
      else:
        a = tile_a.load([k0, a_start + r])
      b = tile_b.load([start + r, n0])
      if DOT_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
      acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    out = acc.to(out_ptr.dtype.element_ty)
    if TMA_STORE:
      if OUT_TRANSPOSED:
        out_desc.store([gi, n0, k0], tl.trans(out).reshape(1, BLOCK_N, BLOCK_K))
      else:
        out_desc.store([gi, k0, n0], out.reshape(1, BLOCK_K, BLOCK_N))
    else:
      _store_tile(out, out_ptr, gi, k0, n0, KA, N, BLOCK_K, BLOCK_N, OUT_TRANSPOSED)


@triton.jit
def _store_tile(out, out_ptr, gi, k0, n0, KA, N, BLOCK_K: tl.constexpr,
                BLOCK_N: tl.constexpr, OUT_TRANSPOSED: tl.constexpr):
  """Masked `st.global` of one `[BLOCK_K, BLOCK_N]` tile of `out[gi]`."""
  offs_k = k0 + tl.arange(0, BLOCK_K)
  offs_n = n0 + tl.arange(0, BLOCK_N)
  mask = (offs_k < KA)[:, None] & (offs_n < N)[None, :]
  if OUT_TRANSPOSED:
    out_ptrs = (out_ptr + gi.to(tl.int64) * KA * N
                + offs_n.to(tl.int64)[None, :] * KA + offs_k[:, None])
  else:
    out_ptrs = (out_ptr + gi.to(tl.int64) * KA * N
                + offs_k.to(tl.int64)[:, None] * N + offs_n[None, :])
  tl.store(out_ptrs, out, mask=mask)
