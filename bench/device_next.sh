#!/usr/bin/env bash
# The next 4-GPU device session (nvidia-h100-x4, carry .whl): the checks and the numbers the
# open issues ask for on 4 GPUs. Logs under $OUT, summaries last; each part fits one call.
#   1: the whole one-GPU suite in three lanes (device_final.sh gpu4), then the 4-rank
#      ws/tma/nvlink/graph tests with a log per rank (~550 s)
#   2: issue 15/16/12 numbers: the decode table on 4 ranks with nvlink, 8 forwards back to
#      back (seed, DeepSeek-V2-Lite, DeepSeek-V3-like; T=256 too: the seed example's count);
#      the overlap table (seed T=256, DeepSeek-V2-Lite T=512, Mixtral T=4096); FlashDMoE's
#      setting (E=64) with nvlink on 2 then 4 ranks in the same call, for weak scaling (~540 s)
#   3: issue 13: preset tunes on 4 ranks, tuned vs the heuristic default, DeepSeek-V3 T=128
#      with 32 trials (first trial <= 30 s, 32 trials <= 5 min) (~540 s)
#   j: Mixtral T=4096 on 4 ranks with the task-loop clocks, then issue 16's table over
#      FlashDMoE's whole setting: H=I=2048 k=2, E = 8, 32, 64 at T=1024 and 16384 per GPU,
#      on 2 then 4 ranks of one machine: nccl (host and graph), nvlink, PyTorch EP and the
#      floor, same run (J_RANKS=4: the 4-rank half; NO_MIX=1: the table alone; J_KNOBS:
#      the persistent default with these knobs too, in nvlink_sweep's spelling, e.g. pr=1;
#      J_CHAIN=8: every timing 8 forwards back to back, ours and PyTorch EP's alike;
#      plot it on the development machine with scaling.py --plot: the device returns few
#      files)
#   s32d: the default for few local experts against the old ones; S32D_MORE=1: two row
#      tiles per task and 16 vs 32 senders at E=64 T=16384 too (~250 s, ~440 s)
#   s34: the 4-rank cases of the shared experts' down tiles as TMA row tasks, of the
#      streamed down tasks (per-source lists and the one list; first in the queue) and of the
#      shared tiles beside the front, then the seed example T=256 over sd x ed x sf, both
#      orders (~550 s; S34_NP=2 on 2 GPUs)
#   s34b: the seed example T=256 with the shared experts' down tiles by TMA rows and by
#      cp.async, alternating, beside PyTorch EP (~250 s)
#   s22: the 4-rank tests of the combine and positions scan, Mixtral's overlap row (3
#      rounds), issue 16's table on 4 ranks (~540 s)
#   s22b: Mixtral's overlap row on 4 ranks, then the staged logits' widened regime
#      (DeepSeek-V2-Lite T=128/4096) against split_logits on NP ranks (4) (~330 s)
# The one-off parts of sessions 12-22 (6, g, h, k, n, n22, next, next2, p, r, rs, rs2, v, w,
# wsg, fin, ...) are in this file's history (git log -p bench/device_next.sh; 3182f16 is the
# last commit that has them all; session 31's of, of2, of3: 449d642; session 32's odl and
# rot: dd4a1da, its s32, s32b, s32c, s32e: 156cf65; session 33's s33, s33b, s33c, with the
# down K parts and L2 prefetch they measured, then dropped: 11f05a8, its s33d: 8bdcc89, its
# s33e: c556a5b, its s33f and s33g: 805040d, its s33h: 4b27f8f; session 34's s34c-s34h:
# 020adc3): the bench/results files of the sessions that ran them name each command with its
# commit.
# Usage: bash bench/device_next.sh COMMIT 1|2|3|j|s32d|s34|s34b|s22|s22b
COMMIT=${1:-unknown}; PART=${2:-1}
O=${OUT:-/tmp/out}; mkdir -p "$O"
if [ "$PART" = 1 ]; then
  SUITE_TIMEOUT=${SUITE_TIMEOUT:-330} bash bench/device_final.sh gpu4 > "$O/gpu4.txt" 2>&1
  cat "$O/gpu4.txt" | tail -30
  MULTI_TIMEOUT=200 bash bench/device_ws.sh "$COMMIT" c > "$O/ws_c.txt" 2>&1
  grep -E "rc=|PASSED|FAILED|passed|failed" "$O/ws_c.txt" | tail -30
  source bench/device_lib.sh; bundle  # session 16 lost the per-rank logs: > 8 files
  exit 0
fi
source bench/device_setup.sh
# BLAS threads per rank: four ranks' float64 references, each with every core's threads,
# took > 100 s per DeepSeek-V2-Lite test on 4 x H200 (session 20)
MPI="mpirun --allow-run-as-root -x NCCL_NVLS_ENABLE=0 -x PYTHONUNBUFFERED=1 -x FLASHMOE_CACHE \
  -x OMP_NUM_THREADS=8 -x OPENBLAS_NUM_THREADS=8"
source bench/device_lib.sh
# Problems and tiles of the large-batch rows (`tune_row`): the tma kernel's 128 x 128 tiles
TMA128=gu_bm128_bn128_bk64_w8x1_s4_tma__dn_bm128_bn128_bk64_w8x1_s4_tma
MIX="--model mixtral-8x7b --tokens 4096"
E64="--hidden 2048 --intermediate 2048 --experts 64 --top-k 2 --shared-experts 0 --tokens 16384"
nvidia-smi --query-gpu=index,name --format=csv,noheader | tee "$O/cards.txt"
if [ "$PART" = 2 ]; then
  DECODE_TAG=chain8 DECODE_TIMEOUT=${DECODE_TIMEOUT:-240} run_decode 4 "$COMMIT" --problems seed,dsv2lite,dsv3 \
    --tokens 1,8,32,128,256,512 --nvlink --chain 8 > "$O/decode.txt" 2>&1
  weak_scaling "$COMMIT" 80
  OVERLAP_TIMEOUT=${OVERLAP_TIMEOUT:-150} run_overlap 4 "$COMMIT" \
    --problems seed,dsv2lite_t512,mixtral_t4096 > "$O/overlap.txt" 2>&1
  rm -f "$O"/*.png
  tail -12 "$O/scaling_p2.log" "$O/scaling_p4.log"; bundle
  tail -14 "$O/overlap.txt"; tail -30 "$O/decode.txt"
fi
if [ "$PART" = j ]; then
  if [ -z "${NO_MIX:-}" ]; then  # NO_MIX=1: the scaling table alone
    timeout -k 10 110 $MPI -np 4 python3 bench/nvlink_sweep.py --torch --commit "$COMMIT" \
      --problems mixtral --tokens 4096 --iters 10 --out "$O/sweep_mixtral_anatomy.md" \
      --json "$O/sweep_mixtral_anatomy.json" > "$O/sweep_mixtral_anatomy.log" 2>&1
    echo "mixtral rc=$?"
    grep -hE "^\| mixtral|^- mixtral" "$O/sweep_mixtral_anatomy.md" | cut -c1-400
  fi
  for p in ${J_RANKS:-2 4}; do  # J_RANKS=4: the 4-rank half alone
    KN=(); [ -n "${J_KNOBS:-}" ] && KN=(--nvlink-knobs "$J_KNOBS")  # e.g. pr=1
    timeout -k 10 "${J_TIMEOUT:-200}" $MPI -np $p python3 bench/scaling.py --experts 8,32,64 \
      --tokens 1024,16384 --nvlink "${KN[@]}" --chain "${J_CHAIN:-1}" --commit "$COMMIT" \
      --json "$O/scaling.json" \
      --out "$O/scaling_p$p" > "$O/scaling_p$p.log" 2>&1
    echo "scaling $p ranks rc=$?"
  done
  rm -f "$O"/*.png; cp "$O/scaling.json" "$O/scaling_json.txt" 2>/dev/null; bundle
  python3 -c "import json; [print(r['gpus'], r['experts'], r['tokens_per_gpu'], 'floor', \
r['floor_ms'], 'torch', r['torch_ep_ms'], 'nccl', r['ours_ms'], 'graph', r.get('ours_graph_ms'), \
'nvlink', r.get('ours_nvlink_ms'), r.get('speedup_nvlink'), 'knobs', r.get('ours_nvlink_k_ms'), \
r.get('config_nvlink_k', '')[-12:], 'busy', r.get('sm_busy_nvlink'), r.get('sm_busy_nvlink_k')) \
for r in json.load(open('$O/scaling_json.txt'))]"
fi
nvl_sweep() {  # TAG SHAPE TOKENS TIMEOUT [nvlink_sweep ARGS...]: one sweep on NP ranks (4)
  # beside PyTorch EP into $O/sweep_TAG_SHAPE.{md,json,log}
  # (NO_TORCH=1: without PyTorch EP, for A/B sweeps of our configs alone)
  local tag=$1 shape=$2 tokens=$3 t=$4 torch=--torch; shift 4
  [ -n "${NO_TORCH:-}" ] && torch=
  timeout -k 10 "$t" $MPI -np "${NP:-4}" python3 bench/nvlink_sweep.py $torch --commit "$COMMIT" \
    --problems "$shape" --tokens "$tokens" --iters 10 "$@" --out "$O/sweep_${tag}_$shape.md" \
    --json "$O/sweep_${tag}_$shape.json" > "$O/sweep_${tag}_$shape.log" 2>&1
  echo "sweep $shape rc=$?"
}
sweep_report() {  # TAG SHAPES-REGEX WIDTH: the sweeps' table rows, then their phase lines
  # (TAG may be a glob: next*)
  grep -hE "^\| ($2) " "$O"/sweep_$1_*.md | cut -d'|' -f2-8
  [ "$3" -gt 0 ] && grep -hE "^- ($2)" "$O"/sweep_$1_*.md | cut -c1-"$3"
  true
}
gpu1_lanes() {  # TIMEOUT K...: tests/test_gpu_kernels.py -k K on GPU 0, 1, ... in the
  # background (`wait`, then gpu1_report)
  local t=$1 g=0; shift
  for k in "$@"; do
    CUDA_VISIBLE_DEVICES=$g timeout -k 10 "$t" python3 -m pytest -m gpu tests/test_gpu_kernels.py \
      -q --no-header -p no:cacheprovider -k "$k" > "$O/gpu1_$g.log" 2>&1 &
    g=$((g + 1))
  done
}
gpu1_report() {
  for f in "$O"/gpu1_*.log; do echo "one GPU lane $(basename "$f" .log): $(tail -1 "$f")"; done
}
mixtral_overlap() {  # TIMEOUT: issue 12's overlap row, Mixtral T=4096 on 4 ranks with the
  # persistent default, 3 rounds (ours and PyTorch EP alternating) into $O/overlap.txt
  local d
  d=$(python3 -c "from flashmoe_gen.presets import get_preset; \
from flashmoe_gen.config import KernelConfig as K; \
print(K.persistent_default(get_preset('mixtral-8x7b').problem(world_size=4, tokens_per_rank=4096), \
'sm_90').name)")
  OVERLAP_TIMEOUT=$1 run_overlap 4 "$COMMIT" --problems mixtral_t4096 --rounds 3 \
    --config "$d" > "$O/overlap.txt" 2>&1
  tail -n 8 "$O/overlap.txt" | cut -c1-400
}
if [ "$PART" = s22 ]; then
  # Session 22 (4 GPUs came late, ~690 s left): session 21's combine and positions scan on 4
  # ranks (2 ranks and one GPU passed at 3bc4e5c), Mixtral's overlap row with the
  # persistent default over 3 alternating rounds (issue 12), issue 16's table on 4 ranks
  multigpu_k 4 "${TEST_TIMEOUT:-140}" s22 "nvlink_persistent_kernel and (seed or \
capped_skewed or dsv2lite_default_quad or fused_ws_wgmma or row_tiles_wgmma_tma_staged)"
  mixtral_overlap 190
  J_RANKS=4 NO_MIX=1 J_TIMEOUT=200 bash bench/device_next.sh "$COMMIT" j
fi
if [ "$PART" = s22b ]; then
  # On 4 ranks first, Mixtral's overlap row with the persistent default over 3 alternating
  # rounds (issue 12; bench/overlap.py takes an nvlink config since 84dde8c); then the
  # staged logits' widened regime (DeepSeek-V2-Lite's defaults now stage; S22B_E32=1: E=32
  # T=1024 too) against split_logits on NP ranks (~330 s)
  if [ "${NP:-4}" = 4 ]; then
    mixtral_overlap 170
  fi
  for a in "" --split-logits; do
    tag=st${a:+sp}
    nvl_sweep "$tag" dsv2lite 128,4096 80 $a
    [ -n "${S22B_E32:-}" ] && nvl_sweep "$tag" e32 1024 50 $a
  done
  bundle
  for t in st stsp; do echo "== $t"; sweep_report "$t" "dsv2lite|e32" 400; done
fi
if [ "$PART" = s32d ]; then
  # The new default for few local experts (defaults.FUSED_MIN_TASKS) against the old ones
  # in the same runs: the seed example T=128 (was fused; also with 128-wide down tiles, 4
  # and 6 stages) and 192 (was mma.sync rows) beside PyTorch EP; H=I=2048 E=8 T=128 (was
  # fused) ours alone; then the seed default's 4-rank test at T=128 (~250 s)
  WG=gu_bm128_bn128_bk64_w8x1_s4_wg__dn_bm128_bn
  TAIL=_bk64_w8x1_s4_wg__r8__c1__cs1__ss1__nvlink__wt__sb32__se2__ph__ts__il
  WSF=gu_bm64_bn128_bk64_w8x1_s4_ws__dn_bm64_bn128_bk64_w8x1_s4_ws__r8__c1__cs1__ss1__fs__nvlink
  NP=4 nvl_sweep v128 seed 128 90 --config "${WSF}__ks1x8__wt" --config "${WG}128$TAIL" \
    --config "${WG}128${TAIL/_s4_wg__r8/_s6_wg__r8}"
  NP=4 nvl_sweep v192 seed 192 60 \
    --config "gu_bm64_bn128_bk64_w2x4_s4__dn_bm128_bn128_bk64_w2x4_s4__r8__c1__cs1__ss1__nvlink"
  NO_TORCH=1 NP=4 nvl_sweep v128 e8 128 50 --config "${WSF}__ks1x4__wt"
  multigpu_k 4 120 s32d "nvlink_persistent_kernel and seed_default_rows"
  if [ -n "${S32D_MORE:-}" ]; then  # then, ours alone at E=64 T=16384: two row tiles per
    # task (the second's loads under the first's epilogue), and 16 vs 32 senders both orders
    NO_TORCH=1 NP=4 nvl_sweep tt e64 16384 70 --vary "tt=1,2"
    NO_TORCH=1 NP=4 nvl_sweep sba e64 16384 60 --vary "sb=16,32"
    NO_TORCH=1 NP=4 nvl_sweep sbb e64 16384 60 --vary "sb=32,16"
  fi
  bundle
  for t in v128 v192 tt sba sbb; do sweep_report "$t" "seed|e8|e64" 0; done
fi
if [ "$PART" = s34 ]; then
  # Several GPUs (S34_NP ranks, 4 unless set): the shared experts' down tiles as TMA row
  # tasks (render.SHARED_DOWN_TMA, the default since session 33, measured on one GPU only),
  # the streamed down tasks (stream_down) over per-source lists and the one list over every
  # source, first in the queue (early_down), and the shared gate/up tiles beside the send
  # blocks' front (shared_front) (session 34: one GPU only): their test cases (~380 s), then
  # the seed example T=256 over sd x ed x sf on the default's lists, both orders, beside
  # PyTorch EP (~150 s); where they pay, raise defaults.STREAM_DOWN_MAX_RANKS and
  # SHARED_FRONT_MAX_RANKS
  np=${S34_NP:-4}
  multigpu_k "$np" 400 s34 "nvlink_persistent_kernel and (dsv2lite_default_staged or \
dsv2lite_default_interleaved or row_tiles_wgmma_tma_staged or row_tiles_wgmma_tma_interleaved \
or row_tiles_wgmma_tma_stream or dsv2lite_default_stream or dsv2lite_default_shared_front)"
  NP=$np nvl_sweep sda seed 256 70 --vary "sd=0,1;ed=0,1;sf=0,1"
  NO_TORCH=1 NP=$np nvl_sweep sdb seed 256 60 --vary "sd=1,0;ed=1,0;sf=1,0"
  bundle
  for t in sda sdb; do sweep_report "$t" "seed" 0; done
fi
if [ "$PART" = s34b ]; then
  # Several GPUs: the seed example T=256 beside PyTorch EP and the shared experts' down
  # tiles by cp.async (--no-shared-tma), alternating, with the task timelines (~250 s)
  np=${S34_NP:-4}
  NP=$np nvl_sweep sh1a seed 256 70
  NO_TORCH=1 NP=$np nvl_sweep sh0a seed 256 50 --no-shared-tma
  NO_TORCH=1 NP=$np nvl_sweep sh0b seed 256 50 --no-shared-tma
  NO_TORCH=1 NP=$np nvl_sweep sh1b seed 256 50
  bundle
  for t in sh1a sh0a sh0b sh1b; do sweep_report "$t" "seed" 0; done
  grep -hE "^- " "$O"/sweep_sh*.md | sed 's/.*`: //' | grep -oE "own_tasks [0-9.]+|tasks \(the.*" | paste - - | cut -c1-330
fi
if [ "$PART" = 3 ]; then
  TUNE_TIMEOUT=${TUNE_TIMEOUT:-200} run_preset_tunes 4 "deepseek-v3 128 32" \
    "deepseek-v2-lite 512 24" "qwen3-30b-a3b 512 24" "mixtral-8x7b 4096 16"
  bundle
fi
true
