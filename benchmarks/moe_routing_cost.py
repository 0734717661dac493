"""Times `jmoe.moe` fwd and fwd+bwd at the `train_lm --preset gpu` layer shape
(t=16384, d=512, f=1024, e=8, k=2, bf16 activations, float32 params) with balanced,
collapsed (two experts +4 logits) and one-hot (+8 on one expert) routing, with
capacity 1.25 and dropless, for each backend given.

Usage: `python -m benchmarks.moe_routing_cost triton,reference`
"""
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jmoe
from jmoe.types import MoEParams

t, d, f, e, k = 16384, 512, 1024, 8, 2
keys = jax.random.split(jax.random.key(0), 6)
x = jax.random.normal(keys[0], (t, d), jnp.bfloat16)
params = MoEParams((jax.random.normal(keys[1], (d, e)) / np.sqrt(d)).astype(jnp.float32),
                   (jax.random.normal(keys[2], (e, d, 2 * f)) / np.sqrt(d)).astype(jnp.float32),
                   (jax.random.normal(keys[3], (e, f, d)) / np.sqrt(f)).astype(jnp.float32))
ct = jax.random.normal(keys[4], (t, d), jnp.float32)
def timeit(fn, *a, n=20):
  jax.block_until_ready(fn(*a)); jax.block_until_ready(fn(*a))
  ts = []
  for _ in range(5):
    t0 = time.perf_counter()
    for _ in range(n): out = fn(*a)
    jax.block_until_ready(out); ts.append((time.perf_counter() - t0) / n)
  return statistics.median(ts) * 1e3
for backend in sys.argv[1].split(","):
  for cf in (1.25, None):
    for name, bias in (("balanced", jnp.zeros((e,))), ("collapsed", jnp.array([4., 4., 0, 0, 0, 0, 0, 0]) ),
                       ("one-hot", jnp.array([8., 0, 0, 0, 0, 0, 0, 0]))):
      def loss(x, p, bias=bias, cf=cf, backend=backend):
        y, aux = jmoe.moe(x, p, top_k=k, capacity_factor=cf, logit_bias=bias, backend=backend)
        return jnp.sum(y.astype(jnp.float32) * ct) + aux.load_balancing_loss
      fb = jax.jit(jax.value_and_grad(loss, (0, 1)))
      fw = jax.jit(lambda x, p, bias=bias, cf=cf, backend=backend: jmoe.moe(x, p, top_k=k, capacity_factor=cf, logit_bias=bias, backend=backend))
      _, aux = fw(x, params)
      drop = float(jnp.mean(aux.dropped_fraction)) if hasattr(aux, "dropped_fraction") else float("nan")
      print(f"{backend:9s} cf={cf} {name:9s} fwd {timeit(fw, x, params):7.3f} ms  fwd+bwd {timeit(fb, x, params):7.3f} ms  dropped {drop:.1%}", flush=True)
