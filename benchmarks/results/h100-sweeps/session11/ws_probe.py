"""Probe: does Triton 3.6's Hopper warp specialisation (num_warps=4 +
tl.range(warp_specialize=True), TMA loads) speed up dense and grouped bf16
GEMMs on the H100? torch + triton only (device machine), not part of jmoe."""
import sys
import time

import torch
import triton
import triton.language as tl

torch.manual_seed(0)
triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
NUM_SMS = torch.cuda.get_device_properties(0).multi_processor_count


@triton.jit
def dense_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, WS: tl.constexpr,
                 PERSISTENT: tl.constexpr, NPROG: tl.constexpr, GROUP_M: tl.constexpr):
  a_d = tl.make_tensor_descriptor(a_ptr, [M, K], [K, 1], [BM, BK])
  b_d = tl.make_tensor_descriptor(b_ptr, [K, N], [N, 1], [BK, BN])
  c_d = tl.make_tensor_descriptor(c_ptr, [M, N], [N, 1], [BM, BN])
  num_m = M // BM
  num_n = N // BN
  if PERSISTENT:
    for t in tl.range(tl.program_id(0), num_m * num_n, NPROG, warp_specialize=WS,
                      flatten=False):
      group = t // (GROUP_M * num_n)
      first_m = group * GROUP_M
      pid_m = first_m + (t % (GROUP_M * num_n)) % GROUP_M
      pid_n = (t % (GROUP_M * num_n)) // GROUP_M
      acc = tl.zeros((BM, BN), tl.float32)
      for k in range(0, K, BK):
        acc = tl.dot(a_d.load([pid_m * BM, k]), b_d.load([k, pid_n * BN]), acc)
      c_d.store([pid_m * BM, pid_n * BN], acc.to(tl.bfloat16))
  else:
    t = tl.program_id(0)
    group = t // (GROUP_M * num_n)
    first_m = group * GROUP_M
    pid_m = first_m + (t % (GROUP_M * num_n)) % GROUP_M
    pid_n = (t % (GROUP_M * num_n)) // GROUP_M
    acc = tl.zeros((BM, BN), tl.float32)
    for k in tl.range(0, K, BK, warp_specialize=WS):
      acc = tl.dot(a_d.load([pid_m * BM, k]), b_d.load([k, pid_n * BN]), acc)
    c_d.store([pid_m * BM, pid_n * BN], acc.to(tl.bfloat16))


@triton.jit
def grouped_kernel(a_ptr, b_ptr, c_ptr, tiles_ptr, ROWS: tl.constexpr, G: tl.constexpr,
                   N: tl.constexpr, K: tl.constexpr, NUM_TILES: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, WS: tl.constexpr,
                   PERSISTENT: tl.constexpr, NPROG: tl.constexpr, FLATTEN: tl.constexpr = False):
  """c[r] = a[r] @ b[expert(r)], rows sorted by expert; tiles [3, NUM_TILES]
  (expert, row_start, row_end); masked pointer store of the rows < row_end."""
  a_d = tl.make_tensor_descriptor(a_ptr, [ROWS, K], [K, 1], [BM, BK])
  b_d = tl.make_tensor_descriptor(b_ptr, [G * K, N], [N, 1], [BK, BN])
  num_n = N // BN
  if PERSISTENT:
    for t in tl.range(tl.program_id(0), NUM_TILES * num_n, NPROG, warp_specialize=WS,
                      flatten=FLATTEN):
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
      tl.store(c_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], acc.to(tl.bfloat16),
               mask=(offs_m < row_end)[:, None])
  else:
    t = tl.program_id(0)
    tile = t // num_n
    pid_n = t % num_n
    expert = tl.load(tiles_ptr + tile)
    row_start = tl.load(tiles_ptr + NUM_TILES + tile)
    row_end = tl.load(tiles_ptr + 2 * NUM_TILES + tile)
    acc = tl.zeros((BM, BN), tl.float32)
    for k in tl.range(0, K, BK, warp_specialize=WS):
      acc = tl.dot(a_d.load([row_start, k]), b_d.load([expert * K + k, pid_n * BN]), acc)
    offs_m = row_start + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    tl.store(c_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], acc.to(tl.bfloat16),
             mask=(offs_m < row_end)[:, None])


def bench(fn, seconds=1.5):
  fn()
  torch.cuda.synchronize()
  # median of event-timed batches over `seconds` of back-to-back calls (power-capped)
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


def dense(m, n, k):
  a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
  b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
  ref = a @ b
  flops = 2 * m * n * k
  rows = []
  ms = bench(lambda: a @ b)
  rows.append(("torch/cuBLAS", ms))
  for name, ws, pers, nw, st in [("tri nw8 s3", False, False, 8, 3),
                                 ("tri nw8 s4", False, False, 8, 4),
                                 ("tri WS nw4 s3", True, False, 4, 3),
                                 ("tri WS nw4 s4", True, False, 4, 4),
                                 ("tri pers nw8 s3", False, True, 8, 3),
                                 ("tri pers WS nw4 s3", True, True, 4, 3),
                                 ("tri pers WS nw4 s4", True, True, 4, 4)]:
    c = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    nprog = NUM_SMS if pers else (m // 128) * (n // 256)
    try:
      fn = lambda: dense_kernel[(nprog,)](a, b, c, m, n, k, 128, 256, 64, ws, pers, nprog, 8,
                                          num_warps=nw, num_stages=st)
      fn()
      torch.cuda.synchronize()
      err = ((c.float() - ref.float()).norm() / ref.float().norm()).item()
      ms = bench(fn)
      rows.append((name + f" err={err:.1e}", ms))
    except Exception as e:  # noqa
      rows.append((name + " FAIL " + str(e)[:200], float("nan")))
  print(f"== dense {m}x{n}x{k}")
  for name, ms in rows:
    print(f"  {name:40s} {ms:8.4f} ms {flops / ms / 1e9:7.1f} TFLOP/s")


def grouped(rows_per_expert_mean, g, n, k, seed=0):
  gen = torch.Generator().manual_seed(seed)
  counts = (rows_per_expert_mean + torch.randint(-80, 80, (g,), generator=gen)).clamp(min=1)
  rows = int(counts.sum())
  bm = 128
  tiles = []
  start = 0
  for e, cnt in enumerate(counts.tolist()):
    for r in range(start, start + cnt, bm):
      tiles.append((e, r, min(start + cnt, r + bm)))
    start += cnt
  tiles_t = torch.tensor(tiles, dtype=torch.int32, device="cuda").T.contiguous()
  nt = len(tiles)
  a = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
  b = torch.randn(g, k, n, device="cuda", dtype=torch.bfloat16) / k ** 0.5
  ref = torch.cat([a[s:s + c] @ b[e] for e, (s, c) in enumerate(
      zip(torch.cumsum(counts, 0) - counts, counts))]).float()
  flops = 2 * rows * n * k
  out = []
  for name, ws, pers, nw, st in [("nw8 s3", False, False, 8, 3),
                                 ("WS nw4 s3", True, False, 4, 3),
                                 ("WS nw4 s4", True, False, 4, 4),
                                 ("pers nw8 s3", False, True, 8, 3),
                                 ("pers WS nw4 s3", True, True, 4, 3),
                                 ("pers WS nw4 s4", True, True, 4, 4)]:
    c = torch.full((rows, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    nprog = NUM_SMS if pers else nt * (n // 256)
    try:
      fn = lambda: grouped_kernel[(nprog,)](a, b.view(g * k, n), c, tiles_t, rows, g, n, k, nt,
                                            bm, 256, 64, ws, pers, nprog,
                                            num_warps=nw, num_stages=st)
      fn()
      torch.cuda.synchronize()
      err = ((c.float() - ref).norm() / ref.norm()).item()
      ms = bench(fn)
      out.append((name + f" err={err:.1e}", ms))
    except Exception as e:  # noqa
      out.append((name + " FAIL " + str(e)[:200], float("nan")))
  print(f"== grouped rows={rows} g={g} n={n} k={k} tiles={nt}")
  for name, ms in out:
    print(f"  {name:40s} {ms:8.4f} ms {flops / ms / 1e9:7.1f} TFLOP/s")


if __name__ == "__main__":
  print(torch.cuda.get_device_name(), triton.__version__, torch.__version__)
  dense(8192, 8192, 8192)
  grouped(768, 64, 2048, 1408)   # deepseek-like down GEMM
  grouped(2048, 8, 4096, 14336)  # mixtral-like down GEMM
  grouped(768, 64, 2816, 2048)   # deepseek-like up GEMM shape (ungated, sorted rows)
  sys.stdout.flush()
