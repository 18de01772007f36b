#!/usr/bin/env bash
# Shared steps of the device scripts (source after bench/device_setup.sh; needs $O and $MPI).
run_multigpu() {  # P
  timeout 300 $MPI -np "$1" python3 -m pytest -m multigpu tests/test_multigpu.py -q \
    --no-header -p no:cacheprovider > "$O/multigpu_$1.log" 2>&1
  echo "multigpu $1 ranks rc=$?"; grep -E "passed|failed|FAILED" "$O/multigpu_$1.log" | tail -8
}
run_overlap() {  # P COMMIT
  timeout 240 $MPI -np "$1" python3 bench/overlap.py --commit "$2" \
    --out "$O/overlap_$1.md" --json "$O/overlap_$1.json" > "$O/overlap_$1.log" 2>&1
  echo "overlap rc=$?"; cat "$O/overlap_$1.md" 2>/dev/null || tail -20 "$O/overlap_$1.log"
}
