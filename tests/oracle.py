"""An independent numpy oracle for jmoe: plain loops, one token / one expert at a time.

It shares no code with `jmoe/reference` (it imports neither jax nor jmoe), so it
checks the reference independently; the reference then checks the kernels. It
follows docs/DESIGN.md literally and computes everything in float64 from the
inputs, so for float32 inputs the reference should match it to float32 rounding.

The functions mirror the public API:
  route(x [t, d], router_kernel [d, e], *, top_k, ...) -> Routing (numpy fields)
  expert_ffn(x [t, d], expert_ids [t, k], weights [t, k], kept [t, k], up, down,
             *, activation) -> y [t, d] float64
  moe(x [..., d], router_kernel, up_kernel, down_kernel, *, top_k, ...) -> (y, MoEAux)
  ragged_dot(lhs [m, k], rhs [g, k, n], group_sizes [g]) -> [m, n] float64
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

ACTIVATIONS = ("gelu", "relu", "silu", "swiglu", "geglu")
GATED_ACTIVATIONS = ("swiglu", "geglu")
DROP_POLICIES = ("token_order", "probability")


class Routing(NamedTuple):
  """Same fields as `jmoe.Routing`, as float64 / int64 / bool numpy arrays."""

  logits: np.ndarray  # [t, e] float64
  probs: np.ndarray  # [t, e] float64
  expert_ids: np.ndarray  # [t, k] int64
  weights: np.ndarray  # [t, k] float64 (0 where dropped)
  kept: np.ndarray  # [t, k] bool
  tokens_per_expert: np.ndarray  # [e] int64 (kept copies)
  dropped_count: int
  load_balancing_loss: float
  router_z_loss: float


class MoEAux(NamedTuple):
  """Same fields as `jmoe.MoEAux`."""

  load_balancing_loss: float
  router_z_loss: float
  tokens_per_expert: np.ndarray  # [e] int64
  dropped_count: int
  dropped_fraction: float


def _f64(a) -> np.ndarray:
  return np.asarray(a).astype(np.float64)


# ----------------------------------------------------------------------------
# Routing, one token at a time.
# ----------------------------------------------------------------------------


def router_logits(x, router_kernel) -> np.ndarray:
  """`[t, e]` float64 logits, `logits[i, j] = sum_c x[i, c] * w[c, j]`.

  One (token, expert) at a time, each sum correctly rounded (`math.fsum`).
  """
  x, w = _f64(x), _f64(router_kernel)
  t, e = x.shape[0], w.shape[1]
  logits = np.zeros((t, e), np.float64)
  for i in range(t):
    for j in range(e):
      logits[i, j] = math.fsum(x[i] * w[:, j])
  return logits


def logsumexp_row(row: np.ndarray) -> float:
  m = max(row)
  return m + math.log(sum(math.exp(v - m) for v in row))


def softmax_row(row: np.ndarray) -> np.ndarray:
  lse = logsumexp_row(row)
  return np.array([math.exp(v - lse) for v in row], np.float64)


def top_k_row(row: np.ndarray, k: int) -> list[int]:
  """Indices of the k largest entries, largest first, ties -> lower index."""
  chosen: list[int] = []
  for _ in range(k):
    best = -1
    for j, v in enumerate(row):
      if j in chosen:
        continue
      if best < 0 or v > row[best]:  # strict: an equal later value never wins
        best = j
    chosen.append(best)
  return chosen


def capacity(capacity_factor: float | None, t: int, top_k: int, e: int) -> int | None:
  """`ceil(capacity_factor * t * top_k / e)`, or None (dropless)."""
  if capacity_factor is None:
    return None
  return int(math.ceil(capacity_factor * t * top_k / e))


def keep_mask(expert_ids, probs, capacity_: int | None, drop_policy: str) -> np.ndarray:
  """`[t, k]` bool: copy (i, j) is kept iff fewer than `capacity_` copies of
  higher priority chose the same expert (DESIGN.md "Routing")."""
  if drop_policy not in DROP_POLICIES:
    raise ValueError(f"unknown drop_policy {drop_policy!r}")
  t, k = expert_ids.shape
  kept = np.ones((t, k), bool)
  if capacity_ is None:
    return kept
  e = probs.shape[1]
  for ex in range(e):
    copies = [(i, j) for i in range(t) for j in range(k) if expert_ids[i, j] == ex]
    if drop_policy == "token_order":
      order = sorted(copies, key=lambda ij: ij[0] * k + ij[1])
    else:
      order = sorted(copies, key=lambda ij: (-probs[ij[0], ex], ij[0] * k + ij[1]))
    for rank, (i, j) in enumerate(order):
      kept[i, j] = rank < capacity_
  return kept


def route(
    x,
    router_kernel,
    *,
    top_k: int,
    capacity_factor: float | None = None,
    normalize_top_k: bool = True,
    drop_policy: str = "token_order",
    logits=None,
) -> Routing:
  """The oracle of `jmoe.route` for `x [t, d]`, `router_kernel [d, e]`.

  `logits` (optional `[t, e]`) replaces `x @ router_kernel`, e.g. to route from
  logits with deliberate ties.
  """
  if logits is None:
    logits = router_logits(x, router_kernel)
  logits = _f64(logits)
  t, e = logits.shape
  k = top_k
  probs = np.zeros((t, e), np.float64)
  expert_ids = np.zeros((t, k), np.int64)
  weights = np.zeros((t, k), np.float64)
  z_loss = 0.0
  for i in range(t):
    probs[i] = softmax_row(logits[i])
    z_loss += logsumexp_row(logits[i]) ** 2
    ids = top_k_row(probs[i], k)
    expert_ids[i] = ids
    vals = [probs[i, j] for j in ids]
    total = sum(vals)
    weights[i] = [v / total if normalize_top_k else v for v in vals]
  z_loss /= t

  cap = capacity(capacity_factor, t, k, e)
  kept = keep_mask(expert_ids, probs, cap, drop_policy)
  weights = np.where(kept, weights, 0.0)

  routed = np.zeros(e, np.int64)  # before dropping
  tokens_per_expert = np.zeros(e, np.int64)  # after dropping
  for i in range(t):
    for j in range(k):
      routed[expert_ids[i, j]] += 1
      if kept[i, j]:
        tokens_per_expert[expert_ids[i, j]] += 1
  lb = 0.0
  for ex in range(e):
    f_e = routed[ex] / (t * k)
    p_e = sum(probs[i, ex] for i in range(t)) / t
    lb += f_e * p_e
  lb *= e
  return Routing(
      logits=logits,
      probs=probs,
      expert_ids=expert_ids,
      weights=weights,
      kept=kept,
      tokens_per_expert=tokens_per_expert,
      dropped_count=int(t * k - kept.sum()),
      load_balancing_loss=float(lb),
      router_z_loss=float(z_loss),
  )


# ----------------------------------------------------------------------------
# Activations (scalar formulas, applied elementwise by loops).
# ----------------------------------------------------------------------------


def _gelu_tanh(v: float) -> float:
  return 0.5 * v * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))


def _silu(v: float) -> float:
  # v * sigmoid(v), written to stay finite for large |v|.
  if v >= 0:
    return v / (1.0 + math.exp(-v))
  ev = math.exp(v)
  return v * ev / (1.0 + ev)


def _relu(v: float) -> float:
  return v if v > 0 else 0.0


_SCALAR = {"gelu": _gelu_tanh, "relu": _relu, "silu": _silu}


def activation(name: str, z) -> np.ndarray:
  """`act(z)` for one row `z` (`[f]`, or `[2f]` gate-first for gated names)."""
  z = _f64(z)
  if name in _SCALAR:
    fn = _SCALAR[name]
    return np.array([fn(v) for v in z], np.float64)
  if name in GATED_ACTIVATIONS:
    f = z.shape[-1] // 2
    fn = _silu if name == "swiglu" else _gelu_tanh
    return np.array([fn(z[c]) * z[f + c] for c in range(f)], np.float64)
  raise ValueError(f"unknown activation {name!r}")


def hidden_width(name: str, up_cols: int) -> int:
  return up_cols // 2 if name in GATED_ACTIVATIONS else up_cols


# ----------------------------------------------------------------------------
# Dispatch -> per-expert FFN -> combine, one expert at a time.
# ----------------------------------------------------------------------------


def dispatch(expert_ids, kept, e: int) -> list[list[tuple[int, int]]]:
  """For each expert, its kept copies `(token, choice)` in token-major order."""
  t, k = np.asarray(expert_ids).shape
  buckets: list[list[tuple[int, int]]] = [[] for _ in range(e)]
  for i in range(t):
    for j in range(k):
      if kept[i, j]:
        buckets[int(expert_ids[i, j])].append((i, j))
  return buckets


def expert_apply(x_row, up_e, down_e, name: str, round_hidden=None) -> np.ndarray:
  """`down_e(act(x_row @ up_e))` for one token row on one expert (float64).

  `round_hidden` (optional callable) rounds the activation before the down
  GEMM, as the reference casts it to `x.dtype`.
  """
  h = activation(name, _f64(x_row) @ _f64(up_e))
  if round_hidden is not None:
    h = _f64(round_hidden(h))
  return h @ _f64(down_e)


def combine(contribs, t: int, d: int) -> np.ndarray:
  """Sums `(token, weight, row)` contributions into `[t, d]` float64."""
  y = np.zeros((t, d), np.float64)
  for i, w, row in contribs:
    y[i] += w * row
  return y


def expert_ffn(
    x,
    expert_ids,
    weights,
    kept,
    up_kernel,
    down_kernel,
    *,
    activation: str,
    round_hidden=None,
) -> np.ndarray:
  """`y_i = sum_{j kept} weights[i,j] * down_e(act(x_i @ up_e))`: `[t, d]` float64."""
  x = _f64(x)
  t, d = x.shape
  e = np.asarray(up_kernel).shape[0]
  weights = _f64(weights)
  kept = np.asarray(kept).astype(bool)
  expert_ids = np.asarray(expert_ids)
  contribs = []
  for ex, copies in enumerate(dispatch(expert_ids, kept, e)):
    for i, j in copies:
      row = expert_apply(x[i], up_kernel[ex], down_kernel[ex], activation, round_hidden)
      contribs.append((i, weights[i, j], row))
  return combine(contribs, t, d)


def moe(
    x,
    router_kernel,
    up_kernel,
    down_kernel,
    *,
    top_k: int,
    capacity_factor: float | None = None,
    activation: str = "swiglu",
    normalize_top_k: bool = True,
    drop_policy: str = "token_order",
    round_hidden=None,
) -> tuple[np.ndarray, MoEAux]:
  """The oracle of `jmoe.moe` (no jitter): `x [..., d]` -> `(y [..., d] f64, aux)`."""
  x = np.asarray(x)
  lead, d = x.shape[:-1], x.shape[-1]
  xt = x.reshape(-1, d)
  r = route(
      xt,
      router_kernel,
      top_k=top_k,
      capacity_factor=capacity_factor,
      normalize_top_k=normalize_top_k,
      drop_policy=drop_policy,
  )
  y = expert_ffn(
      xt,
      r.expert_ids,
      r.weights,
      r.kept,
      up_kernel,
      down_kernel,
      activation=activation,
      round_hidden=round_hidden,
  )
  t = xt.shape[0]
  aux = MoEAux(
      load_balancing_loss=r.load_balancing_loss,
      router_z_loss=r.router_z_loss,
      tokens_per_expert=r.tokens_per_expert,
      dropped_count=r.dropped_count,
      dropped_fraction=r.dropped_count / (t * top_k),
  )
  return y.reshape(*lead, d), aux


# ----------------------------------------------------------------------------
# grouped_matmul == jax.lax.ragged_dot
# ----------------------------------------------------------------------------


def ragged_dot(lhs, rhs, group_sizes) -> np.ndarray:
  """Rows `[start_g, start_g + group_sizes[g])` of lhs times `rhs[g]`; later rows 0."""
  lhs, rhs = _f64(lhs), _f64(rhs)
  m = lhs.shape[0]
  g, _, n = rhs.shape
  out = np.zeros((m, n), np.float64)
  start = 0
  for gi in range(g):
    size = int(group_sizes[gi])
    for r in range(start, start + size):
      out[r] = lhs[r] @ rhs[gi]
    start += size
  return out
