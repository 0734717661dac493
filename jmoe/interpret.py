"""Runs jmoe's `@triton.jit` kernels under Triton's interpreter, on the CPU.

This is the `backend="interpret"` launch path of `jmoe.ops._call.kernel_call`:
the very same kernel object that `jax_triton.triton_call` compiles for the GPU
is executed program by program by `triton.runtime.interpreter`, inside a
`jax.pure_callback`, so it works eagerly and under `jax.jit` on any machine
with `triton` installed (no GPU, no `TRITON_INTERPRET=1` needed at import).

Numpy buffers reach the interpreter through `_HostTensor`, a zero-copy adapter
with the handful of `torch.Tensor` methods the interpreter calls. Outputs start
poisoned (NaN for floats, `POISON_INT` for integers) unless listed in
`zeroed_outputs`, so an element a kernel forgets to write is visible.

Known limit of Triton 3.6's interpreter: `tl.dot` on bf16/fp16 operands gives
wrong results; kernels take a constexpr that upcasts dot operands to float32
when interpreting.
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

# Integer outputs not in `zeroed_outputs` start at this value (clipped to the
# dtype's range): large, positive, and easy to spot in a failing test.
POISON_INT = 0x7EADBEEF

# The interpreter patches `triton.language` globally while a kernel runs, and
# XLA may run host callbacks from several threads: one kernel at a time.
_LOCK = threading.RLock()

# Launch options of `jax_triton.triton_call` that mean nothing to the
# interpreter.
_GPU_ONLY_OPTIONS = frozenset(
    ("num_warps", "num_stages", "num_ctas", "compute_capability",
     "enable_fp_fusion", "debug", "serialized_metadata",
     "custom_call_target_name")
)


def poison_value(dtype: Any) -> Any:
  """The value outputs of `dtype` start with before an interpreted kernel."""
  dtype = np.dtype(dtype)
  if dtype == np.bool_:
    return True
  if np.issubdtype(dtype, np.integer):
    return min(POISON_INT, int(np.iinfo(dtype).max))
  return np.nan


class _HostTensor:
  """A zero-copy view of a C-contiguous numpy array, shaped like a torch.Tensor.

  Triton's interpreter (`GridExecutor`) "copies" tensor arguments to the host
  with `untyped_storage().cpu()`, `new_empty(0)` and `set_(storage, ...)`,
  turns them into raw pointers with `data_ptr()`, and copies results back with
  `copy_`. Here the storage is the array itself, so all of that is a no-op and
  the kernel reads and writes the numpy memory directly.
  """

  __slots__ = ("array",)

  def __init__(self, array: np.ndarray):
    self.array = array

  @property
  def dtype(self) -> str:
    # `triton.runtime.jit.mangle_type` maps str(dtype) to a pointer type:
    # "float32" -> "*fp32", "bfloat16" -> "*bf16", "int32" -> "*i32", ...
    if self.array.dtype == np.bool_:
      return "int1"
    return str(self.array.dtype)

  def data_ptr(self) -> int:
    return self.array.ctypes.data

  def untyped_storage(self) -> _HostTensor:
    return self

  def cpu(self) -> _HostTensor:
    return self

  def new_empty(self, *size, device=None, dtype=None) -> _HostTensor:
    del size, device, dtype
    return _HostTensor(self.array[:0].reshape(0))

  def set_(self, storage, storage_offset=0, size=None, stride=None) -> _HostTensor:
    del storage_offset, size, stride  # The storage is the whole, unsliced array.
    self.array = storage.array
    return self

  def storage_offset(self) -> int:
    return 0

  def size(self, dim=None):
    return self.array.shape if dim is None else self.array.shape[dim]

  def stride(self, dim=None):
    strides = tuple(s // self.array.itemsize for s in self.array.strides)
    return strides if dim is None else strides[dim]

  def copy_(self, other) -> _HostTensor:
    if other.array is not self.array:
      np.copyto(self.array, other.array)
    return self


def _host_buffer(array: Any, seen_ptrs: set[int]) -> np.ndarray:
  """A C-contiguous numpy array whose data pointer no other argument has.

  The interpreter keys its host copies by data pointer; distinct pointers keep
  two arguments (e.g. two empty arrays, or one array passed twice) apart.
  """
  array = np.asarray(array)
  ptr = array.ctypes.data
  if not array.flags.c_contiguous or array.size == 0 or ptr in seen_ptrs:
    fresh = np.empty(max(array.size, 1), array.dtype)[: array.size]
    fresh = fresh.reshape(array.shape)
    np.copyto(fresh, array)
    array = fresh
  seen_ptrs.add(array.ctypes.data)
  return array


@functools.cache
def _interpreted(fn: Callable) -> Any:
  # pylint: disable-next=import-outside-toplevel
  from triton.runtime.interpreter import InterpretedFunction

  return InterpretedFunction(fn)


def _interpreted_device_call(self, *args, **kwargs):
  """Stands in for `JITFunction.__call__`: a kernel calling a `@triton.jit` helper
  (including `tl.sum`, `tl.max`, ... of `triton.language.standard`).

  `triton.language` is already patched for the whole launch (`_patch_language`),
  so the helper's rewritten function is called directly: re-patching the
  language on every helper call (what `InterpretedFunction.__call__` does)
  costs ~2.5 ms each and dominated the run time.
  """
  return _interpreted(self.fn).rewrite()(*args, **kwargs)


def _patch_language():
  """Patches `triton.language` and `triton.language.core` for the interpreter.

  Returns the scope to `restore()` afterwards. The `GridExecutor` patches the
  modules the kernel's own globals see again on top of this and undoes that
  first (last in, first out), so after `restore()` nothing stays patched.
  """
  # pylint: disable=import-outside-toplevel
  import types

  import triton.language as tl
  from triton.runtime import interpreter

  try:
    # Triton imports Gluon's language lazily, from inside a launch (argument
    # specialisation), and Gluon binds `triton.language.core.static_range` and
    # friends at import: imported while they are patched, it keeps the
    # interpreter's stand-ins for good, and every later Gluon build fails
    # ("Only `range` and `static_range` iterators are currently supported").
    # Importing it first, unpatched, keeps it whole.
    import triton.experimental.gluon.language  # noqa: F401
  except ImportError:  # a Triton without Gluon
    pass
  anchor = types.FunctionType(
      (lambda: None).__code__, {"tl": tl, "core": tl.core}, "_anchor"
  )
  return interpreter._patch_lang(anchor)  # pylint: disable=protected-access


def _normalize_grid(grid, meta: Mapping[str, Any]) -> tuple[int, ...]:
  if callable(grid):
    grid = grid(dict(meta))
  if isinstance(grid, (int, np.integer)):
    grid = (grid,)
  grid = tuple(int(g) for g in grid)
  if not 1 <= len(grid) <= 3:
    raise ValueError(f"grid must have 1 to 3 dimensions, got {grid}")
  return grid


def resolve_kernel(
    kernel: Any, named_args: Mapping[str, Any], metaparams: Mapping[str, Any]
) -> tuple[Callable, dict[str, Any]]:
  """Unwraps `triton.autotune` / `triton.heuristics` the way jax-triton does.

  An autotuned kernel runs with the first of its configs that agrees with the
  metaparameters passed explicitly (those win); heuristics are evaluated on
  `named_args` (arrays as `jax.ShapeDtypeStruct`, scalars as python values).

  Returns:
    The kernel's python function and the full dict of constexpr metaparameters.
  """
  import triton  # pylint: disable=import-outside-toplevel

  autotuner = triton.runtime.Autotuner
  heuristics = triton.runtime.Heuristics
  meta = dict(metaparams)
  if isinstance(kernel, autotuner):
    configs = [
        c for c in kernel.configs
        if all(c.kwargs.get(k, v) == v for k, v in metaparams.items())
    ]
    if not configs:
      raise ValueError(
          f"no autotune config of {kernel.fn} agrees with the metaparameters "
          f"{dict(metaparams)}; configs: {[c.kwargs for c in kernel.configs]}"
      )
    meta = {**configs[0].kwargs, **meta}
    kernel = kernel.fn
  if isinstance(kernel, heuristics):
    for name, heuristic in kernel.values.items():
      meta[name] = heuristic({**named_args, **meta})
    kernel = kernel.fn
  if isinstance(kernel, autotuner):
    return resolve_kernel(kernel, named_args, meta)
  if not isinstance(kernel, triton.JITFunction):
    raise TypeError(
        "kernel must be a @triton.jit function, possibly wrapped in "
        f"triton.autotune / triton.heuristics, got {type(kernel).__name__}"
    )
  return kernel.fn, meta


def run_kernel(
    fn: Callable,
    args: Sequence[Any],
    outputs: Sequence[np.ndarray],
    grid: tuple[int, ...],
    meta: Mapping[str, Any],
) -> None:
  """Runs kernel function `fn` over `grid` in the interpreter, writing `outputs`.

  Args:
    fn: the python function of a `@triton.jit` kernel.
    args: numpy arrays (passed as pointers) and python scalars, in order.
    outputs: writable C-contiguous numpy arrays, one pointer each after `args`.
    grid: the launch grid.
    meta: constexpr metaparameters, by keyword.
  """
  import triton  # pylint: disable=import-outside-toplevel

  seen: set[int] = set()
  host_args = [
      _HostTensor(_host_buffer(a, seen)) if isinstance(a, np.ndarray) else a
      for a in args
  ]
  host_outs = []
  for out in outputs:
    if out.ctypes.data in seen or not out.flags.c_contiguous:
      raise AssertionError("outputs must be C-contiguous and distinct buffers")
    seen.add(out.ctypes.data)
    host_outs.append(_HostTensor(out))
  with _LOCK:
    jit_function = triton.JITFunction
    previous_call = jit_function.__call__
    jit_function.__call__ = _interpreted_device_call
    scope = _patch_language()
    try:
      with warnings.catch_warnings():
        # The interpreter turns scalar arguments into 1-element arrays and
        # `range(0, n, BLOCK)` calls `int()` on them (NumPy 1.25+ warns).
        warnings.filterwarnings(
            "ignore", "Conversion of an array with ndim > 0 to a scalar",
            DeprecationWarning,
        )
        _interpreted(fn)[grid](*host_args, *host_outs, **meta)
    finally:
      scope.restore()
      jit_function.__call__ = previous_call


def interpret_call(
    kernel: Any,
    *args: Any,
    out_shape: Sequence[jax.ShapeDtypeStruct],
    grid: Any,
    zeroed_outputs: Sequence[int] | Callable = (),
    input_output_aliases: Mapping[int, int] | None = None,
    name: str = "",
    **metaparams: Any,
) -> tuple[jax.Array, ...]:
  """`jax_triton.triton_call` for the interpreter: the kernel runs on the host.

  Args:
    kernel: a `@triton.jit` kernel, possibly autotuned or with heuristics.
    *args: JAX arrays (pointers) and python `bool`/`int`/`float` scalars, in
      the kernel's parameter order.
    out_shape: one `jax.ShapeDtypeStruct` per output pointer.
    grid: a tuple (or int), or a callable `meta -> tuple`.
    zeroed_outputs: indices of outputs that start at zero (the rest start
      poisoned), or a callable `meta -> indices`.
    input_output_aliases: `{input index: output index}`: that output starts as
      a copy of that input (index among the array arguments, as jax-triton).
    name: unused (kept for parity with `triton_call`).
    **metaparams: constexpr parameters; GPU launch options (`num_warps`, ...)
      are accepted and ignored.

  Returns:
    A tuple with one array per entry of `out_shape`.
  """
  del name
  metaparams = {
      k: v for k, v in metaparams.items() if k not in _GPU_ONLY_OPTIONS
  }
  input_output_aliases = dict(input_output_aliases or {})
  out_shape = tuple(jax.ShapeDtypeStruct(o.shape, o.dtype) for o in out_shape)
  array_pos = [
      i for i, a in enumerate(args) if not isinstance(a, (bool, int, float))
  ]
  arg_names = _arg_names(kernel)
  abstract_args = [
      jax.ShapeDtypeStruct(np.shape(a), a.dtype) if i in array_pos else a
      for i, a in enumerate(args)
  ] + list(out_shape)
  named_args = dict(zip(arg_names, abstract_args))
  fn, meta = resolve_kernel(kernel, named_args, metaparams)
  grid = _normalize_grid(grid, meta)
  zeroed = zeroed_outputs(meta) if callable(zeroed_outputs) else zeroed_outputs
  zeroed = frozenset(int(i) for i in zeroed)
  for i in zeroed:
    if not 0 <= i < len(out_shape):
      raise ValueError(f"zeroed_outputs has index {i}, but {len(out_shape)} outputs")
  aliased = {o: i for i, o in input_output_aliases.items()}
  scalars = {i: a for i, a in enumerate(args) if i not in array_pos}

  def callback(*arrays):
    full_args = list(scalars.get(i) for i in range(len(args)))
    for pos, array in zip(array_pos, arrays):
      full_args[pos] = np.asarray(array)
    outputs = []
    for j, spec in enumerate(out_shape):
      # One spare element: every output gets its own, non-null data pointer.
      buf = np.empty(max(int(np.prod(spec.shape)), 1), spec.dtype)
      out = buf[: int(np.prod(spec.shape))].reshape(spec.shape)
      if j in aliased:
        np.copyto(out, np.asarray(arrays[aliased[j]]))
      elif j in zeroed:
        out[...] = 0
      else:
        out[...] = poison_value(spec.dtype)
      outputs.append(out)
    if int(np.prod(grid)) > 0:
      run_kernel(fn, full_args, outputs, grid, meta)
    return tuple(outputs)

  return jax.pure_callback(
      callback,
      out_shape,
      *(args[i] for i in array_pos),
      vmap_method="sequential",
  )


def _arg_names(kernel: Any) -> list[str]:
  while not hasattr(kernel, "arg_names") and hasattr(kernel, "fn"):
    kernel = kernel.fn
  return list(kernel.arg_names)
