"""Align token copies to experts: sorted copy order and the GEMM tile schedule.

The grouped GEMM kernels (`jmoe.kernels.grouped_gemm`) work on "slots": the
`t * top_k` token copies sorted by expert, kept copies first (expert 0's, then
expert 1's, ...), dropped copies after them. Expert `e` owns the contiguous
slots `[offset_e, offset_e + count_e)`. The tile schedule cuts each expert's
slots into BLOCK_M row tiles (the last one of an expert may be short) and
then covers the slots past the kept ones with "zero tiles" (expert -1) whose
rows the kernels fill with zeros. Its length is the static bound
`cdiv(rows, BLOCK_M) + num_groups`; unused entries are idle (start == end).

Example (t=3, top_k=2, e=2, nothing dropped, BLOCK_M=2)::

  expert_ids = [[1, 0], [0, 1], [1, 0]]   copies 0..5 -> experts 1 0 0 1 1 0
  order      = [1, 2, 5, 0, 3, 4]         (stable: token order within expert)
  token      = [0, 1, 2, 0, 1, 2]         order // top_k
  group_sizes= [3, 3]
  pos        = [[3, 0], [1, 4], [5, 2]]   slot of each copy (-1 if dropped)
  tiles      = expert [0, 0, 1, 1, -1]    cdiv(6, 2) + 2 = 5 entries
               start  [0, 2, 3, 5,  6]
               end    [2, 3, 5, 6,  6]    (the last one idle)

The work is a handful of XLA ops: one stable argsort of `t * top_k` int32
keys (the only sort), a scatter for `pos`, and O(tiles * experts) compares.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jmoe._env import env_choice


class Alignment(NamedTuple):
  """Token copies sorted by expert, and the tile schedule over them.

  Attributes:
    group_sizes: `[e]` int32 kept copies per expert.
    order: `[t * top_k]` int32 flat copy index `i * top_k + j` of each slot.
    token: `[t * top_k]` int32 token of each slot (`order // top_k`).
    pos: `[t, top_k]` int32 slot of each copy, -1 where dropped.
    tiles: `[3, num_tiles]` int32 tile schedule (expert, start, end).
  """

  group_sizes: jax.Array
  order: jax.Array
  token: jax.Array
  pos: jax.Array
  tiles: jax.Array


def num_tiles(num_rows: int, num_groups: int, block_m: int) -> int:
  """Static length of a tile schedule: `cdiv(num_rows, block_m) + num_groups`."""
  return -(-num_rows // block_m) + num_groups


def tile_schedule(group_sizes: jax.Array, num_rows: int, block_m: int) -> jax.Array:
  """Tile schedule of rows grouped contiguously by `group_sizes`.

  Args:
    group_sizes: `[g]` int32 rows per group, groups in order from row 0.
      Sizes are clipped so that the groups end by `num_rows` (as
      `jax.lax.ragged_dot`, rows past `num_rows` do not exist).
    num_rows: static number of rows `m`; rows past `sum(group_sizes)` get zero
      tiles.
    block_m: rows per tile.

  Returns:
    `[3, cdiv(num_rows, block_m) + g]` int32: expert (-1 for zero tiles),
    first row, one past the last row of each tile.
  """
  g = group_sizes.shape[0]
  n = num_tiles(num_rows, g, block_m)
  sizes = group_sizes.astype(jnp.int32)
  ends = jnp.minimum(jnp.cumsum(jnp.maximum(sizes, 0)), num_rows)
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  sizes = ends - starts
  tiles_per_group = (sizes + block_m - 1) // block_m
  tile_end = jnp.cumsum(tiles_per_group)
  n_used = tile_end[-1]
  total = ends[-1]
  i = jnp.arange(n, dtype=jnp.int32)
  # Group of tile i: number of groups whose tiles all come before i.
  gi = jnp.sum(tile_end[None, :] <= i[:, None], axis=1, dtype=jnp.int32)
  gi = jnp.minimum(gi, g - 1)
  local = i - (tile_end[gi] - tiles_per_group[gi])
  start = starts[gi] + local * block_m
  end = jnp.minimum(start + block_m, ends[gi])
  zstart = total + (i - n_used) * block_m
  zend = jnp.minimum(zstart + block_m, num_rows)
  used = i < n_used
  expert = jnp.where(used, gi, -1)
  start = jnp.where(used, start, zstart)
  end = jnp.where(used, end, jnp.maximum(zend, zstart))
  return jnp.stack([expert, start, end]).astype(jnp.int32)


def align(
    expert_ids: jax.Array, kept: jax.Array, num_experts: int, block_m: int
) -> Alignment:
  """Sorts the token copies by expert and plans the GEMM tiles.

  Args:
    expert_ids: `[t, top_k]` int32 expert of each copy. Ids outside
      `[0, num_experts)` are treated like dropped copies.
    kept: `[t, top_k]` bool, False where the copy is dropped.
    num_experts: `e`.
    block_m: rows per GEMM tile.

  Returns:
    An `Alignment`.
  """
  t, top_k = expert_ids.shape
  tk = t * top_k
  ids = expert_ids.reshape(tk).astype(jnp.int32)
  valid = kept.reshape(tk) & (ids >= 0) & (ids < num_experts)
  key = jnp.where(valid, ids, num_experts)
  order = jnp.argsort(key, stable=True).astype(jnp.int32)
  sorted_key = key[order]
  bounds = jnp.searchsorted(
      sorted_key, jnp.arange(num_experts + 1, dtype=jnp.int32), side="left",
      method="compare_all",
  ).astype(jnp.int32)
  group_sizes = bounds[1:] - bounds[:-1]
  slot = jnp.zeros((tk,), jnp.int32).at[order].set(jnp.arange(tk, dtype=jnp.int32))
  pos = jnp.where(valid, slot, -1).reshape(t, top_k)
  token = order // top_k
  tiles = tile_schedule(group_sizes, tk, block_m)
  return Alignment(group_sizes, order, token, pos, tiles)


ALIGN_IMPL_ENV = "JMOE_ALIGN"
ALIGN_IMPLS = ("triton", "xla")


def align_impl() -> str:
  """Which align runs in `expert_ffn`: `JMOE_ALIGN` ("triton" or "xla"), default
  "triton" (one kernel launch; see benchmarks/results/kernels_h100.md)."""
  return env_choice(ALIGN_IMPL_ENV, ALIGN_IMPLS, "triton")


def align_triton(
    expert_ids: jax.Array,
    kept: jax.Array,
    weights: jax.Array,
    num_experts: int,
    block_m: int,
    backend: str,
) -> tuple[Alignment, jax.Array]:
  """`align` in two Triton launches (`jmoe.kernels.align`): block histograms,
  then ranks per (key, block).

  Same results as `align` (bit-identical), plus the router weight of each slot.

  Args:
    expert_ids: `[t, top_k]` int32.
    kept: `[t, top_k]` bool.
    weights: `[t, top_k]` float32.
    num_experts: `e`.
    block_m: rows per GEMM tile.
    backend: `"triton"` or `"interpret"`.

  Returns:
    `(Alignment, w_sorted [t * top_k] float32)`.
  """
  import triton  # pylint: disable=import-outside-toplevel

  from jmoe.kernels import align as kernels  # pylint: disable=import-outside-toplevel
  from jmoe.ops._call import kernel_call  # pylint: disable=import-outside-toplevel

  t, top_k = expert_ids.shape
  tk = t * top_k
  n = num_tiles(tk, num_experts, block_m)
  i32 = jnp.int32
  ids = expert_ids.reshape(tk).astype(i32)
  kept_flat = kept.reshape(tk).astype(bool)
  # The interpreter runs programs one by one: smaller blocks there also make
  # the tests cross block boundaries.
  block = min(1024 if backend == "triton" else 64, triton.next_power_of_2(tk))
  nb = triton.cdiv(tk, block)
  e_bins = triton.next_power_of_2(num_experts + 1)
  counts, totals = kernel_call(
      kernels._align_count_kernel,  # pylint: disable=protected-access
      ids,
      kept_flat,
      out_shape=(
          jax.ShapeDtypeStruct((nb, e_bins), i32),
          jax.ShapeDtypeStruct((e_bins,), i32),
      ),
      grid=(nb,),
      backend=backend,
      zeroed_outputs=(1,),
      name="jmoe_align_count",
      TK=tk,
      E=num_experts,
      BLOCK=block,
      E_BINS=e_bins,
      num_warps=4,
  )
  order, token, w_sorted, pos, sizes, tiles = kernel_call(
      kernels._align_kernel,  # pylint: disable=protected-access
      ids,
      kept_flat,
      weights.reshape(tk).astype(jnp.float32),
      counts,
      totals,
      out_shape=(
          jax.ShapeDtypeStruct((tk,), i32),
          jax.ShapeDtypeStruct((tk,), i32),
          jax.ShapeDtypeStruct((tk,), jnp.float32),
          jax.ShapeDtypeStruct((tk,), i32),
          jax.ShapeDtypeStruct((num_experts,), i32),
          jax.ShapeDtypeStruct((3, n), i32),
      ),
      grid=(num_experts + 1, nb),
      backend=backend,
      name="jmoe_align",
      TK=tk,
      E=num_experts,
      TOP_K=top_k,
      NUM_TILES=n,
      BLOCK_M=block_m,
      BLOCK=block,
      NB_P2=triton.next_power_of_2(nb),
      E_BINS=e_bins,
      TILE_CHUNK=128 if backend == "triton" else 32,
      num_warps=4,
  )
  return Alignment(sizes, order, token, pos.reshape(t, top_k), tiles), w_sorted
