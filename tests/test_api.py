"""The public functional API on the reference backend: `jmoe.moe`, `jmoe.route`,
`jmoe.expert_ffn`; against the oracle, under jit / grad / vmap, leading axes,
params as a mapping, jitter and logit_bias."""

from __future__ import annotations

import functools

import helpers
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import oracle
import pytest

import jmoe
from jmoe import reference as ref

REF = dict(backend="reference")


def _inputs(rng, lead, d, e, f, top_k, activation="swiglu", dtype=np.float32,
            drop_policy="token_order"):
  t = int(np.prod(lead))
  x, router = helpers.routing_inputs(rng, t, d, e, top_k, dtype=dtype,
                                     drop_policy=drop_policy)
  _, up, down = helpers.moe_params(rng, d, e, f, activation, dtype)
  return x.reshape(*lead, d), jmoe.MoEParams(router, up, down)


def _jnp(params):
  return jmoe.MoEParams(*map(jnp.asarray, params))


def test_public_names():
  for name in ("moe", "route", "grouped_matmul", "expert_ffn", "MoEParams", "MoEAux",
               "Routing", "reference"):
    assert name in jmoe.__all__, name
    assert hasattr(jmoe, name), name
  assert callable(jmoe.reference.expert_ffn) and callable(jmoe.reference.moe)


@pytest.mark.parametrize("lead,capacity_factor,drop_policy", [
    ((2, 5), 1.0, "probability"), ((3, 1, 4), None, "token_order"), ((7,), 0.5,
                                                                     "token_order")])
def test_moe_leading_axes_match_oracle(rng, lead, capacity_factor, drop_policy):
  """Leading axes are flattened into tokens: capacity and losses are over all."""
  d, e, f, top_k = 16, 8, 6, 2
  x, params = _inputs(rng, lead, d, e, f, top_k, drop_policy=drop_policy)
  kw = dict(top_k=top_k, capacity_factor=capacity_factor, drop_policy=drop_policy)
  y, aux = jax.jit(functools.partial(jmoe.moe, **kw, **REF))(jnp.asarray(x),
                                                             _jnp(params))
  assert y.shape == x.shape and y.dtype == jnp.float32
  assert isinstance(aux, jmoe.MoEAux)
  want_y, want_aux = oracle.moe(x, *params, activation="swiglu", **kw)
  helpers.assert_close(y, want_y, np.float32)
  helpers.assert_equal(aux.tokens_per_expert, want_aux.tokens_per_expert)
  helpers.assert_equal(aux.dropped_count, want_aux.dropped_count)
  helpers.assert_close(aux.dropped_fraction, want_aux.dropped_fraction, np.float32)
  helpers.assert_close(aux.load_balancing_loss, want_aux.load_balancing_loss,
                       np.float32)
  helpers.assert_close(aux.router_z_loss, want_aux.router_z_loss, np.float32)
  t = int(np.prod(lead))
  np.testing.assert_allclose(float(aux.dropped_fraction),
                             int(aux.dropped_count) / (t * top_k), rtol=1e-7)


def test_params_mapping_equals_namedtuple(rng):
  x, params = _inputs(rng, (7,), 5, 4, 3, 2, activation="gelu")
  x = jnp.asarray(x)
  y1, aux1 = jmoe.moe(x, _jnp(params), top_k=2, activation="gelu", **REF)
  y2, aux2 = jmoe.moe(x, dict(_jnp(params)._asdict()), top_k=2, activation="gelu",
                      **REF)
  np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))
  for a, b in zip(aux1, aux2):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_moe_bfloat16_keeps_dtype(rng):
  x, params = _inputs(rng, (2, 7), 16, 4, 8, 2, dtype=ml_dtypes.bfloat16)
  y, aux = jmoe.moe(jnp.asarray(x), _jnp(params), top_k=2, **REF)
  assert y.dtype == jnp.bfloat16 and y.shape == x.shape
  assert aux.load_balancing_loss.dtype == jnp.float32
  want, _ = oracle.moe(x, *params, top_k=2,
                       round_hidden=lambda h: h.astype(ml_dtypes.bfloat16))
  helpers.assert_close(y, want, jnp.bfloat16)


def test_jit_equals_eager(rng):
  x, params = _inputs(rng, (3, 11), 16, 8, 6, 2, drop_policy="probability")
  x, params = jnp.asarray(x), _jnp(params)
  kw = dict(top_k=2, capacity_factor=1.25, drop_policy="probability", **REF)
  eager = jmoe.moe(x, params, **kw)
  jitted = jax.jit(functools.partial(jmoe.moe, **kw))(x, params)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    if jnp.issubdtype(a.dtype, jnp.floating):
      helpers.assert_close(b, a, np.float32)
    else:
      helpers.assert_equal(b, a)


def test_grad_equals_reference(rng):
  """Gradients of `jmoe.moe` (x, every parameter) equal the reference's."""
  x, params = _inputs(rng, (2, 7), 16, 8, 6, 2)
  x, params = jnp.asarray(x), _jnp(params)
  kw = dict(top_k=2, capacity_factor=1.0)

  def loss_api(x_, p_):
    y, aux = jmoe.moe(x_, p_, **kw, **REF)
    return jnp.sum(y**2) + aux.load_balancing_loss + 0.1 * aux.router_z_loss

  def loss_ref(x_, p_):
    y, aux = ref.moe(x_.reshape(-1, x_.shape[-1]), p_, **kw)
    return jnp.sum(y**2) + aux.load_balancing_loss + 0.1 * aux.router_z_loss

  got = jax.jit(jax.grad(loss_api, argnums=(0, 1)))(x, params)
  want = jax.jit(jax.grad(loss_ref, argnums=(0, 1)))(x, params)
  for name, a, b in zip(("x",) + jmoe.MoEParams._fields, jax.tree.leaves(got),
                        jax.tree.leaves(want)):
    assert a.shape == b.shape, name
    helpers.assert_close(a, b, np.float32, kind="grad", err_msg=name)
    assert np.any(np.asarray(a) != 0), name


def test_vmap_moe_over_batch(rng):
  """vmap over a leading batch axis = one independent MoE per batch element."""
  b, t, d, e, f, top_k = 3, 7, 5, 4, 3, 2
  xs, params = _inputs(rng, (b, t), d, e, f, top_k)
  kw = dict(top_k=top_k, capacity_factor=1.0, activation="swiglu")
  fn = functools.partial(jmoe.moe, **kw, **REF)
  y, aux = jax.vmap(fn, in_axes=(0, None))(jnp.asarray(xs), _jnp(params))
  assert y.shape == (b, t, d) and aux.tokens_per_expert.shape == (b, e)
  for i in range(b):
    want_y, want_aux = oracle.moe(xs[i], *params, **kw)
    helpers.assert_close(y[i], want_y, np.float32, err_msg=f"batch {i}")
    helpers.assert_equal(aux.tokens_per_expert[i], want_aux.tokens_per_expert)
    helpers.assert_close(aux.load_balancing_loss[i], want_aux.load_balancing_loss,
                         np.float32)
  # Under jit and grad too.
  def loss(xs_, p_):
    y_, aux_ = jax.vmap(fn, in_axes=(0, None))(xs_, p_)
    return jnp.sum(y_**2) + jnp.sum(aux_.load_balancing_loss)

  g_vmap = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(xs), _jnp(params))

  def loss_loop(xs_, p_):
    total = 0.0
    for i in range(b):
      y_, aux_ = fn(xs_[i], p_)
      total = total + jnp.sum(y_**2) + aux_.load_balancing_loss
    return total

  g_loop = jax.jit(jax.grad(loss_loop, argnums=(0, 1)))(jnp.asarray(xs), _jnp(params))
  for a, c in zip(jax.tree.leaves(g_vmap), jax.tree.leaves(g_loop)):
    helpers.assert_close(a, c, np.float32, kind="grad")


def test_vmap_route_over_batch(rng):
  b, t, d, e, top_k = 3, 7, 5, 8, 2
  xs, params = _inputs(rng, (b, t), d, e, 3, top_k)
  fn = functools.partial(jmoe.route, top_k=top_k, capacity_factor=0.5, **REF)
  r = jax.vmap(fn, in_axes=(0, None))(jnp.asarray(xs),
                                      jnp.asarray(params.router_kernel))
  for i in range(b):
    want = oracle.route(xs[i], params.router_kernel, top_k=top_k, capacity_factor=0.5)
    got = jax.tree.map(lambda a, i=i: a[i], r)
    helpers.assert_routing_close(got, want, err_msg=f"batch {i}")


def test_route_matches_reference_and_oracle(rng):
  t, d, e, top_k = 33, 16, 8, 2
  x, w = helpers.routing_inputs(rng, t, d, e, top_k, drop_policy="probability")
  kw = dict(top_k=top_k, capacity_factor=0.75, drop_policy="probability",
            normalize_top_k=False)
  got = jmoe.route(jnp.asarray(x), jnp.asarray(w), **kw, **REF)
  assert isinstance(got, jmoe.Routing)
  helpers.check_routing_dtypes(got, t, e, top_k)
  helpers.assert_routing_close(got, oracle.route(x, w, **kw))


def test_expert_ffn_matches_oracle(rng):
  t, d, e, f, top_k = 33, 5, 8, 4, 2
  x = helpers.normal(rng, (t, d))
  _, up, down = helpers.moe_params(rng, d, e, f, "geglu")
  ids = np.stack([rng.permutation(e)[:top_k] for _ in range(t)]).astype(np.int32)
  weights = rng.uniform(0.1, 1, (t, top_k)).astype(np.float32)
  kept = rng.random((t, top_k)) < 0.7
  got = jmoe.expert_ffn(*map(jnp.asarray, (x, ids, weights, kept, up, down)),
                        activation="geglu", **REF)
  want = oracle.expert_ffn(x, ids, weights, kept, up, down, activation="geglu")
  helpers.assert_close(got, want, np.float32)


# ----------------------------------------------------------------------------
# logit_bias and jitter.
# ----------------------------------------------------------------------------


def test_logit_bias_shifts_logits(rng):
  t, d, e, top_k = 33, 16, 8, 2
  x, w = helpers.routing_inputs(rng, t, d, e, top_k)
  bias = helpers.normal(rng, (e,), scale=2.0)
  logits = oracle.router_logits(x, w) + bias.astype(np.float64)
  if helpers.routing_margin(logits, top_k) < 1e-4:
    pytest.skip("ambiguous draw")  # practically never
  got = jmoe.route(jnp.asarray(x), jnp.asarray(w), top_k=top_k, capacity_factor=1.0,
                   logit_bias=jnp.asarray(bias), **REF)
  want = oracle.route(None, None, top_k=top_k, capacity_factor=1.0, logits=logits)
  helpers.assert_routing_close(got, want)


def test_logit_bias_has_no_gradient(rng):
  x, params = _inputs(rng, (7,), 5, 4, 3, 2)
  bias = jnp.asarray(helpers.normal(rng, (4,)))

  def loss(b):
    _, aux = jmoe.moe(jnp.asarray(x), _jnp(params), top_k=2, logit_bias=b, **REF)
    return aux.load_balancing_loss + aux.router_z_loss

  assert np.all(np.asarray(jax.grad(loss)(bias)) == 0.0)


def test_jitter_zero_or_same_key_is_deterministic(rng):
  x, params = _inputs(rng, (2, 7), 5, 4, 3, 2)
  x, params = jnp.asarray(x), _jnp(params)
  base = jmoe.moe(x, params, top_k=2, **REF)
  no_eps = jmoe.moe(x, params, top_k=2, jitter_eps=0.0, rng=jax.random.key(3), **REF)
  for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(no_eps)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  k = jax.random.key(7)
  r1 = jmoe.moe(x, params, top_k=2, jitter_eps=0.5, rng=k, **REF)
  r2 = jmoe.moe(x, params, top_k=2, jitter_eps=0.5, rng=k, **REF)
  for a, b in zip(jax.tree.leaves(r1), jax.tree.leaves(r2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_jitter_scales_router_input_only(rng):
  """Router logits are `(x * u) @ w` with u in [1-eps, 1+eps]; experts see x."""
  t, d, e, f, top_k, eps = 7, 5, 16, 3, 2, 0.2
  x, params = _inputs(rng, (t,), d, e, f, top_k)
  key = jax.random.key(11)
  r = jmoe.route(jnp.asarray(x), jnp.asarray(params.router_kernel), top_k=top_k,
                 jitter_eps=eps, rng=key, **REF)
  # Recover the jittered input from the logits (router_kernel has full row rank).
  x_router = np.asarray(r.logits, np.float64) @ np.linalg.pinv(
      params.router_kernel.astype(np.float64))
  big = np.abs(x) > 0.1  # u is ill-conditioned where x ~ 0
  u = x_router[big] / x.astype(np.float64)[big]
  assert np.all(u >= 1 - eps - 1e-3) and np.all(u <= 1 + eps + 1e-3), u
  assert np.std(u) > eps / 10, "no noise was applied"
  # The experts see x: y is the expert FFN of x for this routing (same rng).
  y, _ = jmoe.moe(jnp.asarray(x), _jnp(params), top_k=top_k, jitter_eps=eps, rng=key,
                  **REF)
  want = oracle.expert_ffn(x, np.asarray(r.expert_ids), np.asarray(r.weights),
                           np.asarray(r.kept), params.up_kernel, params.down_kernel,
                           activation="swiglu")
  helpers.assert_close(y, want, np.float32)


def test_jitter_noise_is_keyed_by_token_index(rng):
  """Token `r`'s noise is `uniform(fold_in(key, r), (d,))`: the same whether the
  tokens come as `[t, d]`, `[b, s, d]`, or one device's rows `r0 .. r0 + n`."""
  t, d, eps = 12, 9, 0.3
  key = jax.random.key(4)
  x = jnp.asarray(rng.standard_normal((t, d)) + 3.0, jnp.float32)  # no x ~ 0
  want = np.stack([np.asarray(jax.random.uniform(
      jax.random.fold_in(key, r), (d,), jnp.float32, 1 - eps, 1 + eps)) for r in range(t)])
  np.testing.assert_array_equal(
      np.asarray(jmoe.reference.jitter_noise(key, jnp.arange(t), d, eps)), want)
  got = np.asarray(jmoe.reference.jitter(x, eps, key)) / np.asarray(x)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  batched = jmoe.reference.jitter(x.reshape(3, 4, d), eps, key).reshape(t, d)
  np.testing.assert_array_equal(np.asarray(batched), np.asarray(jmoe.reference.jitter(x, eps, key)))
  rows = jnp.arange(5, 9)
  np.testing.assert_array_equal(
      np.asarray(jmoe.reference.jitter(x[5:9], eps, key, rows)),
      np.asarray(jmoe.reference.jitter(x, eps, key))[5:9])
  assert want.min() >= 1 - eps and want.max() <= 1 + eps and np.std(want) > eps / 3
