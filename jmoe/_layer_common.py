"""What the NNX and Linen layers share: option checks, initialisers and the math.

The Flax modules in `jmoe.nnx` and `jmoe.linen` only hold parameters and pick the
random key; everything they compute goes through the functions here, so both
front ends give the same numbers for the same parameters.

The MoE math itself is not written here: `moe_apply` calls the public `jmoe.moe`
(the energy bias goes in through its `logit_bias` argument), see DESIGN.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.nnx.nn import dtypes

from jmoe import api
from jmoe.expert_parallel import ExpertParallel
from jmoe.reference.activations import ACTIVATIONS, GATED_ACTIVATIONS
from jmoe.reference.routing import DROP_POLICIES
from jmoe.types import MoEParams

NORMS = ("rmsnorm", "layernorm")

# Names of the entries of the aux dict every layer returns.
AUX_KEYS = (
    "total_aux_loss",
    "load_balancing_loss",
    "router_z_loss",
    "tokens_per_expert",
    "dropped_count",
    "dropped_fraction",
)

# Router: small fan-in scaled init (Switch Transformer uses scale 0.1), so the
# first routing decisions are close to uniform.
default_router_init = jax.nn.initializers.variance_scaling(
    0.1, "fan_in", "truncated_normal"
)
# Expert kernels `[e, d_in, d_out]`: LeCun normal over `d_in`, one per expert.
default_kernel_init = jax.nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
)
# Attention kernels `qkv [d, 3, h, hd]` (fan-in d) and `out [h, hd, d]` (fan-in h*hd).
default_qkv_init = jax.nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(2, 3), batch_axis=(1,)
)
default_attn_out_init = jax.nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2
)


def up_width(activation: str, d_ff: int) -> int:
  """Columns of `up_kernel`: `2 * d_ff` for gated activations, else `d_ff`."""
  return 2 * d_ff if activation in GATED_ACTIVATIONS else d_ff


@dataclasses.dataclass(frozen=True)
class MoEOptions:
  """Static options of one MoE layer (hashable: a jit-static description).

  Attributes mirror the layer arguments; see `jmoe.nnx.MoELayer`.
  """

  d_model: int
  num_experts: int
  d_ff: int
  top_k: int
  capacity_factor: float | None = None
  activation: str = "swiglu"
  router_jitter: float = 0.0
  normalize_top_k: bool = True
  drop_policy: str = "token_order"
  load_balancing_loss_weight: float = 1e-2
  router_z_loss_weight: float = 1e-3
  expert_cost: tuple[float, ...] | None = None
  lambda_energy: float = 0.0
  backend: str = "auto"
  expert_parallel: ExpertParallel | None = None

  def __post_init__(self):
    for name in ("d_model", "num_experts", "d_ff", "top_k"):
      value = getattr(self, name)
      is_int = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
      if not is_int or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if self.top_k > self.num_experts:
      raise ValueError(
          f"top_k must be <= num_experts, got top_k={self.top_k}, "
          f"num_experts={self.num_experts}"
      )
    if self.activation not in ACTIVATIONS:
      raise ValueError(
          f"activation must be one of {ACTIVATIONS}, got {self.activation!r}"
      )
    if self.drop_policy not in DROP_POLICIES:
      raise ValueError(
          f"drop_policy must be one of {DROP_POLICIES}, got {self.drop_policy!r}"
      )
    if self.capacity_factor is not None and not self.capacity_factor > 0:
      raise ValueError(
          "capacity_factor must be None (dropless) or > 0, got "
          f"{self.capacity_factor!r}"
      )
    if not 0.0 <= self.router_jitter < 1.0:
      raise ValueError(f"router_jitter must be in [0, 1), got {self.router_jitter!r}")
    if self.lambda_energy < 0:
      raise ValueError(f"lambda_energy must be >= 0, got {self.lambda_energy!r}")
    if self.expert_parallel is not None and not isinstance(self.expert_parallel,
                                                           ExpertParallel):
      raise ValueError(
          "expert_parallel must be None or a jmoe.ExpertParallel(mesh, axis_name, ...), "
          f"got {type(self.expert_parallel).__name__}")
    if self.lambda_energy != 0.0 and self.expert_cost is None:
      raise ValueError(
          f"lambda_energy={self.lambda_energy} needs expert_cost, a [num_experts] "
          "vector of non-negative costs"
      )

  @property
  def energy_bias_on(self) -> bool:
    return self.expert_cost is not None and self.lambda_energy != 0.0

  def logit_bias(self) -> jax.Array | None:
    """`-lambda_energy * expert_cost` as a `[e]` float32 array, or None when off."""
    if not self.energy_bias_on:
      return None
    return -self.lambda_energy * jnp.asarray(self.expert_cost, jnp.float32)


def canonical_expert_cost(
    expert_cost: Any, num_experts: int
) -> tuple[float, ...] | None:
  """Checks `expert_cost` (`[num_experts]`, finite, >= 0) and returns it as a tuple.

  Raises:
    ValueError: wrong shape, negative or non-finite entries.
    TypeError: a traced (non-concrete) array: the cost is a static layer option.
  """
  if expert_cost is None:
    return None
  if isinstance(expert_cost, jax.core.Tracer):
    raise TypeError(
        "expert_cost must be concrete (a list, tuple or array known at construction), "
        "not a traced value"
    )
  cost = np.asarray(expert_cost, dtype=np.float64)
  if cost.shape != (num_experts,):
    raise ValueError(
        f"expert_cost must have shape [num_experts]=({num_experts},), got shape "
        f"{cost.shape}"
    )
  if not np.all(np.isfinite(cost)) or np.any(cost < 0):
    raise ValueError(
        f"expert_cost must be finite and non-negative, got {cost.tolist()}")
  return tuple(float(c) for c in cost)


def check_moe_input(x: jax.Array, d_model: int, name: str = "x") -> None:
  """Raises ValueError/TypeError at trace time unless `x` is float `[..., d_model]`."""
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{name} must be an array [..., d_model={d_model}], got {type(x)}")
  if x.ndim < 1 or x.shape[-1] != d_model:
    raise ValueError(
        f"{name} must have shape [..., d_model={d_model}], got shape {tuple(x.shape)}"
    )
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")


def _aux_dict(aux, options: MoEOptions) -> dict[str, jax.Array]:
  """Turns a `jmoe.MoEAux` into the layer's aux dict with the weighted total."""
  total = (
      options.load_balancing_loss_weight * aux.load_balancing_loss
      + options.router_z_loss_weight * aux.router_z_loss
  )
  return {
      "total_aux_loss": total.astype(jnp.float32),
      "load_balancing_loss": aux.load_balancing_loss,
      "router_z_loss": aux.router_z_loss,
      "tokens_per_expert": aux.tokens_per_expert,
      "dropped_count": aux.dropped_count,
      "dropped_fraction": aux.dropped_fraction,
  }


def moe_apply(
    x: jax.Array,
    router_kernel: jax.Array,
    up_kernel: jax.Array,
    down_kernel: jax.Array,
    *,
    options: MoEOptions,
    rng: jax.Array | None,
    deterministic: bool,
    dtype: Any = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The MoE feed-forward of a layer: `jmoe.moe` plus the optional energy bias
  (`ExpertParallel.moe` with `options.expert_parallel`).

  Router logits are `x @ router_kernel - lambda_energy * expert_cost` (the bias
  term only when `expert_cost` is set and `lambda_energy != 0`). Jitter
  (`x * uniform(1 - eps, 1 + eps)` on the router input only) is applied when
  `not deterministic and options.router_jitter > 0`.

  Args:
    x: `[..., d]` input.
    router_kernel: `[d, e]`.
    up_kernel: `[e, d, f]` or `[e, d, 2f]` for gated activations.
    down_kernel: `[e, f, d]`.
    options: static layer options.
    rng: key for the jitter (needed only when jitter is applied).
    deterministic: True in evaluation (no jitter).
    dtype: compute dtype (None: promote the input and parameter dtypes, as Flax).

  Returns:
    `(y [..., d], aux)`, aux a dict with the keys `AUX_KEYS`.
  """
  check_moe_input(x, options.d_model)
  x, router_kernel, up_kernel, down_kernel = dtypes.promote_dtype(
      (x, router_kernel, up_kernel, down_kernel), dtype=dtype
  )
  jitter = options.router_jitter if not deterministic else 0.0
  if jitter > 0.0 and rng is None:
    raise ValueError(
        "router_jitter > 0 in training needs a random key: give the layer an rngs "
        "stream 'router' (NNX) or call apply(..., rngs={'router': key}) (Linen), or "
        "run it with deterministic=True"
    )
  kwargs = dict(
      top_k=options.top_k,
      capacity_factor=options.capacity_factor,
      activation=options.activation,
      normalize_top_k=options.normalize_top_k,
      drop_policy=options.drop_policy,
      jitter_eps=jitter,
      rng=rng if jitter > 0.0 else None,
      backend=options.backend,
  )
  params = MoEParams(router_kernel, up_kernel, down_kernel)
  moe = api.moe if options.expert_parallel is None else options.expert_parallel.moe
  y, aux = moe(x, params, logit_bias=options.logit_bias(), **kwargs)
  return y, _aux_dict(aux, options)


# ----------------------------------------------------------------------------------
# Attention block pieces (shared by nnx.MoETransformerBlock / linen.MoETransformerBlock)
# ----------------------------------------------------------------------------------


def rope(x: jax.Array, *, base: float = 10000.0) -> jax.Array:
  """Rotary position embedding (rotate-half form) over axis -3 (positions).

  Args:
    x: `[batch, s, heads, hd]` with even `hd`.
    base: the frequency base.

  Returns:
    `x` rotated by its position, same shape and dtype (computed in float32).
  """
  s, hd = x.shape[-3], x.shape[-1]
  half = hd // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = jnp.arange(s, dtype=jnp.float32)[:, None] * inv_freq[None, :]  # [s, half]
  cos = jnp.cos(angles)[:, None, :]
  sin = jnp.sin(angles)[:, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., :half], xf[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def causal_self_attention(
    x: jax.Array,
    qkv_kernel: jax.Array,
    out_kernel: jax.Array,
    *,
    use_rope: bool = True,
    rope_base: float = 10000.0,
    dtype: Any = None,
) -> jax.Array:
  """Multi-head causal self-attention without biases.

  Args:
    x: `[..., s, d]`; all leading axes are batch axes.
    qkv_kernel: `[d, 3, h, hd]` (query, key, value projections).
    out_kernel: `[h, hd, d]`.
    use_rope: apply rotary position embeddings to queries and keys.
    rope_base: the RoPE frequency base.
    dtype: compute dtype (None: promote, as Flax).

  Returns:
    `[..., s, d]`.
  """
  if x.ndim < 2:
    raise ValueError(
        f"x must have shape [..., seq, d_model={qkv_kernel.shape[0]}], got shape "
        f"{tuple(x.shape)}"
    )
  x, qkv_kernel, out_kernel = dtypes.promote_dtype(
      (x, qkv_kernel, out_kernel), dtype=dtype
  )
  lead = x.shape[:-2]
  s, d = x.shape[-2:]
  xb = x.reshape((-1, s, d))
  qkv = jnp.einsum("bsd,dthk->bsthk", xb, qkv_kernel)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [b, s, h, hd]
  if use_rope:
    q, k = rope(q, base=rope_base), rope(k, base=rope_base)
  o = jax.nn.dot_product_attention(q, k, v, is_causal=True)  # [b, s, h, hd]
  y = jnp.einsum("bshk,hkd->bsd", o, out_kernel)
  return y.reshape(lead + (s, d))


def check_block_options(d_model: int, num_heads: int, norm: str) -> int:
  """Checks the attention options; returns the head width `d_model // num_heads`."""
  if num_heads < 1 or d_model % num_heads:
    raise ValueError(
        f"num_heads must divide d_model, got d_model={d_model}, num_heads={num_heads}"
    )
  head_dim = d_model // num_heads
  if head_dim % 2:
    raise ValueError(
        f"d_model // num_heads must be even for RoPE, got head_dim={head_dim}"
    )
  if norm not in NORMS:
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
  return head_dim


def sum_aux(auxes: Sequence[dict[str, jax.Array]]) -> dict[str, jax.Array]:
  """Sums the losses of several layers' aux dicts; stacks the statistics.

  Returns a dict with the summed `total_aux_loss`, `load_balancing_loss` and
  `router_z_loss` and, stacked over layers (`[layers, ...]`),
  `tokens_per_expert`, `dropped_count` and `dropped_fraction`.
  """
  out = {}
  for key in ("total_aux_loss", "load_balancing_loss", "router_z_loss"):
    out[key] = sum(a[key] for a in auxes)
  for key in ("tokens_per_expert", "dropped_count", "dropped_fraction"):
    out[key] = jnp.stack([a[key] for a in auxes])
  return out

