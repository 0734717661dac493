"""Times the fused Triton router against the jitted pure-jnp reference.

Usage (on a CUDA GPU with jax-triton)::

  python benchmarks/bench_routing.py --tests --out results.md

`--tests` first runs the GPU router tests (`tests/test_ops_routing.py -k
Triton`) in this process, so their compiled kernels are reused here.
Shapes: t=8192, d in {4096, 2048}, e in {8, 64, 256} (top_k 2 for e=8, else
8), bf16, capacity_factor 1.25, drop_policy "token_order"; at d=4096, e=256
also dropless and "probability" (the cost of the capacity step). Forward =
the whole `Routing`; fwd+bwd = `jax.value_and_grad` of a scalar of weights +
both losses w.r.t. x and router_kernel.

Timing: device time per call, from ONE jitted `lax.scan` over 8 different
inputs `x[i]` (so nothing is hoisted out of the loop) that sums every output
into the carry; median over 5 repetitions after warm-up (the first call
autotunes), divided by 8. An earlier version timed 20 separately dispatched
jitted calls; on the H100 that measured host dispatch (a forward with 9
outputs took longer than forward+backward with 3), not the GPU.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

# The repo root instead of benchmarks/ (whose modules, e.g. profile.py, would
# shadow the standard library).
sys.path[0] = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

from jmoe import reference  # noqa: E402
from jmoe.ops import routing as ops_routing  # noqa: E402


def _time(fn, xs, w, reps=5) -> float:
  """Median seconds per application of `fn(x, w)` over the stacked `xs`."""

  @jax.jit
  def run(xs, w):
    def body(carry, x):
      leaves = jax.tree.leaves(fn(x, w))
      return carry + sum(jnp.sum(a.astype(jnp.float32)) for a in leaves), None

    return jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)[0]

  jax.block_until_ready(run(xs, w))
  jax.block_until_ready(run(xs, w))
  samples = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(run(xs, w))
    samples.append((time.perf_counter() - start) / xs.shape[0])
  return statistics.median(samples)


def _fns(route_fn, k, cf, policy, c_w):
  kw = dict(top_k=k, capacity_factor=cf, drop_policy=policy)

  def fwd(x, w):
    return route_fn(x, w, **kw)

  def loss(x, w):
    r = route_fn(x, w, **kw)
    return jnp.sum(r.weights * c_w) + r.load_balancing_loss + r.router_z_loss

  return fwd, jax.value_and_grad(loss, argnums=(0, 1))


def bench(t=8192):
  rows = []
  cases = []
  for d in (4096, 2048):
    for e in (8, 64, 256):
      cases.append((d, e, 2 if e == 8 else 8, 1.25, "token_order"))
  cases += [(4096, 256, 8, None, "token_order"), (4096, 256, 8, 1.25, "probability")]
  for d, e, k, cf, policy in cases:
    rng = np.random.default_rng(0)
    x = jax.random.normal(jax.random.key(0), (8, t, d), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((d, e)) / np.sqrt(d), jnp.bfloat16)
    c_w = jnp.asarray(rng.standard_normal((t, k)), jnp.float32)
    ours = functools.partial(ops_routing.route, backend="triton")
    times = {}
    for name, route_fn in (("triton", ours), ("reference", reference.route)):
      fwd, fwd_bwd = _fns(route_fn, k, cf, policy, c_w)
      times[name] = (_time(fwd, x, w), _time(fwd_bwd, x, w))
    row = dict(d=d, e=e, k=k, cf=cf, policy=policy,
               tri_f=times["triton"][0], ref_f=times["reference"][0],
               tri_fb=times["triton"][1], ref_fb=times["reference"][1])
    rows.append(row)
    print(_fmt(row), flush=True)
  return rows


HEADER = (
    "| d | e | top_k | capacity | policy | Triton fwd µs | ref fwd µs | speed-up | "
    "Triton fwd+bwd µs | ref fwd+bwd µs | speed-up |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def _fmt(r) -> str:
  return (
      f"| {r['d']} | {r['e']} | {r['k']} | {r['cf']} | {r['policy']} | "
      f"{r['tri_f'] * 1e6:.1f} | {r['ref_f'] * 1e6:.1f} | "
      f"{r['ref_f'] / r['tri_f']:.2f}x | {r['tri_fb'] * 1e6:.1f} | "
      f"{r['ref_fb'] * 1e6:.1f} | {r['ref_fb'] / r['tri_fb']:.2f}x |"
  )


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--tests", action="store_true")
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  lines = []
  if args.tests:
    import pytest  # pylint: disable=import-outside-toplevel

    t0 = time.perf_counter()
    code = pytest.main(["-q", "-rfEs", "--maxfail=6", "--durations=8",
                        "tests/test_ops_routing.py", "-k", "Triton",
                        "-p", "no:cacheprovider"])
    lines.append(f"pytest exit code {int(code)} in {time.perf_counter() - t0:.0f} s")
  dev = jax.devices()[0]
  t0 = time.perf_counter()
  print(HEADER, flush=True)
  rows = bench()
  lines += [
      f"device: {dev.device_kind} ({dev.platform}), host {platform.node()}",
      f"date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}",
      f"jax {jax.__version__}",
      f"benchmark wall time {time.perf_counter() - t0:.0f} s",
      "", HEADER, *map(_fmt, rows),
  ]
  try:
    import jax_triton  # pylint: disable=import-outside-toplevel
    import triton  # pylint: disable=import-outside-toplevel

    lines.insert(0, f"triton {triton.__version__}, jax-triton {jax_triton.__version__}")
  except ImportError:
    pass
  text = "\n".join(lines)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
