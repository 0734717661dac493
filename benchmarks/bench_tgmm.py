"""Times `jmoe.ops.tgmm` (Triton) against XLA on MoE weight-gradient shapes.

Run on a CUDA GPU with jax-triton installed::

  python benchmarks/bench_tgmm.py [--out results.md] [--quick]

For each case: the Triton tgmm (autotuned; float32 output unless noted), the
XLA reference `jax.lax.ragged_dot_general` with a ragged contraction (the
gathers and row scale included where the case has them), and a dense
`lax.dot_general` contracting all `m` rows at once (same FLOPs, one group: the
cuBLAS ceiling). TFLOP/s = 2 * m * ka * n / time. Timing: jitted calls
dispatched asynchronously, `n` calls per repetition ended by one
`block_until_ready`, median per-call time over repetitions, after warm-up
(compile + autotune).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jmoe.ops.tgmm import TgmmConfig, prescale_rows, tgmm, tgmm_reference


def bench(fn, *args, min_time=0.05, reps=5) -> float:
  """Median seconds per call of `fn(*args)` (already jitted)."""
  jax.block_until_ready(fn(*args))  # compile (+ autotune)
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  one = time.perf_counter() - t0
  if one > 0.25:
    reps = 2
  n = max(1, min(50, int(min_time / max(one, 1e-6))))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for _ in range(n):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / n)
  return statistics.median(times)


def skewed_sizes(rng, m: int, g: int, n_empty: int = 2) -> np.ndarray:
  w = rng.lognormal(0.0, 1.0, size=g)
  w[rng.choice(g, size=n_empty, replace=False)] = 0.0
  sizes = np.floor(w / w.sum() * m).astype(np.int64)
  sizes[np.argmax(w)] += m - sizes.sum()
  return sizes.astype(np.int32)


def make_case(m, ka, n, g, *, skewed, a_index=False, b_index=False, scale=False,
              seed=0):
  rng = np.random.default_rng(seed)
  k1, k2 = jax.random.split(jax.random.key(seed))
  a = jax.random.normal(k1, (m, ka), jnp.bfloat16)
  b = jax.random.normal(k2, (m, n), jnp.bfloat16)
  sizes = skewed_sizes(rng, m, g) if skewed else np.full(g, m // g, np.int32)
  kw = {}
  if a_index:
    kw["a_row_index"] = jnp.asarray(rng.permutation(m).astype(np.int32))
  if b_index:
    kw["b_row_index"] = jnp.asarray(rng.permutation(m).astype(np.int32))
  if scale:
    kw["row_scale"] = jnp.asarray(rng.uniform(0.1, 1.0, m).astype(np.float32))
  return a, b, jnp.asarray(sizes), kw


CASES = (
    # name, (m, ka, n, g), skewed, a_index, b_index, scale
    ("8 experts (Mixtral up: d=4096, 2f=14336)", (16384, 4096, 14336, 8),
     False, False, False, False),
    ("64 experts, balanced", (49152, 2048, 2816, 64), False, False, False, False),
    ("64 experts, skewed, 2 empty", (49152, 2048, 2816, 64), True, False, False,
     False),
    ("64 experts, skewed, n=1408", (49152, 2048, 1408, 64), True, False, False,
     False),
    ("dW_up-like: a gathered (a_row_index)", (49152, 2048, 2816, 64), True, True,
     False, False),
    ("dW_down-like: b gathered + row_scale", (49152, 1408, 2048, 64), True, False,
     True, True),
    ("dW_down-like, 8 experts: b gathered + row_scale", (16384, 14336, 4096, 8),
     False, False, True, True),
)

PINNED = (
    TgmmConfig(64, 128, 256, 8, 8, 3),
    TgmmConfig(64, 128, 256, 8, 8, 4),
    TgmmConfig(64, 256, 128, 8, 8, 3),
    TgmmConfig(64, 128, 128, 8, 8, 4),
)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default="")
  parser.add_argument("--quick", action="store_true", help="first case only")
  parser.add_argument("--no-pinned", action="store_true")
  parser.add_argument("--backend", default="triton",
                      help="'interpret' with --shrink for a CPU smoke test")
  parser.add_argument("--shrink", type=int, default=1,
                      help="divide m, ka, n by this (smoke tests)")
  args = parser.parse_args(argv)
  backend = args.backend

  rows = []

  def record(case, variant, m, ka, n, seconds):
    tflops = 2.0 * m * ka * n / seconds / 1e12
    rows.append((case, variant, seconds * 1e3, tflops))
    print(f"{case:44s} {variant:44s} {seconds * 1e3:9.3f} ms {tflops:7.1f} TFLOP/s",
          flush=True)

  dense = jax.jit(lambda a, b: jax.lax.dot_general(
      a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32))
  cases = CASES[:1] if args.quick else CASES
  for ci, (name, (m, ka, n, g), skewed, a_idx, b_idx, scale) in enumerate(cases):
    m, ka, n = m // args.shrink, ka // args.shrink, n // args.shrink
    a, b, sizes, kw = make_case(m, ka, n, g, skewed=skewed, a_index=a_idx,
                                b_index=b_idx, scale=scale, seed=ci)
    label = f"{name} [{m}x{ka}]^T[{m}x{n}] g={g}"
    fn = jax.jit(functools.partial(tgmm, backend=backend, **kw))
    out = fn(a, b, sizes)
    ref = jax.jit(functools.partial(tgmm_reference, **kw))
    expected = ref(a, b, sizes)  # spot check against XLA
    err = float(jnp.max(jnp.abs(out - expected)) / jnp.max(jnp.abs(expected)))
    del expected
    print(f"{label}: rel. error vs ragged_dot_general {err:.2e}", flush=True)
    record(label, "jmoe tgmm (Triton, autotuned) f32 out", m, ka, n,
           bench(fn, a, b, sizes))
    if ci == 0:
      fn16 = jax.jit(functools.partial(tgmm, backend=backend,
                                       out_dtype=jnp.bfloat16, **kw))
      record(label, "jmoe tgmm (Triton, autotuned) bf16 out", m, ka, n,
             bench(fn16, a, b, sizes))
      if not args.no_pinned:
        for cfg in PINNED if backend == "triton" else ():
          fnc = jax.jit(functools.partial(tgmm, backend=backend, config=cfg, **kw))
          variant = (f"  pinned {cfg.block_m}x{cfg.block_k}x{cfg.block_n} "
                     f"w{cfg.num_warps} s{cfg.num_stages}")
          record(label, variant, m, ka, n, bench(fnc, a, b, sizes))
    if scale:
      # The default "prescale" includes XLA's scaling pass; time it alone too.
      pre = jax.jit(functools.partial(prescale_rows, a_row_index=kw.get("a_row_index"),
                                      row_scale=kw["row_scale"]))
      record(label, "  of which XLA prescale pass (a * row_scale)", m, ka, n,
             bench(pre, a))
      fnk = jax.jit(functools.partial(tgmm, backend=backend, row_scale_mode="kernel",
                                      **kw))
      record(label, "  row_scale_mode='kernel' (old path)", m, ka, n,
             bench(fnk, a, b, sizes))
    record(label, "XLA ragged_dot_general (+gather/scale)", m, ka, n,
           bench(ref, a, b, sizes, reps=3))
    if not (a_idx or b_idx or scale):
      record(label, "dense dot_general, same FLOPs (cuBLAS)", m, ka, n,
             bench(dense, a, b))
    del a, b, out

  table = ["| case | variant | ms | TFLOP/s |", "|---|---|---|---|"]
  table += [f"| {c} | {v} | {ms:.3f} | {tf:.1f} |" for c, v, ms, tf in rows]
  text = "\n".join(table)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
