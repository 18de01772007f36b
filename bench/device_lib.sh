#!/usr/bin/env bash
# Shared steps of the device scripts (source after bench/device_setup.sh). $O (the output
# folder) and $MPI (mpirun with NVLink multicast off) default here when the script set none.
O=${O:-${OUT:-/tmp/out}}; mkdir -p "$O"
MPI=${MPI:-"mpirun --allow-run-as-root -x NCCL_NVLS_ENABLE=0 -x PYTHONUNBUFFERED=1 -x FLASHMOE_CACHE"}
cards() {  # the GPUs this call got, into the output and $O/cards.txt (results name the card)
  nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$O/cards.txt"
}
run_multigpu() {  # P
  timeout 420 $MPI -np "$1" python3 -m pytest -m multigpu tests/test_multigpu.py -q \
    --no-header -p no:cacheprovider > "$O/multigpu_$1.log" 2>&1
  echo "multigpu $1 ranks rc=$?"; grep -E "passed|failed|FAILED" "$O/multigpu_$1.log" | tail -8
}
multigpu_k() {  # P TIMEOUT TAG K-EXPRESSION: the multigpu tests -k selects on P ranks;
  # per-test verdicts (every rank) and the summary line, log in $O/multigpu_TAG.log
  local p=$1 t=$2 tag=$3 k=$4
  FLASHMOE_COMM_TIMEOUT=20 timeout -k 10 "$t" $MPI -x FLASHMOE_COMM_TIMEOUT -np "$p" python3 \
    -m pytest -m multigpu tests/test_multigpu.py -v --no-header -p no:cacheprovider -k "$k" \
    > "$O/multigpu_$tag.log" 2>&1
  echo "multigpu $p ranks ($k) rc=$?"
  sed 's/\x1b\[[0-9;]*m//g' "$O/multigpu_$tag.log" |
    grep -oE "test_\w+(\[[^]]*\])? (PASSED|FAILED|ERROR)|[0-9]+ (passed|failed).*" | sort | uniq -c
}
tune_row() {  # LABEL CONFIG PROBLEM-ARGS...: one config on 4 ranks by `flashmoe-tune run`
  # (checked against the reference, then timed); one line: label, rc, median, max rel err
  local label=$1 cfg=$2; shift 2
  timeout -k 5 75 $MPI -np 4 flashmoe-tune run --gpus 4 --config "$cfg" --iters 20 "$@" \
    > "$O/$label.log" 2>&1
  echo "$label rc=$? $(sed 's/\x1b\[[0-9;]*m//g' "$O/$label.log" |
    grep -oE "median [0-9.]+ ms|max rel err [0-9.e-]+|FAIL[A-Z]*|Error.*" | tr '\n' ' ')"
}
run_overlap() {  # P COMMIT (may be empty) [more bench/overlap.py arguments]
  local p=$1 commit=$2; shift 2
  timeout -k 10 "${OVERLAP_TIMEOUT:-400}" $MPI -np "$p" python3 bench/overlap.py ${commit:+--commit "$commit"} "$@" \
    --out "$O/overlap_$p.md" --json "$O/overlap_$p.json" > "$O/overlap_$p.log" 2>&1
  echo "overlap rc=$?"; cat "$O/overlap_$p.md" 2>/dev/null || tail -20 "$O/overlap_$p.log"
}
run_decode() {  # P COMMIT (may be empty) [more bench/decode.py arguments]; table printed last
  local p=$1 commit=$2; shift 2
  local stem="$O/decode_p$p${DECODE_TAG:+_$DECODE_TAG}"
  timeout -k 20 "${DECODE_TIMEOUT:-540}" $MPI -np "$p" python3 bench/decode.py \
    ${commit:+--commit "$commit"} "$@" --out "$stem.md" --json "$stem.json" --plot "$stem.png" \
    > "$stem.log" 2>&1
  local rc=$?
  echo "decode $p ranks rc=$rc"; grep -E "skipped|failed|Error" "$stem.log" | tail -6
  if [ "$rc" != 0 ] && [ -s "$stem.json" ]; then  # cut short: report the rows it finished
    python3 bench/decode.py --from-json "$stem.json" --out "$stem.md" --plot "$stem.png" \
      > /dev/null 2>&1 && echo "(partial: rows finished before rc=$rc)"
  fi
  cat "$stem.md" 2>/dev/null || tail -30 "$stem.log"
}
run_preset_tunes() {  # GPUS "MODEL TOKENS TRIALS"...: each preset tuned, summary lines after each
  local gpus=$1; shift
  export FLASHMOE_DB="sqlite:///$O/winners.db" FLASHMOE_STUDIES="sqlite:///$O/studies.db"
  local m S
  for m in "$@"; do
    set -- $m
    S=$(date +%s)
    timeout -k 10 "${TUNE_TIMEOUT:-120}" flashmoe-tune tune --gpus "$gpus" --model "$1" \
      --tokens "$2" --trials "$3" > "$O/tune_$1.log" 2>&1
    echo "tune $1 T=$2 rc=$? $(( $(date +%s) - S )) s"
    sed 's/\x1b\[[0-9;]*m//g' "$O/tune_$1.log" | cut -c1-160 |
      grep -E "heuristic default|trial 1/.* done|ok, .* failed|winner stored"
  done
}
weak_scaling() {  # COMMIT TIMEOUT: H=I=2048 E=64 with nvlink at T=1024/16384 per GPU on 2
  # then 4 ranks of one machine (the same tokens per GPU); rows appended to $O/scaling.json
  local commit=$1 t=$2 p
  for p in 2 4; do
    timeout -k 10 "$t" $MPI -np $p python3 bench/scaling.py --experts 64 --tokens 1024,16384 \
      --nvlink --commit "$commit" --json "$O/scaling.json" --out "$O/scaling_p$p" \
      > "$O/scaling_p$p.log" 2>&1
    echo "scaling $p ranks rc=$?"
  done
}
kernel_test_ids() {  # the one-GPU kernel tests' ids into $O/kernels_ids.txt (suite_half)
  python3 -m pytest -m gpu tests/test_gpu_kernels.py --collect-only -q -p no:cacheprovider \
    2>/dev/null | grep "::" > "$O/kernels_ids.txt"
}
suite_half() {  # N GPU FILES...: every other kernel test id from N, then FILES, on GPU,
  # one log ($O/gpu_halfN.log) and its rc ($O/gpu_halfN.rc); LANE_TIMEOUT bounds it
  local n=$1 gpu=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpu timeout -k 10 "${LANE_TIMEOUT:-270}" python3 -m pytest -m gpu \
    $(awk -v n="$n" 'NR % 2 == n' "$O/kernels_ids.txt") "$@" -q --no-header \
    -p no:cacheprovider -rs > "$O/gpu_half$n.log" 2>&1
  echo "gpu half $n rc=$?" > "$O/gpu_half$n.rc"
}
bundle() {  # every file under $O but the summaries into one archive: the device tool
  # brings back a limited number of files per call (session 10 lost the scaling logs)
  (cd "$O" && find . -maxdepth 1 -type f ! -name '*.md' ! -name '*.txt' ! -name '*.png' \
     ! -name bundle.tgz -printf '%P\n' | tar czf bundle.tgz --remove-files -T -)
}
smi_sample() {  # the cards' SM clock, power and throttle reasons every 250 ms into
  # $O/smi.csv, in the background (SMI: its pid, for `kill $SMI`)
  nvidia-smi --query-gpu=timestamp,index,clocks.sm,power.draw,enforced.power.limit,\
temperature.gpu,clocks_throttle_reasons.active --format=csv,noheader -lms 250 \
    > "$O/smi.csv" 2>&1 & SMI=$!
}
ab_sweeps() {  # NP TIMEOUT VARY VARY_REV SPEC...: bench/nvlink_sweep.py on NP ranks over each
  # SPEC ("problems:tokens") with VARY, then again with VARY_REV (the values reversed: a
  # variant that always runs second meets a warmer card); files $O/sweep_ab<i>.{md,json,log}
  local np=$1 t=$2 v1=$3 v2=$4 i=0 vary spec; shift 4
  for vary in "$v1" "$v2"; do
    for spec in "$@"; do
      i=$((i + 1))
      timeout -k 10 "$t" $MPI -np "$np" python3 bench/nvlink_sweep.py --commit "$COMMIT" \
        --problems "${spec%%:*}" --tokens "${spec##*:}" --vary "$vary" --iters 10 \
        --out "$O/sweep_ab$i.md" --json "$O/sweep_ab$i.json" > "$O/sweep_ab$i.log" 2>&1
      echo "sweep $i ($vary; $spec) rc=$? at $(date +%T)"
    done
  done
}
smi_summary() {  # GPUS: stop smi_sample; per GPU below GPUS its samples, max power and
  # limit, and how often each throttle reason was seen
  kill "$SMI"
  awk -F', ' -v gpus="$1" '$2 < gpus {n[$2]++; if ($4 + 0 > p[$2]) p[$2] = $4 + 0;
    l[$2] = $5; r[$2 " " $7]++} END {for (g in n) print "gpu", g, n[g], "samples, max W",
    p[g], "limit", l[g]; for (k in r) print "reasons", k, r[k]}' "$O/smi.csv"
}
old_new_sweeps() {  # NP TIMEOUT SIDES [nvlink_sweep ARGS...]: .old's commit (bench/
  # prepare_old.sh; carry .old) and this one on NP ranks, in the order SIDES ("old new new
  # old": a side that always runs second meets a warmer card); files $O/sweep_c_<i><side>.*
  local np=$1 t=$2 sides=$3 i=0 side py script c; shift 3
  python3 -m pip install -q --no-deps --no-compile --target /tmp/oldsite .old/whl/*.whl ||
    echo "no .old wheel"
  local R=$PWD OLD; OLD=$(cat .old/COMMIT 2>/dev/null)
  for side in $sides; do
    i=$((i + 1))
    if [ "$side" = old ]; then py=/tmp/oldsite; script=$R/.old/src/bench; c=$OLD
    else py=; script=$R/bench; c=$COMMIT; fi
    # from /tmp: the checkout's own flashmoe_gen must not shadow the old wheel
    (cd /tmp && PYTHONPATH=$py FLASHMOE_CACHE=/tmp/cache_$side timeout -k 10 "$t" $MPI \
      -x PYTHONPATH -np "$np" python3 "$script/nvlink_sweep.py" --commit "$c" "$@" \
      --iters 10 --out "$O/sweep_c_$i$side.md" --json "$O/sweep_c_$i$side.json" \
      > "$O/sweep_c_$i$side.log" 2>&1)
    echo "sweep $side ($c) rc=$?"
  done
}
