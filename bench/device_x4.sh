#!/usr/bin/env bash
# On a 4-GPU device machine. Part A: compile report on the real arch, multi-GPU tests and
# the overlap benchmark on 4 ranks. Part B: bench/scaling.py on 4 and 2 ranks.
# Usage (device tool, carry .whl): bash bench/device_x4.sh A|B COMMIT
set -u
PART=${1:-A}; COMMIT=${2:-unknown}
source bench/device_setup.sh
O=${OUT:-/tmp/out}; mkdir -p "$O"
MPI="mpirun --allow-run-as-root -x NCCL_NVLS_ENABLE=0 -x PYTHONUNBUFFERED=1 -x FLASHMOE_CACHE"
nvidia-smi --query-gpu=index,name --format=csv,noheader
if [ "$PART" = A ]; then
  for prob in "--hidden 512 --intermediate 2048 --experts 8 --top-k 2 --shared-experts 1 --tokens 256" \
              "--hidden 2048 --intermediate 1408 --experts 64 --top-k 6 --shared-experts 2 --tokens 512" \
              "--hidden 2880 --intermediate 2880 --experts 60 --top-k 4 --tokens 333" \
              "--hidden 4096 --intermediate 14336 --experts 8 --top-k 2 --tokens 4096" \
              "--hidden 7168 --intermediate 2048 --experts 256 --top-k 8 --shared-experts 1 --tokens 128"; do
    flashmoe-tune compile $prob --json >> "$O/compile_report.jsonl" 2>&1 || echo "compile failed: $prob"
  done
  timeout 300 $MPI -np 4 python3 -m pytest -m multigpu tests/test_multigpu.py -q --no-header \
    -p no:cacheprovider > "$O/multigpu_4.log" 2>&1
  echo "multigpu 4 ranks rc=$?"; grep -E "passed|failed" "$O/multigpu_4.log" | tail -4
  timeout 240 $MPI -np 4 python3 bench/overlap.py --commit "$COMMIT" --out "$O/overlap_4.md" \
    --json "$O/overlap_4.json" > "$O/overlap_4.log" 2>&1
  echo "overlap rc=$?"; cat "$O/overlap_4.md" 2>/dev/null || tail -20 "$O/overlap_4.log"
else
  for P in 4 2; do
    timeout 280 $MPI -np $P python3 bench/scaling.py --json "$O/scaling.json" \
      > "$O/scaling_$P.log" 2>&1
    echo "scaling P=$P rc=$?"; tail -3 "$O/scaling_$P.log"
  done
fi
