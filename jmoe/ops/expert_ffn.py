"""The fused expert FFN of an MoE (dispatch, up + activation, down, combine) in Triton.

`expert_ffn(x [t, d], expert_ids [t, k], weights [t, k], kept [t, k],
up_kernel, down_kernel, *, activation, backend) -> y [t, d]` computes
`y_i = sum_{j kept} weights[i, j] * down_e(act(x_i @ up_e))`, `e = expert_ids[i, j]`
(DESIGN.md "Experts"). Pipeline, with `tk = t * top_k` slots:

  align    `jmoe.kernels.align` (two launches: block histograms, ranks; or XLA ops,
           `JMOE_ALIGN=xla`): copies sorted by expert, slot of each copy,
           per-slot token and router weight, BLOCK_M tile schedule.
  up       `_grouped_gemm_act_kernel`: reads token rows of x through the slot ->
           token index inside the GEMM (or, `JMOE_GATHER_ROWS=copy`, a copy of
           x sorted by slot, by TMA: `grouped_matmul.sorted_rows`); gate and
           up tiles in one program;
           activation in float32 in the epilogue -> h [tk, f] (x dtype). For
           the backward it also stores the pre-activation [tk, f or 2f].
  down     `_grouped_gemm_kernel`: h @ down[e], times the copy's router weight
           in the epilogue -> o [tk, d] (one row per slot, `slot_rows_dtype`:
           x's dtype by default, float32 with `JMOE_SLOT_ROWS=float32`).
  combine  `_combine_kernel`: y[t] = sum_j o[slot(t, j)] in float32, in j order
           (no atomics: bit-identical repeats), cast to x dtype.

Backward (`custom_vjp`, every GEMM in Triton):

  act_bwd  `jmoe.ops.act_bwd`: g = dy[token] @ down[e]^T (gather in the GEMM,
           `_grouped_gemm_kernel`, g stored in x dtype), then
           `_act_bwd_elementwise_kernel`: partial <h, g> per column block
           (router weight gradient), dh = w * g, activation backward -> d_pre.
           (`JMOE_ACT_BWD=fused`: one GEMM with that epilogue.)
  dW_down  tgmm(h, dy, b_row_index=token, row_scale=w)   `jmoe.ops.tgmm`
  dW_up    tgmm(x, d_pre, a_row_index=token)
           (default with the TMA tgmm, `share_sorted_rows`: `x` and `dy` as
           row-major copies sorted by slot, which the up and dh GEMMs read
           by TMA first, and dW_down = (dy^T h)^T; otherwise above
           `JMOE_WGRAD_MIN_ROWS` rows per expert: `x`, and `dy` for dW_down,
           as K-major columns of a transposed copy,
           `dw_up_gather_mode` / `dw_down_layout`)
  dx       `_grouped_gemm_kernel`: d_pre @ up[e]^T per slot (`slot_rows_dtype`), then the
           combine kernel sums the k slots of each token and the partial
           <h, g> sums into d_weights.

The pre-activation is stored by the forward (x dtype, `tk * f` or `tk * 2f`
elements) rather than recomputed in the backward: recomputing costs another
up GEMM (a third of the forward's flops) to save that memory.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jmoe import _shard
from jmoe._checks import check_expert_kernels
from jmoe._env import env_choice, env_flag
from jmoe.ops import align as align_lib
from jmoe.ops import grouped_matmul as gmm_lib
from jmoe.ops.act_bwd import GATE_ACTIVATION as _GATE_ACTIVATION
from jmoe.ops.act_bwd import act_bwd_impl, act_bwd_stage
from jmoe.reference.activations import ACTIVATIONS
from jmoe.reference.activations import is_gated as _is_gated

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
SLOT_ROWS_ENV = "JMOE_SLOT_ROWS"
# Where the router weight of a copy multiplies in: "up" (default): the up
# GEMM's epilogue stores `h = w * act(...)` (one rounding of the scaled
# float32 value), so the down GEMM runs unscaled and dW_down = tgmm(h, dy)
# needs no scaled copy of h; "down": the down GEMM's epilogue scales its
# float32 accumulator and dW_down gets XLA's `bf16(w * h)` rows (a second
# rounding, `jmoe.ops.tgmm.prescale_rows`). Measured: benchmarks/results/sweep_h100.md.
ROUTER_SCALE_ENV = "JMOE_ROUTER_SCALE"
ROUTER_SCALE_STAGES = ("up", "down")


def router_scale_stage() -> str:
  """`"up"` or `"down"`: where the router weights scale (`JMOE_ROUTER_SCALE`)."""
  return env_choice(ROUTER_SCALE_ENV, ROUTER_SCALE_STAGES, "up")


def router_scale_args(w_sorted, scale_stage: str | None = None):
  """`(up_stage row_scale, down_stage / weight_grad_stage w_sorted)` for
  `scale_stage` (default `router_scale_stage()`): `w_sorted` goes to one side,
  None to the other."""
  if (scale_stage or router_scale_stage()) == "up":
    return w_sorted, None
  return None, w_sorted


def slot_rows_dtype(dtype: Any) -> Any:
  """dtype of the per-slot rows that the combine kernel sums (down and dx GEMMs).

  Default (`JMOE_SLOT_ROWS` unset or "input"): rows in the activations' dtype,
  each copy's float32 accumulator rounded once to nearest even (also in the
  interpreter, `jmoe.kernels.rounding`), then the k copies of a token summed in
  float32 and rounded again: what vLLM's fused_moe, ScatterMoE and MegaBlocks
  store too. Against float32 rows it halves the store and combine traffic of
  bf16 rows: -0.10 ms forward and -0.22 ms forward+backward at the
  deepseek-like shape on the H100 (benchmarks/results/sweep_h100.md).
  `JMOE_SLOT_ROWS=float32`: float32 rows, each token's output the float32 sum
  of its copies' accumulators, rounded once (the reference's order of
  rounding).
  """
  mode = env_choice(SLOT_ROWS_ENV, ("input", "float32"), "input")
  return jnp.float32 if mode == "float32" else dtype


def _combine_blocks(backend: str) -> dict[str, int]:
  if backend == "interpret":
    return {"BLOCK_T": 16, "BLOCK_D": 64, "num_warps": 4}
  return {"BLOCK_T": 16, "BLOCK_D": 256, "num_warps": 4}


def combine(
    src: jax.Array,
    pos: jax.Array,
    out_dtype: Any,
    backend: str,
    dwp: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """`out[t] = sum_j src[pos[t, j]]` (float32, j order), and optionally d_weights.

  Args:
    src: `[rows, d]` per-slot rows.
    pos: `[t, top_k]` int32 slot of each copy, -1 where dropped.
    out_dtype: dtype of `out`.
    backend: `"triton"` or `"interpret"`.
    dwp: optional `[rows, c]` float32 partial sums: also returns
      `dw [t, top_k] = sum_c dwp[pos[t, j], c]` (0 where dropped).

  Returns:
    `out [t, d]`, or `(out, dw)` when `dwp` is given.
  """
  import triton  # pylint: disable=import-outside-toplevel

  from jmoe.kernels.combine import _combine_kernel  # pylint: disable=import-outside-toplevel
  from jmoe.ops._call import kernel_call  # pylint: disable=import-outside-toplevel

  t, top_k = pos.shape
  d = src.shape[1]
  blocks = _combine_blocks(backend)
  with_dw = dwp is not None
  cols = dwp.shape[1] if with_dw else 1
  out, dw = kernel_call(
      _combine_kernel,
      src,
      pos,
      dwp if with_dw else jnp.zeros((1,), jnp.float32),
      out_shape=(
          jax.ShapeDtypeStruct((t, d), out_dtype),
          jax.ShapeDtypeStruct((t, top_k) if with_dw else (1,), jnp.float32),
      ),
      grid=(triton.cdiv(t, blocks["BLOCK_T"]), triton.cdiv(d, blocks["BLOCK_D"])),
      backend=backend,
      name="jmoe_combine",
      T=t,
      D=d,
      TOP_K=top_k,
      STRIDE_SRC=d,
      DWP_COLS=cols,
      WITH_DW=with_dw,
      BLOCK_DW=triton.next_power_of_2(cols),
      **blocks,
  )
  return (out, dw) if with_dw else out


def _dims(x, up, activation):
  t, d = x.shape
  e, _, pf = up.shape
  gated = _is_gated(activation)
  f = pf // 2 if gated else pf
  return t, d, e, pf, f, gated


def plan(expert_ids, kept, weights, num_experts, backend, impl=None):
  """Stage 1, align: `(Alignment, w_sorted [tk] float32, block_m)`.

  `impl` is "triton" (two launches, `jmoe.ops.align.align_triton`) or "xla" (argsort and a few
  XLA ops, `jmoe.ops.align.align`); default `jmoe.ops.align.align_impl()`.
  Both give bit-identical results.
  """
  tk = expert_ids.size
  block_m = gmm_lib.block_m_for(tk, num_experts, backend)
  impl = impl or align_lib.align_impl()
  if impl == "triton":
    al, w_sorted = align_lib.align_triton(
        expert_ids, kept, weights, num_experts, block_m, backend
    )
  else:
    al = align_lib.align(expert_ids, kept, num_experts, block_m)
    w_sorted = weights.reshape(-1)[al.order]
  return al, w_sorted, block_m


def up_stage(x, up, al, block_m, activation, backend, save, row_scale=None,
             x_rows=None):
  """Stage 2: `h [tk, f]` (and the pre-activation `[tk, pf]` if `save`).

  With `row_scale [tk]` float32, `h = row_scale * act(...)` (scaled in float32
  in the epilogue, then rounded once); `pre` stays unscaled. `x_rows [tk, d]`:
  `x`'s rows already sorted by slot (`share_sorted_rows`), read instead of
  `x` (else `grouped_matmul.sorted_rows` decides).
  """
  t, d, e, pf, f, gated = _dims(x, up, activation)
  del t, e
  tk = al.token.shape[0]
  num_tiles = al.tiles.shape[1]
  if x_rows is None:
    rows, token = gmm_lib.sorted_rows(x, al.token, up.shape[0], backend)
  else:
    rows, token = x_rows, None
  tma = gmm_lib.tma_flags("act", backend, x.dtype, (d * pf, pf, 1), up.shape[0],
                          None if token is not None else tk, d)
  return gmm_lib.gemm_call(
      "act",
      rows,
      up,
      al.tiles,
      jnp.zeros((1,), jnp.int32) if token is None else token,
      jnp.zeros((1,), jnp.float32) if row_scale is None else row_scale,
      out_shape=(
          jax.ShapeDtypeStruct((tk, f), x.dtype),
          jax.ShapeDtypeStruct((tk, pf) if save else (1,), x.dtype),
      ),
      n=f,
      k=d,
      num_tiles=num_tiles,
      block_m=block_m,
      backend=backend,
      name="jmoe_expert_up",
      gated=gated,
      F=f,
      K=d,
      NUM_TILES=num_tiles,
      STRIDE_XM=d,
      STRIDE_WG=d * pf,
      STRIDE_WK=pf,
      STRIDE_WN=1,
      ACTIVATION=_GATE_ACTIVATION.get(activation, activation),
      GATED=gated,
      STORE_PRE=save,
      SCALE_H=row_scale is not None,
      GATHER_A=token is not None,
      WIDE=gmm_lib.act_wide(gated, f, tma["B_TMA"]),
      **gmm_lib.dot_flags(x.dtype, backend),
      **tma,
  )


def down_stage(h, down, al, w_sorted, block_m, backend):
  """Stage 3: `o [tk, d]` (`slot_rows_dtype`) = `w_slot * h @ down[e]`
  (`h @ down[e]` when `w_sorted` is None: `h` already scaled by `up_stage`)."""
  tk, f = h.shape
  d = down.shape[2]
  return gmm_lib.grouped_gemm(
      h, down, al.tiles, n=d, k=f, rows=tk, strides_b=(f * d, d, 1),
      block_m=block_m, out_dtype=slot_rows_dtype(h.dtype), backend=backend,
      row_scale=w_sorted, name="jmoe_expert_down",
  )


def _forward(x, expert_ids, weights, kept, up, down, activation, backend, save,
             scale_stage):
  al, w_sorted, block_m = plan(expert_ids, kept, weights, up.shape[0], backend)
  w_up, w_down = router_scale_args(w_sorted, scale_stage)
  _, d, _, pf, f, _ = _dims(x, up, activation)
  x_rows = None
  if save and share_sorted_rows(backend, x.dtype, d, f, pf):
    x_rows = gmm_lib.gather_rows(x, al.token, backend)
  h, pre = up_stage(x, up, al, block_m, activation, backend, save, row_scale=w_up,
                    x_rows=x_rows)
  o = down_stage(h, down, al, w_down, block_m, backend)
  y = combine(o, al.pos, x.dtype, backend)
  residuals = (x, up, down, al, w_sorted, h, pre, x_rows) if save else None
  return y, residuals


def weight_grad_stage(x, dy, h, d_pre, al, w_sorted, up_dtype, down_dtype, backend,
                      x_rows=None, dy_rows=None):
  """Backward stage 2: `(d_up [e, d, pf], d_down [e, f, d])` with tgmm.

  `w_sorted` None: `h` holds the scaled rows already (router scale "up").
  `x_rows`, `dy_rows` `[tk, d]`: the rows of `x` and `dy` sorted by slot, read
  row-major by the TMA tgmm (`share_sorted_rows`), else None."""
  from jmoe.ops.tgmm import tgmm  # pylint: disable=import-outside-toplevel

  rows, groups = h.shape[0], al.group_sizes.shape[0]
  if x_rows is not None:
    config = gmm_lib.tgmm_config(backend, rows, groups, tma=True)
    d_down = tgmm(
        dy_rows, h, al.group_sizes, row_scale=w_sorted, out_dtype=down_dtype,
        backend=backend, config=config, gather_mode="xla_rows", transpose_out=True,
    )
    d_up = tgmm(
        x_rows, d_pre, al.group_sizes, out_dtype=up_dtype, backend=backend,
        config=config, gather_mode="xla_rows",
    )
    return d_up, d_down
  tma = weight_grad_tma(backend, x.dtype, x.shape[1], h.shape[1], d_pre.shape[1])
  config = gmm_lib.tgmm_config(backend, rows, groups, tma=tma)
  if dw_down_layout(rows, groups, tma) == "columns":
    # dW_down[e]^T = dy_e^T h_e: the gathered dy rows become K-major columns
    # and the kernel stores each tile transposed, into [e, f, d].
    d_down = tgmm(
        dy, h, al.group_sizes, a_row_index=al.token, row_scale=w_sorted,
        out_dtype=down_dtype, backend=backend, config=config,
        gather_mode="xla_columns", transpose_out=True,
    )
  else:
    d_down = tgmm(
        h, dy, al.group_sizes, b_row_index=al.token, row_scale=w_sorted,
        out_dtype=down_dtype, backend=backend, config=config, gather_mode="xla",
    )
  d_up = tgmm(
      x, d_pre, al.group_sizes, a_row_index=al.token, out_dtype=up_dtype,
      backend=backend, config=config,
      gather_mode=dw_up_gather_mode(rows, groups, tma),
  )
  return d_up, d_down


DW_DOWN_ENV = "JMOE_DW_DOWN"
DW_DOWN_LAYOUTS = ("rows", "columns")

# `JMOE_SHARE_SORTED_ROWS` (default 1; 0 restores the column copies): with the persistent TMA
# tgmm for both weight gradients, the forward copies `x`'s rows sorted by slot
# at every size (`jmoe.kernels.gather_rows`), its up GEMM reads them by TMA and
# keeps them for the backward; the backward copies `dy`'s rows so too for the
# dh GEMM (by TMA). dW_up and dW_down then read those two copies row-major
# (tgmm `gather_mode="xla_rows"`) instead of two transposed, group-padded
# column copies (`jmoe.kernels.gather_columns`) and their XLA index building,
# for one `[tk, d]` residual more. Measured on the H100 (session 17,
# `benchmarks/results/h100-sweeps/session17/`; interleaved A/B, 8 rounds,
# `benchmarks.ab_env`): fwd+bwd 5.807 -> 5.545 ms at 64 experts (traced kernel
# time 5.246 -> 5.055: dh -0.08 by TMA, up -0.05, copies and glue -0.04, the
# row-major tgmm equal), 0.963 -> 0.920 ms on the small case; forward unchanged.
SHARE_SORTED_ROWS_ENV = "JMOE_SHARE_SORTED_ROWS"


def share_sorted_rows(backend: str, dtype: Any, d: int, f: int, pf: int) -> bool:
  """Whether the weight gradients read the GEMMs' sorted row copies (see
  `SHARE_SORTED_ROWS_ENV`): on (the default), the two-pass activation backward, and the
  TMA tgmm for both `"xla_rows"` calls (16-bit operands, `d`, `f`, `pf`
  multiples of 16, a backend that can launch it; not with
  `JMOE_TGMM_KERNEL=gluon`, whose kernel reads columns only)."""
  from jmoe.ops import tgmm as tgmm_lib  # pylint: disable=import-outside-toplevel

  if backend == "reference" or not env_flag(SHARE_SORTED_ROWS_ENV, True):
    return False
  if act_bwd_impl() != "two_pass":
    return False
  if env_choice(tgmm_lib.TGMM_KERNEL_ENV, tgmm_lib.TGMM_KERNELS, "auto") == "gluon":
    return False
  return all(tgmm_lib.tgmm_kernel(backend, dtype, d, n, False, "xla_rows") == "tma"
             for n in (f, pf))


def weight_grad_tma(backend: str, dtype: Any, d: int, f: int, pf: int) -> bool:
  """Whether the weight gradients take the persistent TMA tgmm
  (`jmoe.ops.tgmm.tgmm_kernel` "auto" or "tma" for both columns-layout calls):
  then both use the columns layout at every size (H100, session 6: 1.10-1.24x
  over the best plain layout at 64 experts, Mixtral-like and small)."""
  from jmoe.ops import tgmm as tgmm_lib  # pylint: disable=import-outside-toplevel

  return all(
      tgmm_lib.tgmm_kernel(backend, dtype, d, n, False, "xla_columns") in ("tma", "gluon")
      for n in (f, pf)
  )


def dw_up_gather_mode(rows: int, groups: int, tma: bool = False) -> str:
  """How dW_up's `tgmm` reads the token rows of `x` (`jmoe.ops.tgmm.GATHER_MODES`):
  `JMOE_TGMM_GATHER` if set; else `"xla_columns"` with the TMA tgmm or above
  1024 rows per group (the K-major `x` tile made the plain Mixtral-like dW_up
  13 % faster on the H100), `"xla"` otherwise (64 experts, plain kernel: no
  gain, and the transposed copy costs more than the row gather;
  benchmarks/results/sweep_h100.md)."""
  from jmoe.ops.tgmm import GATHER_MODE_ENV, GATHER_MODES  # pylint: disable=import-outside-toplevel

  columns = tma or gmm_lib.long_weight_grad_groups(rows, groups)
  return env_choice(GATHER_MODE_ENV, GATHER_MODES, "xla_columns" if columns else "xla")


def dw_down_layout(rows: int, groups: int, tma: bool = False) -> str:
  """How dW_down is formed (`JMOE_DW_DOWN` if set): `"rows"`, `tgmm(h, dy)`
  with `dy` gathered in the kernel, or `"columns"`, `tgmm(dy, h)` with `dy`
  as K-major columns and a transposed store (the default with the TMA tgmm or
  above 1024 rows per group, like `dw_up_gather_mode`). Same numbers up to
  the order of float32 additions inside one wgmma and where the router weight
  rounds (on `dy` instead of `h` when `h` is unscaled)."""
  columns = tma or gmm_lib.long_weight_grad_groups(rows, groups)
  return env_choice(DW_DOWN_ENV, DW_DOWN_LAYOUTS, "columns" if columns else "rows")


def dx_stage(d_pre, up, al, block_m, backend):
  """Backward stage 3: per-slot `d_pre @ up[e]^T` `[tk, d]` (`slot_rows_dtype`)."""
  tk, pf = d_pre.shape
  d = up.shape[1]
  return gmm_lib.grouped_gemm(
      d_pre, up, al.tiles, n=d, k=pf, rows=tk, strides_b=(d * pf, 1, pf),
      block_m=block_m, out_dtype=slot_rows_dtype(d_pre.dtype), backend=backend,
      name="jmoe_expert_dx",
  )


def _backward(activation, backend, scale_stage, residuals, dy):
  x, up, down, al, w_sorted, h, pre, x_rows = residuals
  block_m = gmm_lib.block_m_for(h.shape[0], up.shape[0], backend)
  dy = dy.astype(x.dtype)
  dy_rows = None if x_rows is None else gmm_lib.gather_rows(dy, al.token, backend)
  d_pre, dwp = act_bwd_stage(dy, down, al, w_sorted, pre, block_m, activation, backend,
                             dy_rows=dy_rows)
  _, w_down = router_scale_args(w_sorted, scale_stage)
  d_up, d_down = weight_grad_stage(
      x, dy, h, d_pre, al, w_down, up.dtype, down.dtype, backend,
      x_rows=x_rows, dy_rows=dy_rows,
  )
  dxc = dx_stage(d_pre, up, al, block_m, backend)
  dx, d_weights = combine(dxc, al.pos, x.dtype, backend, dwp=dwp)
  return dx, None, d_weights, None, d_up, d_down


@functools.cache
def _expert_ffn_fn(activation: str, backend: str, scale_stage: str):
  @jax.custom_vjp
  def op(x, expert_ids, weights, kept, up, down):
    y, _ = _forward(x, expert_ids, weights, kept, up, down, activation, backend,
                    save=False, scale_stage=scale_stage)
    return y

  def fwd(x, expert_ids, weights, kept, up, down):
    return _forward(x, expert_ids, weights, kept, up, down, activation, backend,
                    save=True, scale_stage=scale_stage)

  def bwd(residuals, dy):
    return _backward(activation, backend, scale_stage, residuals, dy)

  op.defvjp(fwd, bwd)
  return _shard.varying_inputs(op)


def _check(x, expert_ids, weights, kept, up_kernel, down_kernel, activation):
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
  if not hasattr(x, "ndim") or x.ndim != 2:
    raise ValueError(f"x must have shape [t, d], got {getattr(x, 'shape', x)}")
  t, d = x.shape
  if not any(x.dtype == dt for dt in _DTYPES):
    raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
  if expert_ids.ndim != 2 or expert_ids.shape[0] != t:
    raise ValueError(
        f"expert_ids must have shape [t={t}, top_k], got {expert_ids.shape}"
    )
  if not jnp.issubdtype(expert_ids.dtype, jnp.integer):
    raise TypeError(f"expert_ids must be int32, got {expert_ids.dtype}")
  for name, a in (("weights", weights), ("kept", kept)):
    if a.shape != expert_ids.shape:
      raise ValueError(
          f"{name} must have shape [t, top_k]={expert_ids.shape}, got {a.shape}"
      )
  if getattr(up_kernel, "ndim", 0) != 3:
    raise ValueError(
        f"up_kernel must have shape [e, d={d}, {'2f' if _is_gated(activation) else 'f'}], "
        f"got {getattr(up_kernel, 'shape', up_kernel)}"
    )
  check_expert_kernels(up_kernel, down_kernel, d, up_kernel.shape[0], activation)
  for name, a in (("up_kernel", up_kernel), ("down_kernel", down_kernel)):
    if not any(a.dtype == dt for dt in _DTYPES):
      raise TypeError(f"{name} must be float32, bfloat16 or float16, got {a.dtype}")


def expert_ffn(
    x: jax.Array,
    expert_ids: jax.Array,
    weights: jax.Array,
    kept: jax.Array,
    up_kernel: jax.Array,
    down_kernel: jax.Array,
    *,
    activation: str,
    backend: str,
) -> jax.Array:
  """The experts of an MoE for a given routing, fused into Triton kernels.

  Example usage::

    y = expert_ffn(x, routing.expert_ids, routing.weights, routing.kept,
                   up_kernel, down_kernel, activation="swiglu",
                   backend="triton")   # [t, d]

  Args:
    x: `[t, d]` float32, bfloat16 or float16.
    expert_ids: `[t, top_k]` int32 expert of each copy (ids outside `[0, e)`
      count as dropped).
    weights: `[t, top_k]` combine weights (used in float32).
    kept: `[t, top_k]` bool; dropped copies are not computed and add 0.
    up_kernel: `[e, d, f]`, or `[e, d, 2f]` for `swiglu`/`geglu` (gate columns
      first); cast to x's dtype.
    down_kernel: `[e, f, d]`; cast to x's dtype.
    activation: `"gelu"` (tanh), `"relu"`, `"silu"`, `"swiglu"`, `"geglu"`.
    backend: `"triton"` or `"interpret"`.

  Returns:
    `y [t, d]` in x's dtype. Differentiable (custom_vjp) w.r.t. x, weights,
    up_kernel and down_kernel.

  Raises:
    ValueError, TypeError: wrong shapes, dtypes or activation (trace time).
  """
  _check(x, expert_ids, weights, kept, up_kernel, down_kernel, activation)
  if backend not in ("triton", "interpret"):
    raise ValueError(f"backend must be 'triton' or 'interpret', got {backend!r}")
  if x.shape[0] == 0 or x.shape[1] == 0:
    return jnp.zeros(x.shape, x.dtype)
  op = _expert_ffn_fn(activation, backend, router_scale_stage())
  return op(
      x,
      expert_ids.astype(jnp.int32),
      weights.astype(jnp.float32),
      kept.astype(bool),
      up_kernel.astype(x.dtype),
      down_kernel.astype(x.dtype),
  )
