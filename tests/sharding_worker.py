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

import helpers  # noqa: E402
import jmoe  # noqa: E402
import jmoe.linen  # noqa: E402

T, D, F, E, K = 16 * DEVICES, 32, 48, 8, 2


def _inputs():
  return helpers.moe_case(T, D, F, E)


def _loss(x, params, ct):
  """A per-token loss (its sum over shards is the global loss): no aux terms,
  whose per-shard values differ from the global ones."""
  y, _ = jmoe.moe(x, params, top_k=K, backend=BACKEND)
  return jnp.sum(y * ct), y


def _grads(x, params, ct):
  (_, y), (gx, gp) = jax.value_and_grad(_loss, (0, 1), has_aux=True)(x, params, ct)
  return y, gx, gp


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
    out[f"{kind} shard_map"] = helpers.tree_relative_error(fn(*args), want)

    # check_vma=False: the user sums the weight gradients.
    def summed(x, p, c):
      y, gx, gp = _grads(x, p, c)
      return y, gx, jax.lax.psum(gp, "data")

    fn = jax.jit(jax.shard_map(summed, mesh=mesh, in_specs=(P("data"), P(), P("data")),
                               out_specs=(P("data"), P("data"), P()), check_vma=False))
    out[f"{kind} shard_map check_vma=False"] = helpers.tree_relative_error(fn(*args), want)

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
    out[f"{kind} shard_map grouped_matmul remat rhs grad"] = helpers.tree_relative_error(
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
    out[f"{kind} shard_map linen layer"] = helpers.tree_relative_error(
        fn(jax.device_put(variables, NamedSharding(mesh, P())), args[0], args[2]), layer_want)

    # Plain jit on sharded inputs (explicit: jmoe runs each token shard).
    with jax.set_mesh(mesh):
      got = jax.jit(_grads)(*args)
    out[f"{kind} jit"] = helpers.tree_relative_error(got, want)
  out.update(_auto_to_explicit(x, params, ct, want))
  out.update(_explicit_checks(x, params, ct))
  return out


def _auto_to_explicit(x, params, ct, want) -> dict:
  """On an `Auto` mesh, `jax.sharding.explicit_axes` makes the split of the
  tokens explicit for the MoE call, so jmoe runs each shard (README)."""
  mesh = _mesh(AxisType.Auto)

  def grads(x, params, ct):
    moe = jax.sharding.explicit_axes(
        lambda x, p: jmoe.moe(x, p, top_k=K, backend=BACKEND)[0],
        axes="data", in_sharding=(P("data"), P()))
    loss = lambda x, p: (lambda y: (jnp.sum(y * ct), y))(moe(x, p))  # noqa: E731
    (_, y), (gx, gp) = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, params)
    return y, gx, gp

  with jax.set_mesh(mesh):
    got = jax.jit(grads)(jax.device_put(x, NamedSharding(mesh, P("data"))), params, ct)
  return {"auto jit, explicit_axes around moe": helpers.tree_relative_error(got, want)}


def _aux_loss(x, params, ct, **options):
  """The per-token loss plus both router losses; also returns y and the aux."""
  y, aux = jmoe.moe(x, params, top_k=K, backend=BACKEND, **options)
  return jnp.sum(y * ct) + aux.load_balancing_loss + aux.router_z_loss, (y, aux)


def _explicit_checks(x, params, ct) -> dict:
  """jmoe's own ops on inputs split over an explicit 2-D mesh, under plain jit:
  tokens over both axes, weights FSDP-sharded (resharded to replicated inside),
  against the unsharded call; gradients come back in the weights' shardings."""
  out = {}
  rows = min(2, DEVICES)
  mesh = jax.make_mesh((rows, DEVICES // rows), ("data", "model"),
                       axis_types=(AxisType.Explicit,) * 2, devices=jax.devices()[:DEVICES])
  put = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, P(*spec)))  # noqa: E731
  x3 = x.reshape(2, T // 2, D)
  ct3 = ct.reshape(x3.shape)
  p_sharded = jmoe.MoEParams(put(params.router_kernel, None, "model"),
                             put(params.up_kernel, "data"), put(params.down_kernel))
  x_sharded = put(x3, "data", "model", None)
  grads = jax.jit(jax.value_and_grad(_aux_loss, (0, 1), has_aux=True))
  want = grads(x3, params, ct3)
  with jax.set_mesh(mesh):
    got = grads(x_sharded, p_sharded, ct3)
  out["explicit 2-D mesh moe + losses, fwd and grads"] = helpers.tree_relative_error(got, want)
  specs = [g.sharding.spec for g in jax.tree.leaves(got[1][1])]
  out["explicit weight grads keep the weights' shardings"] = float(
      specs != [P(None, "model"), P("data", None, None), P(None, None, None)])

  # Unsplit inputs under the explicit context mesh (jax has no explicit-sharding
  # rule for the reference's ragged_dot or the kernels' custom calls).
  with jax.set_mesh(mesh):
    got = grads(x3, params, ct3)
  out["explicit context mesh, unsplit x"] = helpers.tree_relative_error(got, want)

  # Jitter: each token gets the unsharded call's noise.
  jit_kw = {"jitter_eps": 0.1, "rng": jax.random.key(5)}
  want = jax.jit(lambda a: _aux_loss(a, params, ct3, **jit_kw)[1])(x3)
  with jax.set_mesh(mesh):
    got = jax.jit(lambda a: _aux_loss(a, p_sharded, ct3, **jit_kw)[1])(x_sharded)
  out["explicit jitter"] = helpers.tree_relative_error(got, want)
  if DEVICES > 1:  # ... and each device draws only its own tokens' noise.
    with jax.set_mesh(mesh):
      out["explicit jitter noise is per device"] = float(helpers.compiled_holds_f32(
          lambda a: _aux_loss(a, p_sharded, ct3, **jit_kw)[1][0], (x_sharded,),
          [(T, D), x3.shape]))

  # A capacity is per shard: each shard's y is that of the shard on its own,
  # and the dropped count is the total.
  cap = {"capacity_factor": 0.5}
  x2 = x.reshape(DEVICES, T // DEVICES, D)
  shard_ys, dropped = [], 0
  for i in range(DEVICES):
    y_i, aux_i = jax.jit(lambda a: jmoe.moe(a, params, top_k=K, backend=BACKEND, **cap))(x2[i])
    shard_ys.append(y_i)
    dropped += int(aux_i.dropped_count)
  with jax.set_mesh(mesh):
    y, aux = jax.jit(lambda a: jmoe.moe(a, p_sharded, top_k=K, backend=BACKEND, **cap))(
        put(x2, ("data", "model"), None, None))
  out["explicit capacity per shard"] = helpers.tree_relative_error(y, jnp.stack(shard_ys))
  # The losses count routed copies (before dropping): those of the unsharded call.
  _, aux_all = jax.jit(lambda a: jmoe.moe(a, params, top_k=K, backend=BACKEND, **cap))(x)
  out["explicit capacity losses"] = helpers.tree_relative_error(
      (aux.load_balancing_loss, aux.router_z_loss),
      (aux_all.load_balancing_loss, aux_all.router_z_loss))
  out["explicit dropped count is the total"] = float(int(aux.dropped_count) != dropped
                                                      or dropped == 0)

  # route and expert_ffn on their own.
  rows = put(x, ("data", "model"), None)
  want_r = jax.jit(lambda a: jmoe.route(a, params.router_kernel, top_k=K, backend=BACKEND))(x)
  with jax.set_mesh(mesh):
    got_r = jax.jit(lambda a: jmoe.route(a, p_sharded.router_kernel, top_k=K,
                                         backend=BACKEND))(rows)
  out["explicit route"] = helpers.tree_relative_error(got_r, want_r)

  def ffn_loss(a, up, down, r):
    y = jmoe.expert_ffn(a, r.expert_ids, r.weights, r.kept, up, down, backend=BACKEND)
    return jnp.sum(y * ct)

  ffn_grads = jax.jit(jax.value_and_grad(ffn_loss, (0, 1, 2)))
  want = ffn_grads(x, params.up_kernel, params.down_kernel, want_r)
  with jax.set_mesh(mesh):
    got = ffn_grads(rows, p_sharded.up_kernel, p_sharded.down_kernel, want_r)
  out["explicit expert_ffn fwd and grads"] = helpers.tree_relative_error(got, want)

  # The Flax Linen layer on the split tokens, its variables replicated.
  layer = jmoe.linen.MoELayer(D, E, F, K, backend=BACKEND)
  variables = layer.init(jax.random.key(3), x, deterministic=True)
  apply = jax.jit(lambda v, a: layer.apply(v, a, deterministic=True))
  want = apply(variables, x)
  with jax.set_mesh(mesh):
    got = apply(variables, rows)
  out["explicit jit linen layer"] = helpers.tree_relative_error(got, want)
  return out


if __name__ == "__main__":
  print("RESULT " + json.dumps(main()))
