"""Session 21 probe: what the row-keyed jitter noise costs on the GPU.

`reference.jitter` now keys token r's noise by `fold_in(rng, r)` (each device
draws only its rows). Times, interleaved in one process:
  - the jittered router input alone, `x [t, d] * noise`: the earlier noise
    (`jax.random.uniform(rng, (t, d))`, one draw for the whole batch) against
    the row-keyed one, at the deepseek-like and Mixtral-like (t, d);
  - `jmoe.moe` forward and forward+backward at deepseek-like with
    `jitter_eps=0.01` against none.

  python benchmarks/results/h100-sweeps/session21/jitter_cost.py --rounds 6
"""

from __future__ import annotations

import argparse
import contextlib

import jax
import jax.numpy as jnp

import jmoe
from benchmarks.ab_env import add_round_args, time_interleaved
from benchmarks.explicit_split import programs
from benchmarks.timing import time_fn

EPS = 0.01


def whole_batch(x, rng):
  noise = jax.random.uniform(rng, x.shape, jnp.float32, 1 - EPS, 1 + EPS)
  return (x.astype(jnp.float32) * noise).astype(x.dtype)


def row_keyed(x, rng):
  return jmoe.reference.jitter(x, EPS, rng)


def jittered_layer(x, params, *, top_k, backend):
  return jmoe.moe(x, params, top_k=top_k, backend=backend, jitter_eps=EPS,
                  rng=jax.random.key(2))


def main():
  parser = argparse.ArgumentParser()
  add_round_args(parser)
  args = parser.parse_args()

  def time_ms(fn, fn_args, args):
    return time_fn(fn, *fn_args, repeats=args.reps, min_sample_s=args.min_sample_s).median_s * 1e3

  rng = jax.random.key(0)
  inputs = {f"t=8192 d={d}": jax.random.normal(jax.random.key(1), (8192, d), jnp.bfloat16)
            for d in (2048, 4096)}
  variants = {name: (contextlib.nullcontext,
                     {shape: (jax.jit(fn), (x, rng)) for shape, x in inputs.items()})
              for name, fn in (("whole-batch noise", whole_batch), ("row-keyed noise", row_keyed))}
  time_interleaved(variants, args, time_ms, "# jittered router input alone (ms)")

  variants = {}
  for name, layer in (("no jitter", None), ("jitter 0.01", jittered_layer)):
    fwd, fwdbwd, x, params, dy = programs("deepseek", args.backend, layer)
    variants[name] = (contextlib.nullcontext,
                      {"fwd": (fwd, (x, params)), "fwd+bwd": (fwdbwd, (x, params, dy))})
  time_interleaved(variants, args, time_ms, "# jmoe.moe deepseek-like (ms)")


if __name__ == "__main__":
  main()
