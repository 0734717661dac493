"""The only place where jmoe launches a Triton kernel.

`kernel_call` mirrors `jax_triton.triton_call`; `backend` picks where the
kernel runs: `"triton"` compiles it for the GPU through jax-triton, and
`"interpret"` runs the same `@triton.jit` function under Triton's interpreter
on the host (`jmoe.interpret`). Every launch is wrapped in
`jax.custom_batching.sequential_vmap`, so all ops built on it support
`jax.vmap` (as a loop over the batch).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jmoe import _shard

KERNEL_BACKENDS = ("triton", "interpret")

_Scalar = (bool, int, float, np.float32)


def persistent_programs(backend: str) -> int:
  """Programs of a persistent kernel: one per SM of the first GPU (3 when
  interpreting, so that tests see programs walk several work items)."""
  if backend == "interpret":
    return 3
  return int(jax.devices("gpu")[0].core_count)


def _is_scalar(arg: Any) -> bool:
  return isinstance(arg, _Scalar)


def kernel_call(
    kernel: Any,
    *args: Any,
    out_shape: jax.ShapeDtypeStruct | Sequence[jax.ShapeDtypeStruct],
    grid: int | tuple[int, ...] | Callable[[dict[str, Any]], tuple[int, ...]],
    backend: str,
    name: str = "",
    zeroed_outputs: Sequence[int] | Callable[[dict[str, Any]], Sequence[int]] = (),
    scratch_bytes_per_program: int = 0,
    scratch_programs: int | None = None,
    **metaparams: Any,
) -> jax.Array | tuple[jax.Array, ...]:
  """Launches a Triton kernel on JAX arrays, like `jax_triton.triton_call`.

  The kernel's parameters are, in order: `args` (arrays become pointers,
  python `bool`/`int`/`float` scalars are passed by value), then one pointer
  per output in `out_shape`, then the constexpr `metaparams` by keyword.

  Example usage::

    out = kernel_call(
        _add_kernel, x, y, x.size,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=lambda meta: (triton.cdiv(x.size, meta["BLOCK"]),),
        backend="interpret", BLOCK=128)

  Args:
    kernel: a `@triton.jit` function, possibly wrapped in `triton.autotune`
      (then pass `grid` as a callable of the chosen metaparameters) or
      `triton.heuristics`.
    *args: the kernel's inputs: JAX arrays and python scalars.
    out_shape: a `jax.ShapeDtypeStruct` (returns one array) or a sequence of
      them (returns a tuple).
    grid: the launch grid, a tuple of up to 3 ints or a callable
      `meta -> tuple` of the metaparameters (with the autotune config's).
    backend: `"triton"` (GPU, via `jax_triton`) or `"interpret"` (Triton's
      interpreter on the host, inside `jax.pure_callback`).
    name: a name for profiles.
    zeroed_outputs: indices of outputs that must start at zero. With
      `"interpret"`, every other output starts poisoned (NaN, or a large
      integer), so unwritten elements show.
    scratch_bytes_per_program: for kernels that build device-side TMA
      descriptors (`tl.make_tensor_descriptor`): bytes of Triton's hidden
      global-scratch argument per program (128 per descriptor). With
      `"triton"` this needs the jax-triton / jaxlib pair of
      `jmoe.ops._hidden_scratch` (else a `RuntimeError`); the interpreter
      needs no scratch.
    scratch_programs: with `scratch_bytes_per_program` and a callable `grid`:
      the most programs any configuration launches (sizes the scratch).
    **metaparams: constexpr kernel parameters, and `triton_call` launch
      options (`num_warps`, `num_stages`, ...; ignored when interpreting).

  Returns:
    The outputs, one array per entry of `out_shape`.

  Raises:
    ValueError: unknown `backend`, or a malformed `out_shape`.
  """
  if backend not in KERNEL_BACKENDS:
    raise ValueError(
        f"backend must be one of {KERNEL_BACKENDS} for a kernel launch, got "
        f"{backend!r} (resolve 'auto' with jmoe._backend.resolve_backend first)"
    )
  single = hasattr(out_shape, "shape") and hasattr(out_shape, "dtype")
  out_shapes = (out_shape,) if single else tuple(out_shape)
  for o in out_shapes:
    if not (hasattr(o, "shape") and hasattr(o, "dtype")):
      raise ValueError(
          "out_shape must be a jax.ShapeDtypeStruct or a sequence of them, got "
          f"an element {o!r}"
      )
  out_shapes = tuple(jax.ShapeDtypeStruct(o.shape, o.dtype) for o in out_shapes)

  array_pos = [i for i, a in enumerate(args) if not _is_scalar(a)]
  scalars = {i: a for i, a in enumerate(args) if _is_scalar(a)}

  def merge(arrays: Sequence[Any]) -> list[Any]:
    full = [scalars.get(i) for i in range(len(args))]
    for pos, array in zip(array_pos, arrays):
      full[pos] = array
    return full

  if backend == "triton":
    extra_outputs = ()
    if scratch_bytes_per_program:
      from jmoe.ops import _hidden_scratch  # pylint: disable=import-outside-toplevel

      extra_outputs = (_hidden_scratch.prepare(
          kernel, grid, scratch_bytes_per_program, scratch_programs),)

    def launch(*arrays):
      import jax_triton  # pylint: disable=import-outside-toplevel
      import triton  # pylint: disable=import-outside-toplevel

      launched = kernel
      if isinstance(kernel, triton.runtime.Autotuner):
        # jax-triton 0.3.1 replaces `early_config_prune` of the autotuner it
        # lowers with a wrapper that prunes by this call's explicit
        # metaparameters and then calls the previous one, so a second call
        # with other metaparameters would find no config. Each launch gets
        # its own shallow copy (compiled kernels are cached by JITFunction).
        launched = copy.copy(kernel)
      outs = tuple(
          jax_triton.triton_call(
              *merge(arrays),
              kernel=launched,
              out_shape=out_shapes + extra_outputs,
              grid=grid,
              name=name,
              zeroed_outputs=zeroed_outputs,
              **metaparams,
          )
      )
      return outs[:len(out_shapes)]

  else:
    from jmoe import interpret  # pylint: disable=import-outside-toplevel

    def launch(*arrays):
      full = [float(a) if isinstance(a, np.float32) else a for a in merge(arrays)]
      return tuple(
          interpret.interpret_call(
              kernel,
              *full,
              out_shape=out_shapes,
              grid=grid,
              zeroed_outputs=zeroed_outputs,
              name=name,
              **metaparams,
          )
      )

  arrays = [args[i] for i in array_pos]
  outs = jax.custom_batching.sequential_vmap(launch)(*arrays)
  # Typed for shard_map like jax's primitives: varying where any input varies.
  outs = _shard.vary_like(outs, arrays)
  return outs[0] if single else outs
