"""Kernels for a ``(M, C)`` view with the channel axis innermost (NC, NHWC, ...).

Work items are tiles of ``R`` rows by ``W`` channels.  Inner loops run across channels, so they
are unit-stride and vectorise; per-channel accumulators are a row of a partial buffer owned by
the tile (``parts[k, c]`` for row block ``k``), merged afterwards in a fixed order.  A tile is
small enough to stay in cache between the two passes of a per-tile reduction.
"""

import numba

from .._config import helper, kernel


@helper
def _tile(it, NB, R, W, M, C):
    """Row block ``k`` and the row and channel ranges of work item ``it``."""
    k = it // NB
    b = it - k * NB
    r0 = k * R
    c0 = b * W
    return k, r0, min(M, r0 + R), c0, min(C, c0 + W)


@kernel
def moments(x, R, W, mean, m2):
    """Per tile mean and M2 of each channel into ``mean[K, C]`` and ``m2[K, C]``.

    Two passes over the tile while it is in cache: one pass over memory, two-pass accuracy.
    """
    M, C = x.shape
    NB = (C + W - 1) // W
    K = (M + R - 1) // R
    for it in numba.prange(K * NB):
        k, r0, r1, c0, c1 = _tile(it, NB, R, W, M, C)
        acc = mean[k]
        sq = m2[k]
        for c in range(c0, c1):
            acc[c] = 0.0
            sq[c] = 0.0
        for r in range(r0, r1):
            for c in range(c0, c1):
                acc[c] += x[r, c]
        inv = 1.0 / (r1 - r0)
        for c in range(c0, c1):
            acc[c] *= inv
        for r in range(r0, r1):
            for c in range(c0, c1):
                d = x[r, c] - acc[c]
                sq[c] += d * d


@kernel
def sums(x, center, R, W, s1, s2):
    """Per tile sums of ``x - center[c]`` and of its square into ``s1[K, C]``, ``s2[K, C]``."""
    M, C = x.shape
    NB = (C + W - 1) // W
    K = (M + R - 1) // R
    for it in numba.prange(K * NB):
        k, r0, r1, c0, c1 = _tile(it, NB, R, W, M, C)
        a1 = s1[k]
        a2 = s2[k]
        for c in range(c0, c1):
            a1[c] = 0.0
            a2[c] = 0.0
        for r in range(r0, r1):
            for c in range(c0, c1):
                d = x[r, c] - center[c]
                a1[c] += d
                a2[c] += d * d


@kernel
def bwd_sums(x, dy, mu, R, W, sg, sgx):
    """Per tile sums of ``dy`` and ``dy * (x - mu[c])`` into ``sg[K, C]``, ``sgx[K, C]``."""
    M, C = x.shape
    NB = (C + W - 1) // W
    K = (M + R - 1) // R
    for it in numba.prange(K * NB):
        k, r0, r1, c0, c1 = _tile(it, NB, R, W, M, C)
        a1 = sg[k]
        a2 = sgx[k]
        for c in range(c0, c1):
            a1[c] = 0.0
            a2[c] = 0.0
        for r in range(r0, r1):
            for c in range(c0, c1):
                g = dy[r, c]
                a1[c] += g
                a2[c] += g * (x[r, c] - mu[c])


@kernel
def affine(x, center, scale, shift, lo, y, R, W):
    """Elementwise ``y = max((x - center[c]) * scale[c] + shift[c], lo)``; NaN passes through."""
    M, C = x.shape
    NB = (C + W - 1) // W
    K = (M + R - 1) // R
    for it in numba.prange(K * NB):
        k, r0, r1, c0, c1 = _tile(it, NB, R, W, M, C)
        for r in range(r0, r1):
            for c in range(c0, c1):
                v = (x[r, c] - center[c]) * scale[c] + shift[c]
                if v < lo:
                    v = lo
                y[r, c] = v


@kernel
def bwd_apply(x, dy, mu, a, b, d, dx, R, W):
    """Elementwise ``dx = a[c] * dy + b[c] * (x - mu[c]) + d[c]``."""
    M, C = x.shape
    NB = (C + W - 1) // W
    K = (M + R - 1) // R
    for it in numba.prange(K * NB):
        k, r0, r1, c0, c1 = _tile(it, NB, R, W, M, C)
        for r in range(r0, r1):
            for c in range(c0, c1):
                dx[r, c] = a[c] * dy[r, c] + b[c] * (x[r, c] - mu[c]) + d[c]
