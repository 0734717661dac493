"""Checks tokamax where it was carried (`install.sh`): which implementations load,
`tokamax.ragged_dot` alone (error against `jax.lax.ragged_dot`, time), and the
benchmark's tokamax MoE per gradient against the dropless reference.

  python3 benchmarks/offline/tokamax_probe.py [--cases small] [--shapes MxKxNxG,...]

The benchmark report keeps only the largest-error gradient per row; this prints
each one (dx, d_router, d_up, d_down).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from benchmarks import cases as cases_lib
from benchmarks import implementations as impls_lib


def ragged_dot_alone(tokamax, m: int, k: int, n: int, g: int) -> None:
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (m, k), jnp.bfloat16)
  w = (jax.random.normal(kw, (g, k, n), jnp.float32) / k ** 0.5).astype(jnp.bfloat16)
  sizes = jnp.full((g,), m // g, jnp.int32)
  impl = impls_lib.tokamax_implementation()
  fn = jax.jit(lambda x, w: tokamax.ragged_dot(x, w, sizes, implementation=impl))
  ref = jax.lax.ragged_dot(x, w, sizes, preferred_element_type=jnp.float32)
  err = impls_lib.rel_err(fn(x, w), ref)
  jax.block_until_ready(fn(x, w))
  calls = 20
  start = time.perf_counter()
  for _ in range(calls):
    out = fn(x, w)
  jax.block_until_ready(out)
  dt = (time.perf_counter() - start) / calls
  print(f"ragged_dot m={m} k={k} n={n} g={g} implementation={impl}: rel err {err:.1e}, "
        f"{dt * 1e3:.3f} ms, {2 * m * k * n / dt / 1e12:.0f} TFLOP/s")


def moe_gradients(case_name: str) -> None:
  case = cases_lib.CASES[case_name]
  x, params = cases_lib.make_inputs(case)
  dy = impls_lib.make_cotangent(case)
  grads = {}
  for name in ("ref-sorted", "tokamax", "jmoe"):
    step, _ = impls_lib.make_step(impls_lib.IMPLS[name].make(case), "fwdbwd")
    _, (dx, dparams) = step(x, params, dy)
    grads[name] = {"dx": dx, "d_router": dparams.router_kernel,
                   "d_up": dparams.up_kernel, "d_down": dparams.down_kernel}
  for name in ("tokamax", "jmoe"):
    print(f"{case_name} fwd+bwd {name} vs ref-sorted: " + ", ".join(
        f"{g} {impls_lib.rel_err(grads[name][g], grads['ref-sorted'][g]):.1e}" for g in grads[name]))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default="small")
  parser.add_argument("--shapes", default="16384x768x6144x8,49152x2048x2816x64",
                      help="ragged_dot shapes m x k x n x groups ('' = none)")
  args = parser.parse_args()
  import tokamax  # pylint: disable=import-outside-toplevel
  from tokamax._src.ops.ragged_dot import api  # pylint: disable=import-outside-toplevel

  print("devices", jax.devices(), "; tokamax implementations", list(api.IMPLEMENTATIONS))
  for shape in filter(None, args.shapes.split(",")):
    ragged_dot_alone(tokamax, *map(int, shape.split("x")))
  for name in args.cases.split(","):
    moe_gradients(name)


if __name__ == "__main__":
  main()
