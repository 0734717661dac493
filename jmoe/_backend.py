"""Backend selection: the only module that turns `backend="auto"` into a concrete backend."""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Literal

import jax

Backend = Literal["auto", "triton", "reference", "interpret"]
BACKENDS = ("auto", "triton", "reference", "interpret")
ENV_VAR = "JMOE_BACKEND"


@functools.cache
def triton_unavailable_reason() -> str | None:
  """Why the Triton GPU backend cannot run here, or None if it can."""
  try:
    platform = jax.default_backend()
  except RuntimeError as e:  # pragma: no cover
    return f"JAX has no backend: {e}"
  if platform != "gpu":
    return f"JAX's default backend is {platform!r}, not a CUDA 'gpu'"
  if not any("cuda" in d.client.platform_version.lower() for d in jax.devices("gpu")):
    return "the JAX GPU backend is not CUDA"
  if importlib.util.find_spec("triton") is None:
    return "the 'triton' package is not installed"
  try:
    import jax_triton  # noqa: F401  pylint: disable=import-outside-toplevel
  except ImportError as e:
    return f"'jax_triton' cannot be imported ({e}); install jax-triton==0.3.1"
  return None


def resolve_backend(backend: str) -> str:
  """Returns "triton", "reference" or "interpret" for a requested backend.

  `"auto"` is Triton on a CUDA GPU and the reference elsewhere; the environment
  variable `JMOE_BACKEND` overrides `"auto"` (and only `"auto"`).

  Raises:
    ValueError: `backend` (or `JMOE_BACKEND`) is not a known backend name.
    RuntimeError: `"triton"` was asked for where it cannot run.
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if backend == "auto":
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
      if env not in BACKENDS:
        raise ValueError(
            f"environment variable {ENV_VAR} must be one of {BACKENDS}, got {env!r}"
        )
      backend = env
  if backend == "auto":
    return "triton" if triton_unavailable_reason() is None else "reference"
  if backend == "triton":
    reason = triton_unavailable_reason()
    if reason is not None:
      raise RuntimeError(
          f"backend='triton' cannot run here: {reason}. Use backend='reference' "
          "(pure jnp) or backend='interpret' (Triton interpreter on CPU)."
      )
  if backend == "interpret" and importlib.util.find_spec("triton") is None:
    raise RuntimeError("backend='interpret' needs the 'triton' package installed")
  return backend
