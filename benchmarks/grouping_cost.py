"""What grouping costs jmoe's grouped GEMM at a case's forward shapes.

The dense-GEMM bound (`benchmarks.dense_bound`) says how far jmoe is from the
device's library GEMM; this says why. The case's forward GEMMs (up:
`rows x d x pf`, down: `rows x f x d`, `rows = t * top_k`) run as
`jmoe.grouped_matmul` (the plain grouped kernel, on rows already sorted by
expert) with three group-size vectors:

  routed     the case's kept copies per expert, as its router sent them
  uniform    `rows / e` per expert (the remainder on the last): the same
             number of experts, no imbalance, the least padding
  one_group  every row on one weight matrix: the grouped kernel as a dense GEMM

Set beside the dense XLA dot of the same shape (`dense_bound`), the ratios
split the gap: `one_group / dense` is the kernel against the library,
`uniform / one_group` the cost of streaming `e` weight matrices instead of one,
`routed / uniform` the padded rows of the experts' last tiles (and imbalance).
`padded_rows` is the share of rows a `block_m` tile schedule computes beyond the
routed ones.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.dense_bound import DenseGemm

VARIANTS = ("routed", "uniform", "one_group")


def group_sizes(counts: Sequence[int], variant: str) -> np.ndarray:
  """`[g]` int32 group sizes of `variant` for the routed `counts` (`[e]`).

  Raises:
    ValueError: unknown `variant`.
  """
  counts = np.asarray(counts, np.int32)
  rows, e = int(counts.sum()), counts.shape[0]
  if variant == "routed":
    return counts
  if variant == "uniform":
    sizes = np.full(e, rows // e, np.int32)
    sizes[-1] += rows - int(sizes.sum())
    return sizes
  if variant == "one_group":
    return np.array([rows], np.int32)
  raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def padded_rows(counts: Sequence[int], block_m: int) -> float:
  """Share of rows that `block_m`-row tiles compute beyond `counts` (per group,
  the last tile's empty rows), as a fraction of `sum(counts)`."""
  counts = np.asarray(counts, np.int64)
  tiles = -(-counts // block_m)
  return float((tiles * block_m).sum() / max(1, counts.sum()) - 1.0)


def grouped_program(gemm: DenseGemm, sizes: np.ndarray, dtype, backend: str,
                    seed: int = 0):
  """`(fn, args)`: `jmoe.grouped_matmul` of a forward-shaped `gemm`
  (`[m, k] x [g, k, n]`, `g = len(sizes)`, `m = sum(sizes)`) on random operands."""
  import jmoe  # pylint: disable=import-outside-toplevel

  if gemm.batch != 1:
    raise ValueError(f"grouped_program takes forward-shaped GEMMs, got {gemm}")
  ka, kb = jax.random.split(jax.random.key(seed))
  a = jax.random.normal(ka, (gemm.m, gemm.k), dtype)
  b = jax.random.normal(kb, (len(sizes), gemm.k, gemm.n), dtype) * jnp.asarray(
      gemm.k ** -0.5, dtype)
  fn = jax.jit(lambda a, b, s: jmoe.grouped_matmul(a, b, s, backend=backend))
  return fn, (a, b, jnp.asarray(sizes, jnp.int32))


def ratio(a: float | None, b: float | None) -> float | None:
  """`a / b`, or None where either is missing (or `b` is 0)."""
  return None if a is None or not b else a / b


def ratios(ms: dict[str, float], dense_ms: float | None) -> dict[str, float | None]:
  """The gap split (module docstring) from `{variant: ms}` and the dense dot's ms."""
  return {"kernel": ratio(ms.get("one_group"), dense_ms),
          "weights": ratio(ms.get("uniform"), ms.get("one_group")),
          "padding": ratio(ms.get("routed"), ms.get("uniform")),
          "total": ratio(ms.get("routed"), dense_ms)}
