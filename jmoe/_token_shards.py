"""The public ops on tokens split over explicit mesh axes (data parallelism).

When `x` is sharded over `jax.sharding.AxisType.Explicit` mesh axes (jax 0.11's
`jax.make_mesh` default) along its token (leading) axes, `jmoe.moe`,
`jmoe.route` and `jmoe.expert_ffn` run each device's tokens under
`jax.shard_map` over the whole mesh: the kernels see only local rows, and the
weights are resharded to replicated first (an all-gather where they were split,
e.g. FSDP; its transpose hands their gradients back in their own sharding).

What crosses devices:

- with `capacity_factor=None` (dropless) every output equals the unsharded
  call's: routing and the expert FFN are per token;
- the load-balancing and z losses, `tokens_per_expert` and the dropped count
  are global, from statistics summed over the mesh (`psum`): the values of
  the unsharded call;
- with a capacity, the capacity is per shard, `ceil(cf * t_shard * k / e)`
  copies per expert on each device (GShard's per-group capacity), so which
  copies drop depends on the split; the dropped count stays the global total.

Shards have equal sizes (explicit sharding needs divisible axes), so a mean
over the mesh of per-shard means is the global mean. An unsplit `x` under an
explicit context mesh (`jax.set_mesh`) takes this path too, with no split: jax
has no explicit-sharding rule for `ragged_dot` (the reference) or for the
kernels' custom calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jmoe import _shard
from jmoe.types import MoEAux, Routing


class TokenSplit:
  """How `x [..., d]` is split over an explicit `mesh`: its spec and the axes
  its tokens vary over (none when `x` is not split: each device then runs all
  tokens, as jax does for a replicated value)."""

  def __init__(self, x: jax.Array, mesh):
    self.mesh = mesh
    # Unsplit x (explicit context mesh only): every entry None.
    entries = _shard.spec_entries(x) if _shard.explicit_spec(x) else (None,) * x.ndim
    self.spec = P(*entries)
    self.rows_spec = P(entries[0], None)  # of x [t, d] (route, expert_ffn)
    self.axes = _shard.mesh_axes(entries)
    self.shards = math.prod(self.mesh.shape[a] for a in self.axes)

  def _resharded(self, tree: Any, spec) -> Any:
    sharding = NamedSharding(self.mesh, spec)
    return jax.tree.map(lambda a: jax.sharding.reshard(a, sharding), tree)

  def replicated(self, tree: Any) -> Any:
    """`tree`'s arrays resharded to replicated over the mesh (None kept)."""
    return self._resharded(tree, P())

  def like_rows(self, tree: Any) -> Any:
    """`tree`'s `[t, top_k]` arrays resharded to split rows as `x [t, d]` is."""
    return self._resharded(tree, self.rows_spec)

  def run(self, body: Callable, args: tuple, in_specs: tuple, out_specs: Any):
    return jax.shard_map(body, mesh=self.mesh, in_specs=in_specs,
                         out_specs=out_specs)(*args)


def routing_over_mesh(routing: Routing, axes: tuple[str, ...], shards: int,
                      dropless: bool) -> Routing:
  """`routing` of one shard with its losses and counts made global over the
  mesh `axes` (`shards` devices, equal shares of tokens; in the body of
  `shard_map`): `psum` of the counts, the load-balancing loss
  `e * sum_e f_e P_e` from the mesh-wide routed fraction `f_e` and mean
  probability `P_e` (its gradient reaches `probs`), the mean z-loss.
  `dropless`: every routed copy is kept, so `tokens_per_expert` counts them."""
  t, e = routing.probs.shape
  k = routing.expert_ids.shape[1]
  if dropless:
    counts = routing.tokens_per_expert.astype(jnp.float32)
  else:
    counts = jnp.bincount(routing.expert_ids.reshape(-1), length=e).astype(jnp.float32)
  fraction = jax.lax.psum(counts, axes) / (shards * t * k)
  mean_probs = jax.lax.pmean(routing.probs.mean(axis=0), axes)
  return routing._replace(
      tokens_per_expert=jax.lax.psum(routing.tokens_per_expert, axes),
      dropped_count=jax.lax.psum(routing.dropped_count, axes),
      load_balancing_loss=e * jnp.sum(fraction * mean_probs),
      router_z_loss=jax.lax.pmean(routing.router_z_loss, axes),
  )


def aux_over_mesh(routing: Routing, axes: tuple[str, ...], shards: int,
                  dropless: bool) -> MoEAux:
  """`MoEAux` of all shards from one shard's routing (in the body of `shard_map`)."""
  glob = routing_over_mesh(routing, axes, shards, dropless)
  return MoEAux(
      load_balancing_loss=glob.load_balancing_loss,
      router_z_loss=glob.router_z_loss,
      tokens_per_expert=glob.tokens_per_expert,
      dropped_count=glob.dropped_count,
      dropped_fraction=(glob.dropped_count.astype(jnp.float32)
                        / (shards * routing.kept.size)),
  )


def routing_specs(split: TokenSplit) -> Routing:
  rows = split.rows_spec
  return Routing(logits=rows, probs=rows, expert_ids=rows, weights=rows, kept=rows,
                 tokens_per_expert=P(), dropped_count=P(), load_balancing_loss=P(),
                 router_z_loss=P())
