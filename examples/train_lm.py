"""Train a small byte-level MoE transformer language model with jmoe.

The corpus is the `.py` source of the Python standard library on this machine
(`sysconfig.get_paths()["stdlib"]`, so it is available offline everywhere): files
in sorted order, about 5% of them (chosen by a hash of their relative path) held
out for evaluation. The model is `jmoe.nnx.MoETransformerBlock`s between a byte
embedding and a tied output head; it is trained with optax AdamW, linear warm-up
then cosine decay, and global-norm gradient clipping.

It prints progress (tqdm), periodic held-out loss, the auxiliary losses and the
per-expert utilisation; saves a checkpoint (`flax.serialization` msgpack) that
`--resume` restores; writes PNG plots of the loss curves and the expert
utilisation, a JSON summary and the metric history.

Examples::

  python examples/train_lm.py --tiny                       # CPU, ~1-2 min
  python examples/train_lm.py --preset gpu --backend triton --out-dir runs/gpu
  python examples/train_lm.py --tiny --steps 400 --resume  # continue a run
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import pathlib
import sys
import sysconfig
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax import serialization

import jmoe
import jmoe.nnx
from jmoe import _layer_common

# ------------------------------------------------------------------------------
# Configuration.
# ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
  """Model, optimiser and run settings (every field is a CLI flag)."""

  # Model.
  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_experts: int = 4
  d_ff: int = 128
  top_k: int = 2
  capacity_factor: float | None = 1.25
  activation: str = "swiglu"
  router_jitter: float = 0.0
  load_balancing_loss_weight: float = 1e-2
  router_z_loss_weight: float = 1e-3
  dtype: str = "float32"  # compute dtype; parameters stay float32
  backend: str = "auto"
  # Data and optimisation.
  seq_len: int = 64
  batch_size: int = 16
  steps: int = 300
  lr: float = 3e-3
  min_lr_ratio: float = 0.1
  warmup_steps: int = 30
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  # Logging and evaluation.
  log_every: int = 10
  eval_every: int = 100
  eval_batches: int = 4
  checkpoint_every: int = 0  # 0: only at the end
  seed: int = 0
  max_bytes: int = 0  # 0: the whole corpus; else cap each split (for tests)


PRESETS: dict[str, dict[str, Any]] = {
    # CPU, reference backend, about a minute or two.
    "tiny": dict(backend="reference", steps=300, log_every=10, eval_every=100),
    # A real size for one GPU: 82M parameters (75M in 48 experts), ~25M active
    # per token (8 experts top-2 per layer), bf16 compute, 16k tokens per step.
    "gpu": dict(
        d_model=512, num_layers=6, num_heads=8, num_experts=8, d_ff=1024, top_k=2,
        capacity_factor=1.25, dtype="bfloat16", seq_len=256, batch_size=64,
        steps=1000, lr=1e-3, warmup_steps=100, log_every=25, eval_every=250,
        eval_batches=8,
    ),
}


# ------------------------------------------------------------------------------
# Data: the standard library's Python source, bytes.
# ------------------------------------------------------------------------------

EXCLUDED_DIRS = ("site-packages", "dist-packages", "__pycache__")
VALID_PERCENT = 5


def corpus_files(root: str | None = None) -> list[pathlib.Path]:
  """The stdlib `.py` files in sorted order (third-party packages excluded)."""
  root_path = pathlib.Path(root or sysconfig.get_paths()["stdlib"])
  files = [
      f for f in root_path.rglob("*.py")
      if not any(part in EXCLUDED_DIRS for part in f.relative_to(root_path).parts)
  ]
  return sorted(files, key=lambda f: f.relative_to(root_path).as_posix())


def load_corpus(max_bytes: int = 0, root: str | None = None):
  """Returns `(train, valid, info)`: uint8 arrays and a description.

  A file goes to the held-out split when `crc32(relative path) % 100 <
  VALID_PERCENT`, so the split does not depend on which other files exist.
  Files are joined with a NUL byte. `max_bytes > 0` caps each split.
  """
  root_path = pathlib.Path(root or sysconfig.get_paths()["stdlib"])
  files = corpus_files(str(root_path))
  parts: dict[str, list[bytes]] = {"train": [], "valid": []}
  sizes = {"train": 0, "valid": 0}
  counts = {"train": 0, "valid": 0}
  for f in files:
    rel = f.relative_to(root_path).as_posix()
    split = "valid" if zlib.crc32(rel.encode()) % 100 < VALID_PERCENT else "train"
    if max_bytes and sizes[split] >= max_bytes:
      continue
    try:
      data = f.read_bytes()
    except OSError:
      continue
    parts[split].append(data + b"\0")
    sizes[split] += len(data) + 1
    counts[split] += 1
  arrays = {}
  for split, chunks in parts.items():
    buf = b"".join(chunks)
    if max_bytes:
      buf = buf[:max_bytes]
    arrays[split] = np.frombuffer(buf, dtype=np.uint8)
  info = {
      "root": str(root_path),
      "python": sys.version.split()[0],
      "files": {k: counts[k] for k in counts},
      "bytes": {k: int(arrays[k].size) for k in arrays},
      "crc32": {k: zlib.crc32(arrays[k].tobytes()) for k in arrays},
  }
  return arrays["train"], arrays["valid"], info


def get_batch(data: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int):
  """`(inputs, targets)` `[batch, seq]` int32: random windows, fixed by (seed, step)."""
  gen = np.random.default_rng([seed, step])
  starts = gen.integers(0, data.size - seq_len - 1, size=batch_size)
  idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
  windows = data[idx].astype(np.int32)
  return windows[:, :-1], windows[:, 1:]


# ------------------------------------------------------------------------------
# Model.
# ------------------------------------------------------------------------------

VOCAB = 256


def embed_bytes(embed: nnx.Embed, tokens: jax.Array, dtype) -> jax.Array:
  """`embed(tokens)` (`[..., d]` in `dtype`) as a one-hot matmul.

  The same rows, exactly (one nonzero product per output, HIGHEST precision),
  but the table's gradient becomes a `[256, d]` matmul instead of XLA's
  scatter-add of every token's row gradient into 256 rows. On the H100 that bf16
  scatter took 29 ms per step from the initial parameters and 93 ms once
  trained, most of the step (`benchmarks/train_step_probe.py --trace`,
  benchmarks/results/train_lm_h100.md); the matmul costs ~2 * tokens * 256 * d
  flops and is deterministic.
  """
  one_hot = jax.nn.one_hot(tokens, embed.num_embeddings, dtype=dtype)
  table = embed.embedding[...].astype(dtype)
  out = jnp.einsum("...v,vd->...d", one_hot, table, precision=jax.lax.Precision.HIGHEST,
                   preferred_element_type=jnp.float32)
  return out.astype(dtype)


class MoELM(nnx.Module):
  """Byte embedding -> MoE transformer blocks -> RMSNorm -> tied output head."""

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    self.dtype = dtype
    self.embed = nnx.Embed(VOCAB, cfg.d_model, dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([
        jmoe.nnx.MoETransformerBlock(
            cfg.d_model, cfg.num_heads, cfg.num_experts, cfg.d_ff, cfg.top_k,
            capacity_factor=cfg.capacity_factor, activation=cfg.activation,
            router_jitter=cfg.router_jitter,
            load_balancing_loss_weight=cfg.load_balancing_loss_weight,
            router_z_loss_weight=cfg.router_z_loss_weight, dtype=dtype,
            backend=cfg.backend, rngs=rngs,
        )
        for _ in range(cfg.num_layers)
    ])
    self.final_norm = nnx.RMSNorm(cfg.d_model, dtype=dtype, rngs=rngs)

  def __call__(self, tokens: jax.Array, *, deterministic: bool | None = None):
    """`tokens [batch, seq]` int -> `(logits [batch, seq, 256] f32, aux)`."""
    h = embed_bytes(self.embed, tokens, self.dtype)
    auxes = []
    for block in self.blocks:
      h, aux = block(h, deterministic=deterministic)
      auxes.append(aux)
    h = self.final_norm(h)
    logits = self.embed.attend(h).astype(jnp.float32)
    return logits, _layer_common.sum_aux(auxes)


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def make_optimizer(cfg: Config):
  """`(tx, schedule)`: AdamW (no decay on vectors), warm-up + cosine, clipping."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=max(1, cfg.warmup_steps),
      decay_steps=max(cfg.steps, cfg.warmup_steps + 1),
      end_value=cfg.lr * cfg.min_lr_ratio,
  )
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  return optax.chain(
      optax.clip_by_global_norm(cfg.clip_norm),
      optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=cfg.weight_decay,
                  mask=decay_mask),
  ), schedule


# ------------------------------------------------------------------------------
# Train state, steps, checkpoint.
# ------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainState:
  step: int
  params: Any  # nnx.State of the nnx.Param variables
  opt_state: Any
  other: Any  # the rest of the model state (rng streams, if any)


def init_state(cfg: Config):
  """Returns `(graphdef, TrainState at step 0, tx, schedule)`."""
  model = MoELM(cfg, rngs=nnx.Rngs(params=cfg.seed, router=cfg.seed + 1))
  graphdef, params, other = nnx.split(model, nnx.Param, ...)
  tx, schedule = make_optimizer(cfg)
  return graphdef, TrainState(0, params, tx.init(params), other), tx, schedule


def cross_entropy(logits, targets):
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


@functools.lru_cache(maxsize=8)
def build_steps(cfg: Config):
  """Jitted `train_step` and `eval_step` for a config (cached: one compile each)."""
  graphdef, _, tx, _ = init_state(cfg)

  def train_step(params, opt_state, other, inputs, targets):
    def loss_fn(params):
      model = nnx.merge(graphdef, params, other)
      logits, aux = model(inputs, deterministic=False)
      ce = cross_entropy(logits, targets)
      _, _, new_other = nnx.split(model, nnx.Param, ...)
      return ce + aux["total_aux_loss"], (ce, aux, new_other)

    (loss, (ce, aux, new_other)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = dict(loss=loss, ce=ce, grad_norm=optax.tree.norm(grads), **aux)
    return params, opt_state, new_other, metrics

  def eval_step(params, other, inputs, targets):
    model = nnx.merge(graphdef, params, other)
    logits, aux = model(inputs, deterministic=True)
    return cross_entropy(logits, targets), aux

  return (jax.jit(train_step, donate_argnums=(0, 1, 2)), jax.jit(eval_step))


def _key_leaf(leaf) -> bool:
  return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def save_checkpoint(path: pathlib.Path, state: TrainState, cfg: Config) -> None:
  """Writes the step, config and every array of the train state (msgpack)."""
  leaves = jax.tree.leaves((state.params, state.opt_state, state.other))
  arrays = {
      str(i): np.asarray(jax.random.key_data(x) if _key_leaf(x) else x)
      for i, x in enumerate(leaves)
  }
  blob = serialization.msgpack_serialize({
      "step": state.step,
      "config": json.dumps(dataclasses.asdict(cfg)),
      "leaves": arrays,
  })
  tmp = path.with_suffix(".tmp")
  tmp.write_bytes(blob)
  os.replace(tmp, path)


def restore_checkpoint(path: pathlib.Path,
                       template: TrainState) -> tuple[TrainState, dict]:
  """Restores a checkpoint into the structure of `template` (a fresh state).

  Returns `(state, saved_config_dict)`. Raises ValueError when the checkpoint
  does not fit the template (another model size).
  """
  blob = serialization.msgpack_restore(path.read_bytes())
  tree = (template.params, template.opt_state, template.other)
  leaves, treedef = jax.tree.flatten(tree)
  saved = blob["leaves"]
  if len(saved) != len(leaves):
    raise ValueError(
        f"checkpoint {path} has {len(saved)} arrays, this model needs {len(leaves)}")
  restored = []
  for i, ref in enumerate(leaves):
    arr = saved[str(i)]
    if _key_leaf(ref):
      restored.append(jax.random.wrap_key_data(jnp.asarray(arr)))
      continue
    if tuple(arr.shape) != tuple(ref.shape):
      raise ValueError(
          f"checkpoint {path}: array {i} has shape {arr.shape}, expected {ref.shape}")
    restored.append(jnp.asarray(arr, dtype=ref.dtype))
  params, opt_state, other = jax.tree.unflatten(treedef, restored)
  return TrainState(int(blob["step"]), params, opt_state, other), json.loads(
      blob["config"])


# ------------------------------------------------------------------------------
# Evaluation, plots.
# ------------------------------------------------------------------------------


def evaluate(eval_step, state: TrainState, valid: np.ndarray, cfg: Config) -> dict:
  """Mean held-out cross-entropy over fixed batches (same batches every time)."""
  ces, tpe = [], []
  for i in range(cfg.eval_batches):
    inputs, targets = get_batch(valid, cfg.batch_size, cfg.seq_len, cfg.seed + 10**6, i)
    ce, aux = eval_step(state.params, state.other, inputs, targets)
    ces.append(float(ce))
    tpe.append(np.asarray(aux["tokens_per_expert"]))
  ce = float(np.mean(ces))
  return {"eval_ce": ce, "eval_bits_per_byte": ce / math.log(2),
          "eval_tokens_per_expert": np.sum(tpe, axis=0).tolist()}


def write_plots(out_dir: pathlib.Path, history: list[dict], evals: list[dict],
                cfg: Config) -> list[str]:
  """Loss curves and expert utilisation over training as PNG files."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  steps = [h["step"] for h in history]
  paths = []
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  axes[0].plot(steps, [h["ce"] for h in history], label="train cross-entropy")
  if evals:
    axes[0].plot([e["step"] for e in evals], [e["eval_ce"] for e in evals], "o-",
                 label="held-out cross-entropy")
  axes[0].set_ylabel("nats / byte")
  axes[0].set_title("Language-model loss")
  axes[1].plot(steps, [h["load_balancing_loss"] / cfg.num_layers for h in history],
               label="load balancing (1 = balanced)")
  axes[1].plot(steps, [h["router_z_loss"] / cfg.num_layers for h in history],
               label="router z-loss")
  axes[1].set_title("Auxiliary losses (mean over layers)")
  axes[2].plot(steps, [100 * h["dropped_fraction"] for h in history])
  axes[2].set_ylabel("% of token copies")
  axes[2].set_title(f"Dropped by capacity (factor {cfg.capacity_factor})")
  for ax in axes:
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0].legend()
  axes[1].legend()
  fig.tight_layout()
  path = out_dir / "loss.png"
  fig.savefig(path, dpi=100)
  plt.close(fig)
  paths.append(str(path))

  util = np.array([h["utilisation"] for h in history])  # [n, layers, e]
  cols = min(cfg.num_layers, 4)
  rows = math.ceil(cfg.num_layers / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
  for layer in range(cfg.num_layers):
    ax = axes[layer // cols][layer % cols]
    for ex in range(cfg.num_experts):
      ax.plot(steps, util[:, layer, ex], label=f"expert {ex}")
    ax.axhline(1.0 / cfg.num_experts, color="k", ls="--", lw=0.8)
    ax.set_title(f"layer {layer}: share of routed copies")
    ax.set_xlabel("step")
    ax.set_ylim(0, max(0.5, float(util[:, layer].max()) * 1.1))
  for layer in range(cfg.num_layers, rows * cols):
    axes[layer // cols][layer % cols].axis("off")
  if cfg.num_experts <= 16:
    axes[0][0].legend(fontsize=7, ncol=2)
  fig.tight_layout()
  path = out_dir / "expert_utilisation.png"
  fig.savefig(path, dpi=100)
  plt.close(fig)
  paths.append(str(path))
  return paths


# ------------------------------------------------------------------------------
# Main loop.
# ------------------------------------------------------------------------------


def _utilisation(tokens_per_expert: np.ndarray, cfg: Config, tokens: int) -> list:
  """`[layers, e]` share of the `tokens * top_k` routed copies each expert kept."""
  return (np.asarray(tokens_per_expert) / (tokens * cfg.top_k)).tolist()


def train(cfg: Config, out_dir: pathlib.Path, *, resume: bool = False,
          stop_after: int | None = None, progress: bool = True,
          save: bool = True) -> dict:
  """Trains (or resumes) a model; returns the summary written to summary.json.

  `stop_after` ends the run early at that step (the schedule still spans
  `cfg.steps`), as if preempted: `resume=True` then continues it exactly.
  `save=False` writes no checkpoint (for timing runs).
  """
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  out_dir.mkdir(parents=True, exist_ok=True)
  backend = jmoe.resolve_backend(cfg.backend)
  train_data, valid_data, corpus = load_corpus(cfg.max_bytes)
  graphdef, state, _, schedule = init_state(cfg)
  del graphdef
  n_params = count_params(state.params)
  ckpt = out_dir / "checkpoint.msgpack"
  history_path = out_dir / "history.json"
  history, evals = [], []
  if resume:
    if not ckpt.exists():
      raise FileNotFoundError(f"--resume: no checkpoint at {ckpt}")
    state, saved_cfg = restore_checkpoint(ckpt, state)
    if history_path.exists():
      old = json.loads(history_path.read_text())
      history = [h for h in old["train"] if h["step"] <= state.step]
      evals = [e for e in old["eval"] if e["step"] <= state.step]
    print(f"resumed from {ckpt} at step {state.step} (saved config differs in: "
          f"{sorted(k for k, v in saved_cfg.items() if getattr(cfg, k, v) != v)})")
  start_step = state.step
  stop = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
  train_step, eval_step = build_steps(cfg)

  print(f"jmoe {jmoe.__version__} | backend {backend} | device {jax.devices()[0]}")
  print(f"corpus {corpus['root']}: {corpus['files']['train']} train files "
        f"({corpus['bytes']['train'] / 1e6:.1f} MB), {corpus['files']['valid']} "
        f"held-out ({corpus['bytes']['valid'] / 1e6:.2f} MB)")
  print(f"model: {n_params / 1e6:.2f}M parameters, {cfg.num_layers} layers, "
        f"{cfg.num_experts} experts top-{cfg.top_k}, d_model {cfg.d_model}, "
        f"d_ff {cfg.d_ff}, {cfg.dtype}")

  tokens_per_step = cfg.batch_size * cfg.seq_len
  timed_tokens, timed_seconds = 0, 0.0
  compile_seconds = None
  t_mark = None
  pbar = tqdm(range(start_step, stop), initial=start_step, total=stop,
              disable=not progress, dynamic_ncols=True)
  metrics = None
  for step in pbar:
    inputs, targets = get_batch(train_data, cfg.batch_size, cfg.seq_len, cfg.seed, step)
    t0 = time.perf_counter()
    params, opt_state, other, metrics = train_step(
        state.params, state.opt_state, state.other, inputs, targets)
    state = TrainState(step + 1, params, opt_state, other)
    if compile_seconds is None:  # first step: compile + run, not counted in tokens/s
      jax.block_until_ready(metrics["loss"])
      compile_seconds = time.perf_counter() - t0
      t_mark = time.perf_counter()
    else:
      timed_tokens += tokens_per_step
    done = state.step
    is_log = done % cfg.log_every == 0 or done == stop
    is_eval = cfg.eval_every and (done % cfg.eval_every == 0 or done == stop)
    is_ckpt = cfg.checkpoint_every and done % cfg.checkpoint_every == 0
    if is_log or is_eval or is_ckpt:
      m = jax.device_get(metrics)  # waits for the step
      now = time.perf_counter()
      timed_seconds += now - t_mark
      record = {
          "step": done,
          "lr": float(schedule(done - 1)),
          **{k: float(m[k]) for k in ("loss", "ce", "grad_norm", "total_aux_loss",
                                      "load_balancing_loss", "router_z_loss")},
          "dropped_fraction": float(np.mean(m["dropped_fraction"])),
          "utilisation": _utilisation(m["tokens_per_expert"], cfg, tokens_per_step),
      }
      history.append(record)
      tps = timed_tokens / timed_seconds if timed_seconds > 0 else float("nan")
      pbar.set_postfix(
          ce=f"{record['ce']:.3f}",
          lb=f"{record['load_balancing_loss'] / cfg.num_layers:.3f}",
          tok_s=f"{tps:,.0f}")
      if not progress and not is_eval:
        print(f"step {done:6d} | train ce {record['ce']:.4f} | lb "
              f"{record['load_balancing_loss'] / cfg.num_layers:.3f} | tokens/s "
              f"{tps:,.0f}", flush=True)
      if is_eval:
        ev = {"step": done, **evaluate(eval_step, state, valid_data, cfg)}
        evals.append(ev)
        util = np.array(record["utilisation"]).mean(0)
        pbar.write(
            f"step {done:6d} | train ce {record['ce']:.4f} | held-out ce "
            f"{ev['eval_ce']:.4f} ({ev['eval_bits_per_byte']:.3f} bits/byte) | "
            f"lb {record['load_balancing_loss'] / cfg.num_layers:.3f} "
            f"z {record['router_z_loss'] / cfg.num_layers:.3f} "
            f"dropped {record['dropped_fraction']:.2%} | expert share "
            + " ".join(f"{u:.2f}" for u in util) + f" | tokens/s {tps:,.0f}")
      if is_ckpt and save:
        save_checkpoint(ckpt, state, cfg)
      t_mark = time.perf_counter()
  pbar.close()

  if save:
    save_checkpoint(ckpt, state, cfg)
  history_path.write_text(json.dumps({"train": history, "eval": evals}))
  plots = write_plots(out_dir, history, evals, cfg) if history else []
  tokens_per_s = timed_tokens / timed_seconds if timed_seconds > 0 else None
  last = history[-1] if history else {}
  summary = {
      "config": dataclasses.asdict(cfg),
      "backend": backend,
      "device": str(jax.devices()[0]),
      "device_kind": jax.devices()[0].device_kind,
      "versions": {"jax": jax.__version__, "jmoe": jmoe.__version__,
                   "python": sys.version.split()[0]},
      "corpus": corpus,
      "parameters": n_params,
      "start_step": start_step,
      "steps": state.step,
      "tokens_per_step": tokens_per_step,
      "tokens_per_s": tokens_per_s,
      "compile_and_first_step_s": compile_seconds,
      "final_train_ce": last.get("ce"),
      "final_eval_ce": evals[-1]["eval_ce"] if evals else None,
      "final_eval_bits_per_byte": evals[-1]["eval_bits_per_byte"] if evals else None,
      # Mean over layers (the history keeps the sums the loss used).
      "final_load_balancing_loss": (
          last["load_balancing_loss"] / cfg.num_layers if last else None),
      "final_router_z_loss": last["router_z_loss"] / cfg.num_layers if last else None,
      "final_utilisation": last.get("utilisation"),
      "checkpoint": str(ckpt) if save else None,
      "plots": plots,
  }
  (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
  tps_text = f"{tokens_per_s:,.0f}" if tokens_per_s else "n/a"
  print(f"done: step {state.step} | tokens/s {tps_text} (after the first step; "
        f"first step incl. compile {compile_seconds or 0:.1f} s) | final train ce "
        f"{summary['final_train_ce']} | final held-out ce {summary['final_eval_ce']}")
  written = [str(out_dir / "summary.json")] + ([str(ckpt)] if save else []) + plots
  print("wrote " + ", ".join(written))
  return summary


def parse_args(argv=None) -> tuple[Config, argparse.Namespace]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                      help="a named size; other flags override its fields")
  parser.add_argument("--tiny", action="store_true", help="same as --preset tiny")
  parser.add_argument("--out-dir", default="runs/train_lm", help="checkpoint, plots")
  parser.add_argument("--resume", action="store_true",
                      help="restore <out-dir>/checkpoint.msgpack and continue")
  parser.add_argument("--stop-after", type=int, default=None,
                      help="stop at this step (schedule still spans --steps)")
  parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
  parser.add_argument("--no-checkpoint", action="store_true",
                      help="write no checkpoint (timing runs)")
  for field in dataclasses.fields(Config):
    flag = "--" + field.name.replace("_", "-")
    if field.name == "capacity_factor":
      parser.add_argument(
          flag, type=lambda s: None if s.lower() == "none" else float(s),
          default=None, help="float, or 'none' for dropless")
    else:
      kind = {int: int, float: float, str: str}[type(field.default)]
      parser.add_argument(flag, type=kind, default=None)
  args = parser.parse_args(argv)
  if args.tiny and args.preset not in (None, "tiny"):
    parser.error("--tiny conflicts with --preset " + args.preset)
  preset = "tiny" if args.tiny else args.preset
  values = dict(PRESETS.get(preset, {}))
  given = vars(args)
  for field in dataclasses.fields(Config):
    if given[field.name] is not None:
      values[field.name] = given[field.name]
  raw = argv if argv is not None else sys.argv[1:]
  if any(a.split("=")[0] == "--capacity-factor" for a in raw):
    values["capacity_factor"] = given["capacity_factor"]
  return Config(**values), args


def main(argv=None) -> dict:
  cfg, args = parse_args(argv)
  return train(cfg, pathlib.Path(args.out_dir), resume=args.resume,
               stop_after=args.stop_after, progress=not args.no_progress,
               save=not args.no_checkpoint)


if __name__ == "__main__":
  main()
