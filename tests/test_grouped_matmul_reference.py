"""`jmoe.grouped_matmul(backend="reference")` is exactly `jax.lax.ragged_dot`."""

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

import jmoe
from jmoe import reference as ref

gmm = jax.jit(functools.partial(jmoe.grouped_matmul, backend="reference"),
              static_argnames=("preferred_element_type",))


def _group_sizes(rng, m: int, g: int, kind: str) -> np.ndarray:
  """Group sizes summing to m ("full"), below m ("short"), with zeros ("zeros"),
  or all rows in one group ("one")."""
  if kind == "one":
    sizes = np.zeros(g, np.int32)
    sizes[g // 2] = m
    return sizes
  total = m if kind in ("full", "zeros") else max(0, m - 1 - int(rng.integers(m)))
  cuts = np.sort(rng.integers(0, total + 1, g - 1))
  sizes = np.diff(np.concatenate([[0], cuts, [total]])).astype(np.int32)
  if kind == "zeros" and g > 1:
    zero = rng.choice(g, size=max(1, g // 2), replace=False)
    moved = sizes[zero].sum()
    sizes[zero] = 0
    keep = np.setdiff1d(np.arange(g), zero)
    sizes[keep[0]] += moved
  assert sizes.sum() <= m and np.all(sizes >= 0)
  return sizes


# (m, k, n, g)
SHAPES = [(1, 5, 3, 1), (7, 16, 5, 3), (33, 5, 16, 8), (100, 16, 7, 64)]


@pytest.mark.parametrize("kind", ["full", "short", "zeros", "one"])
@pytest.mark.parametrize("m,k,n,g", SHAPES,
                         ids=[f"m{s[0]}-k{s[1]}-n{s[2]}-g{s[3]}" for s in SHAPES])
def test_equals_ragged_dot(rng, m, k, n, g, kind):
  lhs = helpers.normal(rng, (m, k))
  rhs = helpers.normal(rng, (g, k, n))
  sizes = _group_sizes(rng, m, g, kind)
  got = gmm(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(sizes))
  want = jax.lax.ragged_dot(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(sizes),
                            precision=jax.lax.Precision.HIGHEST)
  assert got.shape == (m, n) and got.dtype == jnp.float32
  helpers.assert_close(got, want, np.float32)
  helpers.assert_close(got, oracle.ragged_dot(lhs, rhs, sizes), np.float32)
  # Rows past sum(group_sizes) are exactly zero.
  assert np.all(np.asarray(got)[int(sizes.sum()):] == 0.0)


def test_eager_equals_jit(rng):
  lhs, rhs = helpers.normal(rng, (33, 16)), helpers.normal(rng, (8, 16, 5))
  sizes = jnp.asarray(_group_sizes(rng, 33, 8, "zeros"))
  eager = jmoe.grouped_matmul(jnp.asarray(lhs), jnp.asarray(rhs), sizes,
                              backend="reference")
  jitted = gmm(jnp.asarray(lhs), jnp.asarray(rhs), sizes)
  np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted))


@pytest.mark.parametrize("dtype,pet", [(ml_dtypes.bfloat16, None),
                                       (ml_dtypes.bfloat16, jnp.float32),
                                       (np.float16, jnp.float32)])
def test_low_precision_inputs(rng, dtype, pet):
  m, k, n, g = 33, 16, 24, 4
  lhs, rhs = helpers.normal(rng, (m, k), dtype), helpers.normal(rng, (g, k, n), dtype)
  sizes = _group_sizes(rng, m, g, "zeros")
  got = gmm(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(sizes),
            preferred_element_type=pet)
  assert got.dtype == (np.dtype(dtype) if pet is None else np.dtype(pet))
  want = jax.lax.ragged_dot(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(sizes),
                            preferred_element_type=pet)
  helpers.assert_close(got, want, np.float32 if pet is not None else dtype)
  helpers.assert_close(got, oracle.ragged_dot(lhs, rhs, sizes),
                       np.float32 if pet is not None else dtype)


def test_int64_like_group_sizes_are_accepted(rng):
  """Any integer group_sizes (here uint8) work and give the same result."""
  lhs, rhs = helpers.normal(rng, (7, 5)), helpers.normal(rng, (3, 5, 4))
  sizes = np.array([2, 0, 4], np.int32)
  a = jmoe.grouped_matmul(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(sizes),
                          backend="reference")
  b = jmoe.grouped_matmul(jnp.asarray(lhs), jnp.asarray(rhs),
                          jnp.asarray(sizes.astype(np.uint8)), backend="reference")
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("kind", ["short", "zeros"])
def test_gradients_equal_ragged_dot(rng, kind):
  m, k, n, g = 33, 5, 7, 8
  lhs, rhs = jnp.asarray(helpers.normal(rng, (m, k))), jnp.asarray(
      helpers.normal(rng, (g, k, n)))
  sizes = jnp.asarray(_group_sizes(rng, m, g, kind))
  cot = jnp.asarray(helpers.normal(rng, (m, n)))
  _, vjp_got = jax.vjp(
      lambda a, b: jmoe.grouped_matmul(a, b, sizes, backend="reference"), lhs, rhs)
  _, vjp_want = jax.vjp(
      lambda a, b: jax.lax.ragged_dot(a, b, sizes, precision=jax.lax.Precision.HIGHEST),
      lhs, rhs)
  for name, got, want in zip(("lhs", "rhs"), vjp_got(cot), vjp_want(cot)):
    helpers.assert_close(got, want, np.float32, kind="grad", err_msg=name)
  # Rows past sum(group_sizes) get no gradient; empty groups get none either.
  d_lhs, d_rhs = vjp_got(cot)
  assert np.all(np.asarray(d_lhs)[int(sizes.sum()):] == 0.0)
  assert np.all(np.asarray(d_rhs)[np.asarray(sizes) == 0] == 0.0)


def test_grads_float64(rng, x64):
  m, k, n, g = 7, 5, 3, 3
  lhs = jnp.asarray(helpers.normal(rng, (m, k), np.float64))
  rhs = jnp.asarray(helpers.normal(rng, (g, k, n), np.float64))
  sizes = jnp.asarray(np.array([3, 0, 3], np.int32))
  fn = functools.partial(ref.grouped_matmul, group_sizes=sizes)
  eps, atol, rtol = helpers.CHECK_GRADS["float64"]
  check_grads(lambda a, b: fn(a, b), (lhs, rhs), 1, modes=("rev",),
              eps=eps, atol=atol, rtol=rtol)


@pytest.mark.parametrize("batched", ["all", "lhs", "rhs", "lhs_sizes"])
def test_vmap(rng, batched):
  """The reference batches under vmap whichever operands carry the batch axis."""
  b, m, k, n, g = 3, 7, 5, 4, 3
  lhs = helpers.normal(rng, (b, m, k) if "lhs" in batched or batched == "all"
                       else (m, k))
  rhs = helpers.normal(rng, (b, g, k, n) if batched in ("rhs", "all") else (g, k, n))
  if batched in ("all", "lhs_sizes"):
    sizes = np.stack([_group_sizes(rng, m, g, "short") for _ in range(b)])
  else:
    sizes = _group_sizes(rng, m, g, "zeros")
  axes = (0 if lhs.ndim == 3 else None, 0 if rhs.ndim == 4 else None,
          0 if sizes.ndim == 2 else None)
  fn = functools.partial(jmoe.grouped_matmul, backend="reference")
  got = jax.vmap(fn, in_axes=axes)(jnp.asarray(lhs), jnp.asarray(rhs),
                                   jnp.asarray(sizes))
  for i in range(b):
    li = lhs[i] if axes[0] == 0 else lhs
    ri = rhs[i] if axes[1] == 0 else rhs
    si = sizes[i] if axes[2] == 0 else sizes
    helpers.assert_close(got[i], oracle.ragged_dot(li, ri, si), np.float32,
                         err_msg=f"batch {i}")
