"""Public functional API: `grouped_matmul`, `route`, `expert_ffn`, `moe`.

Each function validates its arguments at trace time, resolves `backend` once
(`jmoe._backend.resolve_backend`) and calls the pure-jnp reference
(`jmoe.reference`) or the Triton ops (`jmoe.ops`, `backend="triton"` on a CUDA
GPU, `backend="interpret"` under Triton's interpreter on the CPU).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jmoe import _checks
from jmoe import _shard
from jmoe import _token_shards
from jmoe import reference
from jmoe._backend import resolve_backend
from jmoe.types import MoEAux, MoEParams, Routing


def grouped_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    preferred_element_type=None,
    backend: str = "auto",
) -> jax.Array:
  """Grouped matmul with exactly the semantics of `jax.lax.ragged_dot`.

  Example::

    out = jmoe.grouped_matmul(lhs, rhs, group_sizes)   # [m, k] x [g, k, n] -> [m, n]

  Args:
    lhs: `[m, k]`; rows grouped contiguously: the first `group_sizes[0]` rows use
      `rhs[0]`, the next `group_sizes[1]` rows `rhs[1]`, ...
    rhs: `[g, k, n]`.
    group_sizes: `[g]` integer (int32); rows at or past `sum(group_sizes)` are zero.
    preferred_element_type: output dtype (default `lhs.dtype`); accumulation is float32.
    backend: `"auto"`, `"triton"`, `"reference"` or `"interpret"`.

  Returns:
    `[m, n]`.

  Raises:
    ValueError, TypeError: bad shapes or dtypes. RuntimeError: backend cannot run here.
  """
  _checks.check_grouped_matmul(lhs, rhs, group_sizes)
  backend = resolve_backend(backend)
  _checks.check_kernel_dtype(backend, lhs=lhs, rhs=rhs)
  group_sizes = group_sizes.astype(jnp.int32)
  if backend == "reference":
    return reference.grouped_matmul(
        lhs, rhs, group_sizes, preferred_element_type=preferred_element_type
    )
  from jmoe.ops import grouped_matmul as ops_gmm  # pylint: disable=import-outside-toplevel

  return ops_gmm.grouped_matmul(
      lhs, rhs, group_sizes,
      preferred_element_type=preferred_element_type, backend=backend,
  )


def _jittered(x, jitter_eps, rng):
  """`x [..., d]` with Switch jitter (`reference.jitter`: token `r` of the
  flattened leading axes gets noise keyed by `r`, whatever the split). On
  explicitly split x the token indices are split like x, so each device draws
  only its own tokens' noise."""
  rows = reference.routing.token_indices(x)
  if _shard.explicit_spec(x) is not None:
    rows = jax.sharding.reshard(rows, P(*_shard.spec_entries(x)[:-1]))
  return reference.jitter(x, jitter_eps, rng, rows)


def _router_input(x, router_kernel, logit_bias):
  """Appends a logit bias as an extra input column.

  `[x, 1] @ [[w], [bias]] = x @ w + bias`: every backend's router gets the bias
  without a kernel argument of its own.
  """
  if logit_bias is not None:
    ones = jnp.ones((x.shape[0], 1), x.dtype)
    x = jnp.concatenate([x, ones], axis=1)
    bias = jax.lax.stop_gradient(logit_bias).astype(router_kernel.dtype)
    router_kernel = jnp.concatenate([router_kernel, bias[None, :]], axis=0)
  return x, router_kernel


def _route_backend(x, router_kernel, backend, **options) -> Routing:
  if backend == "reference":
    return reference.route(x, router_kernel, **options)
  from jmoe.ops import routing as ops_routing  # pylint: disable=import-outside-toplevel

  return ops_routing.route(x, router_kernel, backend=backend, **options)


def _expert_ffn_backend(x, routing, up_kernel, down_kernel, activation, backend):
  args = (x, routing.expert_ids, routing.weights, routing.kept, up_kernel, down_kernel)
  if backend == "reference":
    return reference.expert_ffn(*args, activation=activation)
  from jmoe.ops import expert_ffn as ops_ffn  # pylint: disable=import-outside-toplevel

  return ops_ffn.expert_ffn(*args, activation=activation, backend=backend)


def route(
    x: jax.Array,
    router_kernel: jax.Array,
    *,
    top_k: int,
    capacity_factor: float | None = None,
    normalize_top_k: bool = True,
    drop_policy: str = "token_order",
    jitter_eps: float = 0.0,
    rng: jax.Array | None = None,
    logit_bias: jax.Array | None = None,
    backend: str = "auto",
) -> Routing:
  """Softmax top-k routing with optional capacity and jitter.

  Example::

    r = jmoe.route(x, w_router, top_k=2, capacity_factor=1.25)
    r.expert_ids, r.weights, r.kept, r.load_balancing_loss, r.dropped_count

  Args:
    x: `[t, d]` tokens; `t` may be split over explicit mesh axes (as in `moe`).
    router_kernel: `[d, e]`, `1 <= e <= 256`.
    top_k: experts per token, `1 <= top_k <= min(8, e)`.
    capacity_factor: None = dropless; else `> 0`, capacity
      `ceil(capacity_factor * t * top_k / e)` copies per expert.
    normalize_top_k: renormalise the `top_k` weights to sum to 1.
    drop_policy: `"token_order"` (first come, token-major) or `"probability"`.
    jitter_eps: Switch multiplicative noise `uniform(1-eps, 1+eps)` on the router
      input (training); needs `rng`. Token `r` (flattened leading axes) gets
      `uniform(fold_in(rng, r), (d,))`, the same however the tokens are split.
    rng: a `jax.random` key, required when `jitter_eps > 0`.
    logit_bias: optional `[e]` constant added to the logits (no gradient), e.g.
      `-lambda_energy * expert_cost` for energy-aware routing.
    backend: `"auto"`, `"triton"`, `"reference"` or `"interpret"`.

  Returns:
    `jmoe.Routing`.
  """
  _checks.check_float_array("x", x, 2, " [t, d]")
  t, d = _checks.check_tokens(x, token_split_ok=True)
  e = _checks.check_router_kernel(router_kernel, d)
  _checks.check_routing_options(
      e, top_k=top_k, capacity_factor=capacity_factor, drop_policy=drop_policy,
      jitter_eps=jitter_eps, rng=rng, logit_bias=logit_bias)
  backend = resolve_backend(backend)
  _checks.check_kernel_dtype(backend, x=x, router_kernel=router_kernel)
  mesh = _shard.explicit_mesh(x)
  if jitter_eps > 0:
    x = _jittered(x, jitter_eps, rng)

  def local(x, router_kernel, logit_bias):
    x_router, kernel = _router_input(x, router_kernel, logit_bias)
    return _route_backend(
        x_router, kernel, backend, top_k=top_k, capacity_factor=capacity_factor,
        normalize_top_k=normalize_top_k, drop_policy=drop_policy,
    )

  if mesh is None:
    return local(x, router_kernel, logit_bias)
  split = _token_shards.TokenSplit(x, mesh)
  return split.run(
      lambda *a: _token_shards.routing_over_mesh(local(*a), split.axes, split.shards,
                                                 capacity_factor is None),
      (x, *split.replicated((router_kernel, logit_bias))),
      (split.rows_spec, P(), P()), _token_shards.routing_specs(split),
  )


def as_moe_params(params) -> MoEParams:
  """Accepts an `MoEParams` or a mapping with its three keys."""
  if isinstance(params, MoEParams):
    return params
  if isinstance(params, Mapping):
    missing = [k for k in MoEParams._fields if k not in params]
    if missing:
      raise ValueError(
          f"params is missing {missing}; expected keys {list(MoEParams._fields)}"
      )
    return MoEParams(**{k: params[k] for k in MoEParams._fields})
  raise TypeError(
      f"params must be a jmoe.MoEParams or a mapping with keys {list(MoEParams._fields)}, "
      f"got {type(params).__name__}"
  )


def moe(
    x: jax.Array,
    params,
    *,
    top_k: int,
    capacity_factor: float | None = None,
    activation: str = "swiglu",
    normalize_top_k: bool = True,
    drop_policy: str = "token_order",
    jitter_eps: float = 0.0,
    rng: jax.Array | None = None,
    logit_bias: jax.Array | None = None,
    backend: str = "auto",
) -> tuple[jax.Array, MoEAux]:
  """A whole Mixture-of-Experts feed-forward layer.

  Example::

    params = jmoe.MoEParams(router_kernel, up_kernel, down_kernel)
    y, aux = jmoe.moe(x, params, top_k=2)       # x [batch, seq, d] -> y [batch, seq, d]
    loss = task_loss(y) + 1e-2 * aux.load_balancing_loss + 1e-3 * aux.router_z_loss

  Args:
    x: `[..., d]`; leading axes are flattened into `t` tokens (capacity and losses
      are taken over all of them). Its leading axes may be split over explicit
      mesh axes: each device then runs its own tokens, the losses and counts stay
      those of all tokens, and capacity is per device (`jmoe._token_shards`;
      README "Sharding").
    params: `MoEParams(router_kernel [d, e], up_kernel [e, d, f] (or [e, d, 2f] for
      gated activations, gate columns first), down_kernel [e, f, d])` or a mapping.
    top_k, capacity_factor, normalize_top_k, drop_policy, jitter_eps, rng,
      logit_bias: as in `route`.
    activation: `"gelu"` (tanh approx.), `"relu"`, `"silu"`, `"swiglu"`, `"geglu"`.
    backend: `"auto"`, `"triton"`, `"reference"` or `"interpret"`.

  Returns:
    `(y, aux)`: `y` has x's shape and dtype; `aux` is a `jmoe.MoEAux` with the
    load-balancing and z losses (not added to anything), tokens per expert, the
    dropped count and fraction.
  """
  params = as_moe_params(params)
  t, d = _checks.check_tokens(x, token_split_ok=True)
  e = _checks.check_router_kernel(params.router_kernel, d)
  _checks.check_routing_options(
      e, top_k=top_k, capacity_factor=capacity_factor, drop_policy=drop_policy,
      jitter_eps=jitter_eps, rng=rng, logit_bias=logit_bias)
  _checks.check_activation(activation)
  _checks.check_expert_kernels(params.up_kernel, params.down_kernel, d, e, activation)
  backend = resolve_backend(backend)
  _checks.check_moe_dtypes(backend, x, params)
  mesh = _shard.explicit_mesh(x)
  x_router = None  # x itself
  if jitter_eps > 0:
    x_router = _jittered(x, jitter_eps, rng)

  def local(x, x_router, params, logit_bias):
    """`(y, routing)` of the tokens of `x [..., d]` (all, or one shard's);
    `x_router`: the jittered router input, or None for `x` itself."""
    tokens = x.reshape(-1, d)
    router_x, router_kernel = _router_input(
        tokens if x_router is None else x_router.reshape(-1, d), params.router_kernel,
        logit_bias)
    routing = _route_backend(
        router_x, router_kernel, backend, top_k=top_k, capacity_factor=capacity_factor,
        normalize_top_k=normalize_top_k, drop_policy=drop_policy,
    )
    y = _expert_ffn_backend(
        tokens, routing, params.up_kernel, params.down_kernel, activation, backend
    )
    return y.reshape(x.shape), routing

  if mesh is None:
    y, routing = local(x, x_router, params, logit_bias)
    return y, reference.aux_from_routing(routing)
  split = _token_shards.TokenSplit(x, mesh)

  def body(*args):
    y, routing = local(*args)
    return y, _token_shards.aux_over_mesh(routing, split.axes, split.shards,
                                          capacity_factor is None)

  return split.run(body, (x, x_router, *split.replicated((params, logit_bias))),
                   (split.spec, split.spec, P(), P()), (split.spec, P()))


def expert_ffn(
    x: jax.Array,
    expert_ids: jax.Array,
    weights: jax.Array,
    kept: jax.Array,
    up_kernel: jax.Array,
    down_kernel: jax.Array,
    *,
    activation: str = "swiglu",
    backend: str = "auto",
) -> jax.Array:
  """The expert half of an MoE for a given routing (dispatch, FFN, combine).

  Args:
    x: `[t, d]`; `t` may be split over explicit mesh axes (each device then runs
      its own tokens; the per-copy arguments are resharded like `x`).
    expert_ids: `[t, top_k]` integer expert per copy.
    weights: `[t, top_k]` float combine weights.
    kept: `[t, top_k]` bool; False copies are skipped and contribute 0.
    up_kernel: `[e, d, f]` (`[e, d, 2f]` gated); down_kernel: `[e, f, d]`.
    activation: as in `moe`.
    backend: as in `moe`.

  Returns:
    `[t, d]` in x's dtype.
  """
  _checks.check_float_array("x", x, 2, " [t, d]")
  t, d = _checks.check_tokens(x, token_split_ok=True)
  _checks.check_activation(activation)
  e = up_kernel.shape[0] if getattr(up_kernel, "ndim", 0) == 3 else -1
  _checks.check_num_experts(e)
  _checks.check_expert_kernels(up_kernel, down_kernel, d, e, activation)
  if expert_ids.ndim != 2 or expert_ids.shape[0] != t:
    raise ValueError(f"expert_ids must have shape [t={t}, top_k], got {expert_ids.shape}")
  if not jnp.issubdtype(expert_ids.dtype, jnp.integer):
    raise TypeError(f"expert_ids must be integer, got {expert_ids.dtype}")
  for name, a in (("weights", weights), ("kept", kept)):
    if a.shape != expert_ids.shape:
      raise ValueError(f"{name} must have shape {expert_ids.shape}, got {a.shape}")
  backend = resolve_backend(backend)
  _checks.check_kernel_dtype(backend, x=x, up_kernel=up_kernel, down_kernel=down_kernel)
  per_copy = (expert_ids.astype(jnp.int32), weights.astype(jnp.float32), kept.astype(bool))

  def local(x, expert_ids, weights, kept, up_kernel, down_kernel):
    routing_like = Routing(
        logits=None, probs=None, expert_ids=expert_ids, weights=weights, kept=kept,
        tokens_per_expert=None, dropped_count=None, load_balancing_loss=None,
        router_z_loss=None,
    )
    return _expert_ffn_backend(x, routing_like, up_kernel, down_kernel, activation, backend)

  mesh = _shard.explicit_mesh(x)
  if mesh is None:
    return local(x, *per_copy, up_kernel, down_kernel)
  split = _token_shards.TokenSplit(x, mesh)
  rows = split.rows_spec
  return split.run(local, (x, *split.like_rows(per_copy),
                           *split.replicated((up_kernel, down_kernel))),
                   (rows, rows, rows, rows, P(), P()), rows)
