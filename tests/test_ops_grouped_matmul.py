"""Tests of `jmoe.ops.grouped_matmul` (Triton `jax.lax.ragged_dot`) and `ops.align`.

`GroupedMatmulTestBase` holds every check once with a `BACKEND` attribute:
`TestGroupedMatmulInterpret` runs it under Triton's interpreter on the CPU
(small odd shapes), `TestGroupedMatmulTriton` (marked `gpu`) on the GPU with
large MoE shapes added. The op is compared with `jax.lax.ragged_dot` in
float32 at HIGHEST precision (forward and both gradients), and that with the
float64 numpy loop `oracle.ragged_dot`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import jax.test_util  # noqa: F401
import ml_dtypes
import numpy as np
import pytest

import helpers
import oracle
from jmoe.ops import align as align_lib
from jmoe.ops import grouped_matmul as gmm_lib

BF16 = ml_dtypes.bfloat16

# (m, k, n, g, sizes) with sizes as in `_group_sizes`: odd widths, empty groups,
# one group with every row, a total below m, one row.
SHAPES = (
    (1, 20, 7, 3, "one"),
    (37, 40, 24, 4, "zeros"),
    (50, 33, 70, 5, "under"),
    (70, 48, 33, 1, "all"),
)
DTYPES = (np.float32, BF16)


def _group_sizes(rng, m: int, g: int, kind: str) -> np.ndarray:
  """`[g]` int32: "all"/"random" sum to m, "under" < m, "zeros" with two empty
  groups (g > 2), "one" every row in the middle group."""
  if kind == "one":
    sizes = np.zeros(g, np.int64)
    sizes[g // 2] = m
    return sizes.astype(np.int32)
  total = m if kind != "under" else m - 1 - m // 4
  probs = np.ones(g)
  if kind == "zeros" and g > 2:
    probs[rng.choice(g, size=2, replace=False)] = 0.0
  return rng.multinomial(total, probs / probs.sum()).astype(np.int32)


def _ragged_dot_f32(lhs, rhs, sizes):
  return jax.lax.ragged_dot(
      jnp.asarray(lhs, jnp.float32), jnp.asarray(rhs, jnp.float32), sizes,
      precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32,
  )


class GroupedMatmulTestBase:
  """Every grouped_matmul check, run by the subclasses with their `BACKEND`."""

  BACKEND: str = ""

  def _gmm(self, lhs, rhs, sizes, **kw):
    return gmm_lib.grouped_matmul(lhs, rhs, sizes, backend=self.BACKEND, **kw)

  @pytest.mark.parametrize("dtype", DTYPES)
  @pytest.mark.parametrize("m,k,n,g,kind", SHAPES)
  def test_matches_ragged_dot(self, rng, m, k, n, g, kind, dtype):
    lhs = helpers.normal(rng, (m, k), dtype)
    rhs = helpers.normal(rng, (g, k, n), dtype)
    sizes = _group_sizes(rng, m, g, kind)
    d_out = helpers.normal(rng, (m, n), np.float32)

    def loss(fn, lhs, rhs):
      out = fn(lhs, rhs, sizes)
      return jnp.sum(out.astype(jnp.float32) * d_out), out

    (_, out), grads = jax.jit(
        jax.value_and_grad(functools.partial(loss, self._gmm), (0, 1), has_aux=True)
    )(lhs, rhs)
    assert out.shape == (m, n) and out.dtype == dtype
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    (_, expected), want = jax.value_and_grad(
        functools.partial(loss, _ragged_dot_f32), (0, 1), has_aux=True
    )(f32(lhs), f32(rhs))
    helpers.assert_close(out, expected, dtype)
    helpers.assert_close(out, oracle.ragged_dot(lhs, rhs, sizes), dtype, err_msg="oracle")
    total = int(np.sum(sizes))
    assert np.all(np.asarray(out)[total:] == 0), "rows past sum(group_sizes) must be 0"
    for name, got, ref in zip(("lhs", "rhs"), grads, want):
      assert got.dtype == dtype, name
      helpers.assert_close(got, ref, dtype, kind="grad", err_msg=f"d_{name}")

  @pytest.mark.parametrize("m,k,n,g,kind", [(37, 40, 24, 4, "zeros"), (50, 48, 72, 5, "under"),
                                             (70, 16, 40, 1, "all"), (29, 56, 8, 3, "one")])
  def test_tma_modes(self, rng, monkeypatch, launched, m, k, n, g, kind):
    # bf16 with k, n multiples of 8: both operands by TMA (the forward and
    # d_lhs have no row gather), one program per SM ("persistent") or per work
    # item ("tiles"), against cp.async loads ("off"): K tails, partial column
    # blocks, a last tile past m. Same numbers (bit for bit under the
    # interpreter), rows past the groups zero, within the bf16 bound of the
    # float32 ragged_dot.
    lhs = helpers.normal(rng, (m, k), BF16)
    rhs = helpers.normal(rng, (g, k, n), BF16)
    sizes = _group_sizes(rng, m, g, kind)
    d_out = helpers.normal(rng, (m, n), BF16)

    # The (B_TMA, PERSISTENT, FLATTEN) of every plain-kernel launch each
    # variant traces: the switch must reach the kernel, not just the env.
    def plain_flags():
      return {(kw["B_TMA"], kw["PERSISTENT"], kw["FLATTEN"])
              for name, kw in launched if name == "jmoe_grouped_matmul"}

    def run():
      launched.clear()
      out, vjp = jax.vjp(lambda a, b: self._gmm(a, b, sizes), lhs, rhs)
      return [np.asarray(v.astype(jnp.float32)) for v in (out, *vjp(d_out))]

    outs, flags = {}, {}
    for mode in gmm_lib.GEMM_TMA_MODES:
      monkeypatch.setenv(gmm_lib.GEMM_TMA_ENV, mode)
      outs[mode] = run()
      flags[mode] = plain_flags()
    # Persistent with the item and K loops kept apart (JMOE_GEMM_FLATTEN=0).
    # JMOE_GEMM_TMA goes back to "auto" first: left at the loop's last mode
    # ("off") this variant used to re-run "off" instead of the nested loop.
    monkeypatch.setenv(gmm_lib.GEMM_TMA_ENV, "auto")
    monkeypatch.setenv(gmm_lib.GEMM_FLATTEN_ENV, "0")
    outs["nested"] = run()
    flags["nested"] = plain_flags()
    assert flags == {"auto": {(True, True, True)}, "persistent": {(True, True, True)},
                     "tiles": {(True, False, False)}, "off": {(False, False, False)},
                     "nested": {(True, True, False)}}, flags
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    expected, vjp = jax.vjp(lambda a, b: _ragged_dot_f32(a, b, sizes), f32(lhs), f32(rhs))
    want = (expected, *vjp(f32(d_out)))
    total = int(np.sum(sizes))
    for mode in ("auto", "persistent", "tiles", "nested"):
      assert np.all(outs[mode][0][total:] == 0), mode
      helpers.assert_variant_matches(outs[mode], outs["off"], want, BF16, self.BACKEND,
                                     ("out", "lhs", "rhs"), f"{mode}: ")

  def test_tma_flags(self, monkeypatch):
    # TMA only for 16-bit operands whose strides are multiples of 16 bytes; an
    # unknown JMOE_GEMM_TMA value is an error naming the variable.
    from jmoe.ops._call import persistent_programs  # pylint: disable=import-outside-toplevel

    monkeypatch.delenv(gmm_lib.GEMM_TMA_ENV, raising=False)
    flags = functools.partial(gmm_lib.tma_flags, backend=self.BACKEND, num_groups=5)
    sms = persistent_programs(self.BACKEND)
    monkeypatch.delenv(gmm_lib.GEMM_FLATTEN_ENV, raising=False)
    assert flags("plain", dtype=BF16, strides_b=(64, 8, 1), a_rows=9, stride_am=8) == {
        "B_TMA": True, "NUM_GROUPS": 5, "A_TMA": True, "ROWS_A": 9,
        "PERSISTENT": True, "NUM_PROGRAMS": sms, "FLATTEN": True}
    assert flags("plain", dtype=BF16, strides_b=(64, 1, 8), a_rows=None, stride_am=8) == {
        "B_TMA": True, "NUM_GROUPS": 5, "A_TMA": False, "ROWS_A": 0,
        "PERSISTENT": True, "NUM_PROGRAMS": sms, "FLATTEN": False}
    monkeypatch.setenv(gmm_lib.GEMM_FLATTEN_ENV, "0")
    assert not flags("plain", dtype=BF16, strides_b=(64, 8, 1), a_rows=9,
                     stride_am=8)["FLATTEN"]
    monkeypatch.delenv(gmm_lib.GEMM_FLATTEN_ENV)
    off = {"B_TMA": False, "NUM_GROUPS": 0, "PERSISTENT": False, "NUM_PROGRAMS": 0,
           "A_TMA": False, "ROWS_A": 0}
    # "auto": the act kernel gathering its rows and act_bwd by cp.async
    # (measured faster); the act kernel on a sorted copy as the plain kernel.
    assert flags("act", dtype=BF16, strides_b=(64, 8, 1), a_rows=None, stride_am=8) == off
    assert flags("act", dtype=BF16, strides_b=(64, 8, 1), a_rows=9, stride_am=8) == {
        "B_TMA": True, "NUM_GROUPS": 5, "A_TMA": True, "ROWS_A": 9,
        "PERSISTENT": True, "NUM_PROGRAMS": sms}
    assert flags("act_bwd", dtype=BF16, strides_b=(64, 1, 8), a_rows=None,
                 stride_am=8) == {"B_TMA": False, "NUM_GROUPS": 0}
    monkeypatch.setenv(gmm_lib.GEMM_TMA_ENV, "persistent")
    assert flags("act_bwd", dtype=np.float16, strides_b=(64, 1, 8), a_rows=None,
                 stride_am=8) == {"B_TMA": True, "NUM_GROUPS": 5}
    assert flags("act", dtype=BF16, strides_b=(64, 8, 1), a_rows=None, stride_am=8) == {
        **off, "B_TMA": True, "NUM_GROUPS": 5, "PERSISTENT": True, "NUM_PROGRAMS": sms}
    assert flags("act", dtype=np.float32, strides_b=(64, 8, 1), a_rows=None,
                 stride_am=8) == off
    assert flags("act", dtype=BF16, strides_b=(63, 7, 1), a_rows=None, stride_am=8) == off
    assert not flags("plain", dtype=BF16, strides_b=(64, 8, 1), a_rows=9,
                     stride_am=12)["A_TMA"]
    monkeypatch.setenv(gmm_lib.GEMM_TMA_ENV, "tiles")
    assert flags("act", dtype=BF16, strides_b=(64, 8, 1), a_rows=None, stride_am=8) == {
        **off, "B_TMA": True, "NUM_GROUPS": 5}
    monkeypatch.setenv(gmm_lib.GEMM_TMA_ENV, "off")
    assert flags("act", dtype=BF16, strides_b=(64, 8, 1), a_rows=None, stride_am=8) == off
    # Per-kind modes: the named kinds change, the others keep "auto".
    monkeypatch.setenv(gmm_lib.GEMM_TMA_ENV, "act=tiles+act_bwd=tiles")
    assert flags("act", dtype=BF16, strides_b=(64, 8, 1), a_rows=None, stride_am=8) == {
        **off, "B_TMA": True, "NUM_GROUPS": 5}
    assert flags("act_bwd", dtype=BF16, strides_b=(64, 1, 8), a_rows=None,
                 stride_am=8) == {"B_TMA": True, "NUM_GROUPS": 5}
    assert flags("plain", dtype=BF16, strides_b=(64, 8, 1), a_rows=9, stride_am=8)[
        "PERSISTENT"]
    monkeypatch.setenv(gmm_lib.GEMM_TMA_ENV, "plain=off")
    assert flags("plain", dtype=BF16, strides_b=(64, 8, 1), a_rows=9, stride_am=8) == {
        **off, "FLATTEN": False}
    for bad in ("on", "act=auto", "up=tiles", "act=tiles,plain=off"):
      monkeypatch.setenv(gmm_lib.GEMM_TMA_ENV, bad)
      with pytest.raises(ValueError, match="JMOE_GEMM_TMA must be one of"):
        flags("act", dtype=BF16, strides_b=(64, 8, 1), a_rows=None, stride_am=8)

  @pytest.mark.parametrize("dtype", [BF16, np.float32])
  def test_gather_rows(self, rng, dtype):
    # The sorted copy of JMOE_GATHER_ROWS=copy: out[r] = a[index[r]], zero rows
    # for indices outside [0, t); odd sizes leave partial row and column
    # blocks; every element is written (outputs start poisoned in the
    # interpreter).
    a = helpers.normal(rng, (13, 1037), dtype)
    index = rng.integers(0, 13, 45).astype(np.int32)
    index[[3, 17, 44]] = (-1, 13, 99)
    got = jax.jit(functools.partial(gmm_lib.gather_rows, backend=self.BACKEND))(
        jnp.asarray(a), jnp.asarray(index))
    valid = (index >= 0) & (index < 13)
    want = np.where(valid[:, None], a[np.clip(index, 0, 12)], 0).astype(a.dtype)
    np.testing.assert_array_equal(np.asarray(got), want)

  def test_config_overrides(self, monkeypatch):
    # JMOE_GEMM_CONFIG replaces fields of one kind's pinned GPU config; the
    # interpreter's config stays; malformed values are errors naming the variable.
    monkeypatch.setenv(gmm_lib.GEMM_CONFIG_ENV, "act:block_k=64,num_stages=3+plain:group_m=16")
    base = functools.partial(gmm_lib._pinned_config, block_m=128, n=1408,
                             backend="triton", gated=True)
    cfg = functools.partial(gmm_lib.default_config, block_m=128, n=1408, k=2048,
                            backend="triton", gated=True)
    assert cfg("act") == dataclasses.replace(base("act"), block_k=64, num_stages=3)
    assert cfg("plain") == dataclasses.replace(base("plain"), group_m=16)
    assert cfg("act_bwd") == base("act_bwd")
    assert gmm_lib.default_config("act", 16, 40, 40, "interpret") == gmm_lib.INTERPRET_CONFIG
    for bad in ("act", "act:", "up:block_k=64", "act:block_m=64", "act:block_k=0",
                "act:block_k=x", "act:block_k=64=1"):
      monkeypatch.setenv(gmm_lib.GEMM_CONFIG_ENV, bad)
      with pytest.raises(ValueError, match="JMOE_GEMM_CONFIG must be items"):
        gmm_lib.config_overrides("act")
    monkeypatch.setenv(gmm_lib.GEMM_CONFIG_ENV, "")
    assert cfg("act") == base("act")

  def test_tgmm_config_overrides(self, monkeypatch):
    # The `tgmm` item replaces TgmmConfig fields of the weight gradients' pinned
    # GPU config (and pins it where it would autotune); GemmConfig-only fields
    # are errors for it, and its fields for the other kinds.
    from jmoe.ops.tgmm import TgmmConfig  # pylint: disable=import-outside-toplevel

    monkeypatch.setenv(gmm_lib.GEMM_CONFIG_ENV, "tgmm:group_size=32,num_stages=4")
    assert gmm_lib.tgmm_config("triton", 16384, 8, tma=True) == TgmmConfig(
        group_size=32, num_stages=4)
    assert gmm_lib.tgmm_config("triton", 4096, 8) == TgmmConfig(
        64, 128, 128, 32, 4, 4)
    assert gmm_lib.tgmm_config("interpret", 4096, 8) is None
    assert gmm_lib.default_config("plain", 128, 512, 512, "triton") == (
        gmm_lib._pinned_config("plain", 128, 512, "triton", False))
    monkeypatch.setenv(gmm_lib.GEMM_CONFIG_ENV, "")
    assert gmm_lib.tgmm_config("triton", 16384, 8, tma=True) == TgmmConfig()
    assert gmm_lib.tgmm_config("triton", 16384, 8) is None  # autotuned
    for bad in ("tgmm:group_m=16", "plain:group_size=16", "tgmm:split_n=2",
                "tgmm:group_size=0"):
      monkeypatch.setenv(gmm_lib.GEMM_CONFIG_ENV, bad)
      with pytest.raises(ValueError, match="JMOE_GEMM_CONFIG must be items"):
        gmm_lib.config_overrides("tgmm")

  @pytest.mark.parametrize("use_jit", [False, True])
  def test_every_element_written(self, rng, use_jit):
    # Under "interpret" outputs start as NaN: an unwritten row stays NaN. Rows
    # past the groups' total must be exact zeros.
    m, k, n = 45, 40, 35
    lhs = helpers.normal(rng, (m, k), np.float32)
    rhs = helpers.normal(rng, (6, k, n), np.float32)
    sizes = np.array([0, 12, 0, 20, 3, 0], np.int32)
    fn = jax.jit(self._gmm) if use_jit else self._gmm
    out = np.asarray(fn(lhs, rhs, sizes))
    assert np.isfinite(out).all(), f"{np.isnan(out).sum()} unwritten elements"
    assert np.all(out[35:] == 0)
    helpers.assert_close(out, oracle.ragged_dot(lhs, rhs, sizes), np.float32)

  def test_sizes_past_m_are_clipped(self, rng):
    lhs = helpers.normal(rng, (30, 20), np.float32)
    rhs = helpers.normal(rng, (3, 20, 9), np.float32)
    sizes = np.array([10, 25, 7], np.int32)
    out = self._gmm(lhs, rhs, sizes)
    expected = oracle.ragged_dot(lhs, rhs, np.array([10, 20, 0], np.int32))
    helpers.assert_close(out, expected, np.float32)

  @pytest.mark.parametrize(
      "dtype,out_dtype", [(BF16, jnp.float32), (np.float32, jnp.bfloat16),
                          (np.float16, jnp.float16)]
  )
  def test_preferred_element_type(self, rng, dtype, out_dtype):
    lhs = helpers.normal(rng, (37, 40), dtype)
    rhs = helpers.normal(rng, (4, 40, 24), dtype)
    sizes = _group_sizes(rng, 37, 4, "zeros")
    out = jax.jit(functools.partial(self._gmm, preferred_element_type=out_dtype))(
        lhs, rhs, sizes
    )
    assert out.dtype == out_dtype
    want = dtype if np.dtype(out_dtype).itemsize == 4 else out_dtype
    helpers.assert_close(out, oracle.ragged_dot(lhs, rhs, sizes), want)

  def test_finite_differences_float32(self, rng):
    lhs = helpers.normal(rng, (9, 5), np.float32)
    rhs = helpers.normal(rng, (3, 5, 4), np.float32)
    sizes = np.array([3, 0, 5], np.int32)
    eps, atol, rtol = helpers.CHECK_GRADS["float32"]
    jax.test_util.check_grads(
        lambda a, b: self._gmm(a, b, sizes), (lhs, rhs), 1, modes=("rev",),
        eps=eps, atol=atol, rtol=rtol,
    )

  def test_vmap_and_checkpoint(self, rng):
    lhs = helpers.normal(rng, (2, 21, 16), np.float32)
    rhs = helpers.normal(rng, (3, 16, 10), np.float32)
    sizes = np.array([[5, 0, 16], [7, 7, 7]], np.int32)
    out = jax.jit(jax.vmap(self._gmm, in_axes=(0, None, 0)))(lhs, rhs, sizes)
    for b in range(2):
      helpers.assert_close(out[b], oracle.ragged_dot(lhs[b], rhs, sizes[b]), np.float32)
    f = jax.checkpoint(lambda a, b: jnp.sum(self._gmm(a, b, sizes[0]) ** 2))
    g = jax.grad(f, (0, 1))(lhs[0], rhs)
    g_ref = jax.grad(lambda a, b: jnp.sum(_ragged_dot_f32(a, b, sizes[0]) ** 2), (0, 1))(
        lhs[0], rhs
    )
    for got, ref in zip(g, g_ref):
      helpers.assert_close(got, ref, np.float32, kind="grad")

  def test_errors(self, rng):
    lhs = helpers.normal(rng, (8, 5), np.float32)
    rhs = helpers.normal(rng, (2, 5, 3), np.float32)
    sizes = np.array([3, 5], np.int32)
    cases = [
        ((lhs[0], rhs, sizes), {}, ValueError, r"lhs must have shape \[m, k\]"),
        ((lhs, rhs[:, :4], sizes), {}, ValueError, r"rhs must have shape \[g, k=5, n\]"),
        ((lhs, rhs, sizes[:1]), {}, ValueError, r"group_sizes must be an int32 array"),
        ((lhs, rhs, sizes.astype(np.float32)), {}, ValueError, "group_sizes must be"),
        ((lhs.astype(np.int32), rhs, sizes), {}, TypeError, "lhs must be float32"),
        ((lhs, rhs, sizes), {"preferred_element_type": jnp.int8}, TypeError,
         "preferred_element_type must be"),
    ]
    for args, kwargs, error, pattern in cases:
      with pytest.raises(error, match=pattern):
        jax.jit(functools.partial(self._gmm, **kwargs))(*args)


  @pytest.mark.parametrize("t,top_k,e,block_m", [(37, 2, 5, 16), (50, 8, 64, 16),
                                                 (13, 3, 1, 64), (300, 2, 256, 128),
                                                 (700, 4, 16, 16), (2999, 6, 64, 128)])
  def test_triton_align_matches_xla(self, rng, t, top_k, e, block_m):
    if self.BACKEND == "interpret" and t * top_k > 4096:
      pytest.skip("GPU size (18 blocks of 1024 there); the interpreter would run "
                  "65 x 282 programs one by one")
    ids = np.stack([rng.permutation(max(e, top_k))[:top_k] % e for _ in range(t)])
    ids = ids.astype(np.int32)
    kept = rng.random((t, top_k)) > 0.3
    ids[rng.random((t, top_k)) < 0.05] = e + 3  # out of range: dropped
    weights = rng.random((t, top_k)).astype(np.float32)
    want = jax.jit(align_lib.align, static_argnums=(2, 3))(ids, kept, e, block_m)
    got, w_sorted = jax.jit(align_lib.align_triton, static_argnums=(3, 4, 5))(
        ids, kept, weights, e, block_m, self.BACKEND
    )
    for name, a, b in zip(want._fields, got, want):
      helpers.assert_equal(a, b, err_msg=name)
    helpers.assert_equal(w_sorted, weights.reshape(-1)[np.asarray(want.order)])


class TestGroupedMatmulInterpret(GroupedMatmulTestBase):
  BACKEND = "interpret"

  def test_bad_backend(self, rng):
    lhs = helpers.normal(rng, (4, 5), np.float32)
    rhs = helpers.normal(rng, (1, 5, 3), np.float32)
    with pytest.raises(ValueError, match="backend must be 'triton' or 'interpret'"):
      gmm_lib.grouped_matmul(lhs, rhs, np.array([4], np.int32), backend="reference")


class TestAlign:
  """The tile schedule and slot order (plain XLA ops, checked against numpy)."""

  def test_docstring_example(self):
    ids = np.array([[1, 0], [0, 1], [1, 0]], np.int32)
    al = align_lib.align(jnp.asarray(ids), jnp.ones((3, 2), bool), 2, 2)
    helpers.assert_equal(al.order, [1, 2, 5, 0, 3, 4])
    helpers.assert_equal(al.token, [0, 1, 2, 0, 1, 2])
    helpers.assert_equal(al.group_sizes, [3, 3])
    helpers.assert_equal(al.pos, [[3, 0], [1, 4], [5, 2]])
    helpers.assert_equal(
        al.tiles, [[0, 0, 1, 1, -1], [0, 2, 3, 5, 6], [2, 3, 5, 6, 6]]
    )

  @pytest.mark.parametrize("t,top_k,e,block_m", [(37, 2, 5, 4), (50, 8, 64, 16),
                                                 (13, 3, 1, 16), (1, 1, 3, 8)])
  def test_schedule_covers_every_row_once(self, rng, t, top_k, e, block_m):
    ids = np.stack([rng.permutation(max(e, top_k))[:top_k] % e for _ in range(t)])
    kept = rng.random((t, top_k)) > 0.3
    ids[rng.random((t, top_k)) < 0.05] = e + 3  # out of range: dropped
    al = jax.jit(align_lib.align, static_argnums=(2, 3))(ids, kept, e, block_m)
    valid = kept & (ids >= 0) & (ids < e)
    tk = t * top_k
    assert al.tiles.shape == (3, -(-tk // block_m) + e)
    sizes = np.bincount(ids[valid], minlength=e)
    helpers.assert_equal(al.group_sizes, sizes)
    order, pos = np.asarray(al.order), np.asarray(al.pos)
    for i in range(t):
      for j in range(top_k):
        if valid[i, j]:
          assert order[pos[i, j]] == i * top_k + j
        else:
          assert pos[i, j] == -1
    starts = np.concatenate([[0], np.cumsum(sizes)])
    owner = np.full(tk, -2)
    for ex, st, en in np.asarray(al.tiles).T:
      assert en - st <= block_m
      for r in range(st, en):
        assert owner[r] == -2, f"row {r} in two tiles"
        owner[r] = ex
        if ex >= 0:
          assert starts[ex] <= r < starts[ex + 1]
          assert ids.reshape(-1)[order[r]] == ex
        else:
          assert r >= starts[-1]
    assert np.all(owner != -2), "rows not covered by any tile"


@pytest.mark.gpu
class TestGroupedMatmulTriton(GroupedMatmulTestBase):
  BACKEND = "triton"

  @pytest.mark.parametrize(
      "m,k,n,g", [(16384, 4096, 14336, 8), (49152, 2048, 1408, 64), (8192, 1536, 768, 256)]
  )
  def test_moe_shapes_bf16(self, m, k, n, g):
    rng = helpers.rng_for(f"gmm-{m}-{k}-{n}-{g}")
    k1, k2, k3 = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 3)
    lhs = jax.random.normal(k1, (m, k), jnp.bfloat16)
    rhs = (jax.random.normal(k2, (g, k, n), jnp.float32) / np.sqrt(k)).astype(jnp.bfloat16)
    w = rng.lognormal(0.0, 1.0, size=g)
    w[rng.choice(g, size=min(2, g - 1), replace=False)] = 0.0
    sizes = np.floor(w / w.sum() * (m - 5)).astype(np.int32)
    sizes = jnp.asarray(sizes)
    fn = jax.jit(self._gmm)
    out = fn(lhs, rhs, sizes)
    expected = jax.lax.ragged_dot(lhs, rhs, sizes, preferred_element_type=jnp.float32)
    helpers.assert_close(out, expected, BF16)
    total = int(np.sum(sizes))
    assert np.all(np.asarray(out[total:]) == 0)
    again = fn(lhs, rhs, sizes)
    assert np.array_equal(np.asarray(out), np.asarray(again)), "not bit-identical"
    d_out = jax.random.normal(k3, (m, n), jnp.bfloat16)
    _, vjp = jax.vjp(lambda a, b: self._gmm(a, b, sizes), lhs, rhs)
    _, vjp_ref = jax.vjp(
        lambda a, b: jax.lax.ragged_dot(a, b, sizes, preferred_element_type=jnp.float32),
        lhs, rhs,
    )
    for name, got, ref in zip(("lhs", "rhs"), vjp(d_out), vjp_ref(d_out.astype(jnp.float32))):
      helpers.assert_close(got, ref, BF16, kind="grad", err_msg=name)
