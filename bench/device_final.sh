#!/usr/bin/env bash
# On a 4-GPU device machine, one call: the one-GPU suite (`pytest -m gpu`, GPUs 0-1, which
# includes the 2-GPU export harness and torchrun tests) and the 4-rank multi-GPU suite (both
# modes, routing rules) side by side; logs and a summary under $OUT.
# Usage (device tool, carry .whl): bash bench/device_final.sh
set -u
source bench/device_setup.sh
O=${OUT:-/tmp/out}; mkdir -p "$O"
MPI="mpirun --allow-run-as-root -x NCCL_NVLS_ENABLE=0 -x PYTHONUNBUFFERED=1 -x FLASHMOE_CACHE"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$O/cards.txt"
T=${SUITE_TIMEOUT:-550}
(CUDA_VISIBLE_DEVICES=0,1 timeout -k 10 "$T" python3 -m pytest -m gpu tests -q --no-header \
   -p no:cacheprovider -rs > "$O/gpu.log" 2>&1; echo "gpu suite rc=$?" > "$O/gpu.rc") &
timeout -k 10 "$T" $MPI -np 4 python3 -m pytest -m multigpu tests/test_multigpu.py \
  tests/test_multigpu_routing.py -q --no-header -p no:cacheprovider > "$O/multigpu_4.log" 2>&1
echo "multigpu 4 ranks rc=$?"
wait
cat "$O/gpu.rc"
grep -E "passed|failed|FAILED|Error" "$O/gpu.log" | tail -15
grep -E "passed|failed|FAILED" "$O/multigpu_4.log" | tail -12
