#!/usr/bin/env bash
# On a 2-GPU device machine: GPU tests, then flashmoe-tune on the seed example and a
# DeepSeek-V2-Lite shape (>= 30 trials each), lookup in a new process, and one grid sweep of
# the small space (stored for the sampler comparison in bench/sampler_replay.py).
# Usage (device tool, carry .whl): bash bench/device_tune.sh [trials] [grid:1/0]
set -u
TRIALS=${1:-32}; GRID=${2:-1}
source bench/device_setup.sh
O=${OUT:-/tmp/out}; mkdir -p "$O"
export FLASHMOE_DB="sqlite:///$O/winners.db" FLASHMOE_STUDIES="sqlite:///$O/studies.db"
SEED="--hidden 512 --intermediate 2048 --experts 8 --top-k 2 --shared-experts 1 --tokens 256"
DSV2="--hidden 2048 --intermediate 1408 --experts 64 --top-k 6 --shared-experts 2 --tokens 512"
nvidia-smi --query-gpu=index,name --format=csv,noheader | tee "$O/gpus.txt"
timeout 300 python3 -m pytest -m gpu -q --no-header -p no:cacheprovider > "$O/gpu_tests.log" 2>&1
echo "gpu tests rc=$?"; tail -2 "$O/gpu_tests.log"
for name in SEED DSV2; do
  timeout 420 flashmoe-tune tune --gpus 2 ${!name} --trials "$TRIALS" > "$O/tune_$name.log" 2>&1
  echo "tune $name rc=$?"; grep -E "heuristic default|ok, .* failed|winner stored" "$O/tune_$name.log"
done
# A new process finds the same best through lookup.
flashmoe-tune show --world-size 2 $SEED --limit 3 > "$O/show_seed.log" 2>&1; head -2 "$O/show_seed.log"
flashmoe-tune show --world-size 2 $DSV2 --limit 3 > "$O/show_dsv2.log" 2>&1; head -2 "$O/show_dsv2.log"
flashmoe-tune list > "$O/list.log" 2>&1
if [ "$GRID" = 1 ]; then
  timeout 600 flashmoe-tune tune --gpus 2 $SEED --sampler grid --space small --trials 1000 \
    --study-name grid-seed --warmup 2 --iters 10 > "$O/grid_seed.log" 2>&1
  echo "grid rc=$?"; grep -E "ok, .* failed|heuristic default" "$O/grid_seed.log"
fi
