"""The expert FFN's GEMMs as dense XLA dots: a bound on what grouping can reach.

For an MoE layer `(t, d, f, e, top_k)` (SwiGLU: `pf = 2 f`; `rows = t * top_k`
token copies) the expert FFN does these GEMMs,
whatever the implementation (`jmoe.ops.expert_ffn` names them so):

  phase   name      batch   m          k          n     (flops 2 batch m k n)
  fwd     up        1       rows       d          pf
  fwd     down      1       rows       f          d
  bwd     dh        1       rows       d          f
  bwd     dx        1       rows       pf         d
  bwd     dW_up     e       d          rows / e   pf
  bwd     dW_down   e       f          rows / e   d

Here each runs as one dense bf16 `jnp.einsum` (XLA's GEMM: cuBLAS or XLA's own
Triton emitter, as XLA's autotuner picks): the same
flops with no grouping, no padded rows, no gathered rows, no activation and
no combine, every expert getting `rows / e` rows. Timed under the same
load as the FFN (`benchmarks.run` for the cases with targets, with the
benchmark's timing; `benchmarks.power_probe --dense-bound` under sustained
load), the sum
of a phase's GEMMs is what an implementation would take if its grouped GEMMs
ran as fast as the device's dense library GEMM at those shapes and everything
else were free: set beside a target, it says how much of the target is left
for the rest.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class DenseGemm(NamedTuple):
  """One GEMM of the expert FFN as a dense (batched) product."""

  phase: str  # "fwd" or "bwd"
  name: str
  batch: int
  m: int
  k: int
  n: int

  @property
  def flops(self) -> float:
    return 2.0 * self.batch * self.m * self.k * self.n


def ffn_gemms(t: int, d: int, f: int, e: int, top_k: int, gated: bool = True
              ) -> list[DenseGemm]:
  """The six GEMMs of an expert FFN with `t * top_k` token copies (the weight
  gradients with `t * top_k // e` rows per expert, at least 1); `gated`
  (SwiGLU / GeGLU): the up GEMM has `2 f` columns, else `f`."""
  rows = t * top_k
  pf = 2 * f if gated else f
  per_expert = max(1, rows // e)
  return [
      DenseGemm("fwd", "up", 1, rows, d, pf),
      DenseGemm("fwd", "down", 1, rows, f, d),
      DenseGemm("bwd", "dh", 1, rows, d, f),
      DenseGemm("bwd", "dx", 1, rows, pf, d),
      DenseGemm("bwd", "dW_up", e, d, per_expert, pf),
      DenseGemm("bwd", "dW_down", e, f, per_expert, d),
  ]


def dense_program(gemm: DenseGemm, dtype=jnp.bfloat16, seed: int = 0):
  """`(fn, args)`: the jitted product of `gemm` on random `dtype` operands.

  Forward-shaped GEMMs are `[m, k] @ [k, n]`; the weight gradients contract
  the rows of two row-major operands, `[e, k, m]^T [e, k, n]`, as a weight
  gradient reads them.
  """
  ka, kb = jax.random.split(jax.random.key(seed))
  if gemm.name.startswith("dW"):
    a = jax.random.normal(ka, (gemm.batch, gemm.k, gemm.m), dtype)
    b = jax.random.normal(kb, (gemm.batch, gemm.k, gemm.n), dtype)
    fn = jax.jit(lambda a, b: jnp.einsum("ekm,ekn->emn", a, b,
                                         preferred_element_type=dtype))
  else:
    a = jax.random.normal(ka, (gemm.m, gemm.k), dtype)
    b = jax.random.normal(kb, (gemm.k, gemm.n), dtype)
    fn = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=dtype))
  return fn, (a, b)


def phase_sums(ms_by_name: dict[str, float], gemms: list[DenseGemm]
               ) -> dict[str, float]:
  """`{"fwd": ms, "fwd+bwd": ms}`: the summed ms of the forward GEMMs, and of
  all six (`ms_by_name` keyed by `DenseGemm.name`)."""
  fwd = sum(ms_by_name[g.name] for g in gemms if g.phase == "fwd")
  return {"fwd": fwd, "fwd+bwd": sum(ms_by_name[g.name] for g in gemms)}
