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

Backward (`_router_bwd_kernel`), one program per block of tokens: the gradient
of the probabilities (top-k weights with renormalisation, load-balancing
column term, direct cotangents), softmax backward, z-loss term, then
`dx = dlogits @ w^T` (w passed transposed, `[e, d]`). `_router_dw_kernel`:
`dw = x^T @ dlogits`, a grid over (d blocks, token splits) writing float32
partials `[SPLIT, d, e]` that the caller sums in a fixed order.

`DOT_F32` upcasts dot operands to float32 (Triton's interpreter gets bf16 /
fp16 `tl.dot` wrong; also used for float32 inputs); `INPUT_PRECISION` is
passed to `tl.dot` ("ieee", "tf32x3", "tf32").
"""

import triton
import triton.language as tl

# Shared memory budget used to prune configs (H100: 227 KB per block).
_SMEM_BYTES = 220 * 1024


def _pow2_at_least(n: int, lo: int) -> int:
  return max(lo, triton.next_power_of_2(n))


def _itemsize(arg) -> int:
  dtype = getattr(arg, "dtype", None)
  return getattr(dtype, "itemsize", 4) if dtype is not None else 4


def _prune_fwd(configs, named_args, **kwargs):
  """Drops configs whose pipelined x and w tiles overflow shared memory."""
  del kwargs
  e_pad = _pow2_at_least(int(named_args["e"]), 16)
  size = _itemsize(named_args.get("x_ptr"))
  kept = [
      c for c in configs
      if c.num_stages * size * c.kwargs["BLOCK_D"] * (c.kwargs["BLOCK_T"] + e_pad)
      <= _SMEM_BYTES
  ]
  return kept or configs[:1]


def _prune_bwd(configs, named_args, **kwargs):
  """Drops configs whose pipelined w^T tiles overflow shared memory."""
  del kwargs
  e_pad = _pow2_at_least(int(named_args["e"]), 16)
  size = _itemsize(named_args.get("wt_ptr"))
  kept = [
      c for c in configs
      if c.num_stages * size * c.kwargs["BLOCK_D"] * e_pad
      + 4 * c.kwargs["BLOCK_T"] * e_pad <= _SMEM_BYTES
  ]
  return kept or configs[:1]


def _prune_dw(configs, named_args, **kwargs):
  del kwargs
  e_pad = _pow2_at_least(int(named_args["e"]), 16)
  size = _itemsize(named_args.get("x_ptr"))
  kept = [
      c for c in configs
      if c.num_stages * c.kwargs["BLOCK_T"] * (size * c.kwargs["BLOCK_D"] + 4 * e_pad)
      <= _SMEM_BYTES
  ]
  return kept or configs[:1]


# BLOCK_T is chosen by the op (the per-block outputs depend on it) and passed
# explicitly, which prunes the configs with another BLOCK_T.
FWD_CONFIGS = [
    triton.Config({"BLOCK_T": bt, "BLOCK_D": bd}, num_warps=nw, num_stages=ns)
    for bt in (16, 32, 64)
    for bd, nw, ns in ((64, 4, 3), (128, 8, 3), (64, 8, 4), (128, 4, 2))
]

BWD_CONFIGS = [
    triton.Config({"BLOCK_T": bt, "BLOCK_D": bd}, num_warps=nw, num_stages=ns)
    for bt in (16, 32, 64)
    for bd, nw, ns in ((64, 4, 2), (128, 8, 3), (64, 8, 3))
]

DW_CONFIGS = [
    triton.Config({"BLOCK_T": bt, "BLOCK_D": bd}, num_warps=nw, num_stages=ns)
    for bt, bd, nw, ns in (
        (64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3), (32, 64, 4, 4),
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
):
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
  logits = tl.where(col_ok[None, :], acc, float("-inf"))
  row_max = tl.max(logits, axis=1)
  ex = tl.exp(logits - row_max[:, None])
  denom = tl.sum(ex, axis=1)
  probs = ex / denom[:, None]
  lse = row_max + tl.log(denom)
  tl.store(logits_ptr + rows64[:, None] * e + cols[None, :], acc, mask=valid)
  tl.store(probs_ptr + rows64[:, None] * e + cols[None, :], probs, mask=valid)
  tl.store(lse_ptr + rows, lse, mask=row_ok)

  # Top-k: TOP_K rounds of argmax; ties go to the lower expert index.
  kcols = tl.arange(0, K_PAD)
  work = tl.where(col_ok[None, :], probs, -1.0)
  chosen = tl.zeros((BLOCK_T, E_PAD), dtype=tl.int32)
  top_p = tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
  top_i = tl.zeros((BLOCK_T, K_PAD), dtype=tl.int32)
  for j in tl.static_range(TOP_K):
    best = tl.max(work, axis=1)
    idx = tl.min(tl.where(work == best[:, None], cols[None, :], E_PAD), axis=1)
    hit = cols[None, :] == idx[:, None]
    chosen = tl.where(hit, 1, chosen)
    work = tl.where(hit, -2.0, work)
    top_p = tl.where(kcols[None, :] == j, best[:, None], top_p)
    top_i = tl.where(kcols[None, :] == j, idx[:, None], top_i)
  weights = top_p
  if NORMALIZE:
    weights = top_p / tl.sum(top_p, axis=1)[:, None]
  kmask = row_ok[:, None] & (kcols[None, :] < TOP_K)
  kofs = rows64[:, None] * TOP_K + kcols[None, :]
  tl.store(ids_ptr + kofs, top_i, mask=kmask)
  tl.store(weights_ptr + kofs, weights, mask=kmask)

  # Per-block statistics (rows past t excluded).
  chosen = tl.where(row_ok[:, None], chosen, 0)
  block_ofs = pid * e + cols
  tl.store(psum_ptr + block_ofs, tl.sum(tl.where(valid, probs, 0.0), axis=0),
           mask=col_ok)
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
):
  """Router forward without capacity positions (dropless)."""
  _router_fwd_body(
      x_ptr, w_ptr, t, d, e,
      logits_ptr, probs_ptr, ids_ptr, weights_ptr, lse_ptr, psum_ptr, counts_ptr,
      counts_ptr, TOP_K, K_PAD, E_PAD, BLOCK_T, BLOCK_D, NORMALIZE, False,
      DOT_F32, INPUT_PRECISION,
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
):
  """Router forward that also writes block-local capacity positions."""
  _router_fwd_body(
      x_ptr, w_ptr, t, d, e,
      logits_ptr, probs_ptr, ids_ptr, weights_ptr, lse_ptr, psum_ptr, counts_ptr,
      pos_ptr, TOP_K, K_PAD, E_PAD, BLOCK_T, BLOCK_D, NORMALIZE, True,
      DOT_F32, INPUT_PRECISION,
  )


@triton.autotune(
    configs=BWD_CONFIGS, key=["d", "e"],
    prune_configs_by={"early_config_prune": _prune_bwd},
)
@triton.jit
def _router_bwd_kernel(
    probs_ptr, lse_ptr, ids_ptr, gw_ptr, glogits_ptr, gprobs_ptr, colterm_ptr,
    zcoef_ptr, wt_ptr, t, d, e,
    dlogits_ptr, dx_ptr,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, NORMALIZE: tl.constexpr,
    HAS_GLOGITS: tl.constexpr, HAS_GPROBS: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
  """dlogits [t, e] float32 and dx = dlogits @ w^T [t, d] for a block of tokens.

  Inputs: probs [t, e], lse [t], expert ids [t, TOP_K], gw [t, TOP_K] (weight
  cotangent, already zero for dropped copies), optional glogits / gprobs
  [t, e], colterm [e] (load-balancing loss term of dprobs), zcoef [1]
  (`2 * g_z / t`), wt = w^T [e, d].
  """
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
  ids = tl.load(ids_ptr + kofs, mask=kmask, other=-1)
  gw = tl.load(gw_ptr + kofs, mask=kmask, other=0.0)

  # dprobs from the top-k weights: w_j = p_j / S (S = sum of top-k p).
  g_top = tl.zeros((BLOCK_T, E_PAD), dtype=tl.float32)
  is_top = tl.zeros((BLOCK_T, E_PAD), dtype=tl.int32)
  top_sum = tl.zeros((BLOCK_T,), dtype=tl.float32)
  g_dot_p = tl.zeros((BLOCK_T,), dtype=tl.float32)
  for j in tl.static_range(TOP_K):
    id_j = tl.sum(tl.where(kcols[None, :] == j, ids, 0), axis=1)
    g_j = tl.sum(tl.where(kcols[None, :] == j, gw, 0.0), axis=1)
    hit = cols[None, :] == id_j[:, None]
    p_j = tl.sum(tl.where(hit, probs, 0.0), axis=1)
    top_sum += p_j
    g_dot_p += g_j * p_j
    g_top = tl.where(hit, g_j[:, None], g_top)
    is_top = tl.where(hit, 1, is_top)
  if NORMALIZE:
    top_sum = tl.where(row_ok, top_sum, 1.0)
    inv = 1.0 / top_sum
    shift = g_dot_p * inv  # sum_j g_j * w_j
    dprobs = tl.where(is_top != 0, (g_top - shift[:, None]) * inv[:, None], 0.0)
  else:
    dprobs = g_top
  dprobs += tl.load(colterm_ptr + cols, mask=col_ok, other=0.0)[None, :]
  if HAS_GPROBS:
    dprobs += tl.load(gprobs_ptr + te_ofs, mask=valid, other=0.0)

  # Softmax backward, plus the z-loss term 2 g_z lse / t * probs.
  inner = tl.sum(probs * dprobs, axis=1)
  lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
  zcoef = tl.load(zcoef_ptr)
  dlogits = probs * (dprobs - inner[:, None]) + (zcoef * lse)[:, None] * probs
  if HAS_GLOGITS:
    dlogits += tl.load(glogits_ptr + te_ofs, mask=valid, other=0.0)
  dlogits = tl.where(valid, dlogits, 0.0)
  tl.store(dlogits_ptr + te_ofs, dlogits, mask=valid)

  # dx = dlogits @ w^T, one BLOCK_D column block at a time.
  if DOT_F32:
    lhs = dlogits
  else:
    lhs = dlogits.to(wt_ptr.dtype.element_ty)
  for d0 in range(0, d, BLOCK_D):
    dd = d0 + tl.arange(0, BLOCK_D)
    d_ok = dd < d
    wt_tile = tl.load(
        wt_ptr + cols.to(tl.int64)[:, None] * d + dd[None, :],
        mask=col_ok[:, None] & d_ok[None, :], other=0.0,
    )
    if DOT_F32:
      wt_tile = wt_tile.to(tl.float32)
    dx = tl.dot(lhs, wt_tile, input_precision=INPUT_PRECISION)
    tl.store(
        dx_ptr + rows64[:, None] * d + dd[None, :],
        dx.to(dx_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


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
):
  """Partial `dw[s] = x[split s]^T @ dlogits[split s]`, float32 `[SPLIT, d, e]`.

  Program (i, s) owns rows `[i * BLOCK_D, ...)` of dw and the tokens
  `[s * tokens_per_split, (s + 1) * tokens_per_split)`.
  """
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
