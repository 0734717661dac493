"""Probe (session 14): can a 128-row tile skip the MMAs of an empty lower half?

A tile of jmoe's grouped GEMMs covers 128 rows of one expert; the last tile of
an expert is partly padding (8.3 % of the rows at the deepseek-like shape,
`gap_probe.py`: 6-9 % of the time). Here the tile is two 64-row halves, each
its own `tl.dot` on the shared weight tile, and the lower half's dot is skipped
when the tile has <= 64 rows (31 of 64 experts' last tiles there):

  MODE 0  both halves always (the cost of two 64-row dots instead of one)
  MODE 1  both halves loaded, the lower half's dot under `if has_hi`
  MODE 2  the lower half's load and dot under `if has_hi`
  MODE 3  two K loops, chosen per tile (both halves, or the upper one only);
          the persistent loop not flattened

against `gap_probe.grouped_probe_kernel` (one 128-row dot, flattened loop).

Usage: python split_probe.py [results.json]
"""
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gap_probe import NUM_SMS, bench, run_grouped, tiles_for  # noqa: E402


@triton.jit
def _store_half(c_ptr, acc, first, row_end, pid_n, N: tl.constexpr, HM: tl.constexpr,
                BN: tl.constexpr):
  offs_m = first + tl.arange(0, HM)
  offs_n = pid_n * BN + tl.arange(0, BN)
  mask = (offs_m < row_end)[:, None] & (offs_n < N)[None, :]
  tl.store(c_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], acc.to(tl.bfloat16),
           mask=mask)


@triton.jit
def split_probe_kernel(a_ptr, b_ptr, c_ptr, tiles_ptr,
                       ROWS: tl.constexpr, G: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
                       NUM_TILES: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                       NPROG: tl.constexpr, MODE: tl.constexpr):
  HM: tl.constexpr = 64
  a_d = tl.make_tensor_descriptor(a_ptr, [ROWS, K], [K, 1], [HM, BK])
  b_d = tl.make_tensor_descriptor(b_ptr, [G * K, N], [N, 1], [BK, BN])
  num_n = tl.cdiv(N, BN)
  for t in tl.range(tl.program_id(0), NUM_TILES * num_n, NPROG, flatten=MODE != 3):
    tile = t // num_n
    pid_n = t % num_n
    expert = tl.load(tiles_ptr + tile)
    row_start = tl.load(tiles_ptr + NUM_TILES + tile)
    row_end = tl.load(tiles_ptr + 2 * NUM_TILES + tile)
    has_hi = row_end - row_start > HM
    acc_lo = tl.zeros((HM, BN), tl.float32)
    acc_hi = tl.zeros((HM, BN), tl.float32)
    if MODE == 3:
      if has_hi:
        for k in range(0, K, BK):
          b = b_d.load([expert * K + k, pid_n * BN])
          acc_lo = tl.dot(a_d.load([row_start, k]), b, acc_lo)
          acc_hi = tl.dot(a_d.load([row_start + HM, k]), b, acc_hi)
      else:
        for k in range(0, K, BK):
          b = b_d.load([expert * K + k, pid_n * BN])
          acc_lo = tl.dot(a_d.load([row_start, k]), b, acc_lo)
    else:
      for k in range(0, K, BK):
        b = b_d.load([expert * K + k, pid_n * BN])
        acc_lo = tl.dot(a_d.load([row_start, k]), b, acc_lo)
        if MODE == 0:
          acc_hi = tl.dot(a_d.load([row_start + HM, k]), b, acc_hi)
        elif MODE == 1:
          a_hi = a_d.load([row_start + HM, k])
          if has_hi:
            acc_hi = tl.dot(a_hi, b, acc_hi)
        else:
          if has_hi:
            acc_hi = tl.dot(a_d.load([row_start + HM, k]), b, acc_hi)
    _store_half(c_ptr, acc_lo, row_start, row_end, pid_n, N, HM, BN)
    _store_half(c_ptr, acc_hi, row_start + HM, row_end, pid_n, N, HM, BN)  # all masked if empty


def run_split(a, b, counts, n, k, bn, mode, stages):
  g = len(counts)
  rows = a.shape[0]
  tiles = tiles_for(counts, 128)
  nt = tiles.shape[1]
  c = torch.full((rows, n), float("nan"), device="cuda", dtype=torch.bfloat16)
  nprog = min(NUM_SMS, nt * triton.cdiv(n, bn))
  fn = lambda: split_probe_kernel[(nprog,)](a, b.view(g * k, n), c, tiles, rows, g, n, k, nt, bn,
                                            64, nprog, mode, num_warps=8, num_stages=stages)
  fn()
  torch.cuda.synchronize()
  starts = [sum(counts[:e]) for e in range(g)]
  ref = torch.cat([a[s:s + cnt].float() @ b[e].float() for e, (s, cnt) in enumerate(zip(starts, counts))])
  err = ((c.float() - ref).norm() / ref.norm()).item()
  return bench(fn), err


def shape(name, learned, n, k, bn=256):
  rows = sum(learned)
  g = len(learned)
  uniform = [rows // g] * g
  uniform[-1] += rows - sum(uniform)
  torch.manual_seed(0)
  a = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
  b = torch.randn(g, k, n, device="cuda", dtype=torch.bfloat16) / k ** 0.5
  flops = 2 * rows * n * k
  print(f"== {name}: rows={rows} g={g} n={n} k={k} BN={bn}", flush=True)
  out = []
  for label, counts in [("learned", learned), ("uniform", uniform)]:
    ms, err = run_grouped(a, b, counts, n, k, bn)
    out.append((f"one 128-row dot, {label}", ms, err))
    for mode in (0, 1, 2, 3):
      for stages in (3, 4):
        try:
          ms, err = run_split(a, b, counts, n, k, bn, mode, stages)
          out.append((f"MODE {mode} s{stages}, {label}", ms, err))
        except Exception as e:  # noqa: BLE001  (a probe: report and go on)
          out.append((f"MODE {mode} s{stages}, {label} FAIL {str(e)[:100]}", float("nan"), None))
  base = out[0][1]
  for label, ms, err in out:
    err_s = "" if err is None else f" err={err:.1e}"
    print(f"  {label:34s} {ms:8.4f} ms {flops / ms / 1e9:7.1f} TFLOP/s  x{ms / base:5.3f}{err_s}",
          flush=True)


def main():
  path = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/nvidia-h100-80gb-hbm3/results.json"
  cases = json.load(open(path))["cases"]
  learned = next(c for c in cases if c["name"] == "deepseek")["utilisation"]["tokens_per_expert"]
  print(torch.cuda.get_device_name(), "triton", triton.__version__)
  shape("down", learned, 2048, 1408)
  shape("up (2f columns)", learned, 2816, 2048)


if __name__ == "__main__":
  main()
