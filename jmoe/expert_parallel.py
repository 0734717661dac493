"""Expert parallelism: experts split over a mesh axis, token copies exchanged by all-to-all.

`moe_expert_parallel` is called inside `jax.shard_map` on one device's tokens
and one device's experts (device `i` of the `axis_name` axis holds experts
`[i * e_local, (i + 1) * e_local)`):

1. route the local tokens over all `e` experts (`jmoe.route`, router replicated);
2. put each kept copy in a send slot of its expert's device: `n` blocks of
   `send_capacity` rows (default `t_local * top_k`, so no copy can overflow:
   dropless), in copy order;
3. `jax.lax.all_to_all` the rows, their local expert ids and a valid mask;
4. run the local experts on the received rows (`jmoe.expert_ffn` with one
   copy per row; empty slots are not kept, so they cost no GEMM work);
5. `all_to_all` the outputs back to their slots, weight each copy by its
   routing weight (float32) and sum each token's copies.

Dispatch and combine are gathers in both directions (`_dispatch`, `_combine`:
custom VJPs through the slot <-> copy maps), so no XLA scatter-add runs.

The default send buffer holds `n * t_local * top_k` rows, `n` times what the
tokens' copies need, to stay dropless with fixed shapes: XLA's CPU backend has
no `ragged_all_to_all`, so the exchange is a dense `all_to_all` of the padded
blocks. A smaller `send_capacity` bounds that memory and traffic; copies past
it are dropped (weight 0) and counted in `MoEAux.dropped_count`, never dropped
silently. The load-balancing and z losses, `tokens_per_expert` and the counts
are those of all tokens over `token_axes` (`psum`), as in `jmoe.moe` on
explicitly split tokens; `capacity_factor` is per device (GShard per-group).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jmoe import _checks
from jmoe import _token_shards
from jmoe import api
from jmoe import reference
from jmoe._backend import resolve_backend
from jmoe.types import MoEAux, MoEParams, Routing


def _axis_size(axis_name: str) -> int:
  try:
    return jax.lax.axis_size(axis_name)
  except NameError as err:
    raise ValueError(
        f"moe_expert_parallel must run inside jax.shard_map with axis_name={axis_name!r} "
        "bound (its mesh axis over which the experts are split)") from err


def _check_axes(axis_name: str, token_axes) -> tuple[str, ...]:
  token_axes = (axis_name,) if token_axes is None else tuple(token_axes)
  if axis_name not in token_axes:
    raise ValueError(
        f"token_axes must include axis_name={axis_name!r} (tokens split over the expert "
        f"axis, each device sending its own copies), got {token_axes}")
  return token_axes


def _send_slots(expert_ids, kept, e_local: int, n: int, cap: int):
  """Where each copy goes: `(slot [t*k], copy_of_slot [n*cap], sent [t*k])`.

  `slot = dest * cap + position` among the kept copies for device `dest`, in
  copy order; a copy not sent (dropped by routing, or past `cap`) gets a slot
  past the buffer, `n * cap + copy` (all distinct). `copy_of_slot` is the
  inverse: the copy in each slot, `t * k` (past the copies) where empty."""
  ids = expert_ids.reshape(-1)
  kept = kept.reshape(-1)
  copies = ids.shape[0]
  dest = ids // e_local
  to_dest = (dest[:, None] == jnp.arange(n, dtype=dest.dtype)[None, :]) & kept[:, None]
  position = jnp.take_along_axis(jnp.cumsum(to_dest, axis=0, dtype=jnp.int32),
                                 dest[:, None], axis=1)[:, 0] - 1
  sent = kept & (position < cap)
  copy = jnp.arange(copies, dtype=jnp.int32)
  slot = jnp.where(sent, dest * cap + position, n * cap + copy).astype(jnp.int32)
  copy_of_slot = jnp.full((n * cap,), copies, jnp.int32).at[slot].set(
      copy, mode="drop", unique_indices=True)
  return slot, copy_of_slot, sent


def _rows(a, index):
  """`a[index]`, rows at or past `a`'s end read as 0."""
  return jnp.take(a, index, axis=0, mode="fill", fill_value=0)


# Dispatch and combine by gathers both ways (their transposes as scatters with
# repeated rows would be XLA scatter-adds): each slot knows its copy, each copy
# its slot.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dispatch(tokens, slot, copy_of_slot, top_k: int):
  """`send [n*cap, d]`: each slot's token row (0 where empty)."""
  del slot
  return _rows(tokens, copy_of_slot // top_k)


def _dispatch_fwd(tokens, slot, copy_of_slot, top_k):
  return _dispatch(tokens, slot, copy_of_slot, top_k), (slot, copy_of_slot)


def _dispatch_bwd(top_k, res, g):
  slot, copy_of_slot = res
  t = slot.shape[0] // top_k
  d_tokens = _rows(g, slot).astype(jnp.float32).reshape(t, top_k, -1).sum(axis=1)
  return d_tokens.astype(g.dtype), None, None


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


@jax.custom_vjp
def _combine(back, weights, slot, copy_of_slot):
  """`y [t, d]` float32: each token's copies' rows of `back [n*cap, d]`,
  weighted by `weights [t, k]` and summed."""
  del copy_of_slot
  t, k = weights.shape
  rows = _rows(back, slot).astype(jnp.float32).reshape(t, k, -1)
  return jnp.sum(rows * weights[..., None], axis=1)


def _combine_fwd(back, weights, slot, copy_of_slot):
  return _combine(back, weights, slot, copy_of_slot), (back, weights, slot, copy_of_slot)


def _combine_bwd(res, g):
  back, weights, slot, copy_of_slot = res
  t, k = weights.shape
  rows = _rows(back, slot).astype(jnp.float32).reshape(t, k, -1)
  d_weights = jnp.sum(rows * g[:, None, :], axis=2)
  slot_weight = jnp.take(weights.reshape(-1), copy_of_slot, mode="fill", fill_value=0)
  d_back = _rows(g, copy_of_slot // k) * slot_weight[:, None]
  return d_back.astype(back.dtype), d_weights, None, None


_combine.defvjp(_combine_fwd, _combine_bwd)


def moe_expert_parallel(
    x: jax.Array,
    params,
    *,
    top_k: int,
    axis_name: str,
    token_axes: tuple[str, ...] | None = None,
    send_capacity: int | None = None,
    capacity_factor: float | None = None,
    activation: str = "swiglu",
    normalize_top_k: bool = True,
    drop_policy: str = "token_order",
    jitter_eps: float = 0.0,
    rng: jax.Array | None = None,
    logit_bias: jax.Array | None = None,
    backend: str = "auto",
) -> tuple[jax.Array, MoEAux]:
  """An MoE layer with its experts split over the mesh axis `axis_name`.

  Call it inside `jax.shard_map`, with the tokens split over `axis_name` (and
  any other `token_axes`) and the expert kernels split over `axis_name` on
  their expert axis::

    ep = jax.shard_map(
        lambda x, p: jmoe.moe_expert_parallel(x, p, top_k=2, axis_name="ep"),
        mesh=mesh, in_specs=(P("ep"), jmoe.MoEParams(P(), P("ep"), P("ep"))),
        out_specs=(P("ep"), P()))
    y, aux = ep(x, params)   # the same y and aux as jmoe.moe(x, params, top_k=2)

  Args:
    x: `[..., d]` this device's tokens (leading axes flattened into `t_local`).
    params: `MoEParams(router_kernel [d, e] (replicated), up_kernel [e_local, d, f]
      (`[e_local, d, 2f]` gated), down_kernel [e_local, f, d])`, `e = n * e_local`
      for `n` devices along `axis_name`; or a mapping with those keys.
    top_k, capacity_factor, normalize_top_k, drop_policy, logit_bias, activation,
      backend: as in `jmoe.moe` (`capacity_factor` per device).
    jitter_eps, rng: router-input jitter as in `jmoe.moe`, the same noise per
      token (keyed by its global index; each device draws its own rows' noise).
    axis_name: the mesh axis the experts (and tokens) are split over.
    token_axes: every mesh axis the tokens are split over (default
      `(axis_name,)`); the losses and counts are summed over them.
    send_capacity: rows each device may send to each device (default
      `t_local * top_k`: dropless). Copies past it are dropped and counted.

  Returns:
    `(y, aux)`: `y` has x's shape and dtype; `aux` a `jmoe.MoEAux` over all tokens
    of `token_axes` (`dropped_count` includes the copies past `send_capacity`).
  """
  params = api.as_moe_params(params)
  token_axes = _check_axes(axis_name, token_axes)
  n = _axis_size(axis_name)
  t, d = _checks.check_tokens(x)
  e = _checks.check_router_kernel(params.router_kernel, d)
  _checks.check_routing_options(
      e, top_k=top_k, capacity_factor=capacity_factor, drop_policy=drop_policy,
      jitter_eps=jitter_eps, rng=rng, logit_bias=logit_bias)
  _checks.check_activation(activation)
  e_local = _check_local_experts(params, d, e, n, axis_name, activation)
  cap = t * top_k if send_capacity is None else int(send_capacity)
  if cap < 1:
    raise ValueError(f"send_capacity must be >= 1 rows, got {send_capacity}")
  backend = resolve_backend(backend)
  _checks.check_moe_dtypes(backend, x, params)

  tokens = x.reshape(t, d)
  router_x = tokens
  if jitter_eps > 0:
    router_x = _jittered_rows(tokens, jitter_eps, rng, token_axes)
  router_x, router_kernel = api._router_input(router_x, params.router_kernel, logit_bias)  # pylint: disable=protected-access
  routing = api._route_backend(  # pylint: disable=protected-access
      router_x, router_kernel, backend, top_k=top_k, capacity_factor=capacity_factor,
      normalize_top_k=normalize_top_k, drop_policy=drop_policy,
  )
  slot, copy_of_slot, sent = _send_slots(routing.expert_ids, routing.kept, e_local, n, cap)
  send = _dispatch(tokens, slot, copy_of_slot, top_k)
  send_ids = jnp.take(routing.expert_ids.reshape(-1) % e_local, copy_of_slot,
                      mode="fill", fill_value=0)
  send_valid = copy_of_slot < t * top_k

  def exchange(a):
    return jax.lax.all_to_all(a, axis_name, 0, 0, tiled=True)

  recv, recv_ids, recv_valid = exchange(send), exchange(send_ids), exchange(send_valid)
  one_copy = Routing(
      logits=None, probs=None, expert_ids=recv_ids[:, None],
      weights=jnp.ones((n * cap, 1), jnp.float32), kept=recv_valid[:, None],
      tokens_per_expert=None, dropped_count=None, load_balancing_loss=None,
      router_z_loss=None,
  )
  out = api._expert_ffn_backend(  # pylint: disable=protected-access
      recv, one_copy, params.up_kernel, params.down_kernel, activation, backend)
  y = _combine(exchange(out), routing.weights * sent.reshape(t, top_k), slot, copy_of_slot)

  aux = _aux_over_mesh(routing, sent, token_axes, capacity_factor is None)
  return y.astype(x.dtype).reshape(x.shape), aux


def _jittered_rows(tokens, jitter_eps: float, rng, token_axes: tuple[str, ...]):
  """This device's `[t, d]` tokens with the jitter `jmoe.moe` gives those rows:
  `reference.jitter` keyed by their global indices (this device's index over
  `token_axes` times `t`, plus `0 .. t-1`). Each device draws only its rows."""
  t = tokens.shape[0]
  first = jax.lax.axis_index(token_axes) * t
  rows = first + jnp.arange(t, dtype=jnp.int32)
  return reference.jitter(tokens, jitter_eps, rng, rows)


def _check_local_experts(params, d: int, e: int, n: int, axis_name: str,
                         activation: str) -> int:
  """This device's expert count `e / n`, checked against the expert kernels."""
  e_local = params.up_kernel.shape[0] if getattr(params.up_kernel, "ndim", 0) == 3 else -1
  if e_local * n != e:
    raise ValueError(
        f"up_kernel must hold this device's e / n = {e} / {n} experts on axis 0 "
        f"(router_kernel has e={e}, axis {axis_name!r} has n={n} devices), got "
        f"shape {getattr(params.up_kernel, 'shape', None)}")
  _checks.check_expert_kernels(params.up_kernel, params.down_kernel, d, e_local, activation)
  return e_local


def _aux_over_mesh(routing: Routing, sent, token_axes: tuple[str, ...],
                   dropless: bool) -> MoEAux:
  """`MoEAux` of all tokens of `token_axes`: the routing's, with the copies not
  sent (`sent [t*k]` False, past `send_capacity`) dropped and counted."""
  t, k = routing.expert_ids.shape
  e = routing.probs.shape[1]
  shards = math.prod(jax.lax.axis_size(a) for a in token_axes)
  aux = _token_shards.aux_over_mesh(routing, token_axes, shards, dropless)
  overflow = jax.lax.psum(jnp.sum(routing.kept.reshape(-1) & ~sent, dtype=jnp.int32),
                          token_axes)
  processed = jnp.zeros((e,), jnp.int32).at[routing.expert_ids.reshape(-1)].add(
      sent.astype(jnp.int32))
  dropped = aux.dropped_count + overflow
  return aux._replace(
      tokens_per_expert=jax.lax.psum(processed, token_axes),
      dropped_count=dropped,
      dropped_fraction=dropped.astype(jnp.float32) / (shards * t * k),
  )


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
  """Where `moe_expert_parallel` runs, for calls on global arrays (and the Flax
  layers' `expert_parallel=` argument).

  Attributes:
    mesh: the `jax.sharding.Mesh`.
    axis_name: its axis the experts are split over.
    token_axes: the axes x's leading axis is split over (default
      `(axis_name,)`); it must include `axis_name`.
    send_capacity: as in `moe_expert_parallel` (default: dropless).
  """

  mesh: Any
  axis_name: str = "ep"
  token_axes: tuple[str, ...] | None = None
  send_capacity: int | None = None

  def moe(self, x: jax.Array, params, **kwargs) -> tuple[jax.Array, MoEAux]:
    """`jmoe.moe(x, params, **kwargs)` with the experts split over `axis_name`:
    `moe_expert_parallel` under `jax.shard_map` over `mesh`, x's leading axis
    split over `token_axes`, the expert kernels over `axis_name`, the router
    kernel, `logit_bias` and `rng` replicated."""
    params = api.as_moe_params(params)
    token_axes = _check_axes(self.axis_name, self.token_axes)
    logit_bias, rng = kwargs.pop("logit_bias", None), kwargs.pop("rng", None)

    def body(x, params, logit_bias, rng):
      return moe_expert_parallel(
          x, params, axis_name=self.axis_name, token_axes=token_axes,
          send_capacity=self.send_capacity, logit_bias=logit_bias, rng=rng, **kwargs)

    tokens = P(token_axes)
    experts = MoEParams(P(), P(self.axis_name), P(self.axis_name))
    return jax.shard_map(body, mesh=self.mesh, in_specs=(tokens, experts, P(), P()),
                         out_specs=(tokens, P()))(x, params, logit_bias, rng)
