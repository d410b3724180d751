"""Reuse of large output buffers once the caller has released them.

A new array of tens of megabytes comes from the operating system as untouched pages: the first
write to each page faults and the kernel zeroes it.  On the machines measured that costs more
than the batch norm itself ((128, 256, 28, 28) float32 inference at 2 threads: 4.1 ms into a
reused buffer, 12-15 ms into a new one), and the C library hands such sizes straight back to
the system on release (glibc: from 32 MiB on), so every call pays it again.

Large outputs are therefore carved from blocks kept here.  A returned array's ``base`` is its
block; once no array refers to the block any more (the caller has dropped every view of it),
the next output of the same size reuses it.  The blocks kept, in use or not, total at most
:func:`get_output_cache` bytes (``FASTBN_OUTPUT_CACHE`` in the environment, default 512 MiB;
0 turns this off), so idle memory held here is bounded; :func:`set_output_cache` changes the
bound and releases blocks beyond it.
"""

import os
import sys
import threading

import numpy as np

from ._config import env_bytes, helper

# From 32 MiB glibc returns released memory to the system, so each new output faults; from
# 16 MiB outputs are also large enough for streaming stores (see _config.STREAM_BYTES), which
# need memory known to be mapped, as a reused block is.
MIN_BYTES = 16 << 20
_ALIGN = 64  # a cache line


def _default_limit():
    return env_bytes("FASTBN_OUTPUT_CACHE", 512 << 20)


_lock = threading.Lock()
_blocks = []  # least recently handed out first
_limit = _default_limit()


def _after_fork_in_child():
    # Another thread of the parent may have held the lock at the fork: the child's copy of it
    # would never be released.
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _free(i):
    """Whether ``_blocks[i]`` is referred to by nothing but this list."""
    return sys.getrefcount(_blocks[i]) <= _FREE_REFS


def _count_refs():
    _blocks.append(np.empty(0, np.uint8))
    try:
        return sys.getrefcount(_blocks[-1])
    finally:
        _blocks.pop()


_FREE_REFS = _count_refs()


def empty(shape, dtype, nbytes):
    """A C-contiguous array like ``np.empty(shape, dtype)`` (``nbytes`` bytes, as the caller's
    array of the same size), starting on a cache line (rows whose length is a whole number of
    lines then take streaming stores, see ``functional._streams``), and whether its memory was
    used before (its pages are mapped: no faults when it is written)."""
    if nbytes < MIN_BYTES or _limit == 0:
        return np.empty(shape, dtype), False
    size = nbytes + _ALIGN
    reused = False
    with _lock:
        for i in range(len(_blocks)):
            if _blocks[i].nbytes == size and _free(i):
                block = _blocks.pop(i)
                _blocks.append(block)
                reused = True
                break
        else:
            if not _make_room(size):
                return np.empty(shape, dtype), False
            block = np.empty(size, np.uint8)
            _blocks.append(block)
    # a slice of the block has the block as its base, so every view of it counts in _free
    return on_line(block, nbytes).view(dtype).reshape(shape), reused


# A load waits for an earlier store still in flight whose address has the same low 12 bits
# (the check is on page offsets: 4K aliasing).  The channels-first one-call passes walk one
# channel's rows, which for (64, 64, 8, 8) float32 lie 16 KB apart: they read the next row of x
# (and dy) just after writing the previous row of y, and the next channel just after writing
# this one.  With y at, or within a few runs of, x's page offset (or dy's), row starts stall.
# A new output for them therefore starts at least a quarter of a page from both.  Whole calls at
# 2 threads, y at x's page offset against half a page away: (64, 64, 8, 8) float32 backward 67
# -> 52 us, training 53 -> 37; (128, 64, 8, 8) 121 -> 77 and 98 -> 60; (16, 64, 8, 8) 17.5 ->
# 15.7 and 14.1 -> 12.1.  With x and dy at the same offset, (64, 64, 8, 8) whole calls into y
# 0, 128, 256, 512, 1024, 2048, 3072, 3584, 3840 bytes after them: backward 64, 56, 48, 42,
# 42, 42, 43, 47, 58 us, training 50, 47, 43, 31, 31, 31, 39, 40, 47 us.  Below 256 KB the gain
# did not pay for the check.
APART_MIN_BYTES = 256 << 10
PAGE = 4096  # bytes, as far as the page-offset check sees
_NEAR = 1024


@helper
def _apart_start(raw, b, c):
    """Where in the byte array ``raw`` (a page longer than the output) an output may start at
    least ``_NEAR`` bytes, modulo a page, from the starts of the arrays ``b`` and ``c``: at 0
    where that already holds, else in the middle of the wider gap between them, on 16 bytes
    (``raw`` is that aligned).  Compiled: reading an address from Python costs 1 us."""
    r, pb, pc = raw.ctypes.data, b.ctypes.data, c.ctypes.data
    db = (r - pb) % PAGE
    dc = (r - pc) % PAGE
    if min(db, PAGE - db, dc, PAGE - dc) >= _NEAR:
        return 0
    gap = (pc - pb) % PAGE
    mid = gap // 2 if gap >= PAGE // 2 else (gap + PAGE) // 2
    return (pb + mid - r) % PAGE // 16 * 16


def empty_apart(shape, dtype, nbytes, ref, ref2):
    """A C-contiguous ``np.empty(shape, dtype)`` of ``nbytes`` bytes whose start lies at least
    ``_NEAR`` bytes either way, modulo a page, from the starts of the arrays ``ref`` and ``ref2``
    (see above), carved from a buffer a page longer: one allocation and one compiled call
    (allocating, checking, then allocating again where the check failed cost 1.4 us more than
    ``np.empty``; this costs 0.5)."""
    raw = np.empty(nbytes + PAGE, np.uint8)
    return np.ndarray(shape, dtype, raw, _apart_start(raw, ref, ref2))


def on_line(block, nbytes):
    """The ``nbytes`` of the uint8 array ``block`` (at least ``nbytes + 63`` long) that start
    on its first cache line."""
    start = -block.__array_interface__["data"][0] % _ALIGN
    return block[start:start + nbytes]


def _make_room(nbytes):
    """Forget blocks until ``nbytes`` more fit the limit: free ones first (their memory goes
    back to the system), least recently used first, then ones in use (their arrays keep them
    and release them as usual).  False if ``nbytes`` alone exceeds the limit."""
    total = sum(b.nbytes for b in _blocks)
    while total + nbytes > _limit and _blocks:
        i = next((j for j in range(len(_blocks)) if _free(j)), 0)
        total -= _blocks.pop(i).nbytes
    return total + nbytes <= _limit


def set_output_cache(nbytes):
    """Keep at most ``nbytes`` of large output buffers for reuse (0: none); blocks beyond the
    new bound are forgotten at once (see :func:`_make_room`)."""
    global _limit
    if isinstance(nbytes, bool) or not hasattr(nbytes, "__index__"):
        raise TypeError(f"nbytes must be an integer, got {type(nbytes).__name__}")
    nbytes = nbytes.__index__()
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    with _lock:
        _limit = nbytes
        _make_room(0)


def get_output_cache():
    """The bound set by :func:`set_output_cache`, in bytes."""
    return _limit


def cached_bytes():
    """Bytes held in blocks now, in use by callers or free."""
    with _lock:
        return sum(b.nbytes for b in _blocks)
