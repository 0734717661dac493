"""Bad arguments raise ValueError/TypeError naming the argument, at trace time.

Each case is run eagerly and traced under `jax.jit(...).lower(...)` (which only
traces: an error there was raised from shapes and options, not from values).
"""

from __future__ import annotations

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmoe

T, D, E, F, TOP_K = 7, 5, 4, 3, 2


def _arrays(rng, activation="swiglu"):
  router, up, down = helpers.moe_params(rng, D, E, F, activation)
  return dict(
      x=jnp.asarray(helpers.normal(rng, (T, D))),
      router=jnp.asarray(router),
      up=jnp.asarray(up),
      down=jnp.asarray(down),
      up_silu=jnp.asarray(helpers.normal(rng, (E, D, F))),
      ids=jnp.asarray(np.stack([rng.permutation(E)[:TOP_K] for _ in range(T)]),
                      jnp.int32),
      weights=jnp.full((T, TOP_K), 0.5, jnp.float32),
      kept=jnp.ones((T, TOP_K), bool),
  )


def _assert_raises_at_trace_time(exc, match, fn, *args):
  with pytest.raises(exc, match=match):
    fn(*args)
  with pytest.raises(exc, match=match):
    jax.jit(fn).lower(*args)


def _moe(x, router, up, down, **kw):
  kw.setdefault("top_k", TOP_K)
  return jmoe.moe(x, jmoe.MoEParams(router, up, down), backend="reference", **kw)


def _route(x, router, **kw):
  kw.setdefault("top_k", TOP_K)
  return jmoe.route(x, router, backend="reference", **kw)


# (id, exception, regex, function of the array dict `a` returning (fn, args)).
MOE_CASES = [
    ("x_int", TypeError, r"x must be float16, bfloat16, float32 or float64, got dtype int32",
     lambda a: (_moe, (a["x"].astype(jnp.int32), a["router"], a["up"], a["down"]))),
    ("x_scalar", ValueError, r"x must have shape \[\.\.\., d\]",
     lambda a: (_moe, (a["x"][0, 0], a["router"], a["up"], a["down"]))),
    ("x_no_tokens", ValueError, r"x must hold at least one token",
     lambda a: (_moe, (a["x"][:0], a["router"], a["up"], a["down"]))),
    ("router_wrong_d", ValueError, r"router_kernel must have shape \[d=5, e\], got \(6, 4\)",
     lambda a: (_moe, (a["x"], jnp.ones((D + 1, E)), a["up"], a["down"]))),
    ("router_rank", ValueError, r"router_kernel must have rank 2 \[d, e\]",
     lambda a: (_moe, (a["x"], a["router"][None], a["up"], a["down"]))),
    ("router_int", TypeError, r"router_kernel must be float",
     lambda a: (_moe, (a["x"], a["router"].astype(jnp.int8), a["up"], a["down"]))),
    ("too_many_experts", ValueError, r"num_experts must be in \[1, 256\], got 257",
     lambda a: (_moe, (a["x"], jnp.ones((D, 257)), a["up"], a["down"]))),
    ("up_wrong_e", ValueError, r"up_kernel must have shape \[e=4, d=5, 2f\], got \(3, 5, 6\)",
     lambda a: (_moe, (a["x"], a["router"], a["up"][:3], a["down"]))),
    ("up_wrong_d", ValueError, r"up_kernel must have shape \[e=4, d=5, 2f\]",
     lambda a: (_moe, (a["x"], a["router"], a["up"][:, :4], a["down"]))),
    ("up_rank", ValueError, r"up_kernel must have rank 3",
     lambda a: (_moe, (a["x"], a["router"], a["up"][0], a["down"]))),
    ("up_odd_gated", ValueError, r"up_kernel for gated activation 'swiglu' must have an even",
     lambda a: (_moe, (a["x"], a["router"], a["up"][..., :5], a["down"]))),
    ("down_wrong_f", ValueError, r"down_kernel must have shape \[e=4, f=3, d=5\]",
     lambda a: (_moe, (a["x"], a["router"], a["up"], a["down"][:, :2]))),
    ("down_wrong_d", ValueError, r"down_kernel must have shape \[e=4, f=3, d=5\]",
     lambda a: (_moe, (a["x"], a["router"], a["up"], a["down"][..., :4]))),
    ("ungated_with_gated_width", ValueError, r"down_kernel must have shape \[e=4, f=6, d=5\]",
     lambda a: (lambda *z: _moe(*z, activation="silu"),
                (a["x"], a["router"], a["up"], a["down"]))),
    ("top_k_gt_e", ValueError, r"top_k must be in \[1, min\(8, num_experts=4\)\], got 5",
     lambda a: (lambda *z: _moe(*z, top_k=5), (a["x"], a["router"], a["up"], a["down"]))),
    ("top_k_gt_8", ValueError, r"top_k must be in \[1, min\(8, num_experts=16\)\], got 9",
     lambda a: (lambda *z: _moe(*z, top_k=9),
                (a["x"], jnp.ones((D, 16)), jnp.ones((16, D, 2 * F)), jnp.ones((16, F, D))))),
    ("top_k_zero", ValueError, r"top_k must be in \[1, .*got 0",
     lambda a: (lambda *z: _moe(*z, top_k=0), (a["x"], a["router"], a["up"], a["down"]))),
    ("top_k_negative", ValueError, r"top_k must be in \[1, .*got -1",
     lambda a: (lambda *z: _moe(*z, top_k=-1), (a["x"], a["router"], a["up"], a["down"]))),
    ("top_k_float", TypeError, r"top_k must be a python int, got 1.5",
     lambda a: (lambda *z: _moe(*z, top_k=1.5), (a["x"], a["router"], a["up"], a["down"]))),
    ("top_k_bool", TypeError, r"top_k must be a python int, got True",
     lambda a: (lambda *z: _moe(*z, top_k=True), (a["x"], a["router"], a["up"], a["down"]))),
    ("capacity_zero", ValueError, r"capacity_factor must be > 0 or None \(dropless\), got 0",
     lambda a: (lambda *z: _moe(*z, capacity_factor=0.0),
                (a["x"], a["router"], a["up"], a["down"]))),
    ("capacity_negative", ValueError, r"capacity_factor must be > 0",
     lambda a: (lambda *z: _moe(*z, capacity_factor=-1.25),
                (a["x"], a["router"], a["up"], a["down"]))),
    ("capacity_nan", ValueError, r"capacity_factor must be > 0",
     lambda a: (lambda *z: _moe(*z, capacity_factor=float("nan")),
                (a["x"], a["router"], a["up"], a["down"]))),
    ("capacity_string", TypeError, r"capacity_factor must be a python float or None",
     lambda a: (lambda *z: _moe(*z, capacity_factor="1.25"),
                (a["x"], a["router"], a["up"], a["down"]))),
    ("activation_unknown", ValueError, r"activation must be one of .*got 'gelu_exact'",
     lambda a: (lambda *z: _moe(*z, activation="gelu_exact"),
                (a["x"], a["router"], a["up"], a["down"]))),
    ("drop_policy_unknown", ValueError, r"drop_policy must be one of .*got 'random'",
     lambda a: (lambda *z: _moe(*z, capacity_factor=1.0, drop_policy="random"),
                (a["x"], a["router"], a["up"], a["down"]))),
    ("jitter_without_rng", ValueError, r"jitter_eps > 0 needs rng",
     lambda a: (lambda *z: _moe(*z, jitter_eps=0.1),
                (a["x"], a["router"], a["up"], a["down"]))),
    ("jitter_too_big", ValueError, r"jitter_eps must be in \[0, 1\), got 1.5",
     lambda a: (lambda *z: _moe(*z, jitter_eps=1.5, rng=jax.random.key(0)),
                (a["x"], a["router"], a["up"], a["down"]))),
    ("jitter_negative", ValueError, r"jitter_eps must be in \[0, 1\)",
     lambda a: (lambda *z: _moe(*z, jitter_eps=-0.1),
                (a["x"], a["router"], a["up"], a["down"]))),
    ("logit_bias_shape", ValueError, r"logit_bias must have shape \[e=4\], got \(5,\)",
     lambda a: (lambda *z: _moe(*z, logit_bias=jnp.zeros(5)),
                (a["x"], a["router"], a["up"], a["down"]))),
    ("backend_unknown", ValueError, r"backend must be one of .*got 'cuda'",
     lambda a: (lambda *z: jmoe.moe(z[0], jmoe.MoEParams(*z[1:]), top_k=2, backend="cuda"),
                (a["x"], a["router"], a["up"], a["down"]))),
    ("params_missing_key", ValueError, r"params is missing \['down_kernel'\]",
     lambda a: (lambda x, r, u: jmoe.moe(x, {"router_kernel": r, "up_kernel": u}, top_k=2,
                                         backend="reference"),
                (a["x"], a["router"], a["up"]))),
    ("params_tuple", TypeError, r"params must be a jmoe.MoEParams or a mapping",
     lambda a: (lambda *z: jmoe.moe(z[0], tuple(z[1:]), top_k=2, backend="reference"),
                (a["x"], a["router"], a["up"], a["down"]))),
]

ROUTE_CASES = [
    ("x_rank_3", ValueError, r"x must have rank 2 \[t, d\], got shape \(1, 7, 5\)",
     lambda a: (_route, (a["x"][None], a["router"]))),
    ("x_rank_1", ValueError, r"x must have rank 2 \[t, d\]",
     lambda a: (_route, (a["x"][0], a["router"]))),
    ("router_wrong_d", ValueError, r"router_kernel must have shape \[d=5, e\]",
     lambda a: (_route, (a["x"], a["router"][:4]))),
    ("top_k_gt_e", ValueError, r"top_k must be in \[1, min\(8, num_experts=4\)\], got 5",
     lambda a: (lambda *z: _route(*z, top_k=5), (a["x"], a["router"]))),
    ("top_k_zero", ValueError, r"top_k must be in \[1, ",
     lambda a: (lambda *z: _route(*z, top_k=0), (a["x"], a["router"]))),
    ("capacity_zero", ValueError, r"capacity_factor must be > 0",
     lambda a: (lambda *z: _route(*z, capacity_factor=0), (a["x"], a["router"]))),
    ("drop_policy_unknown", ValueError, r"drop_policy must be one of",
     lambda a: (lambda *z: _route(*z, drop_policy="lifo"), (a["x"], a["router"]))),
    ("jitter_without_rng", ValueError, r"jitter_eps > 0 needs rng",
     lambda a: (lambda *z: _route(*z, jitter_eps=0.01), (a["x"], a["router"]))),
    ("logit_bias_rank", ValueError, r"logit_bias must have rank 1 \[e=4\]",
     lambda a: (lambda *z: _route(*z, logit_bias=jnp.zeros((1, 4))), (a["x"], a["router"]))),
    ("backend_unknown", ValueError, r"backend must be one of",
     lambda a: (lambda x, r: jmoe.route(x, r, top_k=2, backend="gpu"), (a["x"], a["router"]))),
]

GMM_CASES = [
    ("lhs_rank", ValueError, r"lhs must have rank 2 \[m, k\]",
     lambda a: (None, (a["x"][None], a["up"], jnp.array([7, 0, 0, 0], jnp.int32)))),
    ("rhs_rank", ValueError, r"rhs must have rank 3 \[g, k, n\]",
     lambda a: (None, (a["x"], a["up"][0], jnp.array([7, 0, 0, 0], jnp.int32)))),
    ("rhs_wrong_k", ValueError, r"rhs must have shape \[g, k=5, n\] to match lhs \(7, 5\)",
     lambda a: (None, (a["x"], a["down"], jnp.array([7, 0, 0, 0], jnp.int32)))),
    ("group_sizes_float", TypeError, r"group_sizes must be an integer array \[g\] \(int32\)",
     lambda a: (None, (a["x"], a["up"], jnp.array([7.0, 0, 0, 0])))),
    ("group_sizes_bool", TypeError, r"group_sizes must be an integer array",
     lambda a: (None, (a["x"], a["up"], jnp.array([True, False, False, False])))),
    ("group_sizes_wrong_g", ValueError, r"group_sizes must have shape \[g=4\], got \(3,\)",
     lambda a: (None, (a["x"], a["up"], jnp.array([7, 0, 0], jnp.int32)))),
    ("group_sizes_rank", ValueError, r"group_sizes must have shape \[g=4\]",
     lambda a: (None, (a["x"], a["up"], jnp.array([[7, 0, 0, 0]], jnp.int32)))),
    ("lhs_int", TypeError, r"lhs must be float",
     lambda a: (None, (a["x"].astype(jnp.int32), a["up"], jnp.array([7, 0, 0, 0], jnp.int32)))),
]


def _ffn(x, ids, weights, kept, up, down, activation="silu"):
  return jmoe.expert_ffn(x, ids, weights, kept, up, down, activation=activation,
                         backend="reference")


FFN_CASES = [
    ("ids_wrong_t", ValueError, r"expert_ids must have shape \[t=7, top_k\], got \(6, 2\)",
     lambda a: (_ffn, (a["x"], a["ids"][:6], a["weights"], a["kept"], a["up_silu"],
                       a["down"]))),
    ("ids_float", TypeError, r"expert_ids must be integer",
     lambda a: (_ffn, (a["x"], a["ids"].astype(jnp.float32), a["weights"], a["kept"],
                       a["up_silu"], a["down"]))),
    ("weights_shape", ValueError, r"weights must have shape \(7, 2\), got \(7, 1\)",
     lambda a: (_ffn, (a["x"], a["ids"], a["weights"][:, :1], a["kept"], a["up_silu"],
                       a["down"]))),
    ("kept_shape", ValueError, r"kept must have shape \(7, 2\)",
     lambda a: (_ffn, (a["x"], a["ids"], a["weights"], a["kept"][:, :1], a["up_silu"],
                       a["down"]))),
    ("x_rank", ValueError, r"x must have rank 2 \[t, d\]",
     lambda a: (_ffn, (a["x"][None], a["ids"], a["weights"], a["kept"], a["up_silu"],
                       a["down"]))),
    ("down_mismatch", ValueError, r"down_kernel must have shape \[e=4, f=3, d=5\]",
     lambda a: (_ffn, (a["x"], a["ids"], a["weights"], a["kept"], a["up_silu"],
                       a["down"][:3]))),
    ("activation_unknown", ValueError, r"activation must be one of",
     lambda a: (lambda *z: _ffn(*z, activation="tanh"),
                (a["x"], a["ids"], a["weights"], a["kept"], a["up_silu"], a["down"]))),
]


def _ids(cases):
  return [c[0] for c in cases]


@pytest.mark.parametrize("name,exc,match,build", MOE_CASES, ids=_ids(MOE_CASES))
def test_moe_validation(rng, name, exc, match, build):
  del name
  fn, args = build(_arrays(rng))
  _assert_raises_at_trace_time(exc, match, fn, *args)


@pytest.mark.parametrize("name,exc,match,build", ROUTE_CASES, ids=_ids(ROUTE_CASES))
def test_route_validation(rng, name, exc, match, build):
  del name
  fn, args = build(_arrays(rng))
  _assert_raises_at_trace_time(exc, match, fn, *args)


@pytest.mark.parametrize("name,exc,match,build", GMM_CASES, ids=_ids(GMM_CASES))
def test_grouped_matmul_validation(rng, name, exc, match, build):
  del name
  _, args = build(_arrays(rng))

  def fn(*z):
    return jmoe.grouped_matmul(*z, backend="reference")

  _assert_raises_at_trace_time(exc, match, fn, *args)


def test_grouped_matmul_python_list_group_sizes(rng):
  a = _arrays(rng)
  with pytest.raises(TypeError, match=r"group_sizes must be an integer array"):
    jmoe.grouped_matmul(a["x"], a["up"], [7, 0, 0, 0], backend="reference")


@pytest.mark.parametrize("name,exc,match,build", FFN_CASES, ids=_ids(FFN_CASES))
def test_expert_ffn_validation(rng, name, exc, match, build):
  del name
  fn, args = build(_arrays(rng))
  _assert_raises_at_trace_time(exc, match, fn, *args)


def test_valid_arguments_pass(rng):
  """The base arrays of the cases above are valid (so each case fails for its reason)."""
  a = _arrays(rng)
  _moe(a["x"], a["router"], a["up"], a["down"])
  _moe(a["x"], a["router"], a["up"], a["down"], capacity_factor=1.0,
       drop_policy="probability", jitter_eps=0.1, rng=jax.random.key(0),
       logit_bias=jnp.zeros(E))
  jmoe.moe(a["x"], {"router_kernel": a["router"], "up_kernel": a["up"],
                    "down_kernel": a["down"]}, top_k=2, backend="reference")
  _route(a["x"], a["router"])
  jmoe.grouped_matmul(a["x"], a["up"], jnp.array([7, 0, 0, 0], jnp.int32),
                      backend="reference")
  _ffn(a["x"], a["ids"], a["weights"], a["kept"], a["up_silu"], a["down"])


@pytest.mark.parametrize("backend", ["interpret", "triton"])
def test_float64_refused_by_kernel_backends(rng, x64, backend):
  """The Triton backends take 16/32-bit floats; float64 is for the reference."""
  if backend == "triton" and jmoe._backend.triton_unavailable_reason() is not None:
    pytest.skip("triton cannot run here")
  a = _arrays(rng)
  x = a["x"].astype(jnp.float64)
  with pytest.raises(TypeError, match=r"x is float64, which backend=.* does not support"):
    jmoe.route(x, a["router"], top_k=2, backend=backend)
  # The reference accepts float64 (and keeps it).
  r = jmoe.route(x, a["router"].astype(jnp.float64), top_k=2, backend="reference")
  assert r.logits.dtype == jnp.float64
