"""Probe (session 14): where the 64-expert grouped GEMM loses against cuBLAS.

torch + triton only (the device machine has both), not part of jmoe. One
Triton kernel, jmoe's plain-GEMM schedule (persistent, flattened, 128x256x64,
8 warps, 3 stages, TMA loads of sorted rows and of the expert's weights,
masked pointer store of the rows < row_end), run on:

  learned   the deepseek-like learned-router counts of the committed H100 run
            (results.json, 64 experts, 49152 rows): 8.3 % padded rows
  uniform   768 rows per expert: no padded rows
  dense     one group of all rows: the kernel as a plain dense GEMM
  nostore   the same with the store masked off at run time (flag = 0): the
            epilogue's memory traffic removed, its math kept
  cuBLAS    torch's a @ b at the dense shape

so that learned / uniform is the padding, uniform / dense the grouping
(64 weight matrices streamed, tile switches), dense / cuBLAS the kernel, and
store / nostore the epilogue's stores. Shapes: up (n=2816, k=2048, plain, as
if ungated), down (n=2048, k=1408), dh (n=1408, k=2048: BLOCK_N 256 leaves
the sixth column tile half empty; BLOCK_N 128 too).

Usage: python gap_probe.py [results.json]   (prints a table)
"""
import json
import sys
import time

import torch
import triton
import triton.language as tl

triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
NUM_SMS = torch.cuda.get_device_properties(0).multi_processor_count


@triton.jit
def grouped_probe_kernel(a_ptr, b_ptr, c_ptr, tiles_ptr, store_flag,
                         ROWS: tl.constexpr, G: tl.constexpr, N: tl.constexpr,
                         K: tl.constexpr, NUM_TILES: tl.constexpr, BM: tl.constexpr,
                         BN: tl.constexpr, BK: tl.constexpr, NPROG: tl.constexpr):
  """c[r] = a[r] @ b[expert(r)]; tiles [3, NUM_TILES] (expert, row_start, row_end)."""
  a_d = tl.make_tensor_descriptor(a_ptr, [ROWS, K], [K, 1], [BM, BK])
  b_d = tl.make_tensor_descriptor(b_ptr, [G * K, N], [N, 1], [BK, BN])
  num_n = tl.cdiv(N, BN)
  for t in tl.range(tl.program_id(0), NUM_TILES * num_n, NPROG, flatten=True):
    tile = t // num_n
    pid_n = t % num_n
    expert = tl.load(tiles_ptr + tile)
    row_start = tl.load(tiles_ptr + NUM_TILES + tile)
    row_end = tl.load(tiles_ptr + 2 * NUM_TILES + tile)
    acc = tl.zeros((BM, BN), tl.float32)
    for k in range(0, K, BK):
      acc = tl.dot(a_d.load([row_start, k]), b_d.load([expert * K + k, pid_n * BN]), acc)
    offs_m = row_start + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask = (offs_m < row_end)[:, None] & (offs_n < N)[None, :] & (store_flag != 0)
    tl.store(c_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], acc.to(tl.bfloat16),
             mask=mask)


def bench(fn, seconds=1.5):
  """Median ms per call over 10-call event-timed batches, `seconds` of back-to-back load."""
  fn()
  torch.cuda.synchronize()
  start = time.perf_counter()
  per = []
  while time.perf_counter() - start < seconds:
    e0 = torch.cuda.Event(enable_timing=True)
    e1 = torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(10):
      fn()
    e1.record()
    e1.synchronize()
    per.append(e0.elapsed_time(e1) / 10)
  per.sort()
  return per[len(per) // 2]


def tiles_for(counts, bm):
  tiles, start = [], 0
  for e, cnt in enumerate(counts):
    for r in range(start, start + cnt, bm):
      tiles.append((e, r, min(start + cnt, r + bm)))
    start += cnt
  return torch.tensor(tiles, dtype=torch.int32, device="cuda").T.contiguous()


def run_grouped(a, b, counts, n, k, bn, store=True):
  """(ms, relative error of the stored rows or None) of the probe kernel."""
  g = len(counts)
  rows = a.shape[0]
  tiles = tiles_for(counts, 128)
  nt = tiles.shape[1]
  c = torch.full((rows, n), float("nan"), device="cuda", dtype=torch.bfloat16)
  nprog = min(NUM_SMS, nt * triton.cdiv(n, bn))
  fn = lambda: grouped_probe_kernel[(nprog,)](a, b.view(g * k, n), c, tiles, int(store), rows, g,
                                              n, k, nt, 128, bn, 64, nprog, num_warps=8,
                                              num_stages=3)
  fn()
  torch.cuda.synchronize()
  err = None
  if store:
    starts = [sum(counts[:e]) for e in range(g)]
    ref = torch.cat([a[s:s + cnt].float() @ b[e].float()
                     for e, (s, cnt) in enumerate(zip(starts, counts))])
    err = ((c.float() - ref).norm() / ref.norm()).item()
  return bench(fn), err


def shape(name, learned, n, k, bns=(256,)):
  rows = sum(learned)
  g = len(learned)
  uniform = [rows // g] * g
  uniform[-1] += rows - sum(uniform)
  torch.manual_seed(0)
  a = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
  b = torch.randn(g, k, n, device="cuda", dtype=torch.bfloat16) / k ** 0.5
  b1 = b[:1].contiguous()
  flops = 2 * rows * n * k
  print(f"== {name}: rows={rows} g={g} n={n} k={k} (padded rows, learned: "
        f"{sum(-(-x // 128) * 128 for x in learned) / rows - 1:.1%})", flush=True)
  out = [("cuBLAS a @ b (dense)", bench(lambda: a @ b1[0]), None)]
  for bn in bns:
    for label, counts, bb, store in [
        ("learned", learned, b, True), ("learned nostore", learned, b, False),
        ("uniform", uniform, b, True), ("uniform nostore", uniform, b, False),
        ("dense", [rows], b1, True), ("dense nostore", [rows], b1, False)]:
      try:
        ms, err = run_grouped(a, bb, counts, n, k, bn, store)
        out.append((f"triton BN={bn} {label}", ms, err))
      except Exception as e:  # noqa: BLE001  (a probe: report and go on)
        out.append((f"triton BN={bn} {label} FAIL {str(e)[:120]}", float("nan"), None))
  base = out[0][1]
  for label, ms, err in out:
    err_s = "" if err is None else f" err={err:.1e}"
    print(f"  {label:34s} {ms:8.4f} ms {flops / ms / 1e9:7.1f} TFLOP/s  x{ms / base:5.3f} of cuBLAS"
          f"{err_s}", flush=True)


def main():
  path = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/nvidia-h100-80gb-hbm3/results.json"
  cases = json.load(open(path))["cases"]
  learned = next(c for c in cases if c["name"] == "deepseek")["utilisation"]["tokens_per_expert"]
  print(torch.cuda.get_device_name(), "triton", triton.__version__, "torch", torch.__version__)
  shape("down (h @ W_down)", learned, 2048, 1408)
  shape("up (x @ W_up, 2f columns)", learned, 2816, 2048)
  shape("dh (dy @ W_down^T)", learned, 1408, 2048, bns=(256, 128))


if __name__ == "__main__":
  main()
