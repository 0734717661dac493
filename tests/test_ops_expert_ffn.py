"""Tests of `jmoe.ops.expert_ffn` (fused MoE experts in Triton, forward + backward).

`ExpertFfnTestBase` holds every check once with a `BACKEND` attribute:
`TestExpertFfnInterpret` runs it under Triton's interpreter on the CPU (small
odd shapes), `TestExpertFfnTriton` (marked `gpu`) on the GPU, adding the MoE
benchmark shapes and bit-identical repeats. The op is compared with
`jmoe.reference.expert_ffn` run in float32 on the same (upcast) inputs, for the
output and the gradients w.r.t. x, weights, up_kernel and down_kernel, and
the reference with the float64 loop `oracle.expert_ffn`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import helpers
import oracle
import sm90
from jmoe import reference
from jmoe.ops import act_bwd as act_bwd_lib
from jmoe.ops import expert_ffn as ffn_lib
from jmoe.ops import grouped_matmul as gmm_lib
from jmoe.reference.activations import apply_activation

BF16 = ml_dtypes.bfloat16

# (t, d, f, e, top_k, activation, dtype, drop_fraction): every activation,
# widths that are no block multiple, e from 1 to 64, top_k from 1 to 8.
CASES = (
    (29, 48, 40, 4, 2, "swiglu", np.float32, 0.2),
    (21, 40, 24, 3, 1, "gelu", BF16, 0.0),
    (29, 40, 24, 5, 3, "geglu", BF16, 0.3),
    (13, 24, 20, 16, 8, "relu", np.float32, 0.1),
    (19, 36, 33, 6, 2, "silu", np.float16, 0.0),
    (5, 16, 16, 64, 2, "swiglu", np.float32, 0.0),
    (11, 20, 12, 1, 1, "gelu", np.float32, 0.0),
)


def _inputs(rng, t, d, f, e, top_k, activation, dtype, drop=0.0):
  """`(x, expert_ids, weights, kept, up, down)`: distinct experts per token,
  router-like weights (0 where dropped), a `drop` fraction of copies dropped."""
  x = helpers.normal(rng, (t, d), dtype)
  _, up, down = helpers.moe_params(rng, d, e, f, activation, dtype)
  ids = np.stack([rng.permutation(e)[:top_k] for _ in range(t)]).astype(np.int32)
  kept = rng.random((t, top_k)) >= drop
  weights = rng.uniform(0.1, 1.0, (t, top_k)).astype(np.float32)
  weights = np.where(kept, weights, 0.0).astype(np.float32)
  return x, ids, weights, kept, up, down


def _f32(a):
  return jnp.asarray(a, jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a


def _loss(fn, ct, x, ids, weights, kept, up, down):
  y = fn(x, ids, weights, kept, up, down)
  return jnp.sum(y.astype(jnp.float32) * ct), y


def _outputs_and_grads(fn, *, args, ct) -> list[np.ndarray]:
  """`[y, d_x, d_weights, d_up, d_down]` of `_loss(fn, ct, *args)` (jitted)."""
  x, ids, weights, kept, up, down = args
  vg = jax.value_and_grad(
      lambda x, w, u, dn: _loss(fn, ct, x, ids, w, kept, u, dn), (0, 1, 2, 3),
      has_aux=True)
  (_, y), grads = jax.jit(vg)(x, weights, up, down)
  return [np.asarray(a) for a in (y, *grads)]


_HIGHEST = jax.lax.Precision.HIGHEST


def _per_expert_reference(x, ids, weights, kept, up, down):
  """SwiGLU expert FFN as a scan of dense FFNs over experts (every token, masked
  by its combine weight): the GPU oracle for large shapes, where the XLA
  `ragged_dot` backward of the reference materialises `[e, t*k, f]` float32.
  Operands in x's dtype, float32 accumulation, h rounded to x's dtype."""
  e, f = up.shape[0], down.shape[1]
  onehot = kept[..., None] & (ids[..., None] == jnp.arange(e))
  comb = jnp.sum(jnp.where(onehot, weights[..., None], 0.0), axis=1)  # [t, e]

  def body(y, inputs):
    u, dn, c = inputs
    pre = jnp.dot(x, u, precision=_HIGHEST, preferred_element_type=jnp.float32)
    h = (jax.nn.silu(pre[:, :f]) * pre[:, f:]).astype(x.dtype)
    o = jnp.dot(h, dn, precision=_HIGHEST, preferred_element_type=jnp.float32)
    return y + c[:, None] * o, None

  y, _ = jax.lax.scan(body, jnp.zeros(x.shape, jnp.float32), (up, down, comb.T))
  return y.astype(x.dtype)


class ExpertFfnTestBase:
  """Every expert_ffn check, run by the subclasses with their `BACKEND`."""

  BACKEND: str = ""

  def _ffn(self, *args, activation):
    return ffn_lib.expert_ffn(*args, activation=activation, backend=self.BACKEND)

  def _check_against_reference(self, args, activation, dtype, ct, use_jit=True):
    """Forward and the four gradients vs the float32 reference."""
    x, ids, weights, kept, up, down = args
    fn = functools.partial(self._ffn, activation=activation)
    vg = jax.value_and_grad(
        lambda x, w, u, dn: _loss(fn, ct, x, ids, w, kept, u, dn), (0, 1, 2, 3),
        has_aux=True,
    )
    (_, y), grads = (jax.jit(vg) if use_jit else vg)(x, weights, up, down)
    ref = functools.partial(reference.expert_ffn, activation=activation)
    (_, y_ref), grads_ref = jax.value_and_grad(
        lambda x, w, u, dn: _loss(ref, ct, x, ids, w, kept, u, dn), (0, 1, 2, 3),
        has_aux=True,
    )(_f32(x), weights, _f32(up), _f32(down))
    assert y.shape == x.shape and y.dtype == x.dtype
    helpers.assert_close(y, y_ref, dtype, err_msg="y")
    names = ("x", "weights", "up_kernel", "down_kernel")
    for name, got, want, arg in zip(names, grads, grads_ref, (x, weights, up, down)):
      assert got.shape == arg.shape and got.dtype == arg.dtype, name
      helpers.assert_close(got, want, dtype, kind="grad", err_msg=f"d_{name}")
    return y, grads

  @pytest.mark.parametrize("t,d,f,e,top_k,activation,dtype,drop", CASES)
  def test_matches_reference(self, rng, t, d, f, e, top_k, activation, dtype, drop):
    args = _inputs(rng, t, d, f, e, top_k, activation, dtype, drop)
    ct = helpers.normal(rng, (t, d), np.float32)
    _, grads = self._check_against_reference(args, activation, dtype, ct)
    dropped = ~args[3]
    assert np.all(np.asarray(grads[1])[dropped] == 0), "dropped copies: d_weights 0"

  def test_per_expert_reference(self, rng):
    # The GPU oracle of the large shapes agrees with the reference.
    args = _inputs(rng, 13, 24, 20, 5, 2, "swiglu", np.float32, 0.2)
    helpers.assert_close(
        _per_expert_reference(*(jnp.asarray(a) for a in args)),
        reference.expert_ffn(*args, activation="swiglu"), np.float32,
    )

  def test_xla_align(self, rng, monkeypatch):
    # JMOE_ALIGN=xla: the argsort align gives the same result as the kernel.
    args = _inputs(rng, 19, 24, 20, 5, 2, "geglu", np.float32, 0.2)
    y = self._ffn(*args, activation="geglu")
    monkeypatch.setenv("JMOE_ALIGN", "xla")
    y_xla = self._ffn(*args, activation="geglu")
    assert np.array_equal(np.asarray(y), np.asarray(y_xla))

  def test_slot_rows_dtypes(self, rng, monkeypatch):
    # JMOE_SLOT_ROWS: the down and dx GEMMs store bf16 rows (default "input",
    # rounded to nearest even, also in the interpreter) or float32 rows; y and
    # the gradients of the two agree within twice the bf16 bound, and both
    # match the reference within the bf16 bound.
    args = _inputs(rng, 29, 40, 24, 5, 3, "swiglu", BF16, 0.3)
    ct = helpers.normal(rng, (29, 40), np.float32)
    fn = functools.partial(self._ffn, activation="swiglu")
    ref = functools.partial(reference.expert_ffn, activation="swiglu")

    run = functools.partial(_outputs_and_grads, args=args, ct=ct)

    want = run(ref)
    names = ("y", "x", "weights", "up", "down")
    monkeypatch.delenv(ffn_lib.SLOT_ROWS_ENV, raising=False)
    assert ffn_lib.slot_rows_dtype(jnp.bfloat16) == jnp.bfloat16
    assert ffn_lib.slot_rows_dtype(jnp.float32) == jnp.float32
    got_input = run(fn)
    monkeypatch.setenv(ffn_lib.SLOT_ROWS_ENV, "float32")
    assert ffn_lib.slot_rows_dtype(jnp.bfloat16) == jnp.float32
    got_f32 = run(fn)
    for got in (got_input, got_f32):
      for g, w, name in zip(got, want, names):
        helpers.assert_close(g, w, BF16, kind="fwd" if name == "y" else "grad",
                             err_msg=name)
    for g, w, name in zip(got_input, got_f32, names):
      err = float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32))))
      assert err <= 2e-2 * float(jnp.max(jnp.abs(w.astype(jnp.float32)))), name
    monkeypatch.setenv(ffn_lib.SLOT_ROWS_ENV, "bf16")
    with pytest.raises(ValueError, match="JMOE_SLOT_ROWS must be"):
      ffn_lib.slot_rows_dtype(jnp.bfloat16)

  def test_weight_grad_layouts(self, rng, monkeypatch):
    # The weight gradients read their K-major operand as rows or as columns
    # of a transposed, group-padded copy (the default above 1024 rows per
    # expert): dW_up through JMOE_TGMM_GATHER (the same rows reach the same
    # dots: bit for bit the same), dW_down through JMOE_DW_DOWN (dy^T h with a
    # transposed store instead of h^T dy). Every output matches the reference
    # within the bf16 bound.
    from jmoe.ops.tgmm import GATHER_MODE_ENV  # pylint: disable=import-outside-toplevel

    args = _inputs(rng, 29, 40, 24, 5, 3, "swiglu", BF16, 0.3)
    ct = helpers.normal(rng, (29, 40), np.float32)

    run = functools.partial(_outputs_and_grads, args=args, ct=ct)

    fn = functools.partial(self._ffn, activation="swiglu")
    want = run(functools.partial(reference.expert_ffn, activation="swiglu"))
    got = {}
    for up_mode, down_layout in (("xla", "rows"), ("xla_columns", "rows"),
                                 ("xla_columns", "columns")):
      monkeypatch.setenv(GATHER_MODE_ENV, up_mode)
      monkeypatch.setenv(ffn_lib.DW_DOWN_ENV, down_layout)
      assert ffn_lib.dw_up_gather_mode(87, 3) == up_mode
      assert ffn_lib.dw_down_layout(87, 3) == down_layout
      got[up_mode, down_layout] = outs = run(fn)
      for g, w, name in zip(outs, want, ("y", "x", "weights", "up", "down")):
        helpers.assert_close(g, w, BF16, kind="fwd" if name == "y" else "grad",
                             err_msg=f"{up_mode}, {down_layout}: {name}")
    for g, w in zip(got["xla", "rows"], got["xla_columns", "rows"]):
      np.testing.assert_array_equal(g, w)
    monkeypatch.delenv(GATHER_MODE_ENV)
    monkeypatch.delenv(ffn_lib.DW_DOWN_ENV)
    assert ffn_lib.dw_up_gather_mode(16384, 8) == "xla_columns"
    assert ffn_lib.dw_down_layout(16384, 8) == "columns"
    assert ffn_lib.dw_up_gather_mode(49152, 64) == "xla"
    assert ffn_lib.dw_down_layout(49152, 64) == "rows"
    monkeypatch.setenv(gmm_lib.WGRAD_MIN_ROWS_ENV, "512")
    assert ffn_lib.dw_up_gather_mode(49152, 64) == "xla_columns"
    assert ffn_lib.dw_down_layout(49152, 64) == "columns"
    monkeypatch.setenv(gmm_lib.WGRAD_MIN_ROWS_ENV, "many")
    with pytest.raises(ValueError, match="JMOE_WGRAD_MIN_ROWS must be an integer"):
      ffn_lib.dw_down_layout(16384, 8)
    monkeypatch.delenv(gmm_lib.WGRAD_MIN_ROWS_ENV)
    monkeypatch.setenv(ffn_lib.DW_DOWN_ENV, "cols")
    with pytest.raises(ValueError, match="JMOE_DW_DOWN must be one of"):
      ffn_lib.dw_down_layout(16384, 8)

  def test_weight_grads_tma_kernel(self, rng, monkeypatch):
    # Where d, f are multiples of 16 the weight gradients take the persistent
    # TMA tgmm (JMOE_TGMM_KERNEL "auto") and the columns layout at every size;
    # the same numbers as the plain kernel in that layout (bit for bit under
    # the interpreter, where both run the same tile config), within the bf16
    # bound of the reference on every output.
    from jmoe.ops.tgmm import GATHER_MODE_ENV, TGMM_KERNEL_ENV  # pylint: disable=import-outside-toplevel

    for name in (GATHER_MODE_ENV, ffn_lib.DW_DOWN_ENV, TGMM_KERNEL_ENV):
      monkeypatch.delenv(name, raising=False)
    args = _inputs(rng, 29, 48, 32, 5, 3, "swiglu", BF16, 0.3)
    ct = helpers.normal(rng, (29, 48), np.float32)
    run = functools.partial(_outputs_and_grads, args=args, ct=ct)
    fn = functools.partial(self._ffn, activation="swiglu")
    assert ffn_lib.weight_grad_tma(self.BACKEND, BF16, 48, 32, 64)
    assert not ffn_lib.weight_grad_tma(self.BACKEND, BF16, 40, 24, 48)
    assert not ffn_lib.weight_grad_tma(self.BACKEND, np.float32, 48, 32, 64)
    assert ffn_lib.dw_up_gather_mode(87, 3, tma=True) == "xla_columns"
    assert ffn_lib.dw_down_layout(87, 3, tma=True) == "columns"
    tma_outs = run(fn)
    monkeypatch.setenv(TGMM_KERNEL_ENV, "plain")
    assert not ffn_lib.weight_grad_tma(self.BACKEND, BF16, 48, 32, 64)
    monkeypatch.setenv(GATHER_MODE_ENV, "xla_columns")
    monkeypatch.setenv(ffn_lib.DW_DOWN_ENV, "columns")
    plain_outs = run(fn)
    want = run(functools.partial(reference.expert_ffn, activation="swiglu"))
    helpers.assert_variant_matches(tma_outs, plain_outs, want, BF16, self.BACKEND,
                                   ("y", "x", "weights", "up", "down"), "tma: ")

  @pytest.mark.parametrize("router_scale", ["up", "down"])
  def test_share_sorted_rows(self, rng, monkeypatch, launched, router_scale):
    # JMOE_SHARE_SORTED_ROWS=1 (default): the forward's sorted copy of x (read by the up
    # GEMM by TMA) and the backward's sorted copy of dy (read by the dh GEMM)
    # are also the weight gradients' row-major operands (tgmm "xla_rows"):
    # no column copy is made, the TMA tgmm runs both. Same numbers as the
    # columns layout (bit for bit under the interpreter: same steps), within
    # the bf16 bound of the reference; dropped copies leave idle slots.
    from jmoe.ops.tgmm import TGMM_KERNEL_ENV  # pylint: disable=import-outside-toplevel

    for name in (gmm_lib.GATHER_ROWS_ENV, TGMM_KERNEL_ENV, act_bwd_lib.ACT_BWD_ENV):
      monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(ffn_lib.ROUTER_SCALE_ENV, router_scale)
    args = _inputs(rng, 37, 48, 32, 5, 3, "swiglu", BF16, 0.3)
    ct = helpers.normal(rng, (37, 48), np.float32)
    run = functools.partial(_outputs_and_grads, args=args, ct=ct)
    fn = functools.partial(self._ffn, activation="swiglu")
    names = ("y", "x", "weights", "up", "down")
    monkeypatch.setenv(ffn_lib.SHARE_SORTED_ROWS_ENV, "0")
    base = run(fn)
    assert "jmoe_gather_columns" in [name for name, _ in launched]
    del launched[:]
    monkeypatch.delenv(ffn_lib.SHARE_SORTED_ROWS_ENV)  # the default
    assert ffn_lib.share_sorted_rows(self.BACKEND, BF16, 48, 32, 64)
    got = run(fn)
    kernels = [name for name, _ in launched]
    assert "jmoe_gather_columns" not in kernels, kernels
    assert kernels.count("jmoe_gather_rows") == 2, kernels
    tgmm_calls = [kw for name, kw in launched if name == "jmoe_tgmm_tma"]
    assert [kw["A_ROWS"] for kw in tgmm_calls] == [True, True], kernels
    want = run(functools.partial(reference.expert_ffn, activation="swiglu"))
    helpers.assert_variant_matches(got, base, want, BF16, self.BACKEND, names, "shared: ")
    # Under vmap (the kept x rows are a batched residual) and remat.
    x, ids, weights, kept, up, down = args
    x2 = np.stack([x, helpers.normal(rng, x.shape, BF16)])

    def grad_up(x):
      return jax.grad(jax.checkpoint(lambda u: jnp.sum(
          fn(x, ids, weights, kept, u, down).astype(jnp.float32) * ct)))(up)

    batched = jax.jit(jax.vmap(grad_up))(x2)
    for i in range(2):
      helpers.assert_close(batched[i], jax.jit(grad_up)(x2[i]), BF16, kind="grad",
                           err_msg=f"vmap item {i}")
    # Where it does not apply: not a multiple of 16, float32, the fused
    # activation backward, the Gluon tgmm.
    assert not ffn_lib.share_sorted_rows(self.BACKEND, BF16, 40, 24, 48)
    assert not ffn_lib.share_sorted_rows(self.BACKEND, np.float32, 48, 32, 64)
    assert not ffn_lib.share_sorted_rows("reference", BF16, 48, 32, 64)
    monkeypatch.setenv(act_bwd_lib.ACT_BWD_ENV, "fused")
    assert not ffn_lib.share_sorted_rows(self.BACKEND, BF16, 48, 32, 64)
    monkeypatch.delenv(act_bwd_lib.ACT_BWD_ENV)
    monkeypatch.setenv(TGMM_KERNEL_ENV, "gluon")
    assert not ffn_lib.share_sorted_rows(self.BACKEND, BF16, 48, 32, 64)

  @pytest.mark.parametrize("act_bwd", ["two_pass", "fused"])
  def test_gemm_tma_modes(self, rng, monkeypatch, act_bwd):
    # JMOE_GEMM_TMA: the grouped GEMMs load weight tiles (and the down / dx
    # GEMMs' contiguous rows) by TMA, with one program per SM ("persistent")
    # or per work item ("tiles"), or every tile by cp.async ("off"); "auto"
    # mixes them per kernel. d = 40
    # leaves a K tail of the up GEMM and a partial column block of the down
    # GEMM, f = 24 the same for the backward. All three give the same numbers
    # (bit for bit under the interpreter), within the bf16 bound of the
    # reference on every output.
    from jmoe.ops.act_bwd import ACT_BWD_ENV  # pylint: disable=import-outside-toplevel

    monkeypatch.setenv(ACT_BWD_ENV, act_bwd)
    args = _inputs(rng, 37, 40, 24, 5, 3, "swiglu", BF16, 0.3)
    ct = helpers.normal(rng, (37, 40), np.float32)
    run = functools.partial(_outputs_and_grads, args=args, ct=ct)
    fn = functools.partial(self._ffn, activation="swiglu")
    outs = {}
    for mode in gmm_lib.GEMM_TMA_MODES:
      monkeypatch.setenv(gmm_lib.GEMM_TMA_ENV, mode)
      flags = gmm_lib.tma_flags("plain", self.BACKEND, BF16, (960, 24, 1), 5, 37, 24)
      assert flags["B_TMA"] == flags["A_TMA"] == (mode != "off"), mode
      assert flags["PERSISTENT"] == (mode in ("auto", "persistent")), mode
      outs[mode] = run(fn)
    want = run(functools.partial(reference.expert_ffn, activation="swiglu"))
    for mode in ("auto", "persistent", "tiles"):
      helpers.assert_variant_matches(outs[mode], outs["off"], want, BF16, self.BACKEND,
                                     ("y", "x", "weights", "up", "down"), f"{mode}: ")

  @pytest.mark.parametrize("activation,dtype", [("swiglu", BF16), ("gelu", BF16),
                                                ("swiglu", np.float32)])
  def test_gather_rows_copy(self, rng, monkeypatch, activation, dtype):
    # JMOE_GATHER_ROWS=copy: the up GEMM (and the dh GEMM of the two-pass
    # act_bwd) read a copy of x (dy) sorted by slot instead of gathering rows
    # in the kernel; 16-bit operands then come by TMA, in the flattened
    # persistent loop ("auto"; the up GEMM's loop stays nested), the nested
    # one (FLATTEN=0) or per item ("tiles"). d = 40 leaves a K tail and f = 24 a partial column block;
    # dropped copies (capacity 0.3) leave idle slots. Every variant gives the
    # numbers of the in-kernel gather (bit for bit under the interpreter),
    # within the dtype's bound of the reference.
    for name in (gmm_lib.GEMM_TMA_ENV, gmm_lib.GEMM_FLATTEN_ENV):
      monkeypatch.delenv(name, raising=False)
    args = _inputs(rng, 37, 40, 24, 5, 3, activation, dtype, 0.3)
    ct = helpers.normal(rng, (37, 40), np.float32)
    run = functools.partial(_outputs_and_grads, args=args, ct=ct)
    fn = functools.partial(self._ffn, activation=activation)
    monkeypatch.setenv(gmm_lib.GATHER_ROWS_ENV, "kernel")
    base = run(fn)
    monkeypatch.setenv(gmm_lib.GATHER_ROWS_ENV, "copy")
    assert gmm_lib.gather_rows_mode(111, 5) == "copy"
    outs = {"auto": run(fn)}
    if dtype == BF16:
      flags = gmm_lib.tma_flags("act", self.BACKEND, BF16, (960, 48, 1), 5, 111, 40)
      assert flags["A_TMA"] and flags["PERSISTENT"] and "FLATTEN" not in flags
      flags = gmm_lib.tma_flags("plain", self.BACKEND, BF16, (960, 1, 40), 5, 111, 40)
      assert flags["A_TMA"] and flags["PERSISTENT"] and flags["FLATTEN"]
      monkeypatch.setenv(gmm_lib.GEMM_FLATTEN_ENV, "0")
      outs["nested"] = run(fn)
      monkeypatch.delenv(gmm_lib.GEMM_FLATTEN_ENV)
      monkeypatch.setenv(gmm_lib.GEMM_TMA_ENV, "tiles")
      outs["tiles"] = run(fn)
    want = run(functools.partial(reference.expert_ffn, activation=activation))
    for mode, got in outs.items():
      helpers.assert_variant_matches(got, base, want, dtype, self.BACKEND,
                                     ("y", "x", "weights", "up", "down"), f"{mode}: ")
    # "auto": the copy above JMOE_GATHER_ROWS_MIN rows per group on average.
    monkeypatch.delenv(gmm_lib.GATHER_ROWS_ENV)
    assert gmm_lib.gather_rows_mode(16384, 8) == "copy"
    assert gmm_lib.gather_rows_mode(49152, 64) == "kernel"
    monkeypatch.setenv(gmm_lib.GATHER_ROWS_MIN_ENV, "16")
    assert gmm_lib.gather_rows_mode(111, 5) == "copy"
    monkeypatch.setenv(gmm_lib.GATHER_ROWS_MIN_ENV, "some")
    with pytest.raises(ValueError, match="JMOE_GATHER_ROWS_MIN must be an integer"):
      gmm_lib.gather_rows_mode(111, 5)
    monkeypatch.setenv(gmm_lib.GATHER_ROWS_ENV, "sorted")
    with pytest.raises(ValueError, match="JMOE_GATHER_ROWS must be one of"):
      gmm_lib.gather_rows_mode(111, 5)

  @pytest.mark.parametrize("f,dtype", [(24, BF16), (40, BF16), (40, np.float32)])
  def test_act_wide(self, rng, monkeypatch, f, dtype):
    # JMOE_ACT_WIDE: the gated up GEMM gathering its rows multiplies gate and up
    # columns as one [BLOCK_K, 2 BLOCK_N] weight tile. f = 24 and 40 leave
    # partial column blocks (gate and up columns wrap at f), d = 40 a K tail,
    # capacity 0.3 idle slots: the numbers of the two-tile kernel (bit for bit
    # under the interpreter), within the dtype's bound of the reference.
    for name in (gmm_lib.GEMM_TMA_ENV, gmm_lib.GATHER_ROWS_ENV):
      monkeypatch.delenv(name, raising=False)
    args = _inputs(rng, 37, 40, f, 5, 3, "swiglu", dtype, 0.3)
    ct = helpers.normal(rng, (37, 40), np.float32)
    run = functools.partial(_outputs_and_grads, args=args, ct=ct)
    fn = functools.partial(self._ffn, activation="swiglu")
    monkeypatch.setenv(gmm_lib.ACT_WIDE_ENV, "0")
    base = run(fn)
    monkeypatch.setenv(gmm_lib.ACT_WIDE_ENV, "1")
    got = run(fn)
    want = run(functools.partial(reference.expert_ffn, activation="swiglu"))
    helpers.assert_variant_matches(got, base, want, dtype, self.BACKEND,
                                   ("y", "x", "weights", "up", "down"), "wide: ")
    # Where it applies: gated, weights through pointers, f a multiple of 8.
    assert gmm_lib.act_wide(True, f, b_tma=False)
    assert not gmm_lib.act_wide(True, 20, b_tma=False)
    assert not gmm_lib.act_wide(True, f, b_tma=True)
    assert not gmm_lib.act_wide(False, f, b_tma=False)
    monkeypatch.setenv(gmm_lib.ACT_WIDE_ENV, "0")
    assert not gmm_lib.act_wide(True, f, b_tma=False)

  @pytest.mark.parametrize("activation,dtype", [("swiglu", BF16), ("gelu", np.float32)])
  def test_router_scale_stages(self, rng, monkeypatch, activation, dtype):
    # JMOE_ROUTER_SCALE: router weights applied in the up GEMM's epilogue (the
    # default; dW_down then reads the stored scaled h) or in the down GEMM's
    # (dW_down on XLA-prescaled rows). On the same inputs both match the
    # reference (forward and four gradients, dropped copies included), and
    # d_x, d_weights and d_up, which never read h, are bit-identical.
    args = _inputs(rng, 27, 40, 24, 6, 3, activation, dtype, 0.25)
    ct = helpers.normal(rng, (27, 40), np.float32)
    outs = {}
    for stage in ffn_lib.ROUTER_SCALE_STAGES:
      monkeypatch.setenv(ffn_lib.ROUTER_SCALE_ENV, stage)
      assert ffn_lib.router_scale_stage() == stage
      y, grads = self._check_against_reference(args, activation, dtype, ct)
      outs[stage] = [np.asarray(v.astype(jnp.float32)) for v in (y, *grads)]
    for i, name in ((1, "x"), (2, "weights"), (3, "up_kernel")):
      np.testing.assert_array_equal(outs["up"][i], outs["down"][i], err_msg=name)

  def test_router_scale_env_error(self, monkeypatch):
    monkeypatch.setenv(ffn_lib.ROUTER_SCALE_ENV, "combine")
    with pytest.raises(ValueError, match="JMOE_ROUTER_SCALE"):
      ffn_lib.router_scale_stage()

  def test_reference_matches_oracle(self, rng):
    args = _inputs(rng, 13, 24, 20, 5, 2, "swiglu", np.float32, 0.2)
    y = self._ffn(*args, activation="swiglu")
    helpers.assert_close(y, oracle.expert_ffn(*args, activation="swiglu"), np.float32)

  def test_all_tokens_on_one_expert_eager(self, rng):
    # Every copy on expert 2 (duplicates within a token), other experts empty;
    # eager (no jit), outputs start poisoned under "interpret".
    t, d, f, e, top_k = 23, 24, 20, 5, 2
    x, _, weights, kept, up, down = _inputs(rng, t, d, f, e, top_k, "gelu", np.float32)
    ids = np.full((t, top_k), 2, np.int32)
    ct = helpers.normal(rng, (t, d), np.float32)
    y, grads = self._check_against_reference(
        (x, ids, weights, kept, up, down), "gelu", np.float32, ct, use_jit=False
    )
    assert np.isfinite(np.asarray(y)).all()
    d_up, d_down = np.asarray(grads[2]), np.asarray(grads[3])
    assert np.all(d_up[[0, 1, 3, 4]] == 0) and np.all(d_down[[0, 1, 3, 4]] == 0)

  def test_everything_dropped(self, rng):
    args = list(_inputs(rng, 10, 16, 12, 3, 2, "swiglu", np.float32))
    args[3] = np.zeros_like(args[3])  # kept: all False
    args[2] = helpers.normal(rng, args[2].shape, np.float32)  # even nonzero weights
    ct = helpers.normal(rng, (10, 16), np.float32)
    fn = functools.partial(self._ffn, activation="swiglu")
    (_, y), grads = jax.value_and_grad(
        lambda x, w, u, dn: _loss(fn, ct, x, args[1], w, args[3], u, dn),
        (0, 1, 2, 3), has_aux=True,
    )(args[0], args[2], args[4], args[5])
    assert np.all(np.asarray(y) == 0)
    for g in grads:
      assert np.all(np.asarray(g) == 0)

  def test_repeat_is_bit_identical(self, rng):
    args = _inputs(rng, 30, 32, 24, 4, 2, "swiglu", np.float32)
    ct = helpers.normal(rng, (30, 32), np.float32)
    fn = jax.jit(jax.value_and_grad(
        lambda x, w, u, dn: _loss(functools.partial(self._ffn, activation="swiglu"),
                                  ct, x, args[1], w, args[3], u, dn)[0],
        (0, 1, 2, 3),
    ))
    first = fn(args[0], args[2], args[4], args[5])
    second = fn(args[0], args[2], args[4], args[5])
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
      assert np.array_equal(np.asarray(a), np.asarray(b))

  def test_vmap_checkpoint_grad(self, rng):
    t, d, f, e, top_k = 9, 16, 12, 3, 2
    batch = [_inputs(rng, t, d, f, e, top_k, "silu", np.float32) for _ in range(2)]
    _, _, _, _, up, down = batch[0]
    x, ids, weights, kept = (np.stack([b[i] for b in batch]) for i in range(4))
    fn = functools.partial(self._ffn, activation="silu")
    y = jax.jit(jax.vmap(fn, in_axes=(0, 0, 0, 0, None, None)))(
        x, ids, weights, kept, up, down
    )
    for b in range(2):
      want = reference.expert_ffn(x[b], ids[b], weights[b], kept[b], up, down,
                                  activation="silu")
      helpers.assert_close(y[b], want, np.float32)
    loss = jax.checkpoint(lambda u: jnp.sum(fn(x[0], ids[0], weights[0], kept[0], u, down)))
    ref_loss = lambda u: jnp.sum(reference.expert_ffn(  # noqa: E731
        x[0], ids[0], weights[0], kept[0], u, down, activation="silu"))
    helpers.assert_close(jax.jit(jax.grad(loss))(up), jax.grad(ref_loss)(up),
                         np.float32, kind="grad")

  def test_mixed_weight_dtype(self, rng):
    # float32 parameters with bf16 activations: kernels are cast to x's dtype,
    # gradients come back in the parameters' dtype.
    x, ids, weights, kept, up, down = _inputs(rng, 17, 24, 16, 3, 2, "swiglu", np.float32)
    xb = x.astype(BF16)
    y = self._ffn(xb, ids, weights, kept, up, down, activation="swiglu")
    assert y.dtype == BF16
    want = reference.expert_ffn(xb, ids, weights, kept, up.astype(BF16),
                                down.astype(BF16), activation="swiglu")
    helpers.assert_close(y, want, BF16)
    g = jax.grad(lambda u: jnp.sum(self._ffn(xb, ids, weights, kept, u, down,
                                             activation="swiglu").astype(jnp.float32)))(up)
    assert g.dtype == np.float32

  def test_errors(self, rng):
    x, ids, weights, kept, up, down = _inputs(rng, 8, 16, 12, 3, 2, "swiglu", np.float32)
    cases = [
        ((x[0], ids, weights, kept, up, down), "swiglu", ValueError,
         r"x must have shape \[t, d\]"),
        ((x, ids[:5], weights, kept, up, down), "swiglu", ValueError,
         r"expert_ids must have shape \[t=8, top_k\]"),
        ((x, ids.astype(np.float32), weights, kept, up, down), "swiglu", TypeError,
         "expert_ids must be int32"),
        ((x, ids, weights[:, :1], kept, up, down), "swiglu", ValueError,
         r"weights must have shape \[t, top_k\]"),
        ((x, ids, weights, kept, up[:, :, :23], down), "swiglu", ValueError,
         "up_kernel for gated activation 'swiglu' must have an even last dimension"),
        ((x, ids, weights, kept, up[:, :5], down), "swiglu", ValueError,
         r"up_kernel must have shape \[e=3, d=16, 2f\]"),
        ((x, ids, weights, kept, up[0], down), "swiglu", ValueError,
         r"up_kernel must have shape \[e, d=16, 2f\]"),
        ((x, ids, weights, kept, up, down), "gelu", ValueError,
         r"down_kernel must have shape \[e=3, f=24, d=16\]"),
        ((x, ids, weights, kept, up, down), "tanh", ValueError,
         "activation must be one of"),
        ((x.astype(np.int32), ids, weights, kept, up, down), "swiglu", TypeError,
         "x must be float32"),
    ]
    for args, activation, error, pattern in cases:
      with pytest.raises(error, match=pattern):
        jax.jit(functools.partial(self._ffn, activation=activation))(*args)


def _act_bwd_oracle(dy, down, ids, weights, pos, pre, activation):
  """Per copy `(t, j)` kept at slot `s = pos[t, j]`: `g = dy[t] @ down[e]^T`,
  `d_pre[s] = vjp(act)(pre[s])(w g)` and `dw[t, j] = <act(pre[s]), g>`.
  Returns `(d_pre, dw)` float32, `d_pre` only at filled slots (else NaN)."""
  d_pre = np.full(pre.shape, np.nan, np.float32)
  dw = np.zeros(ids.shape, np.float32)
  act = lambda p: apply_activation(p, activation)  # noqa: E731
  for t, j in zip(*np.nonzero(pos >= 0)):
    s = pos[t, j]
    g = np.asarray(dy[t], np.float64) @ np.asarray(down[ids[t, j]], np.float64).T
    h, vjp = jax.vjp(act, jnp.asarray(pre[s], jnp.float32))
    (d_pre[s],) = vjp(jnp.asarray(weights[t, j] * g, jnp.float32))
    dw[t, j] = np.dot(np.asarray(h, np.float64), g)
  return d_pre, dw


class TestExpertFfnInterpret(ExpertFfnTestBase):
  BACKEND = "interpret"

  # f = 40: the second program's second 16-column half is past f; f = 12 < 16:
  # every second half is empty; f = 20: a partial second half.
  @pytest.mark.parametrize("impl,split", [("two_pass", None), ("fused", "1"),
                                          ("fused", "0")])
  @pytest.mark.parametrize("activation,f", [("swiglu", 40), ("gelu", 12),
                                            ("geglu", 20)])
  def test_act_bwd_stage(self, rng, monkeypatch, impl, split, activation, f):
    """act_bwd, two-pass (default: GEMM storing g, then the elementwise
    kernel) and fused with two accumulators per program (`SPLIT_N=2`) or one
    (`JMOE_ACT_BWD_SPLIT=0`), vs a per-copy oracle: `d_pre` at every filled
    slot and the router-weight gradient summed from the `dwp` partial sums
    (every column written: outputs start as NaN)."""
    t, d, e, top_k = 23, 24, 4, 2
    gated = activation in ("swiglu", "geglu")
    if impl == "fused":
      monkeypatch.setenv(gmm_lib.ACT_BWD_SPLIT_ENV, split)
      cfg = gmm_lib.default_config("act_bwd", 16, f, d, self.BACKEND, gated)
      assert cfg.split_n == (2 if split == "1" else 1)
      cols = -(-f // cfg.block_n)
    else:
      cols = -(-f // act_bwd_lib._elementwise_blocks(self.BACKEND)["BLOCK_N"])
    x, ids, weights, kept, _, down = _inputs(rng, t, d, f, e, top_k, activation,
                                              np.float32, 0.2)
    del x
    pre = helpers.normal(rng, (t * top_k, 2 * f if gated else f), np.float32)
    dy = helpers.normal(rng, (t, d), np.float32)
    al, w_sorted, block_m = ffn_lib.plan(jnp.asarray(ids), jnp.asarray(kept),
                                         jnp.asarray(weights), e, self.BACKEND)
    d_pre, dwp = jax.jit(
        lambda dy, dn, w, pre: ffn_lib.act_bwd_stage(
            dy, dn, al, w, pre, block_m, activation, self.BACKEND, impl=impl)
    )(dy, down, w_sorted, pre)
    assert dwp.shape == (t * top_k, cols)
    pos = np.asarray(al.pos)
    want_dpre, want_dw = _act_bwd_oracle(dy, down, ids, weights, pos, pre, activation)
    filled = pos[pos >= 0]
    helpers.assert_close(np.asarray(d_pre)[filled], want_dpre[filled], np.float32,
                         kind="grad", err_msg="d_pre")
    dw = np.where(pos >= 0, np.asarray(dwp)[np.maximum(pos, 0)].sum(-1), 0.0)
    helpers.assert_close(dw, want_dw, np.float32, kind="grad", err_msg="dw")


def _sm90_act_bwd_build(cfg: gmm_lib.GemmConfig, f: int, d: int, gated: bool):
  """`_grouped_gemm_act_bwd_kernel` built for the H100 on the host (bf16, the
  pointer hints jax-triton gives) with `cfg`'s tiles: `(ptx, cubin, shared)`.
  Callers `sm90.require()` first; a build error raises."""
  # pylint: disable=import-outside-toplevel,protected-access
  import triton
  from triton.backends.compiler import GPUTarget
  from triton.compiler import ASTSource

  from jmoe.kernels import grouped_gemm as kernels

  fn = kernels._grouped_gemm_act_bwd_kernel
  sig = {"dy_ptr": "*bf16", "w_ptr": "*bf16", "tiles_ptr": "*i32",
         "row_index_ptr": "*i32", "row_scale_ptr": "*fp32", "pre_ptr": "*bf16",
         "dpre_ptr": "*bf16", "dwp_ptr": "*fp32"}
  meta = cfg.metaparams("act_bwd")
  options = {"num_warps": meta.pop("num_warps"), "num_stages": meta.pop("num_stages")}
  const = dict(F=f, K=d, NUM_TILES=80, STRIDE_DYM=d, STRIDE_WG=f * d, STRIDE_WK=1,
               STRIDE_WN=d, DWP_COLS=-(-f // cfg.block_n),
               ACTIVATION="silu" if gated else "gelu", GATED=gated, DOT_F32=False,
               INPUT_PRECISION="ieee", **meta)
  full_sig = {name: sig.get(name, "constexpr") for name in fn.arg_names}
  attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
           if name in sig}
  compiled = triton.compile(ASTSource(fn, full_sig, constexprs=const, attrs=attrs),
                            target=GPUTarget("cuda", 90, 128), options=options)
  return compiled.asm["ptx"], compiled.asm["cubin"], compiled.metadata.shared


def _cubin_resources(cubin: bytes, tmp_path) -> dict[str, int]:
  """`{"REG": .., "STACK": .., "LOCAL": ..}` from `cuobjdump -res-usage`."""
  import re  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel

  path = tmp_path / "act_bwd.cubin"
  path.write_bytes(cubin)
  out = subprocess.run([sm90.cuobjdump_path(), "-res-usage", str(path)],
                       capture_output=True, text=True, check=True).stdout
  return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out)}


@pytest.mark.parametrize("f,d", [(3072, 768), (14336, 4096)])
def test_sm90_act_bwd_split_builds_without_spills(tmp_path, monkeypatch, f, d):
  """The opt-in gated act_bwd config on the H100 (`JMOE_ACT_BWD_SPLIT=1`: two
  64-wide accumulators, `split_n=2`) compiles for sm_90 with 16-byte `cp.async`
  tile loads feeding `wgmma`, no register spills (a single 128-wide accumulator
  spills: checked too, so the test sees the difference), and shared memory that
  fits."""
  import re  # pylint: disable=import-outside-toplevel

  sm90.require(cuobjdump=True)
  monkeypatch.setenv(gmm_lib.ACT_BWD_SPLIT_ENV, "1")
  cfg = gmm_lib.default_config("act_bwd", 128, f, d, "triton", gated=True)
  assert (cfg.block_n, cfg.split_n) == (64, 2)
  ptx, cubin, shared = _sm90_act_bwd_build(cfg, f, d, gated=True)
  assert ptx.count("wgmma.mma_async") >= 2 * 4, "two accumulators' wgmma"
  copies = re.findall(r"cp\.async\.cg\.shared\.global \[[^]]*\], \[[^]]*\], (\w+)",
                      ptx)
  assert copies and set(copies) == {"0x10"}, f"cp.async sizes {set(copies)}"
  assert not re.search(r"ld\.global(\.\w+)*\.b16", ptx), "2-byte global loads"
  assert shared <= 232448, f"{shared} bytes of shared memory"
  res = _cubin_resources(cubin, tmp_path)
  assert res["STACK"] == 0 and res.get("LOCAL", 0) == 0, f"spills: {res}"
  assert "st.local" not in ptx
  # The single 128-wide accumulator it replaces does spill.
  old = gmm_lib.GemmConfig(128, 128, 64, 8, 8, 3)
  _, old_cubin, _ = _sm90_act_bwd_build(old, f, d, gated=True)
  assert _cubin_resources(old_cubin, tmp_path)["STACK"] > 0


@pytest.mark.gpu
class TestExpertFfnTriton(ExpertFfnTestBase):
  BACKEND = "triton"

  @pytest.mark.parametrize("autotune", ["0", "1"])
  def test_act_bwd_split_matches_unsplit(self, monkeypatch, autotune):
    """On the small benchmark shape (bf16 SwiGLU): the fused act_bwd with
    `SPLIT_N=2` gives the `d_pre` and summed `dwp` of `JMOE_ACT_BWD_SPLIT=0` (the
    same 64-column blocks and products; bit-identical with autotuning off), and
    the default two-pass path agrees within bf16 tolerance."""
    monkeypatch.setenv(gmm_lib.AUTOTUNE_ENV, autotune)
    t, d, f, e, top_k = 4096, 768, 3072, 8, 2
    keys = jax.random.split(jax.random.key(3), 5)
    dy = jax.random.normal(keys[0], (t, d), jnp.bfloat16)
    down = (jax.random.normal(keys[1], (e, f, d)) / np.sqrt(f)).astype(jnp.bfloat16)
    pre = jax.random.normal(keys[2], (t * top_k, 2 * f), jnp.bfloat16)
    ids = jax.lax.top_k(jax.random.normal(keys[3], (t, e)), top_k)[1]
    weights = jax.random.uniform(keys[4], (t, top_k), jnp.float32, 0.1, 1.0)
    kept = jnp.ones((t, top_k), bool)
    al, w_sorted, block_m = ffn_lib.plan(ids, kept, weights, e, self.BACKEND)
    outs = {}
    for split in ("1", "0"):
      monkeypatch.setenv(gmm_lib.ACT_BWD_SPLIT_ENV, split)
      d_pre, dwp = jax.jit(lambda dy, dn, w, pre: ffn_lib.act_bwd_stage(
          dy, dn, al, w, pre, block_m, "swiglu", self.BACKEND, impl="fused"))(
              dy, down, w_sorted, pre)
      outs[split] = (np.asarray(d_pre.astype(jnp.float32)),
                     np.asarray(dwp).sum(-1))
    if autotune == "0":
      for a, b in zip(outs["1"], outs["0"]):
        assert np.array_equal(a, b)
    else:
      for a, b in zip(outs["1"], outs["0"]):
        helpers.assert_close(a, b, BF16, kind="grad")
    # The default two-pass path rounds g to bf16 once: bf16 tolerance.
    d_pre, dwp = jax.jit(lambda dy, dn, w, pre: ffn_lib.act_bwd_stage(
        dy, dn, al, w, pre, block_m, "swiglu", self.BACKEND, impl="two_pass"))(
            dy, down, w_sorted, pre)
    helpers.assert_close(np.asarray(d_pre.astype(jnp.float32)), outs["1"][0], BF16,
                         kind="grad", err_msg="two-pass d_pre")
    helpers.assert_close(np.asarray(dwp).sum(-1), outs["1"][1], BF16, kind="grad",
                         err_msg="two-pass dw")

  @pytest.mark.parametrize(
      "t,d,f,e,top_k",
      [(8192, 4096, 14336, 8, 2), (8192, 2048, 1408, 64, 6), (4096, 1024, 512, 256, 8),
       (4096, 768, 3072, 8, 2)],
  )
  def test_moe_shapes_bf16(self, t, d, f, e, top_k):
    rng = helpers.rng_for(f"ffn-{t}-{d}-{f}-{e}-{top_k}")
    keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 5)
    x = jax.random.normal(keys[0], (t, d), jnp.bfloat16)
    up = (jax.random.normal(keys[1], (e, d, 2 * f)) / np.sqrt(d)).astype(jnp.bfloat16)
    down = (jax.random.normal(keys[2], (e, f, d)) / np.sqrt(f)).astype(jnp.bfloat16)
    logits = jax.random.normal(keys[3], (t, e)) + jnp.linspace(0.0, 2.0, e)  # skewed
    probs, ids = jax.lax.top_k(jax.nn.softmax(logits), top_k)
    weights = probs / probs.sum(-1, keepdims=True)
    kept = jnp.ones((t, top_k), bool)
    ct = jax.random.normal(keys[4], (t, d), jnp.float32)
    fn = jax.jit(jax.value_and_grad(
        lambda x, w, u, dn: _loss(
            functools.partial(self._ffn, activation="swiglu"), ct, x, ids, w, kept, u, dn
        ), (0, 1, 2, 3), has_aux=True,
    ))
    (_, y), grads = fn(x, weights, up, down)
    (_, y_ref), grads_ref = jax.jit(jax.value_and_grad(
        lambda x, w, u, dn: _loss(_per_expert_reference, ct, x, ids, w, kept, u, dn),
        (0, 1, 2, 3), has_aux=True,
    ))(x, weights, up, down)
    helpers.assert_close(y, y_ref, BF16, err_msg="y")
    names = ("x", "weights", "up_kernel", "down_kernel")
    for name, got, want in zip(names, grads, grads_ref):
      helpers.assert_close(got, want, BF16, kind="grad", err_msg=f"d_{name}")
    (_, y2), grads2 = fn(x, weights, up, down)
    assert np.array_equal(np.asarray(y), np.asarray(y2)), "y not bit-identical"
    for a, b in zip(grads, grads2):
      assert np.array_equal(np.asarray(a), np.asarray(b)), "grads not bit-identical"
