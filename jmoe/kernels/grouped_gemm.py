"""Grouped GEMM kernels over a tile schedule (only `@triton.jit` code, no jax).

Rows of the output ("slots") are sorted by group (expert): group `g` owns the
contiguous rows `[start_g, end_g)`. A tile schedule `tiles [3, NUM_TILES]`
int32 (built by `jmoe.ops.align`) lists, per BLOCK_M row tile:

  tiles[0, i]  group of the tile, or -1 for a "zero tile" whose rows are
               written with zeros (rows past the last group);
  tiles[1, i]  first row of the tile;
  tiles[2, i]  one past its last row (<= first row + BLOCK_M). A tile with
               `start >= end` is idle: its programs exit at once.

Every tile belongs to one group, so one program multiplies its rows by one
weight matrix `B[g] = b[g, :, :]` (strides `STRIDE_BG, STRIDE_BK, STRIDE_BN`;
a transposed weight is just other strides). With `GATHER_A`, row `r` of the
output reads row `row_index[r]` of `a` inside the GEMM (no gathered copy).

Work items are (row tile, column block) pairs, `NUM_TILES * cdiv(N, BLOCK_N)`
of them, ordered with a GROUP_M swizzle for L2 reuse of `a` rows. One
program per item, or (`PERSISTENT`) `NUM_PROGRAMS` programs that each walk
the items `pid, pid + NUM_PROGRAMS, ...`.

Three entry points share `_tile_coords` and `_mainloop`:
- `_grouped_gemm_kernel`: `c[r] = s_r * (a[row(r)] @ B[g])` (`SCALE_ROWS`).
- `_grouped_gemm_act_kernel`: the expert up projection with the activation
  in the epilogue, optionally gated (gate columns `[0, F)`, up `[F, 2F)` of
  `B[g]`, both tiles computed by the same program) and optionally storing
  the pre-activation for the backward. With `WIDE` (weights through
  pointers) the gate and up columns of a block come as one `[BLOCK_K, 2
  BLOCK_N]` tile and one accumulator (`_mainloop_wide`: one N = 256 wgmma
  per step, no register spills), split for the epilogue.
- `_grouped_gemm_act_bwd_kernel`: `g = dy[row(r)] @ down[g]^T` with the
  activation backward in the epilogue: `d_pre` and per-column-block partial
  sums of `<h, g>` (the router-weight gradient, summed later in a fixed order).
  With `SPLIT_N = 2` a program holds two BLOCK_N-wide accumulators that share
  each loaded dy tile (`_mainloop`'s `SPLIT`) and runs `act_bwd_epilogue`
  on one after the other.

Dot operands are upcast to float32 when `DOT_F32` (Triton's interpreter gets
bf16/fp16 `tl.dot` wrong); accumulation is always float32.

`B_TMA` (all three) loads the weight tiles by TMA through one 3-D descriptor
`[NUM_GROUPS, K, cols]` (`[NUM_GROUPS, cols, K]` read transposed), so a tile
never reads another group's weights and the K tail reads zeros; `A_TMA` (the
plain and act kernels, `a` not gathered: a sorted copy) loads the `a` tiles
by TMA too; in the plain kernel `FLATTEN` then fuses the persistent item and
K loops (the act kernel's loops stay nested: its fused loop measured slower). The
descriptors are built on the device once per program (`_descriptors`), in
Triton's hidden scratch argument (`jmoe.ops._hidden_scratch`): that is what
`PERSISTENT` amortises. Without them every load is a `cp.async` through
pointers.
"""

import triton
import triton.language as tl

from jmoe.kernels.act_bwd import act_bwd_epilogue
from jmoe.kernels.activations import act_fwd
from jmoe.kernels.rounding import round_to
from jmoe.kernels.swizzle import band_swizzle


@triton.jit
def _tile_coords(
    item,
    tiles_ptr,
    NUM_TILES: tl.constexpr,
    num_pid_m,
    N: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
):
  """(column block, group, row start, row end) of work item `item` of the
  first `num_pid_m` tiles (`NUM_TILES`, or the active ones: `_active_tiles`)."""
  pid_m, pid_n = band_swizzle(item, num_pid_m, (N + BLOCK_N - 1) // BLOCK_N, GROUP_M)
  expert = tl.load(tiles_ptr + pid_m)
  row_start = tl.load(tiles_ptr + NUM_TILES + pid_m)
  row_end = tl.load(tiles_ptr + 2 * NUM_TILES + pid_m)
  return pid_n, expert, row_start, row_end


@triton.jit
def _active_tiles(tiles_ptr, NUM_TILES: tl.constexpr):
  """Entries of the tile schedule that are not idle (`start < end`); the
  schedules of `jmoe.ops.align` list them first."""
  active = 0
  for first in range(0, NUM_TILES, 256):
    offs = first + tl.arange(0, 256)
    inside = offs < NUM_TILES
    start = tl.load(tiles_ptr + NUM_TILES + offs, mask=inside, other=0)
    end = tl.load(tiles_ptr + 2 * NUM_TILES + offs, mask=inside, other=0)
    active += tl.sum((start < end).to(tl.int32))
  return active


@triton.jit
def _descriptors(
    a_ptr,
    b_ptr,
    A_TMA: tl.constexpr,
    B_TMA: tl.constexpr,
    ROWS_A: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    COLS: tl.constexpr,
    K: tl.constexpr,
    STRIDE_AM: tl.constexpr,
    STRIDE_BG: tl.constexpr,
    STRIDE_BK: tl.constexpr,
    STRIDE_BN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
  """`(a, b)`: TMA descriptors where `A_TMA` / `B_TMA`, else the pointers.

  `a [ROWS_A, K]` row-major; `b` as `[NUM_GROUPS, K, COLS]`, or
  `[NUM_GROUPS, COLS, K]` when read transposed (`STRIDE_BK == 1`).
  """
  a = a_ptr
  b = b_ptr
  if A_TMA:
    a = tl.make_tensor_descriptor(
        a_ptr, shape=[ROWS_A, K], strides=[STRIDE_AM, 1],
        block_shape=[BLOCK_M, BLOCK_K])
  if B_TMA:
    if STRIDE_BK == 1:
      b = tl.make_tensor_descriptor(
          b_ptr, shape=[NUM_GROUPS, COLS, K], strides=[STRIDE_BG, STRIDE_BN, 1],
          block_shape=[1, BLOCK_N, BLOCK_K])
    else:
      b = tl.make_tensor_descriptor(
          b_ptr, shape=[NUM_GROUPS, K, COLS], strides=[STRIDE_BG, STRIDE_BK, 1],
          block_shape=[1, BLOCK_K, BLOCK_N])
  return a, b


@triton.jit
def _b_tile(b_desc, expert, k0, n0, STRIDE_BK: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr):
  """The `[BLOCK_K, BLOCK_N]` tile of `B[expert]` at `(k0, n0)` by TMA."""
  if STRIDE_BK == 1:
    tile = tl.trans(b_desc.load([expert, n0, k0]).reshape(BLOCK_N, BLOCK_K))
  else:
    tile = b_desc.load([expert, k0, n0]).reshape(BLOCK_K, BLOCK_N)
  return tile


@triton.jit
def _a_tile_ptrs(
    a_ptr, row_index_ptr, row_start, row_end, STRIDE_AM: tl.constexpr,
    STRIDE_AK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    GATHER_A: tl.constexpr,
):
  """Pointers `[BLOCK_M, BLOCK_K]` to the first K step of a tile's `a` rows:
  row `row_index[r]` (`GATHER_A`) or `r` for `r` in `row_start ...`, rows
  past `row_end` clamped to `row_start` (read, never stored)."""
  offs_m = row_start + tl.arange(0, BLOCK_M)
  rows = tl.where(offs_m < row_end, offs_m, row_start)
  if GATHER_A:
    a_rows = tl.load(row_index_ptr + rows)
  else:
    a_rows = rows
  return (a_ptr + a_rows.to(tl.int64)[:, None] * STRIDE_AM
          + tl.arange(0, BLOCK_K)[None, :] * STRIDE_AK)


@triton.jit
def _mainloop(
    a_ptr,
    b_ptr,
    b_desc,
    row_index_ptr,
    expert,
    row_start,
    row_end,
    pid_n,
    N: tl.constexpr,
    K: tl.constexpr,
    STRIDE_AM: tl.constexpr,
    STRIDE_AK: tl.constexpr,
    STRIDE_BG: tl.constexpr,
    STRIDE_BK: tl.constexpr,
    STRIDE_BN: tl.constexpr,
    UP_OFFSET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GATHER_A: tl.constexpr,
    GATED: tl.constexpr,
    DOT_F32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    SPLIT: tl.constexpr,
    B_TMA: tl.constexpr,
):
  """float32 tile(s) `a[rows] @ B[expert][:, cols]` (and a second tile).

  The second tile (`GATED`: the up half, columns `cols + UP_OFFSET`; `SPLIT`:
  the next column block, columns `cols + BLOCK_N` wrapped at N, with
  `pid_n` counting BLOCK_N blocks) shares each loaded `a` tile.
  Rows past `row_end` are clamped to a valid row (their results are never
  stored) and columns past N wrap around, so loads need no M/N masks. A zero
  tile (`expert < 0`) runs no K iterations and returns zeros.

  `B_TMA`: the `B` tiles come from `b_desc` (`_b_tile`), which zero-fills the
  K tail and the columns past the group's end instead of wrapping.
  """
  offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
  offs_k = tl.arange(0, BLOCK_K)
  a_ptrs = _a_tile_ptrs(a_ptr, row_index_ptr, row_start, row_end, STRIDE_AM, STRIDE_AK,
                        BLOCK_M, BLOCK_K, GATHER_A)
  b_cols = offs_n % N
  b_ptrs = (
      b_ptr
      + tl.maximum(expert, 0).to(tl.int64) * STRIDE_BG
      + offs_k[:, None] * STRIDE_BK
      + b_cols[None, :] * STRIDE_BN
  )
  if SPLIT:
    b2_ptrs = (
        b_ptr
        + tl.maximum(expert, 0).to(tl.int64) * STRIDE_BG
        + offs_k[:, None] * STRIDE_BK
        + ((offs_n + BLOCK_N) % N)[None, :] * STRIDE_BN
    )
  acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
  acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
  n0 = pid_n * BLOCK_N
  num_k = tl.where(expert >= 0, tl.cdiv(K, BLOCK_K), 0)
  for kk in range(0, num_k):
    k0 = kk * BLOCK_K
    if K % BLOCK_K == 0:
      a = tl.load(a_ptrs)
    else:
      k_mask = offs_k < K - k0
      a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
    if B_TMA:
      b = _b_tile(b_desc, expert, k0, n0, STRIDE_BK, BLOCK_N, BLOCK_K)
    elif K % BLOCK_K == 0:
      b = tl.load(b_ptrs)
    else:
      b = tl.load(b_ptrs, mask=k_mask[:, None], other=0.0)
    if DOT_F32:
      a = a.to(tl.float32)
      b = b.to(tl.float32)
    acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    if GATED:
      if B_TMA:
        bu = _b_tile(b_desc, expert, k0, n0 + UP_OFFSET, STRIDE_BK, BLOCK_N, BLOCK_K)
      elif K % BLOCK_K == 0:
        bu = tl.load(b_ptrs + UP_OFFSET * STRIDE_BN)
      else:
        bu = tl.load(b_ptrs + UP_OFFSET * STRIDE_BN, mask=k_mask[:, None], other=0.0)
      if DOT_F32:
        bu = bu.to(tl.float32)
      acc_up = tl.dot(a, bu, acc_up, input_precision=INPUT_PRECISION)
    if SPLIT:
      if B_TMA:
        b2 = _b_tile(b_desc, expert, k0, n0 + BLOCK_N, STRIDE_BK, BLOCK_N, BLOCK_K)
      elif K % BLOCK_K == 0:
        b2 = tl.load(b2_ptrs)
      else:
        b2 = tl.load(b2_ptrs, mask=k_mask[:, None], other=0.0)
      if DOT_F32:
        b2 = b2.to(tl.float32)
      acc_up = tl.dot(a, b2, acc_up, input_precision=INPUT_PRECISION)
      b2_ptrs += BLOCK_K * STRIDE_BK
    a_ptrs += BLOCK_K * STRIDE_AK
    b_ptrs += BLOCK_K * STRIDE_BK
  return acc, acc_up


@triton.jit
def _mainloop_wide(
    a_ptr, b_ptr, row_index_ptr, expert, row_start, row_end, pid_n, F: tl.constexpr,
    K: tl.constexpr, STRIDE_AM: tl.constexpr, STRIDE_BG: tl.constexpr,
    STRIDE_BK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GATHER_A: tl.constexpr, DOT_F32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
  """The gated `_mainloop` (pointers, cp.async) as one `[BLOCK_M, 2 BLOCK_N]`
  product: each step loads the gate and up columns of the block as one
  `[BLOCK_K, 2 BLOCK_N]` weight tile (one wgmma of N = 2 BLOCK_N reads the `a`
  tile once); returns `(gate, up)` tiles split from the accumulator."""
  offs_k = tl.arange(0, BLOCK_K)
  a_ptrs = _a_tile_ptrs(a_ptr, row_index_ptr, row_start, row_end, STRIDE_AM, 1,
                        BLOCK_M, BLOCK_K, GATHER_A)
  j = tl.arange(0, 2 * BLOCK_N)
  cols = (pid_n * BLOCK_N + j % BLOCK_N) % F + (j // BLOCK_N) * F
  # Runs of 8 contiguous columns from multiples of 8 (F % 8 == 0): 16-byte copies.
  cols = tl.max_contiguous(tl.multiple_of(cols, 8), 8)
  b_ptrs = (b_ptr + tl.maximum(expert, 0).to(tl.int64) * STRIDE_BG
            + offs_k[:, None] * STRIDE_BK + cols[None, :])
  acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
  num_k = tl.where(expert >= 0, tl.cdiv(K, BLOCK_K), 0)
  for kk in range(0, num_k):
    if K % BLOCK_K == 0:
      a = tl.load(a_ptrs)
      b = tl.load(b_ptrs)
    else:
      k_mask = offs_k < K - kk * BLOCK_K
      a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
      b = tl.load(b_ptrs, mask=k_mask[:, None], other=0.0)
    if DOT_F32:
      a = a.to(tl.float32)
      b = b.to(tl.float32)
    acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    a_ptrs += BLOCK_K
    b_ptrs += BLOCK_K * STRIDE_BK
  return tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))


@triton.jit
def _mainloop_tma(
    a_desc,
    b_desc,
    expert,
    row_start,
    num_k,
    pid_n,
    UP_OFFSET: tl.constexpr,
    STRIDE_BK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GATED: tl.constexpr,
    DOT_F32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
  """`_mainloop` with both operands by TMA (`A_TMA`), over `num_k` steps of
  BLOCK_K: `(acc, acc_up)` (`acc_up`, columns `+ UP_OFFSET`, only if GATED).

  `a` is contiguous (no row gather): the tile holds rows `row_start ... +
  BLOCK_M`; rows past the tile's end read the next rows (their results are
  never stored), rows past `ROWS_A` and the K tail read zeros.
  """
  acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
  acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
  n0 = pid_n * BLOCK_N
  for kk in range(0, num_k):
    a = a_desc.load([row_start, kk * BLOCK_K])
    b = _b_tile(b_desc, expert, kk * BLOCK_K, n0, STRIDE_BK, BLOCK_N, BLOCK_K)
    if DOT_F32:
      a = a.to(tl.float32)
      b = b.to(tl.float32)
    acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    if GATED:
      bu = _b_tile(b_desc, expert, kk * BLOCK_K, n0 + UP_OFFSET, STRIDE_BK, BLOCK_N,
                   BLOCK_K)
      if DOT_F32:
        bu = bu.to(tl.float32)
      acc_up = tl.dot(a, bu, acc_up, input_precision=INPUT_PRECISION)
  return acc, acc_up


@triton.jit
def _mainloop_tma_item(
    a_desc, b_desc, expert, row_start, row_end, pid_n, K: tl.constexpr,
    UP_OFFSET: tl.constexpr, STRIDE_BK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GATED: tl.constexpr,
    FLATTEN: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
  """`_mainloop_tma` for one work item: zeros for a zero tile (`expert < 0`).

  No branch around the K loop (an idle tile stores nothing). `FLATTEN`: the
  flattened loop needs a K loop of the same length for every item, so a zero
  tile multiplies by group 0, then keeps zeros.
  """
  if FLATTEN:
    acc, acc_up = _mainloop_tma(
        a_desc, b_desc, tl.maximum(expert, 0), row_start, tl.cdiv(K, BLOCK_K), pid_n,
        UP_OFFSET, STRIDE_BK, BLOCK_M, BLOCK_N, BLOCK_K, GATED, DOT_F32,
        INPUT_PRECISION,
    )
    acc = tl.where(expert >= 0, acc, 0.0)
    acc_up = tl.where(expert >= 0, acc_up, 0.0)
  else:
    num_k = tl.where((expert >= 0) & (row_start < row_end), tl.cdiv(K, BLOCK_K), 0)
    acc, acc_up = _mainloop_tma(
        a_desc, b_desc, expert, row_start, num_k, pid_n, UP_OFFSET, STRIDE_BK,
        BLOCK_M, BLOCK_N, BLOCK_K, GATED, DOT_F32, INPUT_PRECISION,
    )
  return acc, acc_up


@triton.jit
def _plain_item(
    item, num_pid_m, a_ptr, a_desc, b_ptr, b_desc, tiles_ptr, row_index_ptr, row_scale_ptr,
    c_ptr, N: tl.constexpr, K: tl.constexpr, NUM_TILES: tl.constexpr,
    STRIDE_AM: tl.constexpr, STRIDE_AK: tl.constexpr, STRIDE_BG: tl.constexpr,
    STRIDE_BK: tl.constexpr, STRIDE_BN: tl.constexpr, STRIDE_CM: tl.constexpr,
    GATHER_A: tl.constexpr, SCALE_ROWS: tl.constexpr, DOT_F32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, B_TMA: tl.constexpr, A_TMA: tl.constexpr,
    FLATTEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
  """One work item of `_grouped_gemm_kernel` (of the first `num_pid_m` tiles)."""
  pid_n, expert, row_start, row_end = _tile_coords(
      item, tiles_ptr, NUM_TILES, num_pid_m, N, BLOCK_N, GROUP_M)
  if A_TMA:
    acc, _ = _mainloop_tma_item(
        a_desc, b_desc, expert, row_start, row_end, pid_n, K, 0, STRIDE_BK, BLOCK_M,
        BLOCK_N, BLOCK_K, False, FLATTEN, DOT_F32, INPUT_PRECISION,
    )
    _plain_epilogue(acc, row_scale_ptr, c_ptr, expert, row_start, row_end, pid_n, N,
                    STRIDE_CM, SCALE_ROWS, DOT_F32, BLOCK_M, BLOCK_N)
  elif row_start < row_end:
    acc, _ = _mainloop(
        a_ptr, b_ptr, b_desc, row_index_ptr, expert, row_start, row_end, pid_n,
        N, K, STRIDE_AM, STRIDE_AK, STRIDE_BG, STRIDE_BK, STRIDE_BN, 0,
        BLOCK_M, BLOCK_N, BLOCK_K, GATHER_A, False, DOT_F32, INPUT_PRECISION,
        False, B_TMA,
    )
    _plain_epilogue(acc, row_scale_ptr, c_ptr, expert, row_start, row_end, pid_n, N,
                    STRIDE_CM, SCALE_ROWS, DOT_F32, BLOCK_M, BLOCK_N)


@triton.jit
def _plain_epilogue(
    acc, row_scale_ptr, c_ptr, expert, row_start, row_end, pid_n, N: tl.constexpr,
    STRIDE_CM: tl.constexpr, SCALE_ROWS: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
  """Row scale and the masked store of one plain tile (rows before `row_end`)."""
  offs_m = row_start + tl.arange(0, BLOCK_M)
  mask_m = offs_m < row_end
  if SCALE_ROWS:
    s = tl.load(row_scale_ptr + offs_m, mask=mask_m & (expert >= 0), other=0.0)
    acc = acc * s[:, None]
  offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
  c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * STRIDE_CM + offs_n[None, :]
  mask = mask_m[:, None] & (offs_n < N)[None, :]
  # DOT_F32 marks the interpreter: round bf16 rows to nearest even there too.
  tl.store(c_ptrs, round_to(acc, c_ptr.dtype.element_ty, DOT_F32), mask=mask)


@triton.jit
def _grouped_gemm_kernel(
    # Inputs.
    a_ptr,  # [rows_a, K]
    b_ptr,  # [G, K, N] through strides
    tiles_ptr,  # [3, NUM_TILES] int32
    row_index_ptr,  # [rows] int32 (GATHER_A) row of `a` for each output row
    row_scale_ptr,  # [rows] float32 (SCALE_ROWS)
    # Outputs.
    c_ptr,  # [rows, N]
    # Sizes and strides.
    N: tl.constexpr,
    K: tl.constexpr,
    NUM_TILES: tl.constexpr,
    STRIDE_AM: tl.constexpr,
    STRIDE_AK: tl.constexpr,
    STRIDE_BG: tl.constexpr,
    STRIDE_BK: tl.constexpr,
    STRIDE_BN: tl.constexpr,
    STRIDE_CM: tl.constexpr,
    # Switches and tiles.
    GATHER_A: tl.constexpr,
    SCALE_ROWS: tl.constexpr,
    DOT_F32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    B_TMA: tl.constexpr,
    A_TMA: tl.constexpr,
    ROWS_A: tl.constexpr,  # rows of a (A_TMA)
    NUM_GROUPS: tl.constexpr,  # G (B_TMA)
    PERSISTENT: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,  # programs launched (PERSISTENT)
    FLATTEN: tl.constexpr,  # PERSISTENT and A_TMA: one pipelined loop over items
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
  """`c[r, :] = row_scale[r] * a[row_index[r], :] @ b[group(r)]`; zero tiles write 0."""
  tl.static_assert(not A_TMA or (B_TMA and not GATHER_A and STRIDE_AK == 1))
  tl.static_assert(not FLATTEN or (PERSISTENT and A_TMA))
  a_desc, b_desc = _descriptors(
      a_ptr, b_ptr, A_TMA, B_TMA, ROWS_A, NUM_GROUPS, N, K, STRIDE_AM, STRIDE_BG,
      STRIDE_BK, STRIDE_BN, BLOCK_M, BLOCK_N, BLOCK_K)
  if PERSISTENT:
    # FLATTEN: Triton fuses the item and K loops into one software-pipelined
    # loop (the next item's loads overlap this item's last steps and store);
    # it walks only the active tiles, each with the full K loop.
    num_pid_m = NUM_TILES
    if FLATTEN:
      num_pid_m = _active_tiles(tiles_ptr, NUM_TILES)
    items = num_pid_m * tl.cdiv(N, BLOCK_N)
    for item in tl.range(tl.program_id(0), items, NUM_PROGRAMS, flatten=FLATTEN):
      _plain_item(
          item, num_pid_m, a_ptr, a_desc, b_ptr, b_desc, tiles_ptr, row_index_ptr,
          row_scale_ptr, c_ptr, N, K, NUM_TILES, STRIDE_AM, STRIDE_AK, STRIDE_BG,
          STRIDE_BK, STRIDE_BN, STRIDE_CM, GATHER_A, SCALE_ROWS, DOT_F32,
          INPUT_PRECISION, B_TMA, A_TMA, FLATTEN, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
  else:
    _plain_item(
        tl.program_id(0), NUM_TILES, a_ptr, a_desc, b_ptr, b_desc, tiles_ptr,
        row_index_ptr, row_scale_ptr, c_ptr, N, K, NUM_TILES, STRIDE_AM, STRIDE_AK,
        STRIDE_BG, STRIDE_BK, STRIDE_BN, STRIDE_CM, GATHER_A, SCALE_ROWS, DOT_F32,
        INPUT_PRECISION, B_TMA, A_TMA, FLATTEN, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


@triton.jit
def _act_item(
    item, x_ptr, x_desc, w_ptr, w_desc, tiles_ptr, row_index_ptr,
    row_scale_ptr, h_ptr, pre_ptr, F: tl.constexpr, K: tl.constexpr,
    NUM_TILES: tl.constexpr, STRIDE_XM: tl.constexpr, STRIDE_WG: tl.constexpr,
    STRIDE_WK: tl.constexpr, STRIDE_WN: tl.constexpr, ACTIVATION: tl.constexpr,
    GATED: tl.constexpr, STORE_PRE: tl.constexpr, SCALE_H: tl.constexpr,
    GATHER_A: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    B_TMA: tl.constexpr, A_TMA: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    WIDE: tl.constexpr,
):
  """One work item of `_grouped_gemm_act_kernel`."""
  pid_n, expert, row_start, row_end = _tile_coords(
      item, tiles_ptr, NUM_TILES, NUM_TILES, F, BLOCK_N, GROUP_M)
  if A_TMA:
    gate, up = _mainloop_tma_item(
        x_desc, w_desc, expert, row_start, row_end, pid_n, K, F, STRIDE_WK, BLOCK_M,
        BLOCK_N, BLOCK_K, GATED, False, DOT_F32, INPUT_PRECISION,
    )
    _act_epilogue(gate, up, row_scale_ptr, h_ptr, pre_ptr, row_start, row_end, pid_n,
                  F, ACTIVATION, GATED, STORE_PRE, SCALE_H, DOT_F32, BLOCK_M, BLOCK_N)
  elif row_start < row_end:
    if WIDE:
      gate, up = _mainloop_wide(
          x_ptr, w_ptr, row_index_ptr, expert, row_start, row_end, pid_n, F, K,
          STRIDE_XM, STRIDE_WG, STRIDE_WK, BLOCK_M, BLOCK_N, BLOCK_K, GATHER_A,
          DOT_F32, INPUT_PRECISION)
    else:
      gate, up = _mainloop(
          x_ptr, w_ptr, w_desc, row_index_ptr, expert, row_start, row_end, pid_n,
          F, K, STRIDE_XM, 1, STRIDE_WG, STRIDE_WK, STRIDE_WN, F,
          BLOCK_M, BLOCK_N, BLOCK_K, GATHER_A, GATED, DOT_F32, INPUT_PRECISION,
          False, B_TMA,
      )
    _act_epilogue(gate, up, row_scale_ptr, h_ptr, pre_ptr, row_start, row_end, pid_n,
                  F, ACTIVATION, GATED, STORE_PRE, SCALE_H, DOT_F32, BLOCK_M, BLOCK_N)


@triton.jit
def _act_epilogue(
    gate, up, row_scale_ptr, h_ptr, pre_ptr, row_start, row_end, pid_n,
    F: tl.constexpr, ACTIVATION: tl.constexpr, GATED: tl.constexpr,
    STORE_PRE: tl.constexpr, SCALE_H: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
  """Activation, row scale and the masked stores of `h` (and `pre`) of one tile."""
  if GATED:
    h = act_fwd(gate, ACTIVATION) * up
  else:
    h = act_fwd(gate, ACTIVATION)
  offs_m = row_start + tl.arange(0, BLOCK_M)
  offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
  mask = (offs_m < row_end)[:, None] & (offs_n < F)[None, :]
  if SCALE_H:
    scale = tl.load(row_scale_ptr + offs_m, mask=offs_m < row_end, other=0.0)
    h = h * scale[:, None]
  rows64 = offs_m.to(tl.int64)[:, None]
  h_ptrs = h_ptr + rows64 * F + offs_n[None, :]
  # DOT_F32 marks the interpreter: round to nearest even there as on the GPU.
  tl.store(h_ptrs, round_to(h, h_ptr.dtype.element_ty, DOT_F32), mask=mask)
  if STORE_PRE:
    if GATED:
      pre_ptrs = pre_ptr + rows64 * (2 * F) + offs_n[None, :]
      tl.store(pre_ptrs, round_to(gate, pre_ptr.dtype.element_ty, DOT_F32), mask=mask)
      tl.store(pre_ptrs + F, round_to(up, pre_ptr.dtype.element_ty, DOT_F32), mask=mask)
    else:
      pre_ptrs = pre_ptr + rows64 * F + offs_n[None, :]
      tl.store(pre_ptrs, round_to(gate, pre_ptr.dtype.element_ty, DOT_F32), mask=mask)


@triton.jit
def _grouped_gemm_act_kernel(
    # Inputs.
    x_ptr,  # [t, K] token rows
    w_ptr,  # [G, K, F] or [G, K, 2F] (GATED: gate columns first)
    tiles_ptr,  # [3, NUM_TILES] int32
    row_index_ptr,  # [rows] int32 (GATHER_A) token of each slot
    row_scale_ptr,  # [rows] float32 (SCALE_H) router weight of each slot
    # Outputs.
    h_ptr,  # [rows, F] activation output (times the row scale if SCALE_H), x dtype
    pre_ptr,  # [rows, F or 2F] pre-activation (STORE_PRE), else unused [1]
    # Sizes and strides.
    F: tl.constexpr,
    K: tl.constexpr,
    NUM_TILES: tl.constexpr,
    STRIDE_XM: tl.constexpr,
    STRIDE_WG: tl.constexpr,
    STRIDE_WK: tl.constexpr,
    STRIDE_WN: tl.constexpr,
    # Switches and tiles.
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    STORE_PRE: tl.constexpr,
    SCALE_H: tl.constexpr,
    GATHER_A: tl.constexpr,
    DOT_F32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    B_TMA: tl.constexpr,
    A_TMA: tl.constexpr,  # x rows not gathered (a sorted copy), by TMA
    ROWS_A: tl.constexpr,  # rows of x (A_TMA)
    NUM_GROUPS: tl.constexpr,  # G (B_TMA)
    PERSISTENT: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,  # programs launched (PERSISTENT)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    WIDE: tl.constexpr,  # GATED, weights by pointers: one [BLOCK_K, 2 BLOCK_N] tile
):
  """`h = act(x[row] @ w[g][:, :F]) (* x[row] @ w[g][:, F:] if GATED)`, times
  `row_scale[row]` in float32 before the one rounding to h's dtype if SCALE_H;
  the pre-activation is stored unscaled. Without GATHER_A, `row = r` (x is a
  copy sorted by slot, `ROWS_A` rows)."""
  tl.static_assert(not (B_TMA and STRIDE_WK == 1))  # no transposed gated weights
  tl.static_assert(not A_TMA or (B_TMA and not GATHER_A))
  tl.static_assert(not WIDE or (GATED and not B_TMA))
  x_desc, w_desc = _descriptors(
      x_ptr, w_ptr, A_TMA, B_TMA, ROWS_A, NUM_GROUPS, F * (1 + GATED), K, STRIDE_XM,
      STRIDE_WG, STRIDE_WK, STRIDE_WN, BLOCK_M, BLOCK_N, BLOCK_K)
  if PERSISTENT:
    items = NUM_TILES * tl.cdiv(F, BLOCK_N)
    for item in tl.range(tl.program_id(0), items, NUM_PROGRAMS, flatten=False):
      _act_item(
          item, x_ptr, x_desc, w_ptr, w_desc, tiles_ptr, row_index_ptr, row_scale_ptr,
          h_ptr, pre_ptr, F, K, NUM_TILES, STRIDE_XM, STRIDE_WG, STRIDE_WK, STRIDE_WN,
          ACTIVATION, GATED, STORE_PRE, SCALE_H, GATHER_A, DOT_F32, INPUT_PRECISION,
          B_TMA, A_TMA, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, WIDE)
  else:
    _act_item(
        tl.program_id(0), x_ptr, x_desc, w_ptr, w_desc, tiles_ptr, row_index_ptr,
        row_scale_ptr, h_ptr, pre_ptr, F, K, NUM_TILES, STRIDE_XM, STRIDE_WG,
        STRIDE_WK, STRIDE_WN, ACTIVATION, GATED, STORE_PRE, SCALE_H, GATHER_A,
        DOT_F32, INPUT_PRECISION, B_TMA, A_TMA, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, WIDE)


@triton.jit
def _grouped_gemm_act_bwd_kernel(
    # Inputs.
    dy_ptr,  # [t, K] output gradient per token
    w_ptr,  # [G, F, K] down weights, read transposed through strides
    tiles_ptr,  # [3, NUM_TILES] int32
    row_index_ptr,  # [rows] int32 token of each slot
    row_scale_ptr,  # [rows] float32 router weight of each slot
    pre_ptr,  # [rows, F or 2F] pre-activation saved by the forward
    # Outputs.
    dpre_ptr,  # [rows, F or 2F] gradient of the pre-activation, pre dtype
    dwp_ptr,  # [rows, DWP_COLS] float32 partial <h, g> per BLOCK_N columns
    # Sizes and strides.
    F: tl.constexpr,
    K: tl.constexpr,
    NUM_TILES: tl.constexpr,
    STRIDE_DYM: tl.constexpr,
    STRIDE_WG: tl.constexpr,
    STRIDE_WK: tl.constexpr,
    STRIDE_WN: tl.constexpr,
    DWP_COLS: tl.constexpr,
    # Switches and tiles.
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    DOT_F32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    B_TMA: tl.constexpr,
    NUM_GROUPS: tl.constexpr,  # G (B_TMA)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_N: tl.constexpr,
):
  """Backward of `y += w * act(pre) @ down` for one slot tile and column block.

  `g = dy[row] @ down[e]^T` (float32); `h = act(pre)` (rounded to the pre
  dtype, as the forward stored it); `dwp[r, j] = sum_cols h * g` over the
  BLOCK_N columns of block `j`; `dh = w * g`; `d_pre = dh * act'(pre)`
  (gated: `d_gate = dh * up * act'(gate)`, `d_up = dh * act(gate)`).

  `SPLIT_N = 2`: each program covers `2 * BLOCK_N` columns as two BLOCK_N
  accumulators sharing every loaded dy tile (the main loop reads dy as
  often as one `2 * BLOCK_N` tile would), then runs the epilogue of one
  half after the other, so the epilogue holds the live tiles of BLOCK_N
  columns only (a `2 * BLOCK_N` epilogue spills). The `dwp` layout and
  values are those of `SPLIT_N = 1` with the same BLOCK_N.
  """
  tl.static_assert((SPLIT_N == 1) | (SPLIT_N == 2))
  pid_n, expert, row_start, row_end = _tile_coords(
      tl.program_id(0), tiles_ptr, NUM_TILES, NUM_TILES, F, BLOCK_N * SPLIT_N, GROUP_M
  )
  if row_start >= row_end:
    return
  _, w_desc = _descriptors(
      dy_ptr, w_ptr, False, B_TMA, 0, NUM_GROUPS, F, K, STRIDE_DYM, STRIDE_WG,
      STRIDE_WK, STRIDE_WN, BLOCK_M, BLOCK_N, BLOCK_K)
  g, g2 = _mainloop(
      dy_ptr, w_ptr, w_desc, row_index_ptr, expert, row_start, row_end,
      pid_n * SPLIT_N, F, K, STRIDE_DYM, 1, STRIDE_WG, STRIDE_WK, STRIDE_WN, 0,
      BLOCK_M, BLOCK_N, BLOCK_K, True, False, DOT_F32, INPUT_PRECISION,
      SPLIT_N == 2, B_TMA,
  )
  act_bwd_epilogue(
      g, pid_n * SPLIT_N, expert, row_start, row_end, row_scale_ptr, pre_ptr,
      dpre_ptr, dwp_ptr, F, DWP_COLS, ACTIVATION, GATED, BLOCK_M, BLOCK_N,
      DOT_F32,
  )
  if SPLIT_N == 2:
    act_bwd_epilogue(
        g2, pid_n * SPLIT_N + 1, expert, row_start, row_end, row_scale_ptr,
        pre_ptr, dpre_ptr, dwp_ptr, F, DWP_COLS, ACTIVATION, GATED, BLOCK_M,
        BLOCK_N, DOT_F32,
    )


# ----------------------------------------------------------------------------
# Autotuned variants. BLOCK_M is fixed by the caller (the tile schedule is built
# for it); the configs choose BLOCK_N, BLOCK_K, GROUP_M, warps and stages.
# Shared memory per stage (bf16): A BLOCK_M*BLOCK_K*2 + B BLOCK_K*BLOCK_N*2
# (twice B when gated); Hopper allows 227 KB.
# ----------------------------------------------------------------------------


def _config(block_n, block_k, num_warps, num_stages, group_m=8, split_n=None):
  kwargs = {"BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m}
  if split_n is not None:
    kwargs["SPLIT_N"] = split_n
  return triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages)


PLAIN_CONFIGS = [
    _config(256, 64, 8, 3),
    _config(128, 64, 8, 4),
    _config(128, 64, 4, 4),
    _config(64, 64, 4, 4),
]
GATED_CONFIGS = [
    _config(128, 32, 8, 5),
    _config(128, 64, 8, 3),
    _config(128, 64, 8, 4),
    _config(64, 64, 4, 4),
]
# The act_bwd epilogue keeps ~4 live float32 tiles (g, up, act, act'): with
# BLOCK_N=128 and gating it spills (H100 ptxas: 544 B stack; sm_90 build of
# triton 3.6 on the host: 376 B), BLOCK_N=64 does not but reads dy twice as
# often. SPLIT_N=2 runs two 64-wide accumulators sharing each dy tile and
# their epilogues one after the other (sm_90: 254 registers, no stack).
# `JMOE_ACT_BWD_SPLIT=0` autotunes over the unsplit configs only.
ACT_BWD_UNSPLIT_CONFIGS = [
    _config(64, 64, 8, 4, split_n=1),
    _config(64, 64, 8, 3, split_n=1),
    _config(128, 64, 8, 3, split_n=1),
]
ACT_BWD_CONFIGS = [
    _config(64, 64, 8, 4, split_n=2),
    _config(64, 64, 8, 3, split_n=2),
] + ACT_BWD_UNSPLIT_CONFIGS

grouped_gemm_autotuned = triton.autotune(
    configs=PLAIN_CONFIGS, key=["N", "K", "NUM_TILES"]
)(_grouped_gemm_kernel)
grouped_gemm_act_autotuned = triton.autotune(
    configs=PLAIN_CONFIGS, key=["F", "K", "NUM_TILES"]
)(_grouped_gemm_act_kernel)
grouped_gemm_act_gated_autotuned = triton.autotune(
    configs=GATED_CONFIGS, key=["F", "K", "NUM_TILES"]
)(_grouped_gemm_act_kernel)
grouped_gemm_act_bwd_autotuned = triton.autotune(
    configs=ACT_BWD_CONFIGS, key=["F", "K", "NUM_TILES"]
)(_grouped_gemm_act_bwd_kernel)
grouped_gemm_act_bwd_unsplit_autotuned = triton.autotune(
    configs=ACT_BWD_UNSPLIT_CONFIGS, key=["F", "K", "NUM_TILES"]
)(_grouped_gemm_act_bwd_kernel)

# The smallest BLOCK_N of the act_bwd configs (both lists): sizes the `dwp`
# partial sums (one column per BLOCK_N columns, whatever SPLIT_N).
ACT_BWD_MIN_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in ACT_BWD_CONFIGS)
