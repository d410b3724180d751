#!/usr/bin/env bash
# Run a short test selection with Numba's bounds checking switched on in every kernel
# (NUMBA_BOUNDSCHECK=1 overrides the kernels' own setting): an out-of-range index then raises
# IndexError instead of reading or writing past an array.  Both kernel families, float32 and
# float64, small and parallel-size (>= 32768 elements) inputs, plain and odd layouts.
#
# Numba cannot raise from inside a parallel region: a failed bounds check in a prange body is
# silently ignored there (numba/numba#9380, #2811).  So the run uses NUMBA_NUM_THREADS=1, which
# makes fastbn call every kernel's *serial* build, at every size (fastbn._config.use_serial),
# with the same tiling (it depends on the shape only, never on the thread count): the index
# arithmetic of the parallel-size paths is checked in the build that can report it.
#
# Bounds checking changes the compiled code, and Numba's cache is not keyed by it, so the
# kernels are compiled into a throw-away cache directory (NUMBA_CACHE_DIR), never the normal
# one; every run compiles from scratch (most of its time).
#
# Usage: scripts/boundscheck.sh [extra pytest args]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

cache=$(mktemp -d "${TMPDIR:-/tmp}/fastbn-boundscheck.XXXXXX")
trap 'rm -rf "$cache"' EXIT
export NUMBA_BOUNDSCHECK=1
export NUMBA_NUM_THREADS=1
export NUMBA_CACHE_DIR="$cache"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# the switch must really be on: an out-of-range read in a kernel compiled like fastbn's
# (boundscheck=None, i.e. "as the environment says") has to raise
"$PY" - <<'PY' || { echo "NUMBA_BOUNDSCHECK=1 has no effect here" >&2; exit 2; }
import numba, numpy as np
f = numba.njit(boundscheck=None, cache=False)(lambda a, i: a[i])
try:
    f(np.zeros(3), 5)
except IndexError:
    pass
else:
    raise SystemExit("no IndexError")
PY

cases="nchw_64x56 or nhwc_56x64 or c1_nc or strided_inner or reversed_2d or transposed_2d_T \
or medium_nchw or medium_nhwc_c3 or medium_c1_long"
start=$(date +%s)
"$PY" -m pytest -q -p no:cacheprovider \
  tests/test_functional.py tests/test_odd_inputs.py tests/test_numerics.py \
  -k "(test_channel_stats or test_train or test_infer or test_backward or test_batch_norm \
       or test_out) and not torch and not autograd and not finite_differences and ($cases) \
      or (test_nonfinite_stays_in_its_channel and nan) or test_cancellation_float64 \
      or (test_layout_every_function and parallel and (reversed_nhwc or transposed_T))" \
  "$@"
status=$?
echo "boundscheck run: $(( $(date +%s) - start )) s, pytest exit status $status" \
     "(NUMBA_BOUNDSCHECK=1, NUMBA_NUM_THREADS=1, cache $cache, removed on exit)"
exit "$status"
