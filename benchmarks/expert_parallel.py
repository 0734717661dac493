"""What `jmoe.moe_expert_parallel` costs against `jmoe.moe`, interleaved.

Times the whole layer forward and forward+backward (`value_and_grad` of
`sum(y * dy) + lb + z` w.r.t. x and every parameter, as
`benchmarks.explicit_split`) of `jmoe.moe` on all tokens and of
`moe_expert_parallel` under `shard_map` over all local devices (tokens and
experts split over one `ep` axis), in alternating rounds in one process. On one
device the exchange is an identity, and the difference is the send-slot
scatter, the padded buffers and the float32 combine. Prints the medians.

Usage::

  python -m benchmarks.expert_parallel --case deepseek --rounds 6 --min-sample-s 0.2
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import jax
from jax.sharding import PartitionSpec as P

import jmoe
from benchmarks.ab_env import add_round_args
from benchmarks.cases import CASES
from benchmarks.explicit_split import modes, programs, time_variants


def expert_parallel_layer(mesh):
  """`(x, params, top_k=, backend=) -> (y, aux)` through `moe_expert_parallel`."""

  def layer(x, params, *, top_k, backend):
    fn = jax.shard_map(
        lambda x, p: jmoe.moe_expert_parallel(x, p, top_k=top_k, axis_name="ep",
                                              backend=backend),
        mesh=mesh, in_specs=(P("ep"), jmoe.MoEParams(P(), P("ep"), P("ep"))),
        out_specs=(P("ep"), P()))
    return fn(x, params)

  return layer


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--case", default="deepseek", choices=sorted(CASES))
  add_round_args(parser)
  args = parser.parse_args(argv)
  mesh = jax.make_mesh((jax.device_count(),), ("ep",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  variants = {}
  for name, layer in (("moe", None), ("expert-parallel", expert_parallel_layer(mesh))):
    fwd, fwdbwd, x, params, dy = programs(args.case, args.backend, layer)
    jax.block_until_ready((fwd(x, params), fwdbwd(x, params, dy)))
    variants[name] = (contextlib.nullcontext, modes(fwd, fwdbwd, x, params, dy))
  header = (f"# {jax.devices()[0].device_kind} x {jax.device_count()}; case {args.case}; "
            f"jmoe.moe vs moe_expert_parallel (experts over {jax.device_count()} "
            f"device(s)); {args.rounds} rounds x {args.reps} reps of >= "
            f"{args.min_sample_s} s")
  return time_variants(variants, args, header, ("expert-parallel", "moe"))


if __name__ == "__main__":
  main()
  sys.exit(0)
