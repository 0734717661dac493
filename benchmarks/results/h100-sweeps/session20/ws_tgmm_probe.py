"""Probe (session 20): Triton's Hopper warp specialisation (WS) on a tgmm.

jmoe's TMA tgmm (`jmoe.kernels.tgmm_tma`: TMA loads, 3-D TMA store) beside
`_tgmm_2d_store`, a copy of its loop with a 2-D output descriptor (WS stops the
compiler on the 3-D store's reshape: runs 1-2, with
`tgmm_warp_specialize.patch`), with and without `tl.range(warp_specialize=)`,
at the deepseek-like and Mixtral-like weight-gradient shapes. Launched from
torch (Triton's own launcher sizes the warp count and the global scratch),
outputs poisoned with NaN and checked against torch per group. The "2d rows"
variants read rows of b past a group's end (no bounded descriptor), so their
error is expected. torch + triton only (device machine)."""
import sys
import time

import torch
import triton

import triton.language as tl

from jmoe.kernels.swizzle import band_swizzle
from jmoe.kernels.tgmm_tma import _tgmm_tma_kernel


@triton.jit
def _tgmm_2d_store(a_ptr, b_ptr, group_offsets_ptr, a_col_offsets_ptr, G, MB, KA_Q, N_Q,
                   MA_Q, out_ptr, A_ROWS: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                   WS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_N: tl.constexpr, GROUP_SIZE: tl.constexpr):
  """jmoe's TMA tgmm (unbounded b, columns or rows layout) storing through a
  2-D [G * KA, N] descriptor (KA a multiple of BLOCK_K), no reshape."""
  KA = KA_Q * 16
  N = N_Q * 16
  MA = MA_Q * 16
  if A_ROWS:
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[MB, KA], strides=[KA, 1],
                                       block_shape=[BLOCK_M, BLOCK_K])
  else:
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[KA, MA], strides=[MA, 1],
                                       block_shape=[BLOCK_K, BLOCK_M])
  b_desc = tl.make_tensor_descriptor(b_ptr, shape=[MB, N], strides=[N, 1],
                                     block_shape=[BLOCK_M, BLOCK_N])
  out_desc = tl.make_tensor_descriptor(out_ptr, shape=[G * KA, N], strides=[N, 1],
                                       block_shape=[BLOCK_K, BLOCK_N])
  tiles_k = tl.cdiv(KA, BLOCK_K)
  tiles_n = tl.cdiv(N, BLOCK_N)
  per_group = tiles_k * tiles_n
  for tile in tl.range(tl.program_id(0), G * per_group, NUM_PROGRAMS, warp_specialize=WS):
    gi = tile // per_group
    pid_k, pid_n = band_swizzle(tile % per_group, tiles_k, tiles_n, GROUP_SIZE)
    start = tl.load(group_offsets_ptr + gi)
    end = tl.load(group_offsets_ptr + gi + 1)
    k0 = pid_k * BLOCK_K
    n0 = pid_n * BLOCK_N
    if A_ROWS:
      a_start = start
    else:
      a_start = tl.load(a_col_offsets_ptr + gi)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for r in range(0, end - start, BLOCK_M):
      if A_ROWS:
        a = tl.trans(a_desc.load([a_start + r, k0]))
      else:
        a = a_desc.load([k0, a_start + r])
      acc = tl.dot(a, b_desc.load([start + r, n0]), acc)
    out_desc.store([gi * KA + k0, n0], acc.to(out_ptr.dtype.element_ty))

triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
NUM_SMS = torch.cuda.get_device_properties(0).multi_processor_count


def bench(fn, seconds=1.0):
  fn()
  torch.cuda.synchronize()
  start = time.perf_counter()
  per = []
  while time.perf_counter() - start < seconds:
    e0 = torch.cuda.Event(enable_timing=True)
    e1 = torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(5):
      fn()
    e1.record()
    e1.synchronize()
    per.append(e0.elapsed_time(e1) / 5)
  per.sort()
  return per[len(per) // 2]


def case(name, g, mean_rows, ka, n, seed=0):
  gen = torch.Generator().manual_seed(seed)
  counts = (mean_rows + torch.randint(-mean_rows // 8, mean_rows // 8, (g,), generator=gen)).clamp(min=0)
  counts[g // 2] = 0  # an empty group
  mb = int(counts.sum())
  offsets = torch.zeros(g + 1, dtype=torch.int32)
  offsets[1:] = torch.cumsum(counts, 0)
  offsets = offsets.cuda()
  a = torch.randn(mb, ka, device="cuda", dtype=torch.bfloat16)
  b = torch.randn(mb, n, device="cuda", dtype=torch.bfloat16)
  # The columns layout (`A_ROWS=False`): group gi's rows as columns of a_cols
  # from col_off[gi], a multiple of 64, zero-filled to the next one.
  padded = (counts + 63) // 64 * 64
  col_off = torch.zeros(g, dtype=torch.int32)
  col_off[1:] = torch.cumsum(padded, 0)[:-1]
  a_cols = torch.zeros(ka, int(padded.sum()), device="cuda", dtype=torch.bfloat16)
  for gi, (s, e) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
    a_cols[:, col_off[gi]:col_off[gi] + e - s] = a[s:e].T
  col_off = col_off.cuda()
  ref = torch.stack([a[s:e].float().T @ b[s:e].float()
                     for s, e in zip(offsets[:-1].tolist(), offsets[1:].tolist())])
  flops = 2 * mb * ka * n
  bm, bk, bn = 64, 128, 256
  tiles = g * triton.cdiv(ka, bk) * triton.cdiv(n, bn)
  programs = min(NUM_SMS, tiles)
  print(f"== {name}: g={g} rows={mb} ka={ka} n={n}")
  for label, ws, nw, st, a_rows, bounded in (
      ("jmoe rows bounded nw8 s3", False, 8, 3, True, True),
      ("2d cols nw8 s3", False, 8, 3, False, None),
      ("2d cols WS nw4 s3", True, 4, 3, False, None),
      ("2d cols WS nw4 s2", True, 4, 2, False, None),
      ("2d rows nw8 s3", False, 8, 3, True, None),
      ("2d rows WS nw4 s3", True, 4, 3, True, None),
      ("jmoe cols nw8 s3", False, 8, 3, False, False),
      ("jmoe rows bounded nw8 s3 again", False, 8, 3, True, True)):
    out = torch.full((g, ka, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    try:
      fn2d = lambda: _tgmm_2d_store[(programs,)](
          a if a_rows else a_cols, b, offsets, offsets if a_rows else col_off, g, mb,
          ka // 16, n // 16, 0 if a_rows else a_cols.shape[1] // 16, out,
          A_ROWS=a_rows, NUM_PROGRAMS=programs, WS=ws, BLOCK_M=bm, BLOCK_K=bk,
          BLOCK_N=bn, GROUP_SIZE=8, num_warps=nw, num_stages=st)
      fnj = lambda: _tgmm_tma_kernel[(programs,)](
          a if a_rows else a_cols, b, offsets, offsets if a_rows else col_off, g, mb,
          ka // 16, n // 16, 0 if a_rows else a_cols.shape[1] // 16, out,
          OUT_TRANSPOSED=False, A_ROWS=a_rows, B_BOUNDED=bounded, TMA_STORE=True,
          DOT_F32=False, INPUT_PRECISION="ieee", NUM_PROGRAMS=programs, FLATTEN=False,
          BLOCK_M=bm, BLOCK_K=bk, BLOCK_N=bn, GROUP_SIZE=8,
          num_warps=nw, num_stages=st)
      fn = fnj if bounded is not None else fn2d
      fn()
      torch.cuda.synchronize()
      nan = torch.isnan(out.float()).float().mean().item()
      err = ((out.float() - ref).norm() / ref.norm()).item()
      ms = bench(fn)
      print(f"  {label:28s} nan {nan:6.1%} err {err:.1e} {ms:8.4f} ms "
            f"{flops / ms / 1e9:7.1f} TFLOP/s", flush=True)
    except Exception as e:  # noqa
      print(f"  {label:28s} FAIL {str(e)[:120]}", flush=True)


if __name__ == "__main__":
  print(torch.cuda.get_device_name(), triton.__version__, torch.__version__)
  case("deepseek dW_up", 64, 768, 2048, 2816)
  case("deepseek dW_down", 64, 768, 1408, 2048)
  case("mixtral dW_down", 8, 2048, 14336, 4096)
  sys.stdout.flush()
