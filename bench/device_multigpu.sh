#!/usr/bin/env bash
# On a device machine with P GPUs: multi-GPU tests, the CLI launcher, the overlap benchmark.
# Usage (device tool, carry .whl): bash bench/device_multigpu.sh P [bench problems]
set -u
P=${1:-2}
PROBLEMS=${2:-seed,dsv2lite_t512,dsv2lite_t4096,mixtral_t4096}
source bench/device_setup.sh
O=${OUT:-/tmp/out}; mkdir -p "$O"
MPI="mpirun --allow-run-as-root -x NCCL_NVLS_ENABLE=0 -x PYTHONUNBUFFERED=1 -x FLASHMOE_CACHE"
source bench/device_lib.sh
nvidia-smi --query-gpu=index,name --format=csv,noheader | tee "$O/gpus.txt"
run_multigpu "$P"
timeout 120 flashmoe-tune run --gpus "$P" --hidden 2048 --intermediate 1408 --experts 64 \
  --top-k 6 --shared-experts 2 --tokens 512 > "$O/cli_run.log" 2>&1
echo "cli run rc=$?"; tail -4 "$O/cli_run.log"
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  run_overlap "$P" "" --problems "$PROBLEMS"
fi
