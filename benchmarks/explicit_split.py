"""What running `jmoe.moe` on explicitly split tokens costs, interleaved.

`jmoe.moe` on an `x` split over an `Explicit` mesh (`jmoe._token_shards`) runs
each device's tokens under `shard_map`, reshards the weights to replicated and
recomputes the load-balancing loss from mesh-summed statistics. This times the
whole layer forward and forward+backward (`value_and_grad` of
`sum(y * dy) + lb + z` w.r.t. x and every parameter) on `x` with no mesh and on
`x` split over all local devices, in alternating rounds in one process; on one
device the difference is the wrapper's own cost. Prints the median over rounds.

Usage::

  python -m benchmarks.explicit_split --case deepseek --rounds 6 --min-sample-s 0.2
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jmoe
from benchmarks.ab_env import add_round_args, time_interleaved
from benchmarks.cases import CASES, make_inputs
from benchmarks.timing import time_fn


def programs(case_name: str, backend: str, layer=None):
  """`(fwd, fwdbwd, x, params, dy)` of `layer(x, params, top_k=, backend=) ->
  (y, aux)` (default `jmoe.moe`) at `case_name`'s shape."""
  case = CASES[case_name]
  x, params = make_inputs(case)
  dy = jax.random.normal(jax.random.key(1), x.shape, x.dtype)
  layer = layer or jmoe.moe

  def forward(x, params):
    return layer(x, params, top_k=case.top_k, backend=backend)

  def loss(x, params, dy):
    y, aux = forward(x, params)
    return (jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32))
            + aux.load_balancing_loss + aux.router_z_loss)

  return jax.jit(forward), jax.jit(jax.value_and_grad(loss, (0, 1))), x, params, dy


def modes(fwd, fwdbwd, x, params, dy) -> dict:
  """`time_interleaved`'s `{mode: (fn, fn_args)}` of one variant's programs."""
  return {"fwd": (fwd, (x, params)), "fwd+bwd": (fwdbwd, (x, params, dy))}


def time_variants(variants: dict, args, header: str, ratio: tuple[str, str]) -> dict:
  """`time_interleaved` of `variants` (medians of `timing.time_fn`), then the
  `ratio[0] / ratio[1]` time of each mode printed; returns the medians."""

  def time_ms(fn, fn_args, args):
    return time_fn(fn, *fn_args, repeats=args.reps,
                   min_sample_s=args.min_sample_s).median_s * 1e3

  result = time_interleaved(variants, args, time_ms, header)
  new, old = ratio
  for mode in ("fwd", "fwd+bwd"):
    print(f"  {new} / {old} {mode}: {result[f'{new} {mode}'] / result[f'{old} {mode}']:.4f}")
  return result


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--case", default="deepseek", choices=sorted(CASES))
  add_round_args(parser)
  args = parser.parse_args(argv)
  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Explicit,))
  # Each variant traced in its own context: no mesh, or the explicit one. A
  # fresh `jax.set_mesh` per entry: one object entered twice sets no mesh.
  contexts = {"unsplit": contextlib.nullcontext, "split": lambda: jax.set_mesh(mesh)}
  variants = {}
  for name, context in contexts.items():
    fwd, fwdbwd, x, params, dy = programs(args.case, args.backend)
    with context():
      if name == "split":
        x = jax.device_put(x, NamedSharding(mesh, P("data")))
      jax.block_until_ready((fwd(x, params), fwdbwd(x, params, dy)))
    variants[name] = (context, modes(fwd, fwdbwd, x, params, dy))
  header = (f"# {jax.devices()[0].device_kind} x {jax.device_count()}; case {args.case}; "
            f"jmoe.moe on x with no mesh (unsplit) vs x split over an explicit mesh "
            f"(split); {args.rounds} rounds x {args.reps} reps of >= {args.min_sample_s} s")
  return time_variants(variants, args, header, ("split", "unsplit"))


if __name__ == "__main__":
  main()
  sys.exit(0)
