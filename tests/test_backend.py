"""Backend selection (`jmoe._backend.resolve_backend`) and its reach into the API."""

from __future__ import annotations

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jmoe
from jmoe import _backend

TRITON_RUNS = _backend.triton_unavailable_reason() is None
cpu_only = pytest.mark.skipif(jax.default_backend() != "cpu",
                              reason="checks the behaviour on a CPU-only JAX")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
  monkeypatch.delenv(_backend.ENV_VAR, raising=False)


def _small_moe_inputs(rng, t=7, d=5, e=4, f=3):
  x = jnp.asarray(helpers.normal(rng, (t, d)))
  params = jmoe.MoEParams(*map(jnp.asarray, helpers.moe_params(rng, d, e, f, "silu")))
  return x, params


def test_env_var_name():
  assert _backend.ENV_VAR == "JMOE_BACKEND"
  assert set(_backend.BACKENDS) == {"auto", "triton", "reference", "interpret"}


@cpu_only
def test_auto_is_reference_on_cpu():
  assert jax.default_backend() == "cpu"
  assert _backend.resolve_backend("auto") == "reference"
  assert isinstance(_backend.triton_unavailable_reason(), str)


@pytest.mark.parametrize("name", ["reference", "interpret"])
def test_explicit_backends_resolve_to_themselves(name):
  assert _backend.resolve_backend(name) == name


@pytest.mark.parametrize("env", ["reference", "interpret"])
def test_env_overrides_auto(monkeypatch, env):
  monkeypatch.setenv("JMOE_BACKEND", env)
  assert _backend.resolve_backend("auto") == env


def test_env_overrides_auto_only(monkeypatch):
  monkeypatch.setenv("JMOE_BACKEND", "interpret")
  assert _backend.resolve_backend("reference") == "reference"
  monkeypatch.setenv("JMOE_BACKEND", "reference")
  assert _backend.resolve_backend("interpret") == "interpret"


def test_empty_env_is_ignored(monkeypatch):
  monkeypatch.setenv("JMOE_BACKEND", "")
  expected = "triton" if TRITON_RUNS else "reference"
  assert _backend.resolve_backend("auto") == expected


def test_bad_env_value(monkeypatch):
  monkeypatch.setenv("JMOE_BACKEND", "cuda")
  with pytest.raises(ValueError, match=r"JMOE_BACKEND.*'cuda'"):
    _backend.resolve_backend("auto")


@pytest.mark.parametrize("name", ["", "gpu", "Triton", "jnp", None])
def test_unknown_backend(name):
  with pytest.raises(ValueError, match=r"backend must be one of"):
    _backend.resolve_backend(name)


@cpu_only
def test_triton_on_cpu_raises_and_says_why():
  with pytest.raises(RuntimeError, match=r"backend='triton' cannot run here: .*cpu"):
    _backend.resolve_backend("triton")


@cpu_only
def test_env_triton_on_cpu_raises(monkeypatch):
  """An override to "triton" where it cannot run is an error, not a fallback."""
  monkeypatch.setenv("JMOE_BACKEND", "triton")
  with pytest.raises(RuntimeError, match=r"cannot run here"):
    _backend.resolve_backend("auto")


@cpu_only
def test_public_functions_refuse_triton_on_cpu(rng):
  """No silent fallback: every public function raises for backend='triton' here."""
  x, params = _small_moe_inputs(rng)
  calls = {
      "moe": lambda: jmoe.moe(x, params, top_k=2, activation="silu", backend="triton"),
      "route": lambda: jmoe.route(x, params.router_kernel, top_k=2, backend="triton"),
      "grouped_matmul": lambda: jmoe.grouped_matmul(
          x, params.down_kernel.transpose(0, 2, 1), jnp.array([3, 0, 2, 2], jnp.int32),
          backend="triton"),
      "expert_ffn": lambda: jmoe.expert_ffn(
          x, jnp.zeros((7, 1), jnp.int32), jnp.ones((7, 1)), jnp.ones((7, 1), bool),
          params.up_kernel, params.down_kernel, activation="silu", backend="triton"),
  }
  for name, call in calls.items():
    with pytest.raises(RuntimeError, match=r"cannot run here"):
      call()
    with pytest.raises(RuntimeError, match=r"cannot run here"):
      jax.jit(call)()
    del name


@cpu_only
def test_env_reaches_the_api(rng, monkeypatch):
  """JMOE_BACKEND is read when the public function resolves "auto"."""
  x, params = _small_moe_inputs(rng)
  monkeypatch.setenv("JMOE_BACKEND", "triton")
  with pytest.raises(RuntimeError, match=r"cannot run here"):
    jmoe.moe(x, params, top_k=2, activation="silu")
  # An explicit backend is not overridden.
  y, _ = jmoe.moe(x, params, top_k=2, activation="silu", backend="reference")
  monkeypatch.setenv("JMOE_BACKEND", "reference")
  y_env, _ = jmoe.moe(x, params, top_k=2, activation="silu")
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_env))


@cpu_only
def test_auto_matches_reference_on_cpu(rng):
  x, params = _small_moe_inputs(rng)
  y_auto, aux_auto = jmoe.moe(x, params, top_k=2, activation="silu")
  y_ref, aux_ref = jmoe.moe(x, params, top_k=2, activation="silu", backend="reference")
  np.testing.assert_array_equal(np.asarray(y_auto), np.asarray(y_ref))
  for a, b in zip(aux_auto, aux_ref):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
