#!/usr/bin/env bash
# A one-GPU device session's checks and measurements (kind nvidia-h200 / nvidia-h100-x1,
# carry .whl): the persistent kernel on one rank (transport nvlink, world size 1: every
# expert local, the same row tasks, epilogues and router as on several ranks, no NVLink).
#   k: the one-GPU kernel tests K1 selects (-k; default: the expert GEMMs alone, the
#      nvlink one-rank cases) (~250 s)
#   ab: nvlink_sweep A/B on one rank: AB_VARY over AB_SPECS ("problems:tokens" ...), then
#      AB_VARY_REV (the same values reversed: a variant that always runs second meets a
#      warmer card), the card's SM clock, power and throttle reasons sampled every 250 ms
#      beside it (~300 s)
#   kab: k, then ab
#   c: an older commit (.old, bench/prepare_old.sh; carry .old) against this one, each's
#      persistent default on C_PROBLEMS x C_TOKENS, in the order C_SIDES ("old new new old":
#      a side that always runs second meets a warmer card) (~300 s)
# Usage: bash bench/device_x1.sh COMMIT k|ab|kab|c
# (Session 26's silu study, FLASHMOE_EXP_SILU exact / tanh / none, ran this script's
# first version on branch exp-epilogue, fa1336d.)
set -u
COMMIT=${1:-unknown}; PART=${2:-ab}
source bench/device_setup.sh
O=${OUT:-/tmp/out}; mkdir -p "$O"
MPI="mpirun --allow-run-as-root -x PYTHONUNBUFFERED=1 -x FLASHMOE_CACHE"
source bench/device_lib.sh
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$O/cards.txt"
if [ "$PART" = k ] || [ "$PART" = kab ]; then
  timeout -k 10 "${K_TIMEOUT:-300}" python3 -m pytest -m gpu tests/test_gpu_kernels.py -v \
    -k "${K1:-expert_gemm_kernels_alone or nvlink}" --no-header -p no:cacheprovider -rs \
    > "$O/gpu_k.log" 2>&1
  echo "one-GPU tests rc=$?"
  grep -E "PASSED|FAILED|ERROR|SKIPPED" "$O/gpu_k.log" | sed -E 's/^tests\/test_gpu_kernels.py:://' \
    | cut -c1-110 > "$O/gpu_k_summary.txt"
  tail -3 "$O/gpu_k.log"
fi
if [ "$PART" = ab ] || [ "$PART" = kab ]; then
  smi_sample
  # shellcheck disable=SC2086  # AB_SPECS: one spec per word
  ab_sweeps 1 "${AB_TIMEOUT:-150}" "${AB_VARY:-ts=0,1}" "${AB_VARY_REV:-ts=1,0}" \
    ${AB_SPECS:-e64:16384}
  kill $SMI
  awk -F', ' '{n++; if ($4 + 0 > p) p = $4 + 0; l = $5; r[$7]++}
    END {print n, "samples, max W", p, "limit", l; for (k in r) print "reasons", k, r[k]}' \
    "$O/smi.csv"
  # one table of every sweep's rows (the device tool brings back a limited number of files)
  for f in "$O"/sweep_ab*.md; do echo "== $(basename "$f")"; cat "$f"; done > "$O/ab_all.txt"
  rm -f "$O"/sweep_ab*.md
  bundle
  grep -hE "^\| e" "$O/ab_all.txt" | cut -d'|' -f2-10 | sed -E 's/gu_bm128[^ ]*__nvlink/D/'
  grep -hoE "^- e[0-9]+ T=[0-9]+ \`[^\`]*\`|route [0-9.]+|gate/up \([0-9]+\) [0-9. /]+|logits_us [0-9.]+, select_us [0-9.]+|SM clock [0-9.]+ GHz" \
    "$O/ab_all.txt" | sed -E 's/gu_bm128[^`]*__nvlink/D/' | paste -d' ' - - - - - | cut -c1-220
fi
if [ "$PART" = c ]; then
  python3 -m pip install -q --no-deps --no-compile --target /tmp/oldsite .old/whl/*.whl ||
    echo "no .old wheel"
  R=$PWD; OLD=$(cat .old/COMMIT 2>/dev/null); i=0
  for side in ${C_SIDES:-old new new old}; do
    i=$((i + 1))
    if [ $side = old ]; then py=/tmp/oldsite; script=$R/.old/src/bench; c=$OLD
    else py=; script=$R/bench; c=$COMMIT; fi
    # from /tmp: the checkout's own flashmoe_gen must not shadow the old wheel
    (cd /tmp && PYTHONPATH=$py FLASHMOE_CACHE=/tmp/cache_$side timeout -k 10 \
      "${C_SWEEP_TIMEOUT:-140}" $MPI -x PYTHONPATH -np 1 python3 "$script/nvlink_sweep.py" \
      --commit "$c" --problems "${C_PROBLEMS:-e64,e32,e8}" --tokens "${C_TOKENS:-4096,16384}" \
      --iters 10 --out "$O/sweep_c_$i$side.md" --json "$O/sweep_c_$i$side.json" \
      > "$O/sweep_c_$i$side.log" 2>&1)
    echo "sweep $side ($c) rc=$?"
  done
  for f in "$O"/sweep_c_*.md; do echo "== $(basename "$f")"; cat "$f"; done > "$O/c_all.txt"
  rm -f "$O"/sweep_c_*.md
  bundle
  grep -E "^== |^\| e" "$O/c_all.txt" | cut -d'|' -f2-9 | sed -E 's/gu_bm128[^ ]*__nvlink/D/'
fi
