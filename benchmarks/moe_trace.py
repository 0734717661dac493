"""Where the time of one whole `jmoe.moe` call goes, kernel by kernel (GPU).

The per-stage profile (`benchmarks/stage_profile.py`) times each stage as its
own jitted function; this tool instead traces the real fused program
(`jax.profiler`), forward and forward+backward, and lists every device kernel
with its time per call: the Triton kernels and the XLA glue between them
(gathers, casts, reductions, copies) as XLA scheduled them. Inputs are those of
`benchmarks/gpu_kernels.py` (bf16, SwiGLU, skewed routing).

Usage::

  python -m benchmarks.moe_trace --cases e64,big --calls 5 --out /tmp/moe_trace

`--impls jmoe,einsum-bf16` traces the bf16 one-hot einsum MoE too.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys

import jax
import jax.numpy as jnp

from benchmarks import implementations
from benchmarks import trace_summary
from benchmarks.gpu_kernels import CASES, make_inputs, time_fn


def _programs(case: str, backend: str, impl: str):
  from jmoe.api import moe as jmoe_moe  # pylint: disable=import-outside-toplevel
  from jmoe.types import MoEParams  # pylint: disable=import-outside-toplevel

  t, d, f, e, top_k, _, _ = CASES[case]
  x, _, _, _, up, down, router = make_inputs(t, d, f, e, top_k)
  params = MoEParams(router, up, down)
  ct = jax.random.normal(jax.random.key(8), (t, d), jnp.float32)
  if impl == "jmoe":
    moe = functools.partial(jmoe_moe, backend=backend)
  else:  # the bf16 one-hot einsum MoE of the benchmark (capacity factor 1.25)
    moe = functools.partial(
        implementations.einsum_bf16_moe, activation="swiglu",
        capacity_factor=implementations.EINSUM_CAPACITY_FACTOR)

  def loss(x, p):
    y, aux = moe(x, p, top_k=top_k)
    return jnp.sum(y.astype(jnp.float32) * ct) + aux.load_balancing_loss

  fwd = jax.jit(lambda x, p: moe(x, p, top_k=top_k)[0])
  fb = jax.jit(jax.value_and_grad(loss, (0, 1)))
  return {"fwd": fwd, "fwd+bwd": fb}, (x, params)


def trace_case(case: str, calls: int, out: pathlib.Path, backend: str, top: int,
               impl: str = "jmoe") -> dict:
  """Traces `calls` calls of each mode of `case`; returns
  `{mode: [(kernel, ms per call, launches per call)]}`."""
  fns, args = _programs(case, backend, impl)
  result = {}
  for mode, fn in fns.items():
    for _ in range(3):  # compile, then warm
      jax.block_until_ready(fn(*args))
    log_dir = out / f"{impl}_{case}_{mode.replace('+', '_')}"
    with jax.profiler.trace(str(log_dir)):
      for _ in range(calls):
        res = fn(*args)
      jax.block_until_ready(res)
    print(f"# {impl}: case {case} {CASES[case][:5]} mode {mode}: {calls} calls traced",
          flush=True)
    summary = trace_summary.summarize(str(log_dir), top=top)
    rows = []
    span = 0.0
    for plane in summary.values():
      for name, total_ms, count in plane["top"]:
        rows.append((name, total_ms / calls, count / calls))
      for line, (_, _, line_span) in plane["lines"].items():
        if "Stream" in line:
          span = max(span, line_span)
    total = sum(ms for _, ms, _ in rows)
    # The same program timed untraced, many calls in a row (gpu_kernels.time_fn):
    # wall time per call against the kernels' sum shows the idle time between
    # kernels (or slower clocks under sustained load).
    wall, _, _ = time_fn(fn, *args, reps=5)
    print(f"  per call: kernels (top {top}) {total:.3f} ms summed, stream span "
          f"{span / calls:.3f} ms, untraced wall {wall * 1e3:.3f} ms")
    for name, ms, n in rows:
      print(f"  {ms:9.4f} ms  {n:5.1f}x  {ms / total:6.1%}  {name[:100]}")
    result[mode] = rows
  return result


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default="e64,big")
  parser.add_argument("--calls", type=int, default=5)
  parser.add_argument("--top", type=int, default=40)
  parser.add_argument("--out", default="/tmp/moe_trace")
  parser.add_argument("--backend", default="triton")
  parser.add_argument("--impls", default="jmoe", help="comma-separated: jmoe, einsum-bf16")
  args = parser.parse_args(argv)
  for impl in args.impls.split(","):
    for case in args.cases.split(","):
      trace_case(case, args.calls, pathlib.Path(args.out), args.backend, args.top, impl)
  return 0


if __name__ == "__main__":
  sys.exit(main())
