"""Probe (session 20): why does Triton's Hopper warp specialisation give NaN in
session 11's grouped GEMM (`session11/ws_probe.py`), and is it faster once correct?

Variants of one persistent grouped GEMM (TMA loads of a [rows, K] and of the
expert's [K, N] weight), on sorted rows whose groups are padded to 128 rows
(`--layout padded`) or not (`ragged`, the session-11 layout):
  META  0: expert / row_start / row_end loaded from a tile table; 1: computed
           (uniform groups only: expert = tile // tiles_per_expert).
  STORE 0: masked pointer store (rows < row_end); 1: TMA descriptor store;
        2: unmasked pointer store; 3: TMA store through a per-tile descriptor
        that ends at the group's last row (clips the rows past it).
Prints, per variant, the error against torch, the share of rows left NaN (the
output starts NaN) and how many whole tiles those rows make, and the time.
torch + triton only (device machine), not part of jmoe."""
import sys
import time

import torch
import triton
import triton.language as tl

torch.manual_seed(0)
triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
NUM_SMS = torch.cuda.get_device_properties(0).multi_processor_count


@triton.jit
def grouped_kernel(a_ptr, b_ptr, c_ptr, tiles_ptr, ROWS: tl.constexpr, G: tl.constexpr,
                   N: tl.constexpr, K: tl.constexpr, NUM_TILES: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, WS: tl.constexpr,
                   NPROG: tl.constexpr, META: tl.constexpr, STORE: tl.constexpr,
                   TPE: tl.constexpr):
  a_d = tl.make_tensor_descriptor(a_ptr, [ROWS, K], [K, 1], [BM, BK])
  b_d = tl.make_tensor_descriptor(b_ptr, [G * K, N], [N, 1], [BK, BN])
  c_d = tl.make_tensor_descriptor(c_ptr, [ROWS, N], [N, 1], [BM, BN])
  num_n = N // BN
  for t in tl.range(tl.program_id(0), NUM_TILES * num_n, NPROG, warp_specialize=WS):
    tile = t // num_n
    pid_n = t % num_n
    if META == 0:
      expert = tl.load(tiles_ptr + tile)
      row_start = tl.load(tiles_ptr + NUM_TILES + tile)
      row_end = tl.load(tiles_ptr + 2 * NUM_TILES + tile)
    else:
      expert = tile // TPE
      row_start = tile * BM
      row_end = row_start + BM
    acc = tl.zeros((BM, BN), tl.float32)
    for k in range(0, K, BK):
      acc = tl.dot(a_d.load([row_start, k]), b_d.load([expert * K + k, pid_n * BN]), acc)
    out = acc.to(tl.bfloat16)
    if STORE == 1:
      c_d.store([row_start, pid_n * BN], out)
    elif STORE == 3:  # a per-tile descriptor ending at the group's last row
      tile_c = tl.make_tensor_descriptor(c_ptr, [row_end, N], [N, 1], [BM, BN])
      tile_c.store([row_start, pid_n * BN], out)
    else:
      offs_m = row_start + tl.arange(0, BM)
      offs_n = pid_n * BN + tl.arange(0, BN)
      ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
      if STORE == 0:
        tl.store(ptrs, out, mask=(offs_m < row_end)[:, None])
      else:
        tl.store(ptrs, out)


def bench(fn, seconds=1.0):
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


def case(mean_rows, g, n, k, padded, uniform, bm=128, bn=256, seed=0):
  gen = torch.Generator().manual_seed(seed)
  if uniform:
    counts = torch.full((g,), mean_rows)
  else:
    counts = (mean_rows + torch.randint(-80, 80, (g,), generator=gen)).clamp(min=1)
  sizes = ((counts + bm - 1) // bm) * bm if padded else counts
  rows = int(sizes.sum())
  tiles, start = [], 0
  for e, (cnt, size) in enumerate(zip(counts.tolist(), sizes.tolist())):
    for r in range(start, start + size, bm):
      tiles.append((e, r, min(start + size, r + bm)))
    start += size
  tiles_t = torch.tensor(tiles, dtype=torch.int32, device="cuda").T.contiguous()
  nt = len(tiles)
  a = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
  b = torch.randn(g, k, n, device="cuda", dtype=torch.bfloat16) / k ** 0.5
  starts = torch.cumsum(sizes, 0) - sizes
  ref = torch.cat([a[s:s + c] @ b[e] for e, (s, c) in enumerate(zip(starts, sizes))]).float()
  flops = 2 * int(counts.sum()) * n * k
  metas = (0, 1) if (uniform and padded) else (0,)
  print(f"== rows={rows} g={g} n={n} k={k} tiles={nt} {'padded' if padded else 'ragged'}"
        f"{' uniform' if uniform else ''}")
  for meta in metas:
    for store in ((0, 1, 2) if padded else (0,)):
      for ws, nw, st in ((False, 8, 3), (True, 4, 3), (True, 4, 4)):
        c = torch.full((rows, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        name = f"META={meta} STORE={store} {'WS nw4' if ws else 'nw8'} s{st}"
        try:
          fn = lambda: grouped_kernel[(NUM_SMS,)](
              a, b.view(g * k, n), c, tiles_t, rows, g, n, k, nt, bm, bn, 64, ws, NUM_SMS,
              meta, store, sizes[0].item() // bm if uniform else 1,
              num_warps=nw, num_stages=st)
          fn()
          torch.cuda.synchronize()
          nan_rows = torch.isnan(c.float()).any(dim=1)
          nan_tiles = sum(bool(nan_rows[s:e].all()) for _, s, e in tiles)
          finite = ~nan_rows
          err = ((c.float()[finite] - ref[finite]).norm() / ref[finite].norm()).item()
          ms = bench(fn)
          print(f"  {name:28s} nan rows {nan_rows.float().mean().item():6.1%} "
                f"(whole tiles {nan_tiles}/{nt}) err(finite) {err:.1e} "
                f"{ms:8.4f} ms {flops / ms / 1e9:7.1f} TFLOP/s", flush=True)
        except Exception as e:  # noqa
          print(f"  {name:28s} FAIL {str(e)[:160]}", flush=True)


def interleaved(mean_rows, g, n, k, rounds=5, bm=128, bn=256, seed=0):
  """Ragged groups: masked pointer store without WS (jmoe's epilogue) against
  the bounded per-tile TMA store with and without WS, in alternating rounds."""
  gen = torch.Generator().manual_seed(seed)
  counts = (mean_rows + torch.randint(-80, 80, (g,), generator=gen)).clamp(min=1)
  rows = int(counts.sum())
  tiles, start = [], 0
  for e, cnt in enumerate(counts.tolist()):
    for r in range(start, start + cnt, bm):
      tiles.append((e, r, min(start + cnt, r + bm)))
    start += cnt
  tiles_t = torch.tensor(tiles, dtype=torch.int32, device="cuda").T.contiguous()
  nt = len(tiles)
  a = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
  b = torch.randn(g, k, n, device="cuda", dtype=torch.bfloat16) / k ** 0.5
  starts = torch.cumsum(counts, 0) - counts
  ref = torch.cat([a[s:s + c] @ b[e] for e, (s, c) in enumerate(zip(starts, counts))]).float()
  flops = 2 * rows * n * k
  variants = {"STORE=0 nw8 s3": (0, False, 8, 3), "STORE=3 nw8 s3": (3, False, 8, 3),
              "STORE=3 WS nw4 s3": (3, True, 4, 3), "STORE=3 WS nw4 s2": (3, True, 4, 2)}
  fns, times = {}, {}
  print(f"== interleaved rows={rows} g={g} n={n} k={k} tiles={nt} ragged, {rounds} rounds")
  for name, (store, ws, nw, st) in variants.items():
    c = torch.full((rows, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    fn = (lambda c=c, store=store, ws=ws, nw=nw, st=st: grouped_kernel[(NUM_SMS,)](
        a, b.view(g * k, n), c, tiles_t, rows, g, n, k, nt, bm, bn, 64, ws, NUM_SMS, 0,
        store, 1, num_warps=nw, num_stages=st))
    try:
      fn()
      torch.cuda.synchronize()
    except Exception as e:  # noqa
      print(f"  {name:24s} FAIL {str(e)[:160]}", flush=True)
      continue
    nan = torch.isnan(c.float()).any(dim=1).float().mean().item()
    err = ((c.float() - ref).norm() / ref.norm()).item()
    print(f"  {name:24s} nan rows {nan:6.1%} err {err:.1e}", flush=True)
    fns[name], times[name] = fn, []
  for r in range(rounds):
    for name in (list(fns) if r % 2 == 0 else list(reversed(fns))):
      times[name].append(bench(fns[name], seconds=0.4))
  for name, ts in times.items():
    ms = sorted(ts)[len(ts) // 2]
    print(f"  {name:24s} {ms:8.4f} ms {flops / ms / 1e9:7.1f} TFLOP/s  rounds "
          f"{[round(t, 4) for t in ts]}", flush=True)


if __name__ == "__main__" and sys.argv[1:] == ["interleaved"]:
  print(torch.cuda.get_device_name(), triton.__version__, torch.__version__)
  interleaved(768, 64, 2048, 1408)  # deepseek-like down
  interleaved(768, 64, 2816, 2048)  # deepseek-like up (ungated)
  interleaved(2048, 8, 4096, 14336)  # mixtral-like down
elif __name__ == "__main__":
  print(torch.cuda.get_device_name(), triton.__version__, torch.__version__)
  case(768, 64, 2048, 1408, padded=False, uniform=False)   # session 11's deepseek-like down
  case(768, 64, 2048, 1408, padded=True, uniform=False)
  case(768, 64, 2048, 1408, padded=True, uniform=True)
  case(768, 64, 2816, 2048, padded=True, uniform=True)     # deepseek-like up (ungated)
  sys.stdout.flush()
