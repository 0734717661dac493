"""Tests of `jmoe.ops.tgmm` (transposed grouped GEMM, the MoE weight gradient).

`TgmmTestBase` holds every check once, with a `BACKEND` attribute:
`TestTgmmInterpret` runs it under Triton's interpreter on the CPU (small, odd
shapes), `TestTgmmTriton` (marked `gpu`, skipped without CUDA) on the GPU, with
the MoE benchmark shapes added. The kernel is compared with `tgmm_reference`
(float32, HIGHEST precision), and the reference with a float64 numpy loop
(`_oracle`), which shares no code with either.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.test_util  # noqa: F401
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import helpers
import sm90
from jmoe.ops import tgmm as tgmm_lib
from jmoe.ops.tgmm import GATHER_MODES, ROW_SCALE_MODES, TgmmConfig, tgmm, tgmm_reference

BF16 = ml_dtypes.bfloat16

# (m, ka, n, g, sizes): `sizes` names how rows are split into groups (see
# `_group_sizes`). Every value of m {1, 37, 130}, ka {5, 48}, n {3, 33},
# g {1, 4, 9} appears, with empty groups, one full group, and sum < m.
SHAPES = (
    (1, 5, 3, 1, "all"),
    (1, 48, 33, 4, "one"),
    (37, 5, 33, 1, "under"),
    (37, 48, 3, 4, "random"),
    (37, 48, 33, 9, "zeros"),
    (130, 5, 3, 9, "under"),
    (130, 48, 33, 4, "one"),
    (130, 48, 33, 9, "zeros"),
)
# Shapes for the TMA kernel (ka and n multiples of 16), every split kind.
TMA_SHAPES = (
    (1, 16, 16, 1, "all"),
    (37, 32, 16, 1, "under"),
    (37, 48, 32, 4, "random"),
    (130, 16, 48, 9, "zeros"),
    (130, 48, 32, 4, "one"),
)
# (JMOE_TGMM_TMA_BOUNDED, JMOE_TGMM_TMA_STORE) of the TMA kernel.
TMA_SWITCHES = (("0", "0"), ("1", "0"), ("1", "1"))
# (a_row_index, b_row_index, row_scale) present?
OPTIONS = ((False, False, False), (True, True, True))
DTYPES = (np.float32, BF16)


def _group_sizes(rng, m: int, g: int, kind: str) -> np.ndarray:
  """Group sizes `[g]` int32 for `m` rows.

  kind: "all" (every row, one group per row split at random), "random" (sum m),
  "under" (sum < m), "zeros" (sum m, at least two empty groups when g > 2),
  "one" (all m rows in one middle group, the others empty).
  """
  if kind == "one":
    sizes = np.zeros(g, np.int64)
    sizes[g // 2] = m
    return sizes.astype(np.int32)
  total = {"all": m, "random": m, "zeros": m, "under": max(m - 1 - m // 4, 0)}[kind]
  probs = np.ones(g)
  if kind == "zeros" and g > 2:
    probs[rng.choice(g, size=2, replace=False)] = 0.0
  return rng.multinomial(total, probs / probs.sum()).astype(np.int32)


def _inputs(rng, m, ka, n, g, kind, dtype, options):
  """`(a, b, group_sizes, kwargs)` with fresh random data (never zeros)."""
  has_ai, has_bi, has_s = options
  ma = m + 3 if has_ai else m
  mb = m + 5 if has_bi else m
  a = helpers.normal(rng, (ma, ka), dtype)
  b = helpers.normal(rng, (mb, n), dtype)
  sizes = _group_sizes(rng, m, g, kind)
  kwargs = {}
  if has_ai:
    kwargs["a_row_index"] = rng.integers(0, ma, size=m).astype(np.int32)
  if has_bi:
    kwargs["b_row_index"] = rng.integers(0, mb, size=m).astype(np.int32)
  if has_s:
    kwargs["row_scale"] = rng.uniform(0.1, 1.0, size=m).astype(np.float32)
  return a, b, sizes, kwargs


def _oracle(a, b, group_sizes, *, a_row_index=None, b_row_index=None,
            row_scale=None) -> np.ndarray:
  """float64 loop over groups and rows: `out[gi] = sum_r A_r^T (s_r B_r)`."""
  a = np.asarray(a).astype(np.float64)
  b = np.asarray(b).astype(np.float64)
  m = a.shape[0] if a_row_index is None else len(a_row_index)
  out = np.zeros((len(group_sizes), a.shape[1], b.shape[1]))
  r = 0
  for gi, size in enumerate(np.asarray(group_sizes)):
    for _ in range(max(int(size), 0)):
      if r >= m:
        break
      a_r = a[r if a_row_index is None else a_row_index[r]]
      b_r = b[r if b_row_index is None else b_row_index[r]]
      s_r = 1.0 if row_scale is None else float(row_scale[r])
      out[gi] += np.outer(a_r, s_r * b_r)
      r += 1
  return out


class TgmmTestBase:
  """Every tgmm check, run by the subclasses with their `BACKEND`."""

  BACKEND: str = ""
  CONFIG: TgmmConfig | None = None  # None: the backend's default (autotune)

  def _tgmm(self, *args, **kwargs):
    kwargs.setdefault("config", self.CONFIG)
    return tgmm(*args, backend=self.BACKEND, **kwargs)

  @pytest.mark.parametrize("options", OPTIONS)
  @pytest.mark.parametrize("dtype", DTYPES)
  @pytest.mark.parametrize("m,ka,n,g,kind", SHAPES)
  def test_matches_reference(self, rng, m, ka, n, g, kind, dtype, options):
    a, b, sizes, kw = _inputs(rng, m, ka, n, g, kind, dtype, options)
    out = jax.jit(functools.partial(self._tgmm, **kw))(a, b, sizes)
    assert out.shape == (g, ka, n) and out.dtype == jnp.float32
    expected = tgmm_reference(a, b, sizes, **kw)
    helpers.assert_close(out, expected, dtype)
    helpers.assert_close(out, _oracle(a, b, sizes, **kw), dtype, err_msg="oracle")
    empty = np.asarray(sizes) == 0
    assert np.all(np.asarray(out)[empty] == 0), "groups without rows must be 0"

  @pytest.mark.parametrize("use_jit", [False, True])
  def test_every_element_written(self, rng, use_jit):
    # With "interpret", outputs start as NaN; a missed tile would stay NaN.
    # Zero-row groups (two of them) must be written as exact zeros.
    m, ka, n, g = 70, 40, 35, 6
    a, b, _, kw = _inputs(rng, m, ka, n, g, "random", np.float32, (True, False, True))
    sizes = np.array([0, 30, 0, 25, 15, 0], np.int32)
    fn = functools.partial(self._tgmm, **kw)
    out = np.asarray((jax.jit(fn) if use_jit else fn)(a, b, sizes))
    assert np.isfinite(out).all(), f"{np.isnan(out).sum()} unwritten elements"
    assert np.all(out[[0, 2, 5]] == 0)
    helpers.assert_close(out, _oracle(a, b, sizes, **kw), np.float32)

  def test_sum_over_m_is_clipped(self, rng):
    m, ka, n = 37, 48, 33
    a, b, _, _ = _inputs(rng, m, ka, n, 4, "random", np.float32, OPTIONS[0])
    sizes = np.array([10, 20, 30, 5], np.int32)  # 65 > 37: rows 30..36 in group 2
    out = self._tgmm(a, b, sizes)
    expected = _oracle(a, b, np.array([10, 20, 7, 0], np.int32))
    helpers.assert_close(out, expected, np.float32)
    assert np.all(np.asarray(out)[3] == 0)

  @pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float16])
  def test_out_dtype(self, rng, out_dtype):
    a, b, sizes, kw = _inputs(rng, 37, 48, 33, 4, "random", BF16, OPTIONS[1])
    out = self._tgmm(a, b, sizes, out_dtype=out_dtype, **kw)
    assert out.dtype == out_dtype
    # The scaled bf16 rows are rounded once (bf16 tolerance against the exact
    # oracle); the output cast adds only the out_dtype rounding.
    out32 = self._tgmm(a, b, sizes, **kw)
    helpers.assert_close(out, out32, out_dtype)
    helpers.assert_close(out, _oracle(a, b, sizes, **kw), BF16)

  def test_is_ragged_dot_rhs_gradient(self, rng):
    m, k, n, g = 37, 48, 33, 4
    lhs = helpers.normal(rng, (m, k), np.float32)
    rhs = helpers.normal(rng, (g, k, n), np.float32)
    d_out = helpers.normal(rng, (m, n), np.float32)
    sizes = _group_sizes(rng, m, g, "under")
    _, vjp = jax.vjp(
        lambda r: jax.lax.ragged_dot(lhs, r, sizes, precision="highest"), rhs)
    (expected,) = vjp(d_out)
    helpers.assert_close(self._tgmm(lhs, d_out, sizes), expected, np.float32)

  def _each_mode(self, option, modes, a, b, sizes, kw, dtype):
    """`{mode: tgmm(..., option=mode)}`, each checked against the oracle."""
    outs = {}
    for mode in modes:
      fn = jax.jit(functools.partial(self._tgmm, **{option: mode}, **kw))
      outs[mode] = np.asarray(fn(a, b, sizes))
      helpers.assert_close(outs[mode], _oracle(a, b, sizes, **kw), dtype,
                           err_msg=mode)
    return outs

  @pytest.mark.parametrize("dtype", DTYPES)
  def test_row_scale_modes(self, rng, dtype):
    # "prescale" (XLA scales and gathers `a`) and "kernel" (the kernel does)
    # form the same float32 products with one rounding, so they agree bit for
    # bit where the kernel rounds like XLA: float32, and bf16 on the GPU (the
    # interpreter keeps the kernel's scaled bf16 tile in float32).
    a, b, sizes, kw = _inputs(rng, 130, 48, 33, 9, "zeros", dtype, OPTIONS[1])
    outs = self._each_mode("row_scale_mode", ROW_SCALE_MODES, a, b, sizes, kw, dtype)
    if dtype == np.float32 or self.BACKEND == "triton":
      np.testing.assert_array_equal(outs["prescale"], outs["kernel"])

  @pytest.mark.parametrize("dtype", DTYPES)
  def test_gather_modes(self, rng, dtype):
    # `a_row_index` gathered by XLA first ("xla", the default) or inside the
    # kernel ("kernel"): the same rows reach the same dots, bit for bit.
    a, b, sizes, kw = _inputs(rng, 130, 48, 33, 9, "zeros", dtype, OPTIONS[1])
    del kw["row_scale"]
    outs = self._each_mode("gather_mode", GATHER_MODES, a, b, sizes, kw, dtype)
    np.testing.assert_array_equal(outs["xla"], outs["kernel"])
    # "xla_columns" feeds the same rows as K-major tiles: same dots, same steps.
    np.testing.assert_array_equal(outs["xla"], outs["xla_columns"])
    # "xla_rows" runs the plain kernel as "xla" (n = 33: no TMA kernel).
    np.testing.assert_array_equal(outs["xla"], outs["xla_rows"])

  @pytest.mark.parametrize("shape", SHAPES, ids=str)
  @pytest.mark.parametrize("copy", ["kernel", "reference"])
  def test_group_columns(self, rng, shape, copy):
    # The transposed, group-padded copy of "xla_columns", against a numpy
    # construction: group gi's rows from column col_offsets[gi] (a multiple of
    # COLUMN_ALIGN), zeros up to the next multiple and in unused columns.
    m, ka, _, g, kind = shape
    a = helpers.normal(rng, (m + 3, ka), BF16)
    index = rng.integers(0, m + 3, size=m).astype(np.int32)
    sizes = _group_sizes(rng, m, g, kind)
    offsets = tgmm_lib.group_offsets(jnp.asarray(sizes), m)
    backend = self.BACKEND if copy == "kernel" else "reference"
    a_t, col_offsets = jax.jit(
        functools.partial(tgmm_lib.group_columns, m=m, backend=backend)
    )(a, index, offsets)
    align = tgmm_lib.COLUMN_ALIGN
    m_pad = -(-(m + g * (align - 1)) // align) * align
    want = np.zeros((ka, m_pad), np.float32)
    start, col = 0, 0
    for gi, size in enumerate(sizes):
      size = min(int(size), m - start)
      assert int(col_offsets[gi]) == col
      want[:, col:col + size] = np.asarray(a, np.float32)[index[start:start + size]].T
      start, col = start + size, col + -(-size // align) * align
    np.testing.assert_array_equal(np.asarray(a_t, np.float32), want)

  @pytest.mark.parametrize("shape", SHAPES[2:6], ids=str)
  @pytest.mark.parametrize("mode", ["xla", "xla_columns", "xla_rows"])
  def test_transpose_out(self, rng, shape, mode):
    # The kernel stores each group's tile transposed: exactly the swapped
    # output of the plain call; gradients (XLA's tgmm_vjp) follow the swap.
    a, b, sizes, kw = _inputs(rng, *shape, BF16, OPTIONS[1])
    del kw["row_scale"]
    fn = functools.partial(self._tgmm, gather_mode=mode, **kw)
    out_t = jax.jit(functools.partial(fn, transpose_out=True))(a, b, sizes)
    assert out_t.shape == (shape[3], shape[2], shape[1])
    np.testing.assert_array_equal(
        np.asarray(out_t), np.swapaxes(np.asarray(jax.jit(fn)(a, b, sizes)), 1, 2))
    ct = helpers.normal(rng, out_t.shape, np.float32)
    a32, b32 = (jnp.asarray(x, jnp.float32) for x in (a, b))

    def grads(f, **extra):
      return jax.grad(lambda x, y: jnp.sum(f(x, y, sizes, **kw, **extra) * ct),
                      (0, 1))(a32, b32)

    got = grads(functools.partial(self._tgmm, gather_mode=mode), transpose_out=True)
    want = grads(tgmm, transpose_out=True, backend="reference")
    for g, w in zip(got, want):
      helpers.assert_close(g, w, np.float32)

  @pytest.mark.parametrize("shape", SHAPES, ids=str)
  @pytest.mark.parametrize("options", OPTIONS, ids=str)
  def test_columns_mode(self, rng, shape, options):
    # Every split of rows (empty groups, one group, rows past the groups) and
    # the row scale (prescaled by XLA, then transposed), fresh data each time.
    a, b, sizes, kw = _inputs(rng, *shape, BF16, options)
    out = self._tgmm(a, b, sizes, gather_mode="xla_columns", **kw)
    helpers.assert_close(out, _oracle(a, b, sizes, **kw), BF16)

  @pytest.mark.parametrize("shape", TMA_SHAPES, ids=str)
  @pytest.mark.parametrize("options", OPTIONS, ids=str)
  @pytest.mark.parametrize("switches", TMA_SWITCHES, ids=str)
  @pytest.mark.parametrize("transpose", [False, True])
  @pytest.mark.parametrize("mode", ["xla_columns", "xla_rows"])
  def test_tma_kernel(self, rng, monkeypatch, launched, shape, options, switches,
                      transpose, mode):
    # The persistent TMA kernel (jmoe.kernels.tgmm_tma) gives exactly the
    # plain columns-mode kernel's numbers (same tiles, same steps; the rows it
    # reads past a group's end meet zero columns of a, or with "xla_rows"
    # zero rows: a's descriptor ends at the group's last row), and the oracle's.
    a, b, sizes, kw = _inputs(rng, *shape, BF16, options)
    kw.pop("b_row_index", None)  # the TMA kernel reads b's rows in order
    b = b[:shape[0]]
    plain_fn = functools.partial(self._tgmm, gather_mode="xla_columns",
                                 transpose_out=transpose, **kw)
    fn = functools.partial(self._tgmm, gather_mode=mode, transpose_out=transpose, **kw)
    monkeypatch.setenv(tgmm_lib.TGMM_KERNEL_ENV, "plain")
    plain = jax.jit(lambda *x: plain_fn(*x))(a, b, sizes)  # fresh: traced with the switch
    monkeypatch.setenv(tgmm_lib.TGMM_KERNEL_ENV, "tma")
    for name, value in zip((tgmm_lib.TMA_BOUNDED_ENV, tgmm_lib.TMA_STORE_ENV), switches):
      monkeypatch.setenv(name, value)
    out = jax.jit(lambda *x: fn(*x))(a, b, sizes)
    assert launched[-1][0] == "jmoe_tgmm_tma", launched[-1][0]
    np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))
    want = _oracle(a, b, sizes, **kw)
    helpers.assert_close(out, np.swapaxes(want, 1, 2) if transpose else want, BF16)

  def test_tma_bounded_reads_no_rows_past_the_groups(self, rng, monkeypatch):
    # Rows of b past sum(group_sizes) hold inf: the bounded kernel never reads
    # them (its per-tile descriptor ends at the group's last row).
    m, ka, n, g = 130, 48, 32, 4
    a, b, _, _ = _inputs(rng, m, ka, n, g, "under", BF16, OPTIONS[0])
    sizes = np.array([30, 0, 41, 20], np.int32)  # 91 of 130 rows
    b = np.asarray(b).copy()
    b[91:] = np.inf
    monkeypatch.setenv(tgmm_lib.TGMM_KERNEL_ENV, "tma")
    monkeypatch.setenv(tgmm_lib.TMA_BOUNDED_ENV, "1")
    out = self._tgmm(a, b, sizes, gather_mode="xla_columns")
    assert np.all(np.isfinite(np.asarray(out)))
    helpers.assert_close(out, _oracle(a, b, sizes), BF16)

  @pytest.mark.parametrize("bounded", ["1", "0"])
  def test_tma_rows_read_no_rows_past_the_groups(self, rng, monkeypatch, bounded):
    # "xla_rows": the bounded operand (b, or a with JMOE_TGMM_TMA_BOUNDED=0)
    # is never read past a group's end: inf in its rows past sum(group_sizes)
    # reaches no dot, and the other operand's rows past a group's end (the
    # next group's) meet zeros.
    m, ka, n, g = 130, 48, 32, 4
    a, b, _, _ = _inputs(rng, m, ka, n, g, "under", BF16, OPTIONS[0])
    sizes = np.array([30, 0, 41, 20], np.int32)  # 91 of 130 rows
    a, b = np.asarray(a).copy(), np.asarray(b).copy()
    (b if bounded == "1" else a)[91:] = np.inf
    monkeypatch.setenv(tgmm_lib.TGMM_KERNEL_ENV, "tma")
    monkeypatch.setenv(tgmm_lib.TMA_BOUNDED_ENV, bounded)
    for transpose in (False, True):
      out = self._tgmm(a, b, sizes, gather_mode="xla_rows", transpose_out=transpose)
      assert np.all(np.isfinite(np.asarray(out)))
      want = _oracle(a, b, sizes)
      helpers.assert_close(out, np.swapaxes(want, 1, 2) if transpose else want, BF16)

  def test_tma_kernel_errors(self, rng, monkeypatch):
    a, b, sizes, _ = _inputs(rng, 37, 48, 33, 4, "random", BF16, OPTIONS[0])
    monkeypatch.setenv(tgmm_lib.TGMM_KERNEL_ENV, "tma")
    with pytest.raises(ValueError, match="JMOE_TGMM_KERNEL=tma needs.*n=33"):
      self._tgmm(a, b, sizes, gather_mode="xla_columns")
    with pytest.raises(ValueError, match="JMOE_TGMM_KERNEL=tma needs.*dtype float32"):
      self._tgmm(np.asarray(a, np.float32), np.asarray(b[:, :32], np.float32), sizes,
                 gather_mode="xla_columns")
    with pytest.raises(ValueError, match="JMOE_TGMM_KERNEL=tma needs.*gather_mode='xla'"):
      self._tgmm(a, b[:, :32], sizes, gather_mode="xla")
    for kernel in ("plain", "tma"):  # the columns layout's step must divide 64
      monkeypatch.setenv(tgmm_lib.TGMM_KERNEL_ENV, kernel)
      with pytest.raises(ValueError, match="block_m dividing 64, got block_m=48"):
        self._tgmm(a, b[:, :32], sizes, gather_mode="xla_columns",
                    config=TgmmConfig(48, 16, 16, 2, 4, 1))
    monkeypatch.setenv(tgmm_lib.TGMM_KERNEL_ENV, "fast")
    with pytest.raises(ValueError, match="JMOE_TGMM_KERNEL must be one of"):
      self._tgmm(a, b, sizes, gather_mode="xla_columns")

  def test_tma_kernel_choice(self, monkeypatch):
    # "auto" (the default) picks the TMA kernel exactly where it applies.
    monkeypatch.delenv(tgmm_lib.TGMM_KERNEL_ENV, raising=False)
    choice = functools.partial(tgmm_lib.tgmm_kernel, self.BACKEND, BF16)
    assert choice(48, 32, False, "xla_columns") == "tma"
    assert choice(48, 33, False, "xla_columns") == "plain"
    assert choice(40, 32, False, "xla_columns") == "plain"
    assert choice(48, 32, True, "xla_columns") == "plain"
    assert choice(48, 32, False, "xla") == "plain"
    assert choice(48, 32, False, "xla_rows") == "tma"
    assert choice(48, 33, False, "xla_rows") == "plain"
    assert tgmm_lib.tgmm_kernel(self.BACKEND, np.float32, 48, 32, False,
                                "xla_columns") == "plain"
    monkeypatch.setenv(tgmm_lib.TGMM_KERNEL_ENV, "plain")
    assert choice(48, 32, False, "xla_columns") == "plain"

  def test_gradients(self, rng):
    # The backward is `tgmm_vjp` (XLA); check it against finite differences of
    # the kernel's forward, with repeated rows in both index arrays.
    a, b, sizes, kw = _inputs(rng, 37, 5, 3, 4, "zeros", np.float32, OPTIONS[1])
    ct = helpers.normal(rng, (4, 5, 3), np.float32)
    ai, bi = kw["a_row_index"], kw["b_row_index"]

    def f(fn, a, b, s):
      return fn(a, b, sizes, a_row_index=ai, b_row_index=bi, row_scale=s) * ct

    eps, atol, rtol = helpers.CHECK_GRADS["float32"]
    args = (a, b, kw["row_scale"])
    jax.test_util.check_grads(functools.partial(f, self._tgmm), args, 1,
                              modes=("rev",), eps=eps, atol=atol, rtol=rtol)
    got = jax.grad(lambda *x: f(self._tgmm, *x).sum(), argnums=(0, 1, 2))(*args)
    want = jax.grad(lambda *x: f(tgmm_reference, *x).sum(), argnums=(0, 1, 2))(*args)
    for name, g_got, g_want in zip(("a", "b", "row_scale"), got, want):
      helpers.assert_close(g_got, g_want, np.float32, kind="grad", err_msg=name)

  def test_empty_shapes(self, rng):
    a = helpers.normal(rng, (0, 5), np.float32)
    b = helpers.normal(rng, (0, 3), np.float32)
    out = self._tgmm(a, b, np.array([0, 0], np.int32))
    assert out.shape == (2, 5, 3) and np.all(np.asarray(out) == 0)
    a = helpers.normal(rng, (4, 5), np.float32)
    b = helpers.normal(rng, (4, 3), np.float32)
    assert self._tgmm(a, b, np.zeros((0,), np.int32)).shape == (0, 5, 3)

  def test_errors(self, rng):
    a = helpers.normal(rng, (8, 5), np.float32)
    b = helpers.normal(rng, (8, 3), np.float32)
    sizes = np.array([3, 5], np.int32)
    idx = np.arange(8, dtype=np.int32)
    cases = [
        ((a[0], b, sizes), {}, ValueError, r"a must have shape \[m, ka\]"),
        ((a, b[:7], sizes), {}, ValueError, r"b must have shape \[m, n\]"),
        ((a, b.astype(BF16), sizes), {}, TypeError, "same dtype"),
        ((a.astype(np.int32), b.astype(np.int32), sizes), {}, TypeError,
         "a must be float32, bfloat16 or float16"),
        ((a, b, sizes.astype(np.float32)), {}, TypeError, "group_sizes must be int32"),
        ((a, b, sizes[None]), {}, ValueError, r"group_sizes must have shape \[g\]"),
        ((a, b, sizes), {"a_row_index": idx[:5]}, ValueError, "b must have shape"),
        ((a, b, sizes), {"b_row_index": idx[:5]}, ValueError,
         r"b_row_index must have shape \[m\] = \[8\]"),
        ((a, b, sizes), {"a_row_index": idx.astype(np.float32)}, TypeError,
         "a_row_index must be int32"),
        ((a, b, sizes), {"row_scale": np.ones(7, np.float32)}, ValueError,
         r"row_scale must have shape \[m\] = \[8\]"),
        ((a, b, sizes), {"out_dtype": jnp.int32}, TypeError, "out_dtype must be"),
        ((a, b, sizes), {"input_precision": "tf64"}, ValueError, "input_precision"),
        ((a, b, sizes), {"row_scale_mode": "epilogue"}, ValueError,
         "row_scale_mode must be one of"),
        ((a, b, sizes), {"gather_mode": "smem"}, ValueError,
         "gather_mode must be one of"),
    ]
    for args, kwargs, error, pattern in cases:
      with pytest.raises(error, match=pattern):
        jax.jit(functools.partial(self._tgmm, **kwargs))(*args)


class TestTgmmInterpret(TgmmTestBase):
  BACKEND = "interpret"

  def test_reference_matches_oracle_float32(self, rng):
    for options in ((True, False, False), (False, True, True)):
      a, b, sizes, kw = _inputs(rng, 130, 48, 33, 9, "zeros", np.float32, options)
      helpers.assert_close(tgmm_reference(a, b, sizes, **kw),
                           _oracle(a, b, sizes, **kw), np.float32)

  def test_bad_backend(self, rng):
    a = helpers.normal(rng, (4, 5), np.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
      tgmm(a, a, np.array([4], np.int32), backend="cuda")


def _sm90_build(flags, ka=2048, n=1408, cfg=None, a_columns=False):
  """Compiles the kernel for the H100 on the host, with the argument hints that
  jax-triton gives (16-byte aligned pointers, none for scalars); skips the test
  where this host has no sm_90 toolchain (`sm90.require`), and a build error
  fails it."""
  sm90.require()
  from benchmarks import sm90_tgmm_facts  # pylint: disable=import-outside-toplevel
  from jmoe.kernels import tgmm as kernels  # pylint: disable=import-outside-toplevel

  return sm90_tgmm_facts.build(cfg or kernels.TGMM_CONFIGS[0], flags, ka, n,
                               out_type="*fp32", a_columns=a_columns)


# wgmma with the A operand from registers: `{acc}, {a registers}, desc_b`
# (from shared memory: `{acc}, desc_a, desc_b`).
_WGMMA_REGISTER_A = re.compile(r"wgmma\.mma_async[^;]*\}, \{")


@pytest.mark.parametrize(
    "flags", [(False, False, False), (True, False, False), (False, True, False)])
def test_sm90_build_uses_16_byte_async_copies(flags):
  """The tile loads are 16-byte `cp.async` copies feeding `wgmma` from shared
  memory. With the row strides passed as plain scalars they were 2-byte loads
  (~7x slower). (False, True, False) is the MoE dW_down call with the default
  `row_scale_mode="prescale"`."""
  ptx = _sm90_build(flags).asm["ptx"]
  assert "wgmma.mma_async" in ptx
  assert not _WGMMA_REGISTER_A.search(ptx), "wgmma A operand from registers"
  copies = re.findall(r"cp\.async\.cg\.shared\.global \[[^]]*\], \[[^]]*\], (\w+)", ptx)
  assert copies and set(copies) == {"0x10"}, f"cp.async sizes {set(copies)}"
  assert not re.search(r"ld\.global(\.\w+)*\.b16", ptx), "2-byte global loads"
  assert not re.search(r"ld\.global(\.\w+)*\.v4", ptx), "tile loads into registers"


# wgmma's immediates `..., scale-d, imm-scale-a, imm-scale-b, imm-trans-a,
# imm-trans-b;`: trans-a 1 reads an MN-major (transposed) `a` tile.
_WGMMA_TRANS_A = re.compile(r"wgmma\.mma_async[^;]*, (?:-?1), (?:-?1), ([01]), ([01]);")


@pytest.mark.parametrize("a_columns", [False, True])
def test_sm90_columns_mode_feeds_a_k_major(a_columns):
  """`gather_mode="xla_columns"` (`A_COLUMNS`): the `a` tile is still a 16-byte
  `cp.async` copy (no row mask breaks the vectors) and wgmma reads it K-major
  (trans-a 0); the row layout reads it transposed (trans-a 1)."""
  ptx = _sm90_build((False, False, False), a_columns=a_columns).asm["ptx"]
  copies = re.findall(r"cp\.async\.cg\.shared\.global \[[^]]*\], \[[^]]*\], (\w+)", ptx)
  assert copies and set(copies) == {"0x10"}, f"cp.async sizes {set(copies)}"
  trans = set(_WGMMA_TRANS_A.findall(ptx))
  assert trans == {("0" if a_columns else "1", "1")}, trans


def test_sm90_in_kernel_row_scale_feeds_wgmma_from_registers():
  """Why `row_scale_mode="prescale"` (the default) is faster: with `HAS_SCALE` the `a`
  tile is loaded into registers (16-byte `ld.global`, no `cp.async`), scaled,
  and fed to wgmma from registers (a shared-memory round trip per step).
  If this starts failing, Triton learned to keep the scaled tile in shared
  memory: re-measure `row_scale_mode="kernel"` (benchmarks/bench_tgmm.py)."""
  ptx = _sm90_build((False, True, True)).asm["ptx"]
  assert _WGMMA_REGISTER_A.search(ptx)
  assert re.search(r"ld\.global(\.\w+)*\.v4", ptx)


@pytest.mark.parametrize("a_rows", [False, True])
@pytest.mark.parametrize("transpose", [False, True])
def test_sm90_tma_build(transpose, a_rows):
  """The persistent TMA tgmm builds for the H100 with its default tile and
  switches: both operands by TMA into shared memory, m64n256k16 wgmma with A
  from shared memory (also with `A_ROWS`: the row-major tile is fed
  transposed, an MN-major operand, not moved through registers), a TMA store,
  no spills, shared memory within 227 KiB."""
  sm90.require()
  from benchmarks import sm90_tgmm_facts  # pylint: disable=import-outside-toplevel

  compiled = sm90_tgmm_facts.build_tma(TgmmConfig(), a_rows=a_rows, transpose=transpose)
  ptx = compiled.asm["ptx"]
  loads = re.findall(r"cp\.async\.bulk\.tensor\.2d\.shared::cluster\.global", ptx)
  assert len(loads) >= 2, "both operand tiles by TMA"
  assert re.search(r"cp\.async\.bulk\.tensor\.3d\.global\.shared", ptx)
  assert re.search(r"wgmma\.mma_async\.sync\.aligned\.m64n256k16\.f32\.bf16\.bf16", ptx)
  assert not _WGMMA_REGISTER_A.search(ptx), "wgmma A operand from registers"
  assert "ld.local" not in ptx and "st.local" not in ptx
  assert compiled.metadata.shared <= 227 * 1024
  # Its descriptors fit the scratch its launch provides.
  assert compiled.metadata.global_scratch_size <= tgmm_lib.tma_scratch_bytes(a_rows)


@pytest.mark.parametrize("ws", [False, True])
@pytest.mark.parametrize("transpose", [False, True])
def test_sm90_gluon_build(transpose, ws):
  """The Gluon tgmm builds for the H100 with its default tile: TMA loads
  completing on mbarriers, wgmma from shared memory (both operands), a TMA
  store, two consumer warp groups (plus, with `ws`, a producer warp group:
  `jmoe.ops._gluon` launches the total) and shared memory within the H100's
  227 KiB."""
  sm90.require()
  from benchmarks import sm90_tgmm_facts  # pylint: disable=import-outside-toplevel

  compiled = sm90_tgmm_facts.build_gluon(TgmmConfig(), 2048, 1408, transpose, ws=ws)
  ptx = compiled.asm["ptx"]
  assert re.search(r"cp\.async\.bulk\.tensor\.2d\.shared::cluster\.global\.mbarrier", ptx)
  assert re.search(r"cp\.async\.bulk\.tensor\.3d\.global\.shared", ptx)
  assert "mbarrier.try_wait" in ptx
  assert re.search(r"wgmma\.mma_async\.sync\.aligned\.m64n256k16\.f32\.bf16\.bf16", ptx)
  assert not _WGMMA_REGISTER_A.search(ptx), "wgmma A operand from registers"
  assert compiled.metadata.num_warps == (12 if ws else 8)
  assert compiled.metadata.shared <= 227 * 1024


def test_gluon_kernel_choice(monkeypatch):
  """`JMOE_TGMM_KERNEL=gluon` runs only where the Gluon kernel can (an sm_90
  GPU, 16-bit operands and output, the TMA kernel's call shapes), and says why
  not otherwise; it is never picked by "auto" (not measured faster yet)."""
  from jmoe.ops import _gluon  # pylint: disable=import-outside-toplevel
  from jmoe.kernels import tgmm as plain_kernels  # pylint: disable=import-outside-toplevel
  from jmoe.kernels import tgmm_gluon  # pylint: disable=import-outside-toplevel

  assert _gluon.is_gluon(tgmm_gluon._tgmm_gluon_kernel)  # pylint: disable=protected-access
  assert not _gluon.is_gluon(plain_kernels.tgmm_kernel_heuristic)
  monkeypatch.setenv(tgmm_lib.TGMM_KERNEL_ENV, "gluon")
  with pytest.raises(ValueError, match="JMOE_TGMM_KERNEL=gluon needs.*backend 'interpret'"):
    tgmm_lib.tgmm_kernel("interpret", BF16, 48, 32, False, "xla_columns")
  with pytest.raises(ValueError, match="JMOE_TGMM_KERNEL=gluon needs.*out_dtype float32"):
    tgmm_lib.tgmm_kernel("triton", BF16, 48, 32, False, "xla_columns", np.float32)
  monkeypatch.delenv(tgmm_lib.TGMM_KERNEL_ENV)
  assert tgmm_lib.tgmm_kernel("interpret", BF16, 48, 32, False, "xla_columns") == "tma"


def test_prescale_launches_the_unscaled_kernel(rng, monkeypatch):
  """`row_scale_mode="prescale"` (also the default) runs the kernel with neither
  `HAS_SCALE` nor `HAS_A_INDEX` (the configs built in
  `test_sm90_build_uses_16_byte_async_copies`); `"kernel"` keeps the scale
  (the gather too with `gather_mode="kernel"`). Without a row scale,
  `gather_mode="xla"` (the default) drops `HAS_A_INDEX` too."""
  from jmoe.ops import _call  # pylint: disable=import-outside-toplevel

  seen = []
  real = _call.kernel_call

  def spy(*args, **kwargs):
    seen.append({k: kwargs[k] for k in ("HAS_A_INDEX", "HAS_B_INDEX", "HAS_SCALE")})
    return real(*args, **kwargs)

  monkeypatch.setattr(_call, "kernel_call", spy)
  monkeypatch.delenv(tgmm_lib.ROW_SCALE_MODE_ENV, raising=False)
  a, b, sizes, kw = _inputs(rng, 37, 48, 33, 4, "random", BF16, OPTIONS[1])
  monkeypatch.delenv(tgmm_lib.GATHER_MODE_ENV, raising=False)
  for mode in ("prescale", "kernel", None):
    tgmm(a, b, sizes, row_scale_mode=mode, backend="interpret", **kw)
  del kw["row_scale"]
  for mode in ("kernel", None):
    tgmm(a, b, sizes, gather_mode=mode, backend="interpret", **kw)
  assert seen == [
      {"HAS_A_INDEX": False, "HAS_B_INDEX": True, "HAS_SCALE": False},
      {"HAS_A_INDEX": False, "HAS_B_INDEX": True, "HAS_SCALE": True},  # xla gather
      {"HAS_A_INDEX": False, "HAS_B_INDEX": True, "HAS_SCALE": False},  # default
      {"HAS_A_INDEX": True, "HAS_B_INDEX": True, "HAS_SCALE": False},
      {"HAS_A_INDEX": False, "HAS_B_INDEX": True, "HAS_SCALE": False},  # default
  ]


# ----------------------------------------------------------------------------
# GPU.
# ----------------------------------------------------------------------------


def _skewed_sizes(rng, m: int, g: int, n_empty: int = 2) -> np.ndarray:
  """Skewed sizes summing to `m` (lognormal weights), `n_empty` groups empty."""
  w = rng.lognormal(0.0, 1.0, size=g)
  w[rng.choice(g, size=n_empty, replace=False)] = 0.0
  sizes = np.floor(w / w.sum() * m).astype(np.int64)
  sizes[np.argmax(w)] += m - sizes.sum()
  return sizes.astype(np.int32)


@pytest.mark.gpu
class TestTgmmTriton(TgmmTestBase):
  BACKEND = "triton"
  # One pinned config for the small shapes (each autotuned signature compiles
  # every config); the MoE shapes below autotune.
  CONFIG = TgmmConfig(32, 64, 64, 4, num_warps=4, num_stages=3)

  @pytest.mark.parametrize(
      "m,ka,n,g,skewed,options",
      [
          (16384, 4096, 14336, 8, False, (False, False, False)),
          (49152, 2048, 2816, 64, True, (False, False, False)),
          (49152, 2048, 1408, 64, True, (True, False, False)),
          (49152, 1408, 2048, 64, True, (False, True, True)),
      ],
  )
  def test_moe_shapes_bf16(self, m, ka, n, g, skewed, options):
    rng = helpers.rng_for(f"tgmm-{m}-{ka}-{n}-{g}")
    key = jax.random.key(int(rng.integers(1 << 30)))
    ka_, kb = jax.random.split(key)
    has_ai, has_bi, has_s = options
    a = jax.random.normal(ka_, (m, ka), jnp.bfloat16)
    b = jax.random.normal(kb, (m, n), jnp.bfloat16)
    sizes = _skewed_sizes(rng, m, g) if skewed else np.full(g, m // g, np.int32)
    kw = {}
    if has_ai:
      kw["a_row_index"] = jnp.asarray(rng.permutation(m).astype(np.int32))
    if has_bi:
      kw["b_row_index"] = jnp.asarray(rng.permutation(m).astype(np.int32))
    if has_s:
      kw["row_scale"] = jnp.asarray(rng.uniform(0.1, 1.0, m).astype(np.float32))
    fn = jax.jit(functools.partial(self._tgmm, config=None, **kw))
    sizes = jnp.asarray(sizes)
    out = fn(a, b, sizes)
    # XLA's ragged_dot_general (one compile; per-group slices would compile once
    # per distinct group size).
    expected = jax.jit(functools.partial(tgmm_reference, **kw))(a, b, sizes)
    # Checked on the device (the outputs hold up to 470M floats).
    assert bool(jnp.all(jnp.isfinite(out))), "non-finite (unwritten?) outputs"
    err = float(jnp.max(jnp.abs(out - expected)) / jnp.max(jnp.abs(expected)))
    assert err <= 1e-5, f"relative error {err:.3e}"  # only the summation order
    empty = np.flatnonzero(np.asarray(sizes) == 0)
    assert bool(jnp.all(out[empty] == 0)), "groups without rows must be 0"
    again = fn(a, b, sizes)
    bits = functools.partial(jax.lax.bitcast_convert_type, new_dtype=jnp.uint32)
    assert bool(jnp.all(bits(out) == bits(again))), "repeat is not bit-identical"

  @pytest.mark.parametrize("m,ka,n,g,transpose", [
      (16384, 4096, 28672, 8, False),  # Mixtral-like dW_up
      (16384, 4096, 14336, 8, True),  # Mixtral-like dW_down^T
      (49152, 2048, 2816, 64, False),  # deepseek-like dW_up (skewed)
      (49152, 2048, 1408, 64, True),  # deepseek-like dW_down^T: partial tiles
  ])
  @pytest.mark.parametrize("kernel,tma_store", [("tma", "0"), ("tma", "1"), ("gluon", "1")])
  def test_tma_moe_shapes_bf16(self, monkeypatch, launched, m, ka, n, g, transpose,
                               kernel, tma_store):
    rng = helpers.rng_for(f"tgmm-tma-{m}-{ka}-{n}-{g}")
    ka_, kb = jax.random.split(jax.random.key(int(rng.integers(1 << 30))))
    t = m // 2
    a = jax.random.normal(ka_, (t, ka), jnp.bfloat16)
    b = jax.random.normal(kb, (m, n), jnp.bfloat16)
    index = jnp.asarray(rng.integers(0, t, m).astype(np.int32))
    sizes = jnp.asarray(_skewed_sizes(rng, m, g))
    fn = functools.partial(self._tgmm, config=TgmmConfig(), a_row_index=index,
                           gather_mode="xla_columns", transpose_out=transpose,
                           out_dtype=jnp.bfloat16)
    monkeypatch.setenv(tgmm_lib.TGMM_KERNEL_ENV, "plain")
    plain = jax.jit(lambda *x: fn(*x))(a, b, sizes)  # fresh: traced with the switch
    monkeypatch.setenv(tgmm_lib.TGMM_KERNEL_ENV, kernel)
    monkeypatch.setenv(tgmm_lib.TMA_STORE_ENV, tma_store)
    out = jax.jit(lambda *x: fn(*x))(a, b, sizes)
    assert launched[-1][0].startswith(f"jmoe_tgmm_{kernel}"), launched[-1][0]
    bits = functools.partial(jax.lax.bitcast_convert_type, new_dtype=jnp.uint16)
    assert bool(jnp.all(bits(out) == bits(plain))), f"{kernel} and plain kernels differ"
    expected = jax.jit(functools.partial(tgmm_reference, a_row_index=index))(a, b, sizes)
    if transpose:
      expected = jnp.swapaxes(expected, 1, 2)
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - expected))
                / jnp.max(jnp.abs(expected)))
    assert err <= 1e-2, f"relative error {err:.3e}"

  @pytest.mark.parametrize("shape", TMA_SHAPES, ids=str)
  @pytest.mark.parametrize("transpose", [False, True])
  @pytest.mark.parametrize("config", [TgmmConfig(), TgmmConfig(32, 64, 64, 4, 4, 3)],
                           ids=["128x256", "64x64"])
  @pytest.mark.parametrize("ws", ["0", "1"])
  def test_gluon_kernel(self, rng, monkeypatch, launched, shape, transpose, config, ws):
    # The Gluon kernel (jmoe.kernels.tgmm_gluon) gives exactly the plain
    # columns-mode kernel's numbers at the same tile (same steps in the same
    # order), including zeros for empty groups and clipped edge tiles.
    a, b, sizes, kw = _inputs(rng, *shape, BF16, OPTIONS[1])
    kw.pop("b_row_index", None)  # it reads b's rows in order
    b = b[:shape[0]]
    fn = functools.partial(self._tgmm, gather_mode="xla_columns", config=config,
                           transpose_out=transpose, out_dtype=BF16, **kw)
    monkeypatch.setenv(tgmm_lib.TGMM_KERNEL_ENV, "plain")
    plain = jax.jit(lambda *x: fn(*x))(a, b, sizes)  # fresh: traced with the switch
    monkeypatch.setenv(tgmm_lib.TGMM_KERNEL_ENV, "gluon")
    monkeypatch.setenv(tgmm_lib.GLUON_WS_ENV, ws)
    out = jax.jit(lambda *x: fn(*x))(a, b, sizes)
    assert launched[-1][0] == f"jmoe_tgmm_gluon{'_ws' if ws == '1' else ''}", launched[-1][0]
    np.testing.assert_array_equal(np.asarray(out).view(np.uint16),
                                  np.asarray(plain).view(np.uint16))
    want = _oracle(a, b, sizes, **kw)
    helpers.assert_close(out, np.swapaxes(want, 1, 2) if transpose else want, BF16)

  def test_float32_tf32(self, rng):
    a, b, sizes, kw = _inputs(rng, 1000, 600, 300, 8, "zeros", np.float32, OPTIONS[1])
    out = self._tgmm(a, b, sizes, input_precision="tf32", config=None, **kw)
    helpers.assert_close(out, _oracle(a, b, sizes, **kw), "tf32")


def test_row_scale_mode_env_default(monkeypatch):
  """`row_scale_mode=None` reads `JMOE_TGMM_ROW_SCALE_MODE` (default "prescale")."""
  rng = helpers.rng_for("row-scale-env")
  a, b, sizes, kw = _inputs(rng, 37, 48, 33, 4, "random", np.float32, OPTIONS[1])
  monkeypatch.setenv(tgmm_lib.ROW_SCALE_MODE_ENV, "kernel")
  got = tgmm(a, b, sizes, backend="interpret", **kw)
  monkeypatch.setenv(tgmm_lib.ROW_SCALE_MODE_ENV, "bogus")
  with pytest.raises(ValueError, match="row_scale_mode must be one of"):
    tgmm(a, b, sizes, backend="interpret", **kw)
  monkeypatch.delenv(tgmm_lib.ROW_SCALE_MODE_ENV)
  want = tgmm(a, b, sizes, backend="interpret", **kw)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
