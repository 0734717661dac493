"""Gluon kernels through jax-triton 0.3.1.

jax-triton 0.3.1 compiles every kernel as a `@triton.jit` function: it builds
the module with `triton.compiler.code_generator.ast_to_ttir` on a plain
`ASTSource` and runs the TTIR -> TTGIR passes (`make_ttir`, `make_ttgir`). A
`@gluon.jit` kernel needs Gluon's source (`GluonASTSource.make_ir`, which sets
the module's target and warp-count attributes before code generation: Gluon's
layouts are checked against them) and Gluon's one TTGIR stage
(`CUDABackend.gluon_to_ttgir`); from the TTGIR on (`make_llir`, `make_ptx`)
both languages share the path, and jaxlib launches the PTX the same way.

`install` wraps `jax_triton.triton_lib.get_or_create_triton_kernel` so that,
for a Gluon kernel only (`JITFunction.is_gluon()`), the two jax-triton module
globals it calls (`code_gen.ast_to_ttir`, `compile_ttir_inplace`) take those
Gluon steps; every other kernel compiles as before. The choice is a
thread-local flag set around the call, so concurrent compilations of Triton
kernels are unaffected. jaxlib launches the warp count of the `TritonKernel`
that jax-triton builds from the requested `num_warps`; a `gl.warp_specialize`
kernel runs more warps (its workers': `ttg.total-num-warps`, which `make_llir`
writes into the metadata), so for those the wrapper returns a `TritonKernel`
built with the total instead.

Like `jmoe.ops._hidden_scratch`, this depends on jax-triton's lowering, so it
is enabled only for the version pairs in `_hidden_scratch.SUPPORTED` (tested
on the H100: `tests/test_ops_tgmm.py -m gpu -k gluon`); `install` raises
otherwise.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

_LOCK = threading.Lock()
_INSTALLED = False
_GLUON = threading.local()  # .active: a Gluon kernel is being compiled
# id(jax-triton's TritonKernel) -> (it, the same kernel launching all its warps)
_WARP_SPECIALIZED: dict[int, tuple[Any, Any]] = {}


def is_gluon(fn: Any) -> bool:
  """Whether `fn` (under heuristics / autotune wrappers) is a `@gluon.jit`."""
  from jmoe.ops._hidden_scratch import _jit_function  # pylint: disable=import-outside-toplevel

  return bool(getattr(_jit_function(fn), "is_gluon", lambda: False)())


def _active() -> bool:
  return getattr(_GLUON, "active", False)


def _gluon_module(fn, src, options, codegen_fns, context, module_map):
  """The Gluon kernel's TTGIR-level module (before Gluon's passes)."""
  from triton.backends.compiler import GPUTarget  # pylint: disable=import-outside-toplevel
  from triton.experimental.gluon._runtime import GluonASTSource  # pylint: disable=import-outside-toplevel

  capability = int("".join(c for c in options.arch if c.isdigit()))
  gluon_src = GluonASTSource(fn, src.signature, src.constants, src.attrs)
  return gluon_src.make_ir(GPUTarget("cuda", capability, 32), options,
                           codegen_fns, module_map, context)


def install() -> None:
  """Teaches jax-triton's `get_or_create_triton_kernel` to compile Gluon kernels.

  Raises:
    RuntimeError: the installed jax-triton / jaxlib pair is not one whose
      lowering was tested (`jmoe.ops._hidden_scratch.SUPPORTED`).
  """
  global _INSTALLED  # pylint: disable=global-statement
  from jmoe.ops import _hidden_scratch  # pylint: disable=import-outside-toplevel

  if not _hidden_scratch.supported():
    raise RuntimeError(
        "Gluon kernels launch through jax-triton's lowering, which jmoe patches "
        f"only for jax-triton / jaxlib in {sorted(_hidden_scratch.SUPPORTED)}; "
        f"installed {_hidden_scratch.versions()}. Use the Triton kernels "
        "(JMOE_TGMM_KERNEL=tma or plain).")
  with _LOCK:
    if _INSTALLED:
      return
    from jax_triton import triton_lib  # pylint: disable=import-outside-toplevel

    original_get = triton_lib.get_or_create_triton_kernel
    original_codegen = triton_lib.code_gen
    original_compile = triton_lib.compile_ttir_inplace

    class _CodeGen:
      """`triton.compiler.code_generator` with a Gluon-aware `ast_to_ttir`."""

      def __getattr__(self, name):
        return getattr(original_codegen, name)

      @staticmethod
      def ast_to_ttir(fn, src, *, options, codegen_fns, context, module_map):
        if not _active():
          return original_codegen.ast_to_ttir(
              fn, src, options=options, codegen_fns=codegen_fns, context=context,
              module_map=module_map)
        return _gluon_module(fn, src, options, codegen_fns, context, module_map)

    def compile_ttir_inplace(module, backend, options, compute_capability, platform):
      if not _active():
        return original_compile(module, backend, options, compute_capability, platform)
      if platform != "cuda":
        raise ValueError(f"jmoe's Gluon kernels are CUDA-only, got platform {platform!r}")
      metadata: dict[str, Any] = {}
      ttgir = backend.gluon_to_ttgir(module, metadata, options, compute_capability)
      llir = backend.make_llir(ttgir, metadata, options, compute_capability)
      ptx = backend.make_ptx(llir, metadata, options, compute_capability)
      _GLUON.compiled = (metadata["name"], metadata["num_warps"], metadata["shared"], ptx)
      return triton_lib.CompilationResult(
          binary=ptx, name=metadata["name"], shared_mem_bytes=metadata["shared"],
          ttgir=None, llir=None)

    @functools.wraps(original_get)
    def get_or_create_triton_kernel(backend_init_func, platform, fn, *args, **kwargs):
      if not is_gluon(fn):
        return original_get(backend_init_func, platform, fn, *args, **kwargs)
      _GLUON.active = True
      _GLUON.compiled = None
      try:
        kernel, attrs = original_get(backend_init_func, platform, fn, *args, **kwargs)
        compiled = _GLUON.compiled  # None: jax-triton's cache had the kernel
      finally:
        _GLUON.active = False
      if compiled is not None and compiled[1] != (kwargs["num_warps"] or 4):
        name, total_warps, shared, ptx = compiled
        capability = kwargs["compute_capability"]
        if capability is None:
          capability = triton_lib.triton_kernel_call_lib.get_compute_capability(0)
        _WARP_SPECIALIZED[id(kernel)] = (kernel, triton_lib.triton_kernel_call_lib.TritonKernel(
            name, total_warps, kwargs["num_ctas"], shared, ptx, "", capability))
      if id(kernel) in _WARP_SPECIALIZED:
        return _WARP_SPECIALIZED[id(kernel)][1], attrs
      return kernel, attrs

    triton_lib.code_gen = _CodeGen()
    triton_lib.compile_ttir_inplace = compile_ttir_inplace
    triton_lib.get_or_create_triton_kernel = get_or_create_triton_kernel
    _INSTALLED = True
