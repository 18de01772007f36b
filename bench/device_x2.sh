#!/usr/bin/env bash
# A 2-GPU device session's checks (nvidia-h100-x2, carry .whl) of work that so far ran only
# on the CPU: the router's split-H, the `_tma` default, fused sources with this rank's
# tokens and one NCCL group per stream, fused nvlink tasks over active experts, graph release
# at close, SM busy. Logs under $OUT, summaries last; each part fits one call.
#   1: one-GPU kernel tests (GPU 0) beside routing/graph tests (GPU 1) and the 2-GPU nvlink
#      tests, then the 2-rank tests of part m (~580 s; the 2-rank part stops at 310 s, about
#      26 of its 31 cases on a fresh machine: part m alone runs them all)
#   2: the 2-rank decode table with nvlink, 8 forwards back to back (seed, DeepSeek-V2-Lite,
#      DeepSeek-V3-like), then the weight-streaming GEMMs alone at 16/32/64 rows (~400 s)
#   m: part 1's 2-GPU nvlink tests and the 2-rank tests of the NCCL path (weight streaming,
#      TMA kernels, graph mode, overlap knobs) and of the seed's persistent kernel (31 cases;
#      26 of them took ~310 s on a fresh 2 x H200, hence the 400 s limit)
#   mn: the 2-rank persistent-kernel cases of the defaults' tile kinds (DeepSeek-V2-Lite,
#      TMA row tiles; 13 cases, 362 s on a fresh 2 x H200: ~28 s each, every kernel
#      compiled; all 35 nvlink cases need three calls: MN_K picks them)
#   t: issue 13's preset tunes on 2 ranks, 24 trials each, tuned vs default (~500 s)
#   w: branch ws-fused-64 on 2 ranks: the rows its rule changes there (64 and 48 rows per
#      expert: DeepSeek-V3-like T=1024, DeepSeek-V2-Lite T=256) and a neighbour each, then
#      the 2-rank weight-streaming tests (~300 s)
#   n: the next levers (branch decode-next: solo front, direct graphs, row tasks, ws_tma):
#      one block's streaming rate (bench/sm_stream.py, GPU 0), the 2-rank nvlink tests, the
#      solo front against grid barriers and TMA weight loads (nvlink_sweep d=0,1;wt=0,1)
#      (~550 s); part 2 then gives the decode table
#   r: issue 16's TMA-fed wgmma row tasks (ws_tma on _wg tiles): the 2-rank nvlink row-tile
#      tests, then H=I=2048 E=64 at T=4096/16384 on 2 ranks beside PyTorch EP, cp.async vs
#      TMA rows at 3 and at 4 stages (~500 s)
#   s: send_blocks (a subset of the persistent kernel's blocks sends the peers' rows while
#      the others start this rank's own tasks) and the 4-stage TMA row default: the 2-rank
#      tests, then E=64 T=4096/16384 on 2 ranks over sb = 0, 8, 16, 32 beside PyTorch EP
#      (~450 s)
#   c: session 21's combine (every row's loads in flight before a store) and positions scan
#      (8 tokens per thread), in every forward of both transports, first run on a GPU: the
#      2-rank persistent-kernel cases and NCCL cases, then E=64 T=4096/16384 on 2 ranks, the
#      commit before them (.old, bench/prepare_old.sh; carry .old) and this one in one call,
#      beside PyTorch EP (~480 s; run `bash bench/device_final.sh gpu2` first). C_PROBLEMS,
#      C_TOKENS, C_TESTS (the 2-rank -k), C_GPU1 / C_GPU1_K (one-GPU test files and their
#      -k, on the last GPU beside them), C_SIDES (the sweeps' order, e.g. "old new new old"),
#      C_NO_TORCH (no PyTorch EP rows) change it
#   rs2: the staged router logits beyond the measured regime (router_staged.STAGED_ALL):
#      the one-GPU cases, then default / --staged-all at E=8 and E=32 T=16384, Mixtral
#      T=4096, E=64 T=1024 on 2 ranks (~330 s)
#   a: the gate/up results by TMA stores in flight (stage_epilogue 3): the one-GPU and
#      2-rank cases beside the staged ones, then E=64 T=4096/16384 on 2 ranks over se = 1, 3
#      beside PyTorch EP (~400 s; A_PROBLEMS, A_TOKENS, A_VARY change the sweep)
#   p: the task producer (config task_producer): with 4 GPUs the whole one-GPU suite in two
#      halves on GPUs 2, 3 beside the producer's tests on GPUs 0, 1 (one GPU; the late / lost
#      rank watchdog; the 2-rank producer cases), then E=64/32/8 at T=4096/16384 on 2 ranks
#      with and without it (P_PROBLEMS, P_TOKENS, P_VARY change the sweep) (~500 s)
#   pab: the producer's A/B alone on GPUs 0, 1: E=64/32/8 at T=16384 and E=64 at 4096 over
#      pr = 0, 1 x se = 1, 0, then the same in the reverse order (a variant that always runs
#      second meets a warmer card), the cards' SM clock, power and throttle reasons sampled
#      every 250 ms beside it (PAB_VARY, PAB_TOKENS change it) (~400 s)
#   af: rows' slots by atomics as they are routed (atomic_front): its one-GPU tests (last
#      GPU) beside its 2-rank cases, then E=8/32/64 at T=1024 on 2 ranks with and without it
#      (AF_TOKENS changes the sweep) (~170 s)
#   v: the one-GPU kernel tests in two halves side by side (GPUs 0, 1) with the graph and
#      routing tests after them, then the 2-rank persistent-kernel, weight-streaming and
#      graph-mode cases (~580 s): every cp.async- and TMA-fed tile kind
# Pass COMMIT literally (the device's git metadata lagged the working tree it ran).
# Usage: bash bench/device_x2.sh COMMIT 1|2|a|af|c|m|mn|t|n|w|p|pab|r|rs2|s|v
set -u
COMMIT=${1:-unknown}; PART=${2:-1}
source bench/device_setup.sh
source bench/device_lib.sh  # $O, $MPI and the helpers
cards
summary() {  # LOG...: pytest's last lines, or its progress marks when cut short
  for f in "$@"; do
    echo "== $(basename "$f"): $(tr -cd '.' < "$f" | wc -c) pass marks, $(tr -cd 'F' < "$f" | wc -c) F"
    grep -E "passed|failed|FAILED|ERROR|Error" "$f" | tail -8
  done
}
if [ "$PART" = mn ]; then
  multigpu_k 2 "${MN_TIMEOUT:-450}" mn "${MN_K:-nvlink_persistent_kernel and (dsv2lite or \
row_tiles_wgmma_tma) and not (producer or phased or atomic or pairs or deferred)}"
fi
if [ "$PART" = 1 ] || [ "$PART" = m ]; then  # m: the 2-rank tests alone
  T=${LANE_TIMEOUT:-270}
  [ "$PART" = 1 ] && (CUDA_VISIBLE_DEVICES=0 timeout -k 10 "$T" python3 -m pytest -m gpu \
     tests/test_gpu_kernels.py -q --no-header -p no:cacheprovider -rs > "$O/gpu_kernels.log" 2>&1) &
  [ "$PART" = 1 ] && (CUDA_VISIBLE_DEVICES=1 timeout -k 10 "$T" python3 -m pytest -m gpu \
     tests/test_gpu_routing.py tests/test_gpu_graph.py -q --no-header -p no:cacheprovider -rs \
     > "$O/gpu_rest.log" 2>&1) &
  CUDA_VISIBLE_DEVICES=0,1 timeout -k 10 150 python3 -m pytest -m gpu tests/test_gpu_nvlink.py -v \
    --no-header -p no:cacheprovider > "$O/gpu_nvlink.log" 2>&1
  wait
  MT=310; [ "$PART" = m ] && MT=400  # (part 1's one-GPU lanes ran first)
  FLASHMOE_COMM_TIMEOUT=20 timeout -k 10 "${MULTI_TIMEOUT:-$MT}" $MPI -x FLASHMOE_COMM_TIMEOUT \
    -np 2 --output-filename "$O/ranks" python3 -m pytest -m multigpu tests/test_multigpu.py -v \
    -k "${MULTI_K:-weight_streaming or tma_kernel or graph_mode_matches or overlap_knobs or \
nvlink_persistent_kernel and (seed or graph or fused) and not (dsv2lite or capped or ws)}" \
    --no-header -p no:cacheprovider > "$O/multigpu.log" 2>&1
  echo "multigpu 2 ranks rc=$?"
  # One file for both ranks (the device tool brings back a limited number of files).
  for r in 0 1; do echo "== rank $r"; tail -80 "$O/ranks/1/rank.$r/stdout" 2>/dev/null
  done > "$O/ranks_tail.txt"; rm -rf "$O/ranks"
  summary "$O"/gpu_*.log
  grep -E "== rank|FAILED|ERROR|passed|failed" "$O/ranks_tail.txt" | tail -30
fi
if [ "$PART" = 2 ]; then
  # The decode table on all three shapes (the weight-streaming token tile of 6a2da90 shows
  # in the DeepSeek-V3-like T=512 row), then the weight-streaming tiles alone.
  DECODE_TAG=chain8 DECODE_TIMEOUT=${DECODE_TIMEOUT:-300} run_decode 2 "$COMMIT" \
    --problems seed,dsv2lite,dsv3 --nvlink --chain 8 > "$O/decode.txt" 2>&1
  rm -f "$O"/*.png
  CUDA_VISIBLE_DEVICES=0 timeout -k 10 180 python3 bench/gemm_bench.py --commit "$COMMIT" \
    --cases dsv3_decode_r16,dsv3_decode_r32,dsv3_decode_r64 \
    --out "$O/gemm.md" --json "$O/gemm.json" > "$O/gemm.log" 2>&1
  echo "gemm bench rc=$?"; cat "$O/gemm.md" 2>/dev/null | tail -8
  tail -30 "$O/decode.txt"
fi
if [ "$PART" = n ]; then
  CUDA_VISIBLE_DEVICES=0 timeout -k 10 60 python3 bench/sm_stream.py --commit "$COMMIT" \
    --out "$O/sm_stream.md" --json "$O/sm_stream.json" > "$O/sm_stream.log" 2>&1
  echo "sm_stream rc=$?"
  FLASHMOE_COMM_TIMEOUT=20 timeout -k 10 270 $MPI -x FLASHMOE_COMM_TIMEOUT -np 2 \
    --output-filename "$O/ranks" python3 -m pytest -m multigpu tests/test_multigpu.py -v \
    -k nvlink --no-header -p no:cacheprovider > "$O/multigpu.log" 2>&1
  echo "multigpu nvlink 2 ranks rc=$?"
  for r in 0 1; do echo "== rank $r"; grep -E "PASSED|FAILED|ERROR|passed|failed" \
    "$O/ranks/1/rank.$r/stdout" 2>/dev/null | tail -14; done > "$O/ranks_tail.txt"
  rm -rf "$O/ranks"
  grep -E "== rank|FAILED|ERROR|passed|failed" "$O/ranks_tail.txt" | cut -c1-200
  timeout -k 10 220 $MPI -np 2 python3 bench/nvlink_sweep.py --commit "$COMMIT" \
    --problems seed,dsv2lite --tokens 1,8 --vary "d=0,1;wt=0,1" --iters 20 --out "$O/sweep.md" \
    --json "$O/sweep.json" > "$O/sweep.log" 2>&1
  echo "sweep (solo front vs grid barriers, TMA weight loads) rc=$?"
  grep -E "^\| (seed|dsv)" "$O/sweep.md" |
    awk -F'|' '{c = $4; sub(/.*nvlink/, "nvlink", c); print $2, $3, c, $5, $6, $8}'
  grep -E "^\| (cp.async|bulk|ld|tile)" "$O/sm_stream.md" | head -40
fi
if [ "$PART" = w ]; then
  DECODE_TAG=ws64 DECODE_TIMEOUT=200 run_decode 2 "$COMMIT" --problems dsv2lite \
    --tokens 128,256 --nvlink --chain 8 > "$O/decode_dsv2lite.txt" 2>&1
  DECODE_TAG=ws64_dsv3 DECODE_TIMEOUT=200 run_decode 2 "$COMMIT" --problems dsv3 \
    --tokens 512,1024 --nvlink --chain 8 > "$O/decode_dsv3.txt" 2>&1
  rm -f "$O"/*.png
  timeout -k 10 120 $MPI -np 2 python3 -m pytest -m multigpu tests/test_multigpu.py -q \
    -k weight_streaming --no-header -p no:cacheprovider > "$O/multigpu_ws.log" 2>&1
  echo "multigpu weight_streaming 2 ranks rc=$?"; grep -E "passed|failed" "$O/multigpu_ws.log"
  bundle
  grep -hE "^\| (dsv)" "$O/decode_dsv2lite.txt" "$O/decode_dsv3.txt" | cut -d'|' -f2-3,4-5,6-7,10
fi
if [ "$PART" = t ]; then  # issue 13: preset tunes, tuned vs the heuristic default
  N=${TRIALS:-24}
  run_preset_tunes 2 "deepseek-v3 128 $N" "deepseek-v2-lite 512 $N" "qwen3-30b-a3b 512 $N" \
    "mixtral-8x7b 4096 $N"
fi
if [ "$PART" = r ] || [ "$PART" = s ]; then  # issue 16: the persistent kernel's tasks
  if [ "$PART" = r ]; then  # row tasks fed by TMA
    multigpu_k 2 240 rowtma "row_tiles_wgmma or wgmma_tma"; VARY=("wt=0,1" "gu_s=4;dn_s=4;wt=0,1")
  else  # send_blocks, on the default (TMA rows, 4 stages)
    multigpu_k 2 240 send "wgmma_tma or send_blocks"; VARY=("sb=0,8,16,32")
  fi
  for v in "${VARY[@]}"; do
    tag=$(echo "$v" | tr -c 'a-z0-9\n' '_')
    timeout -k 10 ${R_TIMEOUT:-260} $MPI -np 2 python3 bench/nvlink_sweep.py --torch \
      --commit "$COMMIT" --problems e64 --tokens 4096,16384 --vary "$v" --iters 10 \
      --out "$O/sweep_$tag.md" --json "$O/sweep_$tag.json" > "$O/sweep_$tag.log" 2>&1
    echo "sweep $v rc=$?"
  done
  bundle
  grep -hE "^\| e64" "$O"/sweep_*.md | cut -d'|' -f2-11
  grep -hE "^- e64" "$O"/sweep_*.md | sed 's/`[^`]*`//' | cut -c1-160
fi
if [ "$PART" = c ]; then
  if [ -n "${C_GPU1:-}" ]; then  # one-GPU tests on the last GPU beside the 2-rank ones
    K=(); [ -n "${C_GPU1_K:-}" ] && K=(-k "$C_GPU1_K")
    CUDA_VISIBLE_DEVICES=$(( $(nvidia-smi -L | wc -l) - 1 )) timeout -k 10 "${C_GPU1_TIMEOUT:-240}" \
      python3 -m pytest -m gpu $C_GPU1 "${K[@]}" -v --no-header -p no:cacheprovider -rs \
      > "$O/gpu1_c.log" 2>&1 &
  fi
  multigpu_k 2 "${TEST_TIMEOUT:-230}" comb "${C_TESTS:-nvlink_persistent_kernel and (seed or \
capped_skewed or row_tiles_wgmma_tma_staged or dsv2lite_default_quad or \
dsv2lite_default_fused or fused_ws_wgmma or fused_split_k) or graph_mode_matches and \
(seed or fused)}"
  wait
  [ -n "${C_GPU1:-}" ] && summary "$O/gpu1_c.log"
  TORCH=(--torch); [ -n "${C_NO_TORCH:-}" ] && TORCH=()
  old_new_sweeps 2 "${C_SWEEP_TIMEOUT:-130}" "${C_SIDES:-old new}" "${TORCH[@]}" \
    --problems "${C_PROBLEMS:-e64}" --tokens "${C_TOKENS:-4096,16384}"
  bundle
  for f in "$O"/sweep_c_*.md; do echo "== $(basename "$f" .md)"; grep -hE "^\| [a-z]" "$f" |
    grep -v "^| shape" | cut -d'|' -f2-10 | sed -E 's/gu_bm128[^ ]*__wt__sb32/D/'
    grep -hoE "^- [a-z0-9]+ T=[0-9]+|route [0-9.]+|epilogue: gate/up \([0-9]+\) [0-9.]+ / [0-9.]+ / [0-9.]+|SM clock [0-9.]+ GHz" "$f" |
    paste -sd' '; done
fi
if [ "$PART" = a ]; then
  CUDA_VISIBLE_DEVICES=0 timeout -k 10 150 python3 -m pytest -m gpu tests/test_gpu_kernels.py \
    -v --no-header -p no:cacheprovider -k tma_stores > "$O/gpu1_tstore.log" 2>&1
  echo "one GPU tma_stores: $(tail -1 "$O/gpu1_tstore.log")"
  multigpu_k 2 "${TEST_TIMEOUT:-200}" tstore "nvlink_persistent_kernel and (tstore or \
row_tiles_wgmma_tma_staged or dsv2lite_default_staged)"
  timeout -k 10 "${A_TIMEOUT:-330}" $MPI -np 2 python3 bench/nvlink_sweep.py --torch \
    --commit "$COMMIT" --problems "${A_PROBLEMS:-e64}" --tokens "${A_TOKENS:-4096,16384}" \
    --vary "${A_VARY:-se=1,3}" --iters 10 --out "$O/sweep_tstore.md" \
    --json "$O/sweep_tstore.json" > "$O/sweep_tstore.log" 2>&1
  echo "sweep tstore rc=$?"
  bundle
  grep -hE "^\| e" "$O/sweep_tstore.md" | cut -d'|' -f2-11
  grep -hE "^- e" "$O/sweep_tstore.md" | sed 's/`[^`]*`//' | cut -c1-400
fi
if [ "$PART" = p ]; then
  if [ "$(nvidia-smi -L | wc -l)" -ge 4 ]; then
    kernel_test_ids
    LANE_TIMEOUT=${P_LANE_TIMEOUT:-330} suite_half 0 2 tests/test_gpu_graph.py &
    LANE_TIMEOUT=${P_LANE_TIMEOUT:-330} suite_half 1 3 tests/test_gpu_routing.py &
  fi
  CUDA_VISIBLE_DEVICES=0 timeout -k 10 200 python3 -m pytest -m gpu tests/test_gpu_kernels.py \
    -v --no-header -p no:cacheprovider -k task_producer > "$O/gpu1_producer.log" 2>&1
  echo "one GPU task_producer: $(tail -1 "$O/gpu1_producer.log")"
  CUDA_VISIBLE_DEVICES=0,1 timeout -k 10 150 python3 -m pytest -m gpu tests/test_gpu_nvlink.py \
    -v --no-header -p no:cacheprovider -k late_rank > "$O/gpu_watchdog.log" 2>&1
  echo "watchdog: $(tail -1 "$O/gpu_watchdog.log")"
  multigpu_k 2 "${TEST_TIMEOUT:-240}" producer "nvlink_persistent_kernel and (producer or \
row_tiles_wgmma_tma_staged or dsv2lite_default_staged)"
  # (beside the suite's halves: each shape's variants run back to back, under the same load)
  timeout -k 10 "${P_SWEEP_TIMEOUT:-300}" $MPI -np 2 python3 bench/nvlink_sweep.py \
    --commit "$COMMIT" --problems "${P_PROBLEMS:-e64,e32,e8}" --tokens "${P_TOKENS:-4096,16384}" \
    --vary "${P_VARY:-pr=0,1}" --iters 10 --out "$O/sweep_producer.md" \
    --json "$O/sweep_producer.json" > "$O/sweep_producer.log" 2>&1
  echo "sweep producer rc=$?"
  wait
  cat "$O"/gpu_half*.rc 2>/dev/null; summary "$O"/gpu_half*.log "$O/gpu1_producer.log"
  bundle
  grep -hE "^\| e" "$O/sweep_producer.md" | cut -d'|' -f2-11
  grep -hE "^- e" "$O/sweep_producer.md" | sed 's/`[^`]*`//' | cut -c1-400
fi
if [ "$PART" = pab ]; then
  smi_sample
  ab_sweeps 2 "${PAB_TIMEOUT:-170}" "${PAB_VARY:-pr=0,1;se=1,0}" "${PAB_VARY_REV:-pr=1,0;se=0,1}" \
    "e64,e32,e8:${PAB_TOKENS:-16384}" "e64:4096"
  smi_summary 2
  bundle
  for f in "$O"/sweep_ab*.md; do grep -hE "^\| e" "$f" | cut -d'|' -f2-11 |
    sed -E 's/gu_bm128[^ ]*__wt__sb32/D/'; done
  grep -hoE "^- e[0-9]+ T=[0-9]+ \`[^\`]*\`|per TMA row tile \([0-9]+\): prologue_us [0-9.]+, loop_us [0-9.]+, epilogue_us [0-9.]+|SM clock [0-9.]+ GHz" \
    "$O"/sweep_ab*.md | sed -E 's/gu_bm128[^`]*__wt__sb32/D/' | paste -d' ' - - - | cut -c1-200
fi
if [ "$PART" = af ]; then
  CUDA_VISIBLE_DEVICES=$(( $(nvidia-smi -L | wc -l) - 1 )) timeout -k 10 "${AF_GPU1_TIMEOUT:-100}" \
    python3 -m pytest -m gpu tests/test_gpu_kernels.py -v --no-header -p no:cacheprovider \
    -k atomic_front > "$O/gpu1_atomic.log" 2>&1 &
  multigpu_k 2 "${TEST_TIMEOUT:-100}" atomic "nvlink_persistent_kernel and atomic"
  wait
  echo "one GPU atomic_front: $(tail -1 "$O/gpu1_atomic.log")"
  timeout -k 10 "${AF_SWEEP_TIMEOUT:-80}" $MPI -np 2 python3 bench/nvlink_sweep.py \
    --commit "$COMMIT" --problems e8,e32,e64 --tokens "${AF_TOKENS:-1024}" --vary "af=0,1" \
    --iters 10 --out "$O/sweep_atomic.md" --json "$O/sweep_atomic.json" \
    > "$O/sweep_atomic.log" 2>&1
  echo "sweep atomic rc=$?"
  bundle
  grep -hE "^\| e" "$O/sweep_atomic.md" | cut -d'|' -f2-11 | sed -E 's/gu_bm[^ ]*__nvlink//'
  grep -hoE "^- e[0-9]+ T=[0-9]+|route [0-9.]+, positions [0-9.]+, dispatch [0-9.]+" \
    "$O/sweep_atomic.md" | paste -d' ' - -
fi
if [ "$PART" = v ]; then
  kernel_test_ids
  suite_half 0 0 tests/test_gpu_graph.py & suite_half 1 1 tests/test_gpu_routing.py &
  wait
  multigpu_k 2 "${MULTI_TIMEOUT:-290}" v2 "nvlink_persistent_kernel and (seed or row_tiles \
or quad_batches or tstore or fused_ws or fused_split_k) and not (deferred or phased or \
send_blocks) or graph_mode_matches or weight_streaming_sources"
  cat "$O"/gpu_half*.rc; summary "$O"/gpu_half*.log
  bundle
fi
if [ "$PART" = rs2 ]; then
  CUDA_VISIBLE_DEVICES=0 timeout -k 10 150 python3 -m pytest -m gpu tests/test_gpu_kernels.py \
    -q --no-header -p no:cacheprovider -k staged_router > "$O/gpu1_staged.log" 2>&1
  echo "one GPU staged_router: $(tail -1 "$O/gpu1_staged.log")"
  for s in "e8 16384" "e32 16384" "mixtral 4096" "e64 1024"; do
    set -- $s
    for a in rsa0 rsb; do
      timeout -k 10 90 $MPI -np 2 python3 bench/nvlink_sweep.py --torch --commit "$COMMIT" \
        --problems "$1" --tokens "$2" --iters 10 $([ $a = rsb ] && echo --staged-all) \
        --out "$O/sweep_${a}_$1.md" --json "$O/sweep_${a}_$1.json" \
        > "$O/sweep_${a}_$1.log" 2>&1
      echo "sweep $a $1 rc=$?"
    done
  done
  bundle
  for a in rsa0 rsb; do echo "== $a"; grep -hE "^\| (e8|e32|mixtral|e64) " "$O"/sweep_${a}_*.md |
    cut -d'|' -f2-10; grep -hE "^- (e8|e32|mixtral|e64)" "$O"/sweep_${a}_*.md | cut -c1-500; done
fi
true
