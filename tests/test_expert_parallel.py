"""`jmoe.moe_expert_parallel`: experts split over a mesh axis (all-to-all).

The multi-device checks run `tests/expert_parallel_worker.py` in a fresh
process with 4 host CPU devices; the in-process ones use a one-device mesh
(the exchange is then an identity, but the slots, the padding and the
shard_map typing are those of a larger mesh) and the error checks.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import helpers
import jmoe

WORKER = pathlib.Path(__file__).with_name("expert_parallel_worker.py")
CHECKS = [f"{case} {what}" for case in ("dropless", "all copies to device 0", "jitter", "2-D mesh")
          for what in ("y", "aux", "grads x, router, up, down")] + [
              "nnx layer with jitter y, aux, grads", "linen layer with jitter y, aux, grads",
              "layer runs all_to_all", "jitter noise is per device",
              "capacity per device y", "capacity per device aux", "send_capacity y",
              "send_capacity dropped count", "send_capacity tokens per expert"]
SPECS = jmoe.MoEParams(P(), P("ep"), P("ep"))


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_expert_parallel_matches_unsharded(backend):
  # 4 devices, 2 experts each: y, the losses and counts, and the gradients
  # w.r.t. x and every weight equal jmoe.moe's; all copies sent to one device;
  # a 2-D (data, ep) mesh; capacity per device as jmoe.moe on split tokens; a
  # send capacity that drops copies, counted exactly.
  result = helpers.run_worker(WORKER, backend, 4)
  errors = {k: v for k, v in result.items() if k != "devices"}
  assert sorted(errors) == sorted(CHECKS), errors
  for name, err in errors.items():
    assert isinstance(err, float) and err < 1e-5, (name, err)


def _inputs(rng, t=24, d=16, f=24, e=4, dtype=jnp.float32):
  x = jnp.asarray(rng.standard_normal((t, d)), dtype)
  params = jmoe.MoEParams(
      jnp.asarray(rng.standard_normal((d, e)), dtype),
      jnp.asarray(rng.standard_normal((e, d, 2 * f)) / np.sqrt(d), dtype),
      jnp.asarray(rng.standard_normal((e, f, d)) / np.sqrt(f), dtype))
  return x, params


def _one_device(backend, **kw):
  mesh = jax.make_mesh((1,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
  body = functools.partial(jmoe.moe_expert_parallel, top_k=2, axis_name="ep",
                           backend=backend, **kw)
  return jax.shard_map(body, mesh=mesh, in_specs=(P("ep"), SPECS),
                       out_specs=(P("ep"), P()))


def _fwd_grads(fn, x, params):
  def loss(x, p):
    y, aux = fn(x, p)
    return jnp.sum(y.astype(jnp.float32) ** 2) + aux.load_balancing_loss, (y, aux)

  (_, (y, aux)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, params)
  return y, aux, grads


def _global_arrays(backend):
  """`jmoe.ExpertParallel.moe` (its own shard_map) on a one-device mesh."""
  mesh = jax.make_mesh((1,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))
  return functools.partial(jmoe.ExpertParallel(mesh, "ep").moe, top_k=2, backend=backend)


def _compare(backend, dtype, rng, make=_one_device):
  x, params = _inputs(rng, dtype=dtype)
  want = jax.jit(functools.partial(
      _fwd_grads, lambda x, p: jmoe.moe(x, p, top_k=2, backend=backend)))(x, params)
  got = jax.jit(functools.partial(_fwd_grads, make(backend)))(x, params)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    helpers.assert_close(g, w, dtype)


@pytest.mark.parametrize("make", [_one_device, _global_arrays])
@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_one_device_matches_moe(backend, make, rng):
  _compare(backend, jnp.float32, rng, make)


@pytest.mark.gpu
@pytest.mark.parametrize("make", [_one_device, _global_arrays])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_one_device_matches_moe_triton(dtype, make, rng):
  _compare("triton", dtype, rng, make)


def test_expert_parallel_errors(rng):
  x, params = _inputs(rng)
  with pytest.raises(ValueError, match="inside jax.shard_map with axis_name='ep'"):
    jmoe.moe_expert_parallel(x, params, top_k=2, axis_name="ep", backend="reference")
  with pytest.raises(ValueError, match="token_axes must include axis_name='ep'"):
    jmoe.moe_expert_parallel(x, params, top_k=2, axis_name="ep", token_axes=("data",),
                             backend="reference")
  mesh = jax.make_mesh((1,), ("ep",), axis_types=(jax.sharding.AxisType.Auto,))

  def run(params, **kw):
    fn = functools.partial(jmoe.moe_expert_parallel, top_k=2, axis_name="ep",
                           backend="reference", **kw)
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P("ep"), SPECS),
                                 out_specs=(P("ep"), P())))(x, params)

  few = params._replace(up_kernel=params.up_kernel[:3], down_kernel=params.down_kernel[:3])
  with pytest.raises(ValueError, match=r"up_kernel must hold .* e / n = 4 / 1 experts"):
    run(few)
  with pytest.raises(ValueError, match="send_capacity must be >= 1"):
    run(params, send_capacity=0)


def test_layer_expert_parallel_argument():
  """The Flax layers take a `jmoe.ExpertParallel` (or None), nothing else."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  import jmoe.nnx  # pylint: disable=import-outside-toplevel

  with pytest.raises(ValueError, match="expert_parallel must be None or a jmoe.ExpertParallel"):
    jmoe.nnx.MoELayer(8, 4, 8, 2, expert_parallel="ep", rngs=nnx.Rngs(0))
