"""The whole MoE layer in pure jnp: route -> dispatch -> expert FFN -> combine."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmoe.reference import dispatch as dispatch_lib
from jmoe.reference import routing as routing_lib
from jmoe.reference.activations import apply_activation
from jmoe.reference.grouped_matmul import grouped_matmul
from jmoe.types import MoEAux, MoEParams, Routing

_HIGHEST = jax.lax.Precision.HIGHEST


def expert_ffn(
    x: jax.Array,
    expert_ids: jax.Array,
    weights: jax.Array,
    kept: jax.Array,
    up_kernel: jax.Array,
    down_kernel: jax.Array,
    *,
    activation: str,
) -> jax.Array:
  """Dropless sorted expert FFN: sort copies by expert, two ragged dots, combine.

  Args:
    x: `[t, d]`.
    expert_ids: `[t, top_k]` int32.
    weights: `[t, top_k]` float32 combine weights.
    kept: `[t, top_k]` bool; dropped copies are not computed and contribute 0.
    up_kernel: `[e, d, f]` (`[e, d, 2f]` gated).
    down_kernel: `[e, f, d]`.
    activation: see `jmoe.reference.activations.ACTIVATIONS`.

  Returns:
    `[t, d]` in `x.dtype`: `y_i = sum_j kept*weights[i,j] * down_e(act(x_i @ up_e))`.
  """
  top_k = expert_ids.shape[1]
  num_experts = up_kernel.shape[0]
  order, group_sizes = dispatch_lib.sort_by_expert(expert_ids, kept, num_experts)
  acc = routing_lib.accumulation_dtype(x.dtype)
  x_sorted = x[order // top_k]
  h = grouped_matmul(x_sorted, up_kernel, group_sizes, preferred_element_type=acc)
  h = apply_activation(h, activation).astype(x.dtype)
  out = grouped_matmul(h, down_kernel, group_sizes, preferred_element_type=acc)
  weights = jnp.where(kept, weights, 0.0).astype(acc)
  return dispatch_lib.combine_sorted(out, order, weights, x.dtype)


def expert_ffn_one_hot(
    x: jax.Array,
    routing: Routing,
    up_kernel: jax.Array,
    down_kernel: jax.Array,
    *,
    activation: str,
    capacity: int,
    drop_policy: str,
) -> jax.Array:
  """GShard/Switch capacity form: one-hot dispatch and combine einsums.

  Args:
    x: `[t, d]`.
    routing: from `route` with the same capacity and drop policy.
    up_kernel, down_kernel: as in `expert_ffn`.
    activation: as in `expert_ffn`.
    capacity: copies per expert (`c`).
    drop_policy: as in `route`.

  Returns:
    `[t, d]` in `x.dtype`; equals `expert_ffn` on the same routing.
  """
  num_experts = up_kernel.shape[0]
  acc = routing_lib.accumulation_dtype(x.dtype)
  positions = routing_lib.capacity_positions(routing.expert_ids, routing.probs, drop_policy)
  dispatch, combine = dispatch_lib.one_hot_dispatch(
      routing.expert_ids, routing.kept, positions, routing.weights, num_experts, capacity
  )
  x_expert = jnp.einsum("tec,td->ecd", dispatch.astype(x.dtype), x, precision=_HIGHEST)
  h = jnp.einsum(
      "ecd,edf->ecf", x_expert, up_kernel, precision=_HIGHEST,
      preferred_element_type=acc,
  )
  h = apply_activation(h, activation).astype(x.dtype)
  out = jnp.einsum(
      "ecf,efd->ecd", h, down_kernel, precision=_HIGHEST,
      preferred_element_type=acc,
  )
  y = jnp.einsum("tec,ecd->td", combine, out, precision=_HIGHEST)
  return y.astype(x.dtype)


def aux_from_routing(routing: Routing) -> MoEAux:
  """Collects the losses and statistics of a `Routing` into an `MoEAux`."""
  num_copies = routing.kept.size
  return MoEAux(
      load_balancing_loss=routing.load_balancing_loss,
      router_z_loss=routing.router_z_loss,
      tokens_per_expert=routing.tokens_per_expert,
      dropped_count=routing.dropped_count,
      dropped_fraction=routing.dropped_count.astype(jnp.float32) / num_copies,
  )


def moe(
    x: jax.Array,
    params: MoEParams,
    *,
    top_k: int,
    capacity_factor: float | None = None,
    activation: str = "swiglu",
    normalize_top_k: bool = True,
    drop_policy: str = "token_order",
    router_input: jax.Array | None = None,
    dispatch: str = "sorted",
) -> tuple[jax.Array, MoEAux]:
  """The whole MoE on flattened tokens (no validation: `jmoe.moe` validates).

  Args:
    x: `[t, d]` expert input.
    params: `MoEParams`.
    top_k, capacity_factor, activation, normalize_top_k, drop_policy: as `jmoe.moe`.
    router_input: `[t, d]` router input (e.g. jittered x); default x.
    dispatch: `"sorted"` (dropless or capacity, sort + ragged_dot) or `"one_hot"`
      (GShard einsums; needs a capacity_factor).

  Returns:
    `(y [t, d], MoEAux)`.
  """
  routing = routing_lib.route(
      x if router_input is None else router_input,
      params.router_kernel,
      top_k=top_k,
      capacity_factor=capacity_factor,
      normalize_top_k=normalize_top_k,
      drop_policy=drop_policy,
  )
  if dispatch == "sorted":
    y = expert_ffn(
        x, routing.expert_ids, routing.weights, routing.kept,
        params.up_kernel, params.down_kernel, activation=activation,
    )
  elif dispatch == "one_hot":
    capacity = routing_lib.compute_capacity(
        x.shape[0], top_k, params.up_kernel.shape[0], capacity_factor
    )
    if capacity is None:
      raise ValueError("dispatch='one_hot' needs a capacity_factor (got None)")
    y = expert_ffn_one_hot(
        x, routing, params.up_kernel, params.down_kernel,
        activation=activation, capacity=capacity, drop_policy=drop_policy,
    )
  else:
    raise ValueError(f"dispatch must be 'sorted' or 'one_hot', got {dispatch!r}")
  return y, aux_from_routing(routing)
