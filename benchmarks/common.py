"""Shared pieces of the asv suite: parameters, cached inputs, prepared contenders.

The shapes come from ``fastbn.bench.suite`` and the timed calls from ``fastbn.bench.contenders`` --
the same registry the ``python -m fastbn bench`` CLI and the pytest-benchmark tests use -- so the
dashboard, the CLI table and the tests always time the same calls.

``FASTBN_ASV_QUICK=1`` shrinks the parameter grid to one small shape in float32 (CI runs the whole
suite once that way so it cannot rot; see tests/test_bench_dashboard.py).
"""

import os
import shutil
import subprocess
import sys
import tempfile

import fastbn  # first: fastbn picks Numba's threading layer before anything else imports Numba
from fastbn.bench.contenders import Unavailable, make_inputs, prepare
from fastbn.bench.suite import SUITE, SUITE_BY_NAME

QUICK = os.environ.get("FASTBN_ASV_QUICK", "").strip() not in ("", "0")

# dtype is a parameter of its own, so a suite entry that only changes the dtype of another
# (mlp_f64 is mlp in float64) would time the same thing twice: keep the first of each.
_DISTINCT = list({(s.shape, s.axis): s.name for s in reversed(SUITE)}.values())[::-1]
SHAPES = ["edge_n1_late"] if QUICK else _DISTINCT
DTYPES = ["float32"] if QUICK else ["float32", "float64"]
PARAMS = [SHAPES, DTYPES]
PARAM_NAMES = ["shape", "dtype"]

# asv_runner >= 0.3 calls ``setup`` again before every timed sample of a parameterized benchmark,
# and each benchmark runs in a fresh process: keep one shape's inputs and prepared calls per
# process.
_INPUTS = {}
_PREPARED = {}


def inputs(shape, dtype):
    """(spec, arrays) for a suite shape in ``dtype``, built once per process."""
    key = (shape, dtype)
    if key not in _INPUTS:
        _INPUTS.clear()
        _PREPARED.clear()
        spec = SUITE_BY_NAME[shape].with_dtype(dtype)
        _INPUTS[key] = (spec, make_inputs(spec))
    return _INPUTS[key]


def threads():
    """fastbn's thread count (NUMBA_NUM_THREADS in the asv matrix); PyTorch gets the same."""
    return fastbn.get_num_threads()


def prepared(op, contender, shape, dtype):
    """The ready call for (op, contender) on a shape, warmed up (compiled) once.

    Raises NotImplementedError when the contender cannot run here (PyTorch not installed, ONNX
    Runtime on a channels-last shape...), which asv reports as a skipped benchmark.
    """
    key = (op, contender, shape, dtype)
    fn = _PREPARED.get(key)
    if fn is None:
        spec, inp = inputs(shape, dtype)
        try:
            p = prepare(contender, op, spec, inp, threads=threads())
        except Unavailable as exc:
            raise NotImplementedError(str(exc)) from None
        p.fn()  # the first call compiles (fastbn) or warms caches: never timed
        fn = _PREPARED[key] = p.fn
    return fn


def setup_for(op, contender):
    """A method-level ``setup``: asv calls it with the parameters only, after the class setup."""

    def setup(shape, dtype):
        prepared(op, contender, shape, dtype)

    setup.__name__ = f"setup_{op}_{contender}"
    return setup


# --------------------------------------------------------------------------------------------------
# Cold start

COLD_SHAPE = (8, 32, 16, 16)  # above fastbn's serial cut-off, so the parallel kernels compile
_FASTBN_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fastbn.__file__)))


def cold_code(op, cache_dir):
    """(timed statement, untimed setup) for asv's ``timeraw_``: import fastbn, run ``op`` once.

    ``cache_dir`` is the NUMBA_CACHE_DIR the fresh process uses: an empty one measures the
    first-ever call (compilation), a primed one the call that loads machine code from disk.
    """
    c = COLD_SHAPE[1]
    calls = {
        "infer": "fastbn.batch_norm_infer(x, np.zeros(c, x.dtype), np.ones(c, x.dtype))",
        "train": "fastbn.batch_norm_train(x)",
        "backward": "fastbn.batch_norm_backward(x, x, *fastbn.batch_norm_train(x)[1:])",
        "stats": "fastbn.channel_stats(x)",
    }
    stmt = f"""
import numpy as np
import fastbn
c = {c}
x = np.ones({COLD_SHAPE!r}, dtype=np.float32)
{calls[op]}
"""
    return stmt, child_setup(cache_dir)


def child_setup(cache_dir=None):
    """Untimed setup code for a ``timeraw_`` child process.

    The child must import the same fastbn as this process: asv does not pass its ASV_PYTHONPATH
    on to grandchildren, so name fastbn's parent directory explicitly.
    """
    code = f"""
import os, sys
if {_FASTBN_ROOT!r} not in sys.path:
    sys.path.insert(0, {_FASTBN_ROOT!r})
"""
    if cache_dir is not None:
        code += f"os.environ['NUMBA_CACHE_DIR'] = {cache_dir!r}\n"
    return code


_UID = os.getuid() if hasattr(os, "getuid") else 0
_WARM_DIR = os.path.join(tempfile.gettempdir(), f"fastbn-asv-warm-cache-{_UID}")
_PRIMED = set()
_COLD_DIRS = []


def warm_cache_dir(op):
    """A Numba cache directory holding ``op``'s kernels, primed by one throwaway process."""
    if op not in _PRIMED:
        stmt, setup = cold_code(op, _WARM_DIR)
        subprocess.run([sys.executable, "-c", setup + stmt], check=True)
        _PRIMED.add(op)
    return _WARM_DIR


def fresh_cache_dir():
    d = tempfile.mkdtemp(prefix="fastbn-asv-cold-")
    _COLD_DIRS.append(d)
    return d


def remove_cold_dirs():
    while _COLD_DIRS:
        shutil.rmtree(_COLD_DIRS.pop(), ignore_errors=True)
