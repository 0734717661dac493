#!/usr/bin/env bash
# Installs carried wheels into TARGET on a machine without network (the lent H100:
# it has no jax-triton and no tokamax), for PYTHONPATH=TARGET:
#
#   bash benchmarks/offline/install.sh /tmp/site .whl [.whl-tokamax]
#
# Each WHEEL_DIR's wheels go in with --no-deps (the lists are complete: .whl holds
# jax-triton 0.3.1, .whl-tokamax the set in tokamax-wheels.txt). Where tokamax is
# installed and xprof is not importable, a stand-in `xprof.cli.tools.
# get_kernel_stats_tool` is written: tokamax imports it at import time, only for
# its own xprof timing method, which jmoe's benchmark does not use; the stand-in
# raises if called.
set -euo pipefail
target=${1:?usage: install.sh TARGET WHEEL_DIR...}
shift
for dir in "$@"; do
  python3 -m pip install -q --no-index --no-deps --target "$target" "$dir"/*.whl
done
if [ -d "$target/tokamax" ] && ! PYTHONPATH="$target" python3 -c 'import xprof' 2>/dev/null; then
  tools="$target/xprof/cli/tools"
  mkdir -p "$tools"
  touch "$target/xprof/__init__.py" "$target/xprof/cli/__init__.py" "$tools/__init__.py"
  cat > "$tools/get_kernel_stats_tool.py" <<'PY'
"""Stand-in written by jmoe's benchmarks/offline/install.sh (xprof not installed)."""


def compute_kernel_stats(*args, **kwargs):
  raise RuntimeError("xprof is a stand-in here (jmoe benchmarks/offline/install.sh); "
                     "install xprof to use tokamax's xprof timing method")
PY
  echo "install.sh: wrote the xprof stand-in under $target/xprof"
fi
