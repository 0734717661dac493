#!/usr/bin/env bash
# Session 16: hardware counters (Nsight Compute, clocks left alone) of
# (1) every kernel of one deepseek-like expert_ffn forward+backward and the same
#     six GEMMs as dense XLA dots, and
# (2) the Mixtral-like weight gradients with the Triton TMA tgmm and the Gluon ones.
# Run from the repository root on the GPU machine, after
#   bash benchmarks/offline/install.sh /tmp/site .whl; export PYTHONPATH=/tmp/site:$PWD
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv > "$out/smi.txt"
ncu --version >> "$out/smi.txt" 2>&1
metrics=sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,\
sm__cycles_elapsed.avg.per_second,dram__bytes_read.sum,dram__bytes_write.sum,\
lts__t_sector_hit_rate.pct,smsp__issue_active.avg.pct_of_peak_sustained_active
common=(--clock-control none --section SpeedOfLight --section WarpStateStats
        --section Occupancy --metrics "$metrics")
export JMOE_AUTOTUNE=0 XLA_FLAGS=--xla_gpu_autotune_level=0 XLA_PYTHON_CLIENT_PREALLOCATE=false
timeout 280 ncu "${common[@]}" python3 -m benchmarks.one_call --cases e64 --dense \
  > "$out/ncu_e64.txt" 2>&1
echo "e64 rc=$?" >> "$out/smi.txt"
timeout 250 ncu "${common[@]}" --kernel-name regex:tgmm \
  python3 -m benchmarks.tgmm_tma_probe --cases big --rounds 0 \
  --variants "tma 128x256 bounded store,gluon ws 128x256 s3,gluon 128x256 s3" \
  > "$out/ncu_tgmm_big.txt" 2>&1
echo "tgmm rc=$?" >> "$out/smi.txt"
