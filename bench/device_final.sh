#!/usr/bin/env bash
# On a 4-GPU device machine: the one-GPU suite (`pytest -m gpu`, GPUs 0-1, which includes the
# 2-GPU export harness and torchrun tests) and the 4-rank multi-GPU suite (both modes,
# routing rules); logs and a summary under $OUT.
# Usage (device tool, carry .whl): bash bench/device_final.sh [both|gpu|gpu2|gpu4|multi] [FROM]
#   gpu4: every one-GPU test file over 4 GPUs in three parallel lanes (GPUs 0-1 for the
#   files that need two), so the whole suite fits one call.
#   gpu2: the same lanes on 2 GPUs: kernels and the rest side by side (SUITE_TIMEOUT each),
#   then the files that need both GPUs (PAIRS_TIMEOUT, 200 s).
#   both (default): side by side, each cut at SUITE_TIMEOUT (550 s). On 4 x H200 at dc66026
#   that reached 42 of 72 one-GPU tests and all 23 of test_multigpu.py: run the rest with
#   `gpu tests/test_gpu_routing.py` (FROM = the test files to start with) in a second call.
set -u
PART=${1:-both}; shift || true; FROM=${*:-tests}
source bench/device_setup.sh
O=${OUT:-/tmp/out}; mkdir -p "$O"
MPI="mpirun --allow-run-as-root -x NCCL_NVLS_ENABLE=0 -x PYTHONUNBUFFERED=1 -x FLASHMOE_CACHE"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$O/cards.txt"
T=${SUITE_TIMEOUT:-550}
lane() {  # NAME DEVICES FILES...
  local name=$1 dev=$2; shift 2
  CUDA_VISIBLE_DEVICES=$dev timeout -k 10 "$T" python3 -m pytest -m gpu "$@" -q --no-header \
    -p no:cacheprovider -rs > "$O/gpu_$name.log" 2>&1
  echo "gpu lane $name rc=$?" > "$O/gpu_$name.rc"
}
PAIRS="tests/test_gpu_nvlink.py tests/test_torch_multigpu.py tests/test_export.py \
  tests/test_gpu_tune_restart.py \
  tests/test_gpu_tune.py"
REST="tests/test_gpu_routing.py tests/test_gpu_graph.py tests/test_gpu_bad_input.py \
  tests/test_gpu_gen_weights.py tests/test_torch_gpu.py"
if [ "$PART" = gpu4 ] || [ "$PART" = gpu2 ]; then  # the one-GPU suite in three lanes, one call
  if [ "$PART" = gpu4 ]; then
    lane pairs 0,1 $PAIRS &
    lane kernels 2 tests/test_gpu_kernels.py &
    lane rest 3 $REST &
    wait
  else  # two GPUs: kernels and the rest side by side, then the files that need both
    lane kernels 0 tests/test_gpu_kernels.py &
    lane rest 1 $REST &
    wait
    T=${PAIRS_TIMEOUT:-200} lane pairs 0,1 $PAIRS
  fi
  for n in pairs kernels rest; do
    cat "$O/gpu_$n.rc"; grep -E "passed|failed|FAILED|Error" "$O/gpu_$n.log" | tail -8
  done
  exit 0
fi
if [ "$PART" != multi ]; then
  (CUDA_VISIBLE_DEVICES=0,1 timeout -k 10 "$T" python3 -m pytest -m gpu $FROM -q --no-header \
     -p no:cacheprovider -rs > "$O/gpu.log" 2>&1; echo "gpu suite rc=$?" > "$O/gpu.rc") &
fi
if [ "$PART" != gpu ]; then
  timeout -k 10 "$T" $MPI -np 4 python3 -m pytest -m multigpu tests/test_multigpu.py \
    tests/test_multigpu_routing.py -q --no-header -p no:cacheprovider > "$O/multigpu_4.log" 2>&1
  echo "multigpu 4 ranks rc=$?"
fi
wait
[ -f "$O/gpu.rc" ] && cat "$O/gpu.rc" && grep -E "passed|failed|FAILED|Error" "$O/gpu.log" | tail -15
[ -f "$O/multigpu_4.log" ] && grep -E "passed|failed|FAILED" "$O/multigpu_4.log" | tail -12
# pytest -q prints one character per test: count them when a run was cut short
for f in "$O/gpu.log" "$O/multigpu_4.log"; do
  [ -f "$f" ] && echo "$(basename "$f"): $(tr -cd '.' < "$f" | wc -c) passed, $(tr -cd 'F' < "$f" | wc -c) failed marks"
done
