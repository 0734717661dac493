"""Shared test helpers: tolerances by dtype, comparisons that say where they fail,
and fresh random inputs seeded by the test's name.

Usage::

  rng = helpers.rng_for(request.node.nodeid)       # or the `rng` fixture
  x = helpers.normal(rng, (7, 16), np.float32)
  helpers.assert_close(actual, expected, np.float32)             # forward
  helpers.assert_close(g_actual, g_expected, np.float32, kind="grad")

The error measure is scale-relative: `max|actual - expected| / max|expected|`
(over the whole array), so entries near zero do not need an absolute floor and
a wrong entry anywhere is caught. Integer and boolean arrays must be equal.
"""

from __future__ import annotations

import math
import zlib
from typing import NamedTuple

import jax
import ml_dtypes
import numpy as np


class Tolerance(NamedTuple):
  """Scale-relative error bounds: `fwd` for outputs, `grad` for gradients."""

  fwd: float
  grad: float


# Keyed by dtype name. "tf32" is for float32 dots run on TensorFloat-32 units
# (GPU kernels); the reference on CPU runs float32 at full precision.
TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(fwd=1e-12, grad=1e-10),
    "float32": Tolerance(fwd=1e-5, grad=2e-5),
    "tf32": Tolerance(fwd=1e-3, grad=3e-3),
    "float16": Tolerance(fwd=2e-3, grad=5e-3),
    "bfloat16": Tolerance(fwd=1e-2, grad=2e-2),
}

# Finite-difference gradient checks (`jax.test_util.check_grads`): (eps, atol, rtol).
CHECK_GRADS: dict[str, tuple[float, float, float]] = {
    "float64": (1e-6, 1e-7, 1e-7),
    "float32": (1e-2, 2e-2, 2e-2),
}


def _dtype_name(dtype) -> str:
  if isinstance(dtype, str):
    return dtype
  return np.dtype(dtype).name


def tolerance(dtype, kind: str = "fwd") -> float:
  """The bound for `dtype` (a numpy/jax dtype or "tf32"); `kind` is fwd|grad."""
  name = _dtype_name(dtype)
  if name not in TOLERANCES:
    raise KeyError(f"no tolerance for dtype {name!r}; known: {sorted(TOLERANCES)}")
  if kind not in ("fwd", "grad"):
    raise ValueError(f"kind must be 'fwd' or 'grad', got {kind!r}")
  return getattr(TOLERANCES[name], kind)


def _to_f64(a) -> np.ndarray:
  a = np.asarray(jax.device_get(a))
  if a.dtype == ml_dtypes.bfloat16 or a.dtype.kind == "f":
    return a.astype(np.float64)
  return a


def relative_error(actual, expected) -> float:
  """`max|actual - expected| / max|expected|` (absolute error if expected is 0)."""
  a, e = _to_f64(actual), _to_f64(expected)
  scale = float(np.max(np.abs(e))) if e.size else 0.0
  err = float(np.max(np.abs(a - e))) if e.size else 0.0
  return err / scale if scale > 0 else err


def tree_relative_error(actual, expected) -> float:
  """The largest `max|a - e| / max(max|e|, 1e-30)` over the matching leaves of
  two pytrees (booleans and integers compared as numbers; an all-zero leaf
  expected stays strict)."""
  got, want = jax.tree.leaves(actual), jax.tree.leaves(expected)
  assert len(got) == len(want), (len(got), len(want))
  errors = []
  for g, w in zip(got, want):
    g = np.asarray(jax.device_get(g), np.float64)
    w = np.asarray(jax.device_get(w), np.float64)
    errors.append(float(np.max(np.abs(g - w))) / max(float(np.max(np.abs(w))), 1e-30))
  return max(errors)


def moe_case(t: int, d: int, f: int, e: int, seed: int = 7):
  """`(x [t, d], jmoe.MoEParams (gated, f32), ct [t, d])` from `jax.random` (the
  sharding workers' inputs)."""
  import jmoe  # pylint: disable=import-outside-toplevel

  keys = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(keys[0], (t, d), np.float32)
  params = jmoe.MoEParams(
      jax.random.normal(keys[1], (d, e), np.float32) * 0.5,
      jax.random.normal(keys[2], (e, d, 2 * f), np.float32) / np.sqrt(d),
      jax.random.normal(keys[3], (e, f, d), np.float32) / np.sqrt(f),
  )
  ct = jax.random.normal(keys[4], (t, d), np.float32)
  return x, params, ct


def run_worker(script, backend: str, devices: int) -> dict:
  """Runs `python script BACKEND DEVICES` (a multi-device worker: the host
  device count is fixed when jax starts) with the repository on PYTHONPATH, and
  returns the JSON of its last `RESULT ` line."""
  import json  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  import pathlib  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel

  root = pathlib.Path(__file__).resolve().parent.parent
  # On a GPU this process's jax has already taken 75 % of the memory (XLA's
  # preallocation) when earlier tests ran: the worker allocates as it goes.
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONPATH=os.pathsep.join(
      filter(None, [str(root), os.environ.get("PYTHONPATH", "")])))
  proc = subprocess.run([sys.executable, str(script), backend, str(devices)],
                        capture_output=True, text=True, env=env, timeout=900, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, (
      f"{script} exited with {proc.returncode}\n" + proc.stdout[-3000:] + proc.stderr[-3000:])
  return json.loads(lines[-1][len("RESULT "):])


def compiled_holds_f32(fn, args, shapes) -> bool:
  """Whether the compiled (per-device, partitioned) program of `jax.jit(fn)(*args)`
  holds a float32 array of any of `shapes` (e.g. a whole-batch noise array that
  each device should only hold its share of)."""
  text = jax.jit(fn).lower(*args).compile().as_text()
  return any(f"f32[{','.join(map(str, shape))}]" in text for shape in shapes)


def assert_close(actual, expected, dtype=None, *, kind: str = "fwd", rtol=None,
                 err_msg: str = "") -> None:
  """Asserts `actual` matches `expected` within the tolerance of `dtype`.

  Args:
    actual: array (jax or numpy) under test.
    expected: array of the same shape (e.g. float64 from the oracle).
    dtype: the dtype whose tolerance applies (default: `actual`'s dtype), or
      "tf32".
    kind: "fwd" or "grad".
    rtol: overrides the table.
    err_msg: prefixed to the failure message.

  Fails with the largest error, its index and both values there. NaN or inf in
  `actual` where `expected` is finite always fails.
  """
  a, e = _to_f64(actual), _to_f64(expected)
  prefix = f"{err_msg}: " if err_msg else ""
  if a.shape != e.shape:
    raise AssertionError(f"{prefix}shape {a.shape} != expected shape {e.shape}")
  if dtype is None:
    dtype = np.asarray(jax.device_get(actual)).dtype
  bound = tolerance(dtype, kind) if rtol is None else rtol
  if a.size == 0:
    return
  bad_nonfinite = ~np.isfinite(a) & np.isfinite(e)
  if bad_nonfinite.any():
    idx = tuple(int(i) for i in np.argwhere(bad_nonfinite)[0])
    raise AssertionError(
        f"{prefix}{int(bad_nonfinite.sum())} non-finite values, first at {idx}: "
        f"actual {a[idx]} expected {e[idx]}"
    )
  diff = np.abs(a - e)
  diff = np.where(np.isfinite(e), diff, 0.0)
  scale = float(np.max(np.abs(np.where(np.isfinite(e), e, 0.0))))
  worst = np.unravel_index(int(np.argmax(diff)), diff.shape)
  err = float(diff[worst])
  rel = err / scale if scale > 0 else err
  if not rel <= bound:
    raise AssertionError(
        f"{prefix}relative error {rel:.3e} > {bound:.1e} ({_dtype_name(dtype)}, "
        f"{kind}); largest |diff| {err:.3e} at index {tuple(int(i) for i in worst)}: "
        f"actual {a[worst]!r} expected {e[worst]!r}; max|expected| {scale:.3e}; "
        f"shape {a.shape}"
    )


def assert_equal(actual, expected, err_msg: str = "") -> None:
  """Exact equality (ints, bools); reports the count and first mismatch."""
  a = np.asarray(jax.device_get(actual))
  e = np.asarray(jax.device_get(expected))
  prefix = f"{err_msg}: " if err_msg else ""
  if a.shape != e.shape:
    raise AssertionError(f"{prefix}shape {a.shape} != expected shape {e.shape}")
  mismatch = a != e
  if np.any(mismatch):
    idx = tuple(int(i) for i in np.argwhere(mismatch)[0])
    raise AssertionError(
        f"{prefix}{int(mismatch.sum())} of {a.size} entries differ, first at {idx}: "
        f"actual {a[idx]!r} expected {e[idx]!r}"
    )


def assert_variant_matches(got, baseline, want, dtype, backend: str, names,
                           err_msg: str = "") -> None:
  """Outputs of a kernel variant `got` (forward first, then gradients): within
  the `dtype` bound of the reference `want`, and equal to the `baseline`
  variant's bit for bit under the interpreter (both run the same tile config
  there), within the gradient bound on the GPU."""
  for g, b, w, name in zip(got, baseline, want, names):
    msg = f"{err_msg}{name}"
    assert_close(g, w, dtype, kind="fwd" if name == names[0] else "grad", err_msg=msg)
    if backend == "interpret":
      np.testing.assert_array_equal(g, b, err_msg=msg)
    else:
      assert_close(g, b, dtype, kind="grad", err_msg=f"{msg} vs baseline")


# ----------------------------------------------------------------------------
# Random inputs.
# ----------------------------------------------------------------------------


def seed_for(name: str) -> int:
  """A stable 32-bit seed from a test's name (e.g. `request.node.nodeid`)."""
  return zlib.crc32(name.encode())


def rng_for(name: str, salt: int = 0) -> np.random.Generator:
  return np.random.default_rng([seed_for(name), salt])


def normal(rng: np.random.Generator, shape, dtype=np.float32, scale: float = 1.0):
  """Standard normal * scale in `dtype` (float64 draws, then cast); no zeros."""
  a = rng.standard_normal(shape) * scale
  a = np.where(a == 0, scale, a)  # never exactly zero
  return a.astype(dtype)


def up_columns(activation: str, f: int) -> int:
  return 2 * f if activation in ("swiglu", "geglu") else f


def moe_params(rng, d: int, e: int, f: int, activation: str = "swiglu",
               dtype=np.float32, router_scale: float = 1.0):
  """`(router_kernel [d, e], up_kernel [e, d, f or 2f], down_kernel [e, f, d])`.

  Scaled by 1/sqrt(fan_in) so outputs stay O(1); the router by `router_scale`.
  """
  router = normal(rng, (d, e), dtype, router_scale / math.sqrt(d))
  up = normal(rng, (e, d, up_columns(activation, f)), dtype, 1 / math.sqrt(d))
  down = normal(rng, (e, f, d), dtype, 1 / math.sqrt(f))
  return router, up, down


def bias_to_expert(x, router_kernel, expert: int, strength: float = 10.0):
  """Copies of `(x, router_kernel)` where every token's top choice is `expert`.

  Sets feature 0 of every token to `1 + |x0| / 4` (in [1, ~2]) and adds
  `strength` to the router weight from feature 0 to `expert`, so that expert's
  logit leads by about `strength` to `2 * strength`, while the other
  probabilities stay well above float32's underflow.
  """
  x = np.array(x, copy=True)
  w = np.array(router_kernel, copy=True)
  x[:, 0] = (np.abs(x[:, 0].astype(np.float64)) / 4 + 1.0).astype(x.dtype)
  w[0, expert] = (w[0, expert].astype(np.float64) + strength).astype(w.dtype)
  return x, w


def routing_margin(logits, top_k: int) -> float:
  """Smallest gap between adjacent sorted logits among ranks 0..top_k of any token.

  Small margins make the top-k choice (and its order) depend on rounding, so a
  float32 implementation and the float64 oracle may legitimately disagree.
  """
  logits = np.asarray(logits, np.float64)
  e = logits.shape[1]
  s = -np.sort(-logits, axis=1)[:, : min(top_k + 1, e)]
  if s.shape[1] < 2:
    return math.inf
  return float(np.min(s[:, :-1] - s[:, 1:]))


def priority_margin(probs, expert_ids) -> float:
  """Smallest relative gap between the probabilities of two copies that chose
  the same expert (what orders copies under drop_policy="probability")."""
  probs = np.asarray(probs, np.float64)
  expert_ids = np.asarray(expert_ids)
  best = math.inf
  for ex in np.unique(expert_ids):
    tok = np.nonzero(expert_ids == ex)[0]
    p = np.sort(probs[tok, ex])
    if p.size > 1:
      best = min(best, float(np.min(np.diff(p) / p[1:])))
  return best


# ----------------------------------------------------------------------------
# Routing cases and comparisons (shared by the reference and the router op tests).
# ----------------------------------------------------------------------------


def routing_inputs(rng, t: int, d: int, e: int, top_k: int, *, dtype=np.float32,
                   drop_policy: str = "token_order", router_scale: float = 1.0,
                   min_logit_gap: float = 1e-4, min_prob_gap: float = 1e-4,
                   bias_expert: int | None = None, bias_strength: float = 10.0,
                   tries: int = 50):
  """`(x [t, d], router_kernel [d, e])` whose top-k choice is unambiguous.

  Redraws until adjacent logits among each token's top `top_k + 1` differ by at
  least `min_logit_gap` (and, for drop_policy="probability", the probabilities
  of copies on one expert differ relatively by `min_prob_gap`), so a float32
  implementation must agree exactly with the float64 oracle on the choices.
  With `bias_expert`, every token's first choice is that expert
  (`bias_to_expert(..., strength=bias_strength)`).
  """
  import oracle  # pylint: disable=import-outside-toplevel

  for _ in range(tries):
    x = normal(rng, (t, d), dtype)
    w = normal(rng, (d, e), dtype, router_scale / math.sqrt(d))
    if bias_expert is not None:
      x, w = bias_to_expert(x, w, bias_expert, bias_strength)
    logits = oracle.router_logits(x, w)
    if routing_margin(logits, top_k) < min_logit_gap:
      continue
    if drop_policy == "probability" and e > 1:  # e == 1: all probs exactly 1
      probs = np.stack([oracle.softmax_row(row) for row in logits]) if t else logits
      ids = np.stack([oracle.top_k_row(p, top_k) for p in probs])
      if priority_margin(probs, ids) < min_prob_gap:
        continue
    return x, w
  raise RuntimeError(f"no well-separated routing inputs in {tries} tries")


def assert_routing_close(actual, expected, dtype=np.float32, err_msg: str = "") -> None:
  """Compares a `jmoe.Routing` with an `oracle.Routing`: discrete fields exactly,
  float fields within `dtype`'s forward tolerance."""
  pre = f"{err_msg} " if err_msg else ""
  assert_equal(actual.expert_ids, expected.expert_ids, pre + "expert_ids")
  assert_equal(actual.kept, expected.kept, pre + "kept")
  assert_equal(actual.tokens_per_expert, expected.tokens_per_expert,
               pre + "tokens_per_expert")
  assert_equal(actual.dropped_count, expected.dropped_count, pre + "dropped_count")
  for field in ("logits", "probs", "weights", "load_balancing_loss", "router_z_loss"):
    assert_close(getattr(actual, field), np.asarray(getattr(expected, field)), dtype,
                 err_msg=pre + field)


def check_routing_dtypes(r, t: int, e: int, top_k: int) -> None:
  """The dtypes and shapes DESIGN.md fixes for a `Routing`."""
  want = {
      "logits": ((t, e), np.float32),
      "probs": ((t, e), np.float32),
      "expert_ids": ((t, top_k), np.int32),
      "weights": ((t, top_k), np.float32),
      "kept": ((t, top_k), np.bool_),
      "tokens_per_expert": ((e,), np.int32),
      "dropped_count": ((), np.int32),
      "load_balancing_loss": ((), np.float32),
      "router_z_loss": ((), np.float32),
  }
  for field, (shape, dtype) in want.items():
    a = getattr(r, field)
    assert tuple(a.shape) == shape, f"{field}: shape {a.shape}, expected {shape}"
    assert np.dtype(a.dtype) == np.dtype(dtype), (
        f"{field}: dtype {a.dtype}, expected {np.dtype(dtype)}")
