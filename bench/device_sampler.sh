#!/usr/bin/env bash
# Issue 13's sampler target on a 2-GPU machine: a grid sweep of the steep space (96 configs of
# the DeepSeek-V2-Lite shape); its study store comes back ($OUT/grid_steep.db) and the sampler
# replay runs on the CPU, off the device's time:
#   python bench/sampler_replay.py sqlite:///grid_steep.db grid-steep \
#       --problem 2048,1408,64,6,2,2,512 --out bench/results/<date>_sampler_replay_steep.md
# Usage (device tool, carry .whl): [GRID_TIMEOUT=s] bash bench/device_sampler.sh COMMIT
set -u
COMMIT=${1:-unknown}
source bench/device_setup.sh
O=${OUT:-/tmp/out}; mkdir -p "$O"
export FLASHMOE_DB="sqlite:///$O/winners.db"
DSV2="--hidden 2048 --intermediate 1408 --experts 64 --top-k 6 --shared-experts 2 --tokens 512"
nvidia-smi --query-gpu=index,name --format=csv,noheader | tee "$O/gpus.txt"
timeout "${GRID_TIMEOUT:-480}" flashmoe-tune tune --gpus 2 $DSV2 --sampler grid --space steep --trials 1000 \
  --storage "sqlite:///$O/grid_steep.db" --study-name grid-steep --warmup 2 --iters 10 \
  > "$O/grid_steep.log" 2>&1
echo "grid rc=$?"; grep -E "ok, .* failed|heuristic default" "$O/grid_steep.log"
echo "commit $COMMIT"
