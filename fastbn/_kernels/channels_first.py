"""Kernels for a ``(N, C, S)`` view: each channel is ``N`` runs of ``S`` elements.

Inner loops index 1-D slices from 0: with a loop starting at an unknown offset, Numba's
negative-index wraparound cannot be proven dead and LLVM does not vectorise (measured 12x slower).

A reduction over channel ``c`` visits the flat positions ``i = n * S + s`` in ``[0, N * S)``;
a *chunk* is a range of those positions, walked as contiguous segments of one run each, so the
innermost loop is a unit-stride loop that LLVM vectorises.  Accumulators are float64 whatever
the data type.
"""

import math

import numba

from .._config import helper, kernel


@helper
def _run(i, i1, S):
    """The run holding flat channel position ``i``: its ``n`` and the slice ``[s, e)`` of it
    that lies before ``i1``."""
    n = i // S
    s = i - n * S
    return n, s, min(S, s + (i1 - i))


@helper
def _run_sums(x, n, c, s, e, center):
    xr = x[n, c, s:e]
    s1 = 0.0
    s2 = 0.0
    for t in range(xr.shape[0]):
        d = xr[t] - center
        s1 += d
        s2 += d * d
    return s1, s2


@helper
def _run_bwd_sums(x, dy, n, c, s, e, mu):
    xr = x[n, c, s:e]
    gr = dy[n, c, s:e]
    sg = 0.0
    sgx = 0.0
    for t in range(xr.shape[0]):
        g = gr[t]
        sg += g
        sgx += g * (xr[t] - mu)
    return sg, sgx


@helper
def _run_affine(x, n, c, s, e, center, scale, shift, lo, y):
    # Centering before scaling keeps float32 results accurate when the mean is large relative
    # to the spread (``x * scale + shift`` would cancel catastrophically).  ``lo`` is -inf
    # without ReLU; the comparison is written so that NaN passes through.
    xr = x[n, c, s:e]
    yr = y[n, c, s:e]
    for t in range(xr.shape[0]):
        v = (xr[t] - center) * scale + shift
        if v < lo:
            v = lo
        yr[t] = v


@helper
def _run_bwd_apply(x, dy, n, c, s, e, mu, a, b, d, dx):
    xr = x[n, c, s:e]
    gr = dy[n, c, s:e]
    dr = dx[n, c, s:e]
    for t in range(xr.shape[0]):
        dr[t] = a * gr[t] + b * (xr[t] - mu) + d


@helper
def _seg_sums(x, c, i0, i1, center):
    """Sum of ``x - center`` and of its square over positions ``[i0, i1)`` of channel ``c``."""
    s1 = 0.0
    s2 = 0.0
    i = i0
    while i < i1:
        n, s, e = _run(i, i1, x.shape[2])
        a1, a2 = _run_sums(x, n, c, s, e, center)
        s1 += a1
        s2 += a2
        i += e - s
    return s1, s2


@helper
def _seg_moments(x, c, i0, i1):
    """Mean and sum of squared deviations of one chunk, by two passes over it.

    The chunk is small enough to stay in cache, so the second pass costs no memory traffic:
    one pass over memory with the accuracy of the two-pass algorithm.  The second pass also
    returns the sum of deviations, which corrects the mean's rounding error (the "corrected
    two-pass" formula of Chan, Golub & LeVeque).
    """
    n = i1 - i0
    total, _ = _seg_sums(x, c, i0, i1, 0.0)
    m = total / n
    d1, d2 = _seg_sums(x, c, i0, i1, m)
    return m + d1 / n, d2 - d1 * d1 / n


@helper
def _seg_bwd_sums(x, dy, c, i0, i1, mu):
    """Sum of ``dy`` and of ``dy * (x - mu)`` over positions ``[i0, i1)`` of channel ``c``."""
    sg = 0.0
    sgx = 0.0
    i = i0
    while i < i1:
        n, s, e = _run(i, i1, x.shape[2])
        a1, a2 = _run_bwd_sums(x, dy, n, c, s, e, mu)
        sg += a1
        sgx += a2
        i += e - s
    return sg, sgx


@kernel
def moments(x, K, mean, m2):
    """Per (channel, chunk) mean and M2 into ``mean[C, K]``, ``m2[C, K]``; chunk ``k`` of a
    channel covers positions ``[k*L//K, (k+1)*L//K)`` with ``L = N * S``."""
    N, C, S = x.shape
    L = N * S
    for it in numba.prange(C * K):
        c = it // K
        k = it - c * K
        i0 = k * L // K
        i1 = (k + 1) * L // K
        mean[c, k], m2[c, k] = _seg_moments(x, c, i0, i1)


@kernel
def sums(x, center, K, s1, s2):
    """Per (channel, chunk) sums of ``x - center[c]`` and of its square."""
    N, C, S = x.shape
    L = N * S
    for it in numba.prange(C * K):
        c = it // K
        k = it - c * K
        s1[c, k], s2[c, k] = _seg_sums(x, c, k * L // K, (k + 1) * L // K, center[c])


@kernel
def bwd_sums(x, dy, mu, K, sg, sgx):
    """Per (channel, chunk) sums of ``dy`` and ``dy * (x - mu[c])``."""
    N, C, S = x.shape
    L = N * S
    for it in numba.prange(C * K):
        c = it // K
        k = it - c * K
        sg[c, k], sgx[c, k] = _seg_bwd_sums(x, dy, c, k * L // K, (k + 1) * L // K, mu[c])


@helper
def _flat_run(i, i1, S, C):
    """The run holding flat array position ``i`` of a ``(N, C, S)`` array: ``n``, ``c`` and
    the slice ``[s, e)`` of it that lies before ``i1``."""
    row = i // S
    n = row // C
    s = i - row * S
    return n, row - n * C, s, min(S, s + (i1 - i))


@kernel
def affine(x, center, scale, shift, lo, y, K):
    """Elementwise ``y = max((x - center[c]) * scale[c] + shift[c], lo)``.

    The array is walked in memory order (``K`` equal ranges of flat positions), which keeps
    every thread on one sequential stream whatever ``S`` is.
    """
    N, C, S = x.shape
    T = N * C * S
    for k in numba.prange(K):
        i = k * T // K
        i1 = (k + 1) * T // K
        while i < i1:
            n, c, s, e = _flat_run(i, i1, S, C)
            _run_affine(x, n, c, s, e, center[c], scale[c], shift[c], lo, y)
            i += e - s


@kernel
def bwd_apply(x, dy, mu, a, b, d, dx, K):
    """Elementwise ``dx = a[c] * dy + b[c] * (x - mu[c]) + d[c]``, in memory order."""
    N, C, S = x.shape
    T = N * C * S
    for k in numba.prange(K):
        i = k * T // K
        i1 = (k + 1) * T // K
        while i < i1:
            n, c, s, e = _flat_run(i, i1, S, C)
            _run_bwd_apply(x, dy, n, c, s, e, mu[c], a[c], b[c], d[c], dx)
            i += e - s


@kernel
def train_fused(x, weight, bias, eps, y, mean, var):
    """Forward training with one work item per channel: statistics, then normalisation while
    the channel is still in cache (used when a channel's slab fits in L2)."""
    N, C, S = x.shape
    L = N * S
    for c in numba.prange(C):
        m, s = _seg_moments(x, c, 0, L)
        v = s / L
        mean[c] = m
        var[c] = v
        sc = weight[c] / math.sqrt(v + eps)
        for n in range(N):
            _run_affine(x, n, c, 0, S, m, sc, bias[c], -math.inf, y)


@kernel
def bwd_fused(x, dy, mu, invstd, weight, dx, sg_out, sgx_out):
    """Training-mode backward with one work item per channel: the two sums, then ``dx`` while
    the channel's ``x`` and ``dy`` are still in cache."""
    N, C, S = x.shape
    L = N * S
    for c in numba.prange(C):
        sg, sgx = _seg_bwd_sums(x, dy, c, 0, L, mu[c])
        sg_out[c] = sg
        sgx_out[c] = sgx
        istd = invstd[c]
        a = weight[c] * istd
        b = -a * istd * istd * sgx / L
        d = -a * sg / L
        for n in range(N):
            _run_bwd_apply(x, dy, n, c, 0, S, mu[c], a, b, d, dx)
