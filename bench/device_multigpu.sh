#!/usr/bin/env bash
# On a device machine with P GPUs: multi-GPU tests, the CLI launcher, the overlap benchmark.
# Usage (device tool, carry .whl): bash bench/device_multigpu.sh P [bench problems]
set -u
P=${1:-2}
PROBLEMS=${2:-seed,dsv2lite_t512,dsv2lite_t4096,mixtral_t4096}
source bench/device_setup.sh
OUTDIR=${OUT:-/tmp/out}; mkdir -p "$OUTDIR"
MPI="mpirun --allow-run-as-root -np $P -x NCCL_NVLS_ENABLE=0 -x PYTHONUNBUFFERED=1 -x FLASHMOE_CACHE"
nvidia-smi --query-gpu=index,name --format=csv,noheader | tee "$OUTDIR/gpus.txt"
timeout 420 $MPI python3 -m pytest -m multigpu tests/test_multigpu.py -q --no-header \
  -p no:cacheprovider > "$OUTDIR/multigpu_tests.log" 2>&1
echo "multigpu tests rc=$?"; grep -E "passed|failed|error" "$OUTDIR/multigpu_tests.log" | tail -4
timeout 120 flashmoe-tune run --gpus "$P" --hidden 2048 --intermediate 1408 --experts 64 \
  --top-k 6 --shared-experts 2 --tokens 512 > "$OUTDIR/cli_run.log" 2>&1
echo "cli run rc=$?"; tail -4 "$OUTDIR/cli_run.log"
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout 400 $MPI python3 bench/overlap.py --problems "$PROBLEMS" --out "$OUTDIR/overlap.md" \
    --json "$OUTDIR/overlap.json" > "$OUTDIR/overlap.log" 2>&1
  echo "overlap rc=$?"; cat "$OUTDIR/overlap.md" 2>/dev/null || tail -30 "$OUTDIR/overlap.log"
fi
