"""Activation backward of the expert FFN (only `@triton.jit` code, no jax).

Given `g = dy[token] @ down[e]^T` per slot (`[rows, F]`), the saved
pre-activation `pre [rows, F]` (`[rows, 2F]` gated: gate columns first) and
the router weight `w [rows]` of each slot, the backward of
`y += w * act(pre) @ down` needs

  dwp[r, j] = sum over the BLOCK_N columns of block j of  h * g
              (h = act(pre), rounded to pre's dtype as the forward stored it;
              summed over j later in a fixed order: the router-weight grad)
  d_pre     = (w * g) * act'(pre)
              (gated: d_gate = w g up act'(gate), d_up = w g act(gate))

`act_bwd_epilogue` computes both for one `[BLOCK_M, BLOCK_N]` tile of `g`:
the fused act-backward GEMM (`grouped_gemm._grouped_gemm_act_bwd_kernel`)
runs it on its accumulator, and `_act_bwd_elementwise_kernel` on a `g`
stored by a plain grouped GEMM (the default, two-pass path; see
`jmoe.ops.act_bwd`).
"""

import triton
import triton.language as tl

from jmoe.kernels.activations import act_fwd_and_grad
from jmoe.kernels.rounding import round_to


@triton.jit
def act_bwd_epilogue(
    g,
    block_n_index,
    expert,
    row_start,
    row_end,
    row_scale_ptr,
    pre_ptr,
    dpre_ptr,
    dwp_ptr,
    F: tl.constexpr,
    DWP_COLS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EMULATE_RNE: tl.constexpr,  # interpreter: round bf16 to nearest even
):
  """The act_bwd epilogue of one `[BLOCK_M, BLOCK_N]` tile `g` (float32) of
  column block `block_n_index`: `dwp[r, block_n_index]` and `d_pre`."""
  offs_m = row_start + tl.arange(0, BLOCK_M)
  offs_n = block_n_index * BLOCK_N + tl.arange(0, BLOCK_N)
  mask_m = offs_m < row_end
  mask = mask_m[:, None] & (offs_n < F)[None, :]
  load_mask = mask & (expert >= 0)
  rows64 = offs_m.to(tl.int64)[:, None]
  if GATED:
    pre_ptrs = pre_ptr + rows64 * (2 * F) + offs_n[None, :]
    dpre_ptrs = dpre_ptr + rows64 * (2 * F) + offs_n[None, :]
  else:
    pre_ptrs = pre_ptr + rows64 * F + offs_n[None, :]
    dpre_ptrs = dpre_ptr + rows64 * F + offs_n[None, :]
  pre_g = tl.load(pre_ptrs, mask=load_mask, other=0.0).to(tl.float32)
  act, dact = act_fwd_and_grad(pre_g, ACTIVATION)
  if GATED:
    pre_u = tl.load(pre_ptrs + F, mask=load_mask, other=0.0).to(tl.float32)
    h = act * pre_u
  else:
    h = act
  h = round_to(h, pre_ptr.dtype.element_ty, EMULATE_RNE).to(tl.float32)
  g = tl.where(load_mask, g, 0.0)
  dwp = tl.sum(h * g, axis=1)
  # A column block past F (the second half of a SPLIT program) has no column.
  dwp_mask = mask_m & (block_n_index * BLOCK_N < F)
  tl.store(dwp_ptr + offs_m.to(tl.int64) * DWP_COLS + block_n_index, dwp,
           mask=dwp_mask)
  w = tl.load(row_scale_ptr + offs_m, mask=mask_m & (expert >= 0), other=0.0)
  dh = g * w[:, None]
  out_dtype = dpre_ptr.dtype.element_ty
  if GATED:
    tl.store(dpre_ptrs, round_to(dh * pre_u * dact, out_dtype, EMULATE_RNE), mask=mask)
    tl.store(dpre_ptrs + F, round_to(dh * act, out_dtype, EMULATE_RNE), mask=mask)
  else:
    tl.store(dpre_ptrs, round_to(dh * dact, out_dtype, EMULATE_RNE), mask=mask)


@triton.jit
def _act_bwd_elementwise_kernel(
    # Inputs.
    g_ptr,  # [ROWS, F] g = dy[token] @ down[e]^T per slot (pre dtype or float32)
    pre_ptr,  # [ROWS, F or 2F] pre-activation saved by the forward
    row_scale_ptr,  # [ROWS] float32 router weight of each slot
    # Outputs.
    dpre_ptr,  # [ROWS, F or 2F] pre dtype
    dwp_ptr,  # [ROWS, DWP_COLS] float32 partial <h, g> per BLOCK_N columns
    # Sizes.
    ROWS: tl.constexpr,
    F: tl.constexpr,
    DWP_COLS: tl.constexpr,  # cdiv(F, BLOCK_N)
    # Switches and tiles.
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EMULATE_RNE: tl.constexpr,  # interpreter: round bf16 stores to nearest even
):
  """`act_bwd_epilogue` over a stored `g`. Grid `(cdiv(ROWS, BLOCK_M), DWP_COLS)`.

  Every row and column of `d_pre` and `dwp` is written (rows of zero tiles
  have `g = 0` and `pre = 0`, so they get zeros).
  """
  pid_m = tl.program_id(0)
  pid_n = tl.program_id(1)
  row_start = pid_m * BLOCK_M
  offs_m = row_start + tl.arange(0, BLOCK_M)
  offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
  mask = (offs_m < ROWS)[:, None] & (offs_n < F)[None, :]
  g_ptrs = g_ptr + offs_m.to(tl.int64)[:, None] * F + offs_n[None, :]
  g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
  expert = pid_m * 0  # every row counts (a tensor, as the GEMM's expert id)
  act_bwd_epilogue(
      g, pid_n, expert, row_start, ROWS, row_scale_ptr, pre_ptr, dpre_ptr, dwp_ptr,
      F, DWP_COLS, ACTIVATION, GATED, BLOCK_M, BLOCK_N, EMULATE_RNE,
  )
