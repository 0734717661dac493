"""Fused router kernels (only `@triton.jit` code, no jax).

Forward, one program per block of `BLOCK_T` tokens (`_router_fwd_kernel`):

  logits [BLOCK_T, E_PAD] = x[rows] @ w          (float32 accumulate, loop over d)
  lse = logsumexp(logits), probs = exp(logits - lse)
  top-k by TOP_K rounds of argmax over probs     (ties -> lower expert index)
  weights = top-k probs (/ their sum if NORMALIZE)

Experts are padded to `E_PAD` (a power of two >= 16) and masked: padded logits
are -inf, so their probabilities are exactly 0 and they are never chosen. Per
block it also writes, for the losses and capacity (all without atomics, so the
results are bit-identical run to run):

  psum   [num_blocks, e] float32  column sums of probs over the block's tokens
  counts [num_blocks, e] int32    routed copies (before dropping) per expert
  pos    [t, TOP_K] int32         (if WRITE_POS) copies of the same expert in
                                  earlier tokens of the same block: the
                                  block-local exclusive prefix count in
                                  flattened (token, choice) order.

A token's k choices are distinct experts, so "earlier in flattened order and
same expert" only ever means "an earlier token": the prefix count is an
exclusive cumulative sum over tokens of the [BLOCK_T, E_PAD] choice mask.

Backward: `_router_dlogits_kernel`, one program per block of tokens: the
gradient of the probabilities (top-k weights with renormalisation,
load-balancing column term, direct cotangents), softmax backward and z-loss
term. `_router_dx_kernel`: `dx = dlogits @ w^T` (w passed transposed,
`[e, d]`), a GEMM tiled over (tokens, d) with K = e. `_router_dw_kernel`:
`dw = x^T @ dlogits`, a grid over (d blocks, token splits) writing float32
partials `[SPLIT, d, e]` that the caller sums in a fixed order.

jax-triton gives scalar arguments no divisibility hints, so with plain `d`
and `e` as row strides Triton 3.6 emits 2-byte loads without `cp.async`
pipelining. Every kernel takes `D_ALIGN` / `E_ALIGN` (the largest of
16, 8, 4, 2, 1 dividing d / e) and rewrites `d = d // D_ALIGN * D_ALIGN`:
the same value, but provably a multiple of D_ALIGN.

`DOT_F32` upcasts dot operands to float32 (Triton's interpreter gets bf16 /
fp16 `tl.dot` wrong; also used for float32 inputs); `INPUT_PRECISION` is
passed to `tl.dot` ("ieee", "tf32x3", "tf32").
"""

import triton
import triton.language as tl

# Shared memory budget used to prune configs (H100: 227 KB per block).
_SMEM_BYTES = 220 * 1024


def stride_align(n: int) -> int:
  """The largest of 16, 8, 4, 2, 1 dividing `n` (pass as D_ALIGN / E_ALIGN)."""
  for a in (16, 8, 4, 2):
    if n % a == 0:
      return a
  return 1


def _pow2_at_least(n: int, lo: int) -> int:
  return max(lo, triton.next_power_of_2(n))


def _itemsize(arg) -> int:
  dtype = getattr(arg, "dtype", None)
  return getattr(dtype, "itemsize", 4) if dtype is not None else 4


def _fits(configs, smem_estimate, regs=lambda c: 0):
  """Configs whose shared memory estimate fits and whose float32 register
  tiles need at most 64 registers per thread. The small fallback configs
  (`BLOCK_D == 32`) are kept only when no larger one fits; if none fits at
  all, the one with the smallest footprint.

  The estimates below were fitted to the compiler's own numbers (Triton 3.6,
  sm_90, 16-byte-aligned pointers as jax-triton passes them, D_ALIGN = E_ALIGN
  = 16: `metadata.shared`) for every config at e=64 and e=256, bf16 and
  float32; no config they keep needs more than 232448 bytes.
  """
  kept = [c for c in configs if smem_estimate(c) <= _SMEM_BYTES and regs(c) <= 64]
  large = [c for c in kept if c.kwargs["BLOCK_D"] > 32]
  if large:
    return large
  return kept or [min(configs, key=lambda c: (regs(c) > 64, smem_estimate(c)))]


def _prune_fwd(configs, named_args, **kwargs):
  """Forward: num_stages buffers of the x [BLOCK_T, BLOCK_D] and w [BLOCK_D,
  E_PAD] tiles, plus a [BLOCK_T, E_PAD] float32 scratch for float32 inputs
  (tf32x3); [BLOCK_T, E_PAD] float32 tiles in registers (ptxas spills
  kilobytes at e=256, BLOCK_T=64 with 4 warps)."""
  del kwargs
  e_pad = _pow2_at_least(int(named_args["e"]), 16)
  size = _itemsize(named_args.get("x_ptr"))

  def smem(c):
    tiles = c.num_stages * size * c.kwargs["BLOCK_D"] * (c.kwargs["BLOCK_T"] + e_pad)
    scratch = 4 * c.kwargs["BLOCK_T"] * e_pad
    return max(tiles + (scratch if size == 4 else 0), scratch)

  return _fits(
      configs, smem, lambda c: c.kwargs["BLOCK_T"] * e_pad // (32 * c.num_warps)
  )


def _prune_dx(configs, named_args, **kwargs):
  """dx: num_stages buffers of the dlogits [BLOCK_T, BLOCK_E] float32 and w^T
  [BLOCK_E, BLOCK_D] tiles."""
  del kwargs
  e_pad = _pow2_at_least(int(named_args["e"]), 16)
  size = _itemsize(named_args.get("wt_ptr"))
  block_e = min(64, e_pad)
  return _fits(
      configs,
      lambda c: c.num_stages * block_e
      * (4 * c.kwargs["BLOCK_T"] + size * c.kwargs["BLOCK_D"]),
  )


def _prune_dw(configs, named_args, **kwargs):
  """dw: num_stages buffers of the x [BLOCK_T, BLOCK_D] and dlogits [BLOCK_T,
  E_PAD] float32 tiles (x1.25 for float32 inputs, tf32x3)."""
  del kwargs
  e_pad = _pow2_at_least(int(named_args["e"]), 16)
  size = _itemsize(named_args.get("x_ptr"))
  return _fits(
      configs,
      lambda c: (1.25 if size == 4 else 1.0) * c.num_stages * c.kwargs["BLOCK_T"]
      * (size * c.kwargs["BLOCK_D"] + 4 * e_pad),
      lambda c: c.kwargs["BLOCK_D"] * e_pad // (32 * c.num_warps) // 2,
  )


# BLOCK_T is chosen by the op (the per-block outputs depend on it) and passed
# explicitly, which prunes the configs with another BLOCK_T.
FWD_CONFIGS = [
    triton.Config({"BLOCK_T": bt, "BLOCK_D": bd}, num_warps=nw, num_stages=ns)
    for bt in (16, 32, 64)
    for bd, nw, ns in ((64, 4, 3), (64, 8, 4), (128, 8, 3), (32, 8, 2))
]

# BLOCK_E (the contraction tile of dx) is min(64, E_PAD), passed by the op.
DX_CONFIGS = [
    triton.Config({"BLOCK_T": bt, "BLOCK_D": bd}, num_warps=nw, num_stages=ns)
    for bt, bd, nw, ns in ((128, 128, 8, 3), (128, 64, 8, 4), (64, 64, 4, 2))
]

DW_CONFIGS = [
    triton.Config({"BLOCK_T": bt, "BLOCK_D": bd}, num_warps=nw, num_stages=ns)
    for bt, bd, nw, ns in (
        (64, 64, 4, 3), (128, 64, 8, 3), (32, 64, 4, 4), (32, 32, 4, 2),
    )
]


@triton.jit
def _router_fwd_body(
    x_ptr, w_ptr, t, d, e,
    logits_ptr, probs_ptr, ids_ptr, weights_ptr, lse_ptr, psum_ptr, counts_ptr,
    pos_ptr,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, NORMALIZE: tl.constexpr,
    WRITE_POS: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    D_ALIGN: tl.constexpr, E_ALIGN: tl.constexpr,
):
  d = d // D_ALIGN * D_ALIGN  # == d; tells the compiler rows are aligned
  e = e // E_ALIGN * E_ALIGN
  pid = tl.program_id(0)
  rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
  row_ok = rows < t
  rows64 = rows.to(tl.int64)
  cols = tl.arange(0, E_PAD)
  col_ok = cols < e

  # logits = x @ w, float32 accumulation over d.
  acc = tl.zeros((BLOCK_T, E_PAD), dtype=tl.float32)
  for d0 in range(0, d, BLOCK_D):
    dd = d0 + tl.arange(0, BLOCK_D)
    d_ok = dd < d
    x_tile = tl.load(
        x_ptr + rows64[:, None] * d + dd[None, :],
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    )
    w_tile = tl.load(
        w_ptr + dd.to(tl.int64)[:, None] * e + cols[None, :],
        mask=d_ok[:, None] & col_ok[None, :], other=0.0,
    )
    if DOT_F32:
      x_tile = x_tile.to(tl.float32)
      w_tile = w_tile.to(tl.float32)
    acc = tl.dot(x_tile, w_tile, acc, input_precision=INPUT_PRECISION)

  valid = row_ok[:, None] & col_ok[None, :]
  te_ofs = rows64[:, None] * e + cols[None, :]
  tl.store(logits_ptr + te_ofs, acc, mask=valid)
  logits = tl.where(col_ok[None, :], acc, float("-inf"))
  row_max = tl.max(logits, axis=1)
  probs = tl.exp(logits - row_max[:, None])
  denom = tl.sum(probs, axis=1)
  probs = probs / denom[:, None]
  tl.store(lse_ptr + rows, row_max + tl.log(denom), mask=row_ok)
  tl.store(probs_ptr + te_ofs, probs, mask=valid)
  block_ofs = pid * e + cols
  tl.store(psum_ptr + block_ofs, tl.sum(tl.where(valid, probs, 0.0), axis=0),
           mask=col_ok)

  # Top-k: TOP_K rounds of argmax; ties go to the lower expert index. Chosen
  # entries of `work` become -2 (padded experts are -1: never chosen).
  kcols = tl.arange(0, K_PAD)
  work = tl.where(col_ok[None, :], probs, -1.0)
  top_p = tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
  top_i = tl.zeros((BLOCK_T, K_PAD), dtype=tl.int32)
  for j in tl.static_range(TOP_K):
    best = tl.max(work, axis=1)
    idx = tl.min(tl.where(work == best[:, None], cols[None, :], E_PAD), axis=1)
    work = tl.where(cols[None, :] == idx[:, None], -2.0, work)
    top_p = tl.where(kcols[None, :] == j, best[:, None], top_p)
    top_i = tl.where(kcols[None, :] == j, idx[:, None], top_i)
  weights = top_p
  if NORMALIZE:
    weights = top_p / tl.sum(top_p, axis=1)[:, None]
  kmask = row_ok[:, None] & (kcols[None, :] < TOP_K)
  kofs = rows64[:, None] * TOP_K + kcols[None, :]
  tl.store(ids_ptr + kofs, top_i, mask=kmask)
  tl.store(weights_ptr + kofs, weights, mask=kmask)

  # Routed copies per expert in this block (rows past t excluded).
  chosen = ((work == -2.0) & row_ok[:, None]).to(tl.int32)
  tl.store(counts_ptr + block_ofs, tl.sum(chosen, axis=0), mask=col_ok)
  if WRITE_POS:
    before = tl.cumsum(chosen, axis=0) - chosen  # [BLOCK_T, E_PAD], exclusive
    pos = tl.zeros((BLOCK_T, K_PAD), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
      idx = tl.sum(tl.where(kcols[None, :] == j, top_i, 0), axis=1)
      p_j = tl.sum(tl.where(cols[None, :] == idx[:, None], before, 0), axis=1)
      pos = tl.where(kcols[None, :] == j, p_j[:, None], pos)
    tl.store(pos_ptr + kofs, pos, mask=kmask)


@triton.autotune(
    configs=FWD_CONFIGS, key=["d", "e"],
    prune_configs_by={"early_config_prune": _prune_fwd},
)
@triton.jit
def _router_fwd_kernel(
    x_ptr, w_ptr, t, d, e,
    logits_ptr, probs_ptr, ids_ptr, weights_ptr, lse_ptr, psum_ptr, counts_ptr,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, NORMALIZE: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    D_ALIGN: tl.constexpr, E_ALIGN: tl.constexpr,
):
  """Router forward without capacity positions (dropless)."""
  _router_fwd_body(
      x_ptr, w_ptr, t, d, e,
      logits_ptr, probs_ptr, ids_ptr, weights_ptr, lse_ptr, psum_ptr, counts_ptr,
      counts_ptr, TOP_K, K_PAD, E_PAD, BLOCK_T, BLOCK_D, NORMALIZE, False,
      DOT_F32, INPUT_PRECISION, D_ALIGN, E_ALIGN,
  )


@triton.autotune(
    configs=FWD_CONFIGS, key=["d", "e"],
    prune_configs_by={"early_config_prune": _prune_fwd},
)
@triton.jit
def _router_fwd_pos_kernel(
    x_ptr, w_ptr, t, d, e,
    logits_ptr, probs_ptr, ids_ptr, weights_ptr, lse_ptr, psum_ptr, counts_ptr,
    pos_ptr,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, NORMALIZE: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    D_ALIGN: tl.constexpr, E_ALIGN: tl.constexpr,
):
  """Router forward that also writes block-local capacity positions."""
  _router_fwd_body(
      x_ptr, w_ptr, t, d, e,
      logits_ptr, probs_ptr, ids_ptr, weights_ptr, lse_ptr, psum_ptr, counts_ptr,
      pos_ptr, TOP_K, K_PAD, E_PAD, BLOCK_T, BLOCK_D, NORMALIZE, True,
      DOT_F32, INPUT_PRECISION, D_ALIGN, E_ALIGN,
  )


@triton.jit
def _router_dlogits_kernel(
    probs_ptr, lse_ptr, ids_ptr, gw_ptr, glogits_ptr, gprobs_ptr, colterm_ptr,
    zcoef_ptr, t, e,
    dlogits_ptr,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, NORMALIZE: tl.constexpr,
    HAS_GLOGITS: tl.constexpr, HAS_GPROBS: tl.constexpr, E_ALIGN: tl.constexpr,
):
  """dlogits [t, e] float32 for a block of BLOCK_T tokens.

  Inputs: probs [t, e], lse [t], expert ids [t, TOP_K], gw [t, TOP_K] (weight
  cotangent, already zero for dropped copies), optional glogits / gprobs
  [t, e], colterm [e] (load-balancing loss term of dprobs), zcoef [1]
  (`2 * g_z / t`, the z-loss term).
  """
  e = e // E_ALIGN * E_ALIGN  # == e; tells the compiler rows are aligned
  pid = tl.program_id(0)
  rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
  row_ok = rows < t
  rows64 = rows.to(tl.int64)
  cols = tl.arange(0, E_PAD)
  col_ok = cols < e
  valid = row_ok[:, None] & col_ok[None, :]
  te_ofs = rows64[:, None] * e + cols[None, :]
  kcols = tl.arange(0, K_PAD)
  kmask = row_ok[:, None] & (kcols[None, :] < TOP_K)
  kofs = rows64[:, None] * TOP_K + kcols[None, :]
  probs = tl.load(probs_ptr + te_ofs, mask=valid, other=0.0)
  ids = tl.load(ids_ptr + kofs, mask=kmask, other=0)
  gw = tl.load(gw_ptr + kofs, mask=kmask, other=0.0)

  # dprobs from the top-k weights w_j = p_j / S (S = sum of the top-k p_j):
  # dp_j = (g_j - sum_l g_l w_l) / S, or g_j without renormalisation.
  if NORMALIZE:
    p_top = tl.load(probs_ptr + rows64[:, None] * e + ids, mask=kmask, other=0.0)
    inv = 1.0 / tl.where(row_ok, tl.sum(p_top, axis=1), 1.0)
    gw = (gw - (tl.sum(gw * p_top, axis=1) * inv)[:, None]) * inv[:, None]
  dprobs = tl.zeros((BLOCK_T, E_PAD), dtype=tl.float32)
  dprobs += tl.load(colterm_ptr + cols, mask=col_ok, other=0.0)[None, :]
  if HAS_GPROBS:
    dprobs += tl.load(gprobs_ptr + te_ofs, mask=valid, other=0.0)
  for j in tl.static_range(TOP_K):
    id_j = tl.sum(tl.where(kcols[None, :] == j, ids, 0), axis=1)
    g_j = tl.sum(tl.where(kcols[None, :] == j, gw, 0.0), axis=1)
    dprobs += tl.where(cols[None, :] == id_j[:, None], g_j[:, None], 0.0)

  # Softmax backward, plus the z-loss term 2 g_z lse / t * probs.
  inner = tl.sum(probs * dprobs, axis=1)
  lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
  zcoef = tl.load(zcoef_ptr)
  dlogits = probs * (dprobs - inner[:, None] + (zcoef * lse)[:, None])
  if HAS_GLOGITS:
    dlogits += tl.load(glogits_ptr + te_ofs, mask=valid, other=0.0)
  tl.store(dlogits_ptr + te_ofs, dlogits, mask=valid)


@triton.autotune(
    configs=DX_CONFIGS, key=["d", "e"],
    prune_configs_by={"early_config_prune": _prune_dx},
)
@triton.jit
def _router_dx_kernel(
    dlogits_ptr, wt_ptr, t, d, e,
    dx_ptr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    D_ALIGN: tl.constexpr, E_ALIGN: tl.constexpr,
):
  """dx [t, d] = dlogits [t, e] @ wt [e, d], one [BLOCK_T, BLOCK_D] tile each.

  dlogits is float32; unless DOT_F32 it is rounded to wt's dtype for the
  tensor cores (float32 accumulation).
  """
  d = d // D_ALIGN * D_ALIGN  # == d; tells the compiler rows are aligned
  e = e // E_ALIGN * E_ALIGN
  pid_t = tl.program_id(0)
  pid_d = tl.program_id(1)
  rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
  row_ok = rows < t
  rows64 = rows.to(tl.int64)
  dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
  d_ok = dd < d
  acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
  for e0 in range(0, e, BLOCK_E):
    ee = e0 + tl.arange(0, BLOCK_E)
    e_ok = ee < e
    g = tl.load(dlogits_ptr + rows64[:, None] * e + ee[None, :],
                mask=row_ok[:, None] & e_ok[None, :], other=0.0)
    wt = tl.load(wt_ptr + ee.to(tl.int64)[:, None] * d + dd[None, :],
                 mask=e_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_F32:
      wt = wt.to(tl.float32)
    else:
      g = g.to(wt_ptr.dtype.element_ty)
    acc = tl.dot(g, wt, acc, input_precision=INPUT_PRECISION)
  tl.store(dx_ptr + rows64[:, None] * d + dd[None, :], acc.to(dx_ptr.dtype.element_ty),
           mask=row_ok[:, None] & d_ok[None, :])


@triton.autotune(
    configs=DW_CONFIGS, key=["d", "e"],
    prune_configs_by={"early_config_prune": _prune_dw},
)
@triton.jit
def _router_dw_kernel(
    x_ptr, dlogits_ptr, t, d, e, tokens_per_split,
    dw_ptr,
    E_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    D_ALIGN: tl.constexpr, E_ALIGN: tl.constexpr,
):
  """Partial `dw[s] = x[split s]^T @ dlogits[split s]`, float32 `[SPLIT, d, e]`.

  Program (i, s) owns rows `[i * BLOCK_D, ...)` of dw and the tokens
  `[s * tokens_per_split, (s + 1) * tokens_per_split)`.
  """
  d = d // D_ALIGN * D_ALIGN  # == d; tells the compiler rows are aligned
  e = e // E_ALIGN * E_ALIGN
  pid_d = tl.program_id(0)
  pid_s = tl.program_id(1)
  dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
  d_ok = dd < d
  cols = tl.arange(0, E_PAD)
  col_ok = cols < e
  t_start = pid_s * tokens_per_split
  t_end = tl.minimum(t, t_start + tokens_per_split)
  acc = tl.zeros((BLOCK_D, E_PAD), dtype=tl.float32)
  for t0 in range(t_start, t_end, BLOCK_T):
    rows = t0 + tl.arange(0, BLOCK_T)
    row_ok = rows < t_end
    rows64 = rows.to(tl.int64)
    xt_tile = tl.load(  # [BLOCK_D, BLOCK_T] = x[rows, dd]^T
        x_ptr + rows64[None, :] * d + dd[:, None],
        mask=d_ok[:, None] & row_ok[None, :], other=0.0,
    )
    g_tile = tl.load(
        dlogits_ptr + rows64[:, None] * e + cols[None, :],
        mask=row_ok[:, None] & col_ok[None, :], other=0.0,
    )
    if DOT_F32:
      xt_tile = xt_tile.to(tl.float32)
    else:
      g_tile = g_tile.to(x_ptr.dtype.element_ty)
    acc = tl.dot(xt_tile, g_tile, acc, input_precision=INPUT_PRECISION)
  out = dw_ptr + pid_s.to(tl.int64) * d * e + dd.to(tl.int64)[:, None] * e
  tl.store(out + cols[None, :], acc, mask=d_ok[:, None] & col_ok[None, :])
