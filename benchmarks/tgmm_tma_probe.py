"""The MoE weight gradients with the plain and the TMA tgmm, side by side (GPU).

For each case it builds the two `jmoe.ops.tgmm` calls of `expert_ffn`'s
backward with the columns layout (dW_up = x^T d_pre with `x` gathered as
columns; dW_down^T = (w dy)^T h with a transposed store) on skewed random
routing, then times each kernel variant (`JMOE_TGMM_KERNEL`,
`JMOE_TGMM_TMA_FLATTEN`, `JMOE_TGMM_TMA_BOUNDED`, tile config) in interleaved
rounds: the median over rounds of `gpu_kernels.time_fn`. The column copy
(`group_columns`) is inside every timing. Each variant's output is compared
with the plain kernel's (max |diff| / max |plain|).

Usage (GPU, jax-triton installed)::

  python -m benchmarks.tgmm_tma_probe [--cases big,e64] [--rounds 3]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import triton

from benchmarks.gpu_kernels import CASES, make_inputs, time_fn
from jmoe._env import env_overrides
from jmoe.ops.tgmm import TgmmConfig, tgmm

_ROWS = TgmmConfig(64, 128, 128, 8, 4, 3)
_TMA = {"JMOE_TGMM_KERNEL": "tma", "JMOE_TGMM_TMA_BOUNDED": "1"}
VARIANTS = {  # label: (env, config); "rows": the row layout of both gradients
    "plain 128x256": ({"JMOE_TGMM_KERNEL": "plain"}, TgmmConfig()),
    "rows plain 128x128w4": ({"JMOE_TGMM_KERNEL": "plain"}, _ROWS),
    "rows plain 128x256": ({"JMOE_TGMM_KERNEL": "plain"}, TgmmConfig()),
    "tma 128x256 bounded s4": (_TMA, TgmmConfig(num_stages=4)),
    "tma 128x256 bounded store": ({**_TMA, "JMOE_TGMM_TMA_STORE": "1"}, TgmmConfig()),
    "tma 128x256 bounded s4 store": ({**_TMA, "JMOE_TGMM_TMA_STORE": "1"},
                                     TgmmConfig(num_stages=4)),
    "tma 256x128 bounded store": ({**_TMA, "JMOE_TGMM_TMA_STORE": "1"},
                                  TgmmConfig(64, 256, 128, 8, 8, 3)),
    "plain 128x128w4": ({"JMOE_TGMM_KERNEL": "plain"}, TgmmConfig(64, 128, 128, 8, 4, 3)),
    "tma 128x256": ({"JMOE_TGMM_KERNEL": "tma", "JMOE_TGMM_TMA_BOUNDED": "0"},
                    TgmmConfig()),
    "tma 128x256 bounded": ({"JMOE_TGMM_KERNEL": "tma", "JMOE_TGMM_TMA_BOUNDED": "1"},
                            TgmmConfig()),
    "tma 128x256 flatten": ({"JMOE_TGMM_KERNEL": "tma", "JMOE_TGMM_TMA_BOUNDED": "0",
                             "JMOE_TGMM_TMA_FLATTEN": "1"}, TgmmConfig()),
    "tma 128x256 s4": ({"JMOE_TGMM_KERNEL": "tma", "JMOE_TGMM_TMA_BOUNDED": "0"},
                       TgmmConfig(num_stages=4)),
    "tma 128x128w4": ({"JMOE_TGMM_KERNEL": "tma", "JMOE_TGMM_TMA_BOUNDED": "0"},
                      TgmmConfig(64, 128, 128, 8, 4, 3)),
    # The Gluon kernel: num_stages is its operand ring (loads NUM_BUFFERS - 2 ahead).
    "gluon 128x256 s3": ({"JMOE_TGMM_KERNEL": "gluon", "JMOE_TGMM_GLUON_WS": "0"},
                         TgmmConfig()),
    "gluon ws 128x256 s3": ({"JMOE_TGMM_KERNEL": "gluon", "JMOE_TGMM_GLUON_WS": "1"},
                            TgmmConfig()),
    "gluon ws 128x256 bm32 s6": ({"JMOE_TGMM_KERNEL": "gluon", "JMOE_TGMM_GLUON_WS": "1"},
                                 TgmmConfig(32, 128, 256, 8, 8, 6)),
    "gluon 128x256 bm32 s6": ({"JMOE_TGMM_KERNEL": "gluon"},
                              TgmmConfig(32, 128, 256, 8, 8, 6)),
    "gluon 128x128 s4": ({"JMOE_TGMM_KERNEL": "gluon"}, TgmmConfig(64, 128, 128, 8, 8, 4)),
}


def routed(t, d, f, e, top_k):
  """x, dy [t, d], d_pre [tk, 2f], h [tk, f], token, w_sorted [tk], sizes [e]."""
  x, ids, weights = make_inputs(t, d, f, e, top_k)[:3]
  flat = ids.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  token = (order // top_k).astype(jnp.int32)
  sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
  keys = jax.random.split(jax.random.key(1), 3)
  tk = t * top_k
  dy = jax.random.normal(keys[0], (t, d), jnp.bfloat16)
  d_pre = jax.random.normal(keys[1], (tk, 2 * f), jnp.bfloat16)
  h = jax.random.normal(keys[2], (tk, f), jnp.bfloat16)
  return x, dy, d_pre, h, token, weights.reshape(-1)[order], sizes


def weight_grads(x, dy, d_pre, h, token, w_sorted, sizes, config, rows=False):
  if rows:  # expert_ffn's row layout (its default at <= 1024 rows per expert)
    d_up = tgmm(x, d_pre, sizes, a_row_index=token, out_dtype=jnp.bfloat16,
                config=config, gather_mode="xla", backend="triton")
    d_down = tgmm(h, dy, sizes, b_row_index=token, row_scale=w_sorted,
                  out_dtype=jnp.bfloat16, config=config, gather_mode="xla",
                  backend="triton")
    return d_up, d_down
  d_up = tgmm(x, d_pre, sizes, a_row_index=token, out_dtype=jnp.bfloat16,
              config=config, gather_mode="xla_columns", backend="triton")
  d_down = tgmm(dy, h, sizes, a_row_index=token, row_scale=w_sorted,
                out_dtype=jnp.bfloat16, config=config, gather_mode="xla_columns",
                transpose_out=True, backend="triton")
  return d_up, d_down


def main(argv=None) -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--cases", default="big,e64")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--rounds", type=int, default=3,
                      help="timing rounds; 0 runs each variant once, untimed (for ncu)")
  args = parser.parse_args(argv)
  labels = args.variants.split(",")
  print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, "
        f"triton {triton.__version__}", flush=True)
  for name in args.cases.split(","):
    t, d, f, e, top_k = CASES[name][:5]
    inputs = routed(t, d, f, e, top_k)
    flops = 2.0 * t * top_k * d * 3 * f  # dW_up (2f) + dW_down (f)
    fns, base = {}, None
    for label in labels:
      envs, config = VARIANTS[label]
      fn = jax.jit(lambda *a, config=config, rows=label.startswith("rows"):
                   weight_grads(*a, config, rows))
      with env_overrides(envs):
        out = jax.block_until_ready(fn(*inputs))
      if base is None:
        base = out
      errs = [float(jnp.max(jnp.abs(o.astype(jnp.float32) - r.astype(jnp.float32)))
                    / jnp.max(jnp.abs(r.astype(jnp.float32)))) for o, r in zip(out, base)]
      fns[label] = fn
      print(f"  {name} {label}: vs first variant dW_up {errs[0]:.1e}, "
            f"dW_down {errs[1]:.1e}", flush=True)
    if not args.rounds:
      continue
    times = {label: [] for label in labels}
    for _ in range(args.rounds):
      for label in labels:
        times[label].append(time_fn(fns[label], *inputs, reps=5, min_sample_s=0.1)[0])
    print(f"## {name}: t={t} d={d} f={f} e={e} k={top_k} (dW_up + dW_down, "
          f"copies included; median of {args.rounds} rounds)", flush=True)
    first = np.median(times[labels[0]])
    for label in labels:
      sec = float(np.median(times[label]))
      print(f"  {label:24s} {sec * 1e3:8.3f} ms {flops / sec / 1e12:6.1f} TFLOP/s "
            f"x{first / sec:5.3f}  rounds {[round(s * 1e3, 3) for s in times[label]]}",
            flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
