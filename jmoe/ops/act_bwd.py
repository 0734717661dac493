"""Backward stage 1 of the expert FFN: the activation backward, in Triton.

`act_bwd_stage(dy [t, d], down [e, f, d], al, w_sorted [tk], pre [tk, pf])
-> (d_pre [tk, pf], dwp [tk, c])` with, per slot r of expert e and token t(r),

  g      = dy[t(r)] @ down[e]^T                  [f]
  dwp    partial sums of <act(pre), g> over column blocks (`c` of them; the
         combine kernel adds them up into the router-weight gradient)
  d_pre  = act'(pre) * (w_r g)                   (gated: both halves)

Two implementations (`JMOE_ACT_BWD`):

- `"two_pass"` (default): a plain grouped GEMM stores `g` in the operand
  dtype (`_grouped_gemm_kernel` with the token gather, or on a sorted copy of
  `dy` per `JMOE_GATHER_ROWS`; its best 128x256 tiles),
  then `_act_bwd_elementwise_kernel` streams `g` and `pre` once. Measured on
  the H100 (benchmarks/results/sweep_h100.md): 3.80 vs 5.06 ms (Mixtral-like),
  0.83 vs 1.04 ms (64 experts) against the fused kernel's best config. Costs a
  transient `[tk, f]` buffer and one rounding of `g` to the operand dtype.
- `"fused"`: `_grouped_gemm_act_bwd_kernel`, the same epilogue on the float32
  accumulator. Its 128-column epilogue spills, so it runs two 64-wide
  accumulators per program (`JMOE_ACT_BWD_SPLIT=1`, the default) or one
  (`JMOE_ACT_BWD_SPLIT=0`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jmoe._env import env_choice
from jmoe.ops import grouped_matmul as gmm_lib
from jmoe.reference.activations import is_gated

# The epilogue activation applied to the gate half of a gated activation.
GATE_ACTIVATION = {"swiglu": "silu", "geglu": "gelu"}
ACT_BWD_ENV = "JMOE_ACT_BWD"
ACT_BWD_IMPLS = ("two_pass", "fused")


def act_bwd_impl() -> str:
  """`JMOE_ACT_BWD`: "two_pass" (default) or "fused"."""
  return env_choice(ACT_BWD_ENV, ACT_BWD_IMPLS, "two_pass")


def _elementwise_blocks(backend: str) -> dict[str, int]:
  if backend == "interpret":
    return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4}
  return {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 4}


def act_bwd_stage(dy, down, al, w_sorted, pre, block_m, activation, backend,
                  impl=None, dy_rows=None):
  """Backward stage 1: `(d_pre [tk, pf], dwp [tk, c] float32)` from `dy [t, d]`.

  Args:
    dy: `[t, d]` output gradient (pre's dtype).
    down: `[e, f, d]` down-projection weights.
    al: the forward's `Alignment` (tile schedule, slot -> token).
    w_sorted: `[tk]` float32 router weight of each slot.
    pre: `[tk, f]` (`[tk, 2f]` gated) pre-activation saved by the forward.
    block_m: rows per tile of `al`'s schedule.
    activation: the FFN activation.
    backend: `"triton"` or `"interpret"`.
    impl: `"two_pass"` or `"fused"`; default `act_bwd_impl()`.
    dy_rows: optional `[tk, d]` rows of `dy` sorted by slot (`dy[al.token]`),
      which the two-pass GEMM then reads instead of gathering (the fused one
      gathers from `dy` always).
  """
  impl = impl or act_bwd_impl()
  if impl == "fused":
    return _act_bwd_fused(dy, down, al, w_sorted, pre, block_m, activation, backend)
  return _act_bwd_two_pass(dy, down, al, w_sorted, pre, block_m, activation, backend,
                           dy_rows)


def _act_bwd_two_pass(dy, down, al, w_sorted, pre, block_m, activation, backend,
                      dy_rows=None):
  """`act_bwd_stage` as a grouped GEMM storing `g`, then an elementwise kernel."""
  import triton  # pylint: disable=import-outside-toplevel

  from jmoe.kernels.act_bwd import _act_bwd_elementwise_kernel  # pylint: disable=import-outside-toplevel
  from jmoe.ops._call import kernel_call  # pylint: disable=import-outside-toplevel

  tk, pf = pre.shape
  e, f, d = down.shape
  del e
  g = gmm_lib.grouped_gemm(
      dy if dy_rows is None else dy_rows, down, al.tiles, n=f, k=d, rows=tk,
      strides_b=(f * d, 1, d), block_m=block_m, out_dtype=pre.dtype, backend=backend,
      row_index=al.token if dy_rows is None else None,
      name="jmoe_expert_act_bwd_g",
  )
  blocks = _elementwise_blocks(backend)
  dwp_cols = triton.cdiv(f, blocks["BLOCK_N"])
  return kernel_call(
      _act_bwd_elementwise_kernel,
      g,
      pre,
      w_sorted,
      out_shape=(
          jax.ShapeDtypeStruct((tk, pf), pre.dtype),
          jax.ShapeDtypeStruct((tk, dwp_cols), jnp.float32),
      ),
      grid=(triton.cdiv(tk, blocks["BLOCK_M"]), dwp_cols),
      backend=backend,
      name="jmoe_expert_act_bwd_elementwise",
      ROWS=tk,
      F=f,
      DWP_COLS=dwp_cols,
      ACTIVATION=GATE_ACTIVATION.get(activation, activation),
      GATED=is_gated(activation),
      EMULATE_RNE=backend == "interpret",
      **blocks,
  )


def _act_bwd_fused(dy, down, al, w_sorted, pre, block_m, activation, backend):
  """`act_bwd_stage` as one GEMM with the activation backward in its epilogue."""
  tk, pf = pre.shape
  e, f, d = down.shape
  gated = is_gated(activation)
  num_tiles = al.tiles.shape[1]
  autotune = gmm_lib.autotuned_launch("act_bwd", backend)
  if autotune:
    from jmoe.kernels.grouped_gemm import ACT_BWD_MIN_BLOCK_N  # pylint: disable=import-outside-toplevel

    min_block_n = ACT_BWD_MIN_BLOCK_N
  else:
    min_block_n = gmm_lib.default_config(
        "act_bwd", block_m, f, d, backend, gated
    ).block_n
  dwp_cols = -(-f // min_block_n)
  return gmm_lib.gemm_call(
      "act_bwd",
      dy,
      down,
      al.tiles,
      al.token,
      w_sorted,
      pre,
      out_shape=(
          jax.ShapeDtypeStruct((tk, pf), pre.dtype),
          jax.ShapeDtypeStruct((tk, dwp_cols), jnp.float32),
      ),
      n=f,
      k=d,
      num_tiles=num_tiles,
      block_m=block_m,
      backend=backend,
      name="jmoe_expert_act_bwd",
      gated=gated,
      # Larger autotuned BLOCK_N fill fewer partial-sum columns: the rest stay 0.
      zeroed_outputs=(1,) if autotune else (),
      F=f,
      K=d,
      NUM_TILES=num_tiles,
      STRIDE_DYM=d,
      STRIDE_WG=f * d,
      STRIDE_WK=1,
      STRIDE_WN=d,
      DWP_COLS=dwp_cols,
      ACTIVATION=GATE_ACTIVATION.get(activation, activation),
      GATED=gated,
      **gmm_lib.dot_flags(pre.dtype, backend),
      **gmm_lib.tma_flags("act_bwd", backend, pre.dtype, (f * d, 1, d), e, None, d),
  )
