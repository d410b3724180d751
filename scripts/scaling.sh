#!/usr/bin/env bash
# Scaling check: the whole bench at several thread counts, one process per count, on one
# machine, so every figure (fastbn, PyTorch, the copy roofline) comes from the same hardware.
#
#   bash scripts/scaling.sh [DIR] [THREADS...]      # default: scaling/ and 1 4 16
#   python scripts/scaling_table.py DIR/bench_*t.json
#
# Extra bench options go in BENCH_ARGS, e.g. BENCH_ARGS="--budget 0.1".
set -euo pipefail
dir=${1:-scaling}
shift || true
threads=("$@")
[ ${#threads[@]} -gt 0 ] || threads=(1 4 16)
py=${PYTHON:-python}
mkdir -p "$dir"
max=0
for t in "${threads[@]}"; do [ "$t" -gt "$max" ] && max=$t; done
# Numba sizes its pool at start-up: allow the largest count, then each run asks for fewer.
export NUMBA_NUM_THREADS=${NUMBA_NUM_THREADS:-$max}
"$py" -m fastbn info | tee "$dir/info.txt"
for t in "${threads[@]}"; do
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
    "$py" -m fastbn bench --threads "$t" --no-progress --json "$dir/bench_${t}t.json" \
        ${BENCH_ARGS:-} | tee "$dir/bench_${t}t.txt"
done
