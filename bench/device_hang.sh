#!/usr/bin/env bash
# The DeepSeek-V3 T=128 tune on 4 ranks stopped for good at one candidate's check (session
# 10, trial 16 of seed 0, twice): run that config and two neighbours alone, each under a
# 45 s bound that dumps every rank's Python stack, then the same tune with sampler seed 1.
# Usage (device tool, nvidia-h100-x4, carry .whl): bash bench/device_hang.sh COMMIT
set -u
COMMIT=${1:-unknown}
source bench/device_setup.sh
O=${OUT:-/tmp/out}; mkdir -p "$O"
MPI="mpirun --allow-run-as-root -x NCCL_NVLS_ENABLE=0 -x PYTHONUNBUFFERED=1 -x FLASHMOE_CACHE"
source bench/device_lib.sh
nvidia-smi --query-gpu=index,name --format=csv,noheader | tee "$O/cards.txt"
HANG=gu_bm32_bn128_bk32_w8x1_s4_ws__dn_bm64_bn128_bk64_w8x1_s3_ws__r16__c1__cs1__ss1
DUMP="import faulthandler, sys; faulthandler.dump_traceback_later(45, exit=True); \
from flashmoe_gen.tuner.cli import main; sys.exit(main(sys.argv[1:]))"
for cfg in "${HANG}__fs" "${HANG}__fs__pk" "$HANG"; do
  S=$(date +%s)
  timeout -k 5 70 $MPI -np 4 python3 -c "$DUMP" run --gpus 4 --model deepseek-v3 --tokens 128 \
    --config "$cfg" --iters 5 > "$O/run_$cfg.log" 2>&1
  echo "run $cfg rc=$? $(( $(date +%s) - S )) s"
  grep -E "latency|check vs|Error|Timeout|File \"/" "$O/run_$cfg.log" | grep -v "site-packages/rich" |
    sort | uniq -c | sort -rn | head -12
done
export FLASHMOE_DB="sqlite:///$O/winners.db" FLASHMOE_STUDIES="sqlite:///$O/studies.db"
S=$(date +%s)
timeout -k 10 ${TUNE_TIMEOUT:-280} flashmoe-tune tune --gpus 4 --model deepseek-v3 --tokens 128 \
  --trials 32 --seed 1 > "$O/tune_deepseek-v3_seed1.log" 2>&1
echo "tune deepseek-v3 T=128 seed 1 rc=$? $(( $(date +%s) - S )) s"
sed 's/\x1b\[[0-9;]*m//g' "$O/tune_deepseek-v3_seed1.log" | cut -c1-170 |
  grep -E "heuristic default|trial 1/.* done|trial 32/.* done|ok, .* failed|winner stored" 
sed 's/\x1b\[[0-9;]*m//g' "$O/tune_deepseek-v3_seed1.log" | cut -c1-170 | tail -2
