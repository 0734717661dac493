"""Transposed grouped GEMM: the weight-gradient GEMM of an MoE, as a Triton op.

`tgmm(a [m, ka], b [m, n], group_sizes [g]) -> [g, ka, n]` contracts over rows
within each group:

  out[gi] = sum_{r in group gi}  A_r^T (s_r * B_r)

with `A_r = a[a_row_index[r]]` (or `a[r]`), `B_r = b[b_row_index[r]]` (or
`b[r]`) and `s_r = row_scale[r]` (or 1). Groups are contiguous from row 0
(`start = exclusive cumsum(group_sizes)`); rows at or past `sum(group_sizes)`
are ignored, and a group with no rows gives zeros. In an MoE backward:

  dW_up[e]   = tgmm(x, d_act, tokens_per_expert, a_row_index=token_of_slot)
  dW_down[e] = tgmm(h, dy, tokens_per_expert, b_row_index=token_of_slot,
                    row_scale=weight_of_slot)

and `tgmm(lhs, d_out, group_sizes)` is the `rhs` gradient of
`jax.lax.ragged_dot(lhs, rhs, group_sizes)`.

The kernel is `jmoe.kernels.tgmm._tgmm_kernel` (one program per output tile and
group, float32 accumulation, no atomics: bit-identical repeats). With
`gather_mode="xla_columns"` it reads `a` as the columns of a transposed,
group-padded copy (`group_columns`, made by `jmoe.kernels.gather_columns`), and
`transpose_out=True` returns `[g, n, ka]`; that layout runs on the persistent
TMA kernel `jmoe.kernels.tgmm_tma` where it applies (`tgmm_kernel`), as does
`gather_mode="xla_rows"` (row-major `a`, no copy when it is already in row
order). Its oracle is
`tgmm_reference` below (`jax.lax.ragged_dot_general` with a ragged contracting
dimension).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jmoe import _shard
from jmoe._backend import resolve_backend
from jmoe._checks import HALF_DTYPES, is_dtype
from jmoe._env import env_choice, env_flag, env_value
from jmoe.reference.tgmm import group_offsets, tgmm_vjp
from jmoe.reference.tgmm import tgmm as reference_tgmm

OPERAND_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
OUT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
INPUT_PRECISIONS = ("ieee", "tf32")
# How `row_scale` is applied. "prescale" (default): XLA computes
# `a_s = (s * a[a_row_index]).astype(a.dtype)` (float32 product, one rounding:
# the same numbers the kernel made) and the kernel runs without scale or `a`
# gather, so its `a` tile streams by 16-byte cp.async into shared memory and
# feeds wgmma from there. "kernel": the kernel loads the `a` tile into
# registers, scales it and feeds wgmma from registers (on sm_90 a shared-memory
# round trip of the tile per step, no cp.async for `a`, 222-255 registers).
# Measured on the H100 (MoE dW_down, bf16, benchmarks/results/sweep_h100.md):
# prescale 4.24 / 0.81 / 0.155 ms vs kernel 6.29 / 1.10 / 0.209 ms
# (Mixtral-like / 64 experts / small), the XLA pass included.
ROW_SCALE_MODES = ("prescale", "kernel")
ROW_SCALE_MODE_ENV = "JMOE_TGMM_ROW_SCALE_MODE"
# Who gathers the rows of `a` selected by `a_row_index`: "xla" (default: one
# `jnp.take` into an `[m, ka]` array, then the kernel reads contiguous rows) or
# "kernel" (the kernel loads `a_row_index` one step ahead and gathers inside
# the K loop). Measured on the H100 (MoE dW_up, bf16, gather included,
# benchmarks/results/sweep_h100.md): xla 7.71 / 1.45 / 0.196 ms vs kernel
# 9.58 / 1.63 / 0.261 ms (Mixtral-like / 64 experts / small).
# "xla_columns": XLA gathers them transposed, `[ka, m_pad]`, every group's rows
# as columns from a multiple of `COLUMN_ALIGN` and zero-filled to the next one
# (`group_columns`), so the kernel's `a` tile is K-major for wgmma and needs no
# row mask. With no `a_row_index` it transposes `a` itself. Measured on the
# H100: see `expert_ffn.dw_up_gather_mode` for where it is used.
# "xla_rows": the rows as "xla" (`a` as given when there is no `a_row_index`,
# e.g. a sorted copy a grouped GEMM already read by TMA), read row-major by the
# TMA kernel (`A_ROWS`: the tile is an MN-major wgmma operand; `b`'s per-tile
# descriptor ends at the group's last row, or `a`'s with
# `JMOE_TGMM_TMA_BOUNDED=0`), so no transposed copy is made; the plain
# kernel runs it as "xla". See `expert_ffn.share_sorted_rows`.
GATHER_MODES = ("xla", "kernel", "xla_columns", "xla_rows")
TMA_GATHER_MODES = ("xla_columns", "xla_rows")
GATHER_MODE_ENV = "JMOE_TGMM_GATHER"
COLUMN_ALIGN = 64

# Which kernel runs `gather_mode="xla_columns"` (`JMOE_TGMM_KERNEL`): "tma"
# (`jmoe.kernels.tgmm_tma`: persistent, TMA loads and store; needs `ka` and `n`
# multiples of 16, no `b_row_index`, and on the GPU the hidden-scratch launch
# of `jmoe.ops._hidden_scratch`), "plain" (`jmoe.kernels.tgmm`, cp.async
# loads, one program per tile), or "auto" (default): "tma" where it applies,
# else "plain". The MoE weight gradients on the H100, both layouts' copies
# included (benchmarks/results/sweep_h100.md, session 6): Mixtral-like 11.80 ->
# 9.49 ms, 64 experts 2.38 -> 2.16 ms (against the row layout), small 0.35 ->
# 0.30 ms. `JMOE_TGMM_TMA_FLATTEN`, `JMOE_TGMM_TMA_BOUNDED` and
# `JMOE_TGMM_TMA_STORE` set its `FLATTEN`, `B_BOUNDED` and `TMA_STORE` switches.
# "gluon" (`jmoe.kernels.tgmm_gluon`, sm_90 GPU only, 16-bit output): the same
# persistent TMA tgmm written in Gluon, its loads pipelined across output
# tiles (`gluon_eligible`); launched through `jmoe.ops._gluon`.
TGMM_KERNELS = ("auto", "plain", "tma", "gluon")
# The Gluon kernel's schedule (`JMOE_TGMM_GLUON_WS`): warp-specialised (1, the
# default: a producer warp and the consumer warp groups) or one partition (0).
GLUON_WS_ENV = "JMOE_TGMM_GLUON_WS"
TGMM_KERNEL_ENV = "JMOE_TGMM_KERNEL"
TMA_FLATTEN_ENV = "JMOE_TGMM_TMA_FLATTEN"
TMA_BOUNDED_ENV = "JMOE_TGMM_TMA_BOUNDED"
TMA_STORE_ENV = "JMOE_TGMM_TMA_STORE"


@dataclasses.dataclass(frozen=True)
class TmaOptions:
  """Switches of the TMA tgmm (`jmoe.kernels.tgmm_tma`)."""

  flatten: bool = False  # measured equal (H100, session 6)
  b_bounded: bool = True  # no reads of b past a group; <= 2 % slower
  # ("xla_rows": b's rows or else a's stop at the group end, never both)
  tma_store: bool = True  # 3-4 % faster than st.global
  gluon: bool = False  # the Gluon kernel (`TGMM_KERNELS`); ignores the above

  @classmethod
  def from_env(cls) -> TmaOptions:
    return cls(env_flag(TMA_FLATTEN_ENV, cls.flatten),
               env_flag(TMA_BOUNDED_ENV, cls.b_bounded),
               env_flag(TMA_STORE_ENV, cls.tma_store))


def tma_eligible(dtype: Any, ka: int, n: int, has_b_index: bool,
                 gather_mode: str) -> bool:
  """Whether the TMA tgmm can run this call (see `TGMM_KERNELS`): 16-bit
  operands (its one tile config is sized for them)."""
  return (is_dtype(dtype, HALF_DTYPES)
          and gather_mode in TMA_GATHER_MODES and not has_b_index
          and ka % 16 == 0 and n % 16 == 0)


def tma_available(backend: str) -> bool:
  """Whether `backend` can launch the TMA tgmm (the interpreter always can; the
  GPU with the jax-triton / jaxlib pairs of `jmoe.ops._hidden_scratch`)."""
  from jmoe.ops import _hidden_scratch  # pylint: disable=import-outside-toplevel

  return backend == "interpret" or (backend == "triton" and _hidden_scratch.supported())


def gluon_eligible(backend: str, dtype: Any, out_dtype: Any) -> str:
  """Why the Gluon tgmm cannot run a TMA-eligible call ("" when it can): it is
  compiled for sm_90 only, runs on the GPU only (Gluon has no interpreter) and
  stores a 16-bit tile (a float32 one does not fit in shared memory beside its
  operand ring)."""
  if backend != "triton":
    return f"backend {backend!r} (Gluon kernels run on the GPU only)"
  if not (is_dtype(dtype, HALF_DTYPES) and is_dtype(out_dtype, HALF_DTYPES)):
    return (f"operand dtype {np.dtype(dtype).name}, out_dtype "
            f"{np.dtype(out_dtype).name} (both must be bfloat16 / float16)")
  capability = getattr(jax.devices("gpu")[0], "compute_capability", "")
  if str(capability) != "9.0":
    return f"GPU compute capability {capability!r} (needs 9.0)"
  return ""


def tgmm_kernel(backend: str, dtype: Any, ka: int, n: int, has_b_index: bool,
                gather_mode: str, out_dtype: Any = None) -> str:
  """`"gluon"`, `"tma"` or `"plain"`: the kernel `tgmm` launches (see
  `TGMM_KERNELS`).

  Raises:
    ValueError: `JMOE_TGMM_KERNEL=tma` / `gluon` for a call that kernel cannot run.
  """
  choice = env_choice(TGMM_KERNEL_ENV, TGMM_KERNELS, "auto")
  eligible = tma_eligible(dtype, ka, n, has_b_index, gather_mode)
  if choice == "gluon":
    why = gluon_eligible(backend, dtype, dtype if out_dtype is None else out_dtype)
    if gather_mode != "xla_columns":
      why = why or f"gather_mode={gather_mode!r}"
    if why or not eligible:
      raise ValueError(
          f"{TGMM_KERNEL_ENV}=gluon needs what the TMA kernel needs (16-bit operands, "
          'gather_mode="xla_columns", no b_row_index, ka and n multiples of 16) '
          f"and a 16-bit out_dtype on an sm_90 GPU; here: "
          f"{why or 'the TMA kernel cannot run this call'}")
    return "gluon"
  if choice == "tma" and not eligible:
    raise ValueError(
        f'{TGMM_KERNEL_ENV}=tma needs bfloat16 / float16 operands, '
        f"gather_mode in {TMA_GATHER_MODES}, no b_row_index and ka, n multiples of 16; "
        f"got dtype {np.dtype(dtype).name}, gather_mode={gather_mode!r}, "
        f"b_row_index {'set' if has_b_index else 'None'}, ka={ka}, n={n}")
  if choice == "auto":
    return "tma" if eligible and tma_available(backend) else "plain"
  return choice

_SHAPES_DOC = (
    "tgmm(a [m, ka], b [m, n], group_sizes [g]; a_row_index [m] -> a [ma, ka], "
    "b_row_index [m] -> b [mb, n], row_scale [m])"
)


@dataclasses.dataclass(frozen=True)
class TgmmConfig:
  """One tile configuration of the tgmm kernel (pins it instead of autotuning).

  Attributes:
    block_m: rows contracted per step (>= 16).
    block_k: output tile rows (columns of `a`, >= 16).
    block_n: output tile columns (columns of `b`, >= 16).
    group_size: tile swizzle band height, in tiles.
    num_warps: warps per program (GPU only).
    num_stages: software-pipelining depth (GPU only).
  """

  block_m: int = 64
  block_k: int = 128
  block_n: int = 256
  group_size: int = 8
  num_warps: int = 8
  num_stages: int = 3

  def metaparams(self) -> dict[str, int]:
    return {
        "BLOCK_M": self.block_m,
        "BLOCK_K": self.block_k,
        "BLOCK_N": self.block_n,
        "GROUP_SIZE": self.group_size,
    }

  @classmethod
  def get_interpret_default(cls) -> TgmmConfig:
    """The one small config used under Triton's interpreter."""
    from jmoe.kernels.tgmm import TGMM_INTERPRET_CONFIG  # pylint: disable=import-outside-toplevel

    c = TGMM_INTERPRET_CONFIG
    return cls(c["BLOCK_M"], c["BLOCK_K"], c["BLOCK_N"], c["GROUP_SIZE"], 4, 1)


# ----------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------


def _check_array(name: str, x, ndim: int, shape_doc: str) -> None:
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{name} must be an array {shape_doc}, got {type(x).__name__}")
  if x.ndim != ndim:
    raise ValueError(f"{name} must have shape {shape_doc}, got shape {x.shape}")


def _check_args(a, b, group_sizes, a_row_index, b_row_index, row_scale,
                out_dtype) -> int:
  """Validates the arguments at trace time; returns `m`, the logical rows."""
  _check_array("a", a, 2, "[m, ka] (or [ma, ka] with a_row_index)")
  _check_array("b", b, 2, "[m, n] (or [mb, n] with b_row_index)")
  for name, x in (("a", a), ("b", b)):
    if not is_dtype(x.dtype, OPERAND_DTYPES):
      raise TypeError(
          f"{name} must be float32, bfloat16 or float16, got dtype {x.dtype}"
      )
  if a.dtype != b.dtype:
    raise TypeError(
        f"a and b must have the same dtype, got a {a.dtype} and b {b.dtype}; "
        "cast one of them"
    )
  _check_array("group_sizes", group_sizes, 1, "[g]")
  if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise TypeError(f"group_sizes must be int32 [g], got dtype {group_sizes.dtype}")
  for name, idx in (("a_row_index", a_row_index), ("b_row_index", b_row_index)):
    if idx is None:
      continue
    _check_array(name, idx, 1, "[m] int32")
    if not jnp.issubdtype(idx.dtype, jnp.integer):
      raise TypeError(f"{name} must be int32 [m], got dtype {idx.dtype}")
  m = a.shape[0] if a_row_index is None else a_row_index.shape[0]
  if b_row_index is not None and b_row_index.shape[0] != m:
    raise ValueError(
        f"b_row_index must have shape [m] = [{m}] (m = "
        f"{'a_row_index.shape[0]' if a_row_index is not None else 'a.shape[0]'}), "
        f"got shape {b_row_index.shape}"
    )
  if b_row_index is None and b.shape[0] != m:
    raise ValueError(
        f"b must have shape [m, n] with m = {m} rows "
        f"({'a_row_index.shape[0]' if a_row_index is not None else 'a.shape[0]'}) "
        f"when b_row_index is None, got shape {b.shape}"
    )
  if row_scale is not None:
    _check_array("row_scale", row_scale, 1, f"[m] = [{m}] float32")
    if row_scale.shape[0] != m:
      raise ValueError(
          f"row_scale must have shape [m] = [{m}], got shape {row_scale.shape}"
      )
    if not jnp.issubdtype(row_scale.dtype, jnp.floating):
      raise TypeError(f"row_scale must be float32 [m], got dtype {row_scale.dtype}")
  if not is_dtype(out_dtype, OUT_DTYPES):
    raise TypeError(
        f"out_dtype must be float32, bfloat16 or float16, got {out_dtype!r}"
    )
  return m


def prescale_rows(a, a_row_index, row_scale) -> jax.Array:
  """`[m, ka]` rows `s_r * a[a_row_index[r]]` in float32, rounded to `a.dtype`.

  The `"prescale"` row-scale mode: exactly the scaled tile the kernel's
  `"kernel"` mode forms (float32 product, one round-to-nearest-even to the
  operand dtype), computed by XLA (one elementwise pass over `[m, ka]`).
  """
  rows = a if a_row_index is None else jnp.take(a, a_row_index, axis=0, mode="clip")
  scaled = rows.astype(jnp.float32) * row_scale.astype(jnp.float32)[:, None]
  return scaled.astype(a.dtype)


def _round_up(x, multiple: int):
  """`x` (an int or an integer array) rounded up to a multiple of `multiple`."""
  return (x + multiple - 1) // multiple * multiple


def group_columns(a, a_row_index, offsets, m: int, backend: str = "reference"):
  """`gather_mode="xla_columns"`: `(a_t [ka, m_pad], col_offsets [g] int32)`.

  Logical row `r` of group `gi` (`offsets[gi] <= r < offsets[gi + 1]`) becomes
  column `r - offsets[gi] + col_offsets[gi]` of `a_t`: `a[a_row_index[r]]` (or
  `a[r]`). Each group starts at a multiple of `COLUMN_ALIGN` and the columns up
  to the next multiple are zeros; `m_pad = round_up(m + g * (COLUMN_ALIGN - 1),
  COLUMN_ALIGN)` bounds every split of `m` rows into `g` groups. XLA builds the
  column -> row index; the copy itself is `jmoe.kernels.gather_columns` with
  `backend` "triton" / "interpret", XLA's take + transpose with "reference".
  """
  g = offsets.shape[0] - 1
  align = COLUMN_ALIGN
  sizes = offsets[1:] - offsets[:-1]
  spans = _round_up(sizes, align)
  col_offsets = jnp.concatenate(
      [jnp.zeros((1,), jnp.int32), jnp.cumsum(spans)[:-1].astype(jnp.int32)])
  m_pad = _round_up(m + g * (align - 1), align)
  rows = jnp.arange(m, dtype=jnp.int32)
  group = jnp.searchsorted(offsets[1:], rows, side="right")  # g: past the end
  in_group = group < g
  group = jnp.minimum(group, g - 1)
  cols = jnp.where(in_group, rows - offsets[group] + col_offsets[group], m_pad)
  src = rows if a_row_index is None else jnp.clip(
      a_row_index.astype(jnp.int32), 0, a.shape[0] - 1)
  # Unset columns keep the out-of-range index a.shape[0]: "fill" gives zeros.
  index = jnp.full((m_pad,), a.shape[0], jnp.int32).at[cols].set(src, mode="drop")
  if backend == "reference":
    return jnp.take(a, index, axis=0, mode="fill", fill_value=0).T, col_offsets
  return _gather_columns(a, index, backend), col_offsets


def _gather_columns(x, index, backend: str) -> jax.Array:
  """`take(x, index, fill 0).T` `[d, len(index)]` with the Triton kernel."""
  from jmoe.kernels import gather_columns as kernels  # pylint: disable=import-outside-toplevel
  from jmoe.kernels.tgmm import stride_multiple  # pylint: disable=import-outside-toplevel
  from jmoe.ops._call import kernel_call  # pylint: disable=import-outside-toplevel

  t, d = x.shape
  mp = index.shape[0]
  block_c, block_d = (64, 128) if backend == "triton" else (16, 16)
  d_mult = stride_multiple(d)
  return kernel_call(
      kernels._gather_columns_kernel,  # pylint: disable=protected-access
      x, index, t, d // d_mult, mp // block_c,
      out_shape=jax.ShapeDtypeStruct((d, mp), x.dtype),
      grid=(mp // block_c, -(-d // block_d)),
      backend=backend,
      name="jmoe_gather_columns",
      D_MULT=d_mult, BLOCK_C=block_c, BLOCK_D=block_d, num_warps=4,
  )


def _launch(a, b, group_sizes, a_row_index, b_row_index, row_scale, *, m,
            out_dtype, input_precision, backend, config,
            row_scale_mode="kernel", gather_mode="kernel",
            transpose_out=False, tma=None) -> jax.Array:
  import triton  # pylint: disable=import-outside-toplevel

  from jmoe.kernels import tgmm as kernels  # pylint: disable=import-outside-toplevel
  from jmoe.ops._call import kernel_call  # pylint: disable=import-outside-toplevel

  g = group_sizes.shape[0]
  ka, n = a.shape[1], b.shape[1]
  out_shape = jax.ShapeDtypeStruct((g, n, ka) if transpose_out else (g, ka, n),
                                   out_dtype)
  if g == 0 or ka == 0 or n == 0 or m == 0:
    return jnp.zeros(out_shape.shape, out_dtype)

  if backend == "interpret" and config is None:
    config = TgmmConfig.get_interpret_default()
  if row_scale is not None and row_scale_mode == "prescale":
    a = prescale_rows(a, a_row_index, row_scale)
    a_row_index = row_scale = None
  if a_row_index is not None and gather_mode in ("xla", "xla_rows"):
    a = jnp.take(a, a_row_index, axis=0, mode="clip")
    a_row_index = None
  if gather_mode == "xla_rows" and row_scale is not None:
    raise ValueError('gather_mode="xla_rows" needs row_scale_mode="prescale"')
  offsets = group_offsets(group_sizes, m)
  if gather_mode == "xla_rows" and tma is not None:
    return _launch_tma(a, None, b, offsets, g, out_shape, input_precision, backend,
                       config, tma, transpose_out)
  dummy_index = jnp.zeros((1,), jnp.int32)
  a_col_offsets = None
  if gather_mode == "xla_columns":
    if row_scale is not None:
      raise ValueError('gather_mode="xla_columns" needs row_scale_mode="prescale"')
    if config is not None and COLUMN_ALIGN % config.block_m:
      raise ValueError(
          f'gather_mode="xla_columns" needs config.block_m dividing {COLUMN_ALIGN}, '
          f"got block_m={config.block_m}")
    a, a_col_offsets = group_columns(a, a_row_index, offsets, m, backend)
    a_row_index = None
    if tma is not None:
      return _launch_tma(a, a_col_offsets, b, offsets, g, out_shape,
                         input_precision, backend, config, tma, transpose_out)
  args = (
      a,
      b,
      offsets,
      dummy_index if a_row_index is None else a_row_index.astype(jnp.int32),
      dummy_index if b_row_index is None else b_row_index.astype(jnp.int32),
      jnp.zeros((1,), jnp.float32) if row_scale is None
      else row_scale.astype(jnp.float32),
      dummy_index if a_col_offsets is None else a_col_offsets,
      m,
      ka // kernels.stride_multiple(ka),
      n // kernels.stride_multiple(n),
      0 if a_col_offsets is None else a.shape[1] // 16,
  )
  flags = {
      "A_COLUMNS": a_col_offsets is not None,
      "OUT_TRANSPOSED": transpose_out,
      "KA_MULT": kernels.stride_multiple(ka),
      "N_MULT": kernels.stride_multiple(n),
      "HAS_A_INDEX": a_row_index is not None,
      "HAS_B_INDEX": b_row_index is not None,
      "HAS_SCALE": row_scale is not None,
      "DOT_F32": backend == "interpret",
      "INPUT_PRECISION": input_precision,
  }

  def grid(meta):
    return (triton.cdiv(ka, meta["BLOCK_K"]) * triton.cdiv(n, meta["BLOCK_N"]), g)

  if config is None:
    if a.dtype == jnp.float32:
      kernel = kernels.tgmm_kernel_autotuned_f32
    else:
      kernel = kernels.tgmm_kernel_autotuned
    launch_options = {}
  else:
    kernel = kernels.tgmm_kernel_heuristic
    launch_options = {
        **config.metaparams(),
        "num_warps": config.num_warps,
        "num_stages": config.num_stages,
    }
  return kernel_call(
      kernel,
      *args,
      out_shape=out_shape,
      grid=grid,
      backend=backend,
      name="jmoe_tgmm",
      **flags,
      **launch_options,
  )


def tma_scratch_bytes(a_rows: bool) -> int:
  """Global scratch per program of the TMA tgmm: one 128-byte slot per device
  descriptor (`jmoe.ops._hidden_scratch` checks the build against it)."""
  return (5 if a_rows else 4) * 128


def _launch_tma(a_t, a_col_offsets, b, offsets, g, out_shape, input_precision,
                backend, config, tma: TmaOptions, transpose_out: bool) -> jax.Array:
  """`jmoe.kernels.tgmm_tma` on `a_t [ka, m_pad]` (`group_columns`) and `b`;
  `config` already checked by `_launch` (block_m divides `COLUMN_ALIGN`).
  `a_col_offsets` None: `a_t` is `[m, ka]` row-major instead (`"xla_rows"`)."""
  from jmoe.kernels import tgmm_tma as kernels  # pylint: disable=import-outside-toplevel
  from jmoe.ops._call import kernel_call, persistent_programs  # pylint: disable=import-outside-toplevel

  a_rows = a_col_offsets is None
  ka, ma = (a_t.shape[1], 0) if a_rows else a_t.shape
  mb, n = b.shape
  config = config or TgmmConfig()  # None: the GPU default (it does not autotune)
  tiles = g * -(-ka // config.block_k) * -(-n // config.block_n)
  programs = max(1, min(persistent_programs(backend), tiles))
  if tma.gluon:  # `tgmm_kernel` gives "gluon" for "xla_columns" only
    return _launch_gluon(a_t, a_col_offsets, b, offsets, g, out_shape, config,
                         programs, transpose_out)
  return kernel_call(
      kernels._tgmm_tma_kernel,  # pylint: disable=protected-access
      a_t, b, offsets, offsets if a_rows else a_col_offsets, g, mb, ka // 16,
      n // 16, ma // 16,
      out_shape=out_shape,
      grid=(programs,),
      backend=backend,
      name="jmoe_tgmm_tma",
      scratch_bytes_per_program=tma_scratch_bytes(a_rows),
      OUT_TRANSPOSED=transpose_out,
      A_ROWS=a_rows,
      B_BOUNDED=tma.b_bounded,
      TMA_STORE=tma.tma_store,
      DOT_F32=backend == "interpret",
      INPUT_PRECISION=input_precision,
      NUM_PROGRAMS=programs,
      FLATTEN=tma.flatten,
      num_warps=config.num_warps,
      num_stages=config.num_stages,
      **config.metaparams(),
  )


def _launch_gluon(a_t, a_col_offsets, b, offsets, g, out_shape, config, programs,
                  transpose_out: bool) -> jax.Array:
  """`jmoe.kernels.tgmm_gluon` (GPU only): the tile of `config`, its
  `num_stages` as the depth of the operand ring."""
  from jmoe.kernels import tgmm_gluon as kernels  # pylint: disable=import-outside-toplevel
  from jmoe.ops import _gluon  # pylint: disable=import-outside-toplevel
  from jmoe.ops._call import kernel_call  # pylint: disable=import-outside-toplevel

  _gluon.install()
  ka, ma = a_t.shape
  mb, n = b.shape
  ws = env_flag(GLUON_WS_ENV, True)
  return kernel_call(
      kernels._tgmm_gluon_ws_kernel if ws else kernels._tgmm_gluon_kernel,  # pylint: disable=protected-access
      a_t, b, offsets, a_col_offsets, g, mb, ka // 16, n // 16, ma // 16,
      out_shape=out_shape,
      grid=(programs,),
      backend="triton",
      name="jmoe_tgmm_gluon_ws" if ws else "jmoe_tgmm_gluon",
      scratch_bytes_per_program=3 * 128,
      OUT_TRANSPOSED=transpose_out,
      NUM_PROGRAMS=programs,
      NUM_BUFFERS=config.num_stages,
      num_warps=config.num_warps,
      **config.metaparams(),
  )


@functools.cache
def _tgmm_fn(m: int, out_dtype: Any, input_precision: str, backend: str,
             config: TgmmConfig | None, row_scale_mode: str = "kernel",
             gather_mode: str = "kernel", transpose_out: bool = False,
             tma: TmaOptions | None = None):
  """The custom_vjp op for one static configuration."""

  def forward(a, b, group_sizes, a_row_index, b_row_index, row_scale):
    return _launch(
        a, b, group_sizes, a_row_index, b_row_index, row_scale, m=m,
        out_dtype=out_dtype, input_precision=input_precision, backend=backend,
        config=config, row_scale_mode=row_scale_mode, gather_mode=gather_mode,
        transpose_out=transpose_out, tma=tma,
    )

  @jax.custom_vjp
  def op(a, b, group_sizes, a_row_index, b_row_index, row_scale):
    return forward(a, b, group_sizes, a_row_index, b_row_index, row_scale)

  def fwd(a, b, group_sizes, a_row_index, b_row_index, row_scale):
    out = forward(a, b, group_sizes, a_row_index, b_row_index, row_scale)
    return out, (a, b, group_sizes, a_row_index, b_row_index, row_scale)

  def bwd(residuals, d_out):
    # The gradients of a weight gradient are rarely needed: they are computed
    # in XLA (`tgmm_vjp`), like Pallas' `backward_pass_impl="xla"`.
    if transpose_out:
      d_out = jnp.swapaxes(d_out, 1, 2)
    return tgmm_vjp(*residuals, d_out)

  op.defvjp(fwd, bwd)
  return _shard.varying_inputs(op)


def tgmm(
    a: jax.Array,
    b: jax.Array,
    group_sizes: jax.Array,
    *,
    a_row_index: jax.Array | None = None,
    b_row_index: jax.Array | None = None,
    row_scale: jax.Array | None = None,
    out_dtype=jnp.float32,
    input_precision: str = "ieee",
    config: TgmmConfig | None = None,
    row_scale_mode: str | None = None,
    gather_mode: str | None = None,
    transpose_out: bool = False,
    backend: str = "auto",
) -> jax.Array:
  """Transposed grouped GEMM: `out[gi] = sum_{r in gi} A_r^T (s_r * B_r)`.

  Example usage::

    # rhs gradient of ragged_dot(lhs [m, k], rhs [g, k, n], group_sizes):
    d_rhs = tgmm(lhs, d_out, group_sizes, backend="triton")  # [g, k, n] f32

  Args:
    a: `[m, ka]`, or `[ma, ka]` gathered by `a_row_index`; float32, bfloat16
      or float16.
    b: `[m, n]`, or `[mb, n]` gathered by `b_row_index`; same dtype as `a`.
    group_sizes: `[g]` int32 rows per group, contiguous from row 0 (sizes must
      be >= 0; rows at or past `sum(group_sizes)` are ignored).
    a_row_index: optional `[m]` int32: logical row `r` reads `a[a_row_index[r]]`
      (values must lie in `[0, ma)`; not checked).
    b_row_index: optional `[m]` int32, the same for `b` (values in `[0, mb)`).
    row_scale: optional `[m]` float32 `s_r`, applied to row `r` in float32 (the
      kernel scales the `a` row and rounds it to the operand dtype for the
      tensor-core dot; exact up to that one rounding).
    out_dtype: float32 (default), bfloat16 or float16. Accumulation is float32.
    input_precision: for float32 operands on the GPU, `"ieee"` (default, exact
      float32 products) or `"tf32"` (faster, ~1e-3 relative error).
    config: a `TgmmConfig` to pin one tile config (default: autotune on the GPU,
      the small interpreter config with `"interpret"`).
    row_scale_mode: None (default: the environment variable
      `JMOE_TGMM_ROW_SCALE_MODE`, else `"prescale"`), or with `row_scale`,
      `"prescale"` (XLA forms the scaled, gathered rows of `a` in `a.dtype`
      and the kernel runs unscaled; one extra `[m, ka]` array; 1.3-1.5x
      faster on the H100) or `"kernel"` (the kernel scales its `a` tile in
      registers). Same numbers on the GPU (float32 product, one rounding).
    gather_mode: None (default: the environment variable `JMOE_TGMM_GATHER`,
      else `"xla"`), or with `a_row_index`, `"xla"` (XLA gathers the rows of
      `a` into an `[m, ka]` array first; 1.1-1.3x faster on the H100) or
      `"kernel"` (the kernel gathers them); or `"xla_columns"` (with or
      without `a_row_index`: XLA writes the rows as columns of a transposed,
      group-padded `[ka, m_pad]` copy, `group_columns`; the kernel's `a` tile
      is then K-major, and where `tgmm_kernel` allows, the persistent TMA
      kernel runs); or `"xla_rows"` (the rows as `"xla"`, read row-major by
      the TMA kernel where `tgmm_kernel` allows: no transposed copy). Same
      numbers in every mode.
    transpose_out: return `[g, n, ka]` (each group's `out[gi].T`, stored so by
      the kernel) instead of `[g, ka, n]`.
    backend: `"auto"`, `"triton"`, `"interpret"` or `"reference"`.

  Returns:
    `[g, ka, n]` (`[g, n, ka]` with `transpose_out`) in `out_dtype`; groups
    with no rows are zeros.

  Raises:
    ValueError, TypeError: an argument has the wrong shape or dtype (at trace
      time). RuntimeError: `backend="triton"` cannot run here.
  """
  m = _check_args(a, b, group_sizes, a_row_index, b_row_index, row_scale,
                  out_dtype)
  if input_precision not in INPUT_PRECISIONS:
    raise ValueError(
        f"input_precision must be one of {INPUT_PRECISIONS}, got {input_precision!r}"
    )
  if row_scale_mode is None:
    row_scale_mode = env_value(ROW_SCALE_MODE_ENV, "prescale")
  if row_scale_mode not in ROW_SCALE_MODES:
    raise ValueError(
        f"row_scale_mode must be one of {ROW_SCALE_MODES}, got {row_scale_mode!r}"
    )
  if gather_mode is None:
    gather_mode = env_value(GATHER_MODE_ENV, "xla")
  if gather_mode not in GATHER_MODES:
    raise ValueError(f"gather_mode must be one of {GATHER_MODES}, got {gather_mode!r}")
  if config is not None and not isinstance(config, TgmmConfig):
    raise TypeError(f"config must be a TgmmConfig or None, got {type(config).__name__}")
  out_dtype = jnp.dtype(out_dtype)
  backend = resolve_backend(backend)
  if backend == "reference":
    out = tgmm_reference(
        a, b, group_sizes, a_row_index=a_row_index, b_row_index=b_row_index,
        row_scale=row_scale, out_dtype=out_dtype,
    )
    return jnp.swapaxes(out, 1, 2) if transpose_out else out
  tma = None
  kind = tgmm_kernel(backend, a.dtype, a.shape[1], b.shape[1], b_row_index is not None,
                     gather_mode, out_dtype)
  if kind in ("tma", "gluon"):
    tma = dataclasses.replace(TmaOptions.from_env(), gluon=kind == "gluon")
  op = _tgmm_fn(m, out_dtype, input_precision, backend, config, row_scale_mode,
                gather_mode, bool(transpose_out), tma)
  return op(a, b, group_sizes, a_row_index, b_row_index, row_scale)


# ----------------------------------------------------------------------------
# Reference: `jmoe.reference.tgmm`, validated like the kernel op.
# ----------------------------------------------------------------------------


def tgmm_reference(
    a: jax.Array,
    b: jax.Array,
    group_sizes: jax.Array,
    *,
    a_row_index: jax.Array | None = None,
    b_row_index: jax.Array | None = None,
    row_scale: jax.Array | None = None,
    out_dtype=jnp.float32,
    precision=jax.lax.Precision.HIGHEST,
) -> jax.Array:
  """`jmoe.reference.tgmm.tgmm` with `tgmm`'s argument checks.

  Returns:
    `[g, ka, n]` in `out_dtype`.
  """
  _check_args(a, b, group_sizes, a_row_index, b_row_index, row_scale, out_dtype)
  return reference_tgmm(
      a, b, group_sizes, a_row_index=a_row_index, b_row_index=b_row_index,
      row_scale=row_scale, out_dtype=out_dtype, precision=precision)
