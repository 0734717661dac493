"""Align token copies to experts in one launch (only `@triton.jit` code).

`_align_kernel` does in one launch what `jmoe.ops.align.align` does with XLA
ops: a stable counting sort of the `TK = t * top_k` copies by expert (kept
copies of expert 0, then expert 1, ..., then the dropped ones), the slot of
each copy, the per-slot token and router weight, the counts, and the BLOCK_M
tile schedule (see `jmoe.kernels.grouped_gemm`).

Grid: `E + 1` programs. Program `p < E` owns expert `p`; program `E` owns the
dropped copies (key `E`) and writes the zero tiles and idle entries. Each
program reads the keys twice: a histogram pass (counts of every expert, so it
knows its slot offset and tile offset) and a ranking pass (a cumsum of
`key == p` per block gives each copy its stable rank).
"""

import triton
import triton.language as tl


@triton.jit
def _align_kernel(
    # Inputs.
    ids_ptr,  # [TK] int32 expert of each copy
    kept_ptr,  # [TK] bool
    weights_ptr,  # [TK] float32
    # Outputs.
    order_ptr,  # [TK] int32 copy index of each slot
    token_ptr,  # [TK] int32 token of each slot
    w_sorted_ptr,  # [TK] float32 weight of each slot
    pos_ptr,  # [TK] int32 slot of each copy, -1 if dropped
    sizes_ptr,  # [E] int32 kept copies per expert
    tiles_ptr,  # [3, NUM_TILES] int32 expert / start / end
    # Sizes.
    TK: tl.constexpr,
    E: tl.constexpr,
    TOP_K: tl.constexpr,
    NUM_TILES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    # Tiles.
    BLOCK: tl.constexpr,
    E_BINS: tl.constexpr,  # power of 2 > E
    TILE_CHUNK: tl.constexpr,
):
  p = tl.program_id(0)
  bins = tl.arange(0, E_BINS)
  # Pass 1: counts of every key (E = dropped).
  counts = tl.zeros((E_BINS,), dtype=tl.int32)
  for b in range(0, (TK + BLOCK - 1) // BLOCK):
    offs = b * BLOCK + tl.arange(0, BLOCK)
    inb = offs < TK
    ids = tl.load(ids_ptr + offs, mask=inb, other=0)
    kept = tl.load(kept_ptr + offs, mask=inb, other=0) != 0
    key = tl.where(kept & (ids >= 0) & (ids < E), ids, E)
    counts += tl.histogram(key, E_BINS, mask=inb)
  real = bins < E
  tiles_per = tl.where(real, (counts + BLOCK_M - 1) // BLOCK_M, 0)
  offset = tl.sum(tl.where(bins < p, counts, 0))
  count = tl.sum(tl.where(bins == p, counts, 0))
  tile_base = tl.sum(tl.where(bins < p, tiles_per, 0))
  # Pass 2: stable ranks of this program's copies.
  running = offset
  for b in range(0, (TK + BLOCK - 1) // BLOCK):
    offs = b * BLOCK + tl.arange(0, BLOCK)
    inb = offs < TK
    ids = tl.load(ids_ptr + offs, mask=inb, other=0)
    kept = tl.load(kept_ptr + offs, mask=inb, other=0) != 0
    key = tl.where(kept & (ids >= 0) & (ids < E), ids, E)
    mine = inb & (key == p)
    mine_i = mine.to(tl.int32)
    slot = running + tl.cumsum(mine_i, axis=0) - 1
    w = tl.load(weights_ptr + offs, mask=mine, other=0.0)
    tl.store(order_ptr + slot, offs, mask=mine)
    tl.store(token_ptr + slot, offs // TOP_K, mask=mine)
    tl.store(w_sorted_ptr + slot, w, mask=mine)
    tl.store(pos_ptr + offs, tl.where(p < E, slot, -1), mask=mine)
    running += tl.sum(mine_i)
  if p < E:
    tl.store(sizes_ptr + p, count)
    # This expert's tiles.
    n_tiles = (count + BLOCK_M - 1) // BLOCK_M
    for c in range(0, (n_tiles + TILE_CHUNK - 1) // TILE_CHUNK):
      i = c * TILE_CHUNK + tl.arange(0, TILE_CHUNK)
      m = i < n_tiles
      start = offset + i * BLOCK_M
      end = tl.minimum(start + BLOCK_M, offset + count)
      tl.store(tiles_ptr + tile_base + i, tl.zeros_like(i) + p, mask=m)
      tl.store(tiles_ptr + NUM_TILES + tile_base + i, start, mask=m)
      tl.store(tiles_ptr + 2 * NUM_TILES + tile_base + i, end, mask=m)
  else:
    # Zero tiles over the slots past the kept copies, then idle entries.
    total = offset
    n_used = tile_base
    for c in range(0, (NUM_TILES + TILE_CHUNK - 1) // TILE_CHUNK):
      i = c * TILE_CHUNK + tl.arange(0, TILE_CHUNK)
      m = (i < NUM_TILES) & (i >= n_used)
      start = total + (i - n_used) * BLOCK_M
      end = tl.maximum(tl.minimum(start + BLOCK_M, TK), start)
      tl.store(tiles_ptr + i, tl.zeros_like(i) - 1, mask=m)
      tl.store(tiles_ptr + NUM_TILES + i, start, mask=m)
      tl.store(tiles_ptr + 2 * NUM_TILES + i, end, mask=m)
