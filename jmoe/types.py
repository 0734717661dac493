"""Result and parameter containers of jmoe (NamedTuples, so they are JAX pytrees)."""

from __future__ import annotations

from typing import NamedTuple

import jax


class Routing(NamedTuple):
  """What `jmoe.route` returns for `t` tokens, `e` experts and `top_k` choices.

  Attributes:
    logits: `[t, e]` float32 router logits.
    probs: `[t, e]` float32 softmax of `logits`.
    expert_ids: `[t, top_k]` int32 chosen experts, best first.
    weights: `[t, top_k]` float32 combine weights (0 where the copy was dropped).
    kept: `[t, top_k]` bool, False where the copy was dropped by capacity.
    tokens_per_expert: `[e]` int32 kept copies per expert.
    dropped_count: `[]` int32 number of dropped token copies.
    load_balancing_loss: `[]` float32 Switch/GShard auxiliary loss (1 when balanced).
    router_z_loss: `[]` float32 ST-MoE z-loss.
  """

  logits: jax.Array
  probs: jax.Array
  expert_ids: jax.Array
  weights: jax.Array
  kept: jax.Array
  tokens_per_expert: jax.Array
  dropped_count: jax.Array
  load_balancing_loss: jax.Array
  router_z_loss: jax.Array


class MoEAux(NamedTuple):
  """Losses and statistics of one MoE call (returned, never added to the output).

  Attributes:
    load_balancing_loss: `[]` float32.
    router_z_loss: `[]` float32.
    tokens_per_expert: `[e]` int32 kept token copies per expert.
    dropped_count: `[]` int32 token copies dropped by capacity.
    dropped_fraction: `[]` float32 `dropped_count / (t * top_k)`.
  """

  load_balancing_loss: jax.Array
  router_z_loss: jax.Array
  tokens_per_expert: jax.Array
  dropped_count: jax.Array
  dropped_fraction: jax.Array


class MoEParams(NamedTuple):
  """Weights of one MoE layer.

  Attributes:
    router_kernel: `[d, e]`.
    up_kernel: `[e, d, f]`, or `[e, d, 2f]` for gated activations (gate columns first).
    down_kernel: `[e, f, d]`.
  """

  router_kernel: jax.Array
  up_kernel: jax.Array
  down_kernel: jax.Array
