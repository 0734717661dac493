"""examples/train_lm.py end to end (tiny preset, a few steps) and its checkpoints."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def train_lm():
  path = ROOT / "examples" / "train_lm.py"
  spec = importlib.util.spec_from_file_location("train_lm", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules["train_lm"] = module  # dataclasses look their module up
  try:
    spec.loader.exec_module(module)
    yield module
  finally:
    sys.modules.pop("train_lm", None)


# Few steps on a capped corpus; every run below shares this config, so the train
# and eval steps compile once.
FLAGS = ["--tiny", "--steps", "6", "--log-every", "2", "--eval-every", "3",
         "--eval-batches", "2", "--max-bytes", "300000", "--no-progress"]


def _leaves(train_lm, out_dir: pathlib.Path):
  cfg, _ = train_lm.parse_args(FLAGS)
  _, template, _, _ = train_lm.init_state(cfg)
  ckpt = out_dir / "checkpoint.msgpack"
  state, saved_cfg = train_lm.restore_checkpoint(ckpt, template)
  return state, saved_cfg, jax.tree.leaves((state.params, state.opt_state))


def test_tiny_run_resume_and_restore(train_lm, tmp_path):
  full, part = tmp_path / "full", tmp_path / "part"
  summary = train_lm.main(FLAGS + ["--out-dir", str(full)])
  # Files: checkpoint, plots (PNG), summary, history.
  for name in ("checkpoint.msgpack", "loss.png", "expert_utilisation.png",
               "summary.json", "history.json"):
    assert (full / name).is_file(), name
  for png in summary["plots"]:
    assert pathlib.Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  on_disk = json.loads((full / "summary.json").read_text())
  assert on_disk["steps"] == 6 and on_disk["backend"] == "reference"
  assert np.isfinite(on_disk["final_train_ce"])
  assert np.isfinite(on_disk["final_eval_ce"])
  assert on_disk["final_eval_ce"] < np.log(256)  # better than uniform bytes
  assert on_disk["tokens_per_s"] > 0
  util = np.array(on_disk["final_utilisation"])  # [layers, experts]
  assert util.shape == (2, 4) and np.all(util >= 0) and np.all(util.sum(1) <= 1 + 1e-6)
  history = json.loads((full / "history.json").read_text())
  assert [h["step"] for h in history["train"]] == [2, 3, 4, 6]  # log + eval steps
  assert [e["step"] for e in history["eval"]] == [3, 6]

  # Preempted at step 3, then resumed: the same final state as the full run.
  train_lm.main(FLAGS + ["--out-dir", str(part), "--stop-after", "3"])
  state3, _, _ = _leaves(train_lm, part)
  assert state3.step == 3
  resumed = train_lm.main(FLAGS + ["--out-dir", str(part), "--resume"])
  assert resumed["start_step"] == 3 and resumed["steps"] == 6
  state_a, saved_cfg, leaves_a = _leaves(train_lm, full)
  state_b, _, leaves_b = _leaves(train_lm, part)
  assert state_a.step == state_b.step == 6
  assert saved_cfg["d_model"] == 64 and saved_cfg["steps"] == 6
  assert len(leaves_a) == len(leaves_b) > 0
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  # A restored state differs from a fresh one (it was really trained).
  cfg, _ = train_lm.parse_args(FLAGS)
  _, fresh, _, _ = train_lm.init_state(cfg)
  fresh_leaves = jax.tree.leaves(fresh.params)
  assert any(not np.array_equal(np.asarray(f), np.asarray(r))
             for f, r in zip(fresh_leaves, jax.tree.leaves(state_a.params)))


def test_restore_refuses_other_model(train_lm, tmp_path):
  cfg, _ = train_lm.parse_args(FLAGS)
  _, state, _, _ = train_lm.init_state(cfg)
  train_lm.save_checkpoint(tmp_path / "c.msgpack", state, cfg)
  other, _ = train_lm.parse_args(FLAGS + ["--d-model", "32"])
  _, template, _, _ = train_lm.init_state(other)
  with pytest.raises(ValueError, match="shape"):
    train_lm.restore_checkpoint(tmp_path / "c.msgpack", template)


def test_corpus_split_is_deterministic(train_lm):
  files = train_lm.corpus_files()
  assert len(files) > 100 and files == sorted(files, key=lambda f: f.as_posix())
  train1, valid1, info1 = train_lm.load_corpus(max_bytes=100_000)
  train2, valid2, info2 = train_lm.load_corpus(max_bytes=100_000)
  assert info1 == info2 and train1.size == valid1.size == 100_000
  np.testing.assert_array_equal(train1, train2)
  assert not np.array_equal(train1[:1000], valid1[:1000])
  x, y = train_lm.get_batch(train1, 4, 16, seed=0, step=5)
  x2, _ = train_lm.get_batch(train1, 4, 16, seed=0, step=5)
  assert x.shape == y.shape == (4, 16) and np.array_equal(x, x2)
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # targets are shifted inputs


def test_cli_flags(train_lm):
  cfg, args = train_lm.parse_args(["--preset", "gpu", "--steps", "10",
                                   "--capacity-factor", "none", "--backend", "triton"])
  assert cfg.d_model == 512 and cfg.steps == 10 and cfg.capacity_factor is None
  assert cfg.backend == "triton" and cfg.dtype == "bfloat16"
  cfg, _ = train_lm.parse_args(["--tiny"])
  assert cfg.backend == "reference" and cfg.capacity_factor == 1.25


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_embed_bytes_matches_nnx_embed(train_lm, dtype):
  """The one-hot embedding gives `nnx.Embed`'s rows exactly, and the same table
  gradient as its gather (up to the scatter's bf16 rounding of each add)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  embed = nnx.Embed(train_lm.VOCAB, 24, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (3, 37), 0, train_lm.VOCAB)
  np.testing.assert_array_equal(
      np.asarray(train_lm.embed_bytes(embed, tokens, jnp.dtype(dtype)), np.float32),
      np.asarray(embed(tokens), np.float32))
  dh = jax.random.normal(jax.random.key(2), (3, 37, 24), jnp.float32)

  def grad_of(fn):
    table = embed.embedding[...]

    def loss(t):
      e = nnx.Embed(train_lm.VOCAB, 24, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0))
      e.embedding[...] = t
      return jnp.sum(fn(e).astype(jnp.float32) * dh)
    return np.asarray(jax.grad(loss)(table))

  got = grad_of(lambda e: train_lm.embed_bytes(e, tokens, jnp.dtype(dtype)))
  want = grad_of(lambda e: e(tokens))
  tol = 1e-5 if dtype == "float32" else 3e-2
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())
  assert np.abs(got).max() > 0
