"""Does the operand layout bound the tgmm? A GPU probe (no jmoe op involved).

The weight-gradient GEMM `out[g] = A_g^T B_g` contracts over rows (tokens).
jmoe's tgmm reads `A [m, ka]` and `B [m, n]` row-major, so both wgmma operands
are MN-major in shared memory (`HGMMA ... tnspA.tnspB`); the dense Triton GEMMs
that reach ~690 TFLOP/s on the H100 read a K-major `A`. This probe times one
kernel over equal groups (no masks: every size a multiple of the tile) with
each operand stored either row-major (`mn`: `[m, ka]`, the contraction strided)
or transposed (`k`: `[ka, m]`, the contraction contiguous), against XLA's
batched `dot_general` (cuBLAS) on the same layouts. TFLOP/s = 2 * m * ka * n / t.

Usage (GPU, jax-triton installed)::

  python -m benchmarks.tgmm_layout_probe [--cases big,e64]
"""

from __future__ import annotations

import argparse
import itertools

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from benchmarks.gpu_kernels import time_fn
from jmoe.kernels.swizzle import band_swizzle
from jmoe.kernels.tgmm import stride_multiple
from jmoe.ops._call import kernel_call


@triton.jit
def _probe_kernel(
    a_ptr,  # [g * mg, ka] (A_KMAJOR=False) or [ka, g * mg] (True)
    b_ptr,  # [g * mg, n] (B_KMAJOR=False) or [n, g * mg] (True)
    MG_Q,  # rows per group // MULT
    KA_Q,  # ka // MULT
    N_Q,  # n // MULT
    out_ptr,  # [g, ka, n]
    A_KMAJOR: tl.constexpr,
    B_KMAJOR: tl.constexpr,
    MULT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
):
  pid = tl.program_id(0)
  gi = tl.program_id(1)
  MG = MG_Q * MULT
  KA = KA_Q * MULT
  N = N_Q * MULT
  M = MG * tl.num_programs(1)
  pid_k, pid_n = band_swizzle(pid, KA // BLOCK_K, N // BLOCK_N, GROUP_SIZE)
  offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
  offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
  acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
  start = gi * MG
  for row0 in range(start, start + MG, BLOCK_M):
    rows = row0 + tl.arange(0, BLOCK_M)
    if A_KMAJOR:
      a = tl.load(a_ptr + offs_k.to(tl.int64)[:, None] * M + rows[None, :])
    else:
      a = tl.trans(tl.load(a_ptr + rows.to(tl.int64)[:, None] * KA + offs_k[None, :]))
    if B_KMAJOR:
      b = tl.trans(tl.load(b_ptr + offs_n.to(tl.int64)[:, None] * M + rows[None, :]))
    else:
      b = tl.load(b_ptr + rows.to(tl.int64)[:, None] * N + offs_n[None, :])
    acc = tl.dot(a, b, acc)
  out = out_ptr + gi.to(tl.int64) * KA * N + offs_k.to(tl.int64)[:, None] * N + offs_n[None, :]
  tl.store(out, acc.to(out_ptr.dtype.element_ty))


CASES = {  # name: (groups, rows per group, ka, n): the MoE's dW_up
    "big": (8, 2048, 4096, 28672),
    "e64": (64, 768, 2048, 2816),
}
CONFIGS = (  # (BLOCK_M, BLOCK_K, BLOCK_N, warps, stages)
    (64, 128, 256, 8, 3),
    (64, 256, 128, 8, 3),
    # Two programs per SM (<= 113 KB shared memory, <= 128 registers at 8
    # warps): one program's prologue and epilogue overlap the other's loop.
    (64, 128, 128, 8, 3),
    (32, 128, 128, 8, 4),
    (32, 128, 128, 8, 5),
    (64, 128, 128, 4, 3),
)


def probe(a, b, g, mg, ka, n, a_kmajor, b_kmajor, cfg):
  bm, bk, bn, warps, stages = cfg
  mult = stride_multiple(mg) if mg % 16 else 16
  for size in (mg, ka, n):
    assert size % mult == 0
  return kernel_call(
      _probe_kernel, a, b, mg // mult, ka // mult, n // mult,
      out_shape=jax.ShapeDtypeStruct((g, ka, n), jnp.bfloat16),
      grid=((ka // bk) * (n // bn), g), backend="triton", name="tgmm_probe",
      A_KMAJOR=a_kmajor, B_KMAJOR=b_kmajor, MULT=mult, BLOCK_M=bm, BLOCK_K=bk,
      BLOCK_N=bn, GROUP_SIZE=8, num_warps=warps, num_stages=stages)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--cases", default="big,e64")
  parser.add_argument("--layouts", default="mn.mn,k.mn,mn.k,k.k",
                      help="A.B storage: mn (row-major) or k (transposed)")
  parser.add_argument("--configs", default="",
                      help="BLOCK_MxBLOCK_KxBLOCK_NxWARPSxSTAGES,... (default: CONFIGS)")
  args = parser.parse_args(argv)
  configs = CONFIGS if not args.configs else tuple(
      tuple(int(v) for v in c.split("x")) for c in args.configs.split(","))
  layouts = {tuple(part == "k" for part in lay.split(".")) for lay in args.layouts.split(",")}
  print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, "
        f"triton {triton.__version__}", flush=True)
  for name in args.cases.split(","):
    g, mg, ka, n = CASES[name]
    flops = 2.0 * g * mg * ka * n
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (g * mg, ka), jnp.bfloat16)
    b = jax.random.normal(k2, (g * mg, n), jnp.bfloat16)
    stored = {(False, False): (a, b), (True, False): (a.T, b),
              (False, True): (a, b.T), (True, True): (a.T, b.T)}
    stored = {key: tuple(jnp.asarray(x).copy() for x in v) for key, v in stored.items()}
    ref = jnp.einsum("gmk,gmn->gkn", a.reshape(g, mg, ka), b.reshape(g, mg, n),
                     preferred_element_type=jnp.float32)
    print(f"## {name}: {g} groups x {mg} rows, ka={ka}, n={n}", flush=True)
    stored = {key: v for key, v in stored.items() if key in layouts}
    for (ak, bk_), cfg in itertools.product(stored, configs):
      fn = jax.jit(lambda x, y, ak=ak, bk_=bk_, cfg=cfg: probe(x, y, g, mg, ka, n, ak, bk_, cfg))
      out = fn(*stored[(ak, bk_)])
      err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
      sec, _, spread = time_fn(fn, *stored[(ak, bk_)], reps=7, min_sample_s=0.15)
      label = f"A {'k' if ak else 'mn'}-major, B {'k' if bk_ else 'mn'}-major, {cfg}"
      print(f"  triton {label:52s} {sec * 1e3:8.3f} ms {flops / sec / 1e12:6.1f} "
            f"TFLOP/s (spread {spread:.1%}, err {err:.1e})", flush=True)
    del ref
    for ak, bk_ in stored:
      sa = "kgm" if ak else "gmk"
      sb = "ngm" if bk_ else "gmn"
      x, y = stored[(ak, bk_)]
      x = x.reshape((ka, g, mg) if ak else (g, mg, ka))
      y = y.reshape((n, g, mg) if bk_ else (g, mg, n))
      fn = jax.jit(lambda x, y, sa=sa, sb=sb: jnp.einsum(f"{sa},{sb}->gkn", x, y))
      sec, _, _ = time_fn(fn, x, y, reps=7, min_sample_s=0.15)
      print(f"  cuBLAS einsum {sa},{sb}->gkn {' ' * 34} {sec * 1e3:8.3f} ms "
            f"{flops / sec / 1e12:6.1f} TFLOP/s", flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
