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
registered kernel is compiled without the last (extra) argument while
jax-triton still passes its buffer. Both depend on jax-triton's lowering and
jaxlib's parameter order, so they are enabled only for the pairs in
`SUPPORTED` (tested on the H100: `tests/test_ops_tgmm.py -m gpu -k tma`);
anything else raises instead of launching.
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

_SCRATCH_KERNELS: set[Any] = set()  # JITFunctions compiled with the scratch
_LOCK = threading.Lock()
_INSTALLED = False


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


def _install() -> None:
  global _INSTALLED  # pylint: disable=global-statement
  with _LOCK:
    if _INSTALLED:
      return
    from jax_triton import triton_lib  # pylint: disable=import-outside-toplevel

    original = triton_lib.get_or_create_triton_kernel

    @functools.wraps(original)
    def get_or_create_triton_kernel(backend_init_func, platform, fn, arg_dtypes,
                                    scalar_args, **kwargs):
      if fn not in _SCRATCH_KERNELS:
        return original(backend_init_func, platform, fn, arg_dtypes, scalar_args,
                        **kwargs)
      kernel, attrs = original(backend_init_func, platform, fn, arg_dtypes[:-1],
                               scalar_args, **kwargs)
      attrs = dict(attrs)
      # The extra buffer's parameter: an aligned pointer (XLA buffers are).
      attrs[(len(arg_dtypes) - 1,)] = [["tt.divisibility", 16]]
      return kernel, attrs

    triton_lib.get_or_create_triton_kernel = get_or_create_triton_kernel
    _INSTALLED = True


def prepare(kernel: Any, grid: Any, bytes_per_program: int) -> jax.ShapeDtypeStruct:
  """Registers `kernel` for the hidden-scratch launch; returns the extra output.

  Args:
    kernel: the `@triton.jit` kernel (possibly under heuristics / autotune).
    grid: the launch grid, a static int or tuple of ints.
    bytes_per_program: scratch bytes each program may use (Triton uses 128 per
      `tl.make_tensor_descriptor`); rounded up to 128.

  Returns:
    A `jax.ShapeDtypeStruct` (uint8, grid size x bytes) to append to the
    launch's `out_shape`, after the kernel's own outputs.

  Raises:
    RuntimeError: the installed jax-triton / jaxlib pair is not in `SUPPORTED`.
    ValueError: `grid` is not static.
  """
  if not supported():
    raise RuntimeError(
        "TMA kernels need Triton's hidden scratch argument, which jmoe passes "
        f"only with jax-triton / jaxlib in {sorted(SUPPORTED)}; installed "
        f"{versions()}. Use the plain-pointer kernel (e.g. JMOE_TGMM_KERNEL=plain)."
    )
  if callable(grid):
    raise ValueError("a hidden-scratch launch needs a static grid, got a callable")
  grid = (grid,) if isinstance(grid, int) else tuple(grid)
  _install()
  with _LOCK:
    _SCRATCH_KERNELS.add(_jit_function(kernel))
  per_program = -(-bytes_per_program // 128) * 128
  return jax.ShapeDtypeStruct((math.prod(grid) * per_program,), jnp.uint8)
