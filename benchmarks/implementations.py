"""The MoE implementations the benchmark compares, and the timed step of each mode.

Every implementation is a function `forward(x [t, d], params) -> (y [t, d], MoEAux)`
with the same routing (softmax top-k, renormalised) and activation:

- `jmoe`: `jmoe.moe(..., backend="triton")` on a CUDA GPU (`"interpret"`, Triton's
  interpreter, on the CPU); dropless.
- `ref-einsum`: `jmoe.reference.moe(..., dispatch="one_hot")`, GShard/Switch one-hot
  dispatch and combine einsums with capacity factor 1.25 (copies over capacity
  are dropped). As the oracle it is written in: `precision=HIGHEST` and a float32
  combine einsum.
- `ref-einsum-bf16`: the same one-hot algorithm as it is usually written for speed
  (T5X/Flaxformer): dispatch and combine tensors in the input dtype, default
  precision, float32 accumulation.
- `ref-sorted`: `jmoe.reference.moe(..., dispatch="sorted")`, dropless: argsort by
  expert, `jax.lax.ragged_dot` up and down, weighted scatter back.
- `tokamax`: the sorted form with `tokamax.ragged_dot` (only where `import tokamax`
  works; its Mosaic GPU kernel on a GPU, `tokamax_implementation`). The lent H100
  has no network: `benchmarks/offline/` carries it there.

Modes: `"fwd"` times `forward`; `"fwdbwd"` times `jax.value_and_grad` of
`sum(y * dy) + 1e-2 * load_balancing_loss + 1e-3 * router_z_loss` with respect to
`x` and all three parameter arrays (`dy` a fixed random `[t, d]` cotangent).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from collections.abc import Callable

import jax
import jax.numpy as jnp

import jmoe
from jmoe import reference
from jmoe.reference import routing as routing_lib

from benchmarks.cases import EINSUM_CAPACITY_FACTOR, Case

LOAD_BALANCING_WEIGHT = 1e-2
Z_LOSS_WEIGHT = 1e-3

Forward = Callable[[jax.Array, jmoe.MoEParams], tuple[jax.Array, jmoe.MoEAux]]


@dataclasses.dataclass(frozen=True)
class Impl:
  """One implementation.

  Attributes:
    name: short name (command line, results).
    description: one line for the report.
    dropless: False where copies over capacity are dropped (different output).
    make: `make(case) -> forward`.
    unavailable: `() -> None` if it can run here, else the reason it cannot.
  """

  name: str
  description: str
  dropless: bool
  make: Callable[[Case], Forward]
  unavailable: Callable[[], str | None]


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def jmoe_backend() -> str:
  """The jmoe backend benchmarked here: "triton" on a GPU, else "interpret"."""
  return "triton" if on_gpu() else "interpret"


def _jmoe_unavailable() -> str | None:
  from jmoe import _backend  # pylint: disable=import-outside-toplevel

  if on_gpu():
    return _backend.triton_unavailable_reason()
  if importlib.util.find_spec("triton") is None:
    return "the 'triton' package (needed by backend='interpret') is not installed"
  return None


def _make_jmoe(case: Case) -> Forward:
  backend = jmoe_backend()

  def forward(x, params):
    return jmoe.moe(x, params, top_k=case.top_k, activation=case.activation,
                    backend=backend)

  return forward


def _make_ref_einsum(case: Case) -> Forward:
  def forward(x, params):
    return reference.moe(x, params, top_k=case.top_k, activation=case.activation,
                         capacity_factor=EINSUM_CAPACITY_FACTOR, dispatch="one_hot")

  return forward


def _make_ref_sorted(case: Case) -> Forward:
  def forward(x, params):
    return reference.moe(x, params, top_k=case.top_k, activation=case.activation,
                         dispatch="sorted")

  return forward


def einsum_bf16_moe(x, params, *, top_k, activation, capacity_factor):
  """One-hot (GShard) MoE with dispatch/combine in `x.dtype` at default precision.

  Args:
    x: `[t, d]`.
    params: `MoEParams`.
    top_k, activation, capacity_factor: as `jmoe.reference.moe`.

  Returns:
    `(y [t, d] x.dtype, MoEAux)`; equals `jmoe.reference.moe(..., dispatch="one_hot")`
    up to rounding the `[e, c, d]` expert outputs and combine weights to `x.dtype`.
  """
  t = x.shape[0]
  e = params.up_kernel.shape[0]
  capacity = routing_lib.compute_capacity(t, top_k, e, capacity_factor)
  routing = reference.route(x, params.router_kernel, top_k=top_k,
                            capacity_factor=capacity_factor)
  positions = routing_lib.capacity_positions(routing.expert_ids, routing.probs,
                                             "token_order")
  dispatch, combine = reference.one_hot_dispatch(
      routing.expert_ids, routing.kept, positions, routing.weights, e, capacity)
  f32 = jnp.float32
  x_expert = jnp.einsum("tec,td->ecd", dispatch.astype(x.dtype), x)
  h = jnp.einsum("ecd,edf->ecf", x_expert, params.up_kernel, preferred_element_type=f32)
  h = reference.apply_activation(h, activation).astype(x.dtype)
  out = jnp.einsum("ecf,efd->ecd", h, params.down_kernel, preferred_element_type=f32)
  y = jnp.einsum("tec,ecd->td", combine.astype(x.dtype), out.astype(x.dtype),
                 preferred_element_type=f32)
  return y.astype(x.dtype), reference.aux_from_routing(routing)


def _make_einsum_bf16(case: Case) -> Forward:
  def forward(x, params):
    return einsum_bf16_moe(x, params, top_k=case.top_k, activation=case.activation,
                           capacity_factor=EINSUM_CAPACITY_FACTOR)

  return forward


def sorted_moe(x, params, *, top_k, activation, ragged_dot):
  """Dropless sorted MoE with a pluggable grouped matmul.

  Args:
    x: `[t, d]`.
    params: `MoEParams`.
    top_k, activation: as `jmoe.reference.moe`.
    ragged_dot: `(lhs [m, k], rhs [g, k, n], group_sizes [g], *,
      preferred_element_type) -> [m, n]`, e.g. `jax.lax.ragged_dot`.

  Returns:
    `(y [t, d] x.dtype, MoEAux)`, the computation of the dropless reference.
  """
  e = params.up_kernel.shape[0]
  routing = reference.route(x, params.router_kernel, top_k=top_k)
  order, group_sizes = reference.sort_by_expert(routing.expert_ids, routing.kept, e)
  h = ragged_dot(x[order // top_k], params.up_kernel, group_sizes,
                 preferred_element_type=jnp.float32)
  h = reference.apply_activation(h, activation).astype(x.dtype)
  out = ragged_dot(h, params.down_kernel, group_sizes,
                   preferred_element_type=jnp.float32)
  y = reference.combine_sorted(out, order, routing.weights, x.dtype)
  return y, reference.aux_from_routing(routing)


def _tokamax_unavailable() -> str | None:
  try:
    importlib.import_module("tokamax")
  except Exception as e:  # noqa: BLE001  (any import failure means "skip")
    return f"'import tokamax' failed ({type(e).__name__}: {e})"
  return None


def tokamax_implementation() -> str | None:
  """The `tokamax.ragged_dot` implementation benchmarked: `"mosaic"` (its Pallas
  Mosaic GPU kernel, default config) on a GPU, pinned so that a failure is an
  error rather than tokamax's silent fallback to Triton or XLA; None (tokamax's
  own choice: XLA) elsewhere."""
  return "mosaic" if on_gpu() else None


def _make_tokamax(case: Case) -> Forward:
  tokamax = importlib.import_module("tokamax")
  impl = tokamax_implementation()

  def ragged_dot(lhs, rhs, group_sizes, *, preferred_element_type):
    # Products in the operands' dtype (float32 accumulation inside the kernel),
    # upcast after: tokamax 0.0.17's VJP passes the cotangent on in the output's
    # dtype and its Mosaic GPU kernel then refuses float32 x bfloat16 operands
    # ("lhs and rhs must have same dtype", seen on the H100, 2026-11-24).
    out = tokamax.ragged_dot(lhs, rhs, group_sizes, implementation=impl)
    return out.astype(preferred_element_type)

  def forward(x, params):
    return sorted_moe(x, params, top_k=case.top_k, activation=case.activation,
                      ragged_dot=ragged_dot)

  return forward


IMPLS: dict[str, Impl] = {i.name: i for i in (
    Impl("jmoe", "jmoe.moe, Triton kernels (interpreter on CPU), dropless", True,
         _make_jmoe, _jmoe_unavailable),
    Impl("ref-einsum",
         "jmoe.reference one-hot dispatch/combine einsums, capacity 1.25, HIGHEST, "
         "f32 combine", False, _make_ref_einsum, lambda: None),
    Impl("ref-einsum-bf16",
         "one-hot dispatch/combine einsums in bf16 (T5X style), capacity 1.25", False,
         _make_einsum_bf16, lambda: None),
    Impl("ref-sorted", "jmoe.reference sorted: argsort + lax.ragged_dot + scatter, "
         "dropless", True, _make_ref_sorted, lambda: None),
    Impl("tokamax", "sorted form with tokamax.ragged_dot (implementation \"mosaic\" "
         "on a GPU, default config), dropless", True,
         _make_tokamax, _tokamax_unavailable),
)}
# The dropless implementation every other one's output is checked against.
ORACLE = "ref-sorted"


def loss_fn(forward: Forward) -> Callable:
  """`(x, params, dy) -> scalar`: `sum(y * dy)` plus the weighted aux losses."""

  def loss(x, params, dy):
    y, aux = forward(x, params)
    task = jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32))
    return (task + LOAD_BALANCING_WEIGHT * aux.load_balancing_loss
            + Z_LOSS_WEIGHT * aux.router_z_loss)

  return loss


def make_step(forward: Forward, mode: str):
  """The jitted function timed for `mode`, and how to call it.

  Returns:
    `(step, arg_names)`: `"fwd"`: `step(x, params) -> (y, aux)`; `"fwdbwd"`:
    `step(x, params, dy) -> (loss, (dx, dparams))`.
  """
  if mode == "fwd":
    return jax.jit(forward), ("x", "params")
  if mode == "fwdbwd":
    return jax.jit(jax.value_and_grad(loss_fn(forward), argnums=(0, 1))), (
        "x", "params", "dy")
  raise ValueError(f"mode must be 'fwd' or 'fwdbwd', got {mode!r}")


def rel_err(a, b) -> float:
  """Largest relative Frobenius error `|a - b| / |b|` over the leaves of two pytrees."""
  errs = []
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    den = float(jnp.linalg.norm(y))
    errs.append(float(jnp.linalg.norm(x - y)) / (den if den > 0 else 1.0))
  return max(errs) if errs else float("nan")


def make_cotangent(case: Case, seed: int = 1) -> jax.Array:
  """`[t, d]` random `dy` of `case.dtype` for the fwd+bwd loss."""
  return jax.random.normal(jax.random.key(seed), (case.tokens, case.d_model),
                           jnp.dtype(case.dtype))
