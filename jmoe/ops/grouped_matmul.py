"""`grouped_matmul` (= `jax.lax.ragged_dot`) as a Triton op, and the GEMM launcher.

`grouped_matmul(lhs [m, k], rhs [g, k, n], group_sizes [g])` runs
`jmoe.kernels.grouped_gemm._grouped_gemm_kernel` over a tile schedule built
from `group_sizes` (`jmoe.ops.align.tile_schedule`); rows at or past
`sum(group_sizes)` are written with zeros by "zero tiles". Its `custom_vjp`:

  d_lhs = grouped_matmul(d_out, rhs^T)   same kernel, rhs read transposed
  d_rhs = tgmm(lhs, d_out, group_sizes)  `jmoe.ops.tgmm`

`gemm_call` is the one launcher of the grouped GEMM kernels, shared with
`jmoe.ops.expert_ffn`: it picks tiles (`GemmConfig`), the autotuned or pinned
kernel, and the precision switches.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jmoe import _shard
from jmoe._checks import HALF_DTYPES, is_dtype
from jmoe._env import env_choice, env_flag, env_int, env_value
from jmoe.ops import align as align_lib

AUTOTUNE_ENV = "JMOE_AUTOTUNE"
ACT_BWD_SPLIT_ENV = "JMOE_ACT_BWD_SPLIT"

_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class GemmConfig:
  """Tiles of one grouped GEMM launch.

  Attributes:
    block_m: rows per tile (fixed per call: the tile schedule depends on it).
    block_n: output columns per program (for gated activations, per half).
    block_k: contraction step.
    group_m: row tiles per L2 swizzle band.
    num_warps: warps per program (GPU only).
    num_stages: software-pipelining depth (GPU only).
    split_n: `act_bwd` only: BLOCK_N-wide accumulators per program (1 or 2;
      2 covers `2 * block_n` columns, sharing each loaded A tile).
  """

  block_m: int
  block_n: int
  block_k: int
  group_m: int = 8
  num_warps: int = 8
  num_stages: int = 3
  split_n: int = 1

  def metaparams(self, kind: str = "plain") -> dict[str, int]:
    """The kernel's tile constexprs and launch options (`SPLIT_N` for act_bwd)."""
    if self.split_n not in (1, 2) or (self.split_n != 1 and kind != "act_bwd"):
      raise ValueError(
          f"split_n must be 1, or 2 for kind 'act_bwd', got {self.split_n} "
          f"for kind {kind!r}"
      )
    params = {
        "BLOCK_M": self.block_m,
        "BLOCK_N": self.block_n,
        "BLOCK_K": self.block_k,
        "GROUP_M": self.group_m,
        "num_warps": self.num_warps,
        "num_stages": self.num_stages,
    }
    if kind == "act_bwd":
      params["SPLIT_N"] = self.split_n
    return params


# Under Triton's interpreter: one small config (each program costs Python time).
INTERPRET_CONFIG = GemmConfig(16, 32, 32, group_m=4, num_warps=4, num_stages=1)
# The interpreter's act_bwd with two 16-wide accumulators per program (32
# columns, as INTERPRET_CONFIG): odd widths hit a partial and an empty half.
INTERPRET_ACT_BWD_SPLIT_CONFIG = GemmConfig(
    16, 16, 32, group_m=4, num_warps=4, num_stages=1, split_n=2
)

# Kinds of grouped GEMM launch (each has its own kernel and autotune list).
KINDS = ("plain", "act", "act_bwd")


def autotune_enabled() -> bool:
  """GPU launches autotune unless the environment sets `JMOE_AUTOTUNE=0`.

  With autotuning off, every launch uses `default_config` (a fixed config:
  faster compiles, and bit-identical results across processes).
  """
  return env_flag(AUTOTUNE_ENV, True)


def act_bwd_split_enabled() -> bool:
  """The fused act_bwd kernel (`JMOE_ACT_BWD=fused`) runs two accumulators per
  program unless the environment sets `JMOE_ACT_BWD_SPLIT=0`.

  Measured on the H100 (benchmarks/results/sweep_h100.md, bf16 SwiGLU): two
  64-wide accumulators 5.06 / 1.04 / 0.279 ms vs one 6.96 / 1.34 / 0.313 ms
  (Mixtral-like / 64 experts / small). `JMOE_ACT_BWD_SPLIT=0` keeps one
  accumulator (BLOCK_N=64 gated, which reads dy twice as often, or 128).
  """
  return env_flag(ACT_BWD_SPLIT_ENV, True)


def block_m_for(rows: int, groups: int, backend: str) -> int:
  """Rows per tile: 128 on the GPU, 64 when groups average under 128 rows."""
  if backend == "interpret":
    return INTERPRET_CONFIG.block_m
  return 128 if rows >= 128 * groups else 64


GEMM_CONFIG_ENV = "JMOE_GEMM_CONFIG"
_CONFIG_FIELDS = ("block_n", "block_k", "group_m", "num_warps", "num_stages", "split_n")
# The weight-gradient kernel (`TgmmConfig`) has its own fields.
_TGMM_CONFIG_FIELDS = ("block_m", "block_k", "block_n", "group_size", "num_warps",
                       "num_stages")


def _config_fields(kind: str) -> tuple[str, ...]:
  return _TGMM_CONFIG_FIELDS if kind == "tgmm" else _CONFIG_FIELDS


def config_overrides(kind: str) -> dict[str, int]:
  """Fields of `kind`'s pinned config set by `JMOE_GEMM_CONFIG` (GPU only).

  `JMOE_GEMM_CONFIG` holds items `kind:field=value,field=value` joined by "+"
  (e.g. `act:block_k=64,num_stages=3+plain:group_m=16`); fields are those of
  `GemmConfig` except `block_m`, and for kind `tgmm` (the weight gradients)
  those of `TgmmConfig`. A kind named there launches its pinned config with
  these fields replaced, also when autotuning is on.

  Raises:
    ValueError: naming the variable and the expected form, for an unknown kind
      or field or a value that is not a positive integer.
  """
  raw = env_value(GEMM_CONFIG_ENV, "")
  out: dict[str, dict[str, int]] = {}
  for item in filter(None, (i.strip() for i in raw.split("+"))):
    name, _, fields = item.partition(":")
    try:
      pairs = [f.split("=") for f in fields.split(",")]
      values = {key.strip(): int(value) for key, value in pairs}
    except ValueError:
      values = {"": 0}
    if (name not in KINDS + ("tgmm",) or not values
        or any(key not in _config_fields(name) or v < 1 for key, v in values.items())):
      raise ValueError(
          f"{GEMM_CONFIG_ENV} must be items 'kind:field=value,...' joined by '+' "
          f"(kind in {KINDS} with fields {_CONFIG_FIELDS}, or 'tgmm' with fields "
          f"{_TGMM_CONFIG_FIELDS}; positive integers), got {raw!r}"
      )
    out.setdefault(name, {}).update(values)
  return out.get(kind, {})


def autotuned_launch(kind: str, backend: str) -> bool:
  """Whether a `kind` launch on `backend` autotunes: on the GPU unless
  `JMOE_AUTOTUNE=0` or `JMOE_GEMM_CONFIG` pins that kind's config."""
  return backend == "triton" and autotune_enabled() and not config_overrides(kind)


def default_config(kind: str, block_m: int, n: int, k: int, backend: str,
                   gated: bool = False, a_tma: bool = False) -> GemmConfig:
  """The config used without autotuning (and the interpreter's), with the
  fields `JMOE_GEMM_CONFIG` sets for `kind` on the GPU (`config_overrides`);
  `a_tma`: the `a` tiles come by TMA (`tma_flags`)."""
  config = _pinned_config(kind, block_m, n, backend, gated, a_tma)
  overrides = config_overrides(kind) if backend == "triton" else {}
  return dataclasses.replace(config, **overrides) if overrides else config


def _pinned_config(kind: str, block_m: int, n: int, backend: str,
                   gated: bool, a_tma: bool = False) -> GemmConfig:
  split = kind == "act_bwd" and act_bwd_split_enabled()
  if backend == "interpret":
    return INTERPRET_ACT_BWD_SPLIT_CONFIG if split else INTERPRET_CONFIG
  if kind == "plain":
    if n >= 256 and block_m == 128:
      return GemmConfig(block_m, 256, 64, 8, 8, 3)
    if n >= 128:
      return GemmConfig(block_m, 128, 64, 8, 8 if block_m == 128 else 4, 4)
    return GemmConfig(block_m, 64, 64, 8, 4, 4)
  if kind == "act":
    if gated:
      # Rows gathered by cp.async: BLOCK_K 32 x 5 stages, 6.72 / 1.14 / 0.206 ms
      # vs 64 x 3 stages 7.08 / 1.15 / 0.225 ms on the H100; rows of a sorted
      # copy by TMA: 64 x 3 stages, 0.922 vs 1.019 ms at 64 experts
      # (benchmarks/results/sweep_h100.md).
      return GemmConfig(block_m, 128 if n >= 128 else 64, 64 if a_tma else 32, 8, 8,
                        3 if a_tma else 5)
    return GemmConfig(block_m, 256 if n >= 256 and block_m == 128 else 128, 64, 8, 8, 3)
  if kind == "act_bwd":
    # The fused kernel (JMOE_ACT_BWD=fused). Gated, a BLOCK_N=128 epilogue
    # spills (sm_90: 376 B stack); two 64-wide accumulators do not (254
    # registers) and read dy as often as 128 would.
    if gated and n >= 128 and split:
      return GemmConfig(block_m, 64, 64, 8, 8, 4, split_n=2)
    if gated or n < 128:
      return GemmConfig(block_m, 64, 64, 8, 8, 4)
    return GemmConfig(block_m, 128, 64, 8, 8, 3)
  raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def dot_flags(dtype: Any, backend: str) -> dict[str, Any]:
  """`DOT_F32` (interpreter upcast) and `INPUT_PRECISION` for operands of `dtype`.

  float32 operands use `"tf32x3"` on the GPU (three TF32 products, close to
  float32 accuracy) and exact `"ieee"` products in the interpreter.
  """
  interpret = backend == "interpret"
  f32 = np.dtype(dtype) == np.dtype(jnp.float32)
  return {
      "DOT_F32": interpret and not f32,
      "INPUT_PRECISION": "ieee" if (interpret or not f32) else "tf32x3",
  }


WGRAD_MIN_ROWS_ENV = "JMOE_WGRAD_MIN_ROWS"


def long_weight_grad_groups(rows: int, groups: int) -> bool:
  """Whether `rows` contracted over `groups` groups count as long K loops for
  the weight gradients: more than `JMOE_WGRAD_MIN_ROWS` (default 1024) rows
  per group. Long: the 128x256 tgmm tile and (in `expert_ffn`) the K-major
  column layout; short: the 128x128 tile with 4 warps, rows layout."""
  return rows > env_int(WGRAD_MIN_ROWS_ENV, 1024) * groups


def tgmm_config(backend: str, rows: int, groups: int, tma: bool = False):
  """The `TgmmConfig` for weight gradients: pinned when autotuning is off.

  With `tma` (the persistent TMA tgmm, which does not autotune) the 128x256
  tile at every size (H100, session 6: faster than 128x128 and 256x128 at
  64 experts, Mixtral-like and small).

  `rows` contracted over `groups` groups: at 1024 rows per group or fewer
  (short K loops: the tile epilogue weighs more) a 128x128 tile with 4 warps
  is faster (H100, bf16: 1.35 vs 1.44 ms dW_up at 64 experts, 0.18 vs 0.20 ms
  on the small case), above it the 128x256 default (7.7 vs 8.1 ms Mixtral-like;
  benchmarks/results/sweep_h100.md). The bound: `long_weight_grad_groups`.
  `JMOE_GEMM_CONFIG`'s `tgmm` item replaces fields of the pinned config (and
  pins it where it would autotune).
  """
  overrides = config_overrides("tgmm") if backend == "triton" else {}
  if backend == "triton" and (tma or not autotune_enabled() or overrides):
    from jmoe.ops.tgmm import TgmmConfig  # pylint: disable=import-outside-toplevel

    if not tma and not long_weight_grad_groups(rows, groups):
      config = TgmmConfig(64, 128, 128, 8, 4, 3)
    else:
      config = TgmmConfig()
    return dataclasses.replace(config, **overrides)
  return None


# Loads and schedule of the grouped GEMMs (`B_TMA`, `A_TMA`, `PERSISTENT` of
# `jmoe.kernels.grouped_gemm`), where `tma_flags` allows TMA (16-bit operands,
# strides multiples of 16 bytes; on the GPU the jax-triton / jaxlib pairs of
# `jmoe.ops._hidden_scratch`):
#   "persistent": weight tiles (and `a` tiles where `a` is not gathered) by
#     TMA, one program per SM walking the work items (act_bwd: as "tiles");
#   "tiles": the same loads, one program per work item (each builds its
#     descriptors);
#   "off": every tile by cp.async through pointers, one program per item;
#   "auto" (default): "persistent" for the plain kernel (down, dh, dx and
#     `grouped_matmul`) and for the act kernel reading a sorted copy of `x`
#     (`JMOE_GATHER_ROWS`; nested: its flattened loop measured 1.42 vs 1.02 ms
#     at 64 experts), "off" for the act kernel gathering its rows and for
#     act_bwd.
# Measured on the H100 (benchmarks/results/sweep_h100.md, session 7; traced
# kernel time, bf16 SwiGLU, Mixtral-like / 64 experts / small): the plain
# GEMMs persistent 11.17 -> 10.82, 2.03 -> 1.89, 0.312 -> 0.304 ms (fwd+bwd,
# three launches); the up (act) kernel gathering its rows persistent 5.46 ->
# 5.75, 0.97 -> 1.01, 0.160 -> 0.167 ms (slower: its rows come by cp.async);
# "tiles" slower than "off" for both (one descriptor build per program).
#
# `JMOE_GEMM_TMA` is one mode for every kind, or per-kind modes joined by "+"
# (e.g. `act=tiles+act_bwd=off`; kinds not named keep their "auto" mode).
GEMM_TMA_MODES = ("auto", "persistent", "tiles", "off")
GEMM_TMA_ENV = "JMOE_GEMM_TMA"
_AUTO_MODE = {"plain": "persistent", "act": "off", "act_bwd": "off"}


GEMM_FLATTEN_ENV = "JMOE_GEMM_FLATTEN"

# `JMOE_ACT_WIDE` (default 1): the gated act kernel loading its weights through
# pointers (`B_TMA` off: rows gathered by cp.async) multiplies the gate and up
# columns of a block as one `[BLOCK_K, 2 BLOCK_N]` weight tile (`WIDE`: one
# wgmma of N = 256 per step instead of two of 128, so the `a` tile is read from
# shared memory once); 0 keeps two tiles. Needs `f % 8 == 0` (16-byte runs).
ACT_WIDE_ENV = "JMOE_ACT_WIDE"


def act_wide(gated: bool, f: int, b_tma: bool) -> bool:
  """`WIDE` of an act launch whose weights come by TMA or not (`b_tma`;
  `JMOE_ACT_WIDE`, see above)."""
  return gated and not b_tma and f % 8 == 0 and env_flag(ACT_WIDE_ENV, True)


# How a grouped GEMM whose `a` rows are gathered (the up GEMM's token rows of
# `x`, the dh GEMM's rows of `dy`) reads them (`gather_rows_mode`):
#   "kernel": through the row index inside the GEMM, by cp.async;
#   "copy": a copy sorted by slot first (`[rows, k]`, `jmoe.kernels.gather_rows`:
#     one more write and read of it), which the GEMM reads by TMA (the plain
#     kernel in the flattened persistent loop, the act kernel nested);
#   "auto" (default): "copy" above `JMOE_GATHER_ROWS_MIN` (default 1024) rows per
#     group on average, else "kernel".
# Measured on the H100 (benchmarks/results/sweep_h100.md, session 9, traced):
# Mixtral-like (2048 rows per expert) the up GEMM 5.53 -> 5.21 ms and the
# fwd+bwd plain GEMMs 10.80 -> 10.46 ms for 0.07 ms per copy (sustained fwd /
# fwd+bwd 9.42 / 28.52 -> 9.015 / 28.14 ms); at 64 experts (768 rows per
# expert) the up GEMM 0.975 -> 0.914 ms for a 0.089 ms copy, fwd+bwd slower.
GATHER_ROWS_ENV = "JMOE_GATHER_ROWS"
GATHER_ROWS_MIN_ENV = "JMOE_GATHER_ROWS_MIN"
GATHER_ROWS_MODES = ("auto", "kernel", "copy")


def gather_rows_mode(rows: int, groups: int) -> str:
  """`"kernel"` or `"copy"` for a GEMM of `rows` gathered rows in `groups`
  groups (`JMOE_GATHER_ROWS`, see above).

  Raises:
    ValueError: naming the variable, for a value not in `GATHER_ROWS_MODES`
      or a minimum that is not an integer.
  """
  mode = env_choice(GATHER_ROWS_ENV, GATHER_ROWS_MODES, "auto")
  if mode != "auto":
    return mode
  return "copy" if rows > env_int(GATHER_ROWS_MIN_ENV, 1024) * groups else "kernel"


def sorted_rows(a: jax.Array, row_index: jax.Array | None, groups: int,
                backend: str) -> tuple[jax.Array, jax.Array | None]:
  """`(a, row_index)` for a grouped GEMM over `groups` groups: `(a[row_index],
  None)` (a copy sorted by output row, `jmoe.kernels.gather_rows`) where
  `gather_rows_mode` says "copy", else unchanged.

  Args:
    a: `[t, k]` rows.
    row_index: `[rows]` int32 row of `a` for each output row, or None.
    groups: groups (experts) of the GEMM.
    backend: `"triton"` or `"interpret"`.
  """
  if row_index is None or gather_rows_mode(row_index.shape[0], groups) != "copy":
    return a, row_index
  return gather_rows(a, row_index, backend), None


def gather_rows(a: jax.Array, index: jax.Array, backend: str) -> jax.Array:
  """`out [rows, k] = a[index]` (zero rows where `index` is outside `[0, t)`)."""
  import triton  # pylint: disable=import-outside-toplevel

  from jmoe.kernels.gather_rows import _gather_rows_kernel  # pylint: disable=import-outside-toplevel
  from jmoe.ops._call import kernel_call  # pylint: disable=import-outside-toplevel

  (rows,), (t, k) = index.shape, a.shape
  block_r, block_d = (8, 32) if backend == "interpret" else (8, 512)
  return kernel_call(
      _gather_rows_kernel,
      a,
      index,
      out_shape=jax.ShapeDtypeStruct((rows, k), a.dtype),
      grid=(triton.cdiv(rows, block_r), triton.cdiv(k, block_d)),
      backend=backend,
      name="jmoe_gather_rows",
      T=t,
      ROWS=rows,
      D=k,
      BLOCK_R=block_r,
      BLOCK_D=block_d,
      num_warps=4,
  )


def gemm_tma_mode(kind: str, gathered: bool = True) -> str:
  """The mode (`"persistent"`, `"tiles"` or `"off"`) of `kind`'s launches
  under `JMOE_GEMM_TMA` (see above); `gathered`: the act kernel's `a` rows
  are gathered in the kernel (its "auto" mode is then "off").

  Raises:
    ValueError: naming the variable and the allowed values, for an unknown
      mode or kind.
  """
  auto = dict(_AUTO_MODE)
  if not gathered:
    auto["act"] = "persistent"
  raw = env_value(GEMM_TMA_ENV, "auto")
  if "=" not in raw:
    mode = env_choice(GEMM_TMA_ENV, GEMM_TMA_MODES, "auto")
    return auto[kind] if mode == "auto" else mode
  modes = auto
  for item in raw.split("+"):
    name, _, mode = item.strip().partition("=")
    if name not in KINDS or mode not in GEMM_TMA_MODES[1:]:
      raise ValueError(
          f"{GEMM_TMA_ENV} must be one of {GEMM_TMA_MODES} or 'kind=mode' items "
          f"joined by '+' (kind in {KINDS}, mode in {GEMM_TMA_MODES[1:]}), got {raw!r}"
      )
    modes[name] = mode
  return modes[kind]


def _tma_strides_ok(dtype: Any, strides: tuple[int, ...]) -> bool:
  """16-bit operands whose last stride is 1 and whose other strides are
  multiples of 16 bytes (TMA's rule; XLA buffers start 16-byte aligned)."""
  if not is_dtype(dtype, HALF_DTYPES):
    return False
  return strides[-1] == 1 and all(s * 2 % 16 == 0 for s in strides[:-1])


def tma_flags(kind: str, backend: str, dtype: Any, strides_b: tuple[int, int, int],
              num_groups: int, a_rows: int | None, stride_am: int) -> dict[str, Any]:
  """The TMA and schedule constexprs of one grouped GEMM launch (`GEMM_TMA_MODES`).

  Args:
    kind: one of `KINDS` (act_bwd has no `A_TMA`, `PERSISTENT`; only
      `"plain"` has `FLATTEN`).
    backend: `"triton"` (needs the jax-triton / jaxlib pair of
      `jmoe.ops._hidden_scratch`, else no TMA) or `"interpret"`.
    dtype: the operands' dtype (TMA here: bfloat16 / float16).
    strides_b: `(group, k, n)` element strides of the weights; one of the last
      two must be 1.
    num_groups: groups (experts) of the weights.
    a_rows: rows of a contiguous `a`, or None when its rows are gathered
      (then no `A_TMA`, and the act kernel's "auto" mode is "off").
    stride_am: row stride of `a`.
  """
  from jmoe.ops import _hidden_scratch  # pylint: disable=import-outside-toplevel
  from jmoe.ops._call import persistent_programs  # pylint: disable=import-outside-toplevel

  mode = gemm_tma_mode(kind, gathered=a_rows is None)
  available = backend == "interpret" or (
      backend == "triton" and _hidden_scratch.supported())
  sg, sk, sn = strides_b
  b_tma = (mode != "off" and available
           and (_tma_strides_ok(dtype, (sg, sk, sn)) or _tma_strides_ok(dtype, (sg, sn, sk))))
  flags: dict[str, Any] = {"B_TMA": b_tma, "NUM_GROUPS": num_groups if b_tma else 0}
  if kind != "act_bwd":
    a_tma = b_tma and a_rows is not None and _tma_strides_ok(dtype, (stride_am, 1))
    persistent = b_tma and mode == "persistent"
    flags.update(A_TMA=a_tma, ROWS_A=a_rows if a_tma else 0, PERSISTENT=persistent,
                 NUM_PROGRAMS=persistent_programs(backend) if persistent else 0)
  if kind == "plain":
    flags["FLATTEN"] = (flags["PERSISTENT"] and flags["A_TMA"]
                        and env_flag(GEMM_FLATTEN_ENV, True))
  return flags


def _max_programs(kernel: Any, tiles: dict[str, Any], n: int, num_tiles: int) -> int:
  """The most programs a launch of `kernel` (autotuned: any of its configs) has."""
  import triton  # pylint: disable=import-outside-toplevel

  configs = [c.kwargs for c in getattr(kernel, "configs", ())] or [tiles]
  return max(num_tiles * triton.cdiv(n, c["BLOCK_N"] * c.get("SPLIT_N", 1))
             for c in configs)


def _kernel_for(kind: str, autotune: bool, gated: bool):
  from jmoe.kernels import grouped_gemm as kernels  # pylint: disable=import-outside-toplevel

  if kind == "act_bwd" and autotune and not act_bwd_split_enabled():
    return kernels.grouped_gemm_act_bwd_unsplit_autotuned

  table = {
      "plain": (kernels._grouped_gemm_kernel, kernels.grouped_gemm_autotuned),
      "act": (
          kernels._grouped_gemm_act_kernel,
          kernels.grouped_gemm_act_gated_autotuned if gated
          else kernels.grouped_gemm_act_autotuned,
      ),
      "act_bwd": (
          kernels._grouped_gemm_act_bwd_kernel,
          kernels.grouped_gemm_act_bwd_autotuned,
      ),
  }
  return table[kind][1 if autotune else 0]


def gemm_call(
    kind: str,
    *args: Any,
    out_shape: Any,
    n: int,
    k: int,
    num_tiles: int,
    block_m: int,
    backend: str,
    name: str,
    gated: bool = False,
    zeroed_outputs=(),
    **flags: Any,
):
  """Launches one grouped GEMM kernel of `kind` with tiles for `(n, k)`.

  With `flags` from `tma_flags` that load by TMA, the launch carries Triton's
  hidden scratch (128 bytes per descriptor and program) on the GPU.

  Args:
    kind: `"plain"`, `"act"` or `"act_bwd"` (see `jmoe.kernels.grouped_gemm`).
    *args: the kernel's array inputs (outputs follow from `out_shape`).
    out_shape: `jax.ShapeDtypeStruct`(s) of the outputs.
    n: output columns (per half when gated); k: contraction size.
    num_tiles: static length of the tile schedule.
    block_m: rows per tile (must match the schedule).
    backend: `"triton"` or `"interpret"`.
    name: kernel name for profiles.
    gated: gated activation (two column halves per program).
    zeroed_outputs: outputs that start at zero.
    **flags: the kernel's other constexprs (sizes, strides, switches).
  """
  import triton  # pylint: disable=import-outside-toplevel

  from jmoe.ops._call import kernel_call  # pylint: disable=import-outside-toplevel

  autotune = autotuned_launch(kind, backend)
  kernel = _kernel_for(kind, autotune, gated)
  if autotune:
    tiles = {"BLOCK_M": block_m}
  else:
    tiles = default_config(kind, block_m, n, k, backend, gated,
                           a_tma=flags.get("A_TMA", False)).metaparams(kind)

  def grid(meta):
    return (num_tiles * triton.cdiv(n, meta["BLOCK_N"] * meta.get("SPLIT_N", 1)),)

  if flags.get("PERSISTENT"):
    grid = (flags["NUM_PROGRAMS"],)
  descriptors = int(flags.get("B_TMA", False)) + int(flags.get("A_TMA", False))
  scratch = {}
  if descriptors and backend == "triton":
    scratch = {"scratch_bytes_per_program": 128 * descriptors}
    if callable(grid):  # a static grid sizes the scratch itself
      scratch["scratch_programs"] = _max_programs(kernel, tiles, n, num_tiles)
  return kernel_call(
      kernel,
      *args,
      out_shape=out_shape,
      grid=grid,
      backend=backend,
      name=name,
      zeroed_outputs=zeroed_outputs,
      **scratch,
      **flags,
      **tiles,
  )


def grouped_gemm(
    a: jax.Array,
    b: jax.Array,
    tiles: jax.Array,
    *,
    n: int,
    k: int,
    rows: int,
    strides_b: tuple[int, int, int],
    block_m: int,
    out_dtype: Any,
    backend: str,
    row_index: jax.Array | None = None,
    row_scale: jax.Array | None = None,
    name: str = "jmoe_grouped_gemm",
) -> jax.Array:
  """`c[r] = row_scale[r] * a[row_index[r]] @ B[group(r)]` over a tile schedule.

  Args:
    a: `[rows_a, k]` (contiguous rows).
    b: the weights, read as `B[g][kk, nn] = b.flat[g*sg + kk*sk + nn*sn]`
      with `strides_b = (sg, sk, sn)` (in elements).
    tiles: `[3, num_tiles]` int32 from `jmoe.ops.align`, built with `block_m`.
    n, k: output columns and contraction size.
    rows: output rows.
    out_dtype: output dtype.
    row_index: optional `[rows]` int32 row of `a` for each output row
      (gathered in the kernel, or first copied: `sorted_rows`).
    row_scale: optional `[rows]` float32 factor applied in float32.

  Returns:
    `[rows, n]` of `out_dtype`.
  """
  a, row_index = sorted_rows(a, row_index, b.shape[0], backend)
  dummy_i = jnp.zeros((1,), jnp.int32)
  dummy_f = jnp.zeros((1,), jnp.float32)
  return gemm_call(
      "plain",
      a,
      b,
      tiles,
      dummy_i if row_index is None else row_index,
      dummy_f if row_scale is None else row_scale,
      out_shape=jax.ShapeDtypeStruct((rows, n), out_dtype),
      n=n,
      k=k,
      num_tiles=tiles.shape[1],
      block_m=block_m,
      backend=backend,
      name=name,
      N=n,
      K=k,
      NUM_TILES=tiles.shape[1],
      STRIDE_AM=a.shape[1],
      STRIDE_AK=1,
      STRIDE_BG=strides_b[0],
      STRIDE_BK=strides_b[1],
      STRIDE_BN=strides_b[2],
      STRIDE_CM=n,
      GATHER_A=row_index is not None,
      SCALE_ROWS=row_scale is not None,
      **dot_flags(a.dtype, backend),
      **tma_flags("plain", backend, a.dtype, strides_b, b.shape[0],
                  None if row_index is not None else a.shape[0], a.shape[1]),
  )


# ----------------------------------------------------------------------------
# grouped_matmul
# ----------------------------------------------------------------------------


def _check(lhs, rhs, group_sizes, preferred_element_type) -> None:
  if not hasattr(lhs, "ndim") or lhs.ndim != 2:
    raise ValueError(f"lhs must have shape [m, k], got {getattr(lhs, 'shape', lhs)}")
  if not hasattr(rhs, "ndim") or rhs.ndim != 3 or rhs.shape[1] != lhs.shape[1]:
    raise ValueError(
        f"rhs must have shape [g, k={lhs.shape[1]}, n], got "
        f"{getattr(rhs, 'shape', rhs)}"
    )
  if (not hasattr(group_sizes, "shape") or group_sizes.shape != (rhs.shape[0],)
      or not jnp.issubdtype(group_sizes.dtype, jnp.integer)):
    raise ValueError(
        f"group_sizes must be an int32 array of shape [g={rhs.shape[0]}], got "
        f"{getattr(group_sizes, 'shape', group_sizes)} "
        f"{getattr(group_sizes, 'dtype', '')}"
    )
  for name, x in (("lhs", lhs), ("rhs", rhs)):
    if not any(x.dtype == d for d in _DTYPES):
      raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
  if preferred_element_type is not None and not is_dtype(preferred_element_type, _DTYPES):
    raise TypeError(
        "preferred_element_type must be None, float32, bfloat16 or float16, got "
        f"{preferred_element_type!r}"
    )


def _forward(lhs, rhs, group_sizes, out_dtype, backend, transpose_rhs=False):
  m, k = lhs.shape
  g = rhs.shape[0]
  # rhs [g, k0, n0]; transposed it is read as [g, n0, k0].
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  if m == 0 or n == 0:
    return jnp.zeros((m, n), out_dtype)
  if k == 0:
    return jnp.zeros((m, n), out_dtype)
  block_m = block_m_for(m, g, backend)
  tiles = align_lib.tile_schedule(group_sizes, m, block_m)
  r1, r2 = rhs.shape[1], rhs.shape[2]
  strides = (r1 * r2, 1, r2) if transpose_rhs else (r1 * r2, r2, 1)
  return grouped_gemm(
      lhs, rhs, tiles, n=n, k=k, rows=m, strides_b=strides, block_m=block_m,
      out_dtype=out_dtype, backend=backend, name="jmoe_grouped_matmul",
  )


@functools.cache
def _grouped_matmul_fn(out_dtype: Any, backend: str):
  from jmoe.ops.tgmm import tgmm  # pylint: disable=import-outside-toplevel

  @jax.custom_vjp
  def op(lhs, rhs, group_sizes):
    return _forward(lhs, rhs, group_sizes, out_dtype, backend)

  def fwd(lhs, rhs, group_sizes):
    return op(lhs, rhs, group_sizes), (lhs, rhs, group_sizes)

  def bwd(res, d_out):
    lhs, rhs, group_sizes = res
    d_out = d_out.astype(lhs.dtype)
    d_lhs = _forward(d_out, rhs, group_sizes, lhs.dtype, backend, transpose_rhs=True)
    d_rhs = tgmm(lhs, d_out, group_sizes, out_dtype=rhs.dtype, backend=backend,
                 config=tgmm_config(backend, lhs.shape[0], group_sizes.shape[0]))
    return d_lhs, d_rhs, None

  op.defvjp(fwd, bwd)
  return _shard.varying_inputs(op)


def grouped_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    preferred_element_type=None,
    backend: str,
) -> jax.Array:
  """`out[i] = lhs[i] @ rhs[group(i)]`: `jax.lax.ragged_dot` in Triton.

  Example usage::

    out = grouped_matmul(lhs, rhs, group_sizes, backend="triton")  # [m, n]

  Args:
    lhs: `[m, k]` float32, bfloat16 or float16.
    rhs: `[g, k, n]` (cast to lhs's dtype if it differs).
    group_sizes: `[g]` int32; groups are contiguous from row 0, rows at or past
      `sum(group_sizes)` are zero (sizes past `m` are clipped).
    preferred_element_type: output dtype, default `lhs.dtype`; accumulation
      is float32.
    backend: `"triton"` or `"interpret"`.

  Returns:
    `[m, n]` in `preferred_element_type or lhs.dtype`.

  Raises:
    ValueError, TypeError: wrong shapes or dtypes (at trace time).
  """
  _check(lhs, rhs, group_sizes, preferred_element_type)
  if backend not in ("triton", "interpret"):
    raise ValueError(f"backend must be 'triton' or 'interpret', got {backend!r}")
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  rhs = rhs.astype(lhs.dtype)
  return _grouped_matmul_fn(out_dtype, backend)(
      lhs, rhs, group_sizes.astype(jnp.int32)
  )
