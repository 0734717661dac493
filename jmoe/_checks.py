"""Shape, dtype and option validation shared by the public functions.

Every check raises at trace time (shapes are static) with a message naming the
argument, what was expected and what was given.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jmoe import _shard
from jmoe.reference.activations import ACTIVATIONS, is_gated
from jmoe.reference.routing import DROP_POLICIES

FLOAT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)
# Operand dtypes of the TMA kernels (tiles sized for 2-byte elements).
HALF_DTYPES = (jnp.bfloat16, jnp.float16)
MAX_TOP_K = 8
MAX_EXPERTS = 256


def is_dtype(dtype, dtypes) -> bool:
  """Whether `dtype` (anything `np.dtype` takes) is one of `dtypes`."""
  return any(np.dtype(dtype) == np.dtype(d) for d in dtypes)


def check_float_array(name: str, x, ndim: int | None = None, shape_doc: str = "") -> None:
  """Checks `x` is a floating array of rank `ndim` (if given)."""
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{name} must be an array{shape_doc}, got {type(x).__name__}")
  if ndim is not None and x.ndim != ndim:
    raise ValueError(f"{name} must have rank {ndim}{shape_doc}, got shape {x.shape}")
  if not any(x.dtype == d for d in FLOAT_DTYPES):
    raise TypeError(
        f"{name} must be float16, bfloat16, float32 or float64, got dtype {x.dtype}"
    )


def check_top_k(top_k, num_experts: int) -> None:
  if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
    raise TypeError(f"top_k must be a python int, got {top_k!r}")
  if not 1 <= top_k <= min(MAX_TOP_K, num_experts):
    raise ValueError(
        f"top_k must be in [1, min({MAX_TOP_K}, num_experts={num_experts})], got {top_k}"
    )


def check_num_experts(num_experts: int) -> None:
  if not 1 <= num_experts <= MAX_EXPERTS:
    raise ValueError(f"num_experts must be in [1, {MAX_EXPERTS}], got {num_experts}")


def check_capacity_factor(capacity_factor) -> None:
  if capacity_factor is None:
    return
  if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, numbers.Real):
    raise TypeError(
        f"capacity_factor must be a python float or None (dropless), got {capacity_factor!r}"
    )
  if not capacity_factor > 0:
    raise ValueError(f"capacity_factor must be > 0 or None (dropless), got {capacity_factor}")


def check_activation(activation) -> None:
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def check_drop_policy(drop_policy) -> None:
  if drop_policy not in DROP_POLICIES:
    raise ValueError(f"drop_policy must be one of {DROP_POLICIES}, got {drop_policy!r}")


def check_jitter(jitter_eps, rng) -> None:
  if isinstance(jitter_eps, bool) or not isinstance(jitter_eps, numbers.Real):
    raise TypeError(f"jitter_eps must be a python float, got {jitter_eps!r}")
  if not 0.0 <= jitter_eps < 1.0:
    raise ValueError(f"jitter_eps must be in [0, 1), got {jitter_eps}")
  if jitter_eps > 0 and rng is None:
    raise ValueError("jitter_eps > 0 needs rng (a jax.random key), got rng=None")


def check_routing_options(e: int, *, top_k, capacity_factor, drop_policy, jitter_eps, rng,
                          logit_bias) -> None:
  """The routing arguments shared by `route`, `moe` and `moe_expert_parallel`."""
  check_top_k(top_k, e)
  check_capacity_factor(capacity_factor)
  check_drop_policy(drop_policy)
  check_jitter(jitter_eps, rng)
  check_logit_bias(logit_bias, e)


def check_tokens(x, name: str = "x", *, token_split_ok: bool = False) -> tuple[int, int]:
  """Checks `x [..., d]` has at least one token; returns `(t, d)`.

  `token_split_ok`: the caller runs on each shard of tokens split over explicit
  mesh axes (`jmoe._token_shards`); a split feature axis always raises."""
  check_float_array(name, x, shape_doc=" [..., d]")
  if x.ndim < 1:
    raise ValueError(f"{name} must have shape [..., d], got a scalar")
  t = int(np.prod(x.shape[:-1], dtype=np.int64))
  if t < 1 or x.shape[-1] < 1:
    raise ValueError(f"{name} must hold at least one token of width >= 1, got shape {x.shape}")
  _shard.check_token_split(name, x, tokens_ok=token_split_ok)
  return t, x.shape[-1]


def check_router_kernel(router_kernel, d: int) -> int:
  """Checks `router_kernel [d, e]`; returns `e`."""
  check_float_array("router_kernel", router_kernel, 2, " [d, e]")
  if router_kernel.shape[0] != d:
    raise ValueError(
        f"router_kernel must have shape [d={d}, e], got {router_kernel.shape}"
    )
  check_num_experts(router_kernel.shape[1])
  return router_kernel.shape[1]


def check_logit_bias(logit_bias, e: int) -> None:
  if logit_bias is None:
    return
  check_float_array("logit_bias", logit_bias, 1, f" [e={e}]")
  if logit_bias.shape != (e,):
    raise ValueError(f"logit_bias must have shape [e={e}], got {logit_bias.shape}")


def check_expert_kernels(up_kernel, down_kernel, d: int, e: int, activation: str) -> int:
  """Checks `up_kernel [e, d, f or 2f]` and `down_kernel [e, f, d]`; returns `f`."""
  gated = is_gated(activation)
  up_doc = f" [e={e}, d={d}, {'2f' if gated else 'f'}]"
  check_float_array("up_kernel", up_kernel, 3, up_doc)
  check_float_array("down_kernel", down_kernel, 3, f" [e={e}, f, d={d}]")
  if up_kernel.shape[:2] != (e, d):
    raise ValueError(f"up_kernel must have shape{up_doc}, got {up_kernel.shape}")
  width = up_kernel.shape[2]
  if gated and width % 2:
    raise ValueError(
        f"up_kernel for gated activation {activation!r} must have an even last "
        f"dimension 2f (gate columns first), got shape {up_kernel.shape}"
    )
  f = width // 2 if gated else width
  if down_kernel.shape != (e, f, d):
    raise ValueError(
        f"down_kernel must have shape [e={e}, f={f}, d={d}] to match up_kernel "
        f"{up_kernel.shape} and activation {activation!r}, got {down_kernel.shape}"
    )
  return f


def check_grouped_matmul(lhs, rhs, group_sizes) -> None:
  """Checks `lhs [m, k]`, `rhs [g, k, n]`, `group_sizes [g]` integer."""
  check_float_array("lhs", lhs, 2, " [m, k]")
  check_float_array("rhs", rhs, 3, " [g, k, n]")
  _shard.check_token_split("lhs", lhs, tokens_ok=False)
  if rhs.shape[1] != lhs.shape[1]:
    raise ValueError(
        f"rhs must have shape [g, k={lhs.shape[1]}, n] to match lhs {lhs.shape}, "
        f"got {rhs.shape}"
    )
  if not hasattr(group_sizes, "dtype") or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise TypeError(
        "group_sizes must be an integer array [g] (int32), got "
        f"{getattr(group_sizes, 'dtype', type(group_sizes).__name__)}"
    )
  if group_sizes.shape != (rhs.shape[0],):
    raise ValueError(
        f"group_sizes must have shape [g={rhs.shape[0]}], got {group_sizes.shape}"
    )


def check_moe_dtypes(backend: str, x: jax.Array, params) -> None:
  """`check_kernel_dtype` of `x` and an `MoEParams`' three kernels."""
  check_kernel_dtype(backend, x=x, router_kernel=params.router_kernel,
                     up_kernel=params.up_kernel, down_kernel=params.down_kernel)


def check_kernel_dtype(backend: str, **arrays: jax.Array) -> None:
  """The Triton backends take float16, bfloat16 and float32."""
  if backend == "reference":
    return
  for name, a in arrays.items():
    if a is not None and a.dtype == jnp.float64:
      raise TypeError(
          f"{name} is float64, which backend={backend!r} does not support; "
          "use float32/bfloat16/float16 or backend='reference'"
      )
