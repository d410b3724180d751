"""Numba's on-disk cache: a process started after another has compiled a kernel loads it.

Numba keys a cached function by its code, its signature and the pickled cells of its closure.
A pickled dispatcher or intrinsic carries an id made afresh in each process, so a kernel that
closed over a helper missed the cache in every new process: it compiled again, and wrote one
more file to the cache directory each time.  Kernels built from a template therefore get their
helpers as globals (``_config.specialise``).
"""

import os
import subprocess
import sys
import types

import numba
import pytest

from fastbn import _pool
from fastbn._kernels import channels_first, channels_last, merge

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jitted(module):
    """``(name, python function)`` of every Numba dispatcher and fastbn kernel in ``module``."""
    for name, obj in vars(module).items():
        func = getattr(obj, "py_func", None)
        if isinstance(func, types.FunctionType):
            yield name, func


@pytest.mark.parametrize("module", [channels_first, channels_last, merge, _pool],
                         ids=lambda m: m.__name__)
def test_jitted_functions_close_over_nothing(module):
    found = dict(_jitted(module))
    assert found  # the scan sees the module's kernels at all
    closures = [name for name, func in found.items() if func.__closure__]
    assert not closures, f"closures defeat Numba's cache: {closures}"


# float32 statistics of short runs (moments_short) and of long runs (moments32, float32
# lanes), tiled with the cache size lowered: the two kernels made from one template
_SCRIPT = """
import numpy as np
import fastbn
from fastbn import _config
from fastbn._kernels import channels_first as cf
_config.LLC_BYTES = 1024
rng = np.random.default_rng(0)
for shape in [(64, 256, 7, 7), (32, 64, 512)]:
    fastbn.channel_stats(rng.standard_normal(shape).astype(np.float32))
print(cf.moments_short._par is not None, cf.moments32._par is not None)
"""


@pytest.mark.skipif(numba.config.DISABLE_JIT, reason="nothing is compiled")
def test_second_process_loads_every_kernel_from_the_cache(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), PYTHONPATH=REPO)

    def run():
        proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        files = {p.relative_to(tmp_path): p.stat().st_mtime_ns for p in tmp_path.rglob("*")
                 if p.is_file()}
        return proc.stdout.split(), files

    built, first = run()
    assert built == ["True", "True"]
    assert any("moments32" in str(p) for p in first)
    _, second = run()
    # a miss writes a new file (and rewrites the index)
    assert second == first
