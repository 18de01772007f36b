#!/usr/bin/env bash
# On a 2-GPU device machine: one-GPU tests on GPU 0, the 2-rank multi-GPU suite, then the
# overlap benchmark. Usage (device tool, carry .whl): bash bench/device_check.sh COMMIT [P]
set -u
COMMIT=${1:-unknown}; P=${2:-2}
source bench/device_setup.sh
O=${OUT:-/tmp/out}; mkdir -p "$O"
MPI="mpirun --allow-run-as-root -x NCCL_NVLS_ENABLE=0 -x PYTHONUNBUFFERED=1 -x FLASHMOE_CACHE"
nvidia-smi --query-gpu=index,name --format=csv,noheader
CUDA_VISIBLE_DEVICES=0 timeout 300 python3 -m pytest -m gpu tests -q --no-header \
  -p no:cacheprovider -rs > "$O/gpu_1.log" 2>&1
echo "gpu tests rc=$?"; grep -E "passed|failed|FAILED|Error" "$O/gpu_1.log" | tail -8
source bench/device_lib.sh
run_multigpu "$P"
run_overlap "$P" "$COMMIT"
CUDA_VISIBLE_DEVICES=0 timeout 200 python3 bench/gemm_bench.py --commit "$COMMIT" \
  --out "$O/gemm.md" --json "$O/gemm.json" > "$O/gemm.log" 2>&1
echo "gemm bench rc=$?"; cat "$O/gemm.md" 2>/dev/null || tail -20 "$O/gemm.log"
