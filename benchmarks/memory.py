"""Device memory of one timed step, two ways.

- `compiled_stats`: XLA's static plan of the compiled step
  (`jit(...).lower(...).compile().memory_analysis()`): arguments + outputs +
  temporaries - aliased. Cheap, available on every platform, but it does not see
  memory a custom call allocates for itself.
- `process_peak`: runs the step in a fresh Python process (so the allocator's
  high-water mark starts from zero) and reads
  `jax.devices()[0].memory_stats()["peak_bytes_in_use"]` after one call: the real
  peak, inputs included. GPU only (the CPU client keeps no statistics). The probe
  sets `JMOE_AUTOTUNE=0` (pinned tiles: same buffers, no autotuning runs).

`python -m benchmarks.memory --case deepseek --impl ref-einsum --mode fwdbwd`
prints the fresh-process measurement as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

import jax

_PROBE_TAG = "MEMORY_PROBE_JSON "


def compiled_stats(compiled) -> dict[str, int]:
  """XLA's memory plan of a compiled step (`jit(f).lower(...).compile()`), in bytes."""
  stats = compiled.memory_analysis()
  if stats is None:
    return {}
  out = {k: int(getattr(stats, f"{k}_size_in_bytes", 0) or 0)
         for k in ("argument", "output", "temp", "alias", "generated_code")}
  out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def process_peak(case_name: str, impl_name: str, mode: str, seed: int = 0,
                 timeout_s: float = 300) -> dict[str, Any]:
  """Peak device bytes of one step measured in a fresh process.

  Returns:
    `{"peak_bytes": int, "input_bytes": int}` or `{"error": str}`.
  """
  cmd = [sys.executable, "-m", "benchmarks.memory", "--case", case_name, "--impl",
         impl_name, "--mode", mode, "--seed", str(seed)]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  # Pinned kernel configs: the same buffers as autotuned ones, without compiling and
  # timing every candidate config in the probe.
  env = dict(os.environ, JMOE_AUTOTUNE="0")
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                          cwd=root, env=env, check=False)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout_s:.0f} s"}
  for line in proc.stdout.splitlines():
    if line.startswith(_PROBE_TAG):
      return json.loads(line[len(_PROBE_TAG):])
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
  return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}


def _probe(case_name: str, impl_name: str, mode: str, seed: int) -> dict[str, Any]:
  # pylint: disable=import-outside-toplevel
  from benchmarks import cases, implementations

  case = cases.CASES[case_name]
  impl = implementations.IMPLS[impl_name]
  x, params = cases.make_inputs(case, seed)
  args = [x, params]
  if mode == "fwdbwd":
    args.append(implementations.make_cotangent(case))
  step, _ = implementations.make_step(impl.make(case), mode)
  jax.block_until_ready(args)
  device = jax.devices()[0]
  before = device.memory_stats() or {}
  jax.block_until_ready(step(*args))
  after = device.memory_stats()
  if not after or "peak_bytes_in_use" not in after:
    return {"error": f"{device.platform} keeps no memory_stats"}
  input_bytes = sum(a.nbytes for a in jax.tree.leaves(args))
  return {"peak_bytes": int(after["peak_bytes_in_use"]),
          "input_bytes": int(input_bytes),
          "in_use_before": int(before.get("bytes_in_use", 0))}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--case", required=True)
  parser.add_argument("--impl", required=True)
  parser.add_argument("--mode", default="fwdbwd", choices=("fwd", "fwdbwd"))
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  result = _probe(args.case, args.impl, args.mode, args.seed)
  print(_PROBE_TAG + json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
