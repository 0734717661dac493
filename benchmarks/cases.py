"""Named MoE configurations and their inputs, shared by the benchmark and the tests.

A `Case` is one MoE layer shape (`t` tokens, `d` model, `f` expert hidden, `e`
experts, `top_k`) plus a routing distribution:

- `"learned"`: a randomly initialised router (`x ~ N(0, 1)`, router `N(0, 1/d)`),
  which spreads tokens nearly evenly over the experts;
- `"skewed"`: the same router with a Zipf-like per-expert logit offset
  `-zipf * log(rank)` (ranks a random permutation of `1..e`), so a few experts
  get most tokens. The offset enters through the layer itself: feature 0 of `x`
  is set to 1 and row 0 of the router kernel to the offsets, so
  `logits = x @ router_kernel` carries them without changing the API.

Example usage::

  case = CASES["deepseek"]          # t=8192 d=2048 f=1408 e=64 top_k=6
  x, params = make_inputs(case)     # x [t, d] bf16, MoEParams of bf16 arrays
  case.flops("fwdbwd")              # useful FLOPs: 3 * 2*t*k*3*d*f
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jmoe.types import MoEParams

MODES = ("fwd", "fwdbwd")
ROUTINGS = ("learned", "skewed")
GATED_ACTIVATIONS = ("swiglu", "geglu")
# Capacity factor of the one-hot (GShard/Switch) einsum reference.
EINSUM_CAPACITY_FACTOR = 1.25


@dataclasses.dataclass(frozen=True)
class Case:
  """One benchmark configuration.

  Attributes:
    name: unique name, used on the command line and in the results.
    tokens, d_model, d_ff, experts, top_k: the layer shape (`t d f e top_k`).
    routing: `"learned"` (random init) or `"skewed"` (Zipf-like offsets).
    zipf: exponent of the skewed offsets (unused for `"learned"`).
    dtype: input and parameter dtype name.
    activation: expert activation (`"swiglu"` is gated: `up_kernel [e, d, 2f]`).
    group: which selection the case belongs to (see `GROUPS`).
    target_ms: H100 targets in milliseconds per mode, e.g. `{"fwd": 0.3}`.
  """

  name: str
  tokens: int
  d_model: int
  d_ff: int
  experts: int
  top_k: int
  routing: str = "learned"
  zipf: float = 1.0
  dtype: str = "bfloat16"
  activation: str = "swiglu"
  group: str = "main"
  target_ms: Mapping[str, float] | None = dataclasses.field(default=None, compare=False)

  def __post_init__(self):
    if self.routing not in ROUTINGS:
      raise ValueError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
    if not 1 <= self.top_k <= self.experts:
      raise ValueError(f"need 1 <= top_k <= experts, got {self.top_k=} {self.experts=}")

  @property
  def gated(self) -> bool:
    return self.activation in GATED_ACTIVATIONS

  @property
  def shape_key(self) -> tuple:
    """Everything that determines the measurement (not the name or group)."""
    return (self.tokens, self.d_model, self.d_ff, self.experts, self.top_k,
            self.routing, self.zipf if self.routing == "skewed" else None,
            self.dtype, self.activation)

  @property
  def compile_key(self) -> tuple:
    """What the compiled programs depend on: the shape_key without the routing."""
    return (self.tokens, self.d_model, self.d_ff, self.experts, self.top_k, self.dtype,
            self.activation)

  def flops(self, mode: str) -> float:
    """Useful FLOPs of the expert GEMMs: `2*t*k*3*d*f` forward, 3x for fwd+bwd.

    Router, softmax, permutation and padding are not counted (non-gated
    activations have 2 GEMMs instead of 3).
    """
    n_gemms = 3 if self.gated else 2
    fwd = 2.0 * self.tokens * self.top_k * n_gemms * self.d_model * self.d_ff
    if mode == "fwd":
      return fwd
    if mode == "fwdbwd":
      return 3.0 * fwd
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

  def capacity(self, capacity_factor: float = EINSUM_CAPACITY_FACTOR) -> int:
    """Per-expert capacity `ceil(cf * t * top_k / e)` (DESIGN.md, `route`)."""
    return math.ceil(capacity_factor * self.tokens * self.top_k / self.experts)

  def einsum_dispatch_elements(self) -> int:
    """Elements of the `[t, e, capacity]` one-hot dispatch tensor."""
    return self.tokens * self.experts * self.capacity()

  def ragged_dot_vjp_bytes(self) -> int:
    """Bytes of the largest float32 `[e, t * top_k, n]` buffer of `jax.lax.ragged_dot`'s
    VJP (n the wider of the two GEMM outputs): on the GPU (jax 0.11) the transpose
    is dense per group, e.g. 33 GiB for `deepseek`, where it ran out of memory."""
    n = max(2 * self.d_ff if self.gated else self.d_ff, self.d_model)
    return 4 * self.experts * self.tokens * self.top_k * n

  def describe(self) -> str:
    s = (f"t={self.tokens} d={self.d_model} f={self.d_ff} e={self.experts} "
         f"k={self.top_k} {self.dtype} {self.activation} {self.routing}")
    return s + (f"(zipf={self.zipf:g})" if self.routing == "skewed" else "")


def _main_cases() -> list[Case]:
  small = Case("small", 4096, 768, 3072, 8, 2, target_ms={"fwd": 0.30, "fwdbwd": 1.0})
  mixtral = Case("mixtral", 8192, 4096, 14336, 8, 2,
                 target_ms={"fwd": 9.0, "fwdbwd": 27.0})
  deepseek = Case("deepseek", 8192, 2048, 1408, 64, 6,
                  target_ms={"fwd": 1.6, "fwdbwd": 5.0})
  mains = [small, mixtral, deepseek]
  skewed = [
      dataclasses.replace(c, name=f"{c.name}-skewed", routing="skewed",
                          group="skewed", target_ms=None)
      for c in mains
  ]
  return mains + skewed


def _sweep_cases() -> list[Case]:
  # Sweeps share d=2048, f=1408 (DeepSeek-like experts) and t=8192.
  base = dict(d_model=2048, d_ff=1408)
  cases = [Case(f"sweep-e{e}", 8192, experts=e, top_k=2, group="sweep-e", **base)
           for e in (8, 16, 32, 64, 128, 256)]
  cases += [Case(f"sweep-k{k}", 8192, experts=64, top_k=k, group="sweep-k", **base)
            for k in (1, 2, 4, 8)]
  cases += [Case(f"sweep-t{t // 1024}k", t, experts=64, top_k=6, group="sweep-tokens",
                 **base)
            for t in (1024, 2048, 4096, 8192, 16384, 32768)]
  return cases


def _tiny_cases() -> list[Case]:
  # CPU: small enough for Triton's interpreter; widths not multiples of 16.
  tiny = Case("tiny", 64, 40, 56, 8, 2, group="cpu")
  return [tiny, dataclasses.replace(tiny, name="tiny-skewed", routing="skewed")]


CASES: dict[str, Case] = {c.name: c for c in
                          _tiny_cases() + _main_cases() + _sweep_cases()}
GROUPS: dict[str, tuple[str, ...]] = {}
for _c in CASES.values():
  GROUPS.setdefault(_c.group, ())
  GROUPS[_c.group] += (_c.name,)
GROUPS["sweeps"] = GROUPS["sweep-e"] + GROUPS["sweep-k"] + GROUPS["sweep-tokens"]
GROUPS["all-gpu"] = GROUPS["main"] + GROUPS["skewed"] + GROUPS["sweeps"]
# jmoe's fwd+bwd peak memory at deepseek <= half the one-hot reference's (the first
# of the baselines that was measured).
MEMORY_TARGET = {"case": "deepseek", "impl": "jmoe",
                 "baselines": ("ref-einsum", "ref-einsum-bf16"), "max_ratio": 0.5}


def select(names: Iterable[str]) -> list[Case]:
  """Cases for names and group names (`main`, `sweeps`, ...), in order, unique.

  Raises:
    ValueError: an unknown name, listing the known ones.
  """
  out: dict[str, Case] = {}
  for name in names:
    name = name.strip()
    if not name:
      continue
    if name in GROUPS:
      out.update((n, CASES[n]) for n in GROUPS[name])
    elif name in CASES:
      out[name] = CASES[name]
    else:
      raise ValueError(f"unknown case {name!r}; cases: {sorted(CASES)}, groups: "
                       f"{sorted(GROUPS)}")
  return list(out.values())


def zipf_offsets(experts: int, zipf: float, seed: int = 0) -> np.ndarray:
  """`[e]` float32 logit offsets `-zipf * log(rank)`, ranks a permutation of 1..e."""
  ranks = np.random.default_rng(seed).permutation(experts) + 1
  return (-zipf * np.log(ranks)).astype(np.float32)


def make_inputs(case: Case, seed: int = 0) -> tuple[jax.Array, MoEParams]:
  """Random inputs of `case` on the default device (never zeros).

  Returns:
    x: `[t, d]` of `case.dtype`, `N(0, 1)`.
    params: `MoEParams(router_kernel [d, e], up_kernel [e, d, 2f] (gated) or
      [e, d, f], down_kernel [e, f, d])`, scaled `1/sqrt(fan_in)`.
  """
  dtype = jnp.dtype(case.dtype)
  t, d, f, e = case.tokens, case.d_model, case.d_ff, case.experts
  up_cols = 2 * f if case.gated else f
  kx, kr, ku, kd = jax.random.split(jax.random.key(seed), 4)

  @jax.jit
  def build(kx, kr, ku, kd):
    x = jax.random.normal(kx, (t, d), dtype)
    router = jax.random.normal(kr, (d, e), jnp.float32) / math.sqrt(d)
    up = jax.random.normal(ku, (e, d, up_cols), dtype) * jnp.asarray(d ** -0.5, dtype)
    down = jax.random.normal(kd, (e, f, d), dtype) * jnp.asarray(f ** -0.5, dtype)
    if case.routing == "skewed":
      x = x.at[:, 0].set(1)
      router = router.at[0, :].set(zipf_offsets(e, case.zipf, seed))
    return x, MoEParams(router.astype(dtype), up, down)

  return build(kx, kr, ku, kd)


def expert_load(tokens_per_expert) -> dict[str, float]:
  """Utilisation summary of `[e]` token copies per expert.

  Returns max/mean load, min/mean load, coefficient of variation and the
  number of empty experts (all floats, for JSON).
  """
  n = np.asarray(tokens_per_expert, dtype=np.float64)
  mean = n.mean() if n.size else 0.0
  if mean == 0:
    return {"max_over_mean": 0.0, "min_over_mean": 0.0, "cv": 0.0,
            "empty_experts": float(n.size)}
  return {"max_over_mean": float(n.max() / mean),
          "min_over_mean": float(n.min() / mean),
          "cv": float(n.std() / mean), "empty_experts": float((n == 0).sum())}
