"""Machine and version facts recorded with every benchmark run (``--json``, README footnotes)."""

from __future__ import annotations

import importlib
import os
import platform
import sys


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _version(mod: str) -> str | None:
    try:
        m = importlib.import_module(mod)
    except Exception:
        return None
    return getattr(m, "__version__", "unknown")


def machine_info(*, fastbn_module=None, torch_module=None) -> dict:
    """CPU, cores, OS, Python and library versions, Numba's threading layer and thread count.

    Call after a parallel kernel has run: Numba only knows its threading layer from then on.
    """
    info: dict = {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "available_cores": available_cores(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": _version("numpy"),
        "numba": _version("numba"),
    }
    try:
        import numba

        info["numba_num_threads"] = numba.get_num_threads()
        info["numba_max_threads"] = numba.config.NUMBA_NUM_THREADS
        try:
            info["threading_layer"] = numba.threading_layer()
        except ValueError:  # no parallel kernel has run yet
            info["threading_layer"] = None
    except ImportError:
        pass
    if fastbn_module is not None:
        info["fastbn"] = getattr(fastbn_module, "__version__", "unknown")
        get_info = getattr(fastbn_module, "info", None)
        if callable(get_info):
            try:
                info["fastbn_info"] = {k: _jsonable(v) for k, v in dict(get_info()).items()}
            except Exception as exc:  # info() is a convenience: never fail the run for it
                info["fastbn_info"] = {"error": repr(exc)}
    if torch_module is not None:
        info["torch"] = getattr(torch_module, "__version__", "unknown")
        try:
            info["torch_threads"] = torch_module.get_num_threads()
            for line in torch_module.__config__.parallel_info().splitlines():
                if line.startswith("ATen parallel backend"):
                    info["torch_parallel_backend"] = line.split(":", 1)[1].strip()
        except Exception:
            pass
    for mod in ("onnxruntime", "onnx", "matplotlib", "asv"):
        v = _version(mod) if mod in sys.modules else None
        if v:
            info[mod] = v
    return info


def _jsonable(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v)


def _proc_stat_busy() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat (Linux)."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    vals = [float(v) for v in fields[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0.0)  # idle + iowait
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = sum(vals[:8])
    return (total - idle) / hz, total / hz


class OtherLoad:
    """How busy *other* processes kept the CPUs while we ran.

    Parallel kernels on a machine where another process holds a core stall at every barrier for
    a scheduler time slice (milliseconds), which swamps microsecond-scale timings. The bench
    reports this so a noisy run is recognisable as such.
    """

    def __init__(self):
        self._start = None

    def start(self) -> "OtherLoad":
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        self._start = (_proc_stat_busy(), os.times(), load)
        return self

    def stop(self) -> dict:
        if self._start is None:
            return {}
        (b0, t0), ours0, load0 = (self._start[0] or (None, None)), self._start[1], self._start[2]
        now = _proc_stat_busy()
        ours1 = os.times()
        out = {"loadavg_1min_at_start": load0}
        if b0 is None or now is None:
            return out
        b1, t1 = now
        cores = max(os.cpu_count() or 1, 1)
        span = (t1 - t0) / cores  # wall seconds, measured in the same clock as busy time
        ours = (ours1.user - ours0.user) + (ours1.system - ours0.system)
        others = max(0.0, (b1 - b0) - ours)
        out["others_cpu_fraction"] = others / (span * cores) if span > 0 else None
        return out
