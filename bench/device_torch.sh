#!/usr/bin/env bash
# Issue 14's device evidence on a 4-GPU machine: the torchrun example on 2 GPUs, the HF
# block benchmark on 1, 2 and 4 GPUs, and the multi-GPU routing suite on 4 ranks. Logs and
# tables under $OUT, summary last.
# Usage (device tool, nvidia-h100-x4, carry .whl): bash bench/device_torch.sh COMMIT
set -u
COMMIT=${1:-unknown}
source bench/device_setup.sh
O=${OUT:-/tmp/out}; mkdir -p "$O"
MPI="mpirun --allow-run-as-root -x NCCL_NVLS_ENABLE=0 -x PYTHONUNBUFFERED=1 -x FLASHMOE_CACHE"
export NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$O/cards.txt"
timeout -k 10 150 torchrun --nproc-per-node 2 examples/hf_mixtral_block.py \
  > "$O/hf_example_2gpu.log" 2>&1
echo "example rc=$?"
timeout -k 10 240 torchrun --nproc-per-node 4 bench/hf_block.py --json "$O/hf_block.json" \
  > "$O/hf_block.log" 2>&1
echo "hf_block rc=$?"
timeout -k 10 180 $MPI -np 4 python3 -m pytest -m multigpu tests/test_multigpu_routing.py \
  -q --no-header -p no:cacheprovider > "$O/multigpu_routing_4.log" 2>&1
echo "routing 4 ranks rc=$?"
tail -6 "$O/hf_example_2gpu.log"
tail -15 "$O/hf_block.log"
grep -E "passed|failed|FAILED" "$O/multigpu_routing_4.log" | tail -5
