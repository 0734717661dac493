"""Flax layers (`jmoe.nnx`, `jmoe.linen`): shapes, dtypes, train/eval, NNX == Linen,
energy bias, learning, and the interpreter backend against the reference.

The layers only hold parameters and call `jmoe.moe`; these tests check that the
options reach it (forward against the numpy oracle), that gradients flow to every
parameter, and the layer-level behaviour (jitter, aux dict, energy bias).
"""

from __future__ import annotations

import importlib.util
import math

import flax.linen as nn
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import oracle
import pytest
from flax import nnx

import jmoe
import jmoe.linen
import jmoe.nnx
from jmoe import _layer_common as common

REF = "reference"
AUX_KEYS = set(common.AUX_KEYS)


def _nnx_layer(d=16, e=4, f=24, top_k=2, seed=0, **kw):
  kw.setdefault("backend", REF)
  return jmoe.nnx.MoELayer(d, e, f, top_k, rngs=nnx.Rngs(seed), **kw)


def _params_of(model) -> dict:
  """NNX parameters as the pure dict Linen's `{"params": ...}` takes."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _set_params(layer, router, up, down):
  layer.router_kernel[...] = jnp.asarray(router)
  layer.up_kernel[...] = jnp.asarray(up)
  layer.down_kernel[...] = jnp.asarray(down)


# ----------------------------------------------------------------------------
# Shapes, dtypes, forward against the oracle.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_param_shapes_nnx_and_linen(activation):
  d, e, f = 12, 5, 7
  up = 2 * f if activation == "swiglu" else f
  layer = _nnx_layer(d, e, f, 2, activation=activation)
  want = {"router_kernel": (d, e), "up_kernel": (e, d, up), "down_kernel": (e, f, d)}
  got = jax.tree.map(jnp.shape, _params_of(layer))
  assert got == want
  lin = jmoe.linen.MoELayer(d, e, f, 2, activation=activation, backend=REF)
  variables = lin.init(jax.random.key(0), jnp.ones((3, d)))
  assert jax.tree.map(jnp.shape, variables["params"]) == want
  assert set(variables) == {"params"}


@pytest.mark.parametrize("lead", [(7,), (2, 5), (1, 3, 3)])
@pytest.mark.parametrize("activation", ["swiglu", "geglu", "gelu", "relu", "silu"])
def test_forward_matches_oracle(rng, lead, activation):
  """Layer forward == oracle MoE (float64 loops) for odd sizes and all activations."""
  d, e, f, top_k, cf = 10, 5, 6, 2, 1.0
  t = math.prod(lead)
  x2, router = helpers.routing_inputs(rng, t, d, e, top_k)
  _, up, down = helpers.moe_params(rng, d, e, f, activation)
  layer = _nnx_layer(d, e, f, top_k, activation=activation, capacity_factor=cf,
                     load_balancing_loss_weight=0.5, router_z_loss_weight=0.25)
  _set_params(layer, router, up, down)
  x = x2.reshape(lead + (d,))
  y, aux = layer(jnp.asarray(x))
  y_o, aux_o = oracle.moe(x, router, up, down, top_k=top_k, capacity_factor=cf,
                          activation=activation)
  assert y.shape == lead + (d,) and y.dtype == jnp.float32
  assert set(aux) == AUX_KEYS
  helpers.assert_close(y, y_o, np.float32, err_msg="y")
  helpers.assert_equal(aux["tokens_per_expert"], aux_o.tokens_per_expert)
  helpers.assert_equal(aux["dropped_count"], aux_o.dropped_count)
  for key in ("load_balancing_loss", "router_z_loss", "dropped_fraction"):
    helpers.assert_close(aux[key], np.float64(getattr(aux_o, key)), np.float32,
                         err_msg=key)
  total = 0.5 * aux_o.load_balancing_loss + 0.25 * aux_o.router_z_loss
  helpers.assert_close(aux["total_aux_loss"], np.float64(total), np.float32)


@pytest.mark.parametrize(
    "x_dtype,dtype,param_dtype,want",
    [
        (jnp.float32, None, jnp.float32, jnp.float32),
        (jnp.bfloat16, None, jnp.float32, jnp.float32),  # promoted, as Flax
        (jnp.bfloat16, jnp.bfloat16, jnp.float32, jnp.bfloat16),
        (jnp.bfloat16, None, jnp.bfloat16, jnp.bfloat16),
        (jnp.float32, jnp.bfloat16, jnp.bfloat16, jnp.bfloat16),
    ],
)
def test_dtypes(rng, x_dtype, dtype, param_dtype, want):
  d, e, f = 16, 4, 8
  x = jnp.asarray(helpers.normal(rng, (2, 5, d)), x_dtype)
  layer = _nnx_layer(d, e, f, 2, dtype=dtype, param_dtype=param_dtype)
  assert layer.up_kernel[...].dtype == param_dtype
  y, aux = layer(x)
  assert y.dtype == want and y.shape == x.shape
  assert aux["total_aux_loss"].dtype == jnp.float32
  assert aux["tokens_per_expert"].dtype == jnp.int32
  lin = jmoe.linen.MoELayer(d, e, f, 2, dtype=dtype, param_dtype=param_dtype,
                            backend=REF)
  y_l, _ = lin.apply({"params": _params_of(layer)}, x)
  assert y_l.dtype == want
  helpers.assert_close(y_l, y.astype(jnp.float32), want)


def test_bf16_close_to_f32(rng):
  """bf16 compute with the same (float32-stored) weights stays within bf16 error."""
  d, e, f = 16, 4, 16
  x2, router = helpers.routing_inputs(rng, 24, d, e, 2, min_logit_gap=0.05)
  layer = _nnx_layer(d, e, f, 2)
  _, up, down = helpers.moe_params(rng, d, e, f)
  _set_params(layer, router, up, down)
  y32, _ = layer(jnp.asarray(x2))
  layer16 = _nnx_layer(d, e, f, 2, dtype=jnp.bfloat16)
  _set_params(layer16, router, up, down)
  y16, _ = layer16(jnp.asarray(x2, jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  helpers.assert_close(y16, y32, jnp.bfloat16, rtol=3e-2)


# ----------------------------------------------------------------------------
# jit and gradients.
# ----------------------------------------------------------------------------


def test_nnx_jit_grad_matches_functional(rng):
  d, e, f, top_k = 16, 4, 12, 2
  x = jnp.asarray(helpers.normal(rng, (3, 5, d)))
  layer = _nnx_layer(d, e, f, top_k, capacity_factor=1.25)

  def loss_fn(model, x):
    y, aux = model(x)
    return jnp.mean(y**2) + aux["total_aux_loss"]

  loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(layer, x)
  g = nnx.to_pure_dict(grads)

  def functional(params, x):
    y, aux = jmoe.moe(x, params, top_k=top_k, capacity_factor=1.25, backend=REF)
    return (jnp.mean(y**2) + 1e-2 * aux.load_balancing_loss
            + 1e-3 * aux.router_z_loss)

  p = _params_of(layer)
  loss_f, g_f = jax.jit(jax.value_and_grad(functional))(p, x)
  helpers.assert_close(loss, loss_f, np.float32)
  for name in ("router_kernel", "up_kernel", "down_kernel"):
    assert np.all(np.isfinite(g[name])) and np.any(g[name] != 0), name
    helpers.assert_close(g[name], g_f[name], np.float32, kind="grad", err_msg=name)


def test_linen_jit_grad(rng):
  d, e, f = 16, 4, 12
  x = jnp.asarray(helpers.normal(rng, (2, 6, d)))
  block = jmoe.linen.MoETransformerBlock(d, 2, e, f, 2, moe_kwargs={"backend": REF})
  variables = block.init(jax.random.key(0), x)

  def loss_fn(params, x):
    y, aux = block.apply({"params": params}, x)
    return jnp.mean(y**2) + aux["total_aux_loss"]

  grads, gx = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(variables["params"], x)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(g)) and np.any(g != 0), jax.tree_util.keystr(path)
  # The input gradient reaches x through attention and the MoE.
  assert np.all(np.isfinite(gx)) and np.any(gx != 0)


def test_block_causal(rng):
  """Changing a later position does not change earlier outputs (with a dropless MoE)."""
  d = 16
  block = jmoe.nnx.MoETransformerBlock(d, 4, 4, 12, 2, backend=REF, rngs=nnx.Rngs(0))
  x = jnp.asarray(helpers.normal(rng, (2, 9, d)))
  y1, _ = block(x)
  y2, _ = block(x.at[:, 6:].set(7.0))
  helpers.assert_equal(y1[:, :6], y2[:, :6])
  assert not np.allclose(y1[:, 6:], y2[:, 6:])


# ----------------------------------------------------------------------------
# NNX == Linen.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_nnx_equals_linen_block(rng, norm, dtype):
  d, h, e, f, top_k = 16, 2, 4, 12, 2
  moe_kwargs = dict(capacity_factor=1.0, activation="geglu", backend=REF,
                    load_balancing_loss_weight=0.1)
  block = jmoe.nnx.MoETransformerBlock(d, h, e, f, top_k, norm=norm, dtype=dtype,
                                       rngs=nnx.Rngs(3), **moe_kwargs)
  lin = jmoe.linen.MoETransformerBlock(d, h, e, f, top_k, norm=norm, dtype=dtype,
                                       moe_kwargs=moe_kwargs)
  x = jnp.asarray(helpers.normal(rng, (2, 7, d)), dtype)
  variables = lin.init(jax.random.key(0), x)
  params = _params_of(block)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(
      jnp.shape, variables["params"])
  y_n, aux_n = nnx.jit(lambda m, x: m(x))(block, x)
  y_l, aux_l = jax.jit(lin.apply)({"params": params}, x)
  assert y_n.dtype == y_l.dtype == dtype
  helpers.assert_close(y_l, y_n, dtype, err_msg="y")
  for key in AUX_KEYS:
    helpers.assert_close(aux_l[key], aux_n[key], np.float32, err_msg=key)


def test_nnx_equals_linen_layer_grads(rng):
  d, e, f = 8, 3, 5
  x = jnp.asarray(helpers.normal(rng, (11, d)))
  layer = _nnx_layer(d, e, f, 1, activation="silu", drop_policy="probability",
                     capacity_factor=0.8)
  lin = jmoe.linen.MoELayer(d, e, f, 1, activation="silu", drop_policy="probability",
                            capacity_factor=0.8, backend=REF)

  def loss_n(model):
    y, aux = model(x)
    return jnp.sum(jnp.sin(y)) + aux["total_aux_loss"]

  def loss_l(params):
    y, aux = lin.apply({"params": params}, x)
    return jnp.sum(jnp.sin(y)) + aux["total_aux_loss"]

  g_n = nnx.to_pure_dict(nnx.grad(loss_n)(layer))
  g_l = jax.grad(loss_l)(_params_of(layer))
  for name in g_n:
    helpers.assert_close(g_l[name], g_n[name], np.float32, kind="grad", err_msg=name)


# ----------------------------------------------------------------------------
# Train / eval: jitter only in training.
# ----------------------------------------------------------------------------


def test_nnx_jitter_only_in_training(rng):
  d, e, f = 16, 8, 8
  x = jnp.asarray(helpers.normal(rng, (64, d)))
  layer = _nnx_layer(d, e, f, 2, router_jitter=0.5, capacity_factor=1.0)
  plain = _nnx_layer(d, e, f, 2, capacity_factor=1.0)  # same seed: same params
  y_plain, aux_plain = plain(x)

  layer.eval()
  assert layer.deterministic
  y1, a1 = layer(x)
  y2, a2 = layer(x)
  helpers.assert_equal(y1, y2)
  helpers.assert_equal(y1, y_plain)  # eval == no jitter at all
  helpers.assert_equal(a1["tokens_per_expert"], aux_plain["tokens_per_expert"])

  layer.train()
  assert not layer.deterministic
  y3, _ = layer(x)
  y4, _ = layer(x)  # the stream advances: new noise
  assert not np.array_equal(y3, y_plain)
  assert not np.array_equal(y3, y4)
  # An explicit key: same key -> same output, different keys differ.
  k1, k2 = jax.random.key(1), jax.random.key(2)
  y5, _ = layer(x, rngs=k1)
  y6, _ = layer(x, rngs=k1)
  y7, _ = layer(x, rngs=k2)
  helpers.assert_equal(y5, y6)
  assert not np.array_equal(y5, y7)
  # The call argument overrides the attribute.
  y8, _ = layer(x, deterministic=True)
  helpers.assert_equal(y8, y_plain)


def test_nnx_jitter_under_jit_advances_stream(rng):
  d = 16
  x = jnp.asarray(helpers.normal(rng, (32, d)))
  layer = _nnx_layer(d, 8, 8, 2, router_jitter=0.5)
  step = nnx.jit(lambda m, x: m(x)[0])
  y1, y2 = step(layer, x), step(layer, x)
  assert not np.array_equal(y1, y2)


def test_linen_jitter_only_in_training(rng):
  d, e, f = 16, 8, 8
  x = jnp.asarray(helpers.normal(rng, (64, d)))
  lin = jmoe.linen.MoELayer(d, e, f, 2, router_jitter=0.5, backend=REF)
  variables = lin.init(jax.random.key(0), x, deterministic=True)
  y_eval1, _ = lin.apply(variables, x, deterministic=True)
  y_eval2, _ = lin.apply(variables, x, deterministic=True,
                         rngs={"router": jax.random.key(9)})
  helpers.assert_equal(y_eval1, y_eval2)
  k1, k2 = jax.random.key(1), jax.random.key(2)
  y1, _ = lin.apply(variables, x, deterministic=False, rngs={"router": k1})
  y1b, _ = lin.apply(variables, x, deterministic=False, rngs={"router": k1})
  y2, _ = lin.apply(variables, x, deterministic=False, rngs={"router": k2})
  helpers.assert_equal(y1, y1b)
  assert not np.array_equal(y1, y2)
  assert not np.array_equal(y1, y_eval1)
  with pytest.raises(ValueError, match="deterministic"):
    lin.apply(variables, x)
  # Field instead of call argument.
  lin_eval = lin.clone(deterministic=True)
  helpers.assert_equal(lin_eval.apply(variables, x)[0], y_eval1)


def test_no_jitter_needs_no_rng(rng):
  x = jnp.asarray(helpers.normal(rng, (5, 16)))
  lin = jmoe.linen.MoELayer(16, 4, 8, 2, backend=REF)
  variables = lin.init(jax.random.key(0), x)
  y1, _ = lin.apply(variables, x, deterministic=False)  # no "router" rng needed
  y2, _ = lin.apply(variables, x)
  helpers.assert_equal(y1, y2)


# ----------------------------------------------------------------------------
# Utilisation statistics, aux losses, learning.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("cf,top_k", [(None, 2), (0.5, 2), (1.0, 1), (0.3, 3)])
def test_utilisation_sums_to_t_k_minus_dropped(rng, cf, top_k):
  d, e, t = 16, 6, 45
  layer = _nnx_layer(d, e, 8, top_k, capacity_factor=cf)
  x = jnp.asarray(helpers.normal(rng, (t, d)))
  _, aux = layer(x)
  total = int(aux["tokens_per_expert"].sum())
  dropped = int(aux["dropped_count"])
  assert total + dropped == t * top_k
  np.testing.assert_allclose(float(aux["dropped_fraction"]), dropped / (t * top_k),
                             rtol=1e-6)
  if cf is None:
    assert dropped == 0
  else:
    c = math.ceil(cf * t * top_k / e)
    assert int(aux["tokens_per_expert"].max()) <= c
  if cf == 0.3:
    assert dropped > 0


def test_loss_decreases_on_synthetic_task(rng):
  """A small MoE regression task: the loss falls by well over half."""
  d, e, f, t = 8, 4, 16, 128
  x = jnp.asarray(helpers.normal(rng, (t, d)))
  w = jnp.asarray(helpers.normal(rng, (d, d), scale=1 / math.sqrt(d)))
  target = jnp.tanh(x @ w) * jnp.where(x[:, :1] > 0, 1.0, -1.0)  # needs two regimes
  layer = _nnx_layer(d, e, f, 2)
  opt = nnx.Optimizer(layer, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    def loss_fn(model):
      y, aux = model(x)
      return jnp.mean((y - target) ** 2) + aux["total_aux_loss"]
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  losses = [float(step(layer, opt)) for _ in range(200)]
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])


def test_aux_loss_falls_as_balance_improves(rng):
  """Training only the aux loss from a skewed router balances the experts."""
  d, e, t = 8, 4, 256
  x = helpers.normal(rng, (t, d))
  x[:, 0] = np.abs(x[:, 0]) + 1.0  # feature 0 is positive for every token

  def skewed_init(key, shape, dtype):
    w = jax.random.normal(key, shape, dtype) * 0.1
    return w.at[0, 0].add(3.0)  # expert 0 wins for every token

  layer = _nnx_layer(d, e, 8, 1, router_init=skewed_init,
                     load_balancing_loss_weight=1.0, router_z_loss_weight=0.0)
  x = jnp.asarray(x)
  _, aux0 = layer(x)
  assert int(aux0["tokens_per_expert"][0]) > 0.9 * t
  opt = nnx.Optimizer(layer, optax.sgd(0.5), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    def loss_fn(model):
      _, aux = model(x)
      return aux["total_aux_loss"], aux
    (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    opt.update(model, grads)
    return aux

  lb = []
  for _ in range(60):
    aux = step(layer, opt)
    lb.append(float(aux["load_balancing_loss"]))
  _, aux1 = layer(x)
  assert float(aux1["load_balancing_loss"]) < 0.5 * float(aux0["load_balancing_loss"])
  assert float(aux1["load_balancing_loss"]) < 1.3  # balanced routing gives 1
  assert int(aux1["tokens_per_expert"].max()) < 0.5 * t
  assert lb[-1] < lb[0]


# ----------------------------------------------------------------------------
# Energy-aware routing.
# ----------------------------------------------------------------------------


def test_energy_bias_shifts_utilisation(rng):
  d, e, t = 16, 4, 512
  x = jnp.asarray(helpers.normal(rng, (t, d)))
  cost = [4.0, 0.0, 0.0, 0.0]
  counts = []
  for lam in (0.0, 0.25, 1.0, 10.0):
    layer = _nnx_layer(d, e, 8, 1, expert_cost=cost, lambda_energy=lam,
                       router_init=jax.nn.initializers.normal(0.3))
    _, aux = layer(x)
    counts.append(int(aux["tokens_per_expert"][0]))
  assert counts[0] > t / e / 2, counts
  assert counts[0] > counts[1] > counts[2] >= counts[3], counts
  assert counts[3] == 0, counts
  # Linen: same numbers.
  lin = jmoe.linen.MoELayer(d, e, 8, 1, expert_cost=cost, lambda_energy=1.0,
                            backend=REF)
  layer = _nnx_layer(d, e, 8, 1, expert_cost=cost, lambda_energy=1.0,
                     router_init=jax.nn.initializers.normal(0.3))
  y_n, aux_n = layer(x)
  y_l, aux_l = lin.apply({"params": _params_of(layer)}, x)
  helpers.assert_close(y_l, y_n, np.float32)
  helpers.assert_equal(aux_l["tokens_per_expert"], aux_n["tokens_per_expert"])


def test_energy_bias_matches_oracle(rng):
  """Routing from `x @ router_kernel - lambda * cost`, checked with the oracle."""
  d, e, f, t, top_k, lam = 8, 4, 6, 21, 2, 0.7
  cost = np.array([0.0, 1.5, 0.2, 3.0])
  for _ in range(50):
    x, router = helpers.routing_inputs(rng, t, d, e, top_k)
    logits = oracle.router_logits(x, router) - lam * cost
    if helpers.routing_margin(logits, top_k) > 1e-4:
      break
  _, up, down = helpers.moe_params(rng, d, e, f)
  layer = _nnx_layer(d, e, f, top_k, expert_cost=cost, lambda_energy=lam,
                     capacity_factor=1.0)
  _set_params(layer, router, up, down)
  y, aux = layer(jnp.asarray(x))
  r = oracle.route(x, router, top_k=top_k, capacity_factor=1.0, logits=logits)
  y_o = oracle.expert_ffn(x, r.expert_ids, r.weights, r.kept, up, down,
                          activation="swiglu")
  helpers.assert_close(y, y_o, np.float32)
  helpers.assert_equal(aux["tokens_per_expert"], r.tokens_per_expert)
  helpers.assert_close(aux["load_balancing_loss"], np.float64(r.load_balancing_loss),
                       np.float32)
  helpers.assert_close(aux["router_z_loss"], np.float64(r.router_z_loss), np.float32)
  # The cost is a constant: gradients reach the router kernel, not the cost.
  g = nnx.grad(lambda m: m(jnp.asarray(x))[1]["total_aux_loss"])(layer)
  assert np.any(nnx.to_pure_dict(g)["router_kernel"] != 0)


# ----------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------


def test_errors():
  with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., d_model=16\]"):
    _nnx_layer(16, 4, 8, 2)(jnp.ones((3, 15)))
  with pytest.raises(TypeError, match="floating"):
    _nnx_layer(16, 4, 8, 2)(jnp.ones((3, 16), jnp.int32))
  with pytest.raises(ValueError, match=r"expert_cost must have shape \[num_experts\]"):
    _nnx_layer(16, 4, 8, 2, expert_cost=[1.0, 2.0], lambda_energy=1.0)
  with pytest.raises(ValueError, match="non-negative"):
    _nnx_layer(16, 4, 8, 2, expert_cost=[1.0, -2.0, 0.0, 0.0], lambda_energy=1.0)
  with pytest.raises(ValueError, match="needs expert_cost"):
    _nnx_layer(16, 4, 8, 2, lambda_energy=1.0)
  with pytest.raises(ValueError, match="top_k must be <= num_experts"):
    _nnx_layer(16, 4, 8, 5)
  with pytest.raises(ValueError, match="activation must be one of"):
    _nnx_layer(16, 4, 8, 2, activation="tanh")
  with pytest.raises(ValueError, match="backend must be one of"):
    _nnx_layer(16, 4, 8, 2, backend="cuda")(jnp.ones((3, 16)))
  with pytest.raises(ValueError, match="num_heads must divide d_model"):
    jmoe.nnx.MoETransformerBlock(16, 3, 4, 8, 2, rngs=nnx.Rngs(0))
  lin = jmoe.linen.MoELayer(16, 4, 8, 2, expert_cost=[1.0], lambda_energy=1.0)
  with pytest.raises(ValueError, match="expert_cost"):
    lin.init(jax.random.key(0), jnp.ones((3, 16)))


def test_triton_backend_refuses_on_cpu():
  if jax.default_backend() == "gpu":
    pytest.skip("only meaningful without a GPU")
  with pytest.raises(RuntimeError, match="cannot run here"):
    _nnx_layer(16, 4, 8, 2, backend="triton")(jnp.ones((3, 16)))


# ----------------------------------------------------------------------------
# The Triton kernels under the interpreter: a train step equals the reference.
# ----------------------------------------------------------------------------

_HAVE_OPS = (
    importlib.util.find_spec("triton") is not None
    and importlib.util.find_spec("jmoe.ops.expert_ffn") is not None
    and importlib.util.find_spec("jmoe.ops.routing") is not None
)


@pytest.mark.skipif(not _HAVE_OPS, reason="needs triton and jmoe.ops")
def test_interpret_train_step_equals_reference(rng):
  d, e, f, top_k = 16, 4, 16, 2
  x = jnp.asarray(helpers.normal(rng, (2, 5, d)))
  target = jnp.asarray(helpers.normal(rng, (2, 5, d)))

  def train_step(backend):
    model = _nnx_layer(d, e, f, top_k, capacity_factor=1.25, backend=backend)
    opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)

    def loss_fn(model):
      y, aux = model(x)
      return jnp.mean((y - target) ** 2) + aux["total_aux_loss"]

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss, nnx.to_pure_dict(grads), _params_of(model)

  loss_r, g_r, p_r = train_step(REF)
  loss_i, g_i, p_i = train_step("interpret")
  helpers.assert_close(loss_i, loss_r, np.float32, err_msg="loss")
  for name in g_r:
    helpers.assert_close(g_i[name], g_r[name], np.float32, kind="grad",
                         err_msg=f"grad {name}")
    helpers.assert_close(p_i[name], p_r[name], np.float32, err_msg=f"param {name}")


@pytest.mark.gpu
def test_triton_layer_matches_reference(rng):
  d, e, f, top_k = 64, 8, 128, 2
  x = jnp.asarray(helpers.normal(rng, (4, 32, d)), jnp.bfloat16)
  layer = _nnx_layer(d, e, f, top_k, dtype=jnp.bfloat16, backend="triton")
  ref_layer = _nnx_layer(d, e, f, top_k, dtype=jnp.bfloat16, backend=REF)
  y_t, aux_t = layer(x)
  y_r, aux_r = ref_layer(x)
  helpers.assert_close(y_t, y_r, jnp.bfloat16)
  helpers.assert_equal(aux_t["tokens_per_expert"], aux_r["tokens_per_expert"])
