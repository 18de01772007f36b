#!/usr/bin/env bash
# First device run of issue 12's kernels (weight streaming `_ws`, persistent TMA `_tma`) and
# issue 16's transport "nvlink" (one persistent kernel per forward):
# their one-GPU tests (GPU 0) and the GEMM bench (GPU 1) side by side, then their 4-rank
# tests and the 4-rank decode table of DeepSeek-V3-like and seed shapes. Logs under $OUT.
# Usage (device tool, nvidia-h100-x4, carry .whl): bash bench/device_ws.sh COMMIT a|b
#   a: 1-GPU tests, GEMM bench, host time, 4-rank tests (~450 s); b: nvlink watchdog test and
#   the 4-rank decode table (~360 s); c: the one-rank nvlink tests, the GEMM bench, then the
#   4-rank tests verbose with a log per rank (~450 s); d: the nvlink watchdog test, the 4-rank
#   nvlink tests with stack dumps, the decode table (~420 s); e: the decode table with 8
#   forwards back to back per timed iteration (~300 s). Each fits one call.
set -u
COMMIT=${1:-unknown}; PART=${2:-a}
source bench/device_setup.sh
source bench/device_lib.sh  # $O, $MPI and the helpers
cards
if [ "$PART" = a ]; then
(CUDA_VISIBLE_DEVICES=0 timeout -k 10 240 python3 -m pytest -m gpu tests/test_gpu_kernels.py \
   -k "ws or weight_streaming or e256 or h2880 or tma or nvlink" -q --no-header -p no:cacheprovider \
   > "$O/gpu_ws.log" 2>&1; echo "gpu ws tests rc=$?" > "$O/gpu_ws.rc") &
CUDA_VISIBLE_DEVICES=1 timeout -k 10 240 python3 bench/gemm_bench.py --commit "$COMMIT" \
  --cases dsv3_decode_r16,dsv3_decode_r32,dsv2lite_decode_r8,mixtral_t4096,dsv2lite_t4096,flashdmoe_t16384 \
  --out "$O/gemm_decode.md" --json "$O/gemm_decode.json" > "$O/gemm_decode.log" 2>&1
echo "gemm bench rc=$?"
for m in host graph; do  # issue 15: host time of a replayed forward (target <= 30 us)
  CUDA_VISIBLE_DEVICES=1 timeout 90 python3 bench/host_time.py --mode $m --label "$COMMIT" \
    >> "$O/host_time.jsonl" 2>&1
done
wait
timeout -k 10 200 $MPI -np 4 python3 -m pytest -m multigpu tests/test_multigpu.py \
  -k "weight_streaming or tma or nvlink or graph_mode_matches" -q --no-header -p no:cacheprovider \
  > "$O/multigpu_ws.log" 2>&1
echo "multigpu ws rc=$?"
fi
if [ "$PART" = c ]; then  # after a: the fixed tests one by one, a log per rank
CUDA_VISIBLE_DEVICES=0 timeout -k 10 150 python3 -m pytest -m gpu tests/test_gpu_kernels.py \
  -k nvlink -v --no-header -p no:cacheprovider > "$O/gpu_ws.log" 2>&1 &
CUDA_VISIBLE_DEVICES=2,3 timeout -k 10 150 python3 -m pytest -m gpu tests/test_gpu_nvlink.py -v \
  --no-header -p no:cacheprovider > "$O/gpu_nvlink.log" 2>&1 &
CUDA_VISIBLE_DEVICES=1 timeout -k 10 200 python3 bench/gemm_bench.py --commit "$COMMIT" \
  --cases dsv3_decode_r16,dsv3_decode_r32,dsv2lite_decode_r8,mixtral_t4096,dsv2lite_t4096,flashdmoe_t16384 \
  --out "$O/gemm_decode.md" --json "$O/gemm_decode.json" > "$O/gemm_decode.log" 2>&1
echo "gemm bench rc=$?"; wait
FLASHMOE_COMM_TIMEOUT=20 timeout -k 10 ${MULTI_TIMEOUT:-300} $MPI -x FLASHMOE_COMM_TIMEOUT -np 4 \
  --output-filename "$O/ranks" python3 -m pytest -m multigpu tests/test_multigpu.py -v \
  -k "${MULTI_K:-weight_streaming or tma_kernel or nvlink or graph_mode_matches}" \
  --no-header -p no:cacheprovider > "$O/multigpu_ws.log" 2>&1
echo "multigpu ws rc=$?"
# One file for all ranks (the device tool brings back a limited number of files).
for r in 0 1 2 3; do echo "== rank $r"; tail -60 "$O/ranks/1/rank.$r/stdout" 2>/dev/null
done > "$O/ranks_tail.txt"; rm -rf "$O/ranks"
grep -E "== rank|PASSED|FAILED|ERROR|passed|failed" "$O/ranks_tail.txt" | tail -40
fi
if [ "$PART" = d ]; then  # after c: the watchdog fix, the exit of a 4-rank nvlink suite
CUDA_VISIBLE_DEVICES=0,1 timeout -k 10 120 python3 -m pytest -m gpu tests/test_gpu_nvlink.py -v \
  --no-header -p no:cacheprovider > "$O/gpu_nvlink.log" 2>&1
echo "nvlink watchdog test rc=$?"
# Tracebacks of every thread of a rank whose test (teardown included) runs past 45 s.
FLASHMOE_COMM_TIMEOUT=20 timeout -k 10 120 $MPI -x FLASHMOE_COMM_TIMEOUT -np 4 \
  --output-filename "$O/ranks" python3 -m pytest -m multigpu tests/test_multigpu.py -v \
  -o faulthandler_timeout=45 -k "${MULTI_K:-nvlink}" --no-header -p no:cacheprovider \
  > "$O/multigpu_nvlink.log" 2>&1
echo "multigpu nvlink rc=$?"
for r in 0 1 2 3; do echo "== rank $r"; tail -60 "$O/ranks/1/rank.$r/stdout" 2>/dev/null
done > "$O/ranks_tail.txt"; rm -rf "$O/ranks"
grep -E "== rank|passed|failed|Timeout" "$O/ranks_tail.txt" | tail -12
DECODE_TIMEOUT=${DECODE_TIMEOUT:-240} run_decode 4 "$COMMIT" --problems seed,dsv3 --nvlink \
  > "$O/decode_summary.txt" 2>&1
fi
if [ "$PART" = e ]; then  # the decode table per forward with 8 back to back (host ahead)
DECODE_TAG=chain8 DECODE_TIMEOUT=${DECODE_TIMEOUT:-300} run_decode 4 "$COMMIT" \
  --problems seed,dsv3 --nvlink --chain 8 > "$O/decode_summary.txt" 2>&1
fi
if [ "$PART" = b ]; then
CUDA_VISIBLE_DEVICES=0,1 timeout -k 10 120 python3 -m pytest -m gpu tests/test_gpu_nvlink.py -q \
  --no-header -p no:cacheprovider > "$O/gpu_nvlink.log" 2>&1
echo "nvlink watchdog test rc=$?"
DECODE_TIMEOUT=240 run_decode 4 "$COMMIT" --problems seed,dsv3 --nvlink \
  > "$O/decode_summary.txt" 2>&1
fi
cat "$O/gpu_ws.rc" 2>/dev/null; for f in gpu_ws multigpu_ws gpu_nvlink; do
  [ -f "$O/$f.log" ] && grep -E "passed|failed|FAILED" "$O/$f.log" | tail -10
done
[ -f "$O/gemm_decode.md" ] && cat "$O/gemm_decode.md"
[ -f "$O/decode_summary.txt" ] && tail -25 "$O/decode_summary.txt"
[ -f "$O/host_time.jsonl" ] && cat "$O/host_time.jsonl"
true
