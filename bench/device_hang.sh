#!/usr/bin/env bash
# The DeepSeek-V3 T=128 tune on 4 ranks stopped for good at one candidate's check (session
# 10, trial 16 of seed 0, twice): run that config and two neighbours alone, each under a
# 45 s bound that dumps every rank's Python stack, then the same tune with sampler seed 1.
# Part v (after the fix: own rows by device copy, bounded waits): the stuck config alone,
# the seed-0 tune past its trial 16, then the 4-rank weight-streaming tests (~300 s).
# Part x (next): what the hang depends on, each run bounded by the check's own wait (25 s):
# NCCL's warnings; NCCL groups split to 8 operations per peer and direction
# ($FLASHMOE_MAX_GROUP_OPS); 2 ranks; H=2048 instead of 7168 (~250 s).
# Usage (device tool, nvidia-h100-x4, carry .whl): bash bench/device_hang.sh COMMIT [v|x]
set -u
COMMIT=${1:-unknown}; PART=${2:-a}
source bench/device_setup.sh
source bench/device_lib.sh  # $O, $MPI, the shared steps
nvidia-smi --query-gpu=index,name --format=csv,noheader | tee "$O/cards.txt"
HANG=gu_bm32_bn128_bk32_w8x1_s4_ws__dn_bm64_bn128_bk64_w8x1_s3_ws__r16__c1__cs1__ss1
if [ "$PART" = x ]; then
  one() {  # LABEL GPUS ENV... -- more run arguments
    local label=$1 gpus=$2; shift 2
    local envs=(); while [ "$1" != -- ]; do envs+=(-x "$1"); shift; done; shift  # -x N=V
    S=$(date +%s)
    CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((gpus - 1))) timeout -k 5 70 $MPI "${envs[@]}" \
      -np "$gpus" flashmoe-tune run --gpus "$gpus" --model deepseek-v3 --tokens 128 \
      --config "${HANG}__fs" --iters 5 "$@" > "$O/x_$label.log" 2>&1
    echo "x $label rc=$? $(( $(date +%s) - S )) s"
    grep -E "latency|check vs|CommTimeout|NCCL WARN" "$O/x_$label.log" | sort | uniq -c |
      sort -rn | head -6
  }
  one nccl_warn 4 NCCL_DEBUG=WARN --
  one split8 4 FLASHMOE_MAX_GROUP_OPS=8 --
  one two_ranks 2 NCCL_DEBUG=WARN --
  one h2048 4 NCCL_DEBUG=WARN -- --hidden 2048
  exit 0
fi
DUMP="import faulthandler, sys; faulthandler.dump_traceback_later(45, exit=True); \
from flashmoe_gen.tuner.cli import main; sys.exit(main(sys.argv[1:]))"
CFGS=("${HANG}__fs" "${HANG}__fs__pk" "$HANG"); [ "$PART" = v ] && CFGS=("${HANG}__fs")
for cfg in "${CFGS[@]}"; do
  S=$(date +%s)
  timeout -k 5 70 $MPI -np 4 python3 -c "$DUMP" run --gpus 4 --model deepseek-v3 --tokens 128 \
    --config "$cfg" --iters 5 > "$O/run_$cfg.log" 2>&1
  echo "run $cfg rc=$? $(( $(date +%s) - S )) s"
  grep -E "latency|check vs|Error|Timeout|File \"/" "$O/run_$cfg.log" | grep -v "site-packages/rich" |
    sort | uniq -c | sort -rn | head -12
done
export FLASHMOE_DB="sqlite:///$O/winners.db" FLASHMOE_STUDIES="sqlite:///$O/studies.db"
SEED=1 TRIALS=32; [ "$PART" = v ] && SEED=0 TRIALS=20
S=$(date +%s)
timeout -k 10 ${TUNE_TIMEOUT:-280} flashmoe-tune tune --gpus 4 --model deepseek-v3 --tokens 128 \
  --trials $TRIALS --seed $SEED > "$O/tune_deepseek-v3_seed$SEED.log" 2>&1
echo "tune deepseek-v3 T=128 seed $SEED rc=$? $(( $(date +%s) - S )) s"
sed 's/\x1b\[[0-9;]*m//g' "$O/tune_deepseek-v3_seed$SEED.log" | cut -c1-170 |
  grep -E "heuristic default|trial (1|16|$TRIALS)/.* done|ok, .* failed|winner stored"
sed 's/\x1b\[[0-9;]*m//g' "$O/tune_deepseek-v3_seed$SEED.log" | cut -c1-170 | tail -2
if [ "$PART" = v ]; then
  timeout -k 10 ${MULTI_TIMEOUT:-120} $MPI -np 4 python3 -m pytest -m multigpu \
    tests/test_multigpu.py -q -k weight_streaming --no-header -p no:cacheprovider \
    > "$O/multigpu_ws.log" 2>&1
  echo "multigpu weight_streaming 4 ranks rc=$?"
  grep -E "passed|failed|FAILED" "$O/multigpu_ws.log" | tail -6
fi
