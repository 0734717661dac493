"""Flax NNX layers: `MoELayer` and `MoETransformerBlock`.

The layers hold parameters and a random stream and call the public functional
API (`jmoe.moe`); `jmoe.linen` has the same layers with the same parameter names
and gives the same outputs for the same parameters.

Example usage::

  >>> import jax, jax.numpy as jnp
  >>> from flax import nnx
  >>> import jmoe.nnx
  >>> layer = jmoe.nnx.MoELayer(16, 4, 32, 2, backend="reference", rngs=nnx.Rngs(0))
  >>> y, aux = layer(jnp.ones((2, 5, 16)))
  >>> y.shape, aux["tokens_per_expert"].shape
  ((2, 5, 16), (4,))
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import rnglib

from jmoe import _layer_common as common
from jmoe.expert_parallel import ExpertParallel

Initializer = Any


class MoELayer(nnx.Module):
  """Mixture-of-Experts feed-forward layer (top-k softmax router + expert FFNs).

  Example usage::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import jmoe.nnx
    >>> layer = jmoe.nnx.MoELayer(
    ...     d_model=16, num_experts=4, d_ff=32, top_k=2, backend="reference",
    ...     rngs=nnx.Rngs(0))
    >>> layer.up_kernel.shape   # swiglu: gate and up columns
    (4, 16, 64)
    >>> y, aux = layer(jnp.ones((3, 16)))
    >>> y.shape, sorted(aux)[:2]
    ((3, 16), ['dropped_count', 'dropped_fraction'])

  Parameters: `router_kernel [d_model, num_experts]`, `up_kernel
  [num_experts, d_model, d_ff]` (`[num_experts, d_model, 2 * d_ff]` for the gated
  activations, gate columns first) and `down_kernel [num_experts, d_ff, d_model]`.

  Router logits are `x @ router_kernel - lambda_energy * expert_cost` (energy-aware
  routing; the bias term is off unless both `expert_cost` and `lambda_energy` are
  set). In training (`deterministic=False`) with `router_jitter > 0` the router
  input is multiplied by `uniform(1 - router_jitter, 1 + router_jitter)` noise
  drawn from the `"router"` rng stream (the `"default"` stream if absent); the
  experts always see the clean input. `model.eval()` / `model.train()` set
  `deterministic`.

  Args:
    d_model: input and output width `d`.
    num_experts: `e`.
    d_ff: expert hidden width `f`.
    top_k: experts per token.
    capacity_factor: None (default) is dropless; else each expert keeps at most
      `ceil(capacity_factor * t * top_k / e)` token copies.
    activation: `"swiglu"` (default), `"geglu"`, `"gelu"`, `"relu"` or `"silu"`.
    router_jitter: multiplicative router-input noise in training (default 0).
    normalize_top_k: renormalise the top-k weights to sum to 1 (default True).
    drop_policy: `"token_order"` (default) or `"probability"`.
    load_balancing_loss_weight: weight in `aux["total_aux_loss"]` (default 1e-2).
    router_z_loss_weight: weight in `aux["total_aux_loss"]` (default 1e-3).
    expert_cost: optional `[num_experts]` non-negative cost per expert (static).
    lambda_energy: strength of the energy bias (default 0: off).
    deterministic: evaluation mode, no jitter (default False).
    dtype: compute dtype (None: promoted from the input and parameter dtypes).
    param_dtype: parameter dtype (default float32).
    router_init: initialiser of `router_kernel` (fan-in scaled, scale 0.1).
    kernel_init: initialiser of the expert kernels (`[e, d_in, d_out]`, LeCun
      normal over `d_in`).
    backend: `"auto"`, `"triton"`, `"reference"` or `"interpret"`.
    expert_parallel: a `jmoe.ExpertParallel` to split the experts over a mesh
      axis (`jmoe.moe_expert_parallel`; x's leading axis is split over its
      token axes); None (default): `jmoe.moe`.
    rngs: `nnx.Rngs` with a `"params"` stream (and `"router"` for jitter).
  """

  def __init__(
      self,
      d_model: int,
      num_experts: int,
      d_ff: int,
      top_k: int,
      *,
      capacity_factor: float | None = None,
      activation: str = "swiglu",
      router_jitter: float = 0.0,
      normalize_top_k: bool = True,
      drop_policy: str = "token_order",
      load_balancing_loss_weight: float = 1e-2,
      router_z_loss_weight: float = 1e-3,
      expert_cost: Any = None,
      lambda_energy: float = 0.0,
      deterministic: bool = False,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      router_init: Initializer = common.default_router_init,
      kernel_init: Initializer = common.default_kernel_init,
      backend: str = "auto",
      expert_parallel: ExpertParallel | None = None,
      rngs: rnglib.Rngs,
  ):
    self.options = common.MoEOptions(
        d_model=d_model,
        num_experts=num_experts,
        d_ff=d_ff,
        top_k=top_k,
        capacity_factor=capacity_factor,
        activation=activation,
        router_jitter=float(router_jitter),
        normalize_top_k=normalize_top_k,
        drop_policy=drop_policy,
        load_balancing_loss_weight=float(load_balancing_loss_weight),
        router_z_loss_weight=float(router_z_loss_weight),
        expert_cost=common.canonical_expert_cost(expert_cost, num_experts),
        lambda_energy=float(lambda_energy),
        backend=backend,
        expert_parallel=expert_parallel,
    )
    self.deterministic = deterministic
    self.dtype = dtype
    self.param_dtype = param_dtype
    up = common.up_width(activation, d_ff)
    self.router_kernel = nnx.Param(
        router_init(rngs.params(), (d_model, num_experts), param_dtype)
    )
    self.up_kernel = nnx.Param(
        kernel_init(rngs.params(), (num_experts, d_model, up), param_dtype)
    )
    self.down_kernel = nnx.Param(
        kernel_init(rngs.params(), (num_experts, d_ff, d_model), param_dtype)
    )
    if router_jitter > 0:
      self.rngs = rngs["router"].fork()
    else:
      self.rngs = nnx.data(None)

  def __call__(
      self,
      x: jax.Array,
      *,
      deterministic: bool | None = None,
      rngs: rnglib.Rngs | rnglib.RngStream | jax.Array | None = None,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Applies the layer.

    Args:
      x: `[..., d_model]`; all leading axes are tokens (capacity and losses are
        taken over all of them).
      deterministic: overrides the `deterministic` attribute.
      rngs: overrides the layer's `"router"` stream (an `nnx.Rngs`, a stream or a
        key) for the jitter.

    Returns:
      `(y, aux)`: `y [..., d_model]` in the compute dtype; `aux` a dict with
      `total_aux_loss` (`load_balancing_loss_weight * load_balancing_loss +
      router_z_loss_weight * router_z_loss`), `load_balancing_loss`,
      `router_z_loss`, `tokens_per_expert [e]` int32, `dropped_count` int32 and
      `dropped_fraction` float32.
    """
    deterministic = self.deterministic if deterministic is None else deterministic
    rng = None
    if not deterministic and self.options.router_jitter > 0:
      rng = _key_from(rngs if rngs is not None else self.rngs)
    return common.moe_apply(
        x,
        self.router_kernel[...],
        self.up_kernel[...],
        self.down_kernel[...],
        options=self.options,
        rng=rng,
        deterministic=deterministic,
        dtype=self.dtype,
    )

  def set_view(self, deterministic: bool | None = None):
    """Used by `nnx.view`: `deterministic=True` turns the jitter off."""
    if deterministic is not None:
      self.deterministic = deterministic


def _key_from(rngs) -> jax.Array | None:
  if rngs is None:
    return None
  if isinstance(rngs, rnglib.Rngs):
    return rngs["router"]()
  if isinstance(rngs, rnglib.RngStream):
    return rngs()
  if isinstance(rngs, jax.Array):
    return rngs
  raise TypeError(f"rngs must be an nnx.Rngs, RngStream or key, got {type(rngs)}")


class CausalSelfAttention(nnx.Module):
  """Multi-head causal self-attention without biases, with optional RoPE.

  Parameters: `qkv_kernel [d_model, 3, num_heads, head_dim]` and `out_kernel
  [num_heads, head_dim, d_model]`. Input `[..., seq, d_model]`.
  """

  def __init__(
      self,
      d_model: int,
      num_heads: int,
      *,
      use_rope: bool = True,
      rope_base: float = 10000.0,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      qkv_init: Initializer = common.default_qkv_init,
      out_init: Initializer = common.default_attn_out_init,
      rngs: rnglib.Rngs,
  ):
    head_dim = common.check_block_options(d_model, num_heads, "rmsnorm")
    self.use_rope = use_rope
    self.rope_base = rope_base
    self.dtype = dtype
    self.qkv_kernel = nnx.Param(
        qkv_init(rngs.params(), (d_model, 3, num_heads, head_dim), param_dtype)
    )
    self.out_kernel = nnx.Param(
        out_init(rngs.params(), (num_heads, head_dim, d_model), param_dtype)
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    return common.causal_self_attention(
        x, self.qkv_kernel[...], self.out_kernel[...], use_rope=self.use_rope,
        rope_base=self.rope_base, dtype=self.dtype,
    )


def _norm(norm: str, d_model: int, dtype, param_dtype, rngs):
  if norm == "rmsnorm":
    return nnx.RMSNorm(d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
  return nnx.LayerNorm(d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class MoETransformerBlock(nnx.Module):
  """Pre-norm transformer block: causal self-attention, then an MoE feed-forward.

  `h = x + attn(norm1(x))`, `y = h + moe(norm2(h))`; returns `(y, aux)` with the
  MoE layer's aux dict.

  Example usage::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import jmoe.nnx
    >>> block = jmoe.nnx.MoETransformerBlock(
    ...     32, 4, num_experts=4, d_ff=64, top_k=2, backend="reference",
    ...     rngs=nnx.Rngs(0))
    >>> y, aux = block(jnp.ones((2, 10, 32)))
    >>> y.shape
    (2, 10, 32)

  Submodules: `attn_norm`, `attn` (`CausalSelfAttention`), `moe_norm`, `moe`
  (`MoELayer`).

  Args:
    d_model: model width.
    num_heads: attention heads (must divide `d_model`; head width even).
    num_experts, d_ff, top_k: as in `MoELayer`.
    norm: `"rmsnorm"` (default) or `"layernorm"`.
    use_rope: rotary position embeddings in attention (default True).
    rope_base: RoPE frequency base (default 10000).
    dtype, param_dtype: as in `MoELayer`.
    rngs: `nnx.Rngs`.
    **moe_kwargs: the remaining `MoELayer` options (capacity_factor, activation,
      router_jitter, ..., backend).
  """

  def __init__(
      self,
      d_model: int,
      num_heads: int,
      num_experts: int,
      d_ff: int,
      top_k: int,
      *,
      norm: str = "rmsnorm",
      use_rope: bool = True,
      rope_base: float = 10000.0,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      rngs: rnglib.Rngs,
      **moe_kwargs,
  ):
    common.check_block_options(d_model, num_heads, norm)
    self.attn_norm = _norm(norm, d_model, dtype, param_dtype, rngs)
    self.attn = CausalSelfAttention(
        d_model, num_heads, use_rope=use_rope, rope_base=rope_base, dtype=dtype,
        param_dtype=param_dtype, rngs=rngs,
    )
    self.moe_norm = _norm(norm, d_model, dtype, param_dtype, rngs)
    self.moe = MoELayer(
        d_model, num_experts, d_ff, top_k, dtype=dtype, param_dtype=param_dtype,
        rngs=rngs, **moe_kwargs,
    )

  def __call__(
      self,
      x: jax.Array,
      *,
      deterministic: bool | None = None,
      rngs: rnglib.Rngs | rnglib.RngStream | jax.Array | None = None,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Applies the block to `x [..., seq, d_model]`; returns `(y, aux)`."""
    h = x + self.attn(self.attn_norm(x))
    m, aux = self.moe(self.moe_norm(h), deterministic=deterministic, rngs=rngs)
    return h + m, aux
