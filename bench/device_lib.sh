#!/usr/bin/env bash
# Shared steps of the device scripts (source after bench/device_setup.sh; needs $O and $MPI).
run_multigpu() {  # P
  timeout 420 $MPI -np "$1" python3 -m pytest -m multigpu tests/test_multigpu.py -q \
    --no-header -p no:cacheprovider > "$O/multigpu_$1.log" 2>&1
  echo "multigpu $1 ranks rc=$?"; grep -E "passed|failed|FAILED" "$O/multigpu_$1.log" | tail -8
}
run_overlap() {  # P COMMIT (may be empty) [more bench/overlap.py arguments]
  local p=$1 commit=$2; shift 2
  timeout 400 $MPI -np "$p" python3 bench/overlap.py ${commit:+--commit "$commit"} "$@" \
    --out "$O/overlap_$p.md" --json "$O/overlap_$p.json" > "$O/overlap_$p.log" 2>&1
  echo "overlap rc=$?"; cat "$O/overlap_$p.md" 2>/dev/null || tail -20 "$O/overlap_$p.log"
}
