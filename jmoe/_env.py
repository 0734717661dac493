"""Reading jmoe's `JMOE_*` environment switches (one place for the parsing)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping


def env_value(name: str, default: str) -> str:
  """`$name` stripped, or `default` when unset or blank."""
  return os.environ.get(name, default).strip() or default


def env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
  """`$name` (default `default`), which must be one of `choices`.

  Raises:
    ValueError: naming the variable, the allowed values and the value found.
  """
  value = env_value(name, default)
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {value!r}")
  return value


def env_flag(name: str, default: bool) -> bool:
  """`$name` as a switch: "0", "false" or "False" is off, any other value on."""
  return env_value(name, "1" if default else "0") not in ("0", "false", "False")


def env_int(name: str, default: int, minimum: int = 0) -> int:
  """`$name` as an integer >= `minimum` (default `default`).

  Raises:
    ValueError: naming the variable, the range and the value found.
  """
  raw = env_value(name, str(default))
  try:
    value = int(raw)
  except ValueError:
    value = minimum - 1
  if value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {raw!r}")
  return value


@contextlib.contextmanager
def env_overrides(values: Mapping[str, str]) -> Iterator[None]:
  """Sets the environment variables in `values` for the `with` block, then
  restores each one (unset again if it was unset). jmoe reads its switches
  when an op is traced, so trace inside the block."""
  saved = {name: os.environ.get(name) for name in values}
  os.environ.update(values)
  try:
    yield
  finally:
    for name, value in saved.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value
