"""Ordered merges of per-chunk partial results (shared by both kernel families)."""

import numba

from .._config import kernel


@kernel
def merge_moments(count, mean, m2, mean_out, var_out, ddof):
    """Chan et al.'s pairwise update, applied left to right over the chunks of each channel.

    ``count[k]`` values went into chunk ``k``; ``mean[c, k]`` and ``m2[c, k]`` are that chunk's
    mean and sum of squared deviations for channel ``c``.  Merging in a fixed order (rather than
    as threads finish) keeps results independent of the thread count.
    """
    C, K = mean.shape
    for c in numba.prange(C):
        n = count[0]
        m = mean[c, 0]
        s = m2[c, 0]
        for k in range(1, K):
            nb = count[k]
            if nb == 0:
                continue
            tot = n + nb
            d = mean[c, k] - m
            m += d * (nb / tot)
            s += m2[c, k] + d * d * (n * nb / tot)
            n = tot
        mean_out[c] = m
        var_out[c] = s / (n - ddof)


@kernel
def merge_sums(parts, out):
    """``out[c] = sum_k parts[c, k]``, summed in a fixed order of ``k``."""
    C, K = parts.shape
    for c in numba.prange(C):
        acc = 0.0
        for k in range(K):
            acc += parts[c, k]
        out[c] = acc
