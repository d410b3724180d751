"""The roofline yardstick: a parallel copy of a flat contiguous array.

Batch norm is memory-bound, so every op is measured against the time the same threads take to read B
bytes and write B bytes. fastbn runs on Numba's thread pool, so the copy does too (``np.copyto`` is
single-threaded and would flatter the roofline fraction on multi-core machines).

Importing this module imports Numba but compiles nothing; the first call compiles one specialisation
per dtype (``cache=True`` keeps it on disk for the next process).
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(parallel=True, nogil=True, cache=True)
def _copy_flat(src, dst):
    # One contiguous chunk per thread (prange's static schedule); LLVM vectorises the body into
    # plain wide loads/stores, which is what a memcpy does.
    for i in numba.prange(src.shape[0]):
        dst[i] = src[i]


def parallel_copy(src: np.ndarray, dst: np.ndarray) -> None:
    """Copy ``src`` into ``dst`` (same shape and dtype, both C-contiguous) on Numba's threads."""
    if src.shape != dst.shape or src.dtype != dst.dtype:
        raise ValueError(f"copy: shapes/dtypes differ: {src.shape} {src.dtype} vs "
                         f"{dst.shape} {dst.dtype}")
    if not (src.flags.c_contiguous and dst.flags.c_contiguous):
        raise ValueError("copy: both arrays must be C-contiguous")
    _copy_flat(src.reshape(-1), dst.reshape(-1))
