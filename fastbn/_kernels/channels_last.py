"""Kernels for a ``(M, C)`` view with the channel axis innermost (NC, NHWC, ...).

Work items are tiles of ``R`` rows by ``W`` channels.  Inner loops run across channels, so they
are unit-stride and vectorise; per-channel accumulators are a row of a partial buffer owned by
the tile (``parts[k, c]`` for row block ``k``), merged afterwards in a fixed order.  Inner loops
index 1-D slices from 0 so that Numba's negative-index handling does not block vectorisation.
"""

import math

import numba
import numpy as np

from .._config import SMALL_PARALLEL_FROM, helper, kernel, specialise
from .channels_first import _m2, _rows
from .merge import (affine_params_chunked, backward_params, bwd_coefficients, bwd_fits32,
                    grads_out, infer_tiled_template, merged_moments, merged_sums, narrow_centre,
                    tile_columns, unshifted)
from .simd import (affine_rows, affine_rows_hoisted, affine_rows_nt, at, bwd_apply_rows,
                   bwd_apply_rows_hoisted, bwd_apply_rows_nt, column_bwd_sums, column_moments,
                   fence, load, store)


@helper
def _tile(it, NB, R, W, M, C):
    """Row block ``k`` and the row and channel ranges of work item ``it``."""
    k = it // NB
    b = it - k * NB
    r0 = k * R
    c0 = b * W
    return k, r0, min(M, r0 + R), c0, min(C, c0 + W)


@helper
def _tiles(x, R, W):
    M, C = x.shape
    NB = (C + W - 1) // W
    return M, C, NB, ((M + R - 1) // R) * NB


@helper
def _rows_sums(x, r0, r1, c0, c1, center, a1, a2):
    """Add ``x - center`` and its square over rows ``[r0, r1)`` into ``a1``, ``a2`` (channels
    ``[c0, c1)``).  Four rows per update: the accumulators live in memory, and touching them once
    per four rows instead of every row measured 1.8x faster."""
    r = r0
    while r + 4 <= r1:
        xa = x[r, c0:c1]
        xb = x[r + 1, c0:c1]
        xc = x[r + 2, c0:c1]
        xd = x[r + 3, c0:c1]
        for c in range(xa.shape[0]):
            m = center[c]
            da = xa[c] - m
            db = xb[c] - m
            dc = xc[c] - m
            dd = xd[c] - m
            a1[c] += (da + db) + (dc + dd)
            a2[c] += (da * da + db * db) + (dc * dc + dd * dd)
        r += 4
    for q in range(r, r1):
        xr = x[q, c0:c1]
        for c in range(xr.shape[0]):
            d = xr[c] - center[c]
            a1[c] += d
            a2[c] += d * d


@helper
def _rows_bwd_sums(x, dy, r0, r1, c0, c1, mu, a1, a2):
    """Add ``dy`` and ``dy * (x - mu)`` over rows ``[r0, r1)`` into ``a1``, ``a2``, four rows
    per update as in :func:`_rows_sums`."""
    r = r0
    while r + 4 <= r1:
        xa = x[r, c0:c1]
        xb = x[r + 1, c0:c1]
        xc = x[r + 2, c0:c1]
        xd = x[r + 3, c0:c1]
        ga = dy[r, c0:c1]
        gb = dy[r + 1, c0:c1]
        gc = dy[r + 2, c0:c1]
        gd = dy[r + 3, c0:c1]
        for c in range(xa.shape[0]):
            m = mu[c]
            # float64 before adding: four float32 gradients near the maximum overflow
            g0 = np.float64(ga[c])
            g1 = np.float64(gb[c])
            g2 = np.float64(gc[c])
            g3 = np.float64(gd[c])
            a1[c] += (g0 + g1) + (g2 + g3)
            a2[c] += (g0 * (xa[c] - m) + g1 * (xb[c] - m)) + (g2 * (xc[c] - m) + g3 * (xd[c] - m))
        r += 4
    for q in range(r, r1):
        xr = x[q, c0:c1]
        gr = dy[q, c0:c1]
        for c in range(xr.shape[0]):
            g = gr[c]
            a1[c] += g
            a2[c] += g * (xr[c] - mu[c])


@helper
def _finish(s1, s2, n):
    for c in range(s1.shape[0]):
        s2[c] = _m2(s1[c], s2[c], n)
        s1[c] /= n


@helper(exact=True, inline=True)
def _moments_tiles(x, R, W, hi, lo, m2):
    """Per tile mean (``hi + lo``) and M2 of each channel into ``hi``, ``lo``, ``m2`` ``[K, C]``.

    One pass over the tile: sums of ``x - hi`` with ``hi`` the tile's first row, a sample of
    each channel, so the deviations are of the order of the spread (see the channels-first
    ``_run_moments`` for the error bound), held in registers across the tile
    (simd.column_moments), in float64.  Compiled without fast-math flags: Numba puts them on
    every instruction, the vector sums' included, and reassociation then differed between the
    serial and parallel builds, so results depended on the thread count.
    """
    M, C, NB, items = _tiles(x, R, W)
    for it in numba.prange(items):
        k, r0, r1, c0, c1 = _tile(it, NB, R, W, M, C)
        h = hi[k, c0:c1]
        x0 = x[r0, c0:c1]
        for c in range(h.shape[0]):
            h[c] = x0[c]
        column_moments((at(x, (r0 + 1, c0)),), r1 - r0 - 1, c1 - c0, (_rows(x),),
                       (at(x, (r0, c0)),), at(lo, (k, c0)), at(m2, (k, c0)))
        _finish(lo[k, c0:c1], m2[k, c0:c1], float(r1 - r0))


# The passes are loops of their own (inlined by Numba, whose parallel loops they keep), run as
# kernels from Python or back to back in the one-call kernels of tiled tensors (stats_tiled).
@kernel(exact=True)
def moments(x, R, W, hi, lo, m2):
    """:func:`_moments_tiles` as a kernel."""
    _moments_tiles(x, R, W, hi, lo, m2)


@kernel
def sums(x, center, R, W, s1, s2):
    """Per tile sums of ``x - center[c]`` and of its square into ``s1[K, C]``, ``s2[K, C]``."""
    M, C, NB, items = _tiles(x, R, W)
    for it in numba.prange(items):
        k, r0, r1, c0, c1 = _tile(it, NB, R, W, M, C)
        a1 = s1[k, c0:c1]
        a2 = s2[k, c0:c1]
        a1[:] = 0.0
        a2[:] = 0.0
        _rows_sums(x, r0, r1, c0, c1, center[c0:c1], a1, a2)


@helper(exact=True, inline=True)
def _bwd_sums_tiles(x, dy, mu, R, W, sg, sgx):
    """Per tile sums of ``dy`` and ``dy * (x - mu[c])`` into ``sg[K, C]``, ``sgx[K, C]``
    (float64 terms, in registers across the tile: simd.column_bwd_sums)."""
    M, C, NB, items = _tiles(x, R, W)
    strides = (_rows(x), _rows(dy))
    for it in numba.prange(items):
        k, r0, r1, c0, c1 = _tile(it, NB, R, W, M, C)
        column_bwd_sums((at(x, (r0, c0)), at(dy, (r0, c0))), r1 - r0, c1 - c0, strides,
                        (at(mu, (c0,)),), at(sg, (k, c0)), at(sgx, (k, c0)))


@kernel(exact=True)
def bwd_sums(x, dy, mu, R, W, sg, sgx):
    """:func:`_bwd_sums_tiles` as a kernel."""
    _bwd_sums_tiles(x, dy, mu, R, W, sg, sgx)


@kernel
def bwd_sums_wide(x, dy, mu, R, W, sg, sgx):
    """Per tile sums of ``dy`` and ``dy * (x - mu[c])`` into ``sg[K, C]``, ``sgx[K, C]``, four
    rows per accumulator update: for wide rows (see functional._cl_reduction)."""
    M, C, NB, items = _tiles(x, R, W)
    for it in numba.prange(items):
        k, r0, r1, c0, c1 = _tile(it, NB, R, W, M, C)
        a1 = sg[k, c0:c1]
        a2 = sgx[k, c0:c1]
        a1[:] = 0.0
        a2[:] = 0.0
        _rows_bwd_sums(x, dy, r0, r1, c0, c1, mu[c0:c1], a1, a2)


@helper(exact=True, inline=True)
def _affine_tiles(x, center, scale, shift, lo, y, R, W, nt):
    """Elementwise ``y = max((x - center[c]) * scale[c] + shift[c], lo)``; NaN passes through
    (centring as in the channels-first kernel).  A tile's rows are vector runs with
    per-element parameters (see simd); ``nt``: stream ``y`` past the cache."""
    M, C, NB, items = _tiles(x, R, W)
    strides = (_rows(x), _rows(y))
    for it in numba.prange(items):
        k, r0, r1, c0, c1 = _tile(it, NB, R, W, M, C)
        src = (at(x, (r0, c0)),)
        dst = at(y, (r0, c0))
        par = (at(center, (c0,)), at(scale, (c0,)), at(shift, (c0,)), lo)
        if nt:
            affine_rows_nt(src, dst, c1 - c0, par, r1 - r0, strides)
            fence()
        else:
            affine_rows_hoisted(src, dst, c1 - c0, par, r1 - r0, strides)


@kernel(exact=True)
def affine(x, center, scale, shift, lo, y, R, W, nt):
    """:func:`_affine_tiles` as a kernel."""
    _affine_tiles(x, center, scale, shift, lo, y, R, W, nt)


@helper(exact=True, inline=True)
def _bwd_apply_tiles(x, dy, mu, a, q, r, dx, R, W, nt):
    """Elementwise ``dx = a[c] * (dy + q[c] * (x - mu[c]) + r[c])``, tiles as in ``affine``."""
    M, C, NB, items = _tiles(x, R, W)
    strides = (_rows(x), _rows(dy), _rows(dx))
    for it in numba.prange(items):
        k, r0, r1, c0, c1 = _tile(it, NB, R, W, M, C)
        src = (at(x, (r0, c0)), at(dy, (r0, c0)))
        dst = at(dx, (r0, c0))
        par = (at(mu, (c0,)), at(a, (c0,)), at(q, (c0,)), at(r, (c0,)))
        if nt:
            bwd_apply_rows_nt(src, dst, c1 - c0, par, r1 - r0, strides)
            fence()
        else:
            bwd_apply_rows_hoisted(src, dst, c1 - c0, par, r1 - r0, strides)


@kernel(exact=True)
def bwd_apply(x, dy, mu, a, q, r, dx, R, W, nt):
    """:func:`_bwd_apply_tiles` as a kernel."""
    _bwd_apply_tiles(x, dy, mu, a, q, r, dx, R, W, nt)


# ----------------------------------------------------------------------------- tiled, one call
# The tiled passes of an operation back to back in one kernel call: the same tiles, merges and
# parameters as when Python drives the passes one by one (so the same results), without the
# Python steps, scratch arrays and dispatches in between (about 5 us a call).  Whole calls,
# float32, alternating in one process with the passes driven from Python, statistics, training
# and backward, 2 threads: (8, 12, 12, 48) 1.60x, 1.46x and 1.33x (1.58x, 1.41x and 1.29x at
# one thread), (4, 14, 14, 64) 1.61x, 1.47x, 1.40x, (1024, 64) 1.62x, 1.48x, 1.37x,
# (2, 56, 56, 64) 1.26x, 1.14x, 1.09x, (8, 28, 28, 512) 1.10x, 1.09x, 1.07x, (32, 56, 56, 64)
# 1.13x, 1.03x, 1.03x.  The price is compilation: Numba compiles each of these kernels whole,
# so the first calls of every operation on a (1152, 48) float32 tensor took 12.8 s with an
# empty cache instead of 6.0 s (13.2 against 6.2 s in a second pair of runs).


@helper(exact=True, inline=True)
def _stats_tiles(x, R, W, count, ddof, mean, var):
    M, C = x.shape
    parts = np.empty((3, (M + R - 1) // R, C))
    _moments_tiles(x, R, W, parts[0], parts[1], parts[2])
    return merged_moments(count, parts[0], parts[1], parts[2], mean, var, ddof)


@kernel(exact=True)
def stats_tiled(x, R, W, count, ddof, mean, var):
    """Per-channel mean and variance (float64, M2 / (L - ``ddof``)) into ``mean``, ``var``:
    :func:`moments` in tiles of ``R`` rows by ``W`` channels (``count``: the rows of each row
    block), then their merge.  Returns the number of means that came out NaN or infinite (see
    ``functional._nonfinite_means``)."""
    return _stats_tiles(x, R, W, count, ddof, mean, var)


# The one-call kernels below finish only in the lanes of the data's type (float32 parameters
# for float32 data), and backward only in training mode: what else the passes need (float64
# lanes for float32 data whose parameters are beyond float32's comfortable range, evaluation
# mode, channels with infinities or NaN) is rare and left to the Python-driven passes, so each
# kernel compiles one variant of its elementwise pass (with every variant, the first training
# and backward calls on a (1152, 48) float32 tensor took 14.7 s to compile instead of 9.9).


@kernel(exact=True)
def train_tiled(x, xw, R, W, count, Re, We, weight, bias, eps, narrow, a, a32, lo32, yw, mean,
                var, nt, G):
    """Forward training: :func:`stats_tiled`, then ``merge.affine_params_chunked`` into the
    scratch ``a`` (float64) and ``a32`` (float32, or ``a`` for float64 data; ``lo32`` the floor
    in its type), then :func:`affine` from ``xw`` into ``yw`` in tiles of ``Re`` rows by ``We``
    columns (``x`` and ``y`` viewed as rows of whole channel rows, see ``merge.tile_columns``).
    ``G``: columns per channel, as in :func:`backward_tiled` (the columns' moments merged per
    channel, the parameters spread back over the columns).
    Returns 0 when done; else nothing was written to ``yw``: 1 where a mean came out NaN or
    infinite, 2 where float32 data needs float64 lanes (see above)."""
    M, CG = x.shape
    C = CG // G
    if G == 1:
        if _stats_tiles(x, R, W, count, 0.0, mean, var):
            return 1
    else:
        cm = np.empty(CG)
        cv = np.empty(CG)
        bad = _stats_tiles(x, R, W, count, 0.0, cm, cv)
        for c in range(CG):
            cv[c] *= M  # the columns' M2
        _fold_moments(cm, cv, C, G, M, mean, var)
        for k in range(C):
            var[k] /= M * G
        if bad:
            return 1
    if affine_params_chunked(mean, var, weight, bias, eps, M * G, narrow, a, a32) != narrow:
        return 2
    for i in range(3 if G > 1 else 0):
        _spread(a32[i], C, G)
    V = tile_columns(a32, CG, xw.shape[1])
    _affine_tiles(xw, a32[0, :V], a32[1, :V], a32[2, :V], lo32, yw, Re, We, nt)
    return 0


infer_tiled = kernel(specialise(infer_tiled_template, "channels_last_infer_tiled",
                                 _affine_tiles=_affine_tiles), exact=True)


@helper(exact=True)
def _fold(v, n, G):
    """``v[k] = v[k * G] + ... + v[k * G + G - 1]`` for the ``n`` channels of ``G`` columns
    each, in place: from the first channel up, as channel ``k``'s columns lie at or past ``k``."""
    for k in range(n):
        t = 0.0
        for g in range(G):
            t += v[k * G + g]
        v[k] = t


@helper(exact=True)
def _spread(v, n, G):
    """``v[k * G .. k * G + G - 1] = v[k]`` for the ``n`` channels, in place: from the last
    channel down, so no value is overwritten before it is read."""
    for k in range(n - 1, -1, -1):
        t = v[k]
        for g in range(G):
            v[k * G + g] = t


@helper(exact=True)
def _fold_moments(mean, m2, n, G, M, out_mean, out_m2):
    """Chan's merge of each of the ``n`` channels' ``G`` columns of ``M`` values (column means
    ``mean``, M2s ``m2``) into ``out_mean[k]`` and ``out_m2[k]``: the mean of the means, and the
    M2s plus ``M`` times the squared deviations of the means from it (equal counts).  ``out_*``
    may be ``mean`` and ``m2`` themselves, as in :func:`_fold`."""
    for k in range(n):
        s = 0.0
        for g in range(G):
            s += mean[k * G + g]
        mk = s / G
        t = 0.0
        d2 = 0.0
        for g in range(G):
            d = mean[k * G + g] - mk
            t += m2[k * G + g]
            d2 += d * d
        out_mean[k] = mk
        out_m2[k] = t + M * d2


@kernel(exact=True)
def backward_tiled(x, dy, xw, dyw, mu, invstd, weight, R, W, Re, We, narrow, a, a32, dxw, grads,
                   nt, G):
    """Backward in training mode: :func:`bwd_sums` in tiles of ``R`` rows by ``W`` channels,
    their merge, ``merge.backward_params`` into the scratch ``a`` and ``a32`` (as
    :func:`train_tiled`), ``grads`` (``dweight``, ``dbias``), then ``dx`` from ``xw`` and
    ``dyw`` into ``dxw`` (viewed as :func:`train_tiled` views them) in tiles of ``Re`` rows by
    ``We`` columns.  ``mu``, ``invstd`` and ``weight`` (or None) come as the caller passed them.
    ``G``: columns per channel, 1 but for a channels-first view of short runs taken as rows of
    ``C * G`` values (``functional._runs_as_rows``), whose column sums are added up per channel
    and whose parameters are spread back over the columns.
    Returns False, with nothing written to ``dxw``, where float32 data needs float64 lanes: the
    caller finishes with the parameters in ``a`` (spread over the columns)."""
    M, CG = x.shape
    C = CG // G
    m = mu.astype(np.float64)
    istd = invstd.astype(np.float64)
    mc = m if G == 1 else np.repeat(m, G)
    parts = np.empty((2, (M + R - 1) // R, CG))
    _bwd_sums_tiles(x, dy, mc, R, W, parts[0], parts[1])
    sums = np.empty((2, CG))
    merged_sums(parts, sums)
    if G > 1:
        for i in range(2):
            _fold(sums[i], C, G)
        sums = np.ascontiguousarray(sums[:, :C])
    grads_out(sums, istd, grads)
    if backward_params(sums, m, istd, weight, float(M * G), True, narrow, a, a32) != narrow:
        for i in range(4 if G > 1 else 0):
            _spread(a[i], C, G)
        return False
    for i in range(4 if G > 1 else 0):
        _spread(a32[i], C, G)
    V = tile_columns(a32, CG, xw.shape[1])
    _bwd_apply_tiles(xw, dyw, a32[0, :V], a32[1, :V], a32[2, :V], a32[3, :V], dxw, Re, We, nt)
    return True


# ----------------------------------------------------------------------------- small tensors
# One call per operation for tensors of fewer than SERIAL_BELOW values (see the channels-first
# ``stats_small``), and for those with few enough rows (functional._fuse): work items are
# blocks of channels over every row, so each channel's statistics are complete within its item
# and its normalisation follows at once, while the block is in cache.  A channel's sums run in the same order whichever thread takes its block,
# so results do not depend on the thread count.

BLOCK = 64  # channels per work item: one sweep of the column kernels (float32)
# A block of channels of G > 1 columns (channels-first runs taken as rows) holds at least this
# many values: with fewer rows, blocks of BLOCK columns left each item too little work
# (training, forced onto the rows, 1 thread: (16, 512, 4, 4) 69 -> 57 us, (8, 256, 4, 4) 29 ->
# 23 us with 4096; 8192 measured no better).
_GROUP_VALUES = 4096


@helper
def _blocks(C):
    return (C + BLOCK - 1) // BLOCK


@helper
def _per_block(G, M):
    """Channels of ``G`` columns a block of ``M`` rows: ``BLOCK`` columns, or for ``G > 1``
    whole channels filling at least ``BLOCK`` columns and ``_GROUP_VALUES`` values, and a
    whole number of float32 vectors (16 values), so that the column kernels run no masked
    tail (with ``BLOCK // G`` channels instead, backward against this, float32, 2 threads,
    in one process: (128, 128, 3, 3) 45.8 -> 31.3 us, (64, 256, 3, 3) 49.1 -> 34.3 us,
    (64, 400, 7) 51.9 -> 40.6 us; training (64, 64, 3, 3) at 1 thread 20.2 -> 16.3 us)."""
    if G == 1:
        return BLOCK
    least = max(BLOCK, _GROUP_VALUES // M)
    per = 1
    while per * G < least or (per * G) % 16:
        per += 1
    return per


@helper(exact=True)
def _block_moments(p0, p1, rs, M, n, mean, m2):
    """Mean and M2 over the ``M`` rows (``rs`` values apart) of the ``n`` channels whose first
    row starts at ``p0`` (``p1``: the second row) into the pointers ``mean`` and ``m2``: one
    pass shifted by the first row, as a tile of :func:`moments` (error bound: the
    channels-first ``_channel_moments``).  Pointers, not arrays: see the channels-first
    ``_channel_moments``.  Returns whether every mean is finite (else see
    :func:`_unshifted_columns`)."""
    column_moments((p1,), M - 1, n, (rs,), (p0,), mean, m2)
    bad = 0  # counted without branches, so that the loop vectorises
    for j in range(n):
        d1 = load(mean, j)
        m = np.float64(load(p0, j)) + d1 / M
        store(m2, j, _m2(d1, load(m2, j), float(M)))
        store(mean, j, m)
        bad += not abs(m) < math.inf
    return bad == 0


@helper(exact=True)
def _unshifted_columns(x, c0, c1, mean, m2):
    """Channels ``[c0, c1)`` whose mean came out NaN or infinite, summed again unshifted (see
    the channels-first ``_unshifted_channel``)."""
    M = x.shape[0]
    inv = 1.0 / M
    for c in range(c0, c1):
        if not abs(mean[c]) < math.inf:
            t = 0.0
            for r in range(M):
                t += x[r, c] * inv
            mean[c], m2[c] = unshifted(t, m2[c])


@kernel(exact=True, serial_below=2 * SMALL_PARALLEL_FROM)
def stats_small(x, denom, out):
    """Per-channel mean and variance in one call, for small tensors (see the channels-first
    ``stats_small``)."""
    M, C = x.shape
    mean = np.empty(C)
    m2 = np.empty(C)
    for b in numba.prange(_blocks(C)):
        c0 = b * BLOCK
        c1 = min(C, c0 + BLOCK)
        if not _block_moments(at(x, (0, c0)), at(x, (1, c0)), _rows(x), M, c1 - c0,
                              at(mean, (c0,)), at(m2, (c0,))):
            _unshifted_columns(x, c0, c1, mean, m2)
        o0, o1, mb, vb = out[0, c0:c1], out[1, c0:c1], mean[c0:c1], m2[c0:c1]
        for j in range(c1 - c0):  # from 0, so that it vectorises (see backward_small)
            o0[j] = mb[j]
            o1[j] = vb[j] / denom


@kernel(exact=True)
def infer_small(x, center, var, weight, bias, eps, lo, narrow, y, params):
    """Inference in one call for small tensors, with the parameters and lanes of the general
    path (see the channels-first ``infer_small``)."""
    M, C = x.shape
    p32 = np.empty((3, C), np.float32)
    ok = affine_params_chunked(center, var, weight, bias, eps, 0, narrow, params, p32)
    strides = (_rows(x), _rows(y))
    lo32 = np.float32(lo)
    for b in numba.prange(_blocks(C)):
        c0 = b * BLOCK
        n = min(C, c0 + BLOCK) - c0
        src = (at(x, (0, c0)),)
        dst = at(y, (0, c0))
        if ok:
            par32 = (at(p32, (0, c0)), at(p32, (1, c0)), at(p32, (2, c0)), lo32)
            affine_rows(src, dst, n, par32, M, strides)
        else:
            par = (at(params, (0, c0)), at(params, (1, c0)), at(params, (2, c0)), lo)
            affine_rows(src, dst, n, par, M, strides)


# placeholder of the templates below, which each copy replaces (_config.specialise)
_GROUPED = None


def _train_small_template(x, weight, bias, eps, narrow, y, mean, var, centre, scale, shift, G):
    """Forward training in one call for small tensors: per block of channels, the statistics,
    then ``y``, in float64 lanes whatever ``narrow`` says: float32 lanes, which need a check and
    a rounded centre per channel, measured slower even with those vectorised across channels
    (parallel build, float32 data, 2 threads, float32 against float64 lanes: (4, 1024) 6.4
    against 5.1 us, (128, 1024) 28.8 against 21.2 us).  ``weight`` and ``bias``: either float
    type, or None; ``centre``, ``scale`` and ``shift``: float64 scratch of a value per column
    (see ``functional._line_rows``), ``centre`` may be ``mean``.  ``G``: columns per channel,
    as in :func:`backward_tiled` (a block holds whole channels, the columns' moments merged
    per channel, the parameters spread back over the columns); 1 at compile time in
    ``train_small`` (see :func:`_backward_small_template`)."""
    if not _GROUPED:
        G = 1
    M, CG = x.shape
    C = CG // G
    per = _per_block(G, M)
    strides = (_rows(x), _rows(y))
    for b in numba.prange((C + per - 1) // per):
        k0 = b * per
        k1 = min(C, k0 + per)
        c0 = k0 * G
        c1 = k1 * G
        cm2 = var if G == 1 else scale  # the columns' M2, until the scales replace them
        if not _block_moments(at(x, (0, c0)), at(x, (1, c0)), _rows(x), M, c1 - c0,
                              at(centre, (c0,)), at(cm2, (c0,))):
            _unshifted_columns(x, c0, c1, centre, cm2)
        if G > 1:
            _fold_moments(centre[c0:c1], scale[c0:c1], k1 - k0, G, M, mean[k0:k1], var[k0:k1])
        vb, sb, hb = var[k0:k1], scale[c0:c1], shift[c0:c1]
        for j in range(k1 - k0):  # from 0, so that it vectorises (see backward_small)
            v = vb[j] / (M * G)
            vb[j] = v
            sc = 1.0 / math.sqrt(v + eps)
            if weight is not None:
                sc *= weight[k0 + j]
            sb[j] = sc
            hb[j] = 0.0 if bias is None else bias[k0 + j]
        if G > 1:
            eb, mb = centre[c0:c1], mean[k0:k1]
            for j in range(k1 - k0):
                eb[j] = mb[j]
            for row in (eb, sb, hb):
                _spread(row, k1 - k0, G)
        par = (at(centre, (c0,)), at(scale, (c0,)), at(shift, (c0,)), -math.inf)
        affine_rows((at(x, (0, c0)),), at(y, (0, c0)), c1 - c0, par, M, strides)


train_small = kernel(exact=True, serial_below=SMALL_PARALLEL_FROM)(
    specialise(_train_small_template, "train_small", _GROUPED=False))
train_small_grouped = kernel(exact=True, serial_below=SMALL_PARALLEL_FROM)(
    specialise(_train_small_template, "train_small_grouped", _GROUPED=True))


# backward_small takes float32 lanes from this many rows: with fewer, float64 lanes measured
# faster (parallel build, float32 data, 1 thread, float64 against float32 lanes: (4, 1000) 4.1
# against 6.4 us, (16, 1000) 7.8 against 9.6 us; 64 rows about even; (256, 1024) 90 against
# 75 us, where float32 lanes win).
_BWD_ROWS32 = 64


def _backward_small_template(x, dy, mu, invstd, weight, training, narrow, dx, grads, G):
    """Backward in one call for small tensors (as the channels-first ``backward_small``): per
    block of channels, the sums, ``grads`` (``dweight``, ``dbias``), then ``dx``, in float32
    lanes when ``narrow``, every coefficient of the block allows it, and there are
    ``_BWD_ROWS32`` rows or more.  ``G``: columns per channel, as in :func:`backward_tiled`
    (a block holds whole channels, its column sums added up per channel before the
    coefficients, which are spread back over the columns); taken only where ``_GROUPED``
    (``backward_small_grouped``): in ``backward_small`` G is 1 at compile time, its loops as
    lean as before G was added ((2, 1024) at 2 threads: 6.0 us, 8.0 with G a variable)."""
    if not _GROUPED:
        G = 1
    M, CG = x.shape
    C = CG // G
    per = _per_block(G, M)
    L = float(M * G)
    rows = (_rows(x), _rows(dy), _rows(dx))
    par = np.empty((4, CG))  # mu, a, q, r of merge.backward_params, in float64, per column
    p32 = np.empty((4, CG), np.float32)
    for b in numba.prange((C + per - 1) // per):
        k0 = b * per
        k1 = min(C, k0 + per)
        c0 = k0 * G
        c1 = k1 * G
        # The per-channel loops index slices from 0 and count without branches: indexed from
        # c0, with an early exit, they ran scalar, 3.5 of the 6.4 us of (2, 1024) at 1 thread.
        pm, pa, pq, pr = par[0, c0:c1], par[1, c0:c1], par[2, c0:c1], par[3, c0:c1]
        ivb = invstd[k0:k1]
        g0, g1 = grads[0, k0:k1], grads[1, k0:k1]
        if G == 1:
            mub = mu[k0:k1]
            for j in range(c1 - c0):
                pm[j] = np.float64(mub[j])
        else:
            for j in range(c1 - c0):
                pm[j] = np.float64(mu[k0 + j // G])
        column_bwd_sums((at(x, (0, c0)), at(dy, (0, c0))), M, c1 - c0, rows[:2],
                        (at(par, (0, c0)),), at(par, (2, c0)), at(par, (3, c0)))
        if G > 1:
            _fold(pq, k1 - k0, G)
            _fold(pr, k1 - k0, G)
            for k in range(k1 - k0):
                pm[k] = pm[k * G]
        bad = 0
        for j in range(k1 - k0):
            sg = pq[j]
            sgx = pr[j]
            istd = np.float64(ivb[j])
            g0[j] = sgx * istd
            g1[j] = sg
            a = istd if weight is None else np.float64(weight[k0 + j]) * istd
            q, r = bwd_coefficients(sg, sgx, istd, L, training)
            pa[j] = a
            pq[j] = q
            pr[j] = r
            bad += not bwd_fits32(pm[j], a, q, r, istd, L)
        if G > 1:
            for v in (pm, pa, pq, pr):
                _spread(v, k1 - k0, G)
        src = (at(x, (0, c0)), at(dy, (0, c0)))
        dst = at(dx, (0, c0))
        if not training:
            # evaluation mode: dx = a * dy, independent of x (an infinite x must not give NaN)
            affine_rows((at(dy, (0, c0)),), dst, c1 - c0, (0.0, at(par, (1, c0)), 0.0, -math.inf),
                        M, rows[1:])
        elif narrow and bad == 0 and M >= _BWD_ROWS32:
            q0, q1, q2, q3 = p32[0, c0:c1], p32[1, c0:c1], p32[2, c0:c1], p32[3, c0:c1]
            for j in range(c1 - c0):
                q0[j], q3[j] = narrow_centre(pm[j], pq[j], pr[j])
                q1[j] = pa[j]
                q2[j] = pq[j]
            bwd_apply_rows(src, dst, c1 - c0, (at(p32, (0, c0)), at(p32, (1, c0)),
                                               at(p32, (2, c0)), at(p32, (3, c0))), M, rows)
        else:
            bwd_apply_rows(src, dst, c1 - c0, (at(par, (0, c0)), at(par, (1, c0)),
                                               at(par, (2, c0)), at(par, (3, c0))), M, rows)


backward_small = kernel(exact=True, serial_below=SMALL_PARALLEL_FROM)(
    specialise(_backward_small_template, "backward_small", _GROUPED=False))
backward_small_grouped = kernel(exact=True, serial_below=SMALL_PARALLEL_FROM)(
    specialise(_backward_small_template, "backward_small_grouped", _GROUPED=True))
