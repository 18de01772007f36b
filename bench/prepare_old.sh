#!/usr/bin/env bash
# On the CPU machine: a wheel and the bench scripts of an older commit in .old/ (ignored by
# git), for bench/device_compare.sh to time old and new in one device call.
# Usage: bash bench/prepare_old.sh COMMIT   (then carry ".old" and ".whl" to the device)
set -euo pipefail
COMMIT=${1:?usage: bench/prepare_old.sh COMMIT}
cd "$(git rev-parse --show-toplevel)"
grep -qxF '/.old/' .git/info/exclude 2>/dev/null || echo '/.old/' >> .git/info/exclude
rm -rf .old && mkdir -p .old/src
git archive "$COMMIT" | tar -x -C .old/src
rm -rf .old/src/bench/results
python3 -m pip wheel -q --no-deps .old/src -w .old/whl
echo "$COMMIT" > .old/COMMIT
echo ".old: $(ls .old/whl) from $COMMIT"
