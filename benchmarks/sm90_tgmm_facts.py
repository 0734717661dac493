"""Host-only (no GPU) facts about the tgmm kernel's sm_90 build, per config.

Builds `jmoe.kernels.tgmm._tgmm_kernel` for the H100 (`GPUTarget("cuda", 90,
128)`) with the argument hints jax-triton 0.3.1 gives (16-byte aligned pointers,
no hints on scalars), for the autotuner's bf16 configs and the MoE dW_down call
in both row-scale modes, and prints a markdown table: registers and stack
(`cuobjdump -res-usage`), static SASS counts (16-byte cp.async, 16-byte register
loads, STS/LDSM, HGMMA), wgmma waits (PTX) and where wgmma's A operand comes
from. Usage::

  PYTHONPATH=$PWD python benchmarks/sm90_tgmm_facts.py [--ka 1408 --n 2048]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from jmoe.kernels import tgmm as kernels

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def build(cfg, flags, ka, n, out_type="*bf16", a_columns=False):
  """The sm_90 build of `_tgmm_kernel` for `(HAS_A_INDEX, HAS_B_INDEX, HAS_SCALE)`,
  bf16 operands, output pointer type `out_type`, `a` as rows or (`a_columns`)
  columns (also used by tests/test_ops_tgmm.py)."""
  sig = {"a_ptr": "*bf16", "b_ptr": "*bf16", "group_offsets_ptr": "*i32",
         "a_row_index_ptr": "*i32", "b_row_index_ptr": "*i32",
         "row_scale_ptr": "*fp32", "a_col_offsets_ptr": "*i32", "M": "i32",
         "KA_Q": "i32", "N_Q": "i32", "MA_Q": "i32", "out_ptr": out_type}
  const = dict(
      A_COLUMNS=a_columns, OUT_TRANSPOSED=False, HAS_A_INDEX=flags[0], HAS_B_INDEX=flags[1], HAS_SCALE=flags[2],
      DOT_F32=False, INPUT_PRECISION="ieee",
      KA_MULT=kernels.stride_multiple(ka), N_MULT=kernels.stride_multiple(n),
      EVEN_K=ka % cfg.kwargs["BLOCK_K"] == 0, EVEN_N=n % cfg.kwargs["BLOCK_N"] == 0,
      **cfg.kwargs)
  return _compile_sm90(kernels._tgmm_kernel, sig, const, cfg.num_warps, cfg.num_stages)  # pylint: disable=protected-access


def _pointer_hints(sig):
  """jax-triton's argument hints: every pointer 16-byte aligned (none on scalars)."""
  pointers = [i for i, t in enumerate(sig.values()) if t.startswith("*")]
  return {(i,): [["tt.divisibility", 16]] for i in pointers}


def _compile_sm90(fn, sig, const, num_warps, num_stages):
  """`fn` built for the H100 with the argument types `sig`, the constexprs
  `const` (added to the signature) and jax-triton's hints."""
  sig = {**sig, **{k: "constexpr" for k in const}}
  return triton.compile(
      ASTSource(fn, sig, constexprs=const, attrs=_pointer_hints(sig)),
      target=GPUTarget("cuda", 90, 128),
      options={"num_warps": num_warps, "num_stages": num_stages})


def build_tma(config, a_rows=False, transpose=False, programs=132):
  """The sm_90 build of the persistent TMA tgmm (`jmoe.kernels.tgmm_tma`) for a
  `jmoe.ops.tgmm.TgmmConfig`, bf16 operands and output, its default switches
  (`jmoe.ops.tgmm.TmaOptions`), `a` as columns or (`a_rows`) rows, with
  jax-triton's hints (also used by tests/test_ops_tgmm.py)."""
  from jmoe.kernels import tgmm_tma  # pylint: disable=import-outside-toplevel
  from jmoe.ops.tgmm import TmaOptions  # pylint: disable=import-outside-toplevel

  options = TmaOptions()
  sig = {"a_ptr": "*bf16", "b_ptr": "*bf16", "group_offsets_ptr": "*i32",
         "a_col_offsets_ptr": "*i32", "G": "i32", "MB": "i32", "KA_Q": "i32",
         "N_Q": "i32", "MA_Q": "i32", "out_ptr": "*bf16"}
  const = dict(OUT_TRANSPOSED=transpose, A_ROWS=a_rows, B_BOUNDED=options.b_bounded,
               TMA_STORE=options.tma_store, DOT_F32=False, INPUT_PRECISION="ieee",
               NUM_PROGRAMS=programs, FLATTEN=options.flatten, **config.metaparams())
  return _compile_sm90(tgmm_tma._tgmm_tma_kernel, sig, const, config.num_warps,  # pylint: disable=protected-access
                       config.num_stages)


def build_gluon(config, ka, n, transpose=False, programs=132, ws=False):
  """The sm_90 build of the Gluon tgmm (`jmoe.kernels.tgmm_gluon`) for a
  `jmoe.ops.tgmm.TgmmConfig`, bf16 operands and output, with jax-triton's
  hints (also used by tests/test_ops_tgmm.py); `ws`: the warp-specialised
  kernel. `ka`, `n` only document the call: the kernel takes its sizes at run
  time."""
  del ka, n
  from triton.experimental.gluon._runtime import GluonASTSource  # pylint: disable=import-outside-toplevel

  from jmoe.kernels import tgmm_gluon  # pylint: disable=import-outside-toplevel

  fn = tgmm_gluon._tgmm_gluon_ws_kernel if ws else tgmm_gluon._tgmm_gluon_kernel  # pylint: disable=protected-access
  sig = {"a_ptr": "*bf16", "b_ptr": "*bf16", "group_offsets_ptr": "*i32",
         "a_col_offsets_ptr": "*i32", "G": "i32", "MB": "i32", "KA_Q": "i32",
         "N_Q": "i32", "MA_Q": "i32", "out_ptr": "*bf16"}
  const = dict(OUT_TRANSPOSED=transpose, NUM_PROGRAMS=programs,
               NUM_BUFFERS=config.num_stages, **config.metaparams())
  sig.update({k: "constexpr" for k in const})
  constexprs = {(fn.arg_names.index(k),): v for k, v in const.items()}
  return triton.compile(GluonASTSource(fn, sig, constexprs, _pointer_hints(sig)),
                        target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": config.num_warps})


def facts(compiled) -> dict:
  ptx = compiled.asm["ptx"]
  with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
    f.write(compiled.asm["cubin"])
  try:
    def tool(flag):
      return subprocess.run([os.path.join(_BIN, "cuobjdump"), flag, f.name],
                            capture_output=True, text=True, check=True).stdout
    sass, res = tool("-sass"), tool("-res-usage")
  finally:
    os.unlink(f.name)

  def count(pattern):
    return len(re.findall(pattern, sass))

  hgmma = re.findall(r"HGMMA\.\w+\.F32\.\w+ R\d+, (\S+?),", sass)
  return {
      "regs": int(re.search(r"REG:(\d+)", res).group(1)),
      "stack": int(re.search(r"STACK:(\d+)", res).group(1)),
      "local ld/st": count(r"\b(?:LDL|STL)\b"),
      "smem B": compiled.metadata.shared,
      "LDGSTS.128": count(r"LDGSTS\.E\.BYPASS(?:\.LTC128B)?\.128"),
      "LDG.128": count(r"LDG\.E\.128"),
      "STS": count(r"\bSTS"),
      "LDSM": count(r"\bLDSM"),
      "HGMMA": count(r"\bHGMMA"),
      "wgmma waits": ", ".join(sorted(set(
          re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx)))),
      "HGMMA A operand": "smem (gdesc)" if all(o.startswith("gdesc") for o in hgmma)
                         else "registers",
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--ka", type=int, default=1408)
  parser.add_argument("--n", type=int, default=2048)
  args = parser.parse_args(argv)
  paths = (
      ("dW_down, row_scale_mode=kernel", (False, True, True)),
      ("dW_down, row_scale_mode=prescale", (False, True, False)),
      ("dW_up (a gathered)", (True, False, False)),
  )
  header = None
  for cfg in kernels.TGMM_CONFIGS:
    c = cfg.kwargs
    name = (f"{c['BLOCK_M']}x{c['BLOCK_K']}x{c['BLOCK_N']} "
            f"w{cfg.num_warps} s{cfg.num_stages}")
    for path, flags in paths:
      row = facts(build(cfg, flags, args.ka, args.n))
      if header is None:
        header = list(row)
        print("| config | call | " + " | ".join(header) + " |")
        print("|---" * (len(header) + 2) + "|")
      print(f"| {name} | {path} | " + " | ".join(str(row[k]) for k in header) + " |",
            flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
