"""Cold start: what a fresh process pays for ``import fastbn`` plus its first call.

Edge and CLI users pay this on every start. ``timeraw_`` benchmarks run their code in a new Python
process: with an empty ``NUMBA_CACHE_DIR`` the first call compiles its kernels; with a cache
primed by an earlier process it only loads them from disk.
"""

from . import common


class ColdStart:
    params = [["infer"] if common.QUICK else ["infer", "train", "backward", "stats"]]
    param_names = ["op"]
    timeout = 600.0
    number = 1
    repeat = (1, 3, 60.0)
    warmup_time = 0.0

    def timeraw_first_call_no_cache(self, op):
        # Called by asv once per sample: a new empty cache directory each time.
        return common.cold_code(op, common.fresh_cache_dir())

    def timeraw_first_call_warm_cache(self, op):
        return common.cold_code(op, common.warm_cache_dir(op))

    def teardown(self, op):
        common.remove_cold_dirs()


def timeraw_import_fastbn():
    """``import fastbn`` alone (NumPy and Numba included): compiles nothing."""
    return "import fastbn", common.child_setup()


timeraw_import_fastbn.number = 1
timeraw_import_fastbn.repeat = (3, 5, 30.0)
