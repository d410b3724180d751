"""Kernels for a ``(N, C, S)`` view: every ``(n, c)`` is a *run* of ``S`` contiguous elements.

Every kernel walks runs in memory order (``n`` outer, ``c`` inner), so each thread reads one
sequential stream that hardware prefetchers follow.  Walking channel by channel instead (all
``N`` runs of one channel, then the next) measured 2-5x slower on this layout, even when a
channel's data stayed in cache between passes -- except for runs of 128 KB and more, where the
one-call backward, channel by channel, wins (see ``functional._fuse_backward``).

Reductions split the ``(N, C, S)`` grid into tiles of ``R`` rows (``n``), ``W`` channels and
``SB`` positions along ``S``; tile ``(kn, b, ks)`` owns row ``k = kn * KS + ks`` of the partial
buffers ``(K, C)``.  Accumulators are float64 whatever the data type.

Inner loops index 1-D slices from 0: with a loop starting at an unknown offset, Numba's
negative-index wraparound cannot be proven dead and LLVM does not vectorise (measured 12x slower).
"""

import math

import numba
import numpy as np

from .._config import SMALL_PARALLEL_FROM, helper, kernel, specialise
from .merge import (affine_fits32, affine_params_chunked, backward_params, bwd_coefficients,
                    bwd_fits32, chan, grads_out, infer_tiled_template, merged_sums, narrow_centre,
                    unshifted)
from .simd import (affine_run, affine_run_nt, at, block_bwd_sums, block_bwd_sums_pf, block_moments,
                   block_moments32, block_moments32_pf, block_moments_pf, bwd_apply_run,
                   bwd_apply_run_nt, fence, load)


@helper
def _run_sums(p, n, center):
    """Sum of ``x - center`` and of its square over the run of ``n`` values at ``p`` (a
    pointer, see :func:`_channel_moments`)."""
    s1 = 0.0
    s2 = 0.0
    for t in range(n):
        d = load(p, t) - center
        s1 += d
        s2 += d * d
    return s1, s2


@helper(exact=True)
def _m2(d1, d2, n):
    """``d2 - d1^2 / n``; +inf rather than inf - inf = NaN when only the squares overflowed
    (finite data whose spread exceeds the float64 range when squared).  Exact: with
    reassociation LLVM may fold the finiteness test ``d1 - d1 == 0`` to true (it did once
    inlined after the block sums), turning NaN data into an infinite variance."""
    m2 = d2 - d1 * (d1 / n)
    if m2 != m2 and d1 - d1 == 0.0:  # NaN result, finite sum of deviations
        return math.inf
    return m2


@helper
def _run_moments(p, n):
    """Mean (as ``hi + lo``) and sum of squared deviations of the run of ``n`` values at
    ``p``, in one pass.

    The sums are taken of ``x - hi`` with ``hi`` the run's first value, a sample of the run: the
    deviations are of the order of the run's spread, so ``sum(d^2) - sum(d)^2 / n`` loses only
    ``eps * ((hi - mean) / std)^2`` relative, negligible unless the first element is an outlier
    by ~1e4 standard deviations (float64 accumulators).  ``lo = sum(d) / n`` keeps the mean to
    better than float64's resolution of ``hi`` for the merge (``merge.chan``).
    """
    hi = np.float64(load(p, 0))  # float() of a float32 stays float32 in Numba
    d1, d2 = _run_sums(p, n, hi)
    return hi, d1 / n, _m2(d1, d2, n)


# Squares of float32 deviations below float32's normal range lose their low bits; float32 data
# whose sum of squares is under this many per value may hold such squares and goes to float64.
_TINY32 = 2.0 ** -100
# Values per run and per channel from which float32 channels are summed in float32 lanes.
LANES32_RUN = 128
LANES32_FROM = 512


@helper(exact=True)
def _sound32(d1, d2, n):
    """Whether float32-lane sums can be trusted: finite, squares clear of float32's subnormal
    range, and a shift within a standard deviation of the mean (``d1^2 <= n * M2``, i.e.
    ``2 d1^2 <= n d2``, no division on the way), so that ``d2 - d1^2 / n`` cancels at most half
    and the lanes' rounding (1e-8..1e-7 relative) is not magnified.  Exact: the tests must not
    be folded."""
    return d2 < math.inf and d2 >= n * _TINY32 and 2.0 * (d1 * d1) <= n * d2


@helper(exact=True)
def _first_mean(p, S):
    """The mean of the first (up to) 16 values of the run of ``S`` values at ``p``, rounded to
    float32: a shift near most of the channel's values for :func:`_moments32`.  Exact, in four
    interleaved sums (a short wait, in a fixed order): reassociated, the serial and the
    parallel build of a kernel could round the shift, and so the results, differently."""
    k = min(S, 16)
    s0 = s1 = s2 = s3 = 0.0
    t = 0
    while t + 4 <= k:
        s0 += load(p, t)
        s1 += load(p, t + 1)
        s2 += load(p, t + 2)
        s3 += load(p, t + 3)
        t += 4
    while t < k:
        s0 += load(p, t)
        t += 1
    return np.float64(np.float32(((s0 + s1) + (s2 + s3)) / k))


@helper
def _first_means(x):
    """:func:`_first_mean` of every channel: computed once before the tiles, so that a run's
    shift is one load away rather than a chain of additions ahead of its pass ((32, 128, 512):
    157 vs 204 us)."""
    C = x.shape[1]
    out = np.empty(C)
    for c in range(C):
        out[c] = _first_mean(at(x, (0, c, 0)), x.shape[2])
    return out


# placeholders of the templates below, which each copy replaces (_config.specialise)
_lanes32 = _lanes64 = _block = _shifts = None


def _moments32_template(p, rs, n, nrows, h):
    """``(h, d1, d2)``: a shift and the sums of ``x - h`` and of its square over ``nrows`` runs
    of ``n`` values from ``p``, ``rs`` values apart, float32 data (``h`` the caller's
    float32-representable guess).

    In float32 lanes (``_lanes32``: simd.block_moments32, half the vector work of float64
    lanes, which is the bound on cache-resident data: (4096, 1, 512) 236 -> 144 us) where
    :func:`_sound32` says the sums can be trusted; else again in float64 lanes (``_lanes64``),
    about the mean found if that is finite (``h`` was off by over a standard deviation), else
    about the block's first value.  Float32 means and variances stay within a unit in the last
    place of the float64 lanes' (1e-8..1e-7 relative in the variance on normal, skewed, sorted,
    padded and offset data).  One call of each intrinsic: a second float32 attempt made the
    helper too large to inline."""
    L = float(n * nrows)
    d1, d2 = _lanes32((p,), n, nrows, (rs,), (h,))
    if _sound32(d1, d2, L):
        return h, d1, d2
    h = h + d1 / L
    if not abs(h) < math.inf:
        h = np.float64(load(p, 0))
    d1, d2 = _lanes64((p,), n, nrows, (rs,), (h,))
    return h, d1, d2


def _moments32_with(lanes32, lanes64, name):
    """:func:`_moments32_template` over the block sums ``lanes32`` and ``lanes64`` (simd
    intrinsics)."""
    return helper(inline=True)(specialise(_moments32_template, name, _lanes32=lanes32,
                                          _lanes64=lanes64))


_moments32 = _moments32_with(block_moments32, block_moments, "_moments32")
# for the tiles of tensors streamed from memory (see simd.PREFETCH_LINES)
_moments32_pf = _moments32_with(block_moments32_pf, block_moments_pf, "_moments32_pf")


@helper
def _run_bwd_sums(px, pg, n, mu):
    """Sum of ``g`` and of ``g * (x - mu)`` over the runs of ``n`` values at ``px`` (x) and
    ``pg`` (the gradient)."""
    sg = 0.0
    sgx = 0.0
    for t in range(n):
        g = load(pg, t)
        sg += g
        sgx += g * (load(px, t) - mu)
    return sg, sgx


@helper
def _tile(it, shape, R, W, SB):
    """Partial-buffer row ``k`` and the ``n``, ``c`` and ``s`` ranges of work item ``it`` of a
    view of ``shape`` (the shape, not the array: see :func:`_channel_moments`)."""
    N, C, S = shape
    KS = (S + SB - 1) // SB
    NB = (C + W - 1) // W
    ks = it % KS
    rest = it // KS
    b = rest % NB
    kn = rest // NB
    n0 = kn * R
    c0 = b * W
    s0 = ks * SB
    return kn * KS + ks, n0, min(N, n0 + R), c0, min(C, c0 + W), s0, min(S, s0 + SB)


@helper
def _items(x, R, W, SB):
    N, C, S = x.shape
    return ((N + R - 1) // R) * ((C + W - 1) // W) * ((S + SB - 1) // SB)


@helper
def _rows(x):
    """Elements from one row ``n`` of a view to the next (its strides are multiples of the item
    size: views are aligned, see _layout)."""
    return x.strides[0] // x.itemsize


@kernel
def moments(x, R, W, SB, hi, lo, m2):
    """Per tile mean (``hi + lo``) and M2 of each channel into ``hi``, ``lo``, ``m2`` ``[K, C]``.

    Each run's moments (one shifted pass, ``_run_moments``) are folded into the tile's with
    Chan's update (``merge.chan``): memory is read once.
    """
    for it in numba.prange(_items(x, R, W, SB)):
        k, n0, n1, c0, c1, s0, s1 = _tile(it, x.shape, R, W, SB)
        ph = hi[k]
        pl = lo[k]
        p2 = m2[k]
        nr = float(s1 - s0)
        for c in range(c0, c1):
            ph[c], pl[c], p2[c] = _run_moments(at(x, (n0, c, s0)), s1 - s0)
        cnt = nr
        for n in range(n0 + 1, n1):
            for c in range(c0, c1):
                m, ml, s = _run_moments(at(x, (n, c, s0)), s1 - s0)
                pl[c], p2[c] = chan(cnt, ph[c], pl[c], p2[c], nr, m, ml, s)
            cnt += nr


@kernel
def sums(x, center, R, W, SB, s1, s2):
    """Per tile sums of ``x - center[c]`` and of its square into ``s1[K, C]``, ``s2[K, C]``."""
    for it in numba.prange(_items(x, R, W, SB)):
        k, n0, n1, c0, c1, a0, a1 = _tile(it, x.shape, R, W, SB)
        for c in range(c0, c1):
            s1[k, c] = 0.0
            s2[k, c] = 0.0
        for n in range(n0, n1):
            for c in range(c0, c1):
                u, v = _run_sums(at(x, (n, c, a0)), a1 - a0, center[c])
                s1[k, c] += u
                s2[k, c] += v


@helper(inline=True)
def _bwd_sums_tiles(x, dy, mu, R, W, SB, sg, sgx):
    """Per tile sums of ``dy`` and ``dy * (x - mu[c])`` into ``sg[K, C]``, ``sgx[K, C]``."""
    for it in numba.prange(_items(x, R, W, SB)):
        k, n0, n1, c0, c1, a0, a1 = _tile(it, x.shape, R, W, SB)
        for c in range(c0, c1):
            sg[k, c] = 0.0
            sgx[k, c] = 0.0
        for n in range(n0, n1):
            for c in range(c0, c1):
                u, v = _run_bwd_sums(at(x, (n, c, a0)), at(dy, (n, c, a0)), a1 - a0, mu[c])
                sg[k, c] += u
                sgx[k, c] += v


@kernel
def bwd_sums(x, dy, mu, R, W, SB, sg, sgx):
    """:func:`_bwd_sums_tiles` as a kernel."""
    _bwd_sums_tiles(x, dy, mu, R, W, SB, sg, sgx)


def _block_moments(x, R, W, SB, hi, lo, m2):
    """Per tile, each channel's moments in one shifted pass over its ``R`` runs,
    ``_block(p, rows, n, nrows, shift[c]) -> (h, d1, d2)`` (``p`` the tile's first value of the
    channel), with ``shift = _shifts(x)`` computed once: the template of :func:`moments_short`
    and :func:`moments32`."""
    shift = _shifts(x)
    rs = _rows(x)
    for it in numba.prange(_items(x, R, W, SB)):
        k, n0, n1, c0, c1, s0, s1 = _tile(it, x.shape, R, W, SB)
        n = float((n1 - n0) * (s1 - s0))
        for c in range(c0, c1):
            h, d1, d2 = _block(at(x, (n0, c, s0)), rs, s1 - s0, n1 - n0, shift[c])
            hi[k, c] = h
            lo[k, c] = d1 / n
            m2[k, c] = _m2(d1, d2, n)


@helper
def _no_shifts(x):
    return np.zeros(x.shape[1])


@helper(inline=True)
def _first_value_block(p, rs, n, nrows, shift):
    """:func:`_moments32`'s ``(h, d1, d2)`` in float64 lanes about the block's first value
    (``shift`` unused)."""
    h = np.float64(load(p, 0))
    d1, d2 = block_moments((p,), n, nrows, (rs,), (h,))
    return h, d1, d2


_MOMENTS_SHORT_DOC = """:func:`moments` for short runs: each channel of a tile in one shifted pass
    over its ``R`` runs (simd.block_moments; shift: its first value, error bound as
    ``_channel_moments``), instead of per-run moments and a Chan update per run, whose scalar
    arithmetic dominated 49-value runs: (32, 2048, 7, 7) float32 at 2 threads 667 -> 352 us.
    Used for runs of up to 1 KB, in tiles of at least 2 KB per channel (see
    ``functional._SHORT_MOMENTS_BYTES``)."""
_MOMENTS32_DOC = """:func:`moments_short` for float32 data in float32 lanes (:func:`_moments32`,
    shifts: ``_first_means``), where :func:`lanes32` says so, for runs of any length: one pass
    per tile and channel."""
moments_short = kernel(specialise(_block_moments, "moments_short", _MOMENTS_SHORT_DOC,
                                   _block=_first_value_block, _shifts=_no_shifts), exact=True)
moments32 = kernel(specialise(_block_moments, "moments32", _MOMENTS32_DOC, _block=_moments32_pf,
                              _shifts=_first_means), exact=True)


@helper(exact=True, inline=True)
def _bwd_sums_short_tiles(x, dy, mu, R, W, SB, sg, sgx):
    """:func:`bwd_sums` for short runs (see :func:`moments_short`): 758 -> 495 us there."""
    rs = (_rows(x), _rows(dy))
    for it in numba.prange(_items(x, R, W, SB)):
        k, n0, n1, c0, c1, a0, a1 = _tile(it, x.shape, R, W, SB)
        for c in range(c0, c1):
            sg[k, c], sgx[k, c] = block_bwd_sums_pf((at(x, (n0, c, a0)), at(dy, (n0, c, a0))),
                                                    a1 - a0, n1 - n0, rs, (mu[c],))


@kernel(exact=True)
def bwd_sums_short(x, dy, mu, R, W, SB, sg, sgx):
    """:func:`_bwd_sums_short_tiles` as a kernel."""
    _bwd_sums_short_tiles(x, dy, mu, R, W, SB, sg, sgx)


@helper
def _row_items(x, RB, SB):
    """Work items of an elementwise pass over the ``(N * C, S)`` rows of ``x``: tiles of ``RB``
    rows by ``SB`` positions."""
    N, C, S = x.shape
    return ((N * C + RB - 1) // RB) * ((S + SB - 1) // SB)


@helper
def _row_tile(it, shape, RB, SB):
    """Rows ``[r0, r1)`` (``r = n * C + c``) and positions ``[s0, s0 + m)`` of work item ``it``
    of a view of ``shape``: the same run length ``m`` for each row of the tile."""
    N, C, S = shape
    KS = (S + SB - 1) // SB
    kr = it // KS
    r0 = kr * RB
    s0 = (it - kr * KS) * SB
    return r0, min(N * C, r0 + RB), s0, min(S, s0 + SB) - s0


# Elementwise passes walk each tile with nested loops over n and c, each run of the same length:
# stepping (n, c) by hand with a wrap test, or giving each run its own length (tiles of flat
# positions), measured 1.3x slower on data streamed from memory and up to 1.2x in cache
# ((32, 256, 196) float32 inference kernel, 1 thread, cache flushed: 428 -> 321 us; (64, 512, 49)
# in cache 160 -> 122 us), though each thread reads the same stream either way.
@helper(exact=True, inline=True)
def _affine_tiles(x, center, scale, shift, lo, y, RB, SB, nt):
    """Elementwise ``y = max((x - center[c]) * scale[c] + shift[c], lo)`` in tiles of ``RB``
    rows by ``SB`` positions; ``nt``: stream ``y`` past the cache (see simd)."""
    C = x.shape[1]
    for it in numba.prange(_row_items(x, RB, SB)):
        r0, r1, s, m = _row_tile(it, x.shape, RB, SB)
        for n in range(r0 // C, (r1 - 1) // C + 1):
            for c in range(max(0, r0 - n * C), min(C, r1 - n * C)):
                src = (at(x, (n, c, s)),)
                dst = at(y, (n, c, s))
                par = (center[c], scale[c], shift[c], lo)
                if nt:
                    affine_run_nt(src, dst, m, par)
                else:
                    affine_run(src, dst, m, par)
        if nt:
            fence()


@kernel(exact=True)
def affine(x, center, scale, shift, lo, y, RB, SB, nt):
    """:func:`_affine_tiles` as a kernel."""
    _affine_tiles(x, center, scale, shift, lo, y, RB, SB, nt)


infer_tiled = kernel(specialise(infer_tiled_template, "channels_first_infer_tiled",
                                 _affine_tiles=_affine_tiles), exact=True)


@helper(exact=True, inline=True)
def _bwd_apply_tiles(x, dy, mu, a, q, r, dx, RB, SB, nt):
    """Elementwise ``dx = a[c] * (dy + q[c] * (x - mu[c]) + r[c])``, tiled as :func:`affine`."""
    C = x.shape[1]
    for it in numba.prange(_row_items(x, RB, SB)):
        r0, r1, s, m = _row_tile(it, x.shape, RB, SB)
        for n in range(r0 // C, (r1 - 1) // C + 1):
            for c in range(max(0, r0 - n * C), min(C, r1 - n * C)):
                src = (at(x, (n, c, s)), at(dy, (n, c, s)))
                dst = at(dx, (n, c, s))
                par = (mu[c], a[c], q[c], r[c])
                if nt:
                    bwd_apply_run_nt(src, dst, m, par)
                else:
                    bwd_apply_run(src, dst, m, par)
        if nt:
            fence()


@kernel(exact=True)
def bwd_apply(x, dy, mu, a, q, r, dx, RB, SB, nt):
    """:func:`_bwd_apply_tiles` as a kernel."""
    _bwd_apply_tiles(x, dy, mu, a, q, r, dx, RB, SB, nt)


@kernel(exact=True)
def backward_tiled(x, dy, mu, invstd, weight, R, W, SB, short, RB, SBe, narrow, a, a32, dx,
                   grads, nt):
    """Backward in training mode in one call: :func:`bwd_sums` (``short``:
    :func:`bwd_sums_short`) in tiles of ``R`` rows, ``W`` channels and ``SB`` positions, their
    merge, ``merge.backward_params`` into the scratch ``a`` and ``a32`` (as
    :func:`infer_tiled`), ``grads`` (``dweight``, ``dbias``), then ``dx`` in tiles of ``RB``
    rows by ``SBe`` positions: the passes, merge and parameters of the Python-driven backward,
    so the same results, without the Python steps, scratch arrays and dispatches in between.
    ``mu``, ``invstd`` and ``weight`` (or None) come as the caller passed them.  Returns False,
    with nothing written to ``dx``, where float32 data needs float64 lanes: the caller finishes
    with the parameters in ``a``."""
    N, C, S = x.shape
    m = mu.astype(np.float64)
    istd = invstd.astype(np.float64)
    parts = np.empty((2, ((N + R - 1) // R) * ((S + SB - 1) // SB), C))
    if short:
        _bwd_sums_short_tiles(x, dy, m, R, W, SB, parts[0], parts[1])
    else:
        _bwd_sums_tiles(x, dy, m, R, W, SB, parts[0], parts[1])
    sums = np.empty((2, C))
    merged_sums(parts, sums)
    grads_out(sums, istd, grads)
    if backward_params(sums, m, istd, weight, float(N * S), True, narrow, a, a32) != narrow:
        return False
    _bwd_apply_tiles(x, dy, a32[0, :C], a32[1, :C], a32[2, :C], a32[3, :C], dx, RB, SBe, nt)
    return True


@helper(exact=True, inline=True)
def _channel_moments(p, rs, N, S, lanes):
    """Mean and M2 of the channel of ``N`` runs of ``S`` values from ``p`` (``rs`` values
    apart), in one shifted pass (for the one-call kernels): float32 data in float32 lanes
    (:func:`_moments32`) where ``lanes`` (:func:`lanes32`), else sums of ``x - x[0, c, 0]`` in
    float64 lanes.  The latter's relative loss is ``eps * ((x0 - mean) / std)^2`` (see
    :func:`_run_moments`), at most ``eps * L`` for ``L`` values even if ``x0`` is the one
    outlier: below 1e-10 for the at most 512k values per channel of a one-call tensor (a
    channel of at most a sixteenth of a 32 MB cache).  Per-run moments merged with Chan's
    update cost 2x more per channel on short runs.  A mean that is not finite: see
    :func:`_unshifted_channel`.

    Pointers, not the array: a jitted function given an array takes a reference to it on
    entry and drops it on exit, two atomic operations on a count all threads share, which
    Numba's refcount pruning left in place even in a helper it inlined.  Once per channel they
    took most of a small call: (1, 512, 7, 7) float32 statistics kernel at one thread 14.7 ->
    3.7 us; whole calls alternating in one process, statistics 16.5 -> 5.7 us at one thread
    and 6.5 -> 5.2 us at two, training 21.2 -> 14.0 and 11.9 -> 10.1 us."""
    if lanes:
        hi, d1, d2 = _moments32(p, rs, S, N, _first_mean(p, S))
    else:
        hi, d1, d2 = _first_value_block(p, rs, S, N, 0.0)
    L = float(N * S)
    return hi + d1 / L, _m2(d1, d2, L)


@helper(exact=True)
def _unshifted_channel(x, c, m2):
    """``(mean, M2)`` of channel ``c`` whose shifted sums gave a mean that is not finite
    (infinities or NaN in the channel: the sums saw inf - inf, or reached the infinity; or
    finite values whose deviations overflowed), its values summed again unshifted, see
    merge.unshifted.  In the kernel rather than by NumPy afterwards, whose test for NaN means
    cost 1.5 us of a 5 us call."""
    N, C, S = x.shape
    inv = 1.0 / (N * S)
    t = 0.0
    for n in range(N):
        for s in range(S):
            t += x[n, c, s] * inv
    return unshifted(t, m2)


@helper
def lanes32(x):
    """Whether the channels of ``x`` are summed in float32 lanes (:func:`_moments32`): float32
    data, with runs and channels long enough to repay the fixed cost (a shift, a check, the
    widening of the lane sums).  Whole calls at one thread, alternating with the float64 lanes
    in one process, statistics and training: (8, 64, 32, 32) 1.60x and 1.21x, (1, 64, 112,
    112) 1.86x and 1.30x, (32, 256, 14, 14) 1.41x and 1.18x, (8, 256, 1000) 1.58x and 1.21x,
    (32, 128, 512) 1.15x and 1.03x, (64, 3, 224, 224), streamed from memory, 1.13x and 1.02x.
    Rows of 49 values (three lines and a scalar tail) lost, 0.91-0.97x for (32, 2048, 7, 7), and
    (1, 512, 7, 7) statistics 0.73x: they stay in float64 lanes."""
    return (x.itemsize == 4 and x.shape[2] >= LANES32_RUN
            and x.shape[0] * x.shape[2] >= LANES32_FROM)


@kernel(exact=True, serial_below=2 * SMALL_PARALLEL_FROM)
def stats_small(x, denom, out):
    """Per-channel mean and variance (M2 / ``denom``) into ``out[0]``, ``out[1]`` (either float
    type) in one call, for tensors small enough to sit in cache whole: there the kernel
    launches, not the memory traffic, are the cost (``functional._fuse``).  Float32 channels in
    float32 lanes where :func:`lanes32` says so."""
    N, C, S = x.shape
    lanes = lanes32(x)
    rs = _rows(x)
    for c in numba.prange(C):
        m, m2 = _channel_moments(at(x, (0, c, 0)), rs, N, S, lanes)
        if not abs(m) < math.inf:
            m, m2 = _unshifted_channel(x, c, m2)
        out[0, c] = m
        out[1, c] = m2 / denom


@kernel(exact=True)
def infer_small(x, center, var, weight, bias, eps, lo, narrow, y, params):
    """Inference in one call for small tensors: the per-channel parameters of
    ``merge.affine_params_chunked`` (into the float64 scratch ``params``), then ``y``, each
    channel in the lanes ``functional._affine`` would use -- float32 when ``narrow`` and the
    parameters allow it -- so results equal the general path's.

    ``y`` is written in memory order, a few runs of one sample per work item: channel by
    channel, a channel's runs lie a sample apart, often a whole number of pages (see
    ``_pool.empty_apart``), and the walk measured up to 2x slower (2 threads, float32: (32, 128,
    8, 8) 32.6 -> 15.8 us, (16, 128, 8, 8) 14.6 -> 9.5 us; (1, 512, 7, 7) 5.9 -> 5.6 us; a
    few samples of 49-value runs lost up to 8 %: (8, 128, 7, 7) 7.0 -> 7.6 us).  At least 64
    items where there are rows enough, at most 8 runs each: one run per item measured slower
    than channel by channel ((32, 128, 7, 7) kernel 14.4 against 9.3 us)."""
    N, C, S = x.shape
    p32 = np.empty((3, C), np.float32)
    ok = affine_params_chunked(center, var, weight, bias, eps, 0, narrow, params, p32)
    lo32 = np.float32(lo)
    B = max(1, min(8, N * C // 64))
    KB = (C + B - 1) // B
    for it in numba.prange(N * KB):
        n = it // KB
        c0 = (it - n * KB) * B
        c1 = min(C, c0 + B)
        if ok:
            for c in range(c0, c1):
                par32 = (p32[0, c], p32[1, c], p32[2, c], lo32)
                affine_run((at(x, (n, c, 0)),), at(y, (n, c, 0)), S, par32)
        else:
            for c in range(c0, c1):
                par = (params[0, c], params[1, c], params[2, c], lo)
                affine_run((at(x, (n, c, 0)),), at(y, (n, c, 0)), S, par)


@kernel(exact=True, serial_below=SMALL_PARALLEL_FROM)
def train_small(x, weight, bias, eps, narrow, y, mean, var, nt):
    """Forward training in one call for small tensors (see :func:`stats_small`) and for
    channels that fit in cache (``functional._long_channels``): each channel's statistics,
    then its normalisation in the lanes of ``functional._affine`` -- float32 when ``narrow``
    and the channel's parameters allow it (``merge.affine_fits32``; float64 lanes made
    (4, 32, 4096) float32 take 87 us instead of 70); ``nt``: stream ``y`` past the cache.
    ``weight`` and ``bias`` (either float type, or None) come as the caller passed them (see
    :func:`backward_small`)."""
    N, C, S = x.shape
    L = float(N * S)
    lanes = lanes32(x)
    rs = _rows(x)
    for c in numba.prange(C):
        m, s = _channel_moments(at(x, (0, c, 0)), rs, N, S, lanes)
        if not abs(m) < math.inf:
            m, s = _unshifted_channel(x, c, s)
        v = s / L
        mean[c] = m
        var[c] = v
        sc = 1.0 / math.sqrt(v + eps)
        if weight is not None:
            sc *= weight[c]
        sh = 0.0 if bias is None else np.float64(bias[c])
        if narrow and affine_fits32(m, sc, sh, v, L):
            m32, sh32 = narrow_centre(m, sc, sh)
            par32 = (np.float32(m32), np.float32(sc), np.float32(sh32), np.float32(-math.inf))
            for n in range(N):
                if nt:
                    affine_run_nt((at(x, (n, c, 0)),), at(y, (n, c, 0)), S, par32)
                else:
                    affine_run((at(x, (n, c, 0)),), at(y, (n, c, 0)), S, par32)
        else:
            par = (m, sc, sh, -math.inf)
            for n in range(N):
                if nt:
                    affine_run_nt((at(x, (n, c, 0)),), at(y, (n, c, 0)), S, par)
                else:
                    affine_run((at(x, (n, c, 0)),), at(y, (n, c, 0)), S, par)
        if nt:
            fence()


@kernel(exact=True, serial_below=SMALL_PARALLEL_FROM)
def backward_small(x, dy, mu, invstd, weight, training, narrow, dx, grads, nt):
    """Backward in one call for small tensors (see :func:`stats_small`), and for channels that
    fit in cache (``functional._fuse_backward``): per channel, the sums ``sum(dy)`` and
    ``sum(dy * (x - mu))``, then ``dx`` in the factored form of ``merge.backward_params``, in
    float32 lanes when ``narrow`` (float32 data) and the channel's coefficients allow it (half
    the cost of float64 lanes: (1, 512, 7, 7) 7.2 -> 3.6 us), else float64; ``grads`` (dtype
    of ``x``) gets ``dweight`` and ``dbias``; ``nt``: stream ``dx`` past the cache.  ``mu``,
    ``invstd`` and ``weight`` (or None) come as the caller passed them: converting them here
    saves three NumPy calls, a third of a small call's cost."""
    N, C, S = x.shape
    L = float(N * S)
    for c in numba.prange(C):
        m = np.float64(mu[c])
        sg, sgx = block_bwd_sums((at(x, (0, c, 0)), at(dy, (0, c, 0))), S, N,
                                 (_rows(x), _rows(dy)), (m,))
        istd = np.float64(invstd[c])
        grads[0, c] = sgx * istd
        grads[1, c] = sg
        a = istd if weight is None else np.float64(weight[c]) * istd
        if training:
            q, r = bwd_coefficients(sg, sgx, istd, L, True)
            # The run loop is written out for each parameter type: as a helper, LLVM left it
            # out of line ((1, 512, 7, 7) kernel 23 -> 37 us), and inlined by Numba it measured
            # 15 -> 18 us.
            if narrow and bwd_fits32(m, a, q, r, istd, L):
                m32, r32 = narrow_centre(m, q, r)
                par32 = (np.float32(m32), np.float32(a), np.float32(q), np.float32(r32))
                for n in range(N):
                    src = (at(x, (n, c, 0)), at(dy, (n, c, 0)))
                    if nt:
                        bwd_apply_run_nt(src, at(dx, (n, c, 0)), S, par32)
                    else:
                        bwd_apply_run(src, at(dx, (n, c, 0)), S, par32)
            else:
                par = (m, a, q, r)
                for n in range(N):
                    src = (at(x, (n, c, 0)), at(dy, (n, c, 0)))
                    if nt:
                        bwd_apply_run_nt(src, at(dx, (n, c, 0)), S, par)
                    else:
                        bwd_apply_run(src, at(dx, (n, c, 0)), S, par)
        else:
            # evaluation mode: dx = a * dy, independent of x (an infinite x must not give NaN)
            par = (0.0, a, 0.0, -math.inf)
            for n in range(N):
                if nt:
                    affine_run_nt((at(dy, (n, c, 0)),), at(dx, (n, c, 0)), S, par)
                else:
                    affine_run((at(dy, (n, c, 0)),), at(dx, (n, c, 0)), S, par)
        if nt:
            fence()

