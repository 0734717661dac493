"""jmoe under `jax.shard_map` and sharded `jit` (data parallelism).

The multi-device checks run `tests/sharding_worker.py` in a fresh process with
4 host CPU devices (the count is fixed when jax starts); the in-process ones
use a one-device mesh, whose `shard_map` types values like a larger one.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import helpers
import jmoe
from jmoe import _shard
from jmoe.ops import _call

WORKER = pathlib.Path(__file__).with_name("sharding_worker.py")


CHECKS = (
    [f"{kind} {check}" for kind in ("auto", "explicit") for check in (
        "shard_map", "shard_map check_vma=False", "shard_map grouped_matmul remat rhs grad",
        "shard_map linen layer", "jit")]
    + ["auto jit, explicit_axes around moe",
       "explicit 2-D mesh moe + losses, fwd and grads", "explicit context mesh, unsplit x",
       "explicit weight grads keep the weights' shardings", "explicit jitter",
       "explicit capacity per shard", "explicit capacity losses",
       "explicit dropped count is the total",
       "explicit route", "explicit expert_ffn fwd and grads", "explicit jit linen layer"])


def _check(result: dict) -> None:
  errors = {k: v for k, v in result.items() if k not in ("devices", "platform")}
  # With one device, its share of the noise is all of it.
  per_device = ["explicit jitter noise is per device"] if result["devices"] > 1 else []
  assert sorted(errors) == sorted(CHECKS + per_device), errors
  for name, err in errors.items():
    assert isinstance(err, float) and err < 1e-5, (name, err)


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_data_parallel_matches_unsharded(backend):
  # 4 devices, tokens split over them, weights replicated: shard_map (typed
  # with check_vma, and untyped with the user's psum), a per-shard
  # grouped_matmul under remat, the Linen layer, and jit on sharded inputs all
  # match the unsharded call (forward, dx, and every weight gradient summed
  # over shards).
  _check(helpers.run_worker(WORKER, backend, 4))


@pytest.mark.gpu
def test_data_parallel_matches_unsharded_gpu():
  _check(helpers.run_worker(WORKER, "triton", jax.device_count()))


def test_kernel_outputs_vary_like_inputs():
  # jax_triton / pure_callback outputs carry no shard_map typing; kernel_call
  # types them like jax's primitives: varying where any input varies.
  import triton  # pylint: disable=import-outside-toplevel
  import triton.language as tl  # pylint: disable=import-outside-toplevel

  @triton.jit
  def _add(x_ptr, y_ptr, o_ptr, N: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    tl.store(o_ptr + offs, tl.load(x_ptr + offs, mask=m) + tl.load(y_ptr + offs, mask=m),
             mask=m)

  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  seen = {}

  def body(x, y):
    out = _call.kernel_call(_add, x, y, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                            grid=(1,), backend="interpret", N=x.size, BLOCK=16)
    seen["in"] = (_shard.varying_axes(x), _shard.varying_axes(y))
    seen["out"] = _shard.varying_axes(out)
    return out

  x = jnp.arange(8.0)
  got = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("data"), P()),
                              out_specs=P("data")))(x, 2 * x)
  np.testing.assert_array_equal(np.asarray(got), 3 * np.arange(8.0))
  assert seen == {"in": (frozenset({"data"}), frozenset()), "out": frozenset({"data"})}
  assert _shard.varying_axes(x) == frozenset()  # outside shard_map


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_grad_in_one_device_shard_map(backend, rng):
  # In-process: value_and_grad of jmoe.moe inside shard_map (check_vma) equals
  # the plain call; before kernel outputs were typed, the custom_vjp backward
  # was rejected ("the manual axis types do not match").
  t, d, f, e = 24, 16, 24, 4
  x = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
  params = jmoe.MoEParams(
      jnp.asarray(rng.standard_normal((d, e)), jnp.float32),
      jnp.asarray(rng.standard_normal((e, d, 2 * f)) / 4, jnp.float32),
      jnp.asarray(rng.standard_normal((e, f, d)) / 4, jnp.float32))

  def loss(x, p):
    y, aux = jmoe.moe(x, p, top_k=2, backend=backend)
    return jnp.sum(y * y) + aux.load_balancing_loss

  grads = jax.grad(loss, (0, 1))
  want = jax.jit(grads)(x, params)
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  got = jax.jit(jax.shard_map(grads, mesh=mesh, in_specs=(P("data"), P()),
                              out_specs=(P("data"), P())))(x, params)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


def test_explicit_sharding_errors():
  # Tokens split over an explicit axis run per shard (the worker checks the
  # values); a split feature axis, and grouped_matmul's contiguous row groups,
  # are clear errors naming the argument.
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  put = lambda a, spec: jax.device_put(a, jax.sharding.NamedSharding(mesh, spec))  # noqa: E731
  x = jnp.ones((8, 4))
  params = jmoe.MoEParams(jnp.ones((4, 2)), jnp.ones((2, 4, 8)), jnp.ones((2, 4, 4)))
  moe = jax.jit(lambda x: jmoe.moe(x, params, top_k=1, backend="reference"))
  with jax.set_mesh(mesh):
    y, aux = moe(put(x, P("data")))
    assert y.sharding.spec == P("data", None) and int(aux.tokens_per_expert.sum()) == 8
    with pytest.raises(ValueError, match=r"x is sharded over explicit mesh axes .* feature"):
      moe(put(x, P(None, "data")))
    with pytest.raises(ValueError, match=r"lhs is sharded over explicit mesh axes"):
      jax.jit(lambda a: jmoe.grouped_matmul(
          a, jnp.ones((2, 4, 3)), jnp.array([4, 4], jnp.int32), backend="reference"))(
              put(x, P("data")))
