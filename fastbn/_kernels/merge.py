"""Ordered merges of partial results, shared by both kernel families."""

import math

import numba
import numpy as np

from .._config import helper, kernel


@helper(exact=True)
def chan(cnt, base, off, m2, nb, hi, lo, s):
    """Fold a group of ``nb`` values (mean ``hi + lo``, sum of squared deviations ``s``) into an
    accumulator of ``cnt`` values (mean ``base + off``, M2 ``m2``): Chan et al.'s update.

    Means are carried as a fixed ``base`` (the first group's ``hi``) plus a small offset, so the
    difference of two means far from zero (1e8 with unit spread) is exact: ``hi - base`` is
    computed without rounding when the two are close, and the rest lives in the offset at full
    precision.  Compiled without fast-math so that this order of operations is kept.
    Returns the new ``(off, m2)``.
    """
    f = nb / (cnt + nb)
    d = ((hi - base) + lo) - off
    return off + d * f, m2 + s + d * d * (cnt * f)


_BLOCK = 256  # channels per work item of a merge: vector-friendly, and parallel when C is large


@helper(exact=True)
def _moments_block(count, hi, lo, m2, mean_out, var_out, ddof, c0, c1):
    """:func:`merged_moments` of channels ``[c0, c1)``; returns how many means are not
    finite."""
    K = hi.shape[0]
    base = hi[0, c0:c1]
    off = lo[0, c0:c1].copy()
    s = m2[0, c0:c1].copy()
    n = count[0]
    for k in range(1, K):
        nb = count[k]
        if nb == 0:
            continue
        f = nb / (n + nb)
        g = n * f
        hk = hi[k, c0:c1]
        lk = lo[k, c0:c1]
        mk = m2[k, c0:c1]
        for c in range(off.shape[0]):
            # chan(), inlined by hand so that the loop vectorises across channels
            d = ((hk[c] - base[c]) + lk[c]) - off[c]
            off[c] += d * f
            s[c] += mk[c] + d * d * g
        n += nb
    mo = mean_out[c0:c1]
    vo = var_out[c0:c1]
    bad = 0
    for c in range(off.shape[0]):
        m = base[c] + off[c]
        mo[c] = m
        vo[c] = s[c] / (n - ddof)
        bad += not abs(m) < math.inf
    return bad


@helper(exact=True, inline=True)
def merged_moments(count, hi, lo, m2, mean_out, var_out, ddof):
    """Merge per-chunk moments ``(hi + lo, m2)[k, c]`` of ``count[k]`` values each, chunk by
    chunk in a fixed order (not as threads finish), so results do not depend on the thread
    count.  The chunk loop is outside the channel loop: every chunk holds the same count for all
    channels, so the weights are scalars and the inner loop vectorises across channels.
    Returns the number of means that came out NaN or infinite (see
    ``functional._nonfinite_means``): counted here, testing them in NumPy afterwards cost
    1.3 us of a 20 us call."""
    C = hi.shape[1]
    bad = 0
    for blk in numba.prange((C + _BLOCK - 1) // _BLOCK):
        c0 = blk * _BLOCK
        bad += _moments_block(count, hi, lo, m2, mean_out, var_out, ddof, c0,
                              min(C, c0 + _BLOCK))
    return bad


# The merges are loops of their own (inlined by Numba, whose parallel loops they keep) so that
# the channels-last one-call kernels of tiled tensors (``channels_last.stats_tiled`` and its
# kin) run them between their passes, and as kernels for the passes driven from Python.
@kernel(exact=True)
def merge_moments(count, hi, lo, m2, mean_out, var_out, ddof):
    """:func:`merged_moments` as a kernel."""
    return merged_moments(count, hi, lo, m2, mean_out, var_out, ddof)


@helper(exact=True)
def _sums_block(parts, out, c0, c1):
    for j in range(parts.shape[0]):
        o = out[j, c0:c1]
        o[:] = 0.0
        for k in range(parts.shape[1]):
            pk = parts[j, k, c0:c1]
            for c in range(o.shape[0]):
                o[c] += pk[c]


@helper(exact=True, inline=True)
def merged_sums(parts, out):
    """``out[j, c] = sum_k parts[j, k, c]``, summed in a fixed order of ``k`` (vectorised across
    channels)."""
    C = parts.shape[2]
    for blk in numba.prange((C + _BLOCK - 1) // _BLOCK):
        c0 = blk * _BLOCK
        _sums_block(parts, out, c0, min(C, c0 + _BLOCK))


@kernel(exact=True)
def merge_sums(parts, out):
    """:func:`merged_sums` as a kernel."""
    merged_sums(parts, out)


@helper(exact=True)
def affine_params(center, var, weight, bias, eps, count, narrow, out, out32):
    """Per-channel ``(c, scale, shift)`` rows of ``out`` (float64, shape (3, >= C)) for the
    elementwise pass ``(x - c) * scale + shift`` with ``scale = weight / sqrt(var + eps)``;
    when float32 lanes are safe (see below), ``out32`` (float32 like ``out``, or ``out``
    itself) gets them rounded for those lanes, which saves the caller a conversion (1.2 us of a
    44 us (256, 1024) inference).

    With ``narrow`` (float32 data) the pass runs in float32 lanes, twice as wide: ``c`` is the
    centre rounded to float32, so that ``x - c`` is exact for ``x`` near it, and the rounding
    ``center - c`` moves into the shift.  Returns False, keeping float64 parameters, when that
    could overflow or lose precision: a coefficient outside float32's comfortable range, or
    (``count > 0``: training, ``var`` the batch variance of ``count`` values) a spread
    ``sqrt(var * count)``, which bounds ``max |x - mean|``, beyond 1e37.  One compiled call
    replaces a dozen NumPy calls on small tensors.
    """
    return affine_params_block(center, var, weight, bias, eps, count, narrow, out, out32, 0,
                               center.shape[0])


@helper(exact=True)
def affine_params_block(center, var, weight, bias, eps, count, narrow, out, out32, c0, c1):
    """:func:`affine_params` for channels ``[c0, c1)``: whether they allow float32 lanes,
    ``out32`` written for them if so.  The loops index slices from 0: indexed from ``c0``,
    Numba's negative-index handling keeps loops scalar."""
    cb, vb, o0, o1, o2 = center[c0:c1], var[c0:c1], out[0, c0:c1], out[1, c0:c1], out[2, c0:c1]
    if weight is not None:
        wb = weight[c0:c1]
    if bias is not None:
        bb = bias[c0:c1]
    bad = 0  # counted without branches, so that the loop vectorises
    for j in range(c1 - c0):
        scale = 1.0 / math.sqrt(vb[j] + eps)
        if weight is not None:
            scale *= wb[j]
        m = np.float64(cb[j])
        shift = 0.0 if bias is None else np.float64(bb[j])
        o0[j] = m
        o1[j] = scale
        o2[j] = shift
        bad += not affine_fits32(m, scale, shift, vb[j], count)
    ok = narrow and bad == 0
    if ok:
        q0, q1, q2 = out32[0, c0:c1], out32[1, c0:c1], out32[2, c0:c1]
        for j in range(c1 - c0):
            q0[j], q2[j] = narrow_centre(o0[j], o1[j], o2[j])
            q1[j] = o1[j]
    return ok


# Parameters of more channels than this are prepared in chunks of it, in parallel: a float64
# square root and division per channel cost about 1 ns ((2, 65536) float32 inference: 75 of its
# 108 us at 2 threads went to them, serially), and one chunk is about a microsecond, the cost of
# a parallel launch.
PARAM_CHUNK = 2048


@helper(exact=True, inline=True)
def affine_params_chunked(center, var, weight, bias, eps, count, narrow, out, out32):
    """:func:`affine_params` in chunks of ``PARAM_CHUNK`` channels, in parallel where there is
    more than one (same results: each channel's parameters do not depend on the others, and
    float32 lanes are taken only where every chunk allows them)."""
    C = center.shape[0]
    K = (C + PARAM_CHUNK - 1) // PARAM_CHUNK
    if K == 1:
        return affine_params_block(center, var, weight, bias, eps, count, narrow, out, out32, 0,
                                   C)
    bad = 0
    for k in numba.prange(K):
        c0 = k * PARAM_CHUNK
        bad += not affine_params_block(center, var, weight, bias, eps, count, narrow, out,
                                       out32, c0, min(C, c0 + PARAM_CHUNK))
    return narrow and bad == 0


@kernel(exact=True)
def affine_params_kernel(center, var, weight, bias, eps, count, narrow, out, out32):
    """:func:`affine_params_chunked` as a kernel."""
    return affine_params_chunked(center, var, weight, bias, eps, count, narrow, out, out32)


@helper(exact=True)
def affine_fits32(m, scale, shift, var, count):
    """Whether one channel's parameters allow float32 lanes (see :func:`affine_params`)."""
    spread = (count == 0) | (var * count < 1e74)
    return _fits32(m) & _fits32(scale) & _fits32(shift) & spread


@helper(exact=True)
def backward_params(sums, mu, invstd, weight, count, training, narrow, out, out32):
    """Per-channel ``(m, a, q, r)`` rows of ``out`` (float64, shape (4, >= C)) for the elementwise
    pass ``dx = a * (dy + q * (x - m) + r)``, from ``sums[0] = sum(dy)`` and
    ``sums[1] = sum(dy * (x - mu))`` over ``count`` values per channel.

    Training mode: ``a = weight * invstd``, ``k = invstd * sums[1] / count`` (the mean of
    ``dy * xhat``), ``q = -invstd * k``, ``r = -sums[0] / count``; evaluation mode:
    ``q = r = 0``.  Factored this way every coefficient is within a few orders of magnitude of
    ``dy`` or ``1 / std``, where the expanded ``a * invstd^2 * ...`` would underflow or
    overflow for data far from unit scale.  ``narrow`` and the return value work as in
    :func:`affine_params` (``out32`` too): float32 parameters only when every coefficient and
    the spread ``sqrt(count) / invstd`` sit well inside float32's range.
    """
    C = mu.shape[0]
    bad = 0  # without branches, as in affine_params
    for c in range(C):
        istd = np.float64(invstd[c])
        a = istd if weight is None else weight[c] * istd
        m = np.float64(mu[c])
        q, r = bwd_coefficients(sums[0, c], sums[1, c], istd, count, training)
        bad += not bwd_fits32(m, a, q, r, istd, count)
        out[0, c] = m
        out[1, c] = a
        out[2, c] = q
        out[3, c] = r
    ok = narrow and bad == 0
    if ok:
        for c in range(C):
            out32[0, c], out32[3, c] = narrow_centre(out[0, c], out[2, c], out[3, c])
            out32[1, c] = out[1, c]
            out32[2, c] = out[2, c]
    return ok


@helper(exact=True)
def bwd_coefficients(sg, sgx, istd, count, training):
    """``(q, r)`` of :func:`backward_params` for one channel with sums ``sg``, ``sgx``.  One
    division, not two: per channel they were 7% of the one-call backward of (1, 512, 7, 7) at
    one thread (13.4 -> 12.4 us), for one more rounding (1e-16 relative)."""
    if training:
        inv = 1.0 / count
        return -istd * (istd * sgx * inv), -sg * inv
    return 0.0, 0.0


@helper(exact=True)
def bwd_fits32(m, a, q, r, istd, count):
    """Whether one channel's backward coefficients allow float32 lanes (see
    :func:`backward_params`)."""
    return _fits32(m) & _fits32(a) & _fits32(q) & _fits32(r) & (istd * istd * 1e74 > count)


@helper(exact=True)
def narrow_centre(m, q, r):
    """``(m32, r)`` for float32 lanes: the centre rounded to float32 (``x - m32`` is exact for
    ``x`` near it), its rounding moved into ``r``: ``q * (x - m) = q * (x - m32) - q * (m - m32)``
    (for the affine pass ``q`` is the scale and ``r`` the shift)."""
    m32 = np.float64(np.float32(m))
    return m32, r - q * (m - m32)


@helper(exact=True)
def unshifted(t, m2):
    """``(mean, m2)`` of a channel whose shifted sums gave a mean that is NaN or infinite,
    from ``t``, the sum of its values each scaled by ``1 / L`` (which finite values cannot
    overflow).  A finite ``t`` means finite values so far apart that the sums of their
    deviations overflowed: ``t`` is the mean, and the variance is beyond float64's range
    (deviations summing past 1.8e308 over ``L`` values make ``M2 / L`` exceed it for any ``L``
    below 1e100).  Else the channel holds infinities or NaN: ``t`` is what ``sum / L`` gives
    (the infinity, or NaN; PyTorch's saved mean alike) and ``m2`` stays."""
    if abs(t) < math.inf:
        return t, math.inf
    return t, m2


@helper(exact=True)
def stats_out(mean, var, out):
    """``out[0] = mean``, ``out[1] = var`` in ``out``'s type (a float32 beyond the range is
    inf, silently as it should be): one call where two NumPy casts under ``np.errstate`` cost
    1.6 us."""
    for c in range(mean.shape[0]):
        out[0, c] = mean[c]
        out[1, c] = var[c]


@helper(exact=True)
def grads_out(sums, istd, out):
    """``out[0] = sums[1] * istd`` (``dweight``), ``out[1] = sums[0]`` (``dbias``) in
    ``out``'s type, as :func:`stats_out` (1.7 us in NumPy)."""
    for c in range(sums.shape[1]):
        out[0, c] = sums[1, c] * istd[c]
        out[1, c] = sums[0, c]


@helper(exact=True)
def saved_stats(mean, var, eps, out):
    """``out[0] = mean``, ``out[1] = 1 / sqrt(var + eps)`` in ``out``'s type: what the forward
    pass saves for the backward pass, in one call instead of five NumPy ones (4 us)."""
    for c in range(mean.shape[0]):
        out[0, c] = mean[c]
        out[1, c] = 1.0 / math.sqrt(var[c] + eps)


@helper(exact=True)
def _fits32(v):
    """Whether ``v`` is zero or well inside float32's normal range (products of two such
    coefficients with data stay representable)."""
    a = abs(v)
    return (a == 0.0) | ((a > 1e-30) & (a < 1e30))


# the layout's elementwise tiles (channels_first._affine_tiles, channels_last._affine_tiles):
# each layout's copy of the templates below binds its own (_config.specialise)
_affine_tiles = None


def infer_tiled_template(x, center, var, weight, bias, eps, narrow, a, a32, lo32, y, R, W, nt):
    """Inference in one call: :func:`affine_params_chunked` into the scratch ``a`` and ``a32``
    (float32, or ``a`` for float64 data; ``lo32`` the floor in its type), tiled across the
    view's rows (:func:`tile_columns`: channels-last rows may be several rows of the tensor),
    then the layout's ``_affine_tiles`` in tiles of sizes ``R`` and ``W``, ``nt`` its choice of
    stores.  Returns False, with nothing written to ``y``, where float32 data needs float64
    lanes: the caller finishes with the parameters in ``a``."""
    C = center.shape[0]
    if affine_params_chunked(center, var, weight, bias, eps, 0, narrow, a, a32) != narrow:
        return False
    V = tile_columns(a32, C, x.shape[1])
    _affine_tiles(x, a32[0, :V], a32[1, :V], a32[2, :V], lo32, y, R, W, nt)
    return True


@helper
def tile_columns(a, C, V):
    """Repeat the first ``C`` columns of each row of ``a`` through column ``V`` (a multiple of
    ``C``): per-channel parameters for channels-last views whose rows of ``V`` values are
    several rows of ``C`` channels (``functional._cl_parts``).  Returns ``V``."""
    for i in range(a.shape[0]):
        for j in range(C, V):
            a[i, j] = a[i, j - C]
    return V
