"""Session 13 probe: jmoe's up (act) GEMM against the plain grouped GEMM and a
dense XLA dot of the same shape, under sustained load (H100, jax).

Run from the repository root: `python benchmarks/results/h100-sweeps/session13/up_probe.py e64,big`.
Inputs: `benchmarks.gpu_kernels` (the power_probe's skewed routing). Rows:
  act up (*)      `expert_ffn.up_stage` forward (h only), with the named switches
  plain up 2f     `jmoe.grouped_matmul(x sorted, up)`: [rows, 2f] out, the plain
                  kernel (flattened persistent, TMA, one 128x256 dot per step)
  plain down      `jmoe.grouped_matmul(h sorted, down)` (the down GEMM's kernel)
  dense up/down   `benchmarks.dense_bound` dots of the same flops, no grouping
"""
import sys

import jax
import jax.numpy as jnp

import jmoe
from benchmarks import dense_bound
from benchmarks.gpu_kernels import CASES, make_inputs
from benchmarks.power_probe import COLUMNS, sustained
from jmoe._env import env_overrides
from jmoe.ops import expert_ffn as ffn


def act_program(x, up, al, block_m, w_sorted, env):
  with env_overrides(env):
    fn = jax.jit(lambda x, up: ffn.up_stage(x, up, al, block_m, "swiglu", "triton",
                                            False, row_scale=w_sorted)[0])
    jax.block_until_ready(fn(x, up))  # traced with the switches set
  return fn


def main(cases):
  print(jax.devices()[0].device_kind, jax.__version__)
  for case in cases:
    t, d, f, e, k, _, _ = CASES[case]
    x, ids, w, kept, up, down, _ = make_inputs(t, d, f, e, k)
    al, w_sorted, block_m = ffn.plan(ids, kept, w, e, "triton")
    xs = x[al.token]
    h = jax.random.normal(jax.random.key(3), (t * k, f), jnp.bfloat16)
    up_flops = 2.0 * t * k * d * 2 * f
    progs = {}
    for label, env in (("act up (default)", {}),
                       ("act up (copy, TMA)", {"JMOE_GATHER_ROWS": "copy"}),
                       ("act up (copy, WIDE cp.async)",
                        {"JMOE_GATHER_ROWS": "copy", "JMOE_GEMM_TMA": "act=off"}),
                       ("act up (kernel gather)", {"JMOE_GATHER_ROWS": "kernel"})):
      progs[label] = (act_program(x, up, al, block_m, w_sorted, env), (x, up), up_flops)
    gs = al.group_sizes
    progs["plain up 2f (sorted rows)"] = (
        jax.jit(lambda a, b: jmoe.grouped_matmul(a, b, gs, backend="triton")), (xs, up),
        up_flops)
    progs["plain down (sorted rows)"] = (
        jax.jit(lambda a, b: jmoe.grouped_matmul(a, b, gs, backend="triton")), (h, down),
        up_flops / 2)
    for gemm in dense_bound.ffn_gemms(t, d, f, e, k)[:2]:
      fn, args = dense_bound.dense_program(gemm)
      progs[f"dense {gemm.name}"] = (fn, args, gemm.flops)
    for fn, args, _ in progs.values():
      jax.block_until_ready(fn(*args))
    print(f"# case {case} t={t} d={d} f={f} e={e} k={k}; 1.5 s sustained after 1 s idle")
    print(f"  {'program':<34}" + "".join(f"{c:>10}" for c in COLUMNS))
    for label, (fn, args, flops) in progs.items():
      row = sustained(fn, args, flops, 1.5, 1.0, 0.03)
      print(f"  {label:<34}" + "".join(f"{row[c]:>10.4g}" for c in COLUMNS), flush=True)


if __name__ == "__main__":
  main(sys.argv[1].split(","))
