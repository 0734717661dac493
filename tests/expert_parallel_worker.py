"""Runs `jmoe.moe_expert_parallel` on several host CPU devices; prints JSON.

Started by `tests/test_expert_parallel.py` in a fresh process (the host device
count is fixed when jax starts):

  python tests/expert_parallel_worker.py BACKEND DEVICES

Each check prints the largest error relative to the largest magnitude of what
it is compared with (the unsharded `jmoe.moe`, or an oracle built from the
same routing), or the exception it raised.
"""

from __future__ import annotations

import functools
import json
import os
import sys

BACKEND, DEVICES = sys.argv[1], int(sys.argv[2])
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_force_host_platform_device_count={DEVICES}")
os.environ["JAX_PLATFORMS"] = "cpu"

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import helpers  # noqa: E402
import jmoe  # noqa: E402

T, D, F, E, K = 16 * DEVICES, 32, 48, 2 * DEVICES, 2
EXPERT_SPECS = jmoe.MoEParams(P(), P("ep"), P("ep"))


def _inputs():
  return helpers.moe_case(T, D, F, E)


def _mesh(shape=(DEVICES,), names=("ep",)):
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape),
                       devices=jax.devices()[:DEVICES])


def _ep(mesh, token_spec=P("ep"), **kw):
  """`(x, params) -> (y, aux)` through `moe_expert_parallel` under `shard_map`."""
  body = functools.partial(jmoe.moe_expert_parallel, top_k=K, axis_name="ep",
                           backend=BACKEND, **kw)
  return jax.shard_map(body, mesh=mesh, in_specs=(token_spec, EXPERT_SPECS),
                       out_specs=(token_spec, P()))


def _unsharded(x, params, **kw):
  return jmoe.moe(x, params, top_k=K, backend=BACKEND, **kw)


def _loss(fn, x, params, ct):
  y, aux = fn(x, params)
  return jnp.sum(y * ct) + aux.load_balancing_loss + aux.router_z_loss, (y, aux)


def _fwd_grads(fn, x, params, ct):
  (_, (y, aux)), grads = jax.value_and_grad(
      functools.partial(_loss, fn), (0, 1), has_aux=True)(x, params, ct)
  return y, aux, grads


def _against_unsharded(name, ep_fn, x, params, ct, **kw) -> dict:
  want_y, want_aux, want_g = jax.jit(functools.partial(
      _fwd_grads, functools.partial(_unsharded, **kw)))(x, params, ct)
  got_y, got_aux, got_g = jax.jit(functools.partial(_fwd_grads, ep_fn))(x, params, ct)
  return {
      f"{name} y": helpers.tree_relative_error(got_y, want_y),
      f"{name} aux": helpers.tree_relative_error(got_aux, want_aux),
      f"{name} grads x, router, up, down": helpers.tree_relative_error(got_g, want_g),
  }


def _sent_oracle(routing, cap):
  """numpy: which kept copies each token shard sends within `cap` per device."""
  ids = np.asarray(routing.expert_ids).reshape(DEVICES, -1)
  kept = np.asarray(routing.kept).reshape(DEVICES, -1)
  sent = np.zeros_like(kept)
  for shard in range(DEVICES):
    used = np.zeros(DEVICES, int)
    for c, (i, keep) in enumerate(zip(ids[shard], kept[shard])):
      dest = i // (E // DEVICES)
      if keep and used[dest] < cap:
        sent[shard, c] = True
        used[dest] += 1
  return sent.reshape(T, K)


def _layers(mesh, x) -> dict:
  """The Flax layers with `expert_parallel=` against the same layers without
  (same seeds: same parameters and jitter noise): y, aux, parameter grads."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  import jmoe.linen  # pylint: disable=import-outside-toplevel
  import jmoe.nnx  # pylint: disable=import-outside-toplevel

  ep = jmoe.ExpertParallel(mesh, "ep")
  xs = x.reshape(DEVICES * 4, -1, D)  # [batch, seq, d]; batch split over ep
  kw = dict(router_jitter=0.2, backend=BACKEND)

  def nnx_run(expert_parallel):
    layer = jmoe.nnx.MoELayer(D, E, F, K, expert_parallel=expert_parallel,
                              rngs=nnx.Rngs(params=0, router=1), **kw)

    def loss(layer):
      y, aux = layer(xs)
      return jnp.sum(y ** 2) + aux["total_aux_loss"], (y, aux)

    (_, (y, aux)), grads = nnx.value_and_grad(loss, has_aux=True)(layer)
    return y, aux, nnx.state(grads, nnx.Param)

  def linen_run(expert_parallel):
    layer = jmoe.linen.MoELayer(D, E, F, K, expert_parallel=expert_parallel, **kw)
    variables = layer.init(jax.random.key(0), xs, deterministic=True)

    def loss(params):
      y, aux = layer.apply({"params": params}, xs, deterministic=False,
                           rngs={"router": jax.random.key(1)})
      return jnp.sum(y ** 2) + aux["total_aux_loss"], (y, aux)

    (_, (y, aux)), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
    return y, aux, grads

  del nn
  out = {}
  for name, run in (("nnx", nnx_run), ("linen", linen_run)):
    want, got = run(None), run(ep)
    out[f"{name} layer with jitter y, aux, grads"] = helpers.tree_relative_error(got, want)
  # ... and the layer did run the experts split (an all_to_all in its program).
  layer = jmoe.linen.MoELayer(D, E, F, K, expert_parallel=ep, backend=BACKEND)
  variables = layer.init(jax.random.key(0), xs, deterministic=True)
  program = str(jax.make_jaxpr(lambda v: layer.apply(v, xs, deterministic=True))(variables))
  out["layer runs all_to_all"] = 0.0 if "all_to_all" in program else 1.0
  return out


def main() -> dict:
  x, params, ct = _inputs()
  mesh = _mesh()
  out = {"devices": DEVICES}
  out.update(_against_unsharded("dropless", _ep(mesh), x, params, ct))

  # Every token's two choices are experts 0 and 1, both on device 0, which so
  # receives every copy of every shard (the default send capacity's worst
  # case); the bias cancels in the normalised weights.
  bias = jnp.zeros((E,), jnp.float32).at[:2].set(30.0)
  out.update(_against_unsharded(
      "all copies to device 0",
      _ep(mesh, logit_bias=bias), x, params, ct, logit_bias=bias))

  # Jitter: each device's rows get the unsharded call's noise.
  key = jax.random.key(3)
  out.update(_against_unsharded(
      "jitter", _ep(mesh, jitter_eps=0.3, rng=key), x, params, ct, jitter_eps=0.3, rng=key))
  # ... and each device draws only its own rows' noise, never all [T, D] of it.
  out["jitter noise is per device"] = float(helpers.compiled_holds_f32(
      _ep(mesh, jitter_eps=0.3, rng=key), (x, params), [(T, D)]))

  # 2-D mesh: tokens split over (data, ep), experts over ep.
  if DEVICES % 2 == 0 and DEVICES >= 4:
    mesh2 = _mesh((2, DEVICES // 2), ("data", "ep"))
    ep2 = _ep(mesh2, token_spec=P(("data", "ep")), token_axes=("data", "ep"))
    # e must be a multiple of the ep axis: E = 2 * DEVICES experts, DEVICES // 2 devices.
    out.update(_against_unsharded("2-D mesh", ep2, x, params, ct))

  out.update(_layers(mesh, x))

  # Capacity per device equals jmoe.moe's on explicitly split tokens.
  emesh = jax.make_mesh((DEVICES,), ("ep",), axis_types=(AxisType.Explicit,),
                        devices=jax.devices()[:DEVICES])
  x_split = jax.device_put(x, jax.NamedSharding(emesh, P("ep")))
  with jax.set_mesh(emesh):
    want_y, want_aux = jax.jit(functools.partial(_unsharded, capacity_factor=0.75))(
        x_split, params)
  got_y, got_aux = jax.jit(_ep(mesh, capacity_factor=0.75))(x, params)
  out["capacity per device y"] = helpers.tree_relative_error(got_y, want_y)
  out["capacity per device aux"] = helpers.tree_relative_error(got_aux, want_aux)

  # A send capacity below the need: the copies past it are dropped and counted.
  cap = 3
  got_y, got_aux = jax.jit(_ep(mesh, send_capacity=cap, logit_bias=bias))(x, params)
  routing = jmoe.route(x, params.router_kernel, top_k=K, logit_bias=bias, backend=BACKEND)
  sent = _sent_oracle(routing, cap)
  want_y = jmoe.expert_ffn(x, routing.expert_ids, routing.weights, jnp.asarray(sent),
                           params.up_kernel, params.down_kernel, backend=BACKEND)
  overflow = int(np.sum(np.asarray(routing.kept) & ~sent))
  assert overflow > 0, "the check needs copies past the send capacity"
  out["send_capacity y"] = helpers.tree_relative_error(got_y, want_y)
  out["send_capacity dropped count"] = float(abs(int(got_aux.dropped_count) - overflow))
  want_tpe = np.bincount(np.asarray(routing.expert_ids)[sent], minlength=E)
  out["send_capacity tokens per expert"] = float(
      np.max(np.abs(np.asarray(got_aux.tokens_per_expert) - want_tpe)))
  return out


if __name__ == "__main__":
  print("RESULT " + json.dumps(main()), flush=True)
