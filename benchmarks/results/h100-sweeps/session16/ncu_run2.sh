#!/usr/bin/env bash
# Session 16, second call: warp stall reasons (Nsight Compute, clocks left alone)
# of the deepseek-like GEMM kernels, and of the Mixtral-like weight gradients
# with the Triton TMA tgmm and each Gluon tgmm alone (one ncu process each: the
# first call's ncu run crashed the process at the first Gluon launch).
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
stalls=""
for r in barrier long_scoreboard wait math_pipe_throttle membar sleeping dispatch_stall \
         mio_throttle lg_throttle short_scoreboard branch_resolving no_instruction \
         selected not_selected drain misc imc_miss tex_throttle; do
  stalls+="smsp__average_warps_issue_stalled_${r}_per_issue_active.ratio,"
done
metrics="${stalls}sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,\
sm__cycles_elapsed.avg.per_second,gpu__time_duration.sum,dram__bytes_read.sum,\
dram__bytes_write.sum,lts__t_sector_hit_rate.pct,smsp__issue_active.avg.pct_of_peak_sustained_active,\
smsp__inst_executed.sum"
export JMOE_AUTOTUNE=0 XLA_PYTHON_CLIENT_PREALLOCATE=false
timeout 200 ncu --clock-control none --metrics "$metrics" --kernel-name regex:"_grouped_gemm|_tgmm" \
  python3 -m benchmarks.one_call --cases e64 > "$out/ncu2_e64.txt" 2>&1
echo "e64 rc=$?" > "$out/rc.txt"
for v in "tma 128x256 bounded store" "gluon 128x256 s3" "gluon ws 128x256 s3"; do
  f="$out/ncu2_big_${v// /_}.txt"
  timeout 150 ncu --clock-control none --metrics "$metrics" --kernel-name regex:tgmm \
    python3 -m benchmarks.tgmm_tma_probe --cases big --rounds 0 --variants "$v" > "$f" 2>&1
  echo "$v rc=$?" >> "$out/rc.txt"
done
