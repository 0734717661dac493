"""Why does `examples/train_lm.py` slow down as it trains? Times its train step.

Runs the `--preset gpu` model (or `--preset tiny` on a CPU) and times single
train steps (each ended by `block_until_ready`) from three states:

  A  the initial parameters, at the start of the process;
  B  the parameters after `--steps` training steps;
  C  the initial parameters again, after those steps (same process).

and the ms per step of the training itself in windows of `--window` steps.
C ~ A < B means the step gets slower with what the model learnt (e.g. the
routing it produces); C ~ B > A means it gets slower with process time
(something accumulates). Prints one line per measurement.

Usage::

  python -m benchmarks.train_step_probe --preset gpu --backend triton --steps 200 \
      [--trace /tmp/probe_trace]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))
import train_lm  # pylint: disable=wrong-import-position

from benchmarks import trace_summary  # pylint: disable=wrong-import-position


def _copy(tree):
  return jax.tree.map(lambda x: x.copy() if hasattr(x, "copy") else x, tree)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="gpu", choices=sorted(train_lm.PRESETS))
  parser.add_argument("--backend", default="auto")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--window", type=int, default=25)
  parser.add_argument("--probe", type=int, default=8, help="timed steps per probe")
  parser.add_argument("--max-bytes", type=int, default=0)
  parser.add_argument("--trace", default="",
                      help="directory: also trace 3 steps of A and B with "
                      "jax.profiler and print where the time went "
                      "(benchmarks/trace_summary.py)")
  args = parser.parse_args(argv)

  cfg = train_lm.Config(**{**train_lm.PRESETS[args.preset], "backend": args.backend,
                           "steps": args.steps, "max_bytes": args.max_bytes})
  data, _, _ = train_lm.load_corpus(cfg.max_bytes)
  _, state, _, _ = train_lm.init_state(cfg)
  train_step, _ = train_lm.build_steps(cfg)
  init = _copy((state.params, state.opt_state, state.other))
  result = {}

  def probe(name, trees, first_step):
    params, opt, other = _copy(trees)
    times, dispatch, dropped = [], [], []
    for i in range(args.probe + 1):
      inputs, targets = train_lm.get_batch(data, cfg.batch_size, cfg.seq_len, cfg.seed,
                                           first_step + i)
      t0 = time.perf_counter()
      params, opt, other, m = train_step(params, opt, other, inputs, targets)
      t1 = time.perf_counter()
      jax.block_until_ready(m["loss"])
      if i:  # the first call may compile
        times.append(time.perf_counter() - t0)
        dispatch.append(t1 - t0)
        dropped.append(float(np.mean(m["dropped_fraction"])))
    ms = statistics.median(times) * 1e3
    result[name] = ms
    print(f"probe {name}: {ms:.1f} ms per step (median of {args.probe}; the call "
          f"returns after {statistics.median(dispatch) * 1e3:.1f} ms), dropped "
          f"{np.mean(dropped):.1%}", flush=True)
    if args.trace:
      log_dir = pathlib.Path(args.trace) / name.split()[0]
      with jax.profiler.trace(str(log_dir)):
        for i in range(3):
          inputs, targets = train_lm.get_batch(data, cfg.batch_size, cfg.seq_len,
                                               cfg.seed, first_step + args.probe + i)
          params, opt, other, m = train_step(params, opt, other, inputs, targets)
          jax.block_until_ready(m["loss"])
      planes = trace_summary.summarize(str(log_dir))
      if any("/device:GPU" in name for name in planes):  # else that was the host
        trace_summary.summarize(str(log_dir), top=15, pattern="/host:CPU")

  probe("A init params, start", init, 0)
  params, opt, other = state.params, state.opt_state, state.other
  t_mark = time.perf_counter()
  for step in range(args.steps):
    inputs, targets = train_lm.get_batch(data, cfg.batch_size, cfg.seq_len, cfg.seed,
                                         step)
    params, opt, other, m = train_step(params, opt, other, inputs, targets)
    if (step + 1) % args.window == 0:
      jax.block_until_ready(m["loss"])
      now = time.perf_counter()
      print(f"train steps {step + 2 - args.window}-{step + 1}: "
            f"{(now - t_mark) / args.window * 1e3:.1f} ms per step, dropped "
            f"{float(np.mean(m['dropped_fraction'])):.1%}, ce {float(m['ce']):.3f}",
            flush=True)
      t_mark = now
  probe(f"B params after {args.steps} steps", (params, opt, other), args.steps)
  probe("C init params, after training", init, 0)
  # The trained parameters, model pieces: forward only (eval step).
  _, eval_step = train_lm.build_steps(cfg)
  for name, p in (("init", init), ("trained", (params, opt, other))):
    inputs, targets = train_lm.get_batch(data, cfg.batch_size, cfg.seq_len, cfg.seed, 0)
    jax.block_until_ready(eval_step(p[0], p[2], inputs, targets))
    t0 = time.perf_counter()
    for _ in range(args.probe):
      out = eval_step(p[0], p[2], inputs, targets)
    jax.block_until_ready(out)
    print(f"eval step (forward only), {name} params: "
          f"{(time.perf_counter() - t0) / args.probe * 1e3:.1f} ms", flush=True)
  return result


if __name__ == "__main__":
  main()
