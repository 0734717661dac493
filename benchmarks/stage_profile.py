"""Per-component profile: each MoE stage timed as its own jitted function.

The four stages of the dropless MoE, on the same inputs as the whole-layer run:

1. `router`: logits, softmax, top-k, weights, losses.
2. `align/permute`: group the `t * top_k` copies by expert (sorted order, tile
   plan) and, in the reference, gather the token rows.
3. `up GEMM`: grouped `x @ up_kernel` with the activation.
4. `down GEMM + combine`: grouped `h @ down_kernel`, weighted sum of the k copies.

`fwd` times the stage's forward; `bwd` times its backward alone (residuals and
a random cotangent computed once, outside the timed region). The inputs of a
stage are the outputs of the previous one, computed once beforehand.

- Reference (`jmoe.reference`, sorted form): each stage is a pure function and
  its backward is its VJP.
- jmoe (`jmoe.ops`): the stage functions of `jmoe.ops.expert_ffn`. Backward
  kernels go to the stage whose forward they differentiate: `act_bwd`
  (dy @ down^T, activation backward, router-weight partials) to "down GEMM +
  combine", the dx GEMM and the dx/d_weights combine to "up GEMM"; both weight
  gradients (one `weight_grad_stage`, two tgmm launches) are a backward-only
  row; align has no backward. `tests/test_benchmarks.py` checks that the stages
  reproduce `jmoe.ops.expert_ffn` and its VJP.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jmoe import reference

from benchmarks import timing
from benchmarks.implementations import rel_err
from benchmarks.cases import Case


@dataclasses.dataclass
class Stage:
  """One stage: `fwd(*fwd_args)` and `bwd(*bwd_args)` (either may be None)."""

  name: str
  fwd: Callable[..., Any] | None
  fwd_args: tuple
  bwd: Callable[..., Any] | None = None
  bwd_args: tuple = ()


def _random_like(tree, seed: int):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), max(1, len(leaves)))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, a.shape, a.dtype)
                                      for k, a in zip(keys, leaves)])


def vjp_stage(name: str, fn, diff_args: tuple, const_args: tuple = (), seed: int = 0):
  """A stage of `fn(diff_args, const_args) -> (diff_out, aux_out)` with VJP backward.

  Returns:
    `(stage, (diff_out, aux_out))`, the outputs feeding the next stage.
  """
  def with_vjp(diff, const):
    return jax.vjp(lambda *d: fn(d, const), *diff, has_aux=True)

  diff_out, vjp_fn, aux_out = jax.jit(with_vjp)(diff_args, const_args)
  stage = Stage(name, fn, (diff_args, const_args), lambda vjp_fn, ct: vjp_fn(ct),
                (vjp_fn, _random_like(diff_out, seed)))
  return stage, (diff_out, aux_out)


def reference_stages(case: Case, x, params, with_bwd: bool = True
                     ) -> tuple[list[Stage], dict[str, float]]:
  """The stages of `jmoe.reference.moe(..., dispatch="sorted")`, and no checks.

  With `with_bwd=False` the stages have no backward (nor its residuals): for
  shapes where `jax.lax.ragged_dot`'s VJP does not fit in memory.
  """
  top_k, e = case.top_k, case.experts

  def router(diff, const):
    x, w = diff
    r = reference.route(x, w, top_k=top_k)
    return (r.weights, r.load_balancing_loss, r.router_z_loss), (r.expert_ids, r.kept)

  def permute(diff, const):
    (x,), (expert_ids, kept) = diff, const
    order, group_sizes = reference.sort_by_expert(expert_ids, kept, e)
    return x[order // top_k], (order, group_sizes)

  def up(diff, const):
    (xs, w), (group_sizes,) = diff, const
    h = reference.grouped_matmul(xs, w, group_sizes, preferred_element_type=jnp.float32)
    return reference.apply_activation(h, case.activation).astype(xs.dtype), ()

  def down(diff, const):
    (h, w, weights), (group_sizes, order) = diff, const
    out = reference.grouped_matmul(h, w, group_sizes,
                                   preferred_element_type=jnp.float32)
    return reference.combine_sorted(out, order, weights, h.dtype), ()

  make = vjp_stage if with_bwd else _fwd_stage
  s1, ((weights, _, _), (expert_ids, kept)) = make(
      "router", router, (x, params.router_kernel))
  s2, (xs, (order, group_sizes)) = make("align/permute", permute, (x,),
                                        (expert_ids, kept))
  s3, (h, _) = make("up GEMM", up, (xs, params.up_kernel), (group_sizes,))
  s4, _ = make("down GEMM + combine", down, (h, params.down_kernel, weights),
               (group_sizes, order))
  return [s1, s2, s3, s4], {}


def _fwd_stage(name: str, fn, diff_args: tuple, const_args: tuple = ()):
  """As `vjp_stage`, without a backward."""
  out = jax.jit(fn)(diff_args, const_args)
  return Stage(name, fn, (diff_args, const_args)), out


def jmoe_stages(case: Case, x, params, backend: str
                ) -> tuple[list[Stage], dict[str, float]]:
  """The stages of `jmoe.moe(..., backend=backend)`, from the stage functions of
  `jmoe.ops.expert_ffn` (`plan`, `up_stage`, `down_stage`, `combine`,
  `act_bwd_stage`, `weight_grad_stage`, `dx_stage`) and `jmoe.ops.routing.route`.

  Returns:
    `(stages, checks)`: `checks` maps `y, dx, d_weights, d_up, d_down` to the
    relative error of the staged computation against `jmoe.ops.expert_ffn` and
    its VJP on the same inputs (0 when the stages launch the same kernels).

  Raises:
    ImportError, AttributeError, TypeError: the ops are not (or no longer) what
      this calls; `tests/test_benchmarks.py` catches that.
  """
  ops_routing = importlib.import_module("jmoe.ops.routing")
  ffn = importlib.import_module("jmoe.ops.expert_ffn")
  top_k, activation, e = case.top_k, case.activation, case.experts
  up_k, down_k = params.up_kernel.astype(x.dtype), params.down_kernel.astype(x.dtype)

  def router(diff, const):
    x, w = diff
    r = ops_routing.route(x, w, top_k=top_k, backend=backend)
    return (r.weights, r.load_balancing_loss, r.router_z_loss), (r.expert_ids, r.kept)

  s_router, ((weights, _, _), (expert_ids, kept)) = vjp_stage(
      "router", router, (x, params.router_kernel))
  # block_m is a static python int: take it from one call outside jit.
  block_m = ffn.plan(expert_ids, kept, weights, e, backend)[2]

  def align(expert_ids, kept, weights):
    al, w_sorted, _ = ffn.plan(expert_ids, kept, weights, e, backend)
    return al, w_sorted

  # The router weights scale h in the up epilogue (default) or the down GEMM
  # (`JMOE_ROUTER_SCALE=down`), as in the fused op; read once, like the op.
  scale_stage = ffn.router_scale_stage()

  def up(x, up_k, al, w_sorted, save=False):
    return ffn.up_stage(x, up_k, al, block_m, activation, backend, save,
                        ffn.router_scale_args(w_sorted, scale_stage)[0])

  def down_combine(h, down_k, al, w_sorted):
    w_down = ffn.router_scale_args(w_sorted, scale_stage)[1]
    o = ffn.down_stage(h, down_k, al, w_down, block_m, backend)
    return ffn.combine(o, al.pos, x.dtype, backend)

  # `JMOE_SHARE_SORTED_ROWS`: the backward's sorted copy of dy is made in the
  # act_bwd stage (its GEMM reads it first); the forward's sorted copy of x is
  # counted in the weight-gradient stage (the op makes it in the forward when
  # it saves residuals: the timed forward stage saves none).
  share = ffn.share_sorted_rows(backend, x.dtype, x.shape[1], down_k.shape[1],
                                up_k.shape[2])

  def rows_of(a, al):
    return ffn.gmm_lib.gather_rows(a, al.token, backend) if share else None

  def down_bwd(dy, down_k, al, w_sorted, pre):
    return ffn.act_bwd_stage(dy, down_k, al, w_sorted, pre, block_m, activation,
                             backend, dy_rows=rows_of(dy, al))

  def weight_grads(x, dy, h, d_pre, al, w_sorted, dy_rows):
    w_down = ffn.router_scale_args(w_sorted, scale_stage)[1]
    return ffn.weight_grad_stage(x, dy, h, d_pre, al, w_down, up_k.dtype,
                                 down_k.dtype, backend, x_rows=rows_of(x, al),
                                 dy_rows=dy_rows)

  def up_bwd(d_pre, up_k, al, dwp):
    dxc = ffn.dx_stage(d_pre, up_k, al, block_m, backend)
    return ffn.combine(dxc, al.pos, x.dtype, backend, dwp=dwp)

  al, w_sorted = jax.jit(align)(expert_ids, kept, weights)
  h, pre = jax.jit(lambda *a: up(*a, save=True))(x, up_k, al, w_sorted)
  dy = _random_like(x, 1)
  d_pre, dwp = jax.jit(down_bwd)(dy, down_k, al, w_sorted, pre)

  # The stages must compute what the fused op computes: compare once.
  y = jax.jit(down_combine)(h, down_k, al, w_sorted)
  dx, d_weights = jax.jit(up_bwd)(d_pre, up_k, al, dwp)
  dy_rows = jax.jit(rows_of)(dy, al)
  d_up, d_down = jax.jit(weight_grads)(x, dy, h, d_pre, al, w_sorted, dy_rows)

  def fused(x, weights, up_k, down_k):
    return ffn.expert_ffn(x, expert_ids, weights, kept, up_k, down_k,
                          activation=activation, backend=backend)

  y_op, vjp_op = jax.jit(lambda *a: jax.vjp(fused, *a))(x, weights, up_k, down_k)
  grads_op = jax.jit(lambda v, ct: v(ct))(vjp_op, dy)
  checks = {name: rel_err(a, b) for name, a, b in (
      ("y", y, y_op), ("dx", dx, grads_op[0]), ("d_weights", d_weights, grads_op[1]),
      ("d_up", d_up, grads_op[2]), ("d_down", d_down, grads_op[3]))}
  return [
      s_router,
      Stage("align/permute", align, (expert_ids, kept, weights)),
      Stage("up GEMM", up, (x, up_k, al, w_sorted), up_bwd, (d_pre, up_k, al, dwp)),
      Stage("down GEMM + combine", down_combine, (h, down_k, al, w_sorted),
            down_bwd, (dy, down_k, al, w_sorted, pre)),
      Stage("weight grads (2 tgmm)", None, (), weight_grads,
            (x, dy, h, d_pre, al, w_sorted, dy_rows)),
  ], checks


def profile(stages: Sequence[Stage], workers: int = 1, **time_kwargs
            ) -> list[dict[str, Any]]:
  """`[{"stage", "fwd_s", "bwd_s"}]` for each stage (None where it has none or
  it failed; then `fwd_error` / `bwd_error` says why).

  All stage functions are compiled first (`workers` at a time), then timed one
  by one with `timing.time_fn(**time_kwargs)`.
  """
  jobs, slots = [], []
  for i, s in enumerate(stages):
    for part, fn, args in (("fwd", s.fwd, s.fwd_args), ("bwd", s.bwd, s.bwd_args)):
      if fn is not None:
        jobs.append((jax.jit(fn), args))
        slots.append((i, part))
  rows = [{"stage": s.name, "fwd_s": None, "bwd_s": None} for s in stages]
  compiled_jobs = timing.compile_all(jobs, workers)
  for (i, part), (compiled, _), (_, args) in zip(slots, compiled_jobs, jobs):
    try:
      if isinstance(compiled, Exception):
        raise compiled
      rows[i][f"{part}_s"] = timing.time_fn(compiled, *args, **time_kwargs).median_s
    except Exception as e:  # noqa: BLE001  (reported by the caller)
      lines = str(e).strip().splitlines()
      first = lines[0][:200] if lines else ""
      rows[i][f"{part}_error"] = f"{type(e).__name__}: {first}"
  return rows
