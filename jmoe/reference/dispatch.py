"""Dispatch and combine in pure jnp: the dropless sorted form and the one-hot capacity form."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sort_by_expert(
    expert_ids: jax.Array, kept: jax.Array, num_experts: int
) -> tuple[jax.Array, jax.Array]:
  """Orders token copies by expert, dropped copies last.

  Args:
    expert_ids: `[t, top_k]` int32.
    kept: `[t, top_k]` bool.
    num_experts: `e`.

  Returns:
    `order [t * top_k]` int32 flattened copy indices (`token * top_k + choice`), stable
    within each expert, and `group_sizes [e]` int32 kept copies per expert.
  """
  flat = jnp.where(kept, expert_ids, num_experts).reshape(-1)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  group_sizes = jnp.bincount(flat, length=num_experts + 1)[:num_experts]
  return order, group_sizes.astype(jnp.int32)


def combine_sorted(
    copy_rows: jax.Array, order: jax.Array, weights: jax.Array, out_dtype
) -> jax.Array:
  """Weights expert outputs and sums each token's `top_k` copies (deterministically).

  Args:
    copy_rows: `[t * top_k, d]` float32 expert outputs in sorted (`order`) layout.
    order: `[t * top_k]` copy index of each sorted row.
    weights: `[t, top_k]` float32 combine weights (0 for dropped copies).
    out_dtype: dtype of the result.

  Returns:
    `[t, d]`: `y[i] = sum_j weights[i, j] * copy_rows[row of copy (i, j)]`.
  """
  t, top_k = weights.shape
  unsorted = jnp.zeros_like(copy_rows).at[order].set(copy_rows)
  weighted = unsorted.reshape(t, top_k, -1) * weights[..., None]
  return jnp.sum(weighted, axis=1).astype(out_dtype)


def one_hot_dispatch(
    expert_ids: jax.Array,
    kept: jax.Array,
    positions: jax.Array,
    weights: jax.Array,
    num_experts: int,
    capacity: int,
) -> tuple[jax.Array, jax.Array]:
  """GShard dispatch and combine tensors.

  Args:
    expert_ids, kept, positions: `[t, top_k]` (positions < capacity where kept).
    weights: `[t, top_k]` float32.
    num_experts, capacity: `e`, `c`.

  Returns:
    `dispatch [t, e, c]` float32 0/1 and `combine [t, e, c]` float32 weights.
  """
  expert_hot = jax.nn.one_hot(expert_ids, num_experts, dtype=weights.dtype)
  slot_hot = jax.nn.one_hot(positions, capacity, dtype=weights.dtype)
  slot_hot = slot_hot * kept[..., None]
  dispatch = jnp.einsum("tke,tkc->tec", expert_hot, slot_hot)
  combine = jnp.einsum("tke,tkc->tec", expert_hot * weights[..., None], slot_hot)
  return dispatch, combine
