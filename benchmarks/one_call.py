"""Runs `expert_ffn` forward+backward once per case: a target for profilers (ncu).

Nsight Compute replays each profiled kernel many times, so a timing loop is not
wanted there; this compiles and runs the op exactly once per case (inputs of
`benchmarks/gpu_kernels.py`). Example (on the GPU machine)::

  ncu --kernel-name regex:"_tgmm_kernel|_grouped_gemm_act_kernel" --launch-count 3 \\
      --section SpeedOfLight --section WarpStateStats \\
      python -m benchmarks.one_call --cases e64
"""

from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp

from benchmarks.gpu_kernels import CASES, make_inputs
from jmoe.ops import expert_ffn as ffn


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default="e64")
  parser.add_argument("--backend", default="triton")
  args = parser.parse_args(argv)
  for case in args.cases.split(","):
    t, d, f, e, top_k, _, _ = CASES[case]
    x, ids, weights, kept, up, down, _ = make_inputs(t, d, f, e, top_k)
    ct = jax.random.normal(jax.random.key(8), (t, d), jnp.float32)
    op = functools.partial(ffn.expert_ffn, activation="swiglu", backend=args.backend)

    def loss(x, w, u, dn, ids=ids, kept=kept, ct=ct, op=op):
      return jnp.sum(op(x, ids, w, kept, u, dn).astype(jnp.float32) * ct)

    grads = jax.jit(jax.grad(loss, (0, 1, 2, 3)))(x, weights, up, down)
    jax.block_until_ready(grads)
    print(f"# {case}: one expert_ffn forward+backward ran", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
