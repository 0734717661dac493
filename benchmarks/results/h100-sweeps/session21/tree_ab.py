"""Session 21 probe: jmoe.moe at one case, as the benchmark times it, for
whichever `jmoe` is first on PYTHONPATH (run it alternately for two trees).

  PYTHONPATH=old:$PWD python benchmarks/results/h100-sweeps/session21/tree_ab.py deepseek
"""

import sys

import jmoe
from benchmarks.explicit_split import programs
from benchmarks.timing import time_fn

case = sys.argv[1]
fwd, fwdbwd, x, params, dy = programs(case, "triton")
out = []
for mode, fn, args in (("fwd", fwd, (x, params)), ("fwd+bwd", fwdbwd, (x, params, dy))):
  t = time_fn(fn, *args, repeats=5, min_sample_s=0.2)
  out.append(f"{mode} {t.median_s * 1e3:.3f} ms ({t.min_s * 1e3:.3f}-{t.max_s * 1e3:.3f})")
print(f"{jmoe.__file__.rsplit('/jmoe/', 1)[0] or '.'}: {case}: " + "; ".join(out), flush=True)
