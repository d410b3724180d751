#!/usr/bin/env bash
# Line coverage of fastbn *including the Numba kernels*.
#
# With NUMBA_DISABLE_JIT=1 every @njit / prange kernel runs as plain Python, so coverage.py can
# see its lines (compiled kernels are invisible to it).  Pure-Python kernels are ~1000x slower,
# so this runs a selection of small-input tests only: the functional tests on the input
# generator's small cases, bad input, layers, odd-but-valid inputs at serial sizes, and the
# NaN / constant-channel numerics.  Left out, because they test float32 rounding behaviour of
# the *compiled* code (plain Python computes some float32 expressions differently) or need
# parallel regions: float32 cancellation, near-float-max, huge dy, far-from-unit-scale, medium
# (parallel-size) cases, threads/processes, benchmarks, demo.
#
# Usage: scripts/coverage.sh [extra pytest args]   (appended; a -k there replaces the selection)
#   COVERAGE_HTML=dir  also write an HTML report there
#   COVERAGE_FAIL_UNDER=N  exit non-zero when the total is below N percent
# Needs: pip install coverage   (not in the test extra yet)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

if ! "$PY" -c "import coverage" 2>/dev/null; then
  echo "coverage.py is not installed: pip install coverage" >&2
  exit 2
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export COVERAGE_FILE="$tmp/.coverage"
export NUMBA_DISABLE_JIT=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# bench/ and demo/ are applications around the library, measured by their own tests elsewhere
omit="*/fastbn/bench/*,*/fastbn/demo/*"

start=$(date +%s)
"$PY" -m coverage run --branch --source=fastbn --omit="$omit" -m pytest -q -p no:cacheprovider \
  tests/test_functional.py tests/test_errors.py tests/test_layers.py tests/test_odd_inputs.py \
  tests/test_numerics.py \
  -k "not torch and not medium and not parallel and not cancellation_float32 \
      and not near_float32_max \
      and not far_from_unit_scale and not variance_overflow and not huge_dy" \
  "$@"
status=$?
end=$(date +%s)

echo
"$PY" -m coverage report --show-missing --skip-covered
if [ -n "${COVERAGE_HTML:-}" ]; then
  "$PY" -m coverage html -d "$COVERAGE_HTML" >/dev/null && echo "HTML report: $COVERAGE_HTML"
fi
total=$("$PY" -m coverage report --format=total)
kernels=$("$PY" -m coverage report --format=total --include="*/fastbn/_kernels/*")
echo
echo "coverage (line + branch, NUMBA_DISABLE_JIT=1): total ${total}%, kernels ${kernels}%" \
     "($((end - start)) s, pytest exit status $status)"
if [ "$status" -ne 0 ]; then
  echo "warning: some selected tests failed under NUMBA_DISABLE_JIT=1" >&2
fi
if [ -n "${COVERAGE_FAIL_UNDER:-}" ]; then
  "$PY" -m coverage report --fail-under="$COVERAGE_FAIL_UNDER" >/dev/null || {
    echo "coverage ${total}% is below ${COVERAGE_FAIL_UNDER}%" >&2; exit 1; }
fi
exit "$status"
