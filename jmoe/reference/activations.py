"""Expert activations in pure jnp (the epilogues of the Triton up-projection)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

ACTIVATIONS = ("gelu", "relu", "silu", "swiglu", "geglu")
GATED_ACTIVATIONS = ("swiglu", "geglu")


def is_gated(activation: str) -> bool:
  """True for activations whose up-projection is `[e, d, 2f]` (gate columns first)."""
  return activation in GATED_ACTIVATIONS


def apply_activation(h: jax.Array, activation: str) -> jax.Array:
  """Applies an expert activation.

  Args:
    h: `[..., f]`, or `[..., 2f]` for gated activations (`[..., :f]` is the gate).
    activation: one of `ACTIVATIONS`; `gelu` is the tanh approximation.

  Returns:
    `[..., f]`, same dtype as `h`.
  """
  if activation == "gelu":
    return jax.nn.gelu(h, approximate=True)
  if activation == "relu":
    return jax.nn.relu(h)
  if activation == "silu":
    return jax.nn.silu(h)
  f = h.shape[-1] // 2
  gate, up = h[..., :f], h[..., f:]
  if activation == "swiglu":
    return jax.nn.silu(gate) * up
  if activation == "geglu":
    return jax.nn.gelu(gate, approximate=True) * up
  raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
