"""Align token copies to experts in two launches (only `@triton.jit` code).

`_align_count_kernel` then `_align_kernel` do what `jmoe.ops.align.align` does
with XLA ops: a stable counting sort of the `TK = t * top_k` copies by expert
(kept copies of expert 0, then expert 1, ..., then the dropped ones), the slot
of each copy, the per-slot token and router weight, the counts, and the
BLOCK_M tile schedule (see `jmoe.kernels.grouped_gemm`).

1. `_align_count_kernel`, grid `NB = cdiv(TK, BLOCK)`: the histogram of keys
   (expert, or `E` = dropped) of one BLOCK of copies -> `counts[b, :]`, and the
   same added to `totals` (integer atomics: the sums are exact, so the result
   does not depend on their order).
2. `_align_kernel`, grid `(E + 1, NB)`: program `(p, b)` ranks the copies of
   key `p` in block `b`. Their first slot is `sum(totals[:p])` (the keys before
   `p`) plus `sum(counts[:b, p])` (key `p` in earlier blocks); a cumsum inside
   the block gives each copy its stable rank. Programs `(p < E, 0)` write
   expert `p`'s count and tiles; `(E, 0)` the zero tiles and idle entries.

Every program does one BLOCK of work, so the launch takes a few microseconds
at any size (the one-launch version, where each of the `E + 1` programs
scanned all `TK` keys twice, took 66 us at t=8192, k=6, e=64 on the H100).
"""

import triton
import triton.language as tl


@triton.jit
def _keys(ids_ptr, kept_ptr, offs, inb, E: tl.constexpr):
  """Sort key of each copy: its expert, or `E` if dropped or out of range."""
  ids = tl.load(ids_ptr + offs, mask=inb, other=0)
  kept = tl.load(kept_ptr + offs, mask=inb, other=0) != 0
  return tl.where(kept & (ids >= 0) & (ids < E), ids, E)


@triton.jit
def _align_count_kernel(
    ids_ptr,  # [TK] int32 expert of each copy
    kept_ptr,  # [TK] bool
    counts_ptr,  # [NB, E_BINS] int32 out: keys per block
    totals_ptr,  # [E_BINS] int32 out, zeroed: keys over all blocks
    TK: tl.constexpr,
    E: tl.constexpr,
    BLOCK: tl.constexpr,
    E_BINS: tl.constexpr,  # power of 2 > E
):
  b = tl.program_id(0)
  offs = b * BLOCK + tl.arange(0, BLOCK)
  inb = offs < TK
  key = _keys(ids_ptr, kept_ptr, offs, inb, E)
  hist = tl.histogram(key, E_BINS, mask=inb)
  bins = tl.arange(0, E_BINS)
  tl.store(counts_ptr + b * E_BINS + bins, hist)
  tl.atomic_add(totals_ptr + bins, hist, mask=bins <= E)


@triton.jit
def _align_kernel(
    # Inputs.
    ids_ptr,  # [TK] int32 expert of each copy
    kept_ptr,  # [TK] bool
    weights_ptr,  # [TK] float32
    counts_ptr,  # [NB, E_BINS] int32 keys per block (`_align_count_kernel`)
    totals_ptr,  # [E_BINS] int32 keys over all blocks
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
    NB_P2: tl.constexpr,  # power of 2 >= cdiv(TK, BLOCK)
    E_BINS: tl.constexpr,  # power of 2 > E
    TILE_CHUNK: tl.constexpr,
):
  p = tl.program_id(0)
  b = tl.program_id(1)
  bins = tl.arange(0, E_BINS)
  counts = tl.load(totals_ptr + bins, mask=bins <= E, other=0)
  real = bins < E
  tiles_per = tl.where(real, (counts + BLOCK_M - 1) // BLOCK_M, 0)
  offset = tl.sum(tl.where(bins < p, counts, 0))
  count = tl.sum(tl.where(bins == p, counts, 0))
  tile_base = tl.sum(tl.where(bins < p, tiles_per, 0))
  blocks = tl.arange(0, NB_P2)
  before = tl.sum(tl.load(counts_ptr + blocks * E_BINS + p, mask=blocks < b, other=0))
  # Stable ranks of this program's copies in block b.
  offs = b * BLOCK + tl.arange(0, BLOCK)
  inb = offs < TK
  key = _keys(ids_ptr, kept_ptr, offs, inb, E)
  mine = inb & (key == p)
  slot = offset + before + tl.cumsum(mine.to(tl.int32), axis=0) - 1
  w = tl.load(weights_ptr + offs, mask=mine, other=0.0)
  tl.store(order_ptr + slot, offs, mask=mine)
  tl.store(token_ptr + slot, offs // TOP_K, mask=mine)
  tl.store(w_sorted_ptr + slot, w, mask=mine)
  tl.store(pos_ptr + offs, tl.where(p < E, slot, -1), mask=mine)
  if b == 0:
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
