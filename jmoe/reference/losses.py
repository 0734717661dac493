"""Router auxiliary losses (returned to the caller, never added silently)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def load_balancing_loss(probs: jax.Array, expert_ids: jax.Array) -> jax.Array:
  """Switch/GShard load-balancing loss `e * sum_e f_e * P_e`.

  Args:
    probs: `[t, e]` float32 router probabilities.
    expert_ids: `[t, top_k]` int32 chosen experts (before any capacity dropping).

  Returns:
    `[]` float32; 1 when routing is perfectly balanced. `f_e` (fraction of routed
    copies per expert) carries no gradient; the gradient flows through `P_e`.
  """
  t, e = probs.shape
  counts = jax.nn.one_hot(expert_ids, e, dtype=probs.dtype).sum(axis=(0, 1))
  fraction = counts / (t * expert_ids.shape[1])
  mean_probs = probs.mean(axis=0)
  return e * jnp.sum(fraction * mean_probs)


def router_z_loss(logits: jax.Array) -> jax.Array:
  """ST-MoE router z-loss: mean over tokens of `logsumexp(logits)^2`.

  Args:
    logits: `[t, e]` float32.

  Returns:
    `[]` float32.
  """
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
