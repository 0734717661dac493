"""Triton's hidden global-scratch argument through jax-triton 0.3.1.

A Triton 3.6 kernel that builds TMA descriptors on the device
(`tl.make_tensor_descriptor`) writes them into a hidden pointer argument,
`global_scratch`, which Triton's own launcher allocates (grid x
`global_scratch_size` bytes) and jaxlib's Triton custom call fills with a null
pointer (the launch then fails with `CUDA_ERROR_ILLEGAL_ADDRESS`). jaxlib
builds the kernel parameters as: one per Triton argument (arrays take the next
XLA buffer), then the hidden pointers. So an extra XLA output buffer whose
parameter comes right after the kernel's own arguments, but which is *not*
part of the compiled signature, lands in the `global_scratch` slot.

`prepare` registers the kernel and returns that extra output's shape;
`_install` wraps `jax_triton.triton_lib.get_or_create_triton_kernel` so that a
registered kernel launched with one more array than it has parameters is
compiled without that last (extra) argument while jax-triton still passes its
buffer (launches of the same kernel without the extra buffer compile as
usual), and checks that the compiled kernel's scratch size
(`ttg.global_scratch_memory_size`) fits the bytes per program given to
`prepare`. Both depend on jax-triton's lowering and jaxlib's parameter order,
so they are enabled only for the pairs in `SUPPORTED` (tested on the H100:
`tests/test_ops_tgmm.py -m gpu -k tma`, `tests/test_ops_grouped_matmul.py -m
gpu`); anything else raises instead of launching.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
import threading
from typing import Any

import jax
import jax.numpy as jnp

# (jax-triton, jaxlib) versions whose lowering / parameter order was tested.
SUPPORTED = frozenset({("0.3.1", "0.11.2")})

# JITFunction -> the largest scratch bytes per program any launch provides.
_SCRATCH_KERNELS: dict[Any, int] = {}
_LOCK = threading.Lock()
_INSTALLED = False
_COMPILING = threading.local()  # .budget: bytes per program of the kernel being built


def versions() -> tuple[str, str]:
  """The installed `(jax-triton, jaxlib)` versions ("" if not installed)."""

  def version(name):
    try:
      return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      return ""

  return version("jax-triton"), version("jaxlib")


@functools.cache
def supported() -> bool:
  """Whether the installed jax-triton / jaxlib pair is one of `SUPPORTED`."""
  return versions() in SUPPORTED


def _jit_function(kernel: Any) -> Any:
  """The `triton.JITFunction` under `triton.heuristics` / `triton.autotune`."""
  import triton  # pylint: disable=import-outside-toplevel

  while not isinstance(kernel, triton.JITFunction):
    kernel = kernel.fn
  return kernel


def _num_parameters(fn: Any) -> int:
  """Parameters of a JITFunction that are not constexprs (arrays and scalars)."""
  return len(fn.arg_names) - len(fn.constexprs)


def _check_scratch_size(metadata: dict[str, Any]) -> None:
  budget = getattr(_COMPILING, "budget", None)
  need = metadata.get("global_scratch_size", 0)
  if budget is not None and need > budget:
    # A ValueError: jax-triton re-raises RuntimeErrors of this pass as
    # "TTGIR->LLIR pass failed!".
    raise ValueError(
        f"kernel {metadata.get('name', '?')} needs {need} bytes of Triton global "
        f"scratch per program, more than the {budget} its launch provides "
        "(raise scratch_bytes_per_program)"
    )


def _install() -> None:
  global _INSTALLED  # pylint: disable=global-statement
  with _LOCK:
    if _INSTALLED:
      return
    from jax_triton import triton_lib  # pylint: disable=import-outside-toplevel
    from triton.backends.nvidia import compiler  # pylint: disable=import-outside-toplevel

    original = triton_lib.get_or_create_triton_kernel
    original_make_llir = compiler.CUDABackend.make_llir

    @functools.wraps(original_make_llir)
    def make_llir(self, src, metadata, *args, **kwargs):
      out = original_make_llir(self, src, metadata, *args, **kwargs)
      _check_scratch_size(metadata)
      return out

    @functools.wraps(original)
    def get_or_create_triton_kernel(backend_init_func, platform, fn, arg_dtypes,
                                    scalar_args, **kwargs):
      budget = _SCRATCH_KERNELS.get(fn)
      if budget is None or len(arg_dtypes) != _num_parameters(fn) + 1:
        return original(backend_init_func, platform, fn, arg_dtypes, scalar_args,
                        **kwargs)
      _COMPILING.budget = budget
      try:
        kernel, attrs = original(backend_init_func, platform, fn, arg_dtypes[:-1],
                                 scalar_args, **kwargs)
      finally:
        _COMPILING.budget = None
      attrs = dict(attrs)
      # The extra buffer's parameter: an aligned pointer (XLA buffers are).
      attrs[(len(arg_dtypes) - 1,)] = [["tt.divisibility", 16]]
      return kernel, attrs

    compiler.CUDABackend.make_llir = make_llir
    triton_lib.get_or_create_triton_kernel = get_or_create_triton_kernel
    _INSTALLED = True


def prepare(kernel: Any, grid: Any, bytes_per_program: int,
            max_programs: int | None = None) -> jax.ShapeDtypeStruct:
  """Registers `kernel` for the hidden-scratch launch; returns the extra output.

  Args:
    kernel: the `@triton.jit` kernel (possibly under heuristics / autotune).
    grid: the launch grid, a static int or tuple of ints, or a callable of the
      metaparameters (then `max_programs` is required).
    bytes_per_program: scratch bytes each program may use (Triton uses 128 per
      `tl.make_tensor_descriptor`); rounded up to 128. A compiled kernel that
      needs more raises a `ValueError` naming both sizes.
    max_programs: with a callable `grid`, the most programs any of its
      configurations launches.

  Returns:
    A `jax.ShapeDtypeStruct` (uint8, programs x bytes) to append to the
    launch's `out_shape`, after the kernel's own outputs.

  Raises:
    RuntimeError: the installed jax-triton / jaxlib pair is not in `SUPPORTED`.
    ValueError: a callable `grid` without `max_programs`.
  """
  if not supported():
    raise RuntimeError(
        "TMA kernels need Triton's hidden scratch argument, which jmoe passes "
        f"only with jax-triton / jaxlib in {sorted(SUPPORTED)}; installed "
        f"{versions()}. Use the plain-pointer kernels (JMOE_TGMM_KERNEL=plain, "
        "JMOE_GEMM_TMA=off)."
    )
  if callable(grid):
    if max_programs is None:
      raise ValueError(
          "a hidden-scratch launch with a callable grid needs max_programs (the "
          "most programs any configuration launches)")
    programs = max_programs
  else:
    programs = math.prod((grid,) if isinstance(grid, int) else tuple(grid))
  _install()
  per_program = -(-bytes_per_program // 128) * 128
  fn = _jit_function(kernel)
  with _LOCK:
    _SCRATCH_KERNELS[fn] = max(_SCRATCH_KERNELS.get(fn, 0), per_program)
  return jax.ShapeDtypeStruct((max(1, programs) * per_program,), jnp.uint8)
