"""Host-only (no GPU) checks of the grouped GEMM kernels' sm_90 builds.

Each expert-FFN GEMM of the benchmark shapes (bf16, SwiGLU; `small`, `mixtral`,
`deepseek` of `benchmarks.cases`) is compiled for the H100 (`GPUTarget("cuda",
90, 128)`) with the config `jmoe.ops.grouped_matmul.default_config` gives it
when autotuning is off, the constexprs its launcher passes and the argument
hints jax-triton gives (16-byte aligned pointers; every other argument is a
constexpr):

  up       `_grouped_gemm_act_kernel`, gated (`WIDE`: gate and up as one N = 256
           tile), row gather, STORE_PRE, router
           weight scale SCALE_H (`jmoe.ops.expert_ffn.up_stage`)
  up_sorted, act_bwd_g_sorted  up and act_bwd_g on a copy of x (dy) sorted by
           slot (`JMOE_GATHER_ROWS=copy`): both operands by TMA, persistent
           (act_bwd_g_sorted in the FLATTEN loop, up_sorted nested)
  down     `_grouped_gemm_kernel`, no row scale (router scale "up"), bf16
           per-slot rows (`JMOE_SLOT_ROWS` default; `down_stage`)
  act_bwd_g  `_grouped_gemm_kernel`, dy rows gathered, down read transposed,
           bf16 out (the default two-pass `jmoe.ops.act_bwd.act_bwd_stage`)
  act_bwd  `_grouped_gemm_act_bwd_kernel`, gated, `SPLIT_N=2` default
           (`JMOE_ACT_BWD=fused`, `JMOE_ACT_BWD_SPLIT` unset)
  dx       `_grouped_gemm_kernel`, up weights read transposed, bf16 per-slot
           rows (`dx_stage`)

The TMA switches are those `gmm_lib.tma_flags` gives on the GPU by default
(`JMOE_GEMM_TMA=auto`: the plain kernel persistent with both operands by TMA
where `a` is not gathered (down, dx, the sorted stages), weights only for
act_bwd_g; up and act_bwd by cp.async). The PTX must feed `wgmma` from TMA tile loads
(`cp.async.bulk.tensor`) and 16-byte `cp.async` copies only, with no 2-byte
global loads; Triton's global scratch must fit what the launch provides (128
bytes per descriptor); shared memory must fit the H100's 227 KB, and `cuobjdump -res-usage` must show no stack (no
register spills). Skipped only where the host has no sm_90 toolchain
(`sm90.require`); a build error fails the test.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import tempfile
from unittest import mock

import pytest

import sm90
from benchmarks.cases import CASES
from jmoe.ops import align as align_lib
from jmoe.ops import grouped_matmul as gmm_lib

CASE_NAMES = ("small", "mixtral", "deepseek")
STAGES = ("up", "down", "act_bwd_g", "act_bwd", "dx", "up_sorted", "act_bwd_g_sorted")
BLOCK_M = 128
H100_SHARED = 232448  # bytes of shared memory per block (227 KB)

def _params():
  return [pytest.param(case, stage, id=f"{case}-{stage}")
          for case in CASE_NAMES for stage in STAGES]


H100_SMS = 132


def _tma_flags_h100(*args, **kwargs):
  """`gmm_lib.tma_flags` with the H100's SM count (this host has no GPU)."""
  with mock.patch("jmoe.ops._call.persistent_programs", lambda backend: H100_SMS):
    return gmm_lib.tma_flags(*args, **kwargs)


def _launch(case_name: str, stage: str):
  """`(kernel, pointer types, constexprs, GemmConfig, kind)` of one launch, as
  `jmoe.ops.expert_ffn` makes it for the case (bf16, SwiGLU)."""
  # pylint: disable=import-outside-toplevel,protected-access
  from jmoe.kernels import grouped_gemm as kernels

  case = CASES[case_name]
  assert case.activation == "swiglu" and case.dtype == "bfloat16"
  t, d, f, e, top_k = case.tokens, case.d_model, case.d_ff, case.experts, case.top_k
  tk, pf = t * top_k, 2 * f
  assert gmm_lib.block_m_for(tk, e, "triton") == BLOCK_M
  num_tiles = align_lib.num_tiles(tk, e, BLOCK_M)
  dot = {"DOT_F32": False, "INPUT_PRECISION": "ieee"}
  tma = functools.partial(_tma_flags_h100, backend="triton", dtype="bfloat16")
  plain_sig = {"a_ptr": "*bf16", "b_ptr": "*bf16", "tiles_ptr": "*i32",
               "row_index_ptr": "*i32", "row_scale_ptr": "*fp32", "c_ptr": "*fp32"}
  if stage in ("up", "up_sorted"):
    sorted_rows = stage == "up_sorted"
    cfg = gmm_lib.default_config("act", BLOCK_M, f, d, "triton", gated=True,
                                 a_tma=sorted_rows)
    sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "tiles_ptr": "*i32",
           "row_index_ptr": "*i32", "row_scale_ptr": "*fp32", "h_ptr": "*bf16",
           "pre_ptr": "*bf16"}
    flags = tma("act", num_groups=e, strides_b=(d * pf, pf, 1),
                a_rows=tk if sorted_rows else None, stride_am=d)
    const = dict(F=f, K=d, NUM_TILES=num_tiles, STRIDE_XM=d, STRIDE_WG=d * pf,
                 STRIDE_WK=pf, STRIDE_WN=1, ACTIVATION="silu", GATED=True,
                 STORE_PRE=True, SCALE_H=True, GATHER_A=not sorted_rows,
                 WIDE=gmm_lib.act_wide(True, f, flags["B_TMA"]), **dot, **flags)
    return kernels._grouped_gemm_act_kernel, sig, const, cfg, "act"
  if stage == "down":
    cfg = gmm_lib.default_config("plain", BLOCK_M, d, f, "triton")
    const = dict(N=d, K=f, NUM_TILES=num_tiles, STRIDE_AM=f, STRIDE_AK=1,
                 STRIDE_BG=f * d, STRIDE_BK=d, STRIDE_BN=1, STRIDE_CM=d,
                 GATHER_A=False, SCALE_ROWS=False, **dot,
                 **tma("plain", num_groups=e, strides_b=(f * d, d, 1), a_rows=tk, stride_am=f))
    return kernels._grouped_gemm_kernel, {**plain_sig, "c_ptr": "*bf16"}, const, cfg, "plain"
  if stage == "dx":
    cfg = gmm_lib.default_config("plain", BLOCK_M, d, pf, "triton")
    const = dict(N=d, K=pf, NUM_TILES=num_tiles, STRIDE_AM=pf, STRIDE_AK=1,
                 STRIDE_BG=d * pf, STRIDE_BK=1, STRIDE_BN=pf, STRIDE_CM=d,
                 GATHER_A=False, SCALE_ROWS=False, **dot,
                 **tma("plain", num_groups=e, strides_b=(d * pf, 1, pf), a_rows=tk, stride_am=pf))
    return kernels._grouped_gemm_kernel, {**plain_sig, "c_ptr": "*bf16"}, const, cfg, "plain"
  if stage in ("act_bwd_g", "act_bwd_g_sorted"):
    sorted_rows = stage == "act_bwd_g_sorted"
    cfg = gmm_lib.default_config("plain", BLOCK_M, f, d, "triton")
    const = dict(N=f, K=d, NUM_TILES=num_tiles, STRIDE_AM=d, STRIDE_AK=1,
                 STRIDE_BG=f * d, STRIDE_BK=1, STRIDE_BN=d, STRIDE_CM=f,
                 GATHER_A=not sorted_rows, SCALE_ROWS=False, **dot,
                 **tma("plain", num_groups=e, strides_b=(f * d, 1, d),
                       a_rows=tk if sorted_rows else None, stride_am=d))
    return kernels._grouped_gemm_kernel, {**plain_sig, "c_ptr": "*bf16"}, const, cfg, "plain"
  assert stage == "act_bwd"
  cfg = gmm_lib.default_config("act_bwd", BLOCK_M, f, d, "triton", gated=True)
  sig = {"dy_ptr": "*bf16", "w_ptr": "*bf16", "tiles_ptr": "*i32",
         "row_index_ptr": "*i32", "row_scale_ptr": "*fp32", "pre_ptr": "*bf16",
         "dpre_ptr": "*bf16", "dwp_ptr": "*fp32"}
  const = dict(F=f, K=d, NUM_TILES=num_tiles, STRIDE_DYM=d, STRIDE_WG=f * d,
               STRIDE_WK=1, STRIDE_WN=d, DWP_COLS=-(-f // cfg.block_n),
               ACTIVATION="silu", GATED=True, **dot,
               **tma("act_bwd", num_groups=e, strides_b=(f * d, 1, d), a_rows=None, stride_am=d))
  return kernels._grouped_gemm_act_bwd_kernel, sig, const, cfg, "act_bwd"


@functools.cache
def _build(case_name: str, stage: str) -> dict:
  """The sm_90 build of one launch: PTX, shared bytes and `cuobjdump` usage.

  Cached per process; callers unset `JMOE_ACT_BWD_SPLIT` first (`sm90_build`)."""
  # pylint: disable=import-outside-toplevel
  import triton
  from triton.backends.compiler import GPUTarget
  from triton.compiler import ASTSource

  fn, sig, const, cfg, kind = _launch(case_name, stage)
  meta = cfg.metaparams(kind)
  options = {"num_warps": meta.pop("num_warps"), "num_stages": meta.pop("num_stages")}
  full_sig = {name: sig.get(name, "constexpr") for name in fn.arg_names}
  assert set(full_sig) - set(sig) == set(const) | set(meta), "constexprs"
  attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
           if name in sig}
  compiled = triton.compile(
      ASTSource(fn, full_sig, constexprs={**const, **meta}, attrs=attrs),
      target=GPUTarget("cuda", 90, 128), options=options,
  )
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, f"{stage}.cubin")
    with open(path, "wb") as fh:
      fh.write(compiled.asm["cubin"])
    out = subprocess.run([sm90.cuobjdump_path(), "-res-usage", path],
                         capture_output=True, text=True, check=True).stdout
  res = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out)}
  return {"ptx": compiled.asm["ptx"], "ttgir": compiled.asm["ttgir"],
          "shared": compiled.metadata.shared,
          "res": res, "cfg": cfg, "const": const,
          "scratch": compiled.metadata.global_scratch_size}


@pytest.fixture
def sm90_build(monkeypatch):
  """`build(case, stage)` with the default (non-autotuned) configs."""
  monkeypatch.delenv(gmm_lib.ACT_BWD_SPLIT_ENV, raising=False)
  sm90.require(cuobjdump=True)
  return _build


@pytest.mark.parametrize("case,stage", _params())
def test_sm90_default_build_ptx(sm90_build, case, stage):
  """wgmma fed by TMA tile loads (weights; `a` where it is not gathered) and
  16-byte cp.async copies (gathered `a` rows), no 2-byte global loads, the
  global scratch within 128 bytes per descriptor, and shared memory within the
  H100's 227 KB."""
  b = sm90_build(case, stage)
  ptx, const = b["ptx"], b["const"]
  assert const["B_TMA"] == (stage not in ("up", "act_bwd")), const
  assert const.get("A_TMA", False) == (stage in ("down", "dx") or "sorted" in stage)
  assert "wgmma.mma_async" in ptx, f"no wgmma ({b['cfg']})"
  # The gathered gated up GEMM (`WIDE`): one N = 256 wgmma for gate and up.
  assert const.get("WIDE", False) == (stage == "up"), const
  if const.get("WIDE"):
    assert "wgmma.mma_async.sync.aligned.m64n256k16" in ptx, "WIDE: no N = 256 wgmma"
  tma = re.search(r"cp\.async\.bulk\.tensor\.[23]d\.shared::cluster\.global", ptx)
  assert bool(tma) == const["B_TMA"], "TMA loads"
  copies = re.findall(r"cp\.async\.cg\.shared\.global \[[^]]*\], \[[^]]*\], (\w+)",
                      ptx)
  if const.get("A_TMA"):
    assert not copies, f"cp.async copies {set(copies)} with both operands by TMA"
  else:
    assert copies and set(copies) == {"0x10"}, f"cp.async sizes {set(copies)}"
  descriptors = int(const["B_TMA"]) + int(const.get("A_TMA", False))
  assert b["scratch"] <= 128 * descriptors, f"{b['scratch']} B global scratch"
  assert (b["scratch"] > 0) == (descriptors > 0)
  assert not re.search(r"ld\.global(\.\w+)*\.b16", ptx), "2-byte global loads"
  assert "st.local" not in ptx
  assert b["shared"] <= H100_SHARED, f"{b['shared']} bytes of shared memory"


@pytest.mark.parametrize("case,stage", _params())
def test_sm90_default_build_no_spills(sm90_build, case, stage):
  """`cuobjdump -res-usage`: no stack and no local memory (no register spills)."""
  b = sm90_build(case, stage)
  res = b["res"]
  assert res["STACK"] == 0 and res.get("LOCAL", 0) == 0, (
      f"spills: {res}, {b['shared']} B shared, {b['cfg']}"
  )


def _dot_loop_depth(ttgir: str) -> int:
  """How many `scf.for` loops enclose the first `warp_group_dot` of a TTGIR dump
  (MLIR closes a region with `}` at the indentation of the op that opened it)."""
  open_loops: list[int] = []
  for line in ttgir.splitlines():
    indent = len(line) - len(line.lstrip())
    if line.lstrip().startswith("}") and open_loops and open_loops[-1] == indent:
      open_loops.pop()
    elif "scf.for" in line and line.rstrip().endswith("{"):
      open_loops.append(indent)
    elif "warp_group_dot " in line:
      return len(open_loops)
  raise AssertionError("no warp_group_dot in the TTGIR")


@pytest.mark.parametrize("case", CASE_NAMES)
def test_sm90_flattened_plain_loop(sm90_build, monkeypatch, case):
  """down, dx and act_bwd_g on a sorted copy (`JMOE_GATHER_ROWS=copy`; persistent,
  both operands by TMA) take `FLATTEN`, and Triton fuses their item and K loops
  into one loop (it silently keeps them nested when the K loop's length
  depends on the item); the up GEMM on a sorted copy stays nested (measured
  faster); `JMOE_GEMM_FLATTEN=0` keeps them nested."""
  for stage in ("down", "dx", "act_bwd_g_sorted"):
    b = sm90_build(case, stage)
    assert b["const"]["FLATTEN"], stage
    assert _dot_loop_depth(b["ttgir"]) == 1, f"{case} {stage}: loops not fused"
  b = sm90_build(case, "up_sorted")
  assert b["const"]["PERSISTENT"] and "FLATTEN" not in b["const"]
  assert _dot_loop_depth(b["ttgir"]) == 2
  monkeypatch.setenv(gmm_lib.GEMM_FLATTEN_ENV, "0")
  _build.cache_clear()
  try:
    b = _build(case, "down")
    assert not b["const"]["FLATTEN"] and _dot_loop_depth(b["ttgir"]) == 2
  finally:
    _build.cache_clear()
