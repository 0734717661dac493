"""Device probe: tokamax.ragged_dot (mosaic) on the H100 at the benchmark shapes."""
import time, jax, jax.numpy as jnp, numpy as np, tokamax
print("devices", jax.devices(), "tokamax impls", list(tokamax._src.ops.ragged_dot.api.IMPLEMENTATIONS))
for (m, k, n, g) in ((8192*2, 768, 6144, 8), (8192*6, 2048, 2816, 64)):
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (m, k), jnp.bfloat16)
  w = jax.random.normal(kw, (g, k, n), jnp.bfloat16) / 30
  gs = jnp.full((g,), m // g, jnp.int32)
  for impl in ("mosaic", None):
    f = jax.jit(lambda x, w, gs: tokamax.ragged_dot(x, w, gs, preferred_element_type=jnp.float32, implementation=impl))
    try:
      y = f(x, w, gs).block_until_ready()
      ref = jax.lax.ragged_dot(x, w, gs, preferred_element_type=jnp.float32)
      err = float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
      for _ in range(3): f(x, w, gs)
      jax.block_until_ready(f(x, w, gs))
      t = time.perf_counter(); n_ = 20
      for _ in range(n_): out = f(x, w, gs)
      jax.block_until_ready(out); dt = (time.perf_counter() - t) / n_
      print(f"m={m} k={k} n={n} g={g} impl={impl}: err {err:.1e}, {dt*1e3:.3f} ms, {2*m*k*n/dt/1e12:.0f} TFLOP/s")
      gfn = jax.jit(jax.grad(lambda x, w: jnp.sum(tokamax.ragged_dot(x, w, gs, preferred_element_type=jnp.float32, implementation=impl)), (0, 1)))
      gx, gw = gfn(x, w); jax.block_until_ready(gw)
      print("  grad ok", gx.shape, gw.shape)
    except Exception as e:
      print(f"m={m} impl={impl}: FAILED {type(e).__name__}: {str(e)[:600]}")
