"""Persistent tgmm in Gluon, software-pipelined across output tiles (sm_90).

Same product and operand layout as `jmoe.kernels.tgmm_tma._tgmm_tma_kernel`:
for each group `gi` with logical rows `r in [offsets[gi], offsets[gi + 1])`,

  out[gi] = sum_r a[:, r - offsets[gi] + a_col_offsets[gi]] (x) b[r]

where `a [KA, MA]` holds each group's rows as columns from a multiple of 64,
zero-filled to the next one (`jmoe.ops.tgmm.group_columns`), and `b [MB, N]`
is row-major.

Why Gluon: at 64 experts a group has ~768 rows, so an output tile is only ~12
steps of its contraction loop, and `tl.dot`'s persistent kernel drains its
pipeline at the end of every tile (TMA loads of the next tile start only after
the epilogue). Gluon's explicit `mbarrier` / TMA / `warpgroup_mma` let one
loop run over the program's whole stream of (tile, step) items:

- The loads run `NUM_BUFFERS - 2` items ahead of the MMAs, across tile ends,
  so the next tile's operands arrive while this tile's epilogue runs.
- The epilogue stores by TMA and does not wait for it; the store buffer is
  waited on only before the next epilogue writes it.
- Tiles of groups with no rows get zeros in a first pass (no items).

Each item is one `[BLOCK_K, BLOCK_M] x [BLOCK_M, BLOCK_N]` wgmma. Rows of `b`
past a group's end are read (the next group's rows, or TMA's zeros past `MB`);
the matching columns of `a` are zeros, so they add nothing unless `b` holds
inf / NaN there (as the Triton kernel with `B_BOUNDED=False`).

Device-side descriptors (`tma.make_tensor_descriptor`) live in Triton's hidden
global-scratch argument (`jmoe.ops._hidden_scratch`); the kernel builds itself
through `jmoe.ops._gluon` (jax-triton 0.3.1 compiles only `@triton.jit`).
Gluon does not run under Triton's interpreter: this kernel is GPU-only.

This file holds only `@gluon.jit` code (no `jax`).
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)


@gluon.jit
def _tile_coords(tile, per_group, tiles_k, tiles_n, GROUP_SIZE: gl.constexpr):
  """`(gi, pid_k, pid_n)` of a flat tile index: group-major, and inside a
  group bands of `GROUP_SIZE` tile rows walked column by column (programs
  running together share row bands of `a` and of `b` in L2)."""
  gi = tile // per_group
  pid = tile % per_group
  per_band = GROUP_SIZE * tiles_n
  first_k = (pid // per_band) * GROUP_SIZE
  band_rows = gl.minimum(tiles_k - first_k, GROUP_SIZE)
  pid_k = first_k + (pid % per_band) % band_rows
  pid_n = (pid % per_band) // band_rows
  return gi, pid_k, pid_n


@gluon.jit
def _tile_steps(group_offsets_ptr, gi, BLOCK_M: gl.constexpr):
  start = gl.load(group_offsets_ptr + gi)
  end = gl.load(group_offsets_ptr + gi + 1)
  return start, gl.cdiv(end - start, BLOCK_M)


@gluon.jit
def _next_busy_tile(tile, num_tiles, per_group, group_offsets_ptr,
                    NUM_PROGRAMS: gl.constexpr, BLOCK_K: gl.constexpr,
                    BLOCK_M: gl.constexpr):
  """The first tile at or after `tile` (stride `NUM_PROGRAMS`) whose group has
  rows, or `num_tiles` and later when there is none."""
  gi = gl.minimum(tile // per_group, num_tiles // per_group - 1)
  _, steps = _tile_steps(group_offsets_ptr, gi, BLOCK_M)
  while (tile < num_tiles) & (steps == 0):
    tile += NUM_PROGRAMS
    gi = gl.minimum(tile // per_group, num_tiles // per_group - 1)
    _, steps = _tile_steps(group_offsets_ptr, gi, BLOCK_M)
  return tile


@gluon.jit
def _store_tile(acc, c_smem, out_desc, gi, k0, n0, BLOCK_K: gl.constexpr,
                BLOCK_N: gl.constexpr, OUT_TRANSPOSED: gl.constexpr):
  """Waits for the previous TMA store to leave `c_smem`, writes `acc` there and
  starts its TMA store into `out[gi]` (not waited for)."""
  tma.store_wait(pendings=0)
  c = acc.to(out_desc.dtype)
  if OUT_TRANSPOSED:
    # c_smem is [1, BLOCK_N, BLOCK_K]; its permuted 2-D view takes acc.
    c_smem.reshape([BLOCK_N, BLOCK_K]).permute([1, 0]).store(c)
    fence_async_shared()
    tma.async_copy_shared_to_global(out_desc, [gi, n0, k0], c_smem)
  else:
    c_smem.reshape([BLOCK_K, BLOCK_N]).store(c)
    fence_async_shared()
    tma.async_copy_shared_to_global(out_desc, [gi, k0, n0], c_smem)


@gluon.jit
def _tgmm_gluon_kernel(
    # Inputs.
    a_ptr,  # [KA, MA] bfloat16 / float16: group rows as columns
    b_ptr,  # [MB, N] same dtype, row-major
    group_offsets_ptr,  # [g + 1] int32, non-decreasing, offsets[0] == 0
    a_col_offsets_ptr,  # [g] int32, first column of group gi in a
    # Sizes.
    G,  # groups
    MB,  # rows of b
    KA_Q,  # KA // 16
    N_Q,  # N // 16
    MA_Q,  # MA // 16
    # Outputs.
    out_ptr,  # [g, KA, N] (or [g, N, KA] with OUT_TRANSPOSED)
    # Meta-parameters.
    OUT_TRANSPOSED: gl.constexpr,
    NUM_PROGRAMS: gl.constexpr,
    NUM_BUFFERS: gl.constexpr,  # operand ring depth (loads run NUM_BUFFERS-2 ahead)
    BLOCK_M: gl.constexpr,  # rows per step (divides 64)
    BLOCK_K: gl.constexpr,  # output tile rows
    BLOCK_N: gl.constexpr,  # output tile columns
    GROUP_SIZE: gl.constexpr,
):
  num_warps: gl.constexpr = gl.num_warps()
  gl.static_assert(NUM_BUFFERS >= 3, "loads run NUM_BUFFERS - 2 items ahead")
  gl.static_assert(num_warps % 4 == 0, "whole warp groups")
  dtype: gl.constexpr = a_ptr.dtype.element_ty
  KA = KA_Q * 16
  N = N_Q * 16
  MA = MA_Q * 16

  a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_K, BLOCK_M], dtype)
  b_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], dtype)
  a_desc = tma.make_tensor_descriptor(a_ptr, [KA, MA], [MA, 1], [BLOCK_K, BLOCK_M], a_layout)
  b_desc = tma.make_tensor_descriptor(b_ptr, [MB, N], [N, 1], [BLOCK_M, BLOCK_N], b_layout)
  if OUT_TRANSPOSED:
    c_shape: gl.constexpr = [1, BLOCK_N, BLOCK_K]
    c_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for(c_shape, dtype)
    out_desc = tma.make_tensor_descriptor(out_ptr, [G, N, KA], [N * KA, KA, 1], c_shape,
                                          c_layout)
  else:
    c_shape: gl.constexpr = [1, BLOCK_K, BLOCK_N]
    c_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for(c_shape, dtype)
    out_desc = tma.make_tensor_descriptor(out_ptr, [G, KA, N], [KA * N, N, 1], c_shape,
                                          c_layout)

  acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
      version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16])

  a_bufs = gl.allocate_shared_memory(dtype, [NUM_BUFFERS, BLOCK_K, BLOCK_M], a_layout)
  b_bufs = gl.allocate_shared_memory(dtype, [NUM_BUFFERS, BLOCK_M, BLOCK_N], b_layout)
  c_smem = gl.allocate_shared_memory(dtype, c_shape, c_layout)
  bars = gl.allocate_shared_memory(gl.int64, [NUM_BUFFERS, 1], mbarrier.MBarrierLayout())
  for i in gl.static_range(NUM_BUFFERS):
    mbarrier.init(bars.index(i), count=1)

  tiles_k = gl.cdiv(KA, BLOCK_K)
  tiles_n = gl.cdiv(N, BLOCK_N)
  per_group = tiles_k * tiles_n
  num_tiles = G * per_group
  pid = gl.program_id(0)

  # Pass 1: zeros for the tiles of empty groups; count the items of the rest.
  total = 0
  zeros = gl.zeros((BLOCK_K, BLOCK_N), gl.float32, acc_layout)
  for tile in range(pid, num_tiles, NUM_PROGRAMS):
    gi, pid_k, pid_n = _tile_coords(tile, per_group, tiles_k, tiles_n, GROUP_SIZE)
    _, steps = _tile_steps(group_offsets_ptr, gi, BLOCK_M)
    total += steps
    if steps == 0:
      _store_tile(zeros, c_smem, out_desc, gi, pid_k * BLOCK_K, pid_n * BLOCK_N,
                  BLOCK_K, BLOCK_N, OUT_TRANSPOSED)

  # Pass 2: one loop over the (tile, step) items. The producer cursor runs
  # AHEAD items in front of the consumer cursor.
  AHEAD: gl.constexpr = NUM_BUFFERS - 2
  load_bytes: gl.constexpr = (BLOCK_K * BLOCK_M + BLOCK_M * BLOCK_N) * dtype.primitive_bitwidth // 8

  p_tile = _next_busy_tile(pid, num_tiles, per_group, group_offsets_ptr,
                           NUM_PROGRAMS, BLOCK_K, BLOCK_M)
  p_step = 0
  c_tile = p_tile
  c_step = 0
  acc = gl.zeros((BLOCK_K, BLOCK_N), gl.float32, acc_layout)
  for item in range(total + AHEAD):
    # Producer: the loads of item `item` (none past the end).
    if item < total:
      gi, pid_k, pid_n = _tile_coords(p_tile, per_group, tiles_k, tiles_n, GROUP_SIZE)
      start, steps = _tile_steps(group_offsets_ptr, gi, BLOCK_M)
      a_start = gl.load(a_col_offsets_ptr + gi)
      slot = item % NUM_BUFFERS
      bar = bars.index(slot)
      mbarrier.expect(bar, load_bytes)
      tma.async_copy_global_to_shared(a_desc, [pid_k * BLOCK_K, a_start + p_step * BLOCK_M],
                                      bar, a_bufs.index(slot))
      tma.async_copy_global_to_shared(b_desc, [start + p_step * BLOCK_M, pid_n * BLOCK_N],
                                      bar, b_bufs.index(slot))
      p_step += 1
      if p_step == steps:
        p_step = 0
        p_tile = _next_busy_tile(p_tile + NUM_PROGRAMS, num_tiles, per_group,
                                 group_offsets_ptr, NUM_PROGRAMS, BLOCK_K, BLOCK_M)
    # Consumer: the MMA of item `item - AHEAD`.
    if item >= AHEAD:
      c_item = item - AHEAD
      slot = c_item % NUM_BUFFERS
      mbarrier.wait(bars.index(slot), (c_item // NUM_BUFFERS) & 1)
      acc = warpgroup_mma(a_bufs.index(slot), b_bufs.index(slot), acc,
                          use_acc=c_step > 0, is_async=True)
      # At most this MMA in flight: the previous item's buffers are free.
      acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
      gi, pid_k, pid_n = _tile_coords(c_tile, per_group, tiles_k, tiles_n, GROUP_SIZE)
      _, steps = _tile_steps(group_offsets_ptr, gi, BLOCK_M)
      c_step += 1
      if c_step == steps:
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        _store_tile(acc, c_smem, out_desc, gi, pid_k * BLOCK_K, pid_n * BLOCK_N,
                    BLOCK_K, BLOCK_N, OUT_TRANSPOSED)
        c_step = 0
        c_tile = _next_busy_tile(c_tile + NUM_PROGRAMS, num_tiles, per_group,
                                 group_offsets_ptr, NUM_PROGRAMS, BLOCK_K, BLOCK_M)
  tma.store_wait(pendings=0)
  for i in gl.static_range(NUM_BUFFERS):
    mbarrier.invalidate(bars.index(i))
