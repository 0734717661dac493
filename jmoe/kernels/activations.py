"""Activation functions and their derivatives for Triton epilogues.

Only `@triton.jit` code (no jax import). `ACTIVATION` is a constexpr string:
`"gelu"` (tanh approximation, as `jax.nn.gelu(approximate=True)`), `"relu"`,
`"silu"`; the gated `"swiglu"` / `"geglu"` use `"silu"` / `"gelu"` on the gate
(see `gate_activation`). All math is float32.
"""

import triton
import triton.language as tl

_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_GELU_C = tl.constexpr(0.044715)


@triton.jit
def _tanh(x):
  # tanh(x) = 1 - 2 / (exp(2x) + 1): exact limits +-1 when exp overflows / underflows.
  return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _sigmoid(x):
  return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def act_fwd(x, ACTIVATION: tl.constexpr):
  """act(x) for a float32 tile; ACTIVATION in gelu, relu, silu."""
  if ACTIVATION == "gelu":
    inner = _SQRT_2_OVER_PI * (x + _GELU_C * x * x * x)
    y = 0.5 * x * (1.0 + _tanh(inner))
  elif ACTIVATION == "relu":
    y = tl.maximum(x, 0.0)
  else:
    tl.static_assert(ACTIVATION == "silu")
    y = x * _sigmoid(x)
  return y


@triton.jit
def act_fwd_and_grad(x, ACTIVATION: tl.constexpr):
  """(act(x), act'(x)) for a float32 tile; ACTIVATION in gelu, relu, silu."""
  if ACTIVATION == "gelu":
    inner = _SQRT_2_OVER_PI * (x + _GELU_C * x * x * x)
    th = _tanh(inner)
    y = 0.5 * x * (1.0 + th)
    dy = 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * _SQRT_2_OVER_PI * (
        1.0 + 3.0 * _GELU_C * x * x
    )
  elif ACTIVATION == "relu":
    y = tl.maximum(x, 0.0)
    dy = tl.where(x > 0.0, 1.0, 0.0)
  else:
    tl.static_assert(ACTIVATION == "silu")
    s = _sigmoid(x)
    y = x * s
    dy = s * (1.0 + x * (1.0 - s))
  return y, dy
