"""`jmoe.reference.expert_ffn` / `jmoe.reference.moe` against the numpy oracle.

Also: the dropless sorted form and the GShard one-hot capacity form agree, and
gradients of the reference are checked numerically (float64 and float32).
"""

from __future__ import annotations

import functools

import helpers
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import oracle
import pytest
from jax.test_util import check_grads

from jmoe import MoEParams
from jmoe import reference as ref

ACTIVATIONS = ("gelu", "relu", "silu", "swiglu", "geglu")

ref_expert_ffn = jax.jit(ref.expert_ffn, static_argnames=("activation",))
ref_moe = jax.jit(
    ref.moe,
    static_argnames=("top_k", "capacity_factor", "activation", "normalize_top_k",
                     "drop_policy", "dispatch"),
)


def _routing_arrays(rng, t: int, e: int, top_k: int, keep_prob: float = 0.8):
  """Random distinct experts per token, positive weights, a random kept mask."""
  ids = np.stack([rng.permutation(e)[:top_k] for _ in range(t)]).astype(np.int32)
  weights = rng.uniform(0.1, 1.0, (t, top_k)).astype(np.float32)
  kept = rng.random((t, top_k)) < keep_prob
  return ids, weights, kept


def _params(rng, d, e, f, activation, dtype=np.float32):
  return helpers.moe_params(rng, d, e, f, activation, dtype)


# ----------------------------------------------------------------------------
# expert_ffn for a given routing.
# ----------------------------------------------------------------------------

# (t, d, e, f, top_k)
FFN_CASES = [(1, 5, 1, 3, 1), (7, 16, 3, 8, 2), (33, 5, 8, 6, 2), (100, 16, 64, 4, 8)]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("t,d,e,f,top_k", FFN_CASES,
                         ids=["t{}-d{}-e{}-f{}-k{}".format(*c) for c in FFN_CASES])
def test_expert_ffn_matches_oracle(rng, activation, t, d, e, f, top_k):
  x = helpers.normal(rng, (t, d))
  _, up, down = _params(rng, d, e, f, activation)
  ids, weights, kept = _routing_arrays(rng, t, e, top_k)
  got = ref_expert_ffn(*map(jnp.asarray, (x, ids, weights, kept, up, down)),
                       activation=activation)
  assert got.dtype == jnp.float32 and got.shape == (t, d)
  want = oracle.expert_ffn(x, ids, weights, kept, up, down, activation=activation)
  helpers.assert_close(got, want, np.float32)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_expert_ffn_bfloat16(rng, activation):
  """bf16: GEMMs in bf16 with float32 accumulation, act cast to bf16, output bf16."""
  t, d, e, f, top_k = 33, 16, 8, 24, 2
  bf16 = ml_dtypes.bfloat16
  x = helpers.normal(rng, (t, d), bf16)
  _, up, down = _params(rng, d, e, f, activation, bf16)
  ids, weights, kept = _routing_arrays(rng, t, e, top_k)
  got = ref_expert_ffn(*map(jnp.asarray, (x, ids, weights, kept, up, down)),
                       activation=activation)
  assert got.dtype == jnp.bfloat16
  want = oracle.expert_ffn(x, ids, weights, kept, up, down, activation=activation,
                           round_hidden=lambda h: h.astype(bf16))
  helpers.assert_close(got, want, jnp.bfloat16)


def test_expert_ffn_all_dropped_is_exactly_zero(rng):
  t, d, e, f, top_k = 7, 5, 3, 4, 2
  x = helpers.normal(rng, (t, d))
  _, up, down = _params(rng, d, e, f, "silu")
  ids, weights, _ = _routing_arrays(rng, t, e, top_k)
  kept = np.zeros((t, top_k), bool)
  args = tuple(map(jnp.asarray, (x, ids, weights, kept, up, down)))
  y = ref_expert_ffn(*args, activation="silu")
  assert np.all(np.asarray(y) == 0.0)

  def loss(x_, w_, up_, down_):
    return jnp.sum(ref.expert_ffn(x_, args[1], w_, args[3], up_, down_,
                                  activation="silu") ** 2)

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(args[0], args[2], args[4],
                                                         args[5])
  for name, g in zip(("x", "weights", "up_kernel", "down_kernel"), grads):
    assert np.all(np.asarray(g) == 0.0), name


def test_expert_ffn_dropped_copies_are_not_computed(rng):
  """A token whose copies are all dropped is never read: NaN there stays out of y."""
  t, d, e, f, top_k = 7, 5, 3, 4, 2
  x = helpers.normal(rng, (t, d))
  _, up, down = _params(rng, d, e, f, "swiglu")
  ids, weights, kept = _routing_arrays(rng, t, e, top_k, keep_prob=1.0)
  kept[3] = False
  x_poisoned = x.copy()
  x_poisoned[3] = np.nan
  y = np.asarray(ref_expert_ffn(*map(jnp.asarray, (x_poisoned, ids, weights, kept,
                                                   up, down)),
                                activation="swiglu"))
  assert np.all(y[3] == 0.0)
  want = oracle.expert_ffn(x, ids, weights, kept, up, down, activation="swiglu")
  helpers.assert_close(y, want, np.float32)


def test_expert_ffn_one_expert_takes_everything(rng):
  t, d, e, f = 33, 16, 8, 6
  x = helpers.normal(rng, (t, d))
  _, up, down = _params(rng, d, e, f, "geglu")
  ids = np.full((t, 1), 6, np.int32)
  weights = rng.uniform(0.1, 1.0, (t, 1)).astype(np.float32)
  kept = np.ones((t, 1), bool)
  got = ref_expert_ffn(*map(jnp.asarray, (x, ids, weights, kept, up, down)),
                       activation="geglu")
  want = oracle.expert_ffn(x, ids, weights, kept, up, down, activation="geglu")
  helpers.assert_close(got, want, np.float32)


def test_gated_activation_uses_gate_columns_first(rng):
  """swiglu(h) = silu(h[:f]) * h[f:]: swapping the halves must change the result."""
  t, d, e, f = 7, 5, 1, 4
  x = helpers.normal(rng, (t, d))
  _, up, down = _params(rng, d, e, f, "swiglu")
  ids, weights, kept = np.zeros((t, 1), np.int32), np.ones((t, 1), np.float32), \
      np.ones((t, 1), bool)
  got = np.asarray(ref_expert_ffn(*map(jnp.asarray, (x, ids, weights, kept, up, down)),
                                  activation="swiglu"))
  h = x.astype(np.float64) @ up[0].astype(np.float64)
  gate, lin = h[:, :f], h[:, f:]
  want = (gate / (1 + np.exp(-gate)) * lin) @ down[0]
  helpers.assert_close(got, want, np.float32)
  swapped = (lin / (1 + np.exp(-lin)) * gate) @ down[0]
  assert helpers.relative_error(got, swapped) > 1e-2


# ----------------------------------------------------------------------------
# The whole MoE.
# ----------------------------------------------------------------------------

# (t, d, e, f, top_k, capacity_factor, activation, drop_policy)
MOE_CASES = [
    (1, 5, 1, 3, 1, None, "swiglu", "token_order"),
    (7, 16, 3, 8, 2, 0.5, "gelu", "probability"),
    (7, 5, 64, 4, 8, 1.0, "relu", "token_order"),
    (33, 16, 8, 6, 2, 1.25, "geglu", "probability"),
    (33, 5, 256, 3, 1, 2.0, "silu", "token_order"),
    (100, 16, 8, 5, 2, 1.0, "swiglu", "token_order"),
    (100, 16, 64, 4, 8, None, "gelu", "token_order"),
    (100, 5, 3, 4, 1, 0.25, "silu", "probability"),
]


def _moe_case_id(c):
  return f"t{c[0]}-d{c[1]}-e{c[2]}-f{c[3]}-k{c[4]}-cf{c[5]}-{c[6]}-{c[7]}"


def _moe_inputs(rng, t, d, e, f, top_k, activation, drop_policy, bias_expert=None):
  # With a hot expert, a small router and a moderate bias keep its probabilities
  # below 1 and distinguishable in float32 (they order copies under "probability").
  biased = dict(router_scale=0.3, bias_strength=4.0) if bias_expert is not None else {}
  x, router = helpers.routing_inputs(rng, t, d, e, top_k, drop_policy=drop_policy,
                                     bias_expert=bias_expert, **biased)
  _, up, down = _params(rng, d, e, f, activation)
  return x, MoEParams(router, up, down)


def _check_moe_against_oracle(got, x, params, **kw):
  y, aux = got
  want_y, want_aux = oracle.moe(x, *params, **kw)
  helpers.assert_close(y, want_y, np.float32, err_msg="y")
  helpers.assert_close(aux.load_balancing_loss, want_aux.load_balancing_loss,
                       np.float32, err_msg="load_balancing_loss")
  helpers.assert_close(aux.router_z_loss, want_aux.router_z_loss, np.float32,
                       err_msg="router_z_loss")
  helpers.assert_equal(aux.tokens_per_expert, want_aux.tokens_per_expert,
                       "tokens_per_expert")
  helpers.assert_equal(aux.dropped_count, want_aux.dropped_count, "dropped_count")
  helpers.assert_close(aux.dropped_fraction, want_aux.dropped_fraction, np.float32,
                       err_msg="dropped_fraction")
  assert aux.tokens_per_expert.dtype == jnp.int32
  assert aux.dropped_count.dtype == jnp.int32
  assert aux.dropped_fraction.dtype == jnp.float32


@pytest.mark.parametrize("t,d,e,f,top_k,capacity_factor,activation,drop_policy",
                         MOE_CASES, ids=[_moe_case_id(c) for c in MOE_CASES])
def test_moe_matches_oracle(rng, t, d, e, f, top_k, capacity_factor, activation,
                            drop_policy):
  x, params = _moe_inputs(rng, t, d, e, f, top_k, activation, drop_policy)
  normalize = t % 2 == 1
  kw = dict(top_k=top_k, capacity_factor=capacity_factor, activation=activation,
            normalize_top_k=normalize, drop_policy=drop_policy)
  got = ref_moe(jnp.asarray(x), MoEParams(*map(jnp.asarray, params)), **kw)
  _check_moe_against_oracle(got, x, params, **kw)


@pytest.mark.parametrize("t,d,e,f,top_k,capacity_factor,activation,drop_policy",
                         [c for c in MOE_CASES if c[5] is not None],
                         ids=[_moe_case_id(c) for c in MOE_CASES if c[5] is not None])
def test_one_hot_form_matches_sorted_form(rng, t, d, e, f, top_k, capacity_factor,
                                          activation, drop_policy):
  x, params = _moe_inputs(rng, t, d, e, f, top_k, activation, drop_policy)
  x, params = jnp.asarray(x), MoEParams(*map(jnp.asarray, params))
  kw = dict(top_k=top_k, capacity_factor=capacity_factor, activation=activation,
            drop_policy=drop_policy)
  y_sorted, aux_sorted = ref_moe(x, params, dispatch="sorted", **kw)
  y_hot, aux_hot = ref_moe(x, params, dispatch="one_hot", **kw)
  helpers.assert_close(y_hot, y_sorted, np.float32)
  for a, b in zip(aux_hot, aux_sorted):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  if t == 100 and top_k == 1 or t == 33 and top_k == 2:  # gradients: 2 cases (time)
    _check_one_hot_grads(x, params, **kw)


def _check_one_hot_grads(x, params, **kw):
  def loss(dispatch, x_, p_):
    y, aux = ref.moe(x_, p_, dispatch=dispatch, **kw)
    return jnp.sum(y * y) + aux.load_balancing_loss + aux.router_z_loss

  g_sorted = jax.jit(jax.grad(functools.partial(loss, "sorted"), argnums=(0, 1)))(
      x, params)
  g_hot = jax.jit(jax.grad(functools.partial(loss, "one_hot"), argnums=(0, 1)))(
      x, params)
  for name, a, b in zip(("x",) + MoEParams._fields, jax.tree.leaves(g_hot),
                        jax.tree.leaves(g_sorted)):
    helpers.assert_close(a, b, np.float32, kind="grad", err_msg=name)


@pytest.mark.parametrize("top_k,capacity_factor,drop_policy", [
    (1, 1.0, "token_order"), (2, 1.25, "probability"), (2, None, "token_order")])
def test_moe_all_tokens_on_one_expert(rng, top_k, capacity_factor, drop_policy):
  t, d, e, f, hot = 33, 16, 8, 6, 3
  x, params = _moe_inputs(rng, t, d, e, f, top_k, "swiglu", drop_policy,
                          bias_expert=hot)
  kw = dict(top_k=top_k, capacity_factor=capacity_factor, activation="swiglu",
            drop_policy=drop_policy)
  got = ref_moe(jnp.asarray(x), MoEParams(*map(jnp.asarray, params)), **kw)
  tpe = np.asarray(got[1].tokens_per_expert)
  cap = oracle.capacity(capacity_factor, t, top_k, e)
  assert tpe[hot] == (t if cap is None else min(t, cap))
  assert int(got[1].dropped_count) == t * top_k - int(tpe.sum())
  _check_moe_against_oracle(got, x, params, **kw)


def test_moe_empty_experts_and_overflow(rng):
  """Few tokens, many experts (most empty) and a tight capacity (some dropped)."""
  t, d, e, f, top_k = 7, 16, 64, 4, 8
  x, params = _moe_inputs(rng, t, d, e, f, top_k, "gelu", "probability")
  kw = dict(top_k=top_k, capacity_factor=0.5, activation="gelu",
            drop_policy="probability")
  got = ref_moe(jnp.asarray(x), MoEParams(*map(jnp.asarray, params)), **kw)
  tpe = np.asarray(got[1].tokens_per_expert)
  assert (tpe == 0).any()
  _check_moe_against_oracle(got, x, params, **kw)


def test_moe_router_input_differs_from_expert_input(rng):
  """`router_input` routes; the experts still see x."""
  t, d, e, f, top_k = 7, 5, 8, 4, 2
  x, params = _moe_inputs(rng, t, d, e, f, top_k, "silu", "token_order")
  x_router, _ = helpers.routing_inputs(rng, t, d, e, top_k)
  kw = dict(top_k=top_k, activation="silu")
  y, _ = jax.jit(functools.partial(ref.moe, **kw))(
      jnp.asarray(x), MoEParams(*map(jnp.asarray, params)),
      router_input=jnp.asarray(x_router))
  r = oracle.route(x_router, params.router_kernel, top_k=top_k)
  want = oracle.expert_ffn(x, r.expert_ids, r.weights, r.kept, params.up_kernel,
                           params.down_kernel, activation="silu")
  helpers.assert_close(y, want, np.float32)


# ----------------------------------------------------------------------------
# Gradients.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_expert_ffn_grads_float64(rng, x64, activation):
  t, d, e, f, top_k = 7, 5, 3, 4, 2
  x = helpers.normal(rng, (t, d), np.float64)
  _, up, down = _params(rng, d, e, f, activation, np.float64)
  ids, weights, kept = _routing_arrays(rng, t, e, top_k)
  ids, kept = jnp.asarray(ids), jnp.asarray(kept)

  def fn(x_, w_, up_, down_):
    return ref.expert_ffn(x_, ids, w_, kept, up_, down_, activation=activation)

  eps, atol, rtol = helpers.CHECK_GRADS["float64"]
  args = tuple(jnp.asarray(a, jnp.float64) for a in (x, weights, up, down))
  assert fn(*args).dtype == jnp.float64
  check_grads(jax.jit(fn), args, order=1, modes=("rev",), eps=eps, atol=atol,
              rtol=rtol)


@pytest.mark.parametrize("activation", ["silu", "swiglu"])
def test_expert_ffn_grads_float32(rng, activation):
  t, d, e, f, top_k = 7, 5, 3, 4, 2
  x = helpers.normal(rng, (t, d))
  _, up, down = _params(rng, d, e, f, activation)
  ids, weights, kept = _routing_arrays(rng, t, e, top_k)
  ids, kept = jnp.asarray(ids), jnp.asarray(kept)

  def fn(x_, w_, up_, down_):
    return ref.expert_ffn(x_, ids, w_, kept, up_, down_, activation=activation)

  eps, atol, rtol = helpers.CHECK_GRADS["float32"]
  check_grads(jax.jit(fn), tuple(map(jnp.asarray, (x, weights, up, down))), order=1,
              modes=("rev",), eps=eps, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dispatch,capacity_factor,drop_policy", [
    ("sorted", None, "token_order"), ("sorted", 1.0, "probability"),
    ("one_hot", 0.5, "token_order")])
def test_moe_grads_float64(rng, x64, dispatch, capacity_factor, drop_policy):
  t, d, e, f, top_k = 7, 5, 4, 3, 2
  x, router = helpers.routing_inputs(rng, t, d, e, top_k, dtype=np.float64,
                                     drop_policy=drop_policy, min_logit_gap=1e-3,
                                     min_prob_gap=1e-3)
  _, up, down = _params(rng, d, e, f, "swiglu", np.float64)

  def fn(x_, router_, up_, down_):
    y, aux = ref.moe(x_, MoEParams(router_, up_, down_), top_k=top_k,
                     capacity_factor=capacity_factor, drop_policy=drop_policy,
                     dispatch=dispatch)
    return y, aux.load_balancing_loss, aux.router_z_loss

  eps, atol, rtol = helpers.CHECK_GRADS["float64"]
  check_grads(jax.jit(fn), tuple(jnp.asarray(a) for a in (x, router, up, down)),
              order=1,
              modes=("rev",), eps=eps, atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------
# The bf16 precision contract (DESIGN.md "Precision"), pinned on hand examples.
# ----------------------------------------------------------------------------


def test_bfloat16_activation_is_rounded_before_the_down_gemm():
  """`h = act(x @ up)` is computed in float32 and cast to bf16 before the down GEMM.

  Two hidden units with nearly equal activations and down weights (1, -1): the
  output is their difference, which the bf16 rounding of h changes by ~96%.
  """
  bf16 = ml_dtypes.bfloat16
  u1, u2 = 1.375, 1.3828125  # adjacent bf16 numbers
  x = np.array([[1.0]], bf16)
  up = np.array([[[u1, u2]]], bf16)  # [e=1, d=1, f=2]
  down = np.array([[[1.0], [-1.0]]], bf16)  # [e=1, f=2, d=1]
  ids, weights, kept = np.zeros((1, 1), np.int32), np.ones((1, 1), np.float32), \
      np.ones((1, 1), bool)
  got = ref.expert_ffn(*map(jnp.asarray, (x, ids, weights, kept, up, down)),
                       activation="silu")
  silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
  rounded = float(bf16(silu(u1))) - float(bf16(silu(u2)))
  exact = silu(u1) - silu(u2)
  assert abs(rounded - exact) > 0.5 * abs(exact)  # the example discriminates
  np.testing.assert_allclose(float(got[0, 0]), float(bf16(rounded)), rtol=1e-2)


def test_bfloat16_combine_is_float32():
  """Weights multiply the float32 down output and the k copies sum in float32;
  only the final sum is cast to bf16 (weights 0.5003 / 0.4997 round to 0.5)."""
  bf16 = ml_dtypes.bfloat16
  x = np.array([[1.0]], bf16)
  up = np.array([[[1.0]], [[1.0]]], bf16)  # relu(1) = 1 on both experts
  down = np.array([[[1.0]], [[-1.0]]], bf16)  # outputs +1 and -1
  ids = np.array([[0, 1]], np.int32)
  weights = np.array([[0.5003, 0.4997]], np.float32)
  kept = np.ones((1, 2), bool)
  got = ref.expert_ffn(*map(jnp.asarray, (x, ids, weights, kept, up, down)),
                       activation="relu")
  assert got.dtype == jnp.bfloat16
  want = float(np.float32(0.5003) - np.float32(0.4997))
  np.testing.assert_allclose(float(got[0, 0]), want, rtol=1e-2)
