"""The row-streaming schedule of `jmoe.ops.tgmm` (`schedule="stream"`).

`jmoe.kernels.tgmm_stream._tgmm_stream_kernel` gives each program one output
tile position and a chunk of consecutive groups, and runs one flat loop over
their `BLOCK_M`-row steps. This module builds its step schedule in XLA and
launches it. `jmoe.ops.tgmm.tgmm` calls `launch_stream` after XLA has formed
the gathered / scaled rows of `a` (the default `gather_mode="xla"`,
`row_scale_mode="prescale"`), so the kernel reads `a` rows contiguously and
gathers only `b` rows.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jmoe.reference.tgmm import group_offsets

# Programs the auto chunking aims for: about 8 waves of one program per SM on
# an H100 (132 SMs), so that chunks of unequal length (skewed groups) balance.
TARGET_PROGRAMS = 1024


def num_chunks(groups: int, tiles: int, groups_per_chunk: int = 0) -> tuple[int, int]:
  """`(chunks, groups_per_chunk)` for `groups` groups and `tiles` tile positions.

  `groups_per_chunk=0` picks the most groups per chunk that still gives about
  `TARGET_PROGRAMS` programs (`tiles * chunks`).
  """
  if groups_per_chunk <= 0:
    chunks = min(groups, max(1, math.ceil(TARGET_PROGRAMS / max(tiles, 1))))
    groups_per_chunk = math.ceil(groups / chunks)
  groups_per_chunk = min(groups_per_chunk, groups)
  return math.ceil(groups / groups_per_chunk), groups_per_chunk


def step_schedule(group_sizes: jax.Array, m: int, block_m: int,
                  groups_per_chunk: int) -> tuple[jax.Array, ...]:
  """The kernel's step tables for groups of `group_sizes [g]` over `m` rows.

  Every group gets `max(1, cdiv(size, block_m))` steps (an empty group one fully
  masked step, so its tile is stored as zeros); steps are numbered group after
  group, at most `cdiv(m, block_m) + g` of them.

  Returns:
    `(step_row0 [s], step_end [s], step_group [s], chunk_steps [chunks + 1])`,
    int32: first row of step `i`, end row of its group, its group, and the
    first step of each chunk of `groups_per_chunk` groups (entries past the
    last step repeat the last group's values).
  """
  g = group_sizes.shape[0]
  offsets = group_offsets(group_sizes, m)  # [g + 1]
  sizes = offsets[1:] - offsets[:-1]
  steps = jnp.maximum(1, (sizes + block_m - 1) // block_m)
  step_offsets = jnp.concatenate(
      [jnp.zeros((1,), jnp.int32), jnp.cumsum(steps).astype(jnp.int32)])
  num_steps = -(-m // block_m) + g
  s = jnp.arange(num_steps, dtype=jnp.int32)
  group = jnp.searchsorted(step_offsets[1:], s, side="right").astype(jnp.int32)
  group = jnp.minimum(group, g - 1)
  row0 = offsets[group] + (s - step_offsets[group]) * block_m
  end = offsets[group + 1]
  chunks, _ = num_chunks(g, 1, groups_per_chunk)
  bounds = jnp.minimum(jnp.arange(chunks + 1, dtype=jnp.int32) * groups_per_chunk, g)
  return row0.astype(jnp.int32), end, group, step_offsets[bounds]


def launch_stream(a, b, group_sizes, b_row_index, *, m, out_dtype, input_precision,
                  backend, config) -> jax.Array:
  """`out [g, ka, n]` by the stream kernel; `a` is `[m, ka]` (no gather, no scale).

  Args:
    a: `[m, ka]` rows in group order.
    b: `[m, n]`, or `[mb, n]` read through `b_row_index [m]`.
    group_sizes: `[g]` int32.
    b_row_index: `[m]` int32 or None.
    m: logical rows (static).
    out_dtype, input_precision, backend: as `jmoe.ops.tgmm.tgmm`.
    config: the `TgmmConfig` (its `block_m` fixes the step schedule; its
      `groups_per_chunk`, 0 = auto, the chunking).
  """
  import triton  # pylint: disable=import-outside-toplevel

  from jmoe.kernels import tgmm as tile_kernels  # pylint: disable=import-outside-toplevel
  from jmoe.kernels import tgmm_stream as kernels  # pylint: disable=import-outside-toplevel
  from jmoe.ops._call import kernel_call  # pylint: disable=import-outside-toplevel

  g = group_sizes.shape[0]
  ka, n = a.shape[1], b.shape[1]
  tiles = triton.cdiv(ka, config.block_k) * triton.cdiv(n, config.block_n)
  chunks, per_chunk = num_chunks(g, tiles, config.groups_per_chunk)
  row0, end, group, chunk_steps = step_schedule(group_sizes, m, config.block_m,
                                                per_chunk)
  ka_mult = tile_kernels.stride_multiple(ka)
  n_mult = tile_kernels.stride_multiple(n)
  return kernel_call(
      kernels.tgmm_stream_kernel,
      a,
      b,
      jnp.zeros((1,), jnp.int32) if b_row_index is None
      else b_row_index.astype(jnp.int32),
      row0,
      end,
      group,
      chunk_steps,
      ka // ka_mult,
      n // n_mult,
      out_shape=jax.ShapeDtypeStruct((g, ka, n), out_dtype),
      grid=(tiles, chunks),
      backend=backend,
      name="jmoe_tgmm_stream",
      HAS_B_INDEX=b_row_index is not None,
      DOT_F32=backend == "interpret",
      INPUT_PRECISION=input_precision,
      KA_MULT=ka_mult,
      N_MULT=n_mult,
      **config.metaparams(),
      num_warps=config.num_warps,
      num_stages=config.num_stages,
  )
