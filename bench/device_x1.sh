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
source bench/device_lib.sh  # $O, $MPI and the helpers
cards
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
  smi_summary 1
  # one table of every sweep's rows (the device tool brings back a limited number of files)
  for f in "$O"/sweep_ab*.md; do echo "== $(basename "$f")"; cat "$f"; done > "$O/ab_all.txt"
  rm -f "$O"/sweep_ab*.md
  bundle
  grep -hE "^\| e" "$O/ab_all.txt" | cut -d'|' -f2-10 | sed -E 's/gu_bm128[^ ]*__nvlink/D/'
  grep -hoE "^- e[0-9]+ T=[0-9]+ \`[^\`]*\`|route [0-9.]+|gate/up \([0-9]+\) [0-9. /]+|logits_us [0-9.]+, select_us [0-9.]+|SM clock [0-9.]+ GHz" \
    "$O/ab_all.txt" | sed -E 's/gu_bm128[^`]*__nvlink/D/' | paste -d' ' - - - - - | cut -c1-220
fi
if [ "$PART" = c ]; then
  old_new_sweeps 1 "${C_SWEEP_TIMEOUT:-140}" "${C_SIDES:-old new new old}" \
    --problems "${C_PROBLEMS:-e64,e32,e8}" --tokens "${C_TOKENS:-4096,16384}"
  for f in "$O"/sweep_c_*.md; do echo "== $(basename "$f")"; cat "$f"; done > "$O/c_all.txt"
  rm -f "$O"/sweep_c_*.md
  bundle
  grep -E "^== |^\| e" "$O/c_all.txt" | cut -d'|' -f2-9 | sed -E 's/gu_bm128[^ ]*__nvlink/D/'
fi
