#!/usr/bin/env bash
# On a P-GPU device machine: bench/overlap.py of an older commit (.old/, made by
# bench/prepare_old.sh) and of this checkout, interleaved old, new, old, new in one call,
# plus bench/host_time.py on one GPU for both; tables under $OUT, printed last.
# Usage (device tool, carry .whl and .old): bash bench/device_compare.sh [P] [PROBLEMS]
set -u
P=${1:-2}; PROBLEMS=${2:-seed,dsv2lite_t512,dsv2lite_t4096,mixtral_t4096}
O=${OUT:-/tmp/out}; mkdir -p "$O"
R=$PWD; OLD=$(cat .old/COMMIT); NEW=$(git rev-parse --short HEAD 2>/dev/null || echo new)
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl || exit 1
python3 -m pip install -q --no-deps --no-compile --target /tmp/oldsite .old/whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
MPI="mpirun --allow-run-as-root -x NCCL_NVLS_ENABLE=0 -x PYTHONUNBUFFERED=1 -x FLASHMOE_CACHE -x PYTHONPATH"
nvidia-smi --query-gpu=index,name --format=csv,noheader
cd /tmp  # the checkout's own flashmoe_gen must not shadow the old wheel
for i in $(seq 1 "${ROUNDS:-2}"); do  # ROUNDS=1 when device time is short
  for side in old new; do
    if [ $side = old ]; then export PYTHONPATH=/tmp/oldsite FLASHMOE_CACHE=/tmp/cache_old
      script=$R/.old/src/bench; commit=$OLD
    else export PYTHONPATH= FLASHMOE_CACHE=/tmp/cache_new; script=$R/bench; commit=$NEW; fi
    CUDA_VISIBLE_DEVICES=0 timeout 120 python3 "$R/bench/host_time.py" --label "$side" \
      >> "$O/host_time.jsonl" 2>&1
    timeout 240 $MPI -np "$P" python3 "$script/overlap.py" --problems "$PROBLEMS" \
      --commit "$commit" --out "$O/overlap_${side}_$i.md" > "$O/overlap_${side}_$i.log" 2>&1
    echo "overlap $side run $i rc=$?"
  done
done
cat "$O/host_time.jsonl"
for f in "$O"/overlap_*_*.md; do echo "== $(basename "$f")"; grep "^| moe" "$f" | cut -d'|' -f2,3; done
