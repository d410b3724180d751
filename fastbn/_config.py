"""Every Numba setting fastbn uses, in one place.

Nothing here compiles anything: importing fastbn must stay cheap.  Kernels are jitted lazily
on first call (see :func:`kernel`).
"""

import contextlib
import functools
import os
import sys
import tempfile
import threading
import types
import warnings

# The threading layer has to be chosen before Numba starts its first parallel region.
# Numba's default pick on a machine without TBB is `workqueue`, which aborts the whole process
# when two Python threads enter a parallel region at once.  `threadsafe` asks for TBB, then
# GNU OpenMP; both are safe for concurrent callers.  A layer the user chose explicitly wins.
if "NUMBA_THREADING_LAYER" not in os.environ:
    os.environ["NUMBA_THREADING_LAYER"] = "threadsafe"


def _cache_dir():
    """A writable directory for Numba's on-disk cache.

    Numba writes its cache beside the source by default, which fails on a read-only
    site-packages.  Respect NUMBA_CACHE_DIR when the user set it; otherwise use the
    package directory if writable, else a per-user cache directory, else the temp dir.
    """
    if os.environ.get("NUMBA_CACHE_DIR"):
        return os.environ["NUMBA_CACHE_DIR"]
    here = os.path.dirname(os.path.abspath(__file__))
    if os.access(here, os.W_OK):
        return None  # Numba's own __pycache__ beside the sources works.
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    for root in (base, tempfile.gettempdir()):
        path = os.path.join(root, "fastbn-numba")
        try:
            os.makedirs(path, exist_ok=True)
        except OSError:
            continue
        if os.access(path, os.W_OK):
            os.environ["NUMBA_CACHE_DIR"] = path
            return path
    return None


CACHE_DIR = _cache_dir()

import numba  # noqa: E402  (after the environment is set up)
import numpy as np  # noqa: E402


def env_bytes(name, default):
    """A size in bytes from the environment variable ``name`` (negative: 0), or ``default``
    where it is unset or not an integer (with a warning)."""
    text = os.environ.get(name)
    if text:
        try:
            return max(0, int(text))
        except ValueError:
            warnings.warn(f"{name}={text!r} is not an integer; ignored", stacklevel=3)
    return default


def _last_level_cache(default=32 << 20):
    """Bytes of the largest CPU cache (Linux sysfs), or ``default`` where it cannot be read."""
    sizes = []
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(root):
            with open(os.path.join(root, entry, "size")) as f:
                text = f.read().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * scale)
    except (OSError, ValueError):
        pass
    return max(sizes, default=default)


LLC_BYTES = _last_level_cache()


# Outputs at least this large, in memory written before (a caller's out=, or a reused block,
# see _pool), are written with non-temporal stores: with an input as large they cannot both
# stay in the last-level cache, and skipping the write-allocate read measured 1.5x faster on a
# 100 MB inference into out=.  Kernel times at 2 threads with a 32 MB cache, another library's
# call in between: (32, 64, 56, 56) float32 inference 1.30 -> 1.14 ms, (20, 64, 56, 56) 0.77
# -> 0.73 ms; (16, 64, 56, 56), 12 MB, tied.
def _stream_bytes():
    return env_bytes("FASTBN_STREAM_BYTES", LLC_BYTES // 2)


STREAM_BYTES = _stream_bytes()
STREAM_RUN_BYTES = 2048


# Reductions only: without `nnan`/`ninf`, so that NaN and Inf propagate per channel as IEEE
# says; `reassoc` is what lets LLVM vectorize the sums, `contract` allows FMAs.  Elementwise
# kernels get no fast-math flags at all: they vectorize without them, and `reassoc` would let
# LLVM fold the two-part centre `(x - hi) - lo` into `x - (hi + lo)` differently in the serial
# and the parallel build, so results would depend on the thread count.
FASTMATH = frozenset({"reassoc", "contract", "nsz"})

# Below this many elements a parallel region's launch cost (a few microseconds per prange)
# exceeds the work, so the serial build of the same kernel runs instead.
SERIAL_BELOW = 1 << 15

# The one-call kernels of small tensors (< SERIAL_BELOW values) split their work items
# (channels; channels-last: blocks of 64 channels) among the threads from this many values:
# a launch (1.6 us here) is then paid back, e.g. (1, 512, 7, 7) float32 backward at 2 threads
# 11 vs 18 us serial, (16, 64, 4, 4) 7 vs 9 us.  Each item is computed whole by one thread, in
# the same order in either build.
SMALL_PARALLEL_FROM = 1 << 13

# Work items of roughly this many elements: many items for load balance, each large enough
# that per-item overhead (partial-buffer rows, loop setup) is negligible.
CHUNK = 1 << 14

# Fixed number of work items we aim for, independent of the thread count, so that reduction
# order and hence results do not depend on how many threads run.
MIN_ITEMS = 64


_forked_omp = False


def _after_fork_in_child():
    # GNU OpenMP cannot be used in a child forked from a process whose OpenMP pool is running:
    # libgomp terminates the child.  The serial builds of the kernels never touch the pool, so
    # a forked child keeps working, single-threaded.
    global _forked_omp
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel region ran yet in the parent: the child is free to start one
        return
    if layer == "omp":
        _forked_omp = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def force_serial():
    """True when parallel kernels must not run in this process (see _after_fork_in_child)."""
    return _forked_omp


_workqueue_lock = threading.Lock()
_SAFE_LAYERS = ("tbb", "omp")
_guard = None  # decided once the threading layer is known
_NO_GUARD = contextlib.nullcontext()


def parallel_guard():
    """A context manager to hold around parallel calls.

    A lock when the threading layer may be `workqueue` (only if the user asked for it or for a
    layer that can fall back to it), so concurrent callers take turns instead of aborting the
    process; a no-op context otherwise.
    """
    global _guard
    if _guard is not None:
        return _guard
    try:
        layer = numba.threading_layer()
    except ValueError:  # not started yet: judge by what was requested
        requested = str(numba.config.THREADING_LAYER).lower()
        safe = requested in _SAFE_LAYERS + ("threadsafe",)
        return _NO_GUARD if safe else _workqueue_lock
    _guard = _NO_GUARD if layer in _SAFE_LAYERS else _workqueue_lock
    return _guard


def _clone(func, suffix):
    """A copy of `func` under another qualified name.

    Numba's cache index is keyed by qualified name and signature, not by compile flags, so
    the serial and the parallel build of one kernel must not share a name.
    """
    clone = types.FunctionType(
        func.__code__, func.__globals__, func.__name__ + suffix, func.__defaults__, func.__closure__
    )
    clone.__qualname__ = func.__qualname__ + suffix
    clone.__module__ = func.__module__
    clone.__doc__ = func.__doc__
    return clone


def specialise(template, name, doc=None, **names):
    """A copy of the function `template` named `name`, in whose globals `names` (helpers it
    calls) replace the template's placeholders; the globals are those of its module when this
    runs, so what it calls must be defined by then.

    Not a closure over the helpers: Numba's cache index key includes the pickled closure
    cells, and a pickled dispatcher or intrinsic differs from one process to the next, so a
    kernel closing over one missed the cache, and wrote a new file, in every new process.
    """
    func = types.FunctionType(template.__code__, dict(template.__globals__, **names), name,
                              template.__defaults__)
    # its own name: Numba's cache files are named after the function
    func.__qualname__ = name
    func.__module__ = template.__module__
    func.__doc__ = template.__doc__ if doc is None else doc
    return func


class Kernel:
    """A loop written once with `prange`, compiled lazily as a parallel and a serial build.

    The serial build is used for small inputs, for one thread, and in forked children of an
    OpenMP process.  Both builds come from the same Python source, so they cannot drift apart.
    """

    __slots__ = ("py_func", "_par", "_ser", "_fastmath", "_serial_below", "__name__",
                 "__wrapped__", "__dict__")

    def __init__(self, func, fastmath, serial_below=None):
        self.py_func = func
        self._fastmath = fastmath
        self._serial_below = serial_below
        self.__name__ = func.__name__
        self.__doc__ = func.__doc__
        self.__wrapped__ = func
        self._par = None
        self._ser = None

    def _jit(self, parallel):
        opts = dict(parallel=parallel, fastmath=self._fastmath, cache=True, nogil=True,
                    error_model="numpy", boundscheck=None)
        suffix = "_par" if parallel else "_ser"
        return _njit(_clone(self.py_func, suffix), **opts)

    @property
    def parallel(self):
        if self._par is None:
            self._par = self._jit(True)
        return self._par

    @property
    def serial(self):
        if self._ser is None:
            self._ser = self._jit(False)
        return self._ser

    def __call__(self, size, *args):
        """Run on `args`; `size` (elements touched) picks the build: the serial one below
        `serial_below` elements (default SERIAL_BELOW), at one thread, and in forked children of
        an OpenMP process; else the parallel one."""
        # written out, parallel_guard's cached answer too: every Python call saved here is
        # saved on every kernel call, which small calls feel
        below = SERIAL_BELOW if self._serial_below is None else self._serial_below
        if size < below or _forked_omp or _num_threads() == 1:
            return (self._ser or self.serial)(*args)
        guard = _guard or parallel_guard()
        if guard is _NO_GUARD:  # skips entering a no-op context: 0.2 us of a 10 us call
            return (self._par or self.parallel)(*args)
        with guard:
            return self.parallel(*args)


def _num_threads():
    """``numba.get_num_threads()``, which takes a lock to check that the threading layer has
    started (0.67 us, more than some kernels): after the first call, Numba's own C accessor is
    called directly (0.09 us) where this Numba version has it."""
    global _num_threads
    n = numba.get_num_threads()
    raw = getattr(getattr(numba.np.ufunc, "parallel", None), "_get_num_threads", None)
    if callable(raw) and raw() == n:
        _num_threads = raw
    return n


def _flags(exact):
    return False if exact else set(FASTMATH)


def kernel(func=None, *, exact=False, serial_below=None):
    """Decorate a `prange` loop as a :class:`Kernel`; `exact=True` for elementwise kernels and
    for those calling the vector intrinsics; `serial_below`: see :meth:`Kernel.__call__`."""
    if func is None:
        return lambda f: Kernel(f, _flags(exact), serial_below)
    return Kernel(func, _flags(exact), serial_below)


def helper(func=None, *, exact=False, inline=False):
    """A small jitted function called from kernels (inlined by LLVM; ``inline``: by Numba, for
    one LLVM judges too large but whose call costs more than it saves)."""
    if func is None:
        return lambda f: helper(f, exact=exact, inline=inline)
    opts = {"inline": "always"} if inline else {}
    return _njit(func, fastmath=_flags(exact), cache=True, nogil=True, error_model="numpy",
                 **opts)


def _njit(func, **opts):
    """``numba.njit(**opts)(func)``.  With the JIT disabled (the coverage run) ``func`` runs as
    Python, where NumPy warns on a float64 stored into float32 beyond its range, or on
    ``inf - inf``; compiled, such IEEE results come silently, as they should, so the Python run
    ignores them alike."""
    if not numba.config.DISABLE_JIT:
        return numba.njit(**opts)(func)

    @functools.wraps(func)
    def run(*args, **kwargs):
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return func(*args, **kwargs)

    return run


def set_num_threads(n):
    """Set the number of threads fastbn's parallel kernels use (1 .. NUMBA_NUM_THREADS)."""
    if isinstance(n, bool) or not isinstance(n, (int,)) and not hasattr(n, "__index__"):
        raise TypeError(f"n must be an integer, got {type(n).__name__}")
    n = int(n)
    limit = numba.config.NUMBA_NUM_THREADS
    if not 1 <= n <= limit:
        raise ValueError(f"n must be between 1 and {limit} (NUMBA_NUM_THREADS), got {n}")
    numba.set_num_threads(n)


def get_num_threads():
    """Number of threads fastbn's parallel kernels use in the calling thread."""
    return numba.get_num_threads()


def info():
    """A dict describing the runtime: versions, threading layer, threads, cache, CPU."""
    import platform

    import numpy

    threads = numba.get_num_threads()  # starts the threading layer, so it can be named
    try:
        layer = numba.threading_layer()
    except ValueError:
        layer = f"not started yet (requested: {os.environ.get('NUMBA_THREADING_LAYER', 'default')})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from . import __version__

    return {
        "fastbn": __version__,
        "python": sys.version.split()[0],
        "numpy": numpy.__version__,
        "numba": numba.__version__,
        "threading_layer": layer,
        "num_threads": threads,
        "max_threads": numba.config.NUMBA_NUM_THREADS,
        "cpu_count": os.cpu_count(),
        "cache_dir": CACHE_DIR or "beside the sources (__pycache__)",
        "cpu": cpu,
        "platform": platform.platform(),
    }
