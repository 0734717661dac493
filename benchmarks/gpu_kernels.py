"""Kernel-level GPU timings of jmoe's grouped GEMM and fused expert FFN.

For each MoE shape (bf16, SwiGLU, dropless, skewed random routing) it times,
in one process, after warm-up, the median over `--reps` samples of many
asynchronous jitted calls ended by one `block_until_ready`:

- the stages of `jmoe.ops.expert_ffn` alone (align, up+act, down, combine;
  act backward, the two tgmm weight gradients, dx GEMM, combine with
  d_weights), with TFLOP/s where they do matmul work;
- `expert_ffn` forward and forward+backward (Triton) against
  `jmoe.reference.expert_ffn` (XLA `ragged_dot`);
- the whole `jmoe.moe` (router + experts, backend "triton");
- a dense `jnp.dot` with the same flops (`[t*k, d] @ [d, 3f]`): the ceiling;
- `jmoe.ops.grouped_matmul` against `jax.lax.ragged_dot` on the up shape.

Useful flops: forward `6 t k d f` (gated up `2 t k d 2f` + down `2 t k f d`),
forward+backward three times that.

Usage (on the GPU machine)::

  JMOE_AUTOTUNE=0 python benchmarks/gpu_kernels.py --cases small,big,e64 \
      --json $OUT/kernels.json

`JMOE_AUTOTUNE=0` pins one config per kernel (fast compiles); leave it unset
to autotune. Prints a markdown table per case.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

CASES = {
    # name: (t, d, f, e, top_k, target fwd ms, target fwd+bwd ms)
    "small": (4096, 768, 3072, 8, 2, 0.30, 1.0),
    "big": (8192, 4096, 14336, 8, 2, 9.0, 27.0),
    "e64": (8192, 2048, 1408, 64, 6, 1.6, 5.0),
    "e256": (8192, 1024, 512, 256, 8, None, None),
    "tiny": (64, 64, 32, 4, 2, None, None),  # CPU smoke test with --backend interpret
}


def time_fn(fn, *args, reps=5, min_sample_s=0.05, max_calls=200):
  """Median seconds per call (plus the first call's time, compile included)."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  one = time.perf_counter() - t0
  calls = int(max(1, min(max_calls, min_sample_s / max(one, 1e-6))))
  samples = []
  for _ in range(reps):
    t0 = time.perf_counter()
    out = None
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) / calls)
  return float(np.median(samples)), first, (max(samples) - min(samples)) / np.median(samples)


def make_inputs(t, d, f, e, top_k, seed=0):
  keys = jax.random.split(jax.random.key(seed), 6)
  x = jax.random.normal(keys[0], (t, d), jnp.bfloat16)
  up = (jax.random.normal(keys[1], (e, d, 2 * f)) / np.sqrt(d)).astype(jnp.bfloat16)
  down = (jax.random.normal(keys[2], (e, f, d)) / np.sqrt(f)).astype(jnp.bfloat16)
  # Skewed routing: expert offsets from 0 to 2 in logits.
  skew = jax.random.permutation(keys[3], jnp.linspace(0.0, 2.0, e))
  logits = jax.random.normal(keys[4], (t, e)) + skew
  probs, ids = jax.lax.top_k(jax.nn.softmax(logits), top_k)
  weights = (probs / probs.sum(-1, keepdims=True)).astype(jnp.float32)
  kept = jnp.ones((t, top_k), bool)
  router = (jax.random.normal(keys[5], (d, e)) / np.sqrt(d)).astype(jnp.bfloat16)
  return x, ids.astype(jnp.int32), weights, kept, up, down, router


def ffn_programs(name, backend="triton"):
  """`(forward, loss, args)` of `expert_ffn` on case `name` (SwiGLU, the case's
  skewed routing): `forward(x, weights, up, down) -> y`, `loss(...)` the float32
  sum of `y` times a fixed random cotangent, `args = (x, weights, up, down)`.
  Switches (`JMOE_*`) are read when a caller traces them."""
  from jmoe.ops import expert_ffn as ffn  # pylint: disable=import-outside-toplevel

  t, d, f, e, top_k, _, _ = CASES[name]
  x, ids, weights, kept, up, down, _ = make_inputs(t, d, f, e, top_k)
  ct = jax.random.normal(jax.random.key(8), (t, d), jnp.float32)
  op = functools.partial(ffn.expert_ffn, activation="swiglu", backend=backend)

  def forward(x, w, u, dn):
    return op(x, ids, w, kept, u, dn)

  def loss(x, w, u, dn):
    return jnp.sum(forward(x, w, u, dn).astype(jnp.float32) * ct)

  return forward, loss, (x, weights, up, down)


def bench_case(name, reps, with_reference, with_moe, be="triton"):
  from jmoe import reference  # pylint: disable=import-outside-toplevel
  from jmoe.ops import expert_ffn as ffn  # pylint: disable=import-outside-toplevel
  from jmoe.ops import grouped_matmul as gmm  # pylint: disable=import-outside-toplevel

  t, d, f, e, top_k, target_fwd, target_fb = CASES[name]
  x, ids, weights, kept, up, down, router = make_inputs(t, d, f, e, top_k)
  tk = t * top_k
  fl_fwd = 6.0 * tk * d * f
  rows = []

  def row(label, seconds, flops=None, extra=""):
    tf = flops / seconds / 1e12 if flops else None
    rows.append((label, seconds * 1e3, tf, extra))
    tf_s = f"{tf:7.1f}" if tf else "      -"
    print(f"  {label:<34} {seconds * 1e3:9.3f} ms {tf_s} TFLOP/s {extra}", flush=True)

  act = "swiglu"
  # Stages (inputs precomputed outside the timed function).
  block_m = gmm.block_m_for(tk, e, be)
  al, w_sorted = jax.jit(lambda i, k, w: ffn.plan(i, k, w, e, be)[:2])(ids, kept, weights)
  for impl in ("xla", "triton"):
    fn = jax.jit(lambda i, k, w, impl=impl: ffn.plan(i, k, w, e, be, impl)[:2])
    other = fn(ids, kept, weights)
    same = all(bool(jnp.array_equal(u, v)) for u, v in zip(jax.tree.leaves(other),
                                                            jax.tree.leaves((al, w_sorted))))
    ms, _, _ = time_fn(fn, ids, kept, weights, reps=reps)
    row(f"align ({impl})", ms, None, "identical" if same else "DIFFERENT")
  # Router weights scale h in the up epilogue ("up", default) or the down
  # GEMM's output and dW_down's prescaled rows ("down"): JMOE_ROUTER_SCALE.
  w_up, w_down = ffn.router_scale_args(w_sorted)
  print(f"  (router weights scale in the {ffn.router_scale_stage()} stage)", flush=True)
  up_fn = jax.jit(lambda x, u, al, w: ffn.up_stage(x, u, al, block_m, act, be, True, w))
  h, pre = up_fn(x, up, al, w_up)
  ms, _, _ = time_fn(up_fn, x, up, al, w_up, reps=reps)
  row("up GEMM + SwiGLU (+pre store)", ms, 2.0 * tk * d * 2 * f)
  up_fn2 = jax.jit(lambda x, u, al, w: ffn.up_stage(x, u, al, block_m, act, be, False, w))
  ms, _, _ = time_fn(up_fn2, x, up, al, w_up, reps=reps)
  row("up GEMM + SwiGLU (no pre)", ms, 2.0 * tk * d * 2 * f)
  down_fn = jax.jit(lambda h, dn, al, w: ffn.down_stage(h, dn, al, w, block_m, be))
  o = down_fn(h, down, al, w_down)
  ms, _, _ = time_fn(down_fn, h, down, al, w_down, reps=reps)
  row("down GEMM (f32 out)", ms, 2.0 * tk * f * d)
  comb_fn = jax.jit(lambda o, pos: ffn.combine(o, pos, jnp.bfloat16, be))
  ms, _, _ = time_fn(comb_fn, o, al.pos, reps=reps)
  row("combine (k-way gather-sum)", ms, None, f"{(tk * d * 4 + t * d * 2) / ms / 1e9:.0f} GB/s")
  dy = jax.random.normal(jax.random.key(7), (t, d), jnp.bfloat16)
  # JMOE_SHARE_SORTED_ROWS: the dy copy counts in the act bwd row, the x copy
  # (made by the op's forward) in the tgmm row.
  share = ffn.share_sorted_rows(be, x.dtype, d, f, up.shape[2])

  def rows_of(a, al):
    return ffn.gmm_lib.gather_rows(a, al.token, be) if share else None

  ab_fn = jax.jit(lambda dy, dn, al, w, pre: ffn.act_bwd_stage(
      dy, dn, al, w, pre, block_m, act, be, dy_rows=rows_of(dy, al)))
  d_pre, dwp = ab_fn(dy, down, al, w_sorted, pre)
  ms, _, _ = time_fn(ab_fn, dy, down, al, w_sorted, pre, reps=reps)
  row("act bwd GEMM (dy @ down^T + epi)", ms, 2.0 * tk * d * f)
  dy_rows = jax.jit(rows_of)(dy, al)
  wg_fn = jax.jit(lambda x, dy, h, dp, al, w, dy_rows: ffn.weight_grad_stage(
      x, dy, h, dp, al, w, jnp.bfloat16, jnp.bfloat16, be, x_rows=rows_of(x, al),
      dy_rows=dy_rows))
  ms, _, _ = time_fn(wg_fn, x, dy, h, d_pre, al, w_down, dy_rows, reps=reps)
  row("tgmm dW_down + dW_up", ms, 2.0 * tk * f * d + 2.0 * tk * d * 2 * f)
  dx_fn = jax.jit(lambda dp, u, al: ffn.dx_stage(dp, u, al, block_m, be))
  dxc = dx_fn(d_pre, up, al)
  ms, _, _ = time_fn(dx_fn, d_pre, up, al, reps=reps)
  row("dx GEMM (d_pre @ up^T, f32 out)", ms, 2.0 * tk * 2 * f * d)
  cdw_fn = jax.jit(lambda s, pos, dwp: ffn.combine(s, pos, jnp.bfloat16, be, dwp=dwp))
  ms, _, _ = time_fn(cdw_fn, dxc, al.pos, dwp, reps=reps)
  row("combine dx + d_weights", ms)

  # Whole op.
  ct = jax.random.normal(jax.random.key(8), (t, d), jnp.float32)

  # Routing is passed as arguments (closed-over constants would let XLA fold the
  # reference's argsort at compile time).
  def loss(fn, x, ids, w, kept, u, dn):
    return jnp.sum(fn(x, ids, w, kept, u, dn).astype(jnp.float32) * ct)

  op = functools.partial(ffn.expert_ffn, activation=act, backend=be)
  fwd = jax.jit(op)
  fb = jax.jit(jax.value_and_grad(functools.partial(loss, op), (0, 2, 4, 5)))
  ms_fwd, first, spread = time_fn(fwd, x, ids, weights, kept, up, down, reps=reps)
  row("expert_ffn fwd (triton)", ms_fwd, fl_fwd, f"first {first:.1f}s spread {spread:.1%}")
  ms_fb, first, spread = time_fn(fb, x, ids, weights, kept, up, down, reps=reps)
  row("expert_ffn fwd+bwd (triton)", ms_fb, 3 * fl_fwd, f"first {first:.1f}s spread {spread:.1%}")
  a = jax.random.normal(jax.random.key(9), (tk, d), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(10), (d, 3 * f), jnp.bfloat16)
  ms, _, _ = time_fn(jax.jit(jnp.dot), a, b, reps=reps)
  row("dense jnp.dot, same flops", ms, fl_fwd)
  if with_reference:
    ref = functools.partial(reference.expert_ffn, activation=act)
    rfwd = jax.jit(ref)
    rfb = jax.jit(jax.value_and_grad(functools.partial(loss, ref), (0, 2, 4, 5)))
    ms, _, _ = time_fn(rfwd, x, ids, weights, kept, up, down, reps=max(1, reps // 2))
    row("reference fwd (XLA ragged_dot)", ms, fl_fwd)
    if e <= 8:  # the ragged_dot backward materialises [e, t*k, f] float32
      ms, _, _ = time_fn(rfb, x, ids, weights, kept, up, down, reps=max(1, reps // 2))
      row("reference fwd+bwd (XLA)", ms, 3 * fl_fwd)
    lhs = x[al.token]
    gfn = jax.jit(lambda l, r, s: gmm.grouped_matmul(l, r, s, backend=be))
    ms, _, _ = time_fn(gfn, lhs, up, al.group_sizes, reps=reps)
    row("grouped_matmul [tk,d]x[e,d,2f]", ms, 2.0 * tk * d * 2 * f)
    rfn = jax.jit(lambda l, r, s: jax.lax.ragged_dot(l, r, s))
    ms, _, _ = time_fn(rfn, lhs, up, al.group_sizes, reps=max(1, reps // 2))
    row("lax.ragged_dot same shape", ms, 2.0 * tk * d * 2 * f)
  if with_moe:
    from jmoe.api import moe  # pylint: disable=import-outside-toplevel
    from jmoe.types import MoEParams  # pylint: disable=import-outside-toplevel

    params = MoEParams(router, up, down)

    def moe_loss(x, p):
      y, aux = moe(x, p, top_k=top_k, backend=be)
      return jnp.sum(y.astype(jnp.float32) * ct) + aux.load_balancing_loss

    mfwd = jax.jit(lambda x, p: moe(x, p, top_k=top_k, backend=be)[0])
    mfb = jax.jit(jax.value_and_grad(moe_loss, (0, 1)))
    ms, _, _ = time_fn(mfwd, x, params, reps=reps)
    row("jmoe.moe fwd (router+experts)", ms, fl_fwd,
        f"target {target_fwd} ms" if target_fwd else "")
    ms, _, _ = time_fn(mfb, x, params, reps=reps)
    row("jmoe.moe fwd+bwd", ms, 3 * fl_fwd, f"target {target_fb} ms" if target_fb else "")
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default="small,big,e64")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--no-reference", action="store_true")
  parser.add_argument("--no-moe", action="store_true")
  parser.add_argument("--json", default="")
  parser.add_argument("--backend", default="triton", choices=("triton", "interpret"))
  args = parser.parse_args(argv)
  import triton  # pylint: disable=import-outside-toplevel

  dev = jax.devices()[0]
  print(f"# device {dev.device_kind}; jax {jax.__version__}; triton {triton.__version__}; "
        f"python {platform.python_version()}; JMOE_AUTOTUNE="
        f"{os.environ.get('JMOE_AUTOTUNE', '(unset: autotune)')}; "
        + "".join(f"{k}={os.environ[k]}; " for k in sorted(os.environ)
                  if k.startswith("JMOE_") and k != "JMOE_AUTOTUNE")
        + time.strftime('%Y-%m-%d %H:%M:%S'), flush=True)
  results = {}
  for name in args.cases.split(","):
    t, d, f, e, top_k, *_ = CASES[name]
    print(f"\n## {name}: t={t} d={d} f={f} e={e} top_k={top_k} (bf16, swiglu)", flush=True)
    try:
      results[name] = bench_case(
          name, args.reps, not args.no_reference, not args.no_moe, args.backend
      )
    except Exception as err:  # pylint: disable=broad-except
      print(f"  FAILED: {type(err).__name__}: {str(err)[:2000]}", flush=True)
      results[name] = f"failed: {err}"
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(results, fh, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
