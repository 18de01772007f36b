#!/usr/bin/env bash
# The next 4-GPU device session (nvidia-h100-x4, carry .whl): the checks and the numbers the
# open issues ask for on 4 GPUs, in three calls. Logs under $OUT, summaries last.
#   1: the whole one-GPU suite in three lanes (device_final.sh gpu4), then the 4-rank
#      ws/tma/nvlink/graph tests with a log per rank (~550 s)
#   2: issue 15/16/12 numbers: the decode table on 4 ranks with nvlink, 8 forwards back to
#      back (seed, DeepSeek-V2-Lite, DeepSeek-V3-like; T=256 too: the seed example's count); the overlap table (seed T=256,
#      DeepSeek-V2-Lite T=512, Mixtral T=4096); FlashDMoE's setting (E=64) with nvlink on 2
#      then 4 ranks in the same call, for weak scaling (~540 s)
#   3: issue 13: preset tunes on 4 ranks, tuned vs the heuristic default, DeepSeek-V3 T=128
#      with 32 trials (first trial <= 30 s, 32 trials <= 5 min) (~540 s)
#   k: where the large-batch forwards' GPU time goes, kernel by kernel (bench/kernel_breakdown.py,
#      torch.profiler): Mixtral T=4096 and H=I=2048 E=64 T=4096 on 4 ranks, the whole forward
#      and its compute alone (Mixtral's compute took 5.70 ms where its GEMMs alone run
#      4.06 ms on 1 x H200) (~200 s)
#   n: where Mixtral T=4096's 1.7 ms above its GEMMs goes (issue 12, <= 0.8x PyTorch EP needs
#      <= ~5.0 ms; session 13: fused sources 5.81 ms, per-source 5.93, compute alone 5.85):
#      on 1 GPU the expert GEMMs alone at the 4-rank layer's per-rank shapes (one fused
#      launch: 2 experts x 4096 rows; one per-source launch: 2 x 1024) beside torch, then on
#      4 ranks the kernel breakdown of the fused-sources config and of the default (~300 s)
#   6: session 12's follow-up (4 GPUs, ~520 s): nvlink config sweeps with PyTorch EP in the
#      same run (seed T=1 over gate/up K splits and blocks per SM; DeepSeek-V3-like T=128 over
#      stages and TMA weight loads), the overlap table with the comm_sms 8 default (Mixtral
#      T=4096 against PyTorch EP), and fused_ws_tma alone on 4 ranks (cut at 240 s before)
#   p: the new large-batch defaults (tma down 256; fused sources + own_split on several ranks;
#      the persistent default's wgmma rows): the 2-rank shape, tma and graph tests on them,
#      the overlap table (seed, DeepSeek-V2-Lite T=4096, Mixtral T=4096) against PyTorch EP,
#      then E=64 T=16384 on 4 ranks with the nvlink default beside (~500 s)
#   r: Mixtral T=4096's two measures (issue 12): session 16 timed the gathered default at
#      5.33-5.55 ms by `flashmoe-tune run` and 6.39 (p20-p80 5.98-6.74) in the overlap bench
#      on one machine; here tune run, the overlap row with 3 rounds (ours and PyTorch EP
#      back to back, alternating which goes first), tune run again, then the kernel
#      breakdown of the default in host and in graph mode, with how long the GPU idles per
#      forward (~450 s)
#   j: Mixtral T=4096 on 4 ranks with the task-loop clocks (issue 12's <= 0.8x: 0.869x at
#      b017160), then issue 16's table over FlashDMoE's whole setting: H=I=2048 k=2, E = 8, 32, 64 at
#      T=1024 and 16384 per GPU, on 2 then 4 ranks of one machine: nccl (host and graph),
#      nvlink, PyTorch EP and the floor, same run, with the plot (scaling.py --plot on the
#      development machine: the device returns few files) (~560 s)
#   v: session 19's changes not yet run on a GPU: each tensor map acquired once per launch
#      (every ws_tma config), the task-loop clocks per GEMM and in grid barriers. The 4-rank
#      cases over TMA rows, the staged default and fused TMA weights; then E=64 T=4096/16384
#      and Mixtral T=4096 with the defaults beside PyTorch EP (session 19, 44b77eb: 0.716 /
#      2.061 / 5.431 ms), the phase lines saying per GEMM where a tile's prologue and
#      epilogue go and how long blocks wait in the route's barrier (~480 s)
#   w: E=64 T=16384 over the down tile's width (128 / 256: is the k-loop L2-bound?) and 32 /
#      64 senders, with the per-GEMM clocks; T=1024 on 4 ranks at E=32 and 8 over phased
#      task lists (not yet run), E=32 also beside fused 64/128-token weight-streaming tasks
#      (~380 s)
#   g: gate and up in one m64n256 wgmma (default) against two m64n128 (split_gated_mma):
#      one-GPU Hopper kernel cases and 4-rank TMA row cases, then E=64 T=16384 and Mixtral
#      T=4096 both ways (~480 s)
#   h: phased task lists (the new default) at E=64 T=4096/16384 and Mixtral T=4096 both
#      ways, then issue 16's table on 4 ranks (part j, J_RANKS=4 NO_MIX=1) (~450 s)
#   next: session 20's changes not yet run on a GPU (SiLU's approximate divide, the
#      router's clocks, weight-streaming tasks on warpgroup MMAs): one-GPU gated kernel
#      cases, 4-rank defaults and ws_wgmma cases, then E=64 / E=32 T=1024: the defaults
#      beside phased wgmma row tasks and fused ws_wgmma tasks (~400 s)
#   next2: E=64 T=4096/16384 and Mixtral T=4096 with the router's logits / choices and
#      the gate/up epilogue after SiLU's approximate divide (~150 s)
#   wsg: fused ws_wgmma tasks the default from 96 rows per expert: every 4-rank sweep shape
#      whose default changed (E=64 T=1024, E=32 T=512, DeepSeek-V2-Lite T=256/320,
#      DeepSeek-V3-like T=1024), new default beside the old (~330 s)
#   rs: the router's staged logits: one-GPU and 4-rank cases, E=64 T=4096/16384 staged /
#      split_logits / staged in one run (~330 s)
#   fin: DeepSeek-V2-Lite's fused cases on 4 and 2 ranks, Mixtral T=4096, issue 16's table
#      on 4 ranks (~330 s)
#   n22: session 21's combine (loads before stores) and positions scan: E=64 T=4096/16384,
#      Mixtral T=4096, the
#      Mixtral overlap row (issue 12) (~330 s; after part 1)
#   s22: the 4-rank tests of the combine and positions scan, Mixtral's overlap row (3
#      rounds), issue 16's table on 4 ranks (~540 s)
#   s22b: the staged logits' widened regime (DeepSeek-V2-Lite T=128/4096, E=32 T=1024)
#      against split_logits on NP ranks (4), then Mixtral's overlap row on 4 (~330 s)
#   rs2: the staged router logits beyond the measured regime (STAGED_ALL, not yet run on a
#      GPU): one-GPU cases, then E=8 / E=32 T=16384, Mixtral T=4096, E=64 T=1024 with and
#      without (~300 s)
#   (done and measured: parts i, l, s, t (session 19: bench/results/
#   2026-11-27_gpu_checks_session19.md), b, d, e, f, g (session 18: bench/results/
#   2026-11-27_gpu_checks_session18.md), 4, 5, a, h, m, o, q, s, t, v, w, x, y, z (sessions 14-16), u
#   (its stages, with and without TMA rows: device_x2.sh part r, session 17); their
#   commands are in the git history and named by the bench/results files of the sessions that
#   ran them)
# Usage: bash bench/device_next.sh COMMIT 1|2|3|6|g|h|j|k|n|fin|n22|next|next2|p|r|rs|rs2|s22|s22b|v|w|wsg
# (COMMIT literally: the device's git metadata may lag the working tree it runs)
set -u
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
if [ "$PART" = 6 ]; then
  sweep() {  # TAG TIMEOUT ARGS...
    local tag=$1 t=$2; shift 2
    timeout -k 10 "$t" $MPI -np 4 python3 bench/nvlink_sweep.py --torch --commit "$COMMIT" \
      "$@" --out "$O/sweep_$tag.md" --json "$O/sweep_$tag.json" > "$O/sweep_$tag.log" 2>&1
    echo "sweep $tag rc=$?"
  }
  sweep seed 100 --problems seed --tokens 1 --vary "ks=1x8,2x8,4x8;b=0,1"
  sweep dsv3 200 --problems dsv3 --tokens 128 --vary "gu_s=4,6;dn_s=4,6;wt=0,1"
  if [ -z "${NO_OVERLAP:-}" ]; then
    OVERLAP_TIMEOUT=150 run_overlap 4 "$COMMIT" --problems seed,dsv2lite_t512,mixtral_t4096 \
      > "$O/overlap.txt" 2>&1
  fi
  # fused_ws_tma never finished on 4 ranks: every rank's Python stack after 60 s says where
  FLASHMOE_COMM_TIMEOUT=20 timeout -k 10 ${MULTI_TIMEOUT:-90} $MPI -x FLASHMOE_COMM_TIMEOUT -np 4 \
    python3 -m pytest -m multigpu tests/test_multigpu.py -v --no-header -p no:cacheprovider \
    -k "fused_ws_tma" --durations=5 -o faulthandler_timeout=60 > "$O/multigpu_wt.log" 2>&1
  echo "fused_ws_tma 4 ranks rc=$?"
  sed 's/\x1b\[[0-9;]*m//g' "$O/multigpu_wt.log" | grep -E "passed|failed|FAILED|s call" | sort -u | head -6
  rm -f "$O"/*.png; bundle
  tail -n 12 "$O/overlap.txt" 2>/dev/null | cut -c1-200
  grep -hE "^\| (seed|dsv3) " "$O"/sweep_*.md | cut -d'|' -f3-9
fi
if [ "$PART" = k ]; then
  timeout -k 10 ${KB_TIMEOUT:-240} $MPI -np 4 python3 bench/kernel_breakdown.py \
    --problems mixtral_t4096,flashdmoe_e64_t4096 --commit "$COMMIT" --out "$O/kb.md" \
    --json "$O/kb.json" > "$O/kb.log" 2>&1
  echo "kernel breakdown rc=$?"; bundle
  grep -E "^### |^\| [^-k]" "$O/kb.md" 2>/dev/null | cut -c1-150 | head -60 || tail -20 "$O/kb.log"
fi
if [ "$PART" = p ]; then
  multigpu_k 2 280 defaults "test_shapes or tma_kernel_sources or graph_mode_matches"
  OVERLAP_TIMEOUT=210 run_overlap 4 "$COMMIT" --problems seed,dsv2lite_t4096,mixtral_t4096 \
    > "$O/overlap.txt" 2>&1
  timeout -k 10 100 $MPI -np 4 python3 bench/scaling.py --experts 64 --tokens 16384 --nvlink \
    --commit "$COMMIT" --json "$O/scaling.json" --out "$O/scaling_p4" > "$O/scaling_p4.log" 2>&1
  echo "scaling 4 ranks rc=$?"
  rm -f "$O"/*.png
  python3 -c "import json; [print(r['tokens_per_gpu'], 'floor', r['floor_ms'], 'torch', \
r['torch_ep_ms'], 'nccl', r['ours_ms'], r['config'], 'nvlink', r.get('ours_nvlink_ms'), \
r.get('config_nvlink')) for r in json.load(open('$O/scaling.json'))]"
  bundle
  grep -E "^\| moe" "$O/overlap.txt" | cut -d'|' -f2-9,11-14
fi
if [ "$PART" = r ]; then
  d=$(python3 -c "from flashmoe_gen.presets import get_preset; \
from flashmoe_gen.config import KernelConfig as K; \
print(K.default(get_preset('mixtral-8x7b').problem(world_size=4, tokens_per_rank=4096), 'sm_90').name)")
  tune_row "r1_mixtral_default" "$d" --model mixtral-8x7b --tokens 4096
  OVERLAP_TIMEOUT=300 run_overlap 4 "$COMMIT" --problems mixtral_t4096 --rounds 3 \
    > "$O/overlap.txt" 2>&1
  tune_row "r2_mixtral_default" "$d" --model mixtral-8x7b --tokens 4096
  for m in host graph; do
    timeout -k 10 120 $MPI -np 4 python3 bench/kernel_breakdown.py --problems mixtral_t4096 \
      --mode $m --commit "$COMMIT" --out "$O/kb_$m.md" --json "$O/kb_$m.json" \
      > "$O/kb_$m.log" 2>&1
    echo "kernel breakdown ($m) rc=$?"
  done
  bundle
  grep -E "^\| moe|^- moe" "$O/overlap.txt" | cut -c1-200
  for m in host graph; do
    grep -E "^### |^\| [^-k]" "$O/kb_$m.md" 2>/dev/null | cut -c1-200 | head -12 || tail -5 "$O/kb_$m.log"
  done
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
    timeout -k 10 "${J_TIMEOUT:-200}" $MPI -np $p python3 bench/scaling.py --experts 8,32,64 \
      --tokens 1024,16384 --nvlink --commit "$COMMIT" --json "$O/scaling.json" \
      --out "$O/scaling_p$p" > "$O/scaling_p$p.log" 2>&1
    echo "scaling $p ranks rc=$?"
  done
  rm -f "$O"/*.png; cp "$O/scaling.json" "$O/scaling_json.txt" 2>/dev/null; bundle
  python3 -c "import json; [print(r['gpus'], r['experts'], r['tokens_per_gpu'], 'floor', \
r['floor_ms'], 'torch', r['torch_ep_ms'], 'nccl', r['ours_ms'], 'graph', r.get('ours_graph_ms'), \
'nvlink', r.get('ours_nvlink_ms'), r.get('speedup_nvlink')) \
for r in json.load(open('$O/scaling_json.txt'))]"
fi
nvl_sweep() {  # TAG SHAPE TOKENS TIMEOUT [nvlink_sweep ARGS...]: one sweep on NP ranks (4)
  # beside PyTorch EP into $O/sweep_TAG_SHAPE.{md,json,log}
  local tag=$1 shape=$2 tokens=$3 t=$4; shift 4
  timeout -k 10 "$t" $MPI -np "${NP:-4}" python3 bench/nvlink_sweep.py --torch --commit "$COMMIT" \
    --problems "$shape" --tokens "$tokens" --iters 10 "$@" --out "$O/sweep_${tag}_$shape.md" \
    --json "$O/sweep_${tag}_$shape.json" > "$O/sweep_${tag}_$shape.log" 2>&1
  echo "sweep $shape rc=$?"
}
sweep_report() {  # TAG SHAPES-REGEX WIDTH: the sweeps' table rows, then their phase lines
  # (TAG may be a glob: next*)
  grep -hE "^\| ($2) " "$O"/sweep_$1_*.md | cut -d'|' -f2-8
  grep -hE "^- ($2)" "$O"/sweep_$1_*.md | cut -c1-"$3"
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
if [ "$PART" = v ]; then
  multigpu_k 4 "${TEST_TIMEOUT:-240}" v "nvlink_persistent_kernel and \
(row_tiles_wgmma_tma_staged or default_staged or default_fused or fused_ws_tma or \
wgmma_tma_graph or phased)"
  nvl_sweep v e64 4096,16384 130
  nvl_sweep v mixtral 4096 110
  bundle
  sweep_report v "e64|mixtral" 700
fi
if [ "$PART" = w ]; then
  # Is the row tiles' k-loop (~83% of peak at E=64) bound by L2 bandwidth? A 128 x 256 down
  # tile reads 48 KB per 4.2-MFLOP k-tile (~11 TB/s over 132 SMs at the dense peak); a
  # 128 x 128 one reads 32 KB per 2.1 MFLOP: if the loop's us per MFLOP rises with it, L2
  # it is (then TMA multicast in 2-CTA clusters). And 64 senders beside 32 (the dispatch
  # took ~320 us at T=16384, ~314 GB/s of NVLink's ~357 measured)
  # Then T=1024 on 4 ranks, where down tasks waited 17-22 us per block on their gate/up
  # tiles (E=8, 32): phased task lists (every source's gate/up first) 0/1; E=32 (64 rows
  # per source and expert: half-empty wgmma row tiles, 2.87x PyTorch EP where issue 16 asks
  # 3x) also beside every source fused into 64- and 128-token weight-streaming tasks (256
  # rows per expert, past PERSISTENT_WS_MAX_ROWS)
  WS=_bk64_w8x1_s4_ws; FS=__r8__c1__cs1__ss1__fs__nvlink__wt
  nvl_sweep w e64 16384 200 --vary "dn_bn=128,256;sb=32,64"
  nvl_sweep w e32 1024 100 --vary "ph=0,1" \
    --config "gu_bm64_bn128${WS}__dn_bm64_bn128${WS}${FS}" \
    --config "gu_bm128_bn128${WS}__dn_bm128_bn128${WS}${FS}"
  nvl_sweep w e8 1024 70 --vary "ph=0,1"
  # Mixtral's 164-us down tasks (K = 14336) end in a ragged last wave: half-width ones
  nvl_sweep w mixtral 4096 150 --vary "dn_bn=128,256"
  bundle
  sweep_report w "e64|e32|e8|mixtral" 700
fi
if [ "$PART" = g ]; then
  # Gate and up in one m64n256 wgmma (the default) or two m64n128 (split_gated_mma, as
  # before): the one-GPU Hopper kernels' cases (wgmma and tma tiles, both ways) beside the
  # 4-rank TMA row cases, then E=64 T=16384 and Mixtral T=4096 both ways in one run (the
  # two-MMA gate/up k-loop ran at 86% of the clock's peak, the one-MMA down loop at 98%)
  gpu1_lanes 240 "tile_configs and (wgmma or tma)" "split_gated or kernels_alone" \
    "tma_kernel_persistent_loop or nvlink_persistent_kernel_one_rank"
  multigpu_k 4 "${TEST_TIMEOUT:-240}" g "nvlink_persistent_kernel and \
(row_tiles_wgmma_tma_staged or dsv2lite_wgmma_tma_graph or dsv2lite_default_staged)"
  wait; gpu1_report
  nvl_sweep g e64 16384 150 --vary "g2=0,1"
  nvl_sweep g mixtral 4096 220 --vary "g2=0,1"
  bundle
  sweep_report g "e64|mixtral" 800
fi
if [ "$PART" = h ]; then
  # Phased task lists (the default on several ranks since they won at T=1024, E=8 and 32)
  # at the large batches: E=64 T=4096/16384 and Mixtral T=4096 both ways in one run; then
  # issue 16's table on 4 ranks with the defaults (one MMA for gate and up, phased lists)
  nvl_sweep h e64 4096,16384 150 --vary "ph=0,1"
  nvl_sweep h mixtral 4096 150 --vary "ph=0,1"
  sweep_report h "e64|mixtral" 800
  J_RANKS=4 NO_MIX=1 bash bench/device_next.sh "$COMMIT" j
fi
if [ "$PART" = next ]; then
  # Session 20's changes not yet run on a GPU: SiLU's approximate divide in every gated
  # epilogue (59ceb57), the router's own clocks (09e2bb2), weight-streaming tasks on
  # warpgroup MMAs (ws_wgmma, 4522a5d). One-GPU gated kernel cases (mma.sync, wgmma, tma,
  # weight streaming, ws_wgmma on one rank) beside the 4-rank defaults and ws_wgmma cases;
  # then E=64 T=1024 (issue 16's 3x: 2.56x): the fused weight-streaming default beside
  # wgmma row tasks, which lost there in session 18 (0.501 vs 0.401 ms) before phased
  # lists, the staged epilogue and one gated MMA (E=32 T=1024: phased rows 0.275 vs fused
  # 0.369), and fused 128-token ws_wgmma tasks (the mma.sync ones ran at ~155 TFLOP/s
  # there), down 128 and 256 wide; E=32 T=1024 (256 rows per expert, two passes) the same
  # beside its phased row default (~400 s)
  gpu1_lanes 300 "tile_configs" "split_gated or kernels_alone or weight_streaming_rows" \
    "tma_kernel_persistent_loop or nvlink_persistent_kernel_one_rank or world_size_1 or \
ws_wgmma"
  multigpu_k 4 "${TEST_TIMEOUT:-300}" next "nvlink_persistent_kernel and \
(row_tiles_wgmma_tma_staged or dsv2lite_default_staged or dsv2lite_default_fused or fused_ws_tma \
or ws_wgmma)"
  wait; gpu1_report
  ws_tiles=gu_bm128_bn128_bk64_w8x1_s4_ws__dn_bm128_bn
  fused_wsg=_bk64_w8x1_s4_ws__r8__c1__cs1__ss1__fs__nvlink__wt__wsg
  nvl_sweep next e64 1024 120 --config "gu_bm128_bn128_bk64_w8x1_s4_wg__dn_bm128_bn256_bk64\
_w8x1_s4_wg__r8__c1__cs1__ss1__nvlink__wt__sb32__se1__ph" \
    --config "${ws_tiles}128$fused_wsg" --config "${ws_tiles}256$fused_wsg"
  nvl_sweep next e32 1024 90 --config "${ws_tiles}256$fused_wsg"
  bundle
  sweep_report next "e64|e32" 900
fi
if [ "$PART" = wsg ]; then
  # Fused weight-streaming tasks on warpgroup MMAs (ws_wgmma) the default from 96 rows per
  # expert on Hopper (E=64 T=1024: 0.3933 -> 0.2823 ms in part next): every 4-rank shape of
  # the sweeps whose default it changed, new default beside the old (64-token mma.sync
  # tiles), with the NCCL path's error (~330 s)
  OLD=gu_bm64_bn128_bk64_w8x1_s4_ws__dn_bm64_bn128_bk64_w8x1_s4_ws__r8__c1__cs1__ss1__fs__nvlink__wt
  nvl_sweep wsg e64 1024 80 --config "$OLD"
  nvl_sweep wsg e32 512 80 --config "$OLD"
  nvl_sweep wsg dsv2lite 256,320 110 --config "$OLD"
  nvl_sweep wsg dsv3 1024 150 --config "$OLD"
  bundle
  sweep_report wsg "e64|e32|dsv2lite|dsv3" 600
fi
if [ "$PART" = rs ]; then
  # The router's staged logits (flashmoe_gen.router_staged: a call's token rows and the
  # gate weights through a cp.async ring, whole units per warp; split_logits' logits took
  # 131 of the 153-us route phase at E=64 T=16384): the one-GPU case, the 4-rank quad-batch
  # case (shared experts) beside the TMA row and ws_wgmma defaults, then E=64 T=4096/16384
  # staged, split_logits, staged again (an A/B in one run: --split-logits) (~330 s)
  gpu1_lanes 200 "staged_router or nvlink_persistent_kernel_one_rank or ws_wgmma"
  multigpu_k 4 240 rs "nvlink_persistent_kernel and (dsv2lite_default_quad_batches or \
row_tiles_wgmma_tma_staged or fused_ws_wgmma)"
  wait; gpu1_report
  nvl_sweep rs1 e64 4096,16384 120
  nvl_sweep rs0 e64 4096,16384 120 --split-logits
  nvl_sweep rs2 e64 4096,16384 120
  bundle
  for t in rs1 rs0 rs2; do echo "$t"; sweep_report "$t" e64 900; done
fi
if [ "$PART" = fin ]; then
  # The DeepSeek-V2-Lite fused cases against the new defaults (4 ranks: 112 rows per expert,
  # ws_wgmma; 2 ranks: 56, 64-token tasks), Mixtral T=4096 beside PyTorch EP once more
  # (issue 12) with one and two row tiles per task, then issue 16's table on 4 ranks with the staged router (~330 s)
  multigpu_k 4 200 fin4 "nvlink_persistent_kernel and dsv2lite and fused"
  multigpu_k 2 150 fin2 "nvlink_persistent_kernel and dsv2lite and fused"
  # (two row tiles per task: the second tile's first loads fly during the first's
  # epilogue; lost at E=64, never run on Mixtral, whose gate/up tiles spend ~5 of 53 us
  # outside their k-loop)
  nvl_sweep fin mixtral 4096 160 --vary "tt=1,2"
  sweep_report fin mixtral 900
  J_RANKS=4 NO_MIX=1 bash bench/device_next.sh "$COMMIT" j
fi
if [ "$PART" = rs2 ]; then
  # The staged router logits beyond the measured regime (router_staged.STAGED_ALL: k lanes
  # adding in turn, 8-expert units, 8-token calls; landed in session 21, not yet run on a
  # GPU): the one-GPU cases (E=8 with shared experts, E=32, E=128), then default /
  # --staged-all / default where the route phase is long: E=8 and E=32 T=16384 (route 148
  # and 95 us in session 19, FMA and split_logits), Mixtral T=4096 (60 us, FMA), E=64
  # T=1024 (8-token calls) (~300 s)
  gpu1_lanes 200 "staged_router"
  wait; gpu1_report
  for s in "e8 16384" "e32 16384" "mixtral 4096" "e64 1024"; do
    set -- $s
    nvl_sweep rsa0 "$1" "$2" 100
    nvl_sweep rsb "$1" "$2" 100 --staged-all
  done
  bundle
  for t in rsa0 rsb; do echo "$t"; sweep_report "$t" "e8|e32|mixtral|e64" 700; done
fi
if [ "$PART" = n22 ]; then
  # Session 21's untested combine (every row's loads for 4 vectors per lane before a store;
  # session 21's combine phase: 62-63 us at E=64 T=16384, 14 at T=4096, 27 on Mixtral) and
  # positions scan (8 tokens per thread; the phase: 27 / 7.4 / 8.2 us):
  # E=64 T=4096/16384 and Mixtral T=4096 beside PyTorch EP, then issue 12's Mixtral row of
  # the overlap table (3 rounds, ours and PyTorch EP alternating) (~330 s). Run part 1 (the
  # one-GPU suite and the 4-rank tests) first: the combine is in every forward
  nvl_sweep n22 e64 4096,16384 130
  nvl_sweep n22 mixtral 4096 110
  sweep_report n22 "e64|mixtral" 900
  d=$(python3 -c "from flashmoe_gen.presets import get_preset; \
from flashmoe_gen.config import KernelConfig as K; \
print(K.persistent_default(get_preset('mixtral-8x7b').problem(world_size=4, tokens_per_rank=4096), \
'sm_90').name)")
  OVERLAP_TIMEOUT=200 run_overlap 4 "$COMMIT" --problems mixtral_t4096 --rounds 3 \
    --config "$d" > "$O/overlap.txt" 2>&1
  bundle
  tail -n 12 "$O/overlap.txt" | cut -c1-220
fi
if [ "$PART" = s22 ]; then
  # Session 22 (4 GPUs came late, ~690 s left): session 21's combine and positions scan on 4
  # ranks (2 ranks and one GPU passed at 3bc4e5c), Mixtral's overlap row with the
  # persistent default over 3 alternating rounds (issue 12), issue 16's table on 4 ranks
  multigpu_k 4 "${TEST_TIMEOUT:-140}" s22 "nvlink_persistent_kernel and (seed or \
capped_skewed or dsv2lite_default_quad or fused_ws_wgmma or row_tiles_wgmma_tma_staged)"
  d=$(python3 -c "from flashmoe_gen.presets import get_preset; \
from flashmoe_gen.config import KernelConfig as K; \
print(K.persistent_default(get_preset('mixtral-8x7b').problem(world_size=4, tokens_per_rank=4096), \
'sm_90').name)")
  OVERLAP_TIMEOUT=190 run_overlap 4 "$COMMIT" --problems mixtral_t4096 --rounds 3 \
    --config "$d" > "$O/overlap.txt" 2>&1
  tail -n 12 "$O/overlap.txt" | cut -c1-220
  J_RANKS=4 NO_MIX=1 J_TIMEOUT=200 bash bench/device_next.sh "$COMMIT" j
fi
if [ "$PART" = s22b ]; then
  # The staged logits' widened regime (E=32, 8-token calls: DeepSeek-V2-Lite's defaults
  # now stage) against split_logits on NP ranks, then, on 4, Mixtral's overlap row with
  # the persistent default over 3 alternating rounds (issue 12; bench/overlap.py takes an
  # nvlink config since 84dde8c) (~330 s)
  for a in "" --split-logits; do
    tag=st${a:+sp}
    nvl_sweep "$tag" dsv2lite 128,4096 90 $a
    nvl_sweep "$tag" e32 1024 50 $a
  done
  if [ "${NP:-4}" = 4 ]; then
    d=$(python3 -c "from flashmoe_gen.presets import get_preset; \
from flashmoe_gen.config import KernelConfig as K; \
print(K.persistent_default(get_preset('mixtral-8x7b').problem(world_size=4, tokens_per_rank=4096), \
'sm_90').name)")
    OVERLAP_TIMEOUT=170 run_overlap 4 "$COMMIT" --problems mixtral_t4096 --rounds 3 \
      --config "$d" > "$O/overlap.txt" 2>&1
  fi
  bundle
  for t in st stsp; do echo "== $t"; sweep_report "$t" "dsv2lite|e32" 400; done
  tail -n 8 "$O/overlap.txt" 2>/dev/null | cut -c1-400
fi
if [ "$PART" = next2 ]; then
  # ... and E=64 T=4096/16384 and Mixtral T=4096 beside PyTorch EP (session 20, 79a9dda:
  # 0.700 / 2.023 / 5.220 ms; gate/up epilogue 5.3-5.5 us per E=64 tile, 6.2 on Mixtral)
  # with the router's logits / choices per block (the route phase: 150 us at T=16384)
  nvl_sweep next2 e64 4096,16384 150
  nvl_sweep next2 mixtral 4096 150
  bundle
  sweep_report next2 "e64|mixtral" 900
fi
if [ "$PART" = n ]; then
  CUDA_VISIBLE_DEVICES=0 timeout -k 10 150 python3 bench/gemm_bench.py --commit "$COMMIT" \
    --cases mixtral_t4096,mixtral_p4_fused,mixtral_p4_source --out "$O/gemm_mixtral.md" \
    --json "$O/gemm_mixtral.json" > "$O/gemm_mixtral.log" 2>&1
  echo "gemm bench rc=$?"
  for v in fused default; do
    cfg=(); [ $v = fused ] && cfg=(--config "${TMA128}__r8__c1__cs1__ss1__fs__pk")
    timeout -k 10 120 $MPI -np 4 python3 bench/kernel_breakdown.py --problems mixtral_t4096 \
      "${cfg[@]}" --commit "$COMMIT" --out "$O/kb_$v.md" --json "$O/kb_$v.json" > "$O/kb_$v.log" 2>&1
    echo "kernel breakdown $v rc=$?"
  done
  bundle
  grep -E "^\| mixtral" "$O/gemm_mixtral.md" | cut -c1-220
  grep -hE "^### |expert_gemm|SendRecv|AllGather" "$O"/kb_*.md | cut -c1-120
fi
if [ "$PART" = 3 ]; then
  TUNE_TIMEOUT=${TUNE_TIMEOUT:-200} run_preset_tunes 4 "deepseek-v3 128 32" \
    "deepseek-v2-lite 512 24" "qwen3-30b-a3b 512 24" "mixtral-8x7b 4096 16"
  bundle
fi
true
