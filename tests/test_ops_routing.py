"""The fused Triton router (`jmoe.ops.routing.route`) against `jmoe.reference.route`.

`RouteTestBase` holds every check; `TestRouteInterpret` runs it under Triton's
interpreter on the CPU (small odd shapes, CI) and `TestRouteTriton` on a CUDA
GPU (skipped elsewhere), adding bf16, t=8192 / d=4096 / e=256 / k=8 and a
bit-identical repeat-run check.

Inputs come from `helpers.routing_inputs`: top-k choices (and, for
drop_policy="probability", the order of copies on one expert) are well
separated, so discrete fields must match the reference exactly.
"""

from __future__ import annotations

import functools
import itertools
import math

import helpers
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import sm90

from jmoe import reference
from jmoe.ops import routing as ops_routing

_STATIC = ("top_k", "capacity_factor", "normalize_top_k", "drop_policy")
_DISCRETE = ("expert_ids", "kept", "tokens_per_expert", "dropped_count")
_FLOAT = ("logits", "probs", "weights", "load_balancing_loss", "router_z_loss")

ref_route = jax.jit(reference.route, static_argnames=_STATIC)

# Triton's interpreter turns scalar kernel arguments into 1-element arrays.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning"
)


def _forward_cases():
  """(t, d, e, top_k, capacity_factor, drop_policy, normalize): every (e, k)
  with k <= e, twice with different t; the other options cycled."""
  options = itertools.cycle(
      [(5, None, "token_order", True), (48, 0.5, "token_order", False),
       (48, 1.25, "probability", True), (5, 0.5, "probability", False),
       (48, 1.25, "token_order", True), (5, None, "probability", False),
       (48, 0.5, "probability", True)]
  )
  tokens = itertools.cycle((1, 7, 33))
  for e in (1, 3, 8, 64, 256):
    for k in (1, 2, 8):
      if k > e:
        continue
      for _ in range(2):
        t = next(tokens)
        d, cf, policy, norm = next(options)
        yield pytest.param(
            t, d, e, k, cf, policy, norm,
            id=f"t{t}-d{d}-e{e}-k{k}-cf{cf}-{policy}-norm{int(norm)}",
        )


# Gradient cases: each t, d, e, k, capacity, policy and normalize value.
GRAD_CASES = [
    (1, 5, 1, 1, None, "token_order", True),
    (7, 5, 3, 2, 0.5, "token_order", False),
    (33, 48, 8, 2, 1.25, "probability", True),
    (33, 5, 64, 8, 0.5, "token_order", True),
    (7, 48, 256, 8, None, "probability", False),
    (33, 48, 256, 1, 1.25, "token_order", False),
    (33, 48, 3, 1, 0.5, "probability", True),
]


def _grad_id(case):
  t, d, e, k, cf, policy, norm = case
  return f"t{t}-d{d}-e{e}-k{k}-cf{cf}-{policy}-norm{int(norm)}"


class RouteTestBase:
  """Shared checks; subclasses set BACKEND (and may narrow the case lists)."""

  BACKEND = "interpret"
  CONFIG = None  # ops_routing.RouterConfig; None: the backend's default
  JIT = True

  def route(self, x, w, **kw):
    fn = functools.partial(ops_routing.route, backend=self.BACKEND,
                           config=self.CONFIG, **kw)
    return jax.jit(fn)(x, w) if self.JIT else fn(x, w)

  def tol_dtype(self, dtype):
    return dtype

  def compare_routing(self, got, want, t, e, k):
    helpers.check_routing_dtypes(got, t, e, k)
    for f in _DISCRETE:
      helpers.assert_equal(getattr(got, f), getattr(want, f), err_msg=f)
    for f in _FLOAT:
      helpers.assert_close(getattr(got, f), getattr(want, f),
                           self.tol_dtype(np.float32), err_msg=f)
    assert not np.any(np.asarray(got.weights)[~np.asarray(got.kept)])

  def check_forward(self, rng, t, d, e, k, cf, policy, norm, dtype=np.float32,
                    x=None, w=None):
    if x is None:
      x, w = helpers.routing_inputs(rng, t, d, e, k, dtype=dtype, drop_policy=policy)
    kw = dict(top_k=k, capacity_factor=cf, normalize_top_k=norm, drop_policy=policy)
    got = self.route(jnp.asarray(x), jnp.asarray(w), **kw)
    want = ref_route(jnp.asarray(x), jnp.asarray(w), **kw)
    self.compare_routing(got, want, t, e, k)
    return got

  def check_grads(self, rng, t, d, e, k, cf, policy, norm, dtype=np.float32,
                  direct=False, x=None, w=None):
    """Forward fields, and the gradient w.r.t. x and router_kernel of a scalar
    built from weights + both losses (+ logits and probs if `direct`), against
    the reference."""
    if x is None:
      x, w = helpers.routing_inputs(rng, t, d, e, k, dtype=dtype, drop_policy=policy)
    x, w = jnp.asarray(x), jnp.asarray(w)
    c_w = jnp.asarray(helpers.normal(rng, (t, k)))
    c_l = jnp.asarray(helpers.normal(rng, (t, e)))
    c_p = jnp.asarray(helpers.normal(rng, (t, e)))
    kw = dict(top_k=k, capacity_factor=cf, normalize_top_k=norm, drop_policy=policy)

    def scalar(route_fn):
      def f(x, w):
        r = route_fn(x, w, **kw)
        s = jnp.sum(r.weights * c_w) + 0.7 * r.load_balancing_loss
        s = s + 0.3 * r.router_z_loss
        if direct:
          s = s + jnp.sum(r.logits * c_l) * 0.1 + jnp.sum(r.probs * c_p)
        return s, r
      return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

    ours = functools.partial(ops_routing.route, backend=self.BACKEND,
                             config=self.CONFIG)
    (val, got), (gx, gw) = scalar(ours)(x, w)
    (ref_val, want), (rgx, rgw) = scalar(reference.route)(x, w)
    self.compare_routing(got, want, t, e, k)
    tol = self.tol_dtype(dtype)
    helpers.assert_close(val, ref_val, self.tol_dtype(np.float32), err_msg="value")
    assert gx.dtype == x.dtype and gw.dtype == w.dtype
    helpers.assert_close(gx, rgx, tol, kind="grad", err_msg="d x")
    helpers.assert_close(gw, rgw, tol, kind="grad", err_msg="d router_kernel")

  # --- tests -------------------------------------------------------------

  @pytest.mark.parametrize("t,d,e,k,cf,policy,norm", list(_forward_cases()))
  def test_forward(self, rng, t, d, e, k, cf, policy, norm):
    self.check_forward(rng, t, d, e, k, cf, policy, norm)

  @pytest.mark.parametrize("case", GRAD_CASES, ids=_grad_id)
  def test_grads(self, rng, case):
    self.check_grads(rng, *case)

  def test_grads_direct_cotangents(self, rng):
    """Cotangents on logits and probs too (not only weights and losses)."""
    self.check_grads(rng, 33, 48, 8, 2, 0.5, "token_order", True, direct=True)

  @pytest.mark.parametrize("policy", ["token_order", "probability"])
  def test_bf16(self, rng, policy):
    self.check_grads(rng, 33, 48, 64, 8, 0.5, policy, True, dtype=ml_dtypes.bfloat16)

  @pytest.mark.parametrize("policy", ["token_order", "probability"])
  def test_all_tokens_on_one_expert(self, rng, policy):
    """Every token's first choice is expert 2; capacity drops most copies."""
    t, d, e, k = 33, 48, 8, 2
    x, w = helpers.routing_inputs(rng, t, d, e, k)
    x, w = helpers.bias_to_expert(x, w, expert=2)
    got = self.check_forward(rng, t, d, e, k, 1.0, policy, True, x=x, w=w)
    assert (np.asarray(got.expert_ids)[:, 0] == 2).all()
    cap = math.ceil(1.0 * t * k / e)
    assert int(got.tokens_per_expert[2]) == cap
    assert int(got.dropped_count) >= t - cap

  def test_eager(self, rng):
    self.JIT = False
    try:
      self.check_forward(rng, 7, 5, 8, 2, 0.5, "token_order", True)
    finally:
      del self.JIT

  def test_vmap(self, rng):
    kw = dict(top_k=2, capacity_factor=0.5)
    xs, ws = zip(*(helpers.routing_inputs(rng, 7, 5, 8, 2) for _ in range(2)))
    xs, w = jnp.asarray(np.stack(xs)), jnp.asarray(ws[0])
    got = jax.jit(jax.vmap(lambda x: ops_routing.route(
        x, w, backend=self.BACKEND, config=self.CONFIG, **kw)))(xs)
    for b in range(2):
      want = ref_route(xs[b], w, **kw)
      helpers.assert_equal(got.expert_ids[b], want.expert_ids)
      helpers.assert_equal(got.kept[b], want.kept)
      helpers.assert_close(got.weights[b], want.weights, self.tol_dtype(np.float32))

  def test_bad_inputs_raise(self):
    x = jnp.ones((4, 6), jnp.float32)
    w = jnp.ones((6, 8), jnp.float32)
    with pytest.raises(ValueError, match=r"router_kernel must have shape \[d=6, e\]"):
      ops_routing.route(x, jnp.ones((5, 8)), top_k=2, backend=self.BACKEND)
    with pytest.raises(ValueError, match="x must have rank 2"):
      ops_routing.route(x[0], w, top_k=2, backend=self.BACKEND)
    with pytest.raises(ValueError, match="top_k must be in"):
      ops_routing.route(x, w, top_k=9, backend=self.BACKEND)
    with pytest.raises(ValueError, match="num_experts must be in"):
      ops_routing.route(x, jnp.ones((6, 257)), top_k=2, backend=self.BACKEND)
    with pytest.raises(ValueError, match="drop_policy must be one of"):
      ops_routing.route(x, w, top_k=2, drop_policy="random", backend=self.BACKEND)
    with pytest.raises(ValueError, match="backend must be one of"):
      ops_routing.route(x, w, top_k=2, backend="reference")
    with pytest.raises(TypeError, match="x is float64"):
      ops_routing.route(np.ones((4, 6)), w, top_k=2, backend=self.BACKEND)


class TestRouteInterpret(RouteTestBase):
  BACKEND = "interpret"


_SM90_SMEM = 232448  # bytes of shared memory per block on the H100


@pytest.mark.parametrize("kernel_name", ["fwd", "dx", "dw"])
def test_sm90_build(kernel_name):
  """Builds the kernel for the H100 on the host with the argument hints that
  jax-triton gives (16-byte aligned pointers, none for scalars), bf16, d=4096,
  e=256, in every autotune config the pruning keeps: tile loads must be
  16-byte `cp.async` copies feeding `wgmma` (with plain `d` / `e` strides they
  were 2-byte loads without pipelining), and shared memory must fit."""
  sm90.require()
  # pylint: disable=import-outside-toplevel,protected-access
  import re

  import triton
  from triton.backends.compiler import GPUTarget
  from triton.compiler import ASTSource

  from jmoe.kernels import routing as kernels

  d, e = 4096, 256
  bf16 = jax.ShapeDtypeStruct((1,), jnp.bfloat16)
  align = dict(D_ALIGN=kernels.stride_align(d), E_ALIGN=kernels.stride_align(e))
  if kernel_name == "fwd":
    kernel = kernels._router_fwd_pos_kernel
    sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "t": "i32", "d": "i32", "e": "i32",
           "logits_ptr": "*fp32", "probs_ptr": "*fp32", "ids_ptr": "*i32",
           "weights_ptr": "*fp32", "lse_ptr": "*fp32", "psum_ptr": "*fp32",
           "counts_ptr": "*i32", "pos_ptr": "*i32"}
    base = dict(TOP_K=8, K_PAD=8, E_PAD=256, NORMALIZE=True, DOT_F32=False,
                INPUT_PRECISION="ieee", **align)
    configs = kernels._prune_fwd(
        [c for c in kernel.configs
         if c.kwargs["BLOCK_T"] == ops_routing.default_block_t(e)],
        {"e": e, "x_ptr": bf16})
  elif kernel_name == "dx":
    kernel = kernels._router_dx_kernel
    sig = {"dlogits_ptr": "*fp32", "wt_ptr": "*bf16", "t": "i32", "d": "i32",
           "e": "i32", "dx_ptr": "*bf16"}
    base = dict(BLOCK_E=64, DOT_F32=False, INPUT_PRECISION="ieee", **align)
    configs = kernels._prune_dx(kernel.configs, {"e": e, "wt_ptr": bf16})
  else:
    kernel = kernels._router_dw_kernel
    sig = {"x_ptr": "*bf16", "dlogits_ptr": "*fp32", "t": "i32", "d": "i32",
           "e": "i32", "tokens_per_split": "i32", "dw_ptr": "*fp32"}
    base = dict(E_PAD=256, DOT_F32=False, INPUT_PRECISION="ieee", **align)
    configs = kernels._prune_dw(kernel.configs, {"e": e, "x_ptr": bf16})
  fn = kernel.fn
  for cfg in configs:
    const = dict(base, **cfg.kwargs)
    full_sig = {name: sig.get(name, "constexpr") for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]]
             for i, name in enumerate(fn.arg_names)
             if sig.get(name, "").startswith("*")}
    compiled = triton.compile(
        ASTSource(fn, full_sig, constexprs=const, attrs=attrs),
        target=GPUTarget("cuda", 90, 128),
        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    ptx = compiled.asm["ptx"]
    where = f"{kernel_name} {cfg}"
    assert "wgmma.mma_async" in ptx, where
    copies = re.findall(
        r"cp\.async\.cg\.shared\.global \[[^]]*\], \[[^]]*\], (\w+)", ptx)
    assert copies and set(copies) == {"0x10"}, f"{where}: cp.async sizes {set(copies)}"
    assert not re.search(r"ld\.global(\.\w+)*\.b16", ptx), f"{where}: 2-byte loads"
    assert compiled.metadata.shared <= _SM90_SMEM, (
        f"{where}: {compiled.metadata.shared} bytes of shared memory")


@pytest.mark.gpu
class TestRouteTriton(RouteTestBase):
  """On the GPU: fewer small cases with one fixed tile config (each distinct
  set of constexprs compiles kernels), plus large autotuned ones."""

  BACKEND = "triton"
  # Fits shared memory for float32 at e=256 too (block_d=64, 3 stages needs
  # 288 KB there: checked with the compiler's metadata on sm_90).
  CONFIG = ops_routing.RouterConfig(
      block_t=64, block_d=32, num_warps=8, num_stages=2, gemm_block_t=64
  )

  def tol_dtype(self, dtype):
    # float32 dots run as tf32x3 (three TF32 passes).
    return "tf32" if np.dtype(dtype) == np.float32 else dtype

  @pytest.mark.parametrize(
      "t,d,e,k,cf,policy,norm", list(_forward_cases())[1::5])
  def test_forward(self, rng, t, d, e, k, cf, policy, norm):
    self.check_forward(rng, t, d, e, k, cf, policy, norm)

  @pytest.mark.parametrize("case", GRAD_CASES[2::2], ids=_grad_id)
  def test_grads(self, rng, case):
    self.check_grads(rng, *case)

  @pytest.mark.parametrize("e,k", [(8, 2), (64, 8), (256, 8)])
  def test_large_bf16(self, e, k):
    """t=8192, d=4096 bf16, capacity 1.25, autotuned: forward fields and
    gradients against the reference."""
    t, d = 8192, 4096
    rng = helpers.rng_for(f"large-{e}-{k}")
    x, w = separated_inputs(rng, t, d, e, k, ml_dtypes.bfloat16)
    self.CONFIG = None
    try:
      self.check_grads(rng, t, d, e, k, 1.25, "token_order", True,
                       dtype=ml_dtypes.bfloat16, x=x, w=w)
    finally:
      del self.CONFIG

  @pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
  def test_bit_identical_repeat(self, dtype):
    t, d, e, k = 8192, 4096, 256, 8
    rng = helpers.rng_for(f"repeat-{np.dtype(dtype).name}")
    x = jnp.asarray(helpers.normal(rng, (t, d), dtype))
    w = jnp.asarray(helpers.normal(rng, (d, e), dtype, 1 / math.sqrt(d)))
    c_w = jnp.asarray(helpers.normal(rng, (t, k)))

    @jax.jit
    def run(x, w):
      def f(x, w):
        r = ops_routing.route(x, w, top_k=k, capacity_factor=1.25,
                              backend=self.BACKEND, config=self.CONFIG)
        return jnp.sum(r.weights * c_w) + r.load_balancing_loss + r.router_z_loss, r
      (_, r), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(x, w)
      return r, grads

    first = jax.device_get(run(x, w))
    for _ in range(2):
      again = jax.device_get(run(x, w))
      for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def separated_inputs(rng, t, d, e, k, dtype, min_gap=2e-3, tries=20):
  """Large `(x, w)` whose top-k logits (float64 of the rounded inputs) are
  separated by `min_gap`: rows that are too close are redrawn."""
  x = helpers.normal(rng, (t, d), dtype)
  w = helpers.normal(rng, (d, e), dtype, 1 / math.sqrt(d))
  w64 = np.asarray(w, np.float64)
  bad = np.arange(t)
  for _ in range(tries):
    logits = np.asarray(x[bad], np.float64) @ w64
    top = -np.sort(-logits, axis=1)[:, : min(k + 1, e)]
    gaps = np.min(top[:, :-1] - top[:, 1:], axis=1) if top.shape[1] > 1 else None
    if gaps is None:
      return x, w
    bad = bad[gaps < min_gap]
    if bad.size == 0:
      return x, w
    x[bad] = helpers.normal(rng, (bad.size, d), dtype)
  raise RuntimeError(f"{bad.size} rows still have top-k logit gaps < {min_gap}")
