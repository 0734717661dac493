"""Tests of `jmoe.ops.expert_ffn` (fused MoE experts in Triton, forward + backward).

`ExpertFfnTestBase` holds every check once with a `BACKEND` attribute:
`TestExpertFfnInterpret` runs it under Triton's interpreter on the CPU (small
odd shapes), `TestExpertFfnTriton` (marked `gpu`) on the GPU, adding the MoE
benchmark shapes and bit-identical repeats. The op is compared with
`jmoe.reference.expert_ffn` run in float32 on the same (upcast) inputs, for the
output and the gradients w.r.t. x, weights, up_kernel and down_kernel, and
the reference with the float64 loop `oracle.expert_ffn`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import helpers
import oracle
from jmoe import reference
from jmoe.ops import expert_ffn as ffn_lib

BF16 = ml_dtypes.bfloat16

# (t, d, f, e, top_k, activation, dtype, drop_fraction): every activation,
# widths that are no block multiple, e from 1 to 64, top_k from 1 to 8.
CASES = (
    (29, 48, 40, 4, 2, "swiglu", np.float32, 0.2),
    (21, 40, 24, 3, 1, "gelu", BF16, 0.0),
    (29, 40, 24, 5, 3, "geglu", BF16, 0.3),
    (13, 24, 20, 16, 8, "relu", np.float32, 0.1),
    (19, 36, 33, 6, 2, "silu", np.float16, 0.0),
    (5, 16, 16, 64, 2, "swiglu", np.float32, 0.0),
    (11, 20, 12, 1, 1, "gelu", np.float32, 0.0),
)


def _inputs(rng, t, d, f, e, top_k, activation, dtype, drop=0.0):
  """`(x, expert_ids, weights, kept, up, down)`: distinct experts per token,
  router-like weights (0 where dropped), a `drop` fraction of copies dropped."""
  x = helpers.normal(rng, (t, d), dtype)
  _, up, down = helpers.moe_params(rng, d, e, f, activation, dtype)
  ids = np.stack([rng.permutation(e)[:top_k] for _ in range(t)]).astype(np.int32)
  kept = rng.random((t, top_k)) >= drop
  weights = rng.uniform(0.1, 1.0, (t, top_k)).astype(np.float32)
  weights = np.where(kept, weights, 0.0).astype(np.float32)
  return x, ids, weights, kept, up, down


def _f32(a):
  return jnp.asarray(a, jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a


def _loss(fn, ct, x, ids, weights, kept, up, down):
  y = fn(x, ids, weights, kept, up, down)
  return jnp.sum(y.astype(jnp.float32) * ct), y


_HIGHEST = jax.lax.Precision.HIGHEST


def _per_expert_reference(x, ids, weights, kept, up, down):
  """SwiGLU expert FFN as a scan of dense FFNs over experts (every token, masked
  by its combine weight): the GPU oracle for large shapes, where the XLA
  `ragged_dot` backward of the reference materialises `[e, t*k, f]` float32.
  Operands in x's dtype, float32 accumulation, h rounded to x's dtype."""
  e, f = up.shape[0], down.shape[1]
  onehot = kept[..., None] & (ids[..., None] == jnp.arange(e))
  comb = jnp.sum(jnp.where(onehot, weights[..., None], 0.0), axis=1)  # [t, e]

  def body(y, inputs):
    u, dn, c = inputs
    pre = jnp.dot(x, u, precision=_HIGHEST, preferred_element_type=jnp.float32)
    h = (jax.nn.silu(pre[:, :f]) * pre[:, f:]).astype(x.dtype)
    o = jnp.dot(h, dn, precision=_HIGHEST, preferred_element_type=jnp.float32)
    return y + c[:, None] * o, None

  y, _ = jax.lax.scan(body, jnp.zeros(x.shape, jnp.float32), (up, down, comb.T))
  return y.astype(x.dtype)


class ExpertFfnTestBase:
  """Every expert_ffn check, run by the subclasses with their `BACKEND`."""

  BACKEND: str = ""

  def _ffn(self, *args, activation):
    return ffn_lib.expert_ffn(*args, activation=activation, backend=self.BACKEND)

  def _check_against_reference(self, args, activation, dtype, ct, use_jit=True):
    """Forward and the four gradients vs the float32 reference."""
    x, ids, weights, kept, up, down = args
    fn = functools.partial(self._ffn, activation=activation)
    vg = jax.value_and_grad(
        lambda x, w, u, dn: _loss(fn, ct, x, ids, w, kept, u, dn), (0, 1, 2, 3),
        has_aux=True,
    )
    (_, y), grads = (jax.jit(vg) if use_jit else vg)(x, weights, up, down)
    ref = functools.partial(reference.expert_ffn, activation=activation)
    (_, y_ref), grads_ref = jax.value_and_grad(
        lambda x, w, u, dn: _loss(ref, ct, x, ids, w, kept, u, dn), (0, 1, 2, 3),
        has_aux=True,
    )(_f32(x), weights, _f32(up), _f32(down))
    assert y.shape == x.shape and y.dtype == x.dtype
    helpers.assert_close(y, y_ref, dtype, err_msg="y")
    names = ("x", "weights", "up_kernel", "down_kernel")
    for name, got, want, arg in zip(names, grads, grads_ref, (x, weights, up, down)):
      assert got.shape == arg.shape and got.dtype == arg.dtype, name
      helpers.assert_close(got, want, dtype, kind="grad", err_msg=f"d_{name}")
    return y, grads

  @pytest.mark.parametrize("t,d,f,e,top_k,activation,dtype,drop", CASES)
  def test_matches_reference(self, rng, t, d, f, e, top_k, activation, dtype, drop):
    args = _inputs(rng, t, d, f, e, top_k, activation, dtype, drop)
    ct = helpers.normal(rng, (t, d), np.float32)
    _, grads = self._check_against_reference(args, activation, dtype, ct)
    dropped = ~args[3]
    assert np.all(np.asarray(grads[1])[dropped] == 0), "dropped copies: d_weights 0"

  def test_per_expert_reference(self, rng):
    # The GPU oracle of the large shapes agrees with the reference.
    args = _inputs(rng, 13, 24, 20, 5, 2, "swiglu", np.float32, 0.2)
    helpers.assert_close(
        _per_expert_reference(*(jnp.asarray(a) for a in args)),
        reference.expert_ffn(*args, activation="swiglu"), np.float32,
    )

  def test_xla_align(self, rng, monkeypatch):
    # JMOE_ALIGN=xla: the argsort align gives the same result as the kernel.
    args = _inputs(rng, 19, 24, 20, 5, 2, "geglu", np.float32, 0.2)
    y = self._ffn(*args, activation="geglu")
    monkeypatch.setenv("JMOE_ALIGN", "xla")
    y_xla = self._ffn(*args, activation="geglu")
    assert np.array_equal(np.asarray(y), np.asarray(y_xla))

  def test_reference_matches_oracle(self, rng):
    args = _inputs(rng, 13, 24, 20, 5, 2, "swiglu", np.float32, 0.2)
    y = self._ffn(*args, activation="swiglu")
    helpers.assert_close(y, oracle.expert_ffn(*args, activation="swiglu"), np.float32)

  def test_all_tokens_on_one_expert_eager(self, rng):
    # Every copy on expert 2 (duplicates within a token), other experts empty;
    # eager (no jit), outputs start poisoned under "interpret".
    t, d, f, e, top_k = 23, 24, 20, 5, 2
    x, _, weights, kept, up, down = _inputs(rng, t, d, f, e, top_k, "gelu", np.float32)
    ids = np.full((t, top_k), 2, np.int32)
    ct = helpers.normal(rng, (t, d), np.float32)
    y, grads = self._check_against_reference(
        (x, ids, weights, kept, up, down), "gelu", np.float32, ct, use_jit=False
    )
    assert np.isfinite(np.asarray(y)).all()
    d_up, d_down = np.asarray(grads[2]), np.asarray(grads[3])
    assert np.all(d_up[[0, 1, 3, 4]] == 0) and np.all(d_down[[0, 1, 3, 4]] == 0)

  def test_everything_dropped(self, rng):
    args = list(_inputs(rng, 10, 16, 12, 3, 2, "swiglu", np.float32))
    args[3] = np.zeros_like(args[3])  # kept: all False
    args[2] = helpers.normal(rng, args[2].shape, np.float32)  # even nonzero weights
    ct = helpers.normal(rng, (10, 16), np.float32)
    fn = functools.partial(self._ffn, activation="swiglu")
    (_, y), grads = jax.value_and_grad(
        lambda x, w, u, dn: _loss(fn, ct, x, args[1], w, args[3], u, dn),
        (0, 1, 2, 3), has_aux=True,
    )(args[0], args[2], args[4], args[5])
    assert np.all(np.asarray(y) == 0)
    for g in grads:
      assert np.all(np.asarray(g) == 0)

  def test_repeat_is_bit_identical(self, rng):
    args = _inputs(rng, 30, 32, 24, 4, 2, "swiglu", np.float32)
    ct = helpers.normal(rng, (30, 32), np.float32)
    fn = jax.jit(jax.value_and_grad(
        lambda x, w, u, dn: _loss(functools.partial(self._ffn, activation="swiglu"),
                                  ct, x, args[1], w, args[3], u, dn)[0],
        (0, 1, 2, 3),
    ))
    first = fn(args[0], args[2], args[4], args[5])
    second = fn(args[0], args[2], args[4], args[5])
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
      assert np.array_equal(np.asarray(a), np.asarray(b))

  def test_vmap_checkpoint_grad(self, rng):
    t, d, f, e, top_k = 9, 16, 12, 3, 2
    batch = [_inputs(rng, t, d, f, e, top_k, "silu", np.float32) for _ in range(2)]
    _, _, _, _, up, down = batch[0]
    x, ids, weights, kept = (np.stack([b[i] for b in batch]) for i in range(4))
    fn = functools.partial(self._ffn, activation="silu")
    y = jax.jit(jax.vmap(fn, in_axes=(0, 0, 0, 0, None, None)))(
        x, ids, weights, kept, up, down
    )
    for b in range(2):
      want = reference.expert_ffn(x[b], ids[b], weights[b], kept[b], up, down,
                                  activation="silu")
      helpers.assert_close(y[b], want, np.float32)
    loss = jax.checkpoint(lambda u: jnp.sum(fn(x[0], ids[0], weights[0], kept[0], u, down)))
    ref_loss = lambda u: jnp.sum(reference.expert_ffn(  # noqa: E731
        x[0], ids[0], weights[0], kept[0], u, down, activation="silu"))
    helpers.assert_close(jax.jit(jax.grad(loss))(up), jax.grad(ref_loss)(up),
                         np.float32, kind="grad")

  def test_mixed_weight_dtype(self, rng):
    # float32 parameters with bf16 activations: kernels are cast to x's dtype,
    # gradients come back in the parameters' dtype.
    x, ids, weights, kept, up, down = _inputs(rng, 17, 24, 16, 3, 2, "swiglu", np.float32)
    xb = x.astype(BF16)
    y = self._ffn(xb, ids, weights, kept, up, down, activation="swiglu")
    assert y.dtype == BF16
    want = reference.expert_ffn(xb, ids, weights, kept, up.astype(BF16),
                                down.astype(BF16), activation="swiglu")
    helpers.assert_close(y, want, BF16)
    g = jax.grad(lambda u: jnp.sum(self._ffn(xb, ids, weights, kept, u, down,
                                             activation="swiglu").astype(jnp.float32)))(up)
    assert g.dtype == np.float32

  def test_errors(self, rng):
    x, ids, weights, kept, up, down = _inputs(rng, 8, 16, 12, 3, 2, "swiglu", np.float32)
    cases = [
        ((x[0], ids, weights, kept, up, down), "swiglu", ValueError,
         r"x must have shape \[t, d\]"),
        ((x, ids[:5], weights, kept, up, down), "swiglu", ValueError,
         r"expert_ids must have shape \[t=8, top_k\]"),
        ((x, ids.astype(np.float32), weights, kept, up, down), "swiglu", TypeError,
         "expert_ids must be int32"),
        ((x, ids, weights[:, :1], kept, up, down), "swiglu", ValueError,
         r"weights must have shape \[t, top_k\]"),
        ((x, ids, weights, kept, up[:, :, :23], down), "swiglu", ValueError,
         r"up_kernel must have shape \[e, d, 2f\]"),
        ((x, ids, weights, kept, up[:, :5], down), "swiglu", ValueError,
         r"up_kernel must have shape \[e, d=16, f\]"),
        ((x, ids, weights, kept, up, down), "gelu", ValueError,
         r"down_kernel must have shape \[e=3, f=24, d=16\]"),
        ((x, ids, weights, kept, up, down), "tanh", ValueError,
         "activation must be one of"),
        ((x.astype(np.int32), ids, weights, kept, up, down), "swiglu", TypeError,
         "x must be float32"),
    ]
    for args, activation, error, pattern in cases:
      with pytest.raises(error, match=pattern):
        jax.jit(functools.partial(self._ffn, activation=activation))(*args)


class TestExpertFfnInterpret(ExpertFfnTestBase):
  BACKEND = "interpret"


@pytest.mark.gpu
class TestExpertFfnTriton(ExpertFfnTestBase):
  BACKEND = "triton"

  @pytest.mark.parametrize(
      "t,d,f,e,top_k",
      [(8192, 4096, 14336, 8, 2), (8192, 2048, 1408, 64, 6), (4096, 1024, 512, 256, 8),
       (4096, 768, 3072, 8, 2)],
  )
  def test_moe_shapes_bf16(self, t, d, f, e, top_k):
    rng = helpers.rng_for(f"ffn-{t}-{d}-{f}-{e}-{top_k}")
    keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 5)
    x = jax.random.normal(keys[0], (t, d), jnp.bfloat16)
    up = (jax.random.normal(keys[1], (e, d, 2 * f)) / np.sqrt(d)).astype(jnp.bfloat16)
    down = (jax.random.normal(keys[2], (e, f, d)) / np.sqrt(f)).astype(jnp.bfloat16)
    logits = jax.random.normal(keys[3], (t, e)) + jnp.linspace(0.0, 2.0, e)  # skewed
    probs, ids = jax.lax.top_k(jax.nn.softmax(logits), top_k)
    weights = probs / probs.sum(-1, keepdims=True)
    kept = jnp.ones((t, top_k), bool)
    ct = jax.random.normal(keys[4], (t, d), jnp.float32)
    fn = jax.jit(jax.value_and_grad(
        lambda x, w, u, dn: _loss(
            functools.partial(self._ffn, activation="swiglu"), ct, x, ids, w, kept, u, dn
        ), (0, 1, 2, 3), has_aux=True,
    ))
    (_, y), grads = fn(x, weights, up, down)
    (_, y_ref), grads_ref = jax.jit(jax.value_and_grad(
        lambda x, w, u, dn: _loss(_per_expert_reference, ct, x, ids, w, kept, u, dn),
        (0, 1, 2, 3), has_aux=True,
    ))(x, weights, up, down)
    helpers.assert_close(y, y_ref, BF16, err_msg="y")
    names = ("x", "weights", "up_kernel", "down_kernel")
    for name, got, want in zip(names, grads, grads_ref):
      helpers.assert_close(got, want, BF16, kind="grad", err_msg=f"d_{name}")
    (_, y2), grads2 = fn(x, weights, up, down)
    assert np.array_equal(np.asarray(y), np.asarray(y2)), "y not bit-identical"
    for a, b in zip(grads, grads2):
      assert np.array_equal(np.asarray(a), np.asarray(b)), "grads not bit-identical"
