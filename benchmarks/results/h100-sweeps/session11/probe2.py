"""Probe 2: grouped GEMM tiles/schedules at the 64-expert shapes (torch + triton)."""
import torch, triton
from ws_probe import grouped_kernel, bench, NUM_SMS

def grouped2(mean, g, n, k, variants, seed=0):
  gen = torch.Generator().manual_seed(seed)
  counts = (mean + torch.randint(-80, 80, (g,), generator=gen)).clamp(min=1)
  rows = int(counts.sum())
  a = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
  b = torch.randn(g, k, n, device="cuda", dtype=torch.bfloat16) / k ** 0.5
  starts = torch.cumsum(counts, 0) - counts
  ref = torch.cat([a[s:s + c] @ b[e] for e, (s, c) in enumerate(zip(starts, counts))]).float()
  flops = 2 * rows * n * k
  print(f"== grouped rows={rows} g={g} n={n} k={k}")
  for name, bm, bn, nw, st, pers, flat, progs_per_sm in variants:
    tiles = []
    for e, (s, c) in enumerate(zip(starts.tolist(), counts.tolist())):
      for r in range(s, s + c, bm):
        tiles.append((e, r, min(s + c, r + bm)))
    tiles_t = torch.tensor(tiles, dtype=torch.int32, device="cuda").T.contiguous()
    nt = len(tiles)
    c_out = torch.full((rows, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    nprog = NUM_SMS * progs_per_sm if pers else nt * (n // bn)
    try:
      fn = lambda: grouped_kernel[(nprog,)](a, b.view(g * k, n), c_out, tiles_t, rows, g, n, k, nt,
                                            bm, bn, 64, False, pers, nprog, flat,
                                            num_warps=nw, num_stages=st)
      fn(); torch.cuda.synchronize()
      err = ((c_out.float() - ref).norm() / ref.norm()).item()
      ms = bench(fn)
      print(f"  {name:34s} err={err:.1e} {ms:8.4f} ms {flops / ms / 1e9:7.1f} TFLOP/s", flush=True)
    except Exception as e:  # noqa
      print(f"  {name:34s} FAIL {str(e)[:160]}", flush=True)

V = [
  ("pers 128x256 nw8 s3", 128, 256, 8, 3, True, False, 1),
  ("pers flat 128x256 nw8 s3", 128, 256, 8, 3, True, True, 1),
  ("grid 128x256 nw8 s3", 128, 256, 8, 3, False, False, 1),
  ("grid 128x128 nw4 s3 (2/SM)", 128, 128, 4, 3, False, False, 1),
  ("grid 128x128 nw4 s4", 128, 128, 4, 4, False, False, 1),
  ("grid 128x128 nw8 s3 (2/SM)", 128, 128, 8, 3, False, False, 1),
  ("pers2 flat 128x128 nw4 s3", 128, 128, 4, 3, True, True, 2),
  ("pers2 flat 128x128 nw8 s3", 128, 128, 8, 3, True, True, 2),
  ("grid 64x256 nw4 s2 (2/SM)", 64, 256, 4, 2, False, False, 1),
  ("pers2 flat 64x256 nw4 s2", 64, 256, 4, 2, True, True, 2),
]
if __name__ == "__main__":
  print(torch.cuda.get_device_name())
  grouped2(768, 64, 2048, 1408, V)
  grouped2(768, 64, 2816, 2048, V)
