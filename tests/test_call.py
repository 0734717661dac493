"""Tests of `jmoe.ops._call.kernel_call` (the launch site) with the interpreter.

The kernels live here, not in the package: a masked add/scale, a kernel that
leaves part of its output unwritten (poison must show), one that accumulates
into a zeroed output, an autotuned one and one calling a `@triton.jit` helper.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import triton
import triton.language as tl

import helpers
from jmoe import interpret
from jmoe.kernels.rounding import round_to
from jmoe.ops._call import kernel_call


@triton.jit
def _add_scale_kernel(x_ptr, y_ptr, n, scale, out_ptr, BLOCK: tl.constexpr):
  """out[i] = (x[i] + y[i]) * scale for i < n, computed in float32."""
  offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
  mask = offs < n
  x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
  y = tl.load(y_ptr + offs, mask=mask).to(tl.float32)
  tl.store(out_ptr + offs, ((x + y) * scale).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _first_half_kernel(x_ptr, n_written, out_f_ptr, out_i_ptr, BLOCK: tl.constexpr):
  """Writes only the first `n_written` elements of both outputs."""
  offs = tl.arange(0, BLOCK)
  mask = offs < n_written
  x = tl.load(x_ptr + offs, mask=mask)
  tl.store(out_f_ptr + offs, x, mask=mask)
  tl.store(out_i_ptr + offs, offs, mask=mask)


@triton.jit
def _count_kernel(ids_ptr, n, counts_ptr, total_ptr, BLOCK: tl.constexpr):
  """counts[ids[i]] += 1 with integer atomics; total[0] += n (one program adds)."""
  pid = tl.program_id(0)
  offs = pid * BLOCK + tl.arange(0, BLOCK)
  mask = offs < n
  ids = tl.load(ids_ptr + offs, mask=mask, other=0)
  tl.atomic_add(counts_ptr + ids, tl.full([BLOCK], 1, tl.int32), mask=mask)
  if pid == 0:
    tl.store(total_ptr, tl.load(total_ptr) + n)


@triton.autotune(
    configs=[
        triton.Config({"BLOCK": 16}, num_warps=1),
        triton.Config({"BLOCK": 64}, num_warps=2),
    ],
    key=["n"],
)
@triton.jit
def _autotuned_add_scale_kernel(x_ptr, y_ptr, n, scale, out_ptr, BLOCK: tl.constexpr):
  offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
  mask = offs < n
  x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
  y = tl.load(y_ptr + offs, mask=mask).to(tl.float32)
  tl.store(out_ptr + offs, ((x + y) * scale).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _square(v):
  return v * v


@triton.jit
def _helper_kernel(x_ptr, n, out_ptr, BLOCK: tl.constexpr):
  offs = tl.arange(0, BLOCK)
  mask = offs < n
  tl.store(out_ptr + offs, _square(tl.load(x_ptr + offs, mask=mask)), mask=mask)


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
  """c = a @ b for one [M, K] x [K, N] tile, float32 operands."""
  rm = tl.arange(0, M)
  rn = tl.arange(0, N)
  rk = tl.arange(0, K)
  a = tl.load(a_ptr + rm[:, None] * K + rk[None, :]).to(tl.float32)
  b = tl.load(b_ptr + rk[:, None] * N + rn[None, :]).to(tl.float32)
  tl.store(c_ptr + rm[:, None] * N + rn[None, :], tl.dot(a, b, input_precision="ieee"))


def _add_scale(x, y, scale, *, block=32, kernel=_add_scale_kernel, **meta):
  n = x.size
  if kernel is _add_scale_kernel:
    meta["BLOCK"] = block
  return kernel_call(
      kernel, x, y, n, scale,
      out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
      grid=lambda m: (triton.cdiv(n, m["BLOCK"]),),
      backend="interpret", name="add_scale", **meta,
  )


DTYPES = (np.float32, ml_dtypes.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 37, 64])
@pytest.mark.parametrize("use_jit", [False, True])
def test_add_scale(rng, dtype, n, use_jit):
  x = helpers.normal(rng, (n,), dtype)
  y = helpers.normal(rng, (n,), dtype)
  fn = functools.partial(_add_scale, scale=1.5)
  out = (jax.jit(fn) if use_jit else fn)(x, y)
  assert out.dtype == dtype and out.shape == (n,)
  expected = (np.asarray(x, np.float64) + np.asarray(y, np.float64)) * 1.5
  helpers.assert_close(out, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_vmap(rng, dtype):
  x = helpers.normal(rng, (3, 2, 21), dtype)
  y = helpers.normal(rng, (21,), dtype)  # unbatched argument
  fn = jax.jit(jax.vmap(jax.vmap(lambda a: _add_scale(a, y, 2.0, block=8))))
  out = fn(x)
  expected = (np.asarray(x, np.float64) + np.asarray(y, np.float64)) * 2.0
  assert out.shape == x.shape and out.dtype == dtype
  helpers.assert_close(out, expected, dtype)


def test_vmap_both_batched(rng):
  x = helpers.normal(rng, (4, 10), np.float32)
  y = helpers.normal(rng, (4, 10), np.float32)
  out = jax.vmap(lambda a, b: _add_scale(a, b, -1.0, block=4))(x, y)
  helpers.assert_close(out, -(np.asarray(x, np.float64) + y), np.float32)


@pytest.mark.parametrize("use_jit", [False, True])
def test_unwritten_outputs_are_poisoned(rng, use_jit):
  x = helpers.normal(rng, (16,), ml_dtypes.bfloat16)

  def fn(x):
    return kernel_call(
        _first_half_kernel, x, 5,
        out_shape=(jax.ShapeDtypeStruct((16,), x.dtype),
                   jax.ShapeDtypeStruct((16,), jnp.int32)),
        grid=(1,), backend="interpret", BLOCK=16,
    )

  out_f, out_i = (jax.jit(fn) if use_jit else fn)(x)
  out_f, out_i = np.asarray(out_f, np.float32), np.asarray(out_i)
  np.testing.assert_array_equal(out_f[:5], np.asarray(x, np.float32)[:5])
  assert np.isnan(out_f[5:]).all()
  np.testing.assert_array_equal(out_i[:5], np.arange(5))
  assert (out_i[5:] == interpret.POISON_INT).all()


def test_zeroed_outputs(rng):
  ids = jnp.asarray(rng.integers(0, 6, size=50), jnp.int32)
  counts, total = jax.jit(lambda ids: kernel_call(
      _count_kernel, ids, ids.size,
      out_shape=(jax.ShapeDtypeStruct((6,), jnp.int32),
                 jax.ShapeDtypeStruct((1,), jnp.int32)),
      grid=(triton.cdiv(50, 16),), backend="interpret", zeroed_outputs=(0, 1),
      BLOCK=16,
  ))(ids)
  np.testing.assert_array_equal(counts, np.bincount(np.asarray(ids), minlength=6))
  np.testing.assert_array_equal(total, [50])


def test_not_zeroed_output_starts_poisoned(rng):
  ids = jnp.asarray(rng.integers(0, 6, size=20), jnp.int32)
  counts, _ = kernel_call(
      _count_kernel, ids, ids.size,
      out_shape=(jax.ShapeDtypeStruct((6,), jnp.int32),
                 jax.ShapeDtypeStruct((1,), jnp.int32)),
      grid=(2,), backend="interpret", zeroed_outputs=lambda meta: (1,),
      BLOCK=16,
  )
  expected = np.bincount(np.asarray(ids), minlength=6) + interpret.POISON_INT
  np.testing.assert_array_equal(counts, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_autotuned_kernel(rng, dtype):
  x = helpers.normal(rng, (70,), dtype)
  y = helpers.normal(rng, (70,), dtype)
  expected = (np.asarray(x, np.float64) + np.asarray(y, np.float64)) * 0.5
  # First config (BLOCK=16): grid 5 programs covering all 70 elements.
  tuned = functools.partial(_add_scale, kernel=_autotuned_add_scale_kernel)
  out = jax.jit(lambda x, y: tuned(x, y, 0.5))(x, y)
  helpers.assert_close(out, expected, dtype)
  # An explicit metaparameter picks the agreeing config.
  out = _add_scale(x, y, 0.5, kernel=_autotuned_add_scale_kernel, BLOCK=64)
  helpers.assert_close(out, expected, dtype)


def test_autotuned_kernel_uses_first_config(rng):
  """With BLOCK=16 the grid lambda must see 16: a grid for 64 would leave poison."""
  seen = []

  def grid(meta):
    seen.append(meta["BLOCK"])
    return (triton.cdiv(70, meta["BLOCK"]),)

  x = helpers.normal(rng, (70,), np.float32)
  kernel_call(
      _autotuned_add_scale_kernel, x, x, 70, 1.0,
      out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=grid,
      backend="interpret",
  )
  assert seen == [16]


def test_autotuned_kernel_unknown_config_raises(rng):
  x = helpers.normal(rng, (8,), np.float32)
  with pytest.raises(ValueError, match="no autotune config"):
    _add_scale(x, x, 1.0, kernel=_autotuned_add_scale_kernel, BLOCK=32)


def test_jit_helper_function(rng):
  x = helpers.normal(rng, (9,), np.float32)
  out = jax.jit(lambda x: kernel_call(
      _helper_kernel, x, 9, out_shape=jax.ShapeDtypeStruct((16,), x.dtype),
      grid=(1,), backend="interpret", BLOCK=16,
  ))(x)
  out = np.asarray(out)
  helpers.assert_close(out[:9], np.asarray(x, np.float64) ** 2, np.float32)
  assert np.isnan(out[9:]).all()


def test_dot_kernel(rng):
  a = helpers.normal(rng, (16, 32), np.float32)
  b = helpers.normal(rng, (32, 16), np.float32)
  c = kernel_call(
      _dot_kernel, a, b, out_shape=jax.ShapeDtypeStruct((16, 16), jnp.float32),
      grid=(1,), backend="interpret", M=16, N=16, K=32, num_warps=4,
  )
  helpers.assert_close(c, np.asarray(a, np.float64) @ np.asarray(b, np.float64),
                       np.float32)


def test_empty_grid_returns_poison():
  out = kernel_call(
      _first_half_kernel, jnp.ones((4,)), 4,
      out_shape=(jax.ShapeDtypeStruct((4,), jnp.float32),
                 jax.ShapeDtypeStruct((0,), jnp.int32)),
      grid=(0,), backend="interpret", BLOCK=4,
  )
  assert np.isnan(np.asarray(out[0])).all() and out[1].shape == (0,)


def test_bad_backend_raises():
  x = jnp.ones((4,))
  with pytest.raises(ValueError, match="backend must be one of"):
    kernel_call(_add_scale_kernel, x, x, 4, 1.0,
                out_shape=jax.ShapeDtypeStruct((4,), x.dtype), grid=(1,),
                backend="reference", BLOCK=4)


def test_bad_out_shape_raises():
  x = jnp.ones((4,))
  with pytest.raises(ValueError, match="out_shape must be"):
    kernel_call(_add_scale_kernel, x, x, 4, 1.0, out_shape=[(4,)], grid=(1,),
                backend="interpret", BLOCK=4)


@triton.jit
def _positive_kernel(x_ptr, n, out_ptr, BLOCK: tl.constexpr):
  offs = tl.arange(0, BLOCK)
  mask = offs < n
  tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) > 0, mask=mask)


def test_bool_output_and_language_restored(rng):
  load, reduce = tl.load, tl.core.reduce
  x = helpers.normal(rng, (13,), np.float32)
  out = jax.jit(lambda x: kernel_call(
      _positive_kernel, x, 13, out_shape=jax.ShapeDtypeStruct((13,), jnp.bool_),
      grid=(1,), backend="interpret", BLOCK=16,
  ))(x)
  assert out.dtype == jnp.bool_
  np.testing.assert_array_equal(out, np.asarray(x) > 0)
  assert tl.load is load  # the interpreter's patches of triton.language are undone
  assert tl.core.reduce is reduce


@triton.jit
def _round_kernel(x_ptr, n, out_ptr, EMULATE_RNE: tl.constexpr, BLOCK: tl.constexpr):
  offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
  mask = offs < n
  x = tl.load(x_ptr + offs, mask=mask)
  tl.store(out_ptr + offs, round_to(x, out_ptr.dtype.element_ty, EMULATE_RNE), mask=mask)


@pytest.mark.parametrize("emulate", [True, False])
def test_round_to_bf16_in_interpreter(rng, emulate):
  # jmoe.kernels.rounding.round_to: with EMULATE_RNE the interpreter rounds
  # float32 -> bf16 to nearest even exactly as XLA (and the GPU's cvt.rn) do;
  # without it, Triton 3.6's interpreter truncates (the reason it exists).
  x = helpers.normal(rng, (4099,), np.float32) * np.float32(3.0)
  # Ties: values exactly halfway between two bf16 numbers round to the even one.
  ties = (np.arange(1, 65, dtype=np.uint32) << 16 | 0x8000).view(np.float32)
  x = np.concatenate([x, ties, -ties, np.float32([0.0, -0.0, 1e-40, np.inf, -np.inf])])
  out = jax.jit(lambda x: kernel_call(
      _round_kernel, x, x.size, out_shape=jax.ShapeDtypeStruct(x.shape, jnp.bfloat16),
      grid=(-(-x.size // 512),), backend="interpret", EMULATE_RNE=emulate, BLOCK=512,
  ))(jnp.asarray(x))
  want = jnp.asarray(x).astype(jnp.bfloat16)
  same = np.asarray(out).view(np.uint16) == np.asarray(want).view(np.uint16)
  if emulate:
    assert same.all(), np.flatnonzero(~same)[:10]
  else:
    assert not same.all()


def test_hidden_scratch_guard(monkeypatch):
  """The hidden-scratch launch runs only on the tested jax-triton / jaxlib pairs;
  a callable grid needs `max_programs`; its extra output holds programs x bytes
  (rounded to 128); a compiled kernel needing more scratch than given raises."""
  import triton  # pylint: disable=import-outside-toplevel
  from jmoe.ops import _hidden_scratch  # pylint: disable=import-outside-toplevel

  @triton.jit
  def _kernel(x_ptr, n, BLOCK: tl.constexpr):
    tl.store(x_ptr + n, BLOCK)

  monkeypatch.setattr(_hidden_scratch, "supported", lambda: False)
  with pytest.raises(RuntimeError, match="hidden scratch.*installed"):
    _hidden_scratch.prepare(_kernel, (4,), 384)
  monkeypatch.setattr(_hidden_scratch, "supported", lambda: True)
  # The jax-triton patch itself needs a CUDA jaxlib (GPU tests exercise it).
  monkeypatch.setattr(_hidden_scratch, "_install", lambda: None)
  with pytest.raises(ValueError, match="max_programs"):
    _hidden_scratch.prepare(_kernel, lambda meta: (4,), 384)
  shape = _hidden_scratch.prepare(_kernel, (3, 2), 300)
  assert shape.shape == (6 * 384,) and shape.dtype == jnp.uint8
  shape = _hidden_scratch.prepare(_kernel, lambda meta: (4,), 128, max_programs=10)
  assert shape.shape == (10 * 128,)
  # The kernel's budget is the largest any launch gave.
  assert _hidden_scratch._SCRATCH_KERNELS[_kernel] == 384  # pylint: disable=protected-access
  assert _hidden_scratch._num_parameters(_kernel) == 2  # pylint: disable=protected-access

  compiling = _hidden_scratch._COMPILING  # pylint: disable=protected-access
  monkeypatch.setattr(compiling, "budget", 256, raising=False)
  _hidden_scratch._check_scratch_size({"global_scratch_size": 256})  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="needs 384 bytes.*more than the 256"):
    _hidden_scratch._check_scratch_size(  # pylint: disable=protected-access
        {"name": "k", "global_scratch_size": 384})
  monkeypatch.setattr(compiling, "budget", None)
  _hidden_scratch._check_scratch_size({"global_scratch_size": 4096})  # pylint: disable=protected-access


def test_interpreter_leaves_gluon_whole():
  """An interpreted launch that is the first to make Triton import Gluon's
  language (it does so lazily, inside the launch, while the interpreter has
  `triton.language` patched) must leave Gluon bound to the real
  `static_range`; else every later Gluon build fails. A fresh process, so
  that Gluon is not imported yet."""
  import os  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel

  code = (
      "import sys, jax.numpy as jnp, triton.language.core as core\n"
      "real = core.static_range\n"
      "assert 'triton.experimental.gluon.language' not in sys.modules\n"
      "from jmoe.ops.tgmm import tgmm\n"
      "a = jnp.ones((8, 16), jnp.float32)\n"
      "tgmm(a, a, jnp.array([8], jnp.int32), backend='interpret').block_until_ready()\n"
      "from triton.experimental.gluon import language as gl\n"
      "assert gl.static_range is real, gl.static_range\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"},
                       check=False)
  assert out.returncode == 0, out.stderr[-2000:]
