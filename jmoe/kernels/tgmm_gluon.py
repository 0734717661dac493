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

- The loads run `NUM_BUFFERS - 1` items ahead of the MMAs, across tile ends,
  so the next tile's operands arrive while this tile's epilogue runs.
- The epilogue stores by TMA and does not wait for it; the store buffer is
  waited on only before the next epilogue writes it.
- Per-tile state (group, offsets, step count) is loaded a whole tile ahead,
  so no global load sits between two items.
- Tiles of groups with no rows have no items; the consumer stores their zeros
  when it skips them.

Each item is one `[BLOCK_K, BLOCK_M] x [BLOCK_M, BLOCK_N]` wgmma. Rows of `b`
past a group's end are read (the next group's rows, or TMA's zeros past `MB`);
the matching columns of `a` are zeros, so they add nothing unless `b` holds
inf / NaN there (as the Triton kernel with `B_BOUNDED=False`).

Two schedules: `_tgmm_gluon_kernel` (one partition: every warp issues the
loads and the MMAs) and `_tgmm_gluon_ws_kernel` (warp-specialised: a producer
warp and the consumer warp groups, `JMOE_TGMM_GLUON_WS`, the default).

Measured on the H100 against the Triton TMA kernel (dW_up + dW_down^T, column
copies included; benchmarks/results/h100-sweeps/session15/): bit-identical;
64 experts 2.11 -> 2.07 / 2.06 ms (ws / one partition, inside the spread),
Mixtral-like 9.11 -> 10.46 / 10.34 ms, small equal. So `JMOE_TGMM_KERNEL=auto`
does not pick it.

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
def _busy_tile(tile, num_tiles, per_group, tiles_k, tiles_n, group_offsets_ptr,
               a_col_offsets_ptr, c_smem, out_desc, STORE_EMPTY: gl.constexpr,
               NUM_PROGRAMS: gl.constexpr, BLOCK_M: gl.constexpr,
               BLOCK_K: gl.constexpr, BLOCK_N: gl.constexpr,
               GROUP_SIZE: gl.constexpr, OUT_TRANSPOSED: gl.constexpr,
               acc_layout: gl.constexpr):
  """The first tile at or after `tile` (stride `NUM_PROGRAMS`) whose group has
  rows: `(tile, gi, k0, n0, start, a_start, steps)`; `tile >= num_tiles` when
  there is none. With `STORE_EMPTY` it stores zeros into the tiles it skips."""
  gi, pid_k, pid_n = _tile_coords(gl.minimum(tile, num_tiles - 1), per_group, tiles_k,
                                  tiles_n, GROUP_SIZE)
  start, steps = _tile_steps(group_offsets_ptr, gi, BLOCK_M)
  while (tile < num_tiles) & (steps == 0):
    if STORE_EMPTY:
      _store_tile(gl.zeros((BLOCK_K, BLOCK_N), gl.float32, acc_layout), c_smem,
                  out_desc, gi, pid_k * BLOCK_K, pid_n * BLOCK_N, BLOCK_K, BLOCK_N,
                  OUT_TRANSPOSED)
    tile += NUM_PROGRAMS
    gi, pid_k, pid_n = _tile_coords(gl.minimum(tile, num_tiles - 1), per_group,
                                    tiles_k, tiles_n, GROUP_SIZE)
    start, steps = _tile_steps(group_offsets_ptr, gi, BLOCK_M)
  a_start = gl.load(a_col_offsets_ptr + gi)
  return tile, gi, pid_k * BLOCK_K, pid_n * BLOCK_N, start, a_start, gl.maximum(steps, 1)


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


@gluon.constexpr_function
def _acc_layout(num_warps, BLOCK_N):
  """The wgmma accumulator layout of a `[BLOCK_K, BLOCK_N]` tile: warps stacked
  along its rows (a warp group per 64 rows)."""
  return gl.NVMMADistributedLayout(
      version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16])


@gluon.jit
def _operands(a_ptr, b_ptr, out_ptr, G, MB, KA_Q, N_Q, MA_Q, OUT_TRANSPOSED: gl.constexpr,
              NUM_BUFFERS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr,
              BLOCK_N: gl.constexpr):
  """Both schedules' setup: the TMA descriptors of `a`, `b` and `out` (3-D, so
  edge tiles clip per group), the operand ring and the store buffer in shared
  memory, and the tile grid `(tiles_k, tiles_n, per_group, num_tiles)`."""
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
  a_bufs = gl.allocate_shared_memory(dtype, [NUM_BUFFERS, BLOCK_K, BLOCK_M], a_layout)
  b_bufs = gl.allocate_shared_memory(dtype, [NUM_BUFFERS, BLOCK_M, BLOCK_N], b_layout)
  c_smem = gl.allocate_shared_memory(dtype, c_shape, c_layout)
  tiles_k = gl.cdiv(KA, BLOCK_K)
  tiles_n = gl.cdiv(N, BLOCK_N)
  per_group = tiles_k * tiles_n
  return (a_desc, b_desc, out_desc, a_bufs, b_bufs, c_smem, tiles_k, tiles_n, per_group,
          G * per_group)


@gluon.jit
def _consumer_start(pid, num_tiles, per_group, tiles_k, tiles_n, group_offsets_ptr,
                    a_col_offsets_ptr, c_smem, out_desc, NUM_PROGRAMS: gl.constexpr,
                    BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr, BLOCK_N: gl.constexpr,
                    GROUP_SIZE: gl.constexpr, OUT_TRANSPOSED: gl.constexpr,
                    acc_layout: gl.constexpr):
  """The consumer's cursor at the start (both schedules): program `pid`'s first
  busy tile and the one after it (zeros stored into the empty tiles passed), as
  `(c_tile, c_gi, c_k0, c_n0, c_steps, cn_tile, cn_gi, cn_k0, cn_n0, cn_steps)`."""
  c_tile, c_gi, c_k0, c_n0, _, _, c_steps = _busy_tile(
      pid, num_tiles, per_group, tiles_k, tiles_n, group_offsets_ptr, a_col_offsets_ptr,
      c_smem, out_desc, True, NUM_PROGRAMS, BLOCK_M, BLOCK_K, BLOCK_N, GROUP_SIZE,
      OUT_TRANSPOSED, acc_layout)
  cn_tile, cn_gi, cn_k0, cn_n0, _, _, cn_steps = _busy_tile(
      c_tile + NUM_PROGRAMS, num_tiles, per_group, tiles_k, tiles_n, group_offsets_ptr,
      a_col_offsets_ptr, c_smem, out_desc, True, NUM_PROGRAMS, BLOCK_M, BLOCK_K, BLOCK_N,
      GROUP_SIZE, OUT_TRANSPOSED, acc_layout)
  return c_tile, c_gi, c_k0, c_n0, c_steps, cn_tile, cn_gi, cn_k0, cn_n0, cn_steps


@gluon.jit
def _finish_tile(acc, c_smem, out_desc, c_gi, c_k0, c_n0, cn_tile, cn_gi, cn_k0, cn_n0,
                 cn_steps, num_tiles, per_group, tiles_k, tiles_n, group_offsets_ptr,
                 a_col_offsets_ptr, NUM_PROGRAMS: gl.constexpr, BLOCK_M: gl.constexpr,
                 BLOCK_K: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_SIZE: gl.constexpr,
                 OUT_TRANSPOSED: gl.constexpr, acc_layout: gl.constexpr):
  """The consumer's end of a tile: waits for its last MMA, stores it, and moves
  the cursor on: the next busy tile becomes current and the one after it is
  looked up (zeros stored into the empty tiles passed). Returns the tile's
  result and the cursor `(c_tile, c_gi, c_k0, c_n0, c_steps, cn_...)`."""
  acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
  _store_tile(acc, c_smem, out_desc, c_gi, c_k0, c_n0, BLOCK_K, BLOCK_N, OUT_TRANSPOSED)
  nn_tile, nn_gi, nn_k0, nn_n0, _, _, nn_steps = _busy_tile(
      cn_tile + NUM_PROGRAMS, num_tiles, per_group, tiles_k, tiles_n, group_offsets_ptr,
      a_col_offsets_ptr, c_smem, out_desc, True, NUM_PROGRAMS, BLOCK_M, BLOCK_K, BLOCK_N,
      GROUP_SIZE, OUT_TRANSPOSED, acc_layout)
  return (acc, cn_tile, cn_gi, cn_k0, cn_n0, cn_steps, nn_tile, nn_gi, nn_k0, nn_n0,
          nn_steps)


@gluon.jit
def _issue_loads(p_item, p_step, p_tile, p_k0, p_n0, p_start, p_a_start, p_steps,
                 pn_tile, pn_k0, pn_n0, pn_start, pn_a_start, pn_steps, a_desc, b_desc,
                 a_bufs, b_bufs, bars, num_tiles, per_group, tiles_k, tiles_n,
                 group_offsets_ptr, a_col_offsets_ptr, c_smem, out_desc,
                 NUM_BUFFERS: gl.constexpr, NUM_PROGRAMS: gl.constexpr,
                 BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr, BLOCK_N: gl.constexpr,
                 GROUP_SIZE: gl.constexpr, OUT_TRANSPOSED: gl.constexpr,
                 acc_layout: gl.constexpr):
  """The producer: TMA loads of item `p_item` (step `p_step` of tile `p_tile`)
  into slot `p_item % NUM_BUFFERS`, then the cursor one item on (nothing once
  the program's tiles are done). Returns the cursor state."""
  if p_tile < num_tiles:
    slot = p_item % NUM_BUFFERS
    bar = bars.index(slot)
    mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes)
    row = p_step * BLOCK_M
    tma.async_copy_global_to_shared(a_desc, [p_k0, p_a_start + row], bar,
                                    a_bufs.index(slot))
    tma.async_copy_global_to_shared(b_desc, [p_start + row, p_n0], bar, b_bufs.index(slot))
    p_item += 1
    p_step += 1
    if p_step == p_steps:
      p_step = 0
      p_tile, p_k0, p_n0, p_start, p_a_start, p_steps = (
          pn_tile, pn_k0, pn_n0, pn_start, pn_a_start, pn_steps)
      pn_tile, _, pn_k0, pn_n0, pn_start, pn_a_start, pn_steps = _busy_tile(
          pn_tile + NUM_PROGRAMS, num_tiles, per_group, tiles_k, tiles_n,
          group_offsets_ptr, a_col_offsets_ptr, c_smem, out_desc, False, NUM_PROGRAMS,
          BLOCK_M, BLOCK_K, BLOCK_N, GROUP_SIZE, OUT_TRANSPOSED, acc_layout)
  return (p_item, p_step, p_tile, p_k0, p_n0, p_start, p_a_start, p_steps, pn_tile,
          pn_k0, pn_n0, pn_start, pn_a_start, pn_steps)


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
    NUM_BUFFERS: gl.constexpr,  # operand ring depth (loads run NUM_BUFFERS-1 ahead)
    BLOCK_M: gl.constexpr,  # rows per step (divides 64)
    BLOCK_K: gl.constexpr,  # output tile rows
    BLOCK_N: gl.constexpr,  # output tile columns
    GROUP_SIZE: gl.constexpr,
):
  num_warps: gl.constexpr = gl.num_warps()
  gl.static_assert(NUM_BUFFERS >= 2, "loads run NUM_BUFFERS - 1 items ahead")
  gl.static_assert(num_warps % 4 == 0, "whole warp groups")
  (a_desc, b_desc, out_desc, a_bufs, b_bufs, c_smem, tiles_k, tiles_n, per_group,
   num_tiles) = _operands(a_ptr, b_ptr, out_ptr, G, MB, KA_Q, N_Q, MA_Q, OUT_TRANSPOSED,
                          NUM_BUFFERS, BLOCK_M, BLOCK_K, BLOCK_N)
  acc_layout: gl.constexpr = _acc_layout(num_warps, BLOCK_N)
  bars = gl.allocate_shared_memory(gl.int64, [NUM_BUFFERS, 1], mbarrier.MBarrierLayout())
  for i in gl.static_range(NUM_BUFFERS):
    mbarrier.init(bars.index(i), count=1)

  pid = gl.program_id(0)

  # One loop over the program's (tile, step) items: the consumer cursor (c_*)
  # issues the MMA of item `c_item`, then the producer cursor (p_*) the loads
  # of item `c_item + NUM_BUFFERS - 1` into the slot that MMA `c_item - 1`
  # (now complete) read. Each cursor also holds the state of its next busy
  # tile (pn_*, cn_*), loaded a whole tile early, so no global load sits
  # between two items.
  (c_tile, c_gi, c_k0, c_n0, c_steps, cn_tile, cn_gi, cn_k0, cn_n0,
   cn_steps) = _consumer_start(
       pid, num_tiles, per_group, tiles_k, tiles_n, group_offsets_ptr, a_col_offsets_ptr,
       c_smem, out_desc, NUM_PROGRAMS, BLOCK_M, BLOCK_K, BLOCK_N, GROUP_SIZE,
       OUT_TRANSPOSED, acc_layout)
  p_tile, _, p_k0, p_n0, p_start, p_a_start, p_steps = _busy_tile(
      pid, num_tiles, per_group, tiles_k, tiles_n, group_offsets_ptr, a_col_offsets_ptr,
      c_smem, out_desc, False, NUM_PROGRAMS, BLOCK_M, BLOCK_K, BLOCK_N, GROUP_SIZE,
      OUT_TRANSPOSED, acc_layout)
  pn_tile, _, pn_k0, pn_n0, pn_start, pn_a_start, pn_steps = _busy_tile(
      p_tile + NUM_PROGRAMS, num_tiles, per_group, tiles_k, tiles_n, group_offsets_ptr,
      a_col_offsets_ptr, c_smem, out_desc, False, NUM_PROGRAMS, BLOCK_M, BLOCK_K,
      BLOCK_N, GROUP_SIZE, OUT_TRANSPOSED, acc_layout)
  p_item = 0
  p_step = 0
  for _ in range(NUM_BUFFERS - 1):
    (p_item, p_step, p_tile, p_k0, p_n0, p_start, p_a_start, p_steps, pn_tile, pn_k0,
     pn_n0, pn_start, pn_a_start, pn_steps) = _issue_loads(
         p_item, p_step, p_tile, p_k0, p_n0, p_start, p_a_start, p_steps, pn_tile,
         pn_k0, pn_n0, pn_start, pn_a_start, pn_steps, a_desc, b_desc, a_bufs, b_bufs,
         bars, num_tiles, per_group, tiles_k, tiles_n, group_offsets_ptr,
         a_col_offsets_ptr, c_smem, out_desc, NUM_BUFFERS, NUM_PROGRAMS, BLOCK_M,
         BLOCK_K, BLOCK_N, GROUP_SIZE, OUT_TRANSPOSED, acc_layout)
  c_item = 0
  c_step = 0
  acc = gl.zeros((BLOCK_K, BLOCK_N), gl.float32, acc_layout)
  while c_tile < num_tiles:
    slot = c_item % NUM_BUFFERS
    mbarrier.wait(bars.index(slot), (c_item // NUM_BUFFERS) & 1)
    acc = warpgroup_mma(a_bufs.index(slot), b_bufs.index(slot), acc,
                        use_acc=c_step > 0, is_async=True)
    # At most this MMA in flight: the previous item's slot is free.
    acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
    (p_item, p_step, p_tile, p_k0, p_n0, p_start, p_a_start, p_steps, pn_tile, pn_k0,
     pn_n0, pn_start, pn_a_start, pn_steps) = _issue_loads(
         p_item, p_step, p_tile, p_k0, p_n0, p_start, p_a_start, p_steps, pn_tile,
         pn_k0, pn_n0, pn_start, pn_a_start, pn_steps, a_desc, b_desc, a_bufs, b_bufs,
         bars, num_tiles, per_group, tiles_k, tiles_n, group_offsets_ptr,
         a_col_offsets_ptr, c_smem, out_desc, NUM_BUFFERS, NUM_PROGRAMS, BLOCK_M,
         BLOCK_K, BLOCK_N, GROUP_SIZE, OUT_TRANSPOSED, acc_layout)
    c_item += 1
    c_step += 1
    if c_step == c_steps:
      c_step = 0
      (acc, c_tile, c_gi, c_k0, c_n0, c_steps, cn_tile, cn_gi, cn_k0, cn_n0,
       cn_steps) = _finish_tile(
           acc, c_smem, out_desc, c_gi, c_k0, c_n0, cn_tile, cn_gi, cn_k0, cn_n0,
           cn_steps, num_tiles, per_group, tiles_k, tiles_n, group_offsets_ptr,
           a_col_offsets_ptr, NUM_PROGRAMS, BLOCK_M, BLOCK_K, BLOCK_N, GROUP_SIZE,
           OUT_TRANSPOSED, acc_layout)
  tma.store_wait(pendings=0)
  for i in gl.static_range(NUM_BUFFERS):
    mbarrier.invalidate(bars.index(i))


# ----------------------------------------------------------------------------
# Warp-specialised variant: one producer warp issues the TMA loads, the
# `num_warps` consumer warps (two warp groups at 128 rows) run the MMAs and the
# epilogue. The producer waits on `empty[slot]` (released by the consumers once
# the MMA that read the slot is complete), so the loads run up to NUM_BUFFERS
# items ahead, and neither side waits at the other's CTA-wide barriers (the
# single-partition kernel syncs all warps around every TMA issue).
# ----------------------------------------------------------------------------


@gluon.jit
def _ws_producer(a_desc, b_desc, a_bufs, b_bufs, ready, empty, c_smem, out_desc,
                 group_offsets_ptr, a_col_offsets_ptr, num_tiles, per_group, tiles_k,
                 tiles_n, NUM_BUFFERS: gl.constexpr, NUM_PROGRAMS: gl.constexpr,
                 BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr, BLOCK_N: gl.constexpr,
                 GROUP_SIZE: gl.constexpr, OUT_TRANSPOSED: gl.constexpr,
                 acc_layout: gl.constexpr):
  p_tile, _, k0, n0, start, a_start, steps = _busy_tile(
      gl.program_id(0), num_tiles, per_group, tiles_k, tiles_n, group_offsets_ptr,
      a_col_offsets_ptr, c_smem, out_desc, False, NUM_PROGRAMS, BLOCK_M, BLOCK_K,
      BLOCK_N, GROUP_SIZE, OUT_TRANSPOSED, acc_layout)
  p_item = 0
  while p_tile < num_tiles:
    for step in range(steps):
      slot = p_item % NUM_BUFFERS
      # The first round passes at once (parity 1 of a fresh barrier).
      mbarrier.wait(empty.index(slot), ((p_item // NUM_BUFFERS) & 1) ^ 1)
      bar = ready.index(slot)
      mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes)
      row = step * BLOCK_M
      tma.async_copy_global_to_shared(a_desc, [k0, a_start + row], bar, a_bufs.index(slot))
      tma.async_copy_global_to_shared(b_desc, [start + row, n0], bar, b_bufs.index(slot))
      p_item += 1
    p_tile, _, k0, n0, start, a_start, steps = _busy_tile(
        p_tile + NUM_PROGRAMS, num_tiles, per_group, tiles_k, tiles_n, group_offsets_ptr,
        a_col_offsets_ptr, c_smem, out_desc, False, NUM_PROGRAMS, BLOCK_M, BLOCK_K,
        BLOCK_N, GROUP_SIZE, OUT_TRANSPOSED, acc_layout)


@gluon.jit
def _ws_consumer(a_bufs, b_bufs, ready, empty, c_smem, out_desc, group_offsets_ptr,
                 a_col_offsets_ptr, num_tiles, per_group, tiles_k, tiles_n,
                 NUM_BUFFERS: gl.constexpr, NUM_PROGRAMS: gl.constexpr,
                 BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr, BLOCK_N: gl.constexpr,
                 GROUP_SIZE: gl.constexpr, OUT_TRANSPOSED: gl.constexpr,
                 acc_layout: gl.constexpr):
  pid = gl.program_id(0)
  (c_tile, c_gi, c_k0, c_n0, c_steps, cn_tile, cn_gi, cn_k0, cn_n0,
   cn_steps) = _consumer_start(
       pid, num_tiles, per_group, tiles_k, tiles_n, group_offsets_ptr, a_col_offsets_ptr,
       c_smem, out_desc, NUM_PROGRAMS, BLOCK_M, BLOCK_K, BLOCK_N, GROUP_SIZE,
       OUT_TRANSPOSED, acc_layout)
  c_item = 0
  c_step = 0
  acc = gl.zeros((BLOCK_K, BLOCK_N), gl.float32, acc_layout)
  while c_tile < num_tiles:
    slot = c_item % NUM_BUFFERS
    mbarrier.wait(ready.index(slot), (c_item // NUM_BUFFERS) & 1)
    acc = warpgroup_mma(a_bufs.index(slot), b_bufs.index(slot), acc,
                        use_acc=c_step > 0, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
    # The previous item's MMA is complete: its slot goes back to the producer.
    mbarrier.arrive(empty.index((c_item + NUM_BUFFERS - 1) % NUM_BUFFERS), pred=c_item > 0)
    c_item += 1
    c_step += 1
    if c_step == c_steps:
      c_step = 0
      (acc, c_tile, c_gi, c_k0, c_n0, c_steps, cn_tile, cn_gi, cn_k0, cn_n0,
       cn_steps) = _finish_tile(
           acc, c_smem, out_desc, c_gi, c_k0, c_n0, cn_tile, cn_gi, cn_k0, cn_n0,
           cn_steps, num_tiles, per_group, tiles_k, tiles_n, group_offsets_ptr,
           a_col_offsets_ptr, NUM_PROGRAMS, BLOCK_M, BLOCK_K, BLOCK_N, GROUP_SIZE,
           OUT_TRANSPOSED, acc_layout)
  tma.store_wait(pendings=0)


@gluon.jit
def _tgmm_gluon_ws_kernel(
    a_ptr, b_ptr, group_offsets_ptr, a_col_offsets_ptr, G, MB, KA_Q, N_Q, MA_Q, out_ptr,
    OUT_TRANSPOSED: gl.constexpr,
    NUM_PROGRAMS: gl.constexpr,
    NUM_BUFFERS: gl.constexpr,  # operand ring depth (loads run up to this far ahead)
    BLOCK_M: gl.constexpr,
    BLOCK_K: gl.constexpr,
    BLOCK_N: gl.constexpr,
    GROUP_SIZE: gl.constexpr,
):
  """`_tgmm_gluon_kernel`'s arguments and result; warp-specialised (above)."""
  num_warps: gl.constexpr = gl.num_warps()
  gl.static_assert(num_warps % 4 == 0, "whole warp groups")
  (a_desc, b_desc, out_desc, a_bufs, b_bufs, c_smem, tiles_k, tiles_n, per_group,
   num_tiles) = _operands(a_ptr, b_ptr, out_ptr, G, MB, KA_Q, N_Q, MA_Q, OUT_TRANSPOSED,
                          NUM_BUFFERS, BLOCK_M, BLOCK_K, BLOCK_N)
  acc_layout: gl.constexpr = _acc_layout(num_warps, BLOCK_N)
  ready = gl.allocate_shared_memory(gl.int64, [NUM_BUFFERS, 1], mbarrier.MBarrierLayout())
  empty = gl.allocate_shared_memory(gl.int64, [NUM_BUFFERS, 1], mbarrier.MBarrierLayout())
  for i in gl.static_range(NUM_BUFFERS):
    mbarrier.init(ready.index(i), count=1)
    mbarrier.init(empty.index(i), count=1)
  gl.warp_specialize([
      (_ws_consumer, (a_bufs, b_bufs, ready, empty, c_smem, out_desc, group_offsets_ptr,
                      a_col_offsets_ptr, num_tiles, per_group, tiles_k, tiles_n,
                      NUM_BUFFERS, NUM_PROGRAMS, BLOCK_M, BLOCK_K, BLOCK_N, GROUP_SIZE,
                      OUT_TRANSPOSED, acc_layout)),
      (_ws_producer, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, c_smem, out_desc,
                      group_offsets_ptr, a_col_offsets_ptr, num_tiles, per_group, tiles_k,
                      tiles_n, NUM_BUFFERS, NUM_PROGRAMS, BLOCK_M, BLOCK_K, BLOCK_N,
                      GROUP_SIZE, OUT_TRANSPOSED, acc_layout)),
  ], [1], [48])
  for i in gl.static_range(NUM_BUFFERS):
    mbarrier.invalidate(ready.index(i))
    mbarrier.invalidate(empty.index(i))
