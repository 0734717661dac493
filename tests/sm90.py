"""Whether this host can build kernels for the H100 (sm_90) without a GPU.

The host-only sm_90 tests compile kernels with `triton.compile(...,
target=GPUTarget("cuda", 90, 128))`, which needs Triton's NVIDIA backend and
the `ptxas` it runs (and, to read register use from the cubin, `cuobjdump`),
but no GPU. Usage::

  sm90.require()                # skips the test where that toolchain is missing
  sm90.require(cuobjdump=True)  # ... or where there is no cuobjdump either
  compiled = triton.compile(...)  # unguarded: a build error fails the test
  subprocess.run([sm90.cuobjdump_path(), "-res-usage", path], ...)

The toolchain is checked once per process (the tools must run `--version`);
the builds themselves are never wrapped, so a kernel that no longer compiles
for sm_90 fails its test instead of skipping it.
"""

from __future__ import annotations

import functools
import shutil

import pytest


def _ptxas() -> str:
  """The `ptxas` Triton runs for sm_90 (`TRITON_PTXAS_PATH`, else its bundled
  copy), found the way `triton.backends.nvidia.compiler` finds it; raises
  where there is none or Triton has no NVIDIA backend."""
  # pylint: disable=import-outside-toplevel
  from triton.backends import backends
  from triton.backends.nvidia.compiler import get_ptxas

  if "nvidia" not in backends:
    raise RuntimeError(f"Triton has no NVIDIA backend (only {sorted(backends)})")
  return get_ptxas(90).path


@functools.cache
def cuobjdump_path() -> str | None:
  """The `cuobjdump` to read a cubin with: Triton's (`TRITON_CUOBJDUMP_PATH`,
  else its bundled copy), else one on PATH; None where none runs."""
  from triton import knobs  # pylint: disable=import-outside-toplevel

  try:
    return knobs.nvidia.cuobjdump.path
  except (RuntimeError, OSError):  # Triton's "Cannot find cuobjdump": try PATH
    tool = shutil.which("cuobjdump")
    return tool if tool and knobs.NvidiaTool.from_path(tool) else None


@functools.cache
def unavailable(cuobjdump: bool = False) -> str | None:
  """Why this host cannot build kernels for sm_90 (and, with `cuobjdump`, read
  their cubins), or None if it can."""
  try:
    _ptxas()
  except (ImportError, RuntimeError, OSError) as err:
    return f"no sm_90 toolchain: {type(err).__name__}: {err}"
  if cuobjdump and cuobjdump_path() is None:
    return "no cuobjdump to read the register use"
  return None


def require(cuobjdump: bool = False) -> None:
  """Skips the calling test where this host cannot build for sm_90 (see
  `unavailable`); otherwise returns, and the test's build errors fail it."""
  # A skip's report names the caller's line, not this one.
  __tracebackhide__ = True  # pylint: disable=unused-variable
  reason = unavailable(cuobjdump)
  if reason is not None:
    pytest.skip(f"cannot build for sm_90 here: {reason}")
