"""Runs jmoe under `jax.shard_map` and sharded `jit` on several devices; prints JSON.

Started by `tests/test_sharding.py` in a fresh process, because the number of
host CPU devices (`--xla_force_host_platform_device_count`) is fixed when jax
starts. On a GPU machine it uses the GPUs there are (one is enough to check
the shard_map typing of the Triton path).

  python tests/sharding_worker.py BACKEND DEVICES

For each check it prints the largest error relative to the unsharded call's
largest magnitude (forward and every gradient), or the error it raised.
"""

from __future__ import annotations

import json
import os
import sys

BACKEND, DEVICES = sys.argv[1], int(sys.argv[2])
if BACKEND != "triton":
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={DEVICES}")
  os.environ["JAX_PLATFORMS"] = "cpu"

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jmoe  # noqa: E402
import jmoe.linen  # noqa: E402

T, D, F, E, K = 16 * DEVICES, 32, 48, 8, 2


def _inputs():
  keys = jax.random.split(jax.random.key(7), 5)
  x = jax.random.normal(keys[0], (T, D), jnp.float32)
  params = jmoe.MoEParams(
      jax.random.normal(keys[1], (D, E), jnp.float32) * 0.5,
      jax.random.normal(keys[2], (E, D, 2 * F), jnp.float32) / np.sqrt(D),
      jax.random.normal(keys[3], (E, F, D), jnp.float32) / np.sqrt(F),
  )
  ct = jax.random.normal(keys[4], (T, D), jnp.float32)
  return x, params, ct


def _loss(x, params, ct):
  """A per-token loss (its sum over shards is the global loss): no aux terms,
  whose per-shard values differ from the global ones."""
  y, _ = jmoe.moe(x, params, top_k=K, backend=BACKEND)
  return jnp.sum(y * ct), y


def _grads(x, params, ct):
  (_, y), (gx, gp) = jax.value_and_grad(_loss, (0, 1), has_aux=True)(x, params, ct)
  return y, gx, gp


def _rel_err(got, want) -> float:
  got = jax.tree.leaves(got)
  want = jax.tree.leaves(want)
  return max(float(jnp.max(jnp.abs(g - w)) / jnp.maximum(jnp.max(jnp.abs(w)), 1e-30))
             for g, w in zip(got, want))


def _mesh(axis_type):
  return jax.make_mesh((DEVICES,), ("data",), axis_types=(axis_type,),
                       devices=jax.devices()[:DEVICES])


def main() -> dict:
  x, params, ct = _inputs()
  want = jax.jit(_grads)(x, params, ct)
  out = {"devices": DEVICES, "platform": jax.devices()[0].platform}

  def put(mesh):
    rows = NamedSharding(mesh, P("data"))
    return (jax.device_put(x, rows), jax.device_put(params, NamedSharding(mesh, P())),
            jax.device_put(ct, rows))

  for kind in ("auto", "explicit"):
    mesh = _mesh(AxisType.Auto if kind == "auto" else AxisType.Explicit)
    args = put(mesh)

    # shard_map with its default check_vma: jax types every value with the mesh
    # axes it varies over and sums the replicated weights' cotangents itself.
    fn = jax.jit(jax.shard_map(_grads, mesh=mesh, in_specs=(P("data"), P(), P("data")),
                               out_specs=(P("data"), P("data"), P())))
    out[f"{kind} shard_map"] = _rel_err(fn(*args), want)

    # check_vma=False: the user sums the weight gradients.
    def summed(x, p, c):
      y, gx, gp = _grads(x, p, c)
      return y, gx, jax.lax.psum(gp, "data")

    fn = jax.jit(jax.shard_map(summed, mesh=mesh, in_specs=(P("data"), P(), P("data")),
                               out_specs=(P("data"), P("data"), P()), check_vma=False))
    out[f"{kind} shard_map check_vma=False"] = _rel_err(fn(*args), want)

    # Under shard_map with remat and a per-shard grouped_matmul gradient.
    def gmm_loss(lhs, rhs, sizes):
      out = jax.checkpoint(lambda a, b: jmoe.grouped_matmul(a, b, sizes[0], backend=BACKEND))(
          lhs, rhs)
      return jnp.sum(out * out)

    lhs = x
    rhs = params.up_kernel
    sizes = jnp.tile(jnp.array([[3, 0, 5, 2, 4, 0, 1, 1]], jnp.int32), (DEVICES, 1))
    g_want = sum(
        jax.grad(gmm_loss, (0, 1))(lhs[i * 16:(i + 1) * 16], rhs, sizes[i:i + 1])[1]
        for i in range(DEVICES))
    fn = jax.jit(jax.shard_map(jax.grad(gmm_loss, (0, 1)), mesh=mesh,
                               in_specs=(P("data"), P(), P("data")),
                               out_specs=(P("data"), P())))
    sizes_sharded = jax.device_put(sizes, NamedSharding(mesh, P("data")))
    out[f"{kind} shard_map grouped_matmul remat rhs grad"] = _rel_err(
        fn(args[0], jax.device_put(rhs, NamedSharding(mesh, P())), sizes_sharded)[1], g_want)

    # The Flax Linen layer inside shard_map (its variables replicated).
    layer = jmoe.linen.MoELayer(D, E, F, K, backend=BACKEND)
    variables = layer.init(jax.random.key(3), x, deterministic=True)

    def layer_grads(v, x, c):
      def loss(v, x):
        y, _ = layer.apply(v, x, deterministic=True)
        return jnp.sum(y * c), y
      (_, y), g = jax.value_and_grad(loss, (0, 1), has_aux=True)(v, x)
      return y, g

    layer_want = jax.jit(layer_grads)(variables, x, ct)
    fn = jax.jit(jax.shard_map(layer_grads, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                               out_specs=(P("data"), (P(), P("data")))))
    out[f"{kind} shard_map linen layer"] = _rel_err(
        fn(jax.device_put(variables, NamedSharding(mesh, P())), args[0], args[2]), layer_want)

    # Plain jit on sharded inputs.
    try:
      with jax.set_mesh(mesh):
        got = jax.jit(_grads)(*args)
      out[f"{kind} jit"] = _rel_err(got, want)
    except ValueError as e:
      out[f"{kind} jit"] = f"ValueError: {e}"
  return out


if __name__ == "__main__":
  print("RESULT " + json.dumps(main()))
