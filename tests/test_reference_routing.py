"""`jmoe.reference.route` against the numpy oracle (tests/oracle.py) and DESIGN.md."""

from __future__ import annotations

import functools
import math

import helpers
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import oracle
import pytest
from jax.test_util import check_grads

from jmoe import reference as ref

_STATIC = ("top_k", "capacity_factor", "normalize_top_k", "drop_policy")
ref_route = jax.jit(ref.route, static_argnames=_STATIC)

# (t, d, e, top_k, capacity_factor): odd sizes, tiny and large expert counts,
# dropless and capacities below / at / above the mean load.
CASES = [
    (1, 5, 1, 1, None),
    (1, 16, 8, 2, None),
    (1, 5, 3, 2, 1.0),
    (7, 5, 3, 1, None),
    (7, 16, 8, 2, 1.25),
    (7, 5, 64, 8, None),
    (7, 16, 256, 8, 1.0),
    (7, 16, 3, 2, 0.5),
    (33, 5, 8, 1, 1.0),
    (33, 16, 64, 2, 1.25),
    (33, 16, 3, 2, 0.5),
    (33, 5, 256, 1, 2.0),
    (100, 16, 8, 2, 1.0),
    (100, 5, 64, 8, 1.25),
    (100, 16, 256, 8, None),
    (100, 16, 1, 1, 1.0),
    (100, 5, 3, 1, 0.25),
    (100, 16, 8, 8, 0.75),
]


def _case_id(case):
  t, d, e, k, cf = case
  return f"t{t}-d{d}-e{e}-k{k}-cf{cf}"


def _cases_with_policies():
  for case in CASES:
    policies = ("token_order",) if case[4] is None else ("token_order", "probability")
    for policy in policies:
      yield pytest.param(*case, policy, id=f"{_case_id(case)}-{policy}")


def _oracle_route(x, w, **kw):
  return oracle.route(x, w, **kw)


def _eye_inputs(logits):
  """`(x, router_kernel)` with `x @ router_kernel == logits` exactly (x = identity)."""
  logits = np.asarray(logits, np.float32)
  t = logits.shape[0]
  return np.eye(t, dtype=np.float32), logits


@pytest.mark.parametrize("t,d,e,top_k,capacity_factor,drop_policy",
                         _cases_with_policies())
def test_route_matches_oracle(rng, t, d, e, top_k, capacity_factor, drop_policy):
  normalize = (t + e) % 2 == 0  # both settings across the grid
  x, w = helpers.routing_inputs(rng, t, d, e, top_k, drop_policy=drop_policy)
  kw = dict(top_k=top_k, capacity_factor=capacity_factor, normalize_top_k=normalize,
            drop_policy=drop_policy)
  got = ref_route(jnp.asarray(x), jnp.asarray(w), **kw)
  want = _oracle_route(x, w, **kw)
  helpers.check_routing_dtypes(got, t, e, top_k)
  helpers.assert_routing_close(got, want, np.float32)


@pytest.mark.parametrize("normalize_top_k", [True, False])
def test_weights_normalisation(rng, normalize_top_k):
  t, d, e, top_k = 33, 16, 8, 3
  x, w = helpers.routing_inputs(rng, t, d, e, top_k)
  got = ref_route(jnp.asarray(x), jnp.asarray(w), top_k=top_k,
                  normalize_top_k=normalize_top_k)
  sums = np.asarray(got.weights).sum(axis=1)
  top = np.take_along_axis(np.asarray(got.probs), np.asarray(got.expert_ids), axis=1)
  if normalize_top_k:
    helpers.assert_close(sums, np.ones(t), np.float32)
  else:
    helpers.assert_close(got.weights, top, np.float32)
    assert np.all(sums < 1.0)
  # Best first.
  assert np.all(np.diff(top, axis=1) <= 0)


def test_bfloat16_inputs_route_in_float32(rng):
  """bf16 x and router: logits accumulate in float32 (products of bf16 are exact)."""
  t, d, e, top_k = 33, 16, 8, 2
  x, w = helpers.routing_inputs(rng, t, d, e, top_k, dtype=ml_dtypes.bfloat16)
  got = ref_route(jnp.asarray(x), jnp.asarray(w), top_k=top_k, capacity_factor=1.0)
  helpers.check_routing_dtypes(got, t, e, top_k)
  want = _oracle_route(x, w, top_k=top_k, capacity_factor=1.0)
  helpers.assert_routing_close(got, want, np.float32)


def test_top_k_ties_pick_lower_expert_index():
  # Experts 1, 4 and 6 tie on top for token 0; 0 and 2 tie for token 1.
  logits = np.array([[0.0, 2.0, -1.0, 0.5, 2.0, 0.1, 2.0, -3.0],
                     [1.5, 0.2, 1.5, 1.5, -2.0, 0.0, 0.3, 0.1]], np.float32)
  x, w = _eye_inputs(logits)
  got = ref_route(jnp.asarray(x), jnp.asarray(w), top_k=2)
  helpers.assert_equal(got.expert_ids, [[1, 4], [0, 2]])
  want = _oracle_route(x, w, top_k=2)
  helpers.assert_routing_close(got, want, np.float32)
  helpers.assert_close(got.weights, np.full((2, 2), 0.5), np.float32)


def test_duplicate_router_columns_tie_to_lower_index(rng):
  """Equal logits produced by the GEMM itself (two identical router columns)."""
  t, d, e, top_k = 7, 16, 8, 2
  x = helpers.normal(rng, (t, d))
  x[:, 0] = np.abs(x[:, 0]) + 1
  w = helpers.normal(rng, (d, e), scale=0.1)
  w[:, 5] = w[:, 2]
  w[0, 2] = w[0, 5] = 5.0
  got = ref_route(jnp.asarray(x), jnp.asarray(w), top_k=top_k)
  helpers.assert_equal(got.expert_ids, np.tile([2, 5], (t, 1)))


# Four tokens, one expert (0) preferred by all with rising probability; capacity
# ceil(0.5 * 4 * 1 / 2) = 1.
_OVERFLOW_LOGITS = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]],
                            np.float32)


@pytest.mark.parametrize("drop_policy,kept_token", [("token_order", 0),
                                                    ("probability", 3)])
def test_capacity_overflow_hand_example(drop_policy, kept_token):
  x, w = _eye_inputs(_OVERFLOW_LOGITS)
  got = ref_route(jnp.asarray(x), jnp.asarray(w), top_k=1, capacity_factor=0.5,
                  drop_policy=drop_policy)
  want_kept = np.zeros((4, 1), bool)
  want_kept[kept_token] = True
  helpers.assert_equal(got.kept, want_kept)
  helpers.assert_equal(got.tokens_per_expert, [1, 0])
  helpers.assert_equal(got.dropped_count, 3)
  weights = np.asarray(got.weights)
  assert weights[kept_token, 0] == 1.0  # normalised top-1
  assert np.all(np.delete(weights, kept_token, axis=0) == 0.0)
  helpers.assert_routing_close(got, _oracle_route(x, w, top_k=1, capacity_factor=0.5,
                                                  drop_policy=drop_policy))


def test_probability_policy_ties_by_flattened_index():
  """Identical tokens have identical probabilities: earlier (token, choice) wins."""
  row = np.array([3.0, 2.0, -1.0], np.float32)
  logits = np.stack([row] * 5)
  x, w = _eye_inputs(logits)
  # top_k=2 -> every token picks (0, 1); capacity ceil(1.0 * 5 * 2 / 3) = 4.
  got = ref_route(jnp.asarray(x), jnp.asarray(w), top_k=2, capacity_factor=1.0,
                  drop_policy="probability")
  want_kept = np.ones((5, 2), bool)
  want_kept[4] = False
  helpers.assert_equal(got.kept, want_kept)
  helpers.assert_equal(got.tokens_per_expert, [4, 4, 0])
  helpers.assert_routing_close(got, _oracle_route(x, w, top_k=2, capacity_factor=1.0,
                                                  drop_policy="probability"))


def test_probability_policy_orders_across_choices():
  """A second choice with a higher probability outranks an earlier first choice."""
  logits = np.array([[0.0, 0.1, -5.0],   # expert 1 first (p~0.52), expert 0 second
                     [4.0, -4.0, -4.0],  # expert 0 first, p ~ 0.999
                     [3.0, 2.9, -5.0]],  # expert 0 first, expert 1 second
                    np.float32)
  x, w = _eye_inputs(logits)
  # capacity ceil(0.5 * 3 * 2 / 3) = 1 per expert.
  kw = dict(top_k=2, capacity_factor=0.5)
  by_token = ref_route(jnp.asarray(x), jnp.asarray(w), drop_policy="token_order", **kw)
  by_prob = ref_route(jnp.asarray(x), jnp.asarray(w), drop_policy="probability", **kw)
  # token_order: copy (0,0)->e1 and (0,1)->e0 come first.
  helpers.assert_equal(by_token.kept, [[True, True], [False, False], [False, False]])
  # probability: e0 goes to token 1 (0.999), e1 to token 0 (0.52 > 0.47 of token 2).
  helpers.assert_equal(by_prob.kept, [[True, False], [True, False], [False, False]])
  for policy, got in (("token_order", by_token), ("probability", by_prob)):
    helpers.assert_routing_close(got, _oracle_route(x, w, drop_policy=policy, **kw),
                                 err_msg=policy)


@pytest.mark.parametrize("top_k,capacity_factor", [(1, 1.0), (2, 1.25), (1, None)])
def test_all_tokens_on_one_expert(rng, top_k, capacity_factor):
  t, d, e, hot = 33, 16, 8, 5
  x, w = helpers.routing_inputs(rng, t, d, e, top_k, bias_expert=hot)
  got = ref_route(jnp.asarray(x), jnp.asarray(w), top_k=top_k,
                  capacity_factor=capacity_factor)
  assert np.all(np.asarray(got.expert_ids)[:, 0] == hot)
  cap = oracle.capacity(capacity_factor, t, top_k, e)
  tpe = np.asarray(got.tokens_per_expert)
  assert tpe[hot] == (t if cap is None else min(t, cap))
  assert int(got.dropped_count) == t * top_k - int(tpe.sum())
  helpers.assert_routing_close(got, _oracle_route(x, w, top_k=top_k,
                                                  capacity_factor=capacity_factor))


def test_empty_experts(rng):
  t, d, e, top_k = 7, 16, 64, 1
  x, w = helpers.routing_inputs(rng, t, d, e, top_k)
  got = ref_route(jnp.asarray(x), jnp.asarray(w), top_k=top_k, capacity_factor=1.0)
  tpe = np.asarray(got.tokens_per_expert)
  assert (tpe == 0).sum() >= e - t
  helpers.assert_routing_close(got, _oracle_route(x, w, top_k=top_k,
                                                  capacity_factor=1.0))


def test_load_balancing_loss_is_one_when_balanced():
  e = 8
  logits = np.full((e, e), -1.0, np.float32) + 3.0 * np.eye(e, dtype=np.float32)
  x, w = _eye_inputs(logits)
  got = ref_route(jnp.asarray(x), jnp.asarray(w), top_k=1)
  np.testing.assert_allclose(float(got.load_balancing_loss), 1.0, rtol=1e-6)
  # Everything on one expert, with that expert's probability ~1, gives ~e.
  one = np.zeros((e, e), np.float32)
  one[:, 0] = 20.0
  got = ref_route(*map(jnp.asarray, _eye_inputs(one)), top_k=1)
  np.testing.assert_allclose(float(got.load_balancing_loss), e, rtol=1e-6)


def test_load_balancing_uses_copies_before_dropping():
  x, w = _eye_inputs(_OVERFLOW_LOGITS)
  dropless = ref_route(jnp.asarray(x), jnp.asarray(w), top_k=1)
  capped = ref_route(jnp.asarray(x), jnp.asarray(w), top_k=1, capacity_factor=0.5)
  assert int(capped.dropped_count) == 3
  np.testing.assert_allclose(float(capped.load_balancing_loss),
                             float(dropless.load_balancing_loss), rtol=1e-7)


def test_load_balancing_gradient_flows_through_mean_probs_only(rng):
  t, e, top_k = 7, 8, 2
  probs = jax.nn.softmax(jnp.asarray(helpers.normal(rng, (t, e))), axis=-1)
  ids = jnp.asarray(np.stack([rng.permutation(e)[:top_k] for _ in range(t)]),
                    jnp.int32)
  grad = jax.grad(ref.load_balancing_loss)(probs, ids)
  counts = np.bincount(np.asarray(ids).ravel(), minlength=e)
  want = np.tile(e * counts / (t * top_k) / t, (t, 1))  # d/dprobs[i, e] = e f_e / t
  helpers.assert_close(grad, want, np.float32)


def test_router_z_loss_gradient(rng):
  t, e = 7, 8
  logits = helpers.normal(rng, (t, e), np.float32, 3.0)
  grad = jax.grad(ref.router_z_loss)(jnp.asarray(logits))
  lse = np.array([oracle.logsumexp_row(r) for r in logits.astype(np.float64)])
  p = np.stack([oracle.softmax_row(r) for r in logits.astype(np.float64)])
  helpers.assert_close(grad, 2 * lse[:, None] * p / t, np.float32)


def test_capacity_formula():
  assert ref.compute_capacity(100, 2, 8, None) is None
  for t, k, e, cf in [(100, 2, 8, 1.25), (7, 1, 3, 0.5), (1, 1, 256, 1.0),
                      (33, 8, 64, 2.0), (5, 2, 3, 1.0)]:
    c = ref.compute_capacity(t, k, e, cf)
    assert isinstance(c, int)
    assert c == math.ceil(cf * t * k / e) == oracle.capacity(cf, t, k, e)


# ----------------------------------------------------------------------------
# Gradients.
# ----------------------------------------------------------------------------


def _route_outputs(x, w, **kw):
  r = ref.route(x, w, **kw)
  return r.weights, r.probs, r.load_balancing_loss, r.router_z_loss


@pytest.mark.parametrize("capacity_factor,drop_policy", [(None, "token_order"),
                                                         (1.0, "token_order"),
                                                         (0.5, "probability")])
def test_route_grads_float64(rng, x64, capacity_factor, drop_policy):
  t, d, e, top_k = 7, 5, 8, 2
  x, w = helpers.routing_inputs(rng, t, d, e, top_k, dtype=np.float64,
                                drop_policy=drop_policy, min_logit_gap=1e-3)
  fn = functools.partial(_route_outputs, top_k=top_k, capacity_factor=capacity_factor,
                         drop_policy=drop_policy)
  eps, atol, rtol = helpers.CHECK_GRADS["float64"]
  check_grads(jax.jit(fn), (jnp.asarray(x), jnp.asarray(w)), order=1, modes=("rev",),
              eps=eps, atol=atol, rtol=rtol)


def test_route_grads_float32(rng):
  t, d, e, top_k = 7, 5, 8, 2
  x, w = helpers.routing_inputs(rng, t, d, e, top_k, min_logit_gap=0.1)
  fn = functools.partial(_route_outputs, top_k=top_k, capacity_factor=1.0)
  eps, atol, rtol = helpers.CHECK_GRADS["float32"]
  check_grads(jax.jit(fn), (jnp.asarray(x), jnp.asarray(w)), order=1, modes=("rev",),
              eps=eps, atol=atol, rtol=rtol)


def test_dropped_weights_have_zero_gradient():
  x, w = _eye_inputs(_OVERFLOW_LOGITS)

  def total_weight(w_):
    return ref.route(jnp.asarray(x), w_, top_k=1, capacity_factor=0.5,
                     normalize_top_k=False).weights.sum()

  grad = np.asarray(jax.jit(jax.grad(total_weight))(jnp.asarray(w)))
  assert np.all(grad[1:] == 0.0)  # rows of tokens 1..3 (x is the identity)
  assert np.any(grad[0] != 0.0)
