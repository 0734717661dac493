"""Times candidate tile configs of each expert_ffn kernel on the MoE shapes (GPU).

The pinned defaults (`jmoe.ops.grouped_matmul.default_config`,
`jmoe.ops.tgmm.TgmmConfig`) are chosen from this sweep: for each case of
`benchmarks/gpu_kernels.py` (bf16, SwiGLU, dropless, skewed routing) and each
stage, every candidate config is launched on the same inputs and timed like
`gpu_kernels.time_fn` (median of `--reps` samples of asynchronous jitted calls
after warm-up). The current default is marked `*`. Besides configs it times:

- act backward in two passes (the default: grouped GEMM storing `g`, then
  the elementwise kernel; stage `act_bwd`) and as one fused kernel
  (`SPLIT_N` 1 or 2; stage `act_bwd_f`);
- dW_down's row scale in the kernel (`row_scale_mode="kernel"`) and prescaled
  in XLA (`"prescale"`), and dW_up with `x` gathered in the kernel or by XLA
  first (`"pregather"`), dW_up / dW_down separately.

Usage (GPU machine; `main` sets `JMOE_AUTOTUNE=0` while it runs)::

  python -m benchmarks.sweep_configs --cases small,e64,big --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys

import jax
import jax.numpy as jnp

from benchmarks.gpu_kernels import CASES, make_inputs, time_fn
from jmoe._env import env_overrides
from jmoe.ops import expert_ffn as ffn
from jmoe.ops import grouped_matmul as gmm
from jmoe.ops.grouped_matmul import GemmConfig
from jmoe.ops.tgmm import TgmmConfig, tgmm

ACT = "swiglu"

# (BLOCK_N, BLOCK_K, GROUP_M, warps, stages, SPLIT_N); BLOCK_M comes from the
# tile schedule.
UP_CANDIDATES = (
    (128, 64, 8, 8, 4, 1),
    (64, 64, 8, 8, 4, 1),
    (128, 32, 8, 8, 5, 1),
    (128, 64, 16, 8, 3, 1),
)
DOWN_CANDIDATES = (
    (256, 64, 8, 8, 3, 1),
    (256, 64, 8, 8, 4, 1),
    (128, 64, 8, 8, 4, 1),
    (128, 128, 8, 8, 3, 1),
)
ACT_BWD_CANDIDATES = (
    (64, 64, 8, 8, 4, 1),
    (64, 64, 8, 8, 4, 2),
    (64, 64, 8, 8, 3, 2),
    (64, 32, 8, 8, 6, 2),
    (128, 64, 8, 8, 3, 1),
)
DX_CANDIDATES = DOWN_CANDIDATES
# (BLOCK_M (rows per step), BLOCK_K, BLOCK_N, GROUP_SIZE, warps, stages).
TGMM_CANDIDATES = (
    (64, 128, 256, 8, 8, 3),
    (64, 128, 256, 8, 8, 4),
    (64, 256, 128, 8, 8, 3),
    (128, 128, 128, 8, 8, 3),
    (64, 128, 128, 8, 4, 3),
    (64, 128, 128, 8, 4, 4),
    (64, 256, 128, 8, 8, 4),
)


@contextlib.contextmanager
def pinned(kind: str, cfg: GemmConfig | None):
  """Makes `default_config` return `cfg` for launches of `kind`."""
  original = gmm.default_config

  def patched(k, block_m, n, kk, backend, gated=False, **kwargs):
    if k == kind and cfg is not None:
      return dataclasses.replace(cfg, block_m=block_m)
    return original(k, block_m, n, kk, backend, gated, **kwargs)

  gmm.default_config = patched
  try:
    yield
  finally:
    gmm.default_config = original


STAGES = ("up", "down", "act_bwd", "act_bwd_f", "dx", "dW_up", "dW_down")


def sweep_case(name: str, reps: int, out: list, be: str = "triton",
               stages=STAGES) -> None:
  t, d, f, e, top_k, _, _ = CASES[name]
  x, ids, weights, kept, up, down, _ = make_inputs(t, d, f, e, top_k)
  al, w_sorted, block_m = ffn.plan(ids, kept, weights, e, be)
  tk = al.token.shape[0]  # slots (t * top_k)
  dy = jax.random.normal(jax.random.key(7), (t, d), jnp.bfloat16)
  print(f"## {name}: t={t} d={d} f={f} e={e} k={top_k} block_m={block_m}", flush=True)

  def record(stage, label, seconds, flops, default=False):
    tf = flops / seconds / 1e12
    mark = "*" if default else " "
    print(f"  {stage:<10} {mark}{label:<40} {seconds * 1e3:9.3f} ms {tf:7.1f} TFLOP/s",
          flush=True)
    out.append({"case": name, "stage": stage, "config": label, "default": default,
                "ms": seconds * 1e3, "tflops": tf})

  def default_of(kind, n, k, gated=False):
    return gmm.default_config(kind, block_m, n, k, be, gated)

  def label_of(c):
    return (f"{c.block_m}x{c.block_n}x{c.block_k} g{c.group_m} w{c.num_warps} "
            f"s{c.num_stages}" + (f" split{c.split_n}" if c.split_n != 1 else ""))

  def run_gemm(stage, kind, candidates, default, make_fn, args, flops):
    if stage not in stages:
      return
    seen = set()
    for c in (default,) + tuple(GemmConfig(block_m, *c) for c in candidates):
      if c in seen:
        continue
      seen.add(c)
      with pinned(kind, c):
        fn = jax.jit(make_fn())
        try:
          ms, _, _ = time_fn(fn, *args, reps=reps)
        except Exception as err:  # pylint: disable=broad-except
          print(f"  {stage:<10}  {label_of(c):<40} FAILED {type(err).__name__}: "
                f"{str(err)[:200]}", flush=True)
          continue
      record(stage, label_of(c), ms, flops, default=c == default)

  # Forward: up (gated act) and down.
  # Router weights scale as in the op (JMOE_ROUTER_SCALE): up epilogue or down.
  w_up, w_down = ffn.router_scale_args(w_sorted)
  h, pre = jax.jit(lambda x, u, al, w: ffn.up_stage(x, u, al, block_m, ACT, be, True, w))(
      x, up, al, w_up)
  run_gemm("up", "act", UP_CANDIDATES, default_of("act", f, d, True),
           lambda: lambda x, u, al, w: ffn.up_stage(x, u, al, block_m, ACT, be, True, w),
           (x, up, al, w_up), 2.0 * tk * d * 2 * f)
  run_gemm("down", "plain", DOWN_CANDIDATES, default_of("plain", d, f),
           lambda: lambda h, dn, al, w: ffn.down_stage(h, dn, al, w, block_m, be),
           (h, down, al, w_down), 2.0 * tk * f * d)
  # Backward: act bwd (fused), two-pass estimate, dx, tgmm.
  run_gemm("act_bwd", "plain", DOWN_CANDIDATES[:2], default_of("plain", f, d),
           lambda: lambda dy, dn, al, w, pre: ffn.act_bwd_stage(
               dy, dn, al, w, pre, block_m, ACT, be, impl="two_pass"),
           (dy, down, al, w_sorted, pre), 2.0 * tk * d * f)
  run_gemm("act_bwd_f", "act_bwd", ACT_BWD_CANDIDATES, default_of("act_bwd", f, d, True),
           lambda: lambda dy, dn, al, w, pre: ffn.act_bwd_stage(
               dy, dn, al, w, pre, block_m, ACT, be, impl="fused"),
           (dy, down, al, w_sorted, pre), 2.0 * tk * d * f)
  d_pre, _ = jax.jit(lambda dy, dn, al, w, pre: ffn.act_bwd_stage(
      dy, dn, al, w, pre, block_m, ACT, be))(dy, down, al, w_sorted, pre)
  run_gemm("dx", "plain", DX_CANDIDATES, default_of("plain", d, 2 * f),
           lambda: lambda dp, u, al: ffn.dx_stage(dp, u, al, block_m, be),
           (d_pre, up, al), 2.0 * tk * 2 * f * d)

  default_t = TgmmConfig()
  for stage, flops in (("dW_up", 2.0 * tk * d * 2 * f), ("dW_down", 2.0 * tk * f * d)):
    if stage not in stages:
      continue
    modes = (("prescale", "pregather_b", "kernel") if stage == "dW_down"
             else ("pregather", "gather"))
    for mode in modes:
      seen = set()
      for c in (default_t,) + tuple(TgmmConfig(*c) for c in TGMM_CANDIDATES):
        if c in seen:
          continue
        seen.add(c)
        if stage == "dW_up" and mode == "gather":
          fn = jax.jit(lambda x, dp, al, c=c: tgmm(
              x, dp, al.group_sizes, a_row_index=al.token, out_dtype=jnp.bfloat16,
              backend=be, config=c, gather_mode="kernel"))
          args = (x, d_pre, al)
        elif stage == "dW_up":
          fn = jax.jit(lambda x, dp, al, c=c: tgmm(
              x, dp, al.group_sizes, a_row_index=al.token, out_dtype=jnp.bfloat16,
              backend=be, config=c, gather_mode="xla"))
          args = (x, d_pre, al)
        elif mode == "pregather_b":
          fn = jax.jit(lambda h, dy, al, w, c=c: tgmm(
              h, jnp.take(dy, al.token, axis=0, mode="clip"), al.group_sizes,
              row_scale=w, out_dtype=jnp.bfloat16, backend=be, config=c))
          args = (h, dy, al, w_sorted)
        else:
          fn = jax.jit(lambda h, dy, al, w, c=c, mode=mode: tgmm(
              h, dy, al.group_sizes, b_row_index=al.token, row_scale=w,
              out_dtype=jnp.bfloat16, backend=be, config=c, row_scale_mode=mode))
          args = (h, dy, al, w_sorted)
        label = (f"{c.block_m}x{c.block_k}x{c.block_n} g{c.group_size} "
                 f"w{c.num_warps} s{c.num_stages}"
                 + f" {mode}")
        try:
          ms, _, _ = time_fn(fn, *args, reps=reps)
        except Exception as err:  # pylint: disable=broad-except
          print(f"  {stage:<10}  {label:<40} FAILED {type(err).__name__}: "
                f"{str(err)[:200]}", flush=True)
          continue
        record(stage, label, ms, flops,
               default=(c == default_t and mode in ("prescale", "pregather")))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default="e64,big,small")
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--json", default="")
  parser.add_argument("--stages", default=",".join(STAGES))
  parser.add_argument("--backend", default="triton", choices=("triton", "interpret"),
                      help="interpret: CPU smoke test (use --cases tiny)")
  args = parser.parse_args(argv)
  print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
  rows: list = []
  # Every launch takes the pinned (swept) config.
  with env_overrides({gmm.AUTOTUNE_ENV: "0"}):
    for name in args.cases.split(","):
      sweep_case(name, args.reps, rows, args.backend, args.stages.split(","))
      if args.json:
        with open(args.json, "w") as fh:
          json.dump(rows, fh, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
