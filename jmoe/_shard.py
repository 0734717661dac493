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

Outside `shard_map` both are the identity.

Explicitly sharded inputs (`jax.sharding.AxisType.Explicit` meshes, jax 0.11's
`jax.make_mesh` default): `explicit_mesh` and `explicit_spec` read how `x` is
split. Under such a mesh the public `moe`, `route` and `expert_ffn` run on each
token shard (all tokens when `x` is not split) under `shard_map`
(`jmoe._token_shards`); `grouped_matmul`, whose rows are grouped
contiguously, and any feature axis split over devices raise at trace time.
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


def _explicit_axes(mesh) -> frozenset[str]:
  types = tuple(getattr(mesh, "axis_types", ()))
  return frozenset(name for name, kind in zip(getattr(mesh, "axis_names", ()), types)
                   if kind == jax.sharding.AxisType.Explicit)


def mesh_axes(spec) -> tuple[str, ...]:
  """The mesh axis names a `PartitionSpec` (or its entries) splits over, in order."""
  names = []
  for entry in spec:
    names += [n for n in (entry if isinstance(entry, tuple) else (entry,)) if n is not None]
  return tuple(names)


def spec_entries(x: jax.Array) -> tuple:
  """`x`'s `PartitionSpec` entries, one per axis (None where not split; all None
  without a sharding)."""
  spec = tuple(getattr(getattr(jax.typeof(x), "sharding", None), "spec", ()))
  return spec + (None,) * (x.ndim - len(spec))


def explicit_spec(x: jax.Array):
  """`x`'s `PartitionSpec` if it is split over an explicit mesh axis, else None
  (trace time; replicated, `Auto`-sharded and `shard_map`-local values give
  None)."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  explicit = _explicit_axes(getattr(sharding, "mesh", None))
  if explicit and any(name in explicit for name in mesh_axes(sharding.spec)):
    return sharding.spec
  return None


def explicit_mesh(x: jax.Array):
  """The mesh with explicit axes `x` is traced under, else None: its own
  sharding's, else the context's (`jax.set_mesh`), where jax's sharding
  inference would meet ops it has no rule for (`ragged_dot`, custom calls)."""
  mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
  if _explicit_axes(mesh):
    return mesh
  context = jax.sharding.get_abstract_mesh()
  return context if _explicit_axes(context) else None


def check_token_split(name: str, x: jax.Array, *, tokens_ok: bool) -> None:
  """Raises if `x [..., d]` is explicitly split over its feature axis `d`, or
  at all when not `tokens_ok` (trace time).

  Raises:
    ValueError: naming `name`, its sharding, and what to do instead.
  """
  spec = explicit_spec(x)
  if spec is None:
    return
  if spec_entries(x)[-1] is not None:
    raise ValueError(
        f"{name} is sharded over explicit mesh axes {spec} along its feature axis "
        f"(last axis, size {x.shape[-1]}); jmoe needs each token's features whole "
        "on a device: split only the leading (token) axes, e.g. "
        f"jax.sharding.reshard({name}, P('data', None))."
    )
  if not tokens_ok:
    raise ValueError(
        f"{name} is sharded over explicit mesh axes ({spec}); this op's rows are "
        "grouped contiguously over all devices and it does not split them. Call it "
        "inside jax.shard_map (rows split over the mesh, weights replicated; see "
        "the README's 'Sharding' section), or reshard the input to replicated."
    )


def varying_inputs(op):
  """`op` (a `custom_vjp` function of positional arguments) called on its
  arguments cast by `vary_together`."""

  def call(*args):
    return op(*vary_together(*args))

  return call
