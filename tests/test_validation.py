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
_SIZES = np.array([7, 0, 0, 0], np.int32)


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
      sizes=jnp.asarray(_SIZES),
  )


def _assert_raises_at_trace_time(exc, match, fn, *args):
  with pytest.raises(exc, match=match):
    fn(*args)
  with pytest.raises(exc, match=match):
    jax.jit(fn).lower(*args)


# Each case: (id, exception, regex, changed arrays {name: fn(a)}, keyword options).
# The base call is valid (test_valid_arguments_pass); a case changes one thing.
MOE_CASES = [
    ("x_int", TypeError,
     r"x must be float16, bfloat16, float32 or float64, got dtype int32",
     {"x": lambda a: a["x"].astype(jnp.int32)}, {}),
    ("x_scalar", ValueError, r"x must have shape \[\.\.\., d\]",
     {"x": lambda a: a["x"][0, 0]}, {}),
    ("x_no_tokens", ValueError, r"x must hold at least one token",
     {"x": lambda a: a["x"][:0]}, {}),
    ("router_wrong_d", ValueError,
     r"router_kernel must have shape \[d=5, e\], got \(6, 4\)",
     {"router": lambda a: jnp.ones((D + 1, E))}, {}),
    ("router_rank", ValueError, r"router_kernel must have rank 2 \[d, e\]",
     {"router": lambda a: a["router"][None]}, {}),
    ("router_int", TypeError, r"router_kernel must be float",
     {"router": lambda a: a["router"].astype(jnp.int8)}, {}),
    ("too_many_experts", ValueError, r"num_experts must be in \[1, 256\], got 257",
     {"router": lambda a: jnp.ones((D, 257))}, {}),
    ("up_wrong_e", ValueError,
     r"up_kernel must have shape \[e=4, d=5, 2f\], got \(3, 5, 6\)",
     {"up": lambda a: a["up"][:3]}, {}),
    ("up_wrong_d", ValueError, r"up_kernel must have shape \[e=4, d=5, 2f\]",
     {"up": lambda a: a["up"][:, :4]}, {}),
    ("up_rank", ValueError, r"up_kernel must have rank 3",
     {"up": lambda a: a["up"][0]}, {}),
    ("up_odd_gated", ValueError,
     r"up_kernel for gated activation 'swiglu' must have an even",
     {"up": lambda a: a["up"][..., :5]}, {}),
    ("down_wrong_f", ValueError, r"down_kernel must have shape \[e=4, f=3, d=5\]",
     {"down": lambda a: a["down"][:, :2]}, {}),
    ("down_wrong_d", ValueError, r"down_kernel must have shape \[e=4, f=3, d=5\]",
     {"down": lambda a: a["down"][..., :4]}, {}),
    ("ungated_with_gated_width", ValueError,
     r"down_kernel must have shape \[e=4, f=6, d=5\]", {}, {"activation": "silu"}),
    ("top_k_gt_e", ValueError,
     r"top_k must be in \[1, min\(8, num_experts=4\)\], got 5", {}, {"top_k": 5}),
    ("top_k_gt_8", ValueError,
     r"top_k must be in \[1, min\(8, num_experts=16\)\], got 9",
     {"router": lambda a: jnp.ones((D, 16)), "up": lambda a: jnp.ones((16, D, 2 * F)),
      "down": lambda a: jnp.ones((16, F, D))}, {"top_k": 9}),
    ("top_k_zero", ValueError, r"top_k must be in \[1, .*got 0", {}, {"top_k": 0}),
    ("top_k_negative", ValueError, r"top_k must be in \[1, .*got -1", {},
     {"top_k": -1}),
    ("top_k_float", TypeError, r"top_k must be a python int, got 1.5", {},
     {"top_k": 1.5}),
    ("top_k_bool", TypeError, r"top_k must be a python int, got True", {},
     {"top_k": True}),
    ("capacity_zero", ValueError,
     r"capacity_factor must be > 0 or None \(dropless\), got 0", {},
     {"capacity_factor": 0.0}),
    ("capacity_negative", ValueError, r"capacity_factor must be > 0", {},
     {"capacity_factor": -1.25}),
    ("capacity_nan", ValueError, r"capacity_factor must be > 0", {},
     {"capacity_factor": float("nan")}),
    ("capacity_string", TypeError, r"capacity_factor must be a python float or None",
     {}, {"capacity_factor": "1.25"}),
    ("activation_unknown", ValueError, r"activation must be one of .*got 'gelu_exact'",
     {}, {"activation": "gelu_exact"}),
    ("drop_policy_unknown", ValueError, r"drop_policy must be one of .*got 'random'",
     {}, {"capacity_factor": 1.0, "drop_policy": "random"}),
    ("jitter_without_rng", ValueError, r"jitter_eps > 0 needs rng", {},
     {"jitter_eps": 0.1}),
    ("jitter_too_big", ValueError, r"jitter_eps must be in \[0, 1\), got 1.5", {},
     {"jitter_eps": 1.5, "rng": jax.random.key(0)}),
    ("jitter_negative", ValueError, r"jitter_eps must be in \[0, 1\)", {},
     {"jitter_eps": -0.1}),
    ("logit_bias_shape", ValueError, r"logit_bias must have shape \[e=4\], got \(5,\)",
     {}, {"logit_bias": jnp.zeros(5)}),
    ("backend_unknown", ValueError, r"backend must be one of .*got 'cuda'", {},
     {"backend": "cuda"}),
]

ROUTE_CASES = [
    ("x_rank_3", ValueError, r"x must have rank 2 \[t, d\], got shape \(1, 7, 5\)",
     {"x": lambda a: a["x"][None]}, {}),
    ("x_rank_1", ValueError, r"x must have rank 2 \[t, d\]",
     {"x": lambda a: a["x"][0]}, {}),
    ("router_wrong_d", ValueError, r"router_kernel must have shape \[d=5, e\]",
     {"router": lambda a: a["router"][:4]}, {}),
    ("top_k_gt_e", ValueError,
     r"top_k must be in \[1, min\(8, num_experts=4\)\], got 5", {}, {"top_k": 5}),
    ("top_k_zero", ValueError, r"top_k must be in \[1, ", {}, {"top_k": 0}),
    ("capacity_zero", ValueError, r"capacity_factor must be > 0", {},
     {"capacity_factor": 0}),
    ("drop_policy_unknown", ValueError, r"drop_policy must be one of", {},
     {"drop_policy": "lifo"}),
    ("jitter_without_rng", ValueError, r"jitter_eps > 0 needs rng", {},
     {"jitter_eps": 0.01}),
    ("logit_bias_rank", ValueError, r"logit_bias must have rank 1 \[e=4\]", {},
     {"logit_bias": jnp.zeros((1, 4))}),
    ("backend_unknown", ValueError, r"backend must be one of", {},
     {"backend": "gpu"}),
]

GMM_CASES = [
    ("lhs_rank", ValueError, r"lhs must have rank 2 \[m, k\]",
     {"x": lambda a: a["x"][None]}, {}),
    ("lhs_int", TypeError, r"lhs must be float",
     {"x": lambda a: a["x"].astype(jnp.int32)}, {}),
    ("rhs_rank", ValueError, r"rhs must have rank 3 \[g, k, n\]",
     {"up": lambda a: a["up"][0]}, {}),
    ("rhs_wrong_k", ValueError,
     r"rhs must have shape \[g, k=5, n\] to match lhs \(7, 5\)",
     {"up": lambda a: a["down"]}, {}),
    ("group_sizes_float", TypeError,
     r"group_sizes must be an integer array \[g\] \(int32\)",
     {"sizes": lambda a: a["sizes"].astype(jnp.float32)}, {}),
    ("group_sizes_bool", TypeError, r"group_sizes must be an integer array",
     {"sizes": lambda a: a["sizes"] > 0}, {}),
    ("group_sizes_wrong_g", ValueError,
     r"group_sizes must have shape \[g=4\], got \(3,\)",
     {"sizes": lambda a: a["sizes"][:3]}, {}),
    ("group_sizes_rank", ValueError, r"group_sizes must have shape \[g=4\]",
     {"sizes": lambda a: a["sizes"][None]}, {}),
]

FFN_CASES = [
    ("ids_wrong_t", ValueError,
     r"expert_ids must have shape \[t=7, top_k\], got \(6, 2\)",
     {"ids": lambda a: a["ids"][:6]}, {}),
    ("ids_float", TypeError, r"expert_ids must be integer",
     {"ids": lambda a: a["ids"].astype(jnp.float32)}, {}),
    ("weights_shape", ValueError, r"weights must have shape \(7, 2\), got \(7, 1\)",
     {"weights": lambda a: a["weights"][:, :1]}, {}),
    ("kept_shape", ValueError, r"kept must have shape \(7, 2\)",
     {"kept": lambda a: a["kept"][:, :1]}, {}),
    ("x_rank", ValueError, r"x must have rank 2 \[t, d\]",
     {"x": lambda a: a["x"][None]}, {}),
    ("down_mismatch", ValueError, r"down_kernel must have shape \[e=4, f=3, d=5\]",
     {"down": lambda a: a["down"][:3]}, {}),
    ("activation_unknown", ValueError, r"activation must be one of", {},
     {"activation": "tanh"}),
]


def _moe(x, router, up, down, **kw):
  kw = {"top_k": TOP_K, "backend": "reference", **kw}
  return jmoe.moe(x, jmoe.MoEParams(router, up, down), **kw)


def _route(x, router, **kw):
  kw = {"top_k": TOP_K, "backend": "reference", **kw}
  return jmoe.route(x, router, **kw)


def _gmm(x, up, sizes, **kw):
  return jmoe.grouped_matmul(x, up, sizes, backend="reference", **kw)


def _ffn(x, ids, weights, kept, up_silu, down, **kw):
  kw = {"activation": "silu", "backend": "reference", **kw}
  return jmoe.expert_ffn(x, ids, weights, kept, up_silu, down, **kw)


_FUNCTIONS = {  # function, names of its array arguments
    "moe": (_moe, ("x", "router", "up", "down")),
    "route": (_route, ("x", "router")),
    "grouped_matmul": (_gmm, ("x", "up", "sizes")),
    "expert_ffn": (_ffn, ("x", "ids", "weights", "kept", "up_silu", "down")),
}


def _params():
  for fn_name, cases in (("moe", MOE_CASES), ("route", ROUTE_CASES),
                         ("grouped_matmul", GMM_CASES), ("expert_ffn", FFN_CASES)):
    for case in cases:
      yield pytest.param(fn_name, *case[1:], id=f"{fn_name}-{case[0]}")


@pytest.mark.parametrize("fn_name,exc,match,changes,options", _params())
def test_bad_argument_raises(rng, fn_name, exc, match, changes, options):
  fn, names = _FUNCTIONS[fn_name]
  a = _arrays(rng)
  args = [changes[n](a) if n in changes else a[n] for n in names]
  _assert_raises_at_trace_time(exc, match, lambda *z: fn(*z, **options), *args)


def test_valid_arguments_pass(rng):
  """The base arguments of the cases are valid (each case fails for its reason)."""
  a = _arrays(rng)
  for fn, names in _FUNCTIONS.values():
    jax.block_until_ready(fn(*[a[n] for n in names]))
  _moe(a["x"], a["router"], a["up"], a["down"], capacity_factor=1.0,
       drop_policy="probability", jitter_eps=0.1, rng=jax.random.key(0),
       logit_bias=jnp.zeros(E))


def test_params_mapping_missing_key(rng):
  a = _arrays(rng)
  params = {"router_kernel": a["router"], "up_kernel": a["up"]}
  with pytest.raises(ValueError, match=r"params is missing \['down_kernel'\]"):
    jmoe.moe(a["x"], params, top_k=2, backend="reference")
  with pytest.raises(ValueError, match=r"params is missing \['down_kernel'\]"):
    jax.jit(lambda x, p: jmoe.moe(x, p, top_k=2, backend="reference")).lower(
        a["x"], params)


def test_params_wrong_type(rng):
  a = _arrays(rng)
  with pytest.raises(TypeError, match=r"params must be a jmoe.MoEParams or a mapping"):
    jmoe.moe(a["x"], (a["router"], a["up"], a["down"]), top_k=2, backend="reference")


def test_grouped_matmul_python_list_group_sizes(rng):
  a = _arrays(rng)
  with pytest.raises(TypeError, match=r"group_sizes must be an integer array"):
    jmoe.grouped_matmul(a["x"], a["up"], [7, 0, 0, 0], backend="reference")


@pytest.mark.parametrize("backend", ["interpret", "triton"])
def test_float64_refused_by_kernel_backends(rng, x64, backend):
  """The Triton backends take 16/32-bit floats; float64 is for the reference."""
  if backend == "triton" and jmoe._backend.triton_unavailable_reason() is not None:
    pytest.skip("triton cannot run here")
  a = _arrays(rng)
  x = a["x"].astype(jnp.float64)
  with pytest.raises(TypeError, match=r"x is float64, which backend=.* does not"):
    jmoe.route(x, a["router"], top_k=2, backend=backend)
  # The reference accepts float64 (and keeps it).
  r = jmoe.route(x, a["router"].astype(jnp.float64), top_k=2, backend="reference")
  assert r.logits.dtype == jnp.float64
