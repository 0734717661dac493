"""Top-k softmax routing with capacity, in pure jnp.

Drop policies (which copies an expert keeps when more than `capacity` choose it):

* `"token_order"`: first come, first served in flattened `(token, choice)` order,
  i.e. copy `(i, j)` has priority `i * top_k + j` (token-major).
* `"probability"`: highest router probability first; ties by flattened index.

A dropped copy keeps its `expert_ids` entry, gets `kept=False` and weight 0, and is
counted in `dropped_count`. Weights are not re-normalised after dropping.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jmoe.reference import losses
from jmoe.types import Routing

DROP_POLICIES = ("token_order", "probability")


def accumulation_dtype(dtype) -> jnp.dtype:
  """float32 for 16/32-bit inputs, float64 for float64 inputs."""
  return jnp.promote_types(dtype, jnp.float32)


def compute_capacity(
    num_tokens: int, top_k: int, num_experts: int, capacity_factor: float | None
) -> int | None:
  """`ceil(capacity_factor * t * top_k / e)`, or None (dropless) for None."""
  if capacity_factor is None:
    return None
  return int(math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def router_logits(x: jax.Array, router_kernel: jax.Array) -> jax.Array:
  """`x [t, d] @ router_kernel [d, e]` accumulated in float32 -> `[t, e]` float32.

  (float64 inputs give float64, so gradients can be checked numerically.)
  """
  acc = accumulation_dtype(x.dtype)
  return jnp.dot(
      x, router_kernel, precision=jax.lax.Precision.HIGHEST, preferred_element_type=acc
  ).astype(acc)


def jitter_noise(rng: jax.Array, rows: jax.Array, d: int, eps: float) -> jax.Array:
  """The float32 factors `uniform(1 - eps, 1 + eps)` of `jitter` for the tokens
  numbered `rows` (int array, any shape) -> `[*rows.shape, d]`.

  Token `r`'s `d` factors are `uniform(fold_in(rng, r), (d,))`: they depend on
  its index in the flattened global tokens only, not on how the tokens are split
  over devices, so each device draws just its own rows.
  """
  def row_noise(key, row):
    return jax.random.uniform(jax.random.fold_in(key, row), (d,), dtype=jnp.float32,
                              minval=1.0 - eps, maxval=1.0 + eps)

  # One vmap per axis of `rows` (not a flatten): each keeps that axis's sharding.
  for _ in range(rows.ndim):
    row_noise = jax.vmap(row_noise, in_axes=(None, 0))
  return row_noise(rng, rows)


def token_indices(x: jax.Array) -> jax.Array:
  """`[...]` int32: the index of each token of `x [..., d]` in its flattened
  leading axes (`0 .. t-1`)."""
  return jnp.arange(math.prod(x.shape[:-1]), dtype=jnp.int32).reshape(x.shape[:-1])


def jitter(x: jax.Array, eps: float, rng: jax.Array, rows: jax.Array | None = None
           ) -> jax.Array:
  """Switch-style multiplicative noise: `x [..., d] * uniform(1 - eps, 1 + eps)`,
  elementwise, with `jitter_noise` of the tokens' indices `rows [...]` (default:
  the flattened leading axes, `0 .. t-1`; a device holding some of the tokens
  passes their global indices)."""
  if rows is None:
    rows = token_indices(x)
  noise = jitter_noise(rng, rows, x.shape[-1], eps)
  return (x.astype(jnp.float32) * noise).astype(x.dtype)


def capacity_positions(
    expert_ids: jax.Array, probs: jax.Array, drop_policy: str
) -> jax.Array:
  """Position of each token copy in its expert's queue under a drop policy.

  Args:
    expert_ids: `[t, top_k]` int32.
    probs: `[t, e]` float32 router probabilities (used by `"probability"`).
    drop_policy: one of `DROP_POLICIES`.

  Returns:
    `[t, top_k]` int32: how many copies of higher priority chose the same expert.
  """
  t, top_k = expert_ids.shape
  e = probs.shape[1]
  flat_ids = expert_ids.reshape(-1)
  if drop_policy == "token_order":
    order = jnp.arange(t * top_k)
  elif drop_policy == "probability":
    copy_probs = jnp.take_along_axis(probs, expert_ids, axis=1).reshape(-1)
    order = jnp.argsort(-copy_probs, stable=True)
  else:
    raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {drop_policy!r}")
  one_hot = jax.nn.one_hot(flat_ids[order], e, dtype=jnp.int32)
  before = jnp.cumsum(one_hot, axis=0) - one_hot
  pos_in_order = jnp.sum(before * one_hot, axis=1).astype(jnp.int32)
  positions = jnp.zeros((t * top_k,), jnp.int32).at[order].set(pos_in_order)
  return positions.reshape(t, top_k)


def route(
    x: jax.Array,
    router_kernel: jax.Array,
    *,
    top_k: int,
    capacity_factor: float | None = None,
    normalize_top_k: bool = True,
    drop_policy: str = "token_order",
) -> Routing:
  """Softmax top-k routing with optional capacity dropping.

  Args:
    x: `[t, d]` router input.
    router_kernel: `[d, e]`.
    top_k: experts per token, `1 <= top_k <= e`.
    capacity_factor: None for dropless, else `> 0`; capacity is
      `ceil(capacity_factor * t * top_k / e)` copies per expert.
    normalize_top_k: divide the `top_k` probabilities by their sum.
    drop_policy: `"token_order"` or `"probability"` (module docstring).

  Returns:
    A `Routing` (see `jmoe.types.Routing`).
  """
  logits = router_logits(x, router_kernel)
  probs = jax.nn.softmax(logits, axis=-1)
  t, e = probs.shape
  top_probs, expert_ids = jax.lax.top_k(probs, top_k)
  expert_ids = expert_ids.astype(jnp.int32)
  weights = top_probs
  if normalize_top_k:
    weights = top_probs / jnp.sum(top_probs, axis=-1, keepdims=True)
  capacity = compute_capacity(t, top_k, e, capacity_factor)
  if capacity is None:
    kept = jnp.ones((t, top_k), dtype=bool)
  else:
    kept = capacity_positions(expert_ids, probs, drop_policy) < capacity
  weights = jnp.where(kept, weights, 0.0)
  kept_one_hot = jax.nn.one_hot(expert_ids, e, dtype=jnp.int32) * kept[..., None]
  tokens_per_expert = kept_one_hot.sum(axis=(0, 1)).astype(jnp.int32)
  dropped_count = (t * top_k - jnp.sum(kept)).astype(jnp.int32)
  return Routing(
      logits=logits,
      probs=probs,
      expert_ids=expert_ids,
      weights=weights,
      kept=kept,
      tokens_per_expert=tokens_per_expert,
      dropped_count=dropped_count,
      load_balancing_loss=losses.load_balancing_loss(probs, expert_ids),
      router_z_loss=losses.router_z_loss(logits),
  )
