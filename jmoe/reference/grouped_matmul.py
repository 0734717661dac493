"""Grouped matmul reference: `jax.lax.ragged_dot`, made batchable under `jax.vmap`.

`ragged_dot` batches only when all three operands are batched along axis 0
(jax 0.11: "vmap over any dim but 0 - NYI" otherwise), so the reference wraps it in
a `custom_vmap` rule that broadcasts the unbatched operands first, and in a
`custom_vjp` (whose backward is `ragged_dot`'s own VJP, batched the same way)
because `custom_vmap` functions are not reverse-differentiable.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _vmap_all_batched(fn):
  """`fn` under vmap broadcasts every unbatched argument and vmaps them all on axis 0."""
  wrapped = jax.custom_batching.custom_vmap(fn)

  @wrapped.def_vmap
  def _rule(axis_size, in_batched, *args):
    args = [
        a if b else jnp.broadcast_to(a, (axis_size, *a.shape))
        for a, b in zip(args, in_batched)
    ]
    out = jax.vmap(fn)(*args)
    return out, jax.tree.map(lambda _: True, out)

  return wrapped


@functools.cache
def _grouped_matmul_fn(preferred_element_type):
  def dot(lhs, rhs, group_sizes):
    return jax.lax.ragged_dot(
        lhs, rhs, group_sizes,
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=preferred_element_type,
    )

  def dot_vjp(lhs, rhs, group_sizes, d_out):
    _, vjp = jax.vjp(lambda l, r: dot(l, r, group_sizes), lhs, rhs)
    return vjp(d_out)

  batched_dot = _vmap_all_batched(dot)
  batched_dot_vjp = _vmap_all_batched(dot_vjp)

  @jax.custom_vjp
  def grouped_matmul(lhs, rhs, group_sizes):
    return batched_dot(lhs, rhs, group_sizes)

  def fwd(lhs, rhs, group_sizes):
    return batched_dot(lhs, rhs, group_sizes), (lhs, rhs, group_sizes)

  def bwd(residuals, d_out):
    lhs, rhs, group_sizes = residuals
    d_lhs, d_rhs = batched_dot_vjp(lhs, rhs, group_sizes, d_out)
    return d_lhs, d_rhs, None

  grouped_matmul.defvjp(fwd, bwd)
  return grouped_matmul


def grouped_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    preferred_element_type=None,
) -> jax.Array:
  """`out[i] = lhs[i] @ rhs[g(i)]` for rows grouped contiguously by `group_sizes`.

  Args:
    lhs: `[m, k]`.
    rhs: `[g, k, n]`.
    group_sizes: `[g]` int32; rows at or past `sum(group_sizes)` give zeros.
    preferred_element_type: output dtype (default: `lhs.dtype`).

  Returns:
    `[m, n]`, equal to `jax.lax.ragged_dot` (HIGHEST precision).
  """
  return _grouped_matmul_fn(preferred_element_type)(lhs, rhs, group_sizes)
