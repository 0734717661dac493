"""Transposed grouped GEMM (MoE weight gradients) in pure jnp.

`tgmm(a, b, group_sizes)[g] = sum over the rows r of group g of A_r^T (s_r B_r)`,
`A_r = a[a_row_index[r]]`, `B_r = b[b_row_index[r]]`: `jax.lax.ragged_dot_general`
with a ragged contracting dimension. The oracle of `jmoe.ops.tgmm`; no validation here
(`jmoe.ops.tgmm.tgmm_reference` validates, then calls `tgmm`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp


def group_offsets(group_sizes: jax.Array, m: int) -> jax.Array:
  """`[g + 1]` int32 group starts/ends, clipped to `[0, m]` (negative sizes -> 0)."""
  ends = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes.astype(jnp.int32), 0)), m)
  return jnp.concatenate([jnp.zeros((1,), jnp.int32), ends.astype(jnp.int32)])



def _rows(x, row_index):
  return x if row_index is None else jnp.take(x, row_index, axis=0)


def _scaled_rows_a(a, a_row_index, row_scale):
  rows_a = _rows(a, a_row_index)
  if row_scale is None:
    return rows_a
  # A_r^T (s_r B_r) = (s_r A_r)^T B_r: scale the `a` rows, as the kernel does.
  scaled = rows_a.astype(jnp.float32) * row_scale.astype(jnp.float32)[:, None]
  return scaled.astype(a.dtype)


def _forward_reference(a, b, group_sizes, a_row_index, b_row_index, row_scale,
                       out_dtype, precision):
  m = a.shape[0] if a_row_index is None else a_row_index.shape[0]
  g, ka, n = group_sizes.shape[0], a.shape[1], b.shape[1]
  if m == 0 or g == 0:
    return jnp.zeros((g, ka, n), out_dtype)
  sizes = jnp.diff(group_offsets(group_sizes, m))
  dims = jax.lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(([0], [0]), ([], [])),
      lhs_ragged_dimensions=[0],
      rhs_group_dimensions=[],
  )
  out = jax.lax.ragged_dot_general(
      _scaled_rows_a(a, a_row_index, row_scale), _rows(b, b_row_index), sizes,
      dims, precision=precision, preferred_element_type=jnp.float32,
  )
  return out.astype(out_dtype)


def tgmm_vjp(a, b, group_sizes, a_row_index, b_row_index, row_scale, d_out):
  """Cotangents of `tgmm` for `(a, b, group_sizes, a_row_index, b_row_index,
  row_scale)` given `d_out [g, ka, n]` (None for the integer arguments).

  With `A'_r = s_r A_r` and `g(r)` the group of row `r`:
  `dA'_r = d_out[g(r)] B_r` and `dB_r = d_out[g(r)]^T A'_r` (two `ragged_dot`s,
  float32, HIGHEST), then `dA_r = s_r dA'_r`, `ds_r = <A_r, dA'_r>`, scattered
  back to the rows of `a` / `b` by the row indices (summing repeats). The
  rounding of `s_r A_r` to `a.dtype` is treated as the identity.
  """
  m = a.shape[0] if a_row_index is None else a_row_index.shape[0]
  f32 = jnp.float32
  d_out = d_out.astype(f32)
  sizes = jnp.diff(group_offsets(group_sizes, m))
  rows_a = _rows(a, a_row_index).astype(f32)
  scaled_a = _scaled_rows_a(a, a_row_index, row_scale).astype(f32)
  rows_b = _rows(b, b_row_index).astype(f32)
  hi = jax.lax.Precision.HIGHEST
  if m == 0 or group_sizes.shape[0] == 0:
    d_rows_a = jnp.zeros(rows_a.shape, f32)
    d_rows_b = jnp.zeros(rows_b.shape, f32)
  else:
    d_rows_a = jax.lax.ragged_dot(
        rows_b, jnp.swapaxes(d_out, 1, 2), sizes, precision=hi,
        preferred_element_type=f32)
    d_rows_b = jax.lax.ragged_dot(
        scaled_a, d_out, sizes, precision=hi, preferred_element_type=f32)
  d_scale = None
  if row_scale is not None:
    d_scale = jnp.sum(rows_a * d_rows_a, axis=1).astype(row_scale.dtype)
    d_rows_a = d_rows_a * row_scale.astype(f32)[:, None]

  def scatter(x, row_index, d_rows):
    if row_index is None:
      return d_rows.astype(x.dtype)
    return jnp.zeros(x.shape, f32).at[row_index].add(d_rows).astype(x.dtype)

  return (scatter(a, a_row_index, d_rows_a), scatter(b, b_row_index, d_rows_b),
          None, None, None, d_scale)


@functools.cache
def _tgmm_fn(out_dtype: Any, precision: Any):
  @jax.custom_vjp
  def ref(a, b, group_sizes, a_row_index, b_row_index, row_scale):
    return _forward_reference(a, b, group_sizes, a_row_index, b_row_index,
                              row_scale, out_dtype, precision)

  def fwd(*args):
    return ref(*args), args

  def bwd(residuals, d_out):
    return tgmm_vjp(*residuals, d_out)

  ref.defvjp(fwd, bwd)
  return ref



def tgmm(
    a: jax.Array,
    b: jax.Array,
    group_sizes: jax.Array,
    *,
    a_row_index: jax.Array | None = None,
    b_row_index: jax.Array | None = None,
    row_scale: jax.Array | None = None,
    out_dtype=jnp.float32,
    precision=jax.lax.Precision.HIGHEST,
) -> jax.Array:
  """Pure-jnp transposed grouped GEMM (see the module docstring).

  The row scale is applied to the gathered `a` rows in float32 and the result cast
  back to `a.dtype` (as the kernel does, `A_r^T (s_r B_r) = (s_r A_r)^T B_r`); the
  products accumulate in float32 at `precision`. Differentiable in `a`, `b` and
  `row_scale` (`tgmm_vjp`; JAX has no VJP of a ragged contraction).

  Args:
    a: `[rows_a, ka]`; b: `[rows_b, n]`; group_sizes: `[g]` int32 over the `m`
      logical rows (`m = len(a_row_index)` if given, else `rows_a`).
    a_row_index, b_row_index: optional `[m]` int32 row gathers.
    row_scale: optional `[m]` float32.

  Returns:
    `[g, ka, n]` in `out_dtype`.
  """
  return _tgmm_fn(jnp.dtype(out_dtype), precision)(
      a, b, group_sizes, a_row_index, b_row_index, row_scale)
