"""Flax Linen layers: `MoELayer` and `MoETransformerBlock`.

Same fields, parameter names and numbers as `jmoe.nnx`; the math is shared in
`jmoe._layer_common` and goes through the public `jmoe.moe`.

Example usage::

  >>> import jax, jax.numpy as jnp
  >>> import jmoe.linen
  >>> layer = jmoe.linen.MoELayer(16, 4, 32, 2, backend="reference")
  >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 5, 16)))
  >>> (y, aux) = layer.apply(variables, jnp.ones((2, 5, 16)))
  >>> y.shape, variables["params"]["up_kernel"].shape
  ((2, 5, 16), (4, 16, 64))
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmoe import _layer_common as common
from jmoe.expert_parallel import ExpertParallel

Initializer = Any


class MoELayer(nn.Module):
  """Mixture-of-Experts feed-forward layer (top-k softmax router + expert FFNs).

  Example usage::

    >>> import jax, jax.numpy as jnp
    >>> import jmoe.linen
    >>> layer = jmoe.linen.MoELayer(16, 4, 32, 2, router_jitter=0.01,
    ...                             backend="reference")
    >>> x = jnp.ones((3, 16))
    >>> variables = layer.init(jax.random.key(0), x, deterministic=True)
    >>> y, aux = layer.apply(variables, x, deterministic=False,
    ...                      rngs={"router": jax.random.key(1)})
    >>> y.shape
    (3, 16)

  Parameters: `router_kernel [d_model, num_experts]`, `up_kernel
  [num_experts, d_model, d_ff]` (`[num_experts, d_model, 2 * d_ff]` for gated
  activations, gate columns first) and `down_kernel [num_experts, d_ff, d_model]`.

  Router logits are `x @ router_kernel - lambda_energy * expert_cost` (the bias
  term only when both are set). In training (`deterministic=False`) with
  `router_jitter > 0`, the router input is multiplied by
  `uniform(1 - router_jitter, 1 + router_jitter)` noise from
  `self.make_rng("router")`; the experts see the clean input.

  Attributes:
    d_model: input and output width `d`.
    num_experts: `e`.
    d_ff: expert hidden width `f`.
    top_k: experts per token.
    capacity_factor: None (default) dropless; else per-expert capacity
      `ceil(capacity_factor * t * top_k / e)`.
    activation: `"swiglu"` (default), `"geglu"`, `"gelu"`, `"relu"`, `"silu"`.
    router_jitter: multiplicative router-input noise in training (default 0).
    normalize_top_k: renormalise the top-k weights (default True).
    drop_policy: `"token_order"` (default) or `"probability"`.
    load_balancing_loss_weight: weight in `aux["total_aux_loss"]` (default 1e-2).
    router_z_loss_weight: weight in `aux["total_aux_loss"]` (default 1e-3).
    expert_cost: optional `[num_experts]` non-negative costs (a tuple or array).
    lambda_energy: strength of the energy bias (default 0: off).
    deterministic: evaluation mode (no jitter); the call argument overrides it.
      When neither is given, the layer is deterministic if `router_jitter == 0`
      and raises otherwise.
    dtype: compute dtype (None: promoted from input and parameters).
    param_dtype: parameter dtype (default float32).
    router_init, kernel_init: initialisers (as `jmoe.nnx.MoELayer`).
    backend: `"auto"`, `"triton"`, `"reference"` or `"interpret"`.
    expert_parallel: a `jmoe.ExpertParallel` (as `jmoe.nnx.MoELayer`); None:
      `jmoe.moe`.
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
  expert_cost: Any = None
  lambda_energy: float = 0.0
  deterministic: bool | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  router_init: Initializer = common.default_router_init
  kernel_init: Initializer = common.default_kernel_init
  backend: str = "auto"
  expert_parallel: ExpertParallel | None = None

  def _options(self) -> common.MoEOptions:
    return common.MoEOptions(
        d_model=self.d_model,
        num_experts=self.num_experts,
        d_ff=self.d_ff,
        top_k=self.top_k,
        capacity_factor=self.capacity_factor,
        activation=self.activation,
        router_jitter=float(self.router_jitter),
        normalize_top_k=self.normalize_top_k,
        drop_policy=self.drop_policy,
        load_balancing_loss_weight=float(self.load_balancing_loss_weight),
        router_z_loss_weight=float(self.router_z_loss_weight),
        expert_cost=common.canonical_expert_cost(self.expert_cost, self.num_experts),
        lambda_energy=float(self.lambda_energy),
        backend=self.backend,
        expert_parallel=self.expert_parallel,
    )

  @nn.compact
  def __call__(
      self, x: jax.Array, deterministic: bool | None = None
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Applies the layer to `x [..., d_model]`; returns `(y, aux)` (see `jmoe.nnx`)."""
    options = self._options()
    deterministic = _resolve_deterministic(
        deterministic, self.deterministic, options.router_jitter
    )
    up = common.up_width(self.activation, self.d_ff)
    e, d, f = self.num_experts, self.d_model, self.d_ff
    pd = self.param_dtype
    router_kernel = self.param("router_kernel", self.router_init, (d, e), pd)
    up_kernel = self.param("up_kernel", self.kernel_init, (e, d, up), pd)
    down_kernel = self.param("down_kernel", self.kernel_init, (e, f, d), pd)
    rng = None
    if not deterministic and options.router_jitter > 0:
      rng = self.make_rng("router")
    return common.moe_apply(
        x, router_kernel, up_kernel, down_kernel, options=options, rng=rng,
        deterministic=deterministic, dtype=self.dtype,
    )


def _resolve_deterministic(call_arg, field, router_jitter) -> bool:
  value = call_arg if call_arg is not None else field
  if value is None:
    if router_jitter > 0:
      raise ValueError(
          "MoELayer with router_jitter > 0 needs deterministic=True/False, as a "
          "field or a call argument (e.g. layer.apply(v, x, deterministic=False, "
          "rngs={'router': key}))"
      )
    return True
  return bool(value)


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention without biases, with optional RoPE.

  Parameters: `qkv_kernel [d_model, 3, num_heads, head_dim]` and `out_kernel
  [num_heads, head_dim, d_model]`; the width is taken from the input.
  """

  num_heads: int
  use_rope: bool = True
  rope_base: float = 10000.0
  dtype: Any = None
  param_dtype: Any = jnp.float32
  qkv_init: Initializer = common.default_qkv_init
  out_init: Initializer = common.default_attn_out_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    head_dim = common.check_block_options(d, self.num_heads, "rmsnorm")
    qkv_kernel = self.param(
        "qkv_kernel", self.qkv_init, (d, 3, self.num_heads, head_dim), self.param_dtype
    )
    out_kernel = self.param(
        "out_kernel", self.out_init, (self.num_heads, head_dim, d), self.param_dtype
    )
    return common.causal_self_attention(
        x, qkv_kernel, out_kernel, use_rope=self.use_rope, rope_base=self.rope_base,
        dtype=self.dtype,
    )


class MoETransformerBlock(nn.Module):
  """Pre-norm transformer block: causal self-attention, then an MoE feed-forward.

  `h = x + attn(norm1(x))`, `y = h + moe(norm2(h))`; returns `(y, aux)`.
  Submodules `attn_norm`, `attn`, `moe_norm`, `moe` (as `jmoe.nnx`).

  Attributes:
    d_model, num_heads, num_experts, d_ff, top_k: sizes.
    norm: `"rmsnorm"` (default) or `"layernorm"`.
    use_rope, rope_base: rotary position embeddings in attention.
    dtype, param_dtype: as `MoELayer`.
    moe_kwargs: the other `MoELayer` fields as a dict (or tuple of pairs), e.g.
      `{"capacity_factor": 1.25, "backend": "reference"}`.
    deterministic: as `MoELayer.deterministic`.
  """

  d_model: int
  num_heads: int
  num_experts: int
  d_ff: int
  top_k: int
  norm: str = "rmsnorm"
  use_rope: bool = True
  rope_base: float = 10000.0
  dtype: Any = None
  param_dtype: Any = jnp.float32
  moe_kwargs: Any = None
  deterministic: bool | None = None

  def _norm(self, name: str):
    if self.norm == "rmsnorm":
      return nn.RMSNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    return nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=name)

  @nn.compact
  def __call__(
      self, x: jax.Array, deterministic: bool | None = None
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Applies the block to `x [..., seq, d_model]`; returns `(y, aux)`."""
    common.check_block_options(self.d_model, self.num_heads, self.norm)
    common.check_moe_input(x, self.d_model)
    moe_kwargs = dict(self.moe_kwargs or {})
    attn = CausalSelfAttention(
        self.num_heads, use_rope=self.use_rope, rope_base=self.rope_base,
        dtype=self.dtype, param_dtype=self.param_dtype, name="attn",
    )
    h = x + attn(self._norm("attn_norm")(x))
    moe = MoELayer(
        self.d_model, self.num_experts, self.d_ff, self.top_k, dtype=self.dtype,
        param_dtype=self.param_dtype, deterministic=self.deterministic, name="moe",
        **moe_kwargs,
    )
    m, aux = moe(self._norm("moe_norm")(h), deterministic=deterministic)
    return h + m, aux
