#!/usr/bin/env bash
# On a P-GPU device machine. Part A: compile report on the real arch, multi-GPU tests and
# the overlap benchmark on P ranks. Part B: bench/scaling.py on each of the rank counts given.
# AB: both (fits one call on 2 GPUs).
# Usage (device tool, carry .whl): bash bench/device_evidence.sh A|B|AB COMMIT P [P2 ...]
set -u
PART=${1:-A}; COMMIT=${2:-unknown}; P=${3:-4}; shift 3; SCALE_PS=${*:-$P}
source bench/device_setup.sh
O=${OUT:-/tmp/out}; mkdir -p "$O"
source bench/device_lib.sh
MPI="mpirun --allow-run-as-root -x NCCL_NVLS_ENABLE=0 -x PYTHONUNBUFFERED=1 -x FLASHMOE_CACHE"
nvidia-smi --query-gpu=index,name --format=csv,noheader
if [[ "$PART" == *A* ]]; then
  for prob in "--hidden 512 --intermediate 2048 --experts 8 --top-k 2 --shared-experts 1 --tokens 256" \
              "--hidden 2048 --intermediate 1408 --experts 64 --top-k 6 --shared-experts 2 --tokens 512" \
              "--hidden 2880 --intermediate 2880 --experts 60 --top-k 4 --tokens 333" \
              "--hidden 4096 --intermediate 14336 --experts 8 --top-k 2 --tokens 4096" \
              "--hidden 7168 --intermediate 2048 --experts 256 --top-k 8 --shared-experts 1 --tokens 128"; do
    flashmoe-tune compile $prob --json >> "$O/compile_report.jsonl" 2>&1 || echo "compile failed: $prob"
  done
  run_multigpu "$P"
  run_overlap "$P" "$COMMIT"
fi
if [[ "$PART" == *B* ]]; then
  for S in $SCALE_PS; do
    timeout 240 $MPI -np "$S" python3 bench/scaling.py --json "$O/scaling.json" \
      > "$O/scaling_$S.log" 2>&1
    echo "scaling P=$S rc=$?"; tail -3 "$O/scaling_$S.log"
  done
fi
