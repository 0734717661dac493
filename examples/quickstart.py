"""jmoe quickstart: an MoE layer under jit, with a gradient.

Run:  python examples/quickstart.py   (CPU: the pure-jnp reference; GPU: Triton)
"""

import jax
import jax.numpy as jnp
from flax import nnx

import jmoe.nnx

# 8 experts of width 256 on a 64-wide model; each token goes to its top 2 experts.
layer = jmoe.nnx.MoELayer(
    d_model=64, num_experts=8, d_ff=256, top_k=2, capacity_factor=1.25,
    rngs=nnx.Rngs(0),
)
x = jax.random.normal(jax.random.key(1), (4, 128, 64))  # [batch, seq, d_model]


@nnx.jit
def loss_fn(model, x):
  y, aux = model(x)
  # The layer returns its auxiliary losses (already weighted) instead of adding them.
  return jnp.mean(y**2) + aux["total_aux_loss"], aux


(loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(layer, x)

print(f"backend           {jmoe.resolve_backend('auto')}")
print(f"loss              {float(loss):.5f}")
print(f"load balancing    {float(aux['load_balancing_loss']):.4f} (1 = balanced)")
print(f"router z-loss     {float(aux['router_z_loss']):.4f}")
print(f"tokens per expert {aux['tokens_per_expert'].tolist()}")
print(f"dropped           {int(aux['dropped_count'])} "
      f"({float(aux['dropped_fraction']):.1%})")
print(f"|grad up_kernel|  {float(jnp.linalg.norm(grads.up_kernel[...])):.5f}")
