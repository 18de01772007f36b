#!/usr/bin/env bash
# On a P-GPU device machine: bench/torch_ep_check.py --cuda (the two PyTorch baselines,
# graph replay included, against the float64 reference), then bench/decode.py on P ranks
# (ours in host and graph mode vs both PyTorch EP baselines at small token counts); writes
# decode_p<P>_<shapes>.{md,json,png,log} under $OUT and prints the table last.
# Usage (device tool, carry .whl): bash bench/device_decode.sh P [COMMIT] [SHAPES] [TOKENS]
#   e.g. bash bench/device_decode.sh 4 abc1234 seed,dsv2lite 1,8,32,128,512
# Env: DECODE_TIMEOUT seconds for the run (default 540), ITERS (default 30).
set -u
P=${1:-2}; COMMIT=${2:-}; SHAPES=${3:-seed,dsv2lite,dsv3}; TOKENS=${4:-1,8,32,128,512}
source bench/device_setup.sh
O=${OUT:-/tmp/out}; mkdir -p "$O"
MPI="mpirun --allow-run-as-root -x NCCL_NVLS_ENABLE=0 -x PYTHONUNBUFFERED=1 -x FLASHMOE_CACHE"
source bench/device_lib.sh
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
# Both PyTorch baselines on small shapes, graph captured and replayed, vs the float64 reference.
timeout -k 10 150 python3 bench/torch_ep_check.py --ranks "$P" --cuda \
  > "$O/torch_ep_check_p$P.log" 2>&1
echo "torch baselines check rc=$?"; grep -cE "vs sync" "$O/torch_ep_check_p$P.log"
grep -E "Error|error" "$O/torch_ep_check_p$P.log" | tail -3
DECODE_TAG=${SHAPES//,/+} run_decode "$P" "$COMMIT" --problems "$SHAPES" --tokens "$TOKENS" \
  --iters "${ITERS:-30}"
