#!/usr/bin/env bash
# The next device session's checks in two calls (nvidia-h100-x4, carry .whl), for the work
# of 2026-11-26's sixth session that only ran on the CPU (router split, fused sources with
# this rank's tokens and NCCL groups, fused nvlink tasks, graph release at close, _tma
# default, SM busy). Logs under $OUT, summaries last.
#   1: the whole one-GPU suite in three lanes (device_final.sh gpu4), then the 4-rank
#      ws/tma/nvlink/graph tests with a log per rank (~550 s)
#   2: the 4-rank decode table with nvlink, one call at a time and 8 back to back (~450 s)
# Usage: bash bench/device_next.sh COMMIT 1|2   (COMMIT literally: the device's git metadata may lag)
set -u
COMMIT=${1:-unknown}; PART=${2:-1}
O=${OUT:-/tmp/out}; mkdir -p "$O"
if [ "$PART" = 1 ]; then
  SUITE_TIMEOUT=${SUITE_TIMEOUT:-330} bash bench/device_final.sh gpu4 > "$O/gpu4.txt" 2>&1
  cat "$O/gpu4.txt" | tail -30
  MULTI_TIMEOUT=200 bash bench/device_ws.sh "$COMMIT" c > "$O/ws_c.txt" 2>&1
  grep -E "rc=|PASSED|FAILED|passed|failed" "$O/ws_c.txt" | tail -30
fi
if [ "$PART" = 2 ]; then
  source bench/device_setup.sh
  MPI="mpirun --allow-run-as-root -x NCCL_NVLS_ENABLE=0 -x PYTHONUNBUFFERED=1 -x FLASHMOE_CACHE"
  source bench/device_lib.sh
  DECODE_TIMEOUT=220 run_decode 4 "$COMMIT" --problems seed,dsv3 --nvlink \
    > "$O/decode.txt" 2>&1
  DECODE_TAG=chain8 DECODE_TIMEOUT=220 run_decode 4 "$COMMIT" --problems seed,dsv3 --nvlink \
    --chain 8 > "$O/decode_chain8.txt" 2>&1
  tail -20 "$O/decode.txt"; tail -20 "$O/decode_chain8.txt"
fi
true
