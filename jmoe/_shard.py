"""Typing jmoe's kernels and `custom_vjp` ops for `jax.shard_map`.

Inside `shard_map` (with `check_vma`, its default) every value's type records
the mesh axes it varies over ("vma"). jax's own primitives propagate it: an
output varies over every axis any input varies over, and an invariant input
used beside a varying one is cast to varying, whose transpose sums its
cotangent over those axes (the gradient of replicated weights is the sum of
the shards' contributions).

Neither `jax_triton.triton_call` nor `jax.pure_callback` does this, and a
`custom_vjp` must return cotangents typed like its inputs. So:

- `vary_like` types a kernel's outputs like its inputs (`jmoe.ops._call`);
- `vary_together` casts the inputs of a `custom_vjp` op to the axes any of
  them varies over before the call, as jax does for its primitives: the op's
  backward then returns varying cotangents throughout, and the transpose of
  the cast sums those of invariant inputs (weights) over the mesh axes.

Outside `shard_map` both are the identity. Explicitly sharded inputs
(`jax.sharding.AxisType.Explicit` meshes) are not supported: jmoe sorts and
gathers over all rows; `check_not_explicit` says so at trace time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax


def varying_axes(x: Any) -> frozenset[str]:
  """The `shard_map` mesh axes `x` varies over (its type's vma; jax 0.11 keeps
  them as `mat.varying`); empty outside `shard_map` and for non-arrays."""
  if x is None or not hasattr(x, "dtype"):
    return frozenset()
  aval = jax.typeof(x)
  if hasattr(aval, "vma"):
    return frozenset(aval.vma)
  return frozenset(getattr(getattr(aval, "mat", None), "varying", ()))


def _cast_to(x: Any, axes: frozenset[str]) -> Any:
  missing = tuple(sorted(axes - varying_axes(x)))
  if not missing:
    return x
  return jax.lax.pcast(x, missing, to="varying")


def vary_like(outs: Sequence[Any], inputs: Sequence[Any]) -> tuple[Any, ...]:
  """`outs` cast to vary over every axis any of `inputs` varies over."""
  axes = frozenset().union(*(varying_axes(a) for a in inputs))
  return tuple(_cast_to(out, axes) for out in outs)


def vary_together(*args: Any) -> tuple[Any, ...]:
  """`args` (arrays or None) cast to vary over the union of their axes."""
  return vary_like(args, args)


def check_not_explicit(name: str, x: jax.Array) -> None:
  """Raises if `x` is sharded over an explicit mesh axis (trace time).

  Raises:
    ValueError: naming `name`, its sharding, and what to do instead.
  """
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  explicit = jax.sharding.AxisType.Explicit
  if mesh is None or explicit not in tuple(getattr(mesh, "axis_types", ())):
    return
  spec = getattr(sharding, "spec", ())
  if any(entry is not None for entry in spec):
    raise ValueError(
        f"{name} is sharded over explicit mesh axes ({sharding.spec}); jmoe's "
        "ops sort and gather over all rows and do not support explicitly "
        "sharded inputs. Call them inside jax.shard_map (rows split over the "
        "mesh, expert weights replicated; see the README's 'Sharding' "
        "section), or reshard the input to replicated."
    )


def varying_inputs(op):
  """`op` (a `custom_vjp` function of positional arguments) called on its
  arguments cast by `vary_together`."""

  def call(*args):
    return op(*vary_together(*args))

  return call
