"""pytest fixtures shared by jmoe's tests.

- `rng`: a numpy Generator seeded by the test's node id (fresh, reproducible).
- `x64`: runs the test with 64-bit types enabled, through the `jax.enable_x64`
  context (restored afterwards; x64 is a global flag, so never set it with
  `jax.config.update` in a test).
- Tests marked `gpu` are skipped where the Triton backend cannot run.
"""

from __future__ import annotations

import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.dirname(__file__))  # `import helpers`, `import oracle`

import helpers  # noqa: E402


@pytest.fixture
def rng(request):
  return helpers.rng_for(request.node.nodeid)


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


@pytest.fixture
def launched(monkeypatch):
  """`(name, keyword arguments)` of every kernel `jmoe.ops._call.kernel_call`
  launches, recorded at trace time: shows that an env-selected kernel or
  variant really ran (a reused trace records nothing)."""
  from jmoe.ops import _call  # pylint: disable=import-outside-toplevel

  calls = []
  original = _call.kernel_call

  def record(*args, **kwargs):
    calls.append((kwargs.get("name", ""), kwargs))
    return original(*args, **kwargs)

  monkeypatch.setattr(_call, "kernel_call", record)
  return calls


def _triton_unavailable_reason() -> str | None:
  try:
    from jmoe._backend import triton_unavailable_reason  # noqa: PLC0415
  except ImportError as e:  # pragma: no cover
    return f"jmoe._backend cannot be imported: {e}"
  return triton_unavailable_reason()


def pytest_collection_modifyitems(config, items):
  del config
  gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
  if not gpu_items:
    return
  reason = _triton_unavailable_reason()
  if reason is None:
    return
  skip = pytest.mark.skip(reason=f"needs the Triton GPU backend: {reason}")
  for item in gpu_items:
    item.add_marker(skip)
