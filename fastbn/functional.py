"""The NumPy API: validation, layout routing, dispatch to the kernels, ``out=``.

Conventions (as PyTorch): the batch variance used to normalise is the biased one (divide by the
number of values per channel, ``L``); the running variance is updated with the unbiased one
(divide by ``L - 1``); ``running = (1 - momentum) * running + momentum * batch``.
"""

import functools
import math
import operator
import threading

import numpy as np

from . import _config
from . import _layout
from . import _pool
from ._kernels import channels_first as _cf
from ._kernels import channels_last as _cl
from ._kernels import merge as _merge
from ._kernels.simd import TAIL_MASK_FROM as _TAIL_MASK_FROM

__all__ = [
    "channel_stats",
    "batch_norm_train",
    "batch_norm_infer",
    "batch_norm_backward",
    "batch_norm",
]

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
_FLOATS = (_F32, _F64)
_METHODS = ("auto", "two_pass", "welford")
_ACTIVATIONS = (None, "relu")
_NEG_INF = -math.inf


# ----------------------------------------------------------------------------- validation


def _array(a, name):
    """``a`` as a float32/float64 ndarray in native byte order (Numba needs native order)."""
    if type(a) is not np.ndarray:
        if a is None:
            raise TypeError(f"{name} must be an array, got None")
        a = _plain(a, name)
    dt = a.dtype
    if dt not in _FLOATS:
        if dt.kind == "f" and dt.newbyteorder("=") in _FLOATS:
            return _native(a)
        raise TypeError(f"{name} must be float32 or float64, got dtype {dt}")
    return a


def _plain(a, name):
    """``a`` as a plain ndarray (a view for subclasses: the kernels compile for ndarray only).
    Masked arrays are refused: computing on their hidden values would be silently wrong."""
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(f"{name} is a masked array, whose mask batch norm cannot honour; pass "
                        f"{name}.filled(value) or np.asarray({name}) (the hidden values too)")
    return np.asarray(a)


def _flag(value, name):
    """``value`` as a bool; only bools are taken (a string such as "no" would be true)."""
    if value is True or value is False:
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _integer(value, name):
    """``value`` as a Python int; bools and floats are refused (``TypeError`` naming it)."""
    if type(value) is int:
        return value
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None


def _x_and_axis(x, axis, name="x"):
    if type(x) is np.ndarray and type(axis) is int and (x.dtype is _F32 or x.dtype is _F64):
        nd = x.ndim  # the common case, without the general checks' cost (0.27 -> 0.12 us)
        if 2 <= nd <= 5 and -nd <= axis < nd:
            return x, axis % nd
    x = _array(x, name)
    nd = x.ndim
    if not 2 <= nd <= 5:
        raise ValueError(f"{name} must have 2 to 5 dimensions (N, C, ...), got {nd}-d with shape {x.shape}")
    ax = _integer(axis, "axis")
    if not -nd <= ax < nd:
        raise ValueError(f"axis {axis} is out of range for {name} with {nd} dimensions")
    return x, ax % nd


def _channel_vector(v, name, C, writeable=False, of="x"):
    """A per-channel parameter: 1-D float of length C (float32 or float64, whatever x is);
    ``of`` names what C comes from."""
    if type(v) is not np.ndarray:
        v = _plain(v, name)
    if v.dtype.kind != "f" or v.dtype.newbyteorder("=") not in _FLOATS:
        raise TypeError(f"{name} must be float32 or float64, got dtype {v.dtype}")
    if v.ndim != 1 or v.shape[0] != C:
        raise ValueError(f"{name} must have shape ({C},) to match the {C} channels of {of}, "
                         f"got {v.shape}")
    if writeable and not v.flags.writeable:
        raise ValueError(f"{name} is read-only but must be updated in place")
    return v


def _native(v):
    """``v`` in native byte order (Numba compiles for native order only); a copy if not."""
    return v if v.dtype.isnative else v.astype(v.dtype.newbyteorder("="))


def _param(v, name, C, required=False):
    """A per-channel parameter, validated and in native byte order for the kernels (None stays
    None unless ``required``: ``TypeError`` naming it)."""
    if type(v) is np.ndarray and v.shape == (C,) and (v.dtype is _F32 or v.dtype is _F64):
        return v  # the common case, without the checks' cost (0.4 -> 0.17 us, 4 per call)
    if v is None:
        if required:
            raise TypeError(f"{name} is required (got None)")
        return None
    return _native(_channel_vector(v, name, C))


def _real(value, name, what):
    """``value`` as a float; strings and bools are refused (``float("1e-5")`` would pass)."""
    if isinstance(value, (str, bytes, bool, np.bool_)):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}") from None


def _positive(value, name):
    if type(value) is float and 0.0 < value < math.inf:
        return value  # the common case, without the general checks' cost (0.5 -> 0.1 us)
    f = _real(value, name, "a real number")
    if not f > 0 or not math.isfinite(f):  # also rejects NaN
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return f


def _momentum(value):
    f = _real(value, "momentum", "a real number in [0, 1]")
    if not 0.0 <= f <= 1.0:  # also rejects NaN
        raise ValueError(f"momentum must be in [0, 1], got {value!r}")
    return f


def _overlaps_itself(a):
    """Whether two elements of ``a`` may share memory: a zero stride, or strides that do not
    nest (sorted, each must step past everything the smaller ones span).  Conservative: a few
    interleaved layouts without shared elements are refused too."""
    if a.size <= 1:
        return False
    span = a.itemsize
    for stride, n in sorted((abs(st), n) for st, n in zip(a.strides, a.shape) if n > 1):
        if stride < span:
            return True
        span = stride * (n - 1) + span
    return False


def _check_out(out, x, name="out", inputs=()):
    """``out`` must match ``x`` in shape and dtype, be writeable, have one place in memory for
    each element, and not partially overlap an input, per-channel parameters included (writing
    the exact same memory, e.g. ``out=x``, is allowed: every kernel reads an element before
    writing the same element)."""
    if not isinstance(out, np.ndarray) or isinstance(out, np.ma.MaskedArray):
        raise TypeError(f"{name} must be a numpy.ndarray (not masked), got {type(out).__name__}")
    if out.shape != x.shape:
        raise ValueError(f"{name} must have shape {x.shape} like x, got {out.shape}")
    if out.dtype != x.dtype:
        native = "" if out.dtype.isnative else " in native byte order"
        raise TypeError(f"{name} must have dtype {x.dtype}{native} like x, got {out.dtype}")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    if not (out.flags.c_contiguous or out.flags.f_contiguous) and _overlaps_itself(out):
        raise ValueError(f"{name} has elements that share memory (a zero or overlapping "
                         f"stride); pass an array with one place for each element")
    for arr, arr_name in inputs:
        if arr is None or not np.may_share_memory(out, arr):
            continue
        same = (
            out.__array_interface__["data"][0] == arr.__array_interface__["data"][0]
            and out.strides == arr.strides
        )
        if not same:
            raise ValueError(f"{name} overlaps {arr_name} in a way that is not element-for-element; "
                             f"pass a separate array or the same array itself")
    return out


def _new_output(x):
    return np.empty_like(x, order="K")


def _output(p, x, out, inputs, apart=None):
    """``(y, y3, finish, fresh)``: the output (``out`` checked against ``inputs``, or a new
    array like ``x``, placed apart from ``x`` and ``apart`` as ``_layout.Plan.new_output``
    says), its kernel view and finisher (see ``_layout.Plan.output``), and whether the kernel
    view is memory never written before (see :func:`_elementwise`)."""
    if out is None:
        y, y3, finish, reused = p.new_output(x, apart)
        return y, y3, finish, not reused
    y = _check_out(out, x, inputs=inputs)
    # a subclass is written through a plain view of its memory: reshaped, np.matrix stays 2-D
    y3, finish = p.output(y if type(y) is np.ndarray else y.view(np.ndarray))
    return y, y3, finish, finish is not None


def _narrow(x):
    """Whether ``x`` (float32 or float64, validated) is float32: by item size, as comparing the
    dtype with ``np.float32`` converts the type first (0.1 us a call)."""
    return x.itemsize == 4


def _values_per_channel(x, axis):
    C = x.shape[axis]
    return x.size // C if C else 0


def _require_training_size(x, axis):
    L = _values_per_channel(x, axis)
    if x.size == 0:
        raise ValueError(f"x is empty (shape {x.shape}): batch statistics need at least 2 values per channel")
    if L <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")
    return L


# ----------------------------------------------------------------------------- decomposition
# Every choice below depends on the shape only, never on the thread count, so that reductions
# happen in the same order and give bit-identical results with any number of threads.

_NARROW_ROW_BYTES = 512  # channels-last rows read in at most two column sweeps
_SHORT_RUN = 128  # channels-first backward sums over shorter runs use bwd_sums_short
# Channels-first statistics over runs of up to _SHORT_MOMENTS_BYTES use moments_short, which
# sums each channel of a tile in one vector pass; its fixed cost per channel (the lane sums,
# the tile's mean and M2) is amortised by tiles of at least _SHORT_MOMENTS_GROUP bytes per
# channel.  Kernels side by side in one process, float32 at 2 threads: such tiles took
# (32, 2048, 7, 7) from 255 to 238 us and (64, 512, 7, 7) from 182 to 140 us (float64 even to
# 10% faster; the backward sums, reading two arrays, did not gain from them).  With them the
# block sums beat the per-run moments on runs of up to 1 KB: float32 (32, 256, 196) 148 ->
# 113 us, (32, 512, 128) 212 -> 151 us, (64, 64, 256) 86 -> 76 us; they were even at 2 KB
# ((32, 128, 512) float32, float64 (32, 256, 196)) and slower beyond (float64 (16, 64, 1024):
# 70 against 52 us).
_SHORT_MOMENTS_BYTES = 1024
_SHORT_MOMENTS_GROUP = 2048
_MIN_ROWS = 32  # channels-last reductions: rows per tile, so partial buffers stay small
# Channels-last reduction tiles span this many chunks of values: each tile writes a row of
# partial sums (two or three float64 per channel), finishes its moments channel by channel and
# adds a row to the merge, a cost that tiles of one chunk (16k values) did not amortise.
# Kernels at one thread, float32, tiles of one against two chunks: (50176, 128) statistics
# 1.10 -> 0.84 ms; whole calls alternating in one process, (8, 28, 28, 512) statistics 364 ->
# 251 us and training 1.28 -> 0.99 ms (with the column kernel, see _cl_reduction), (16, 56, 56,
# 128) statistics 846 -> 750 us.
_CL_REDUCE_CHUNKS = 2
_LINE = 64  # bytes in a cache line (simd.LINE)
# Elementwise passes, for load balance: at least this many tiles (channels-last), or a tile
# count that is a multiple of it (channels-first, see _cf_row_tiles).
_ELEMENTWISE_ITEMS = 16
# Channels-last elementwise tiles hold at least this many values, fewer rows each before fewer
# channels: whole calls at 2 threads alternating in one process, float32 inference (64, 512)
# 9.3 -> 8.5 us, (200, 300) 10.5 -> 9.6 us (16 tiles of 32 rows by 64 channels before, of 4
# rows by 512 now).
_ELEMENTWISE_TILE = 2048
_PARAM_ROW_BYTES = 4096  # channels-last elementwise passes in cache: channels per tile (bytes)


def _memo_tiles(func):
    """``func`` memoised by its arguments and the ``_config`` values it reads (0.9 us a call
    computed, 0.2 us looked up)."""
    memo = {}

    def tiles(*args):
        key = args + (_config.CHUNK, _config.MIN_ITEMS, _config.LLC_BYTES)
        t = memo.get(key)
        if t is None:
            if len(memo) >= 1024:
                memo.clear()
            t = memo[key] = func(*args)
        return t

    tiles.__wrapped__ = func
    tiles.__doc__ = func.__doc__
    return tiles


@_memo_tiles
def _cf_tiles(N, C, S, itemsize, group=512):
    """Tile (R rows, W channels, SB positions) for a channels-first reduction.

    Runs longer than a chunk are split along ``S``, so that long runs with few channels
    (N = 1, C = 3) still give many work items; rows per tile keep the partial buffers (24 bytes
    per channel per tile row) small next to the data, and give each channel of a tile at least
    ``group`` bytes; channels are split last, only as far as needed for ``MIN_ITEMS`` work
    items.
    """
    chunk = _config.CHUNK
    KS = -(-S // chunk)
    SB = -(-S // KS)
    R = max(1, chunk // (C * SB), -(-group * KS // (S * itemsize)))
    R = min(R, N)
    items = -(-N // R) * KS
    nb = max(1, min(C, -(-_config.MIN_ITEMS // items)))
    return R, -(-C // nb), SB


@_memo_tiles
def _cl_tiles(M, C, reduce, itemsize):
    """Tile size (rows R, channels W) for a channels-last kernel.

    Reductions split channels until there are ``MIN_ITEMS`` tiles: their partial buffers, and
    so their results, must not depend on the thread count.  Elementwise passes give the same
    values however they are tiled, and split only as far as balancing the load needs (16
    tiles), since whole rows stream better than pieces of them; and, on tensors that stay in
    cache, into at most 4 KB of channels (1024 float32, 512 float64), so that the per-channel
    parameters of a tile stay in L1 next to the rows streaming through it (float64
    (256, 1024) inference kernel at 1 thread: 90 us in tiles of 1024 channels, 59 us in 512).
    Kernel times, float32, 2 threads, old (64 tiles) -> new: (256, 1024) 22.2 -> 19.1 us,
    (1568, 512) 70 -> 57 us, (512, 2048) 112 -> 91 us, (32, 8192) 31.5 -> 27.9 us; whole
    rows of 4096 in cache took 28.2 us instead of 21.8, and rows of 2048 out of cache
    ((1568, 2048)) 634 us whole against 761 us in halves.
    """
    R = max(1, _config.CHUNK // C)
    if reduce:
        R = max(_MIN_ROWS, _CL_REDUCE_CHUNKS * R)
    else:
        # fewer rows per tile before splitting channels: whole rows stream, pieces do not
        R = min(R, max(-(-M // _ELEMENTWISE_ITEMS), -(-_ELEMENTWISE_TILE // C)))
    R = min(R, M)
    K = -(-M // R)
    if reduce:
        nb = -(-_config.MIN_ITEMS // K)
    else:
        nb = -(-_ELEMENTWISE_ITEMS // K)
        if M * C * itemsize <= _config.LLC_BYTES // 4:
            nb = max(nb, -(-C * itemsize // _PARAM_ROW_BYTES))
    nb = max(1, min(-(-C // 64), nb))
    W = -(-C // nb)
    W = min(C, -(-W // 16) * 16)
    return R, W


def _streams(run, out):
    """Whether the runs (rows of ``run`` values) of the kernel view ``out`` take non-temporal
    stores.  Those store whole aligned lines: each run starts with scalar stores up to a line
    boundary, and lines left partly written by short runs (``nhwc_c3``'s 66-value rows)
    measured 2.5x slower than ordinary stores, so short runs only stream when every one starts
    and ends on a line, as in the pool's blocks: (100352, 64) float32 inference, 2 threads,
    1.5 -> 1.2 ms that way, and 2.7 -> 4.6 ms with rows 16 bytes off the line."""
    nbytes = run * out.itemsize
    if nbytes >= _config.STREAM_RUN_BYTES:
        return True
    if nbytes % _LINE or out.__array_interface__["data"][0] % _LINE:
        return False
    return all(s % _LINE == 0 for s in out.strides[:-1])


def _cl_reduction(name, x2):
    """The channels-last reduction kernel for ``x2``.  The column-strip kernels keep a tile's
    sums in registers but sweep its rows once per 64 channels (float32), a strided pattern; for
    the gradient sums, which read two arrays, that lost to the row-by-row ``_wide`` kernel on
    wide rows that do not fit in the last-level cache (kernels at 2 threads, cache flushed
    before each call, float32 (4096, 2048): 1.98 against 1.80 ms), and won on those that do
    ((6272, 512): 0.56 against 0.69 ms).  The statistics, reading one array, take the column
    kernel at every size: (4096, 2048) 0.86 against 1.08 ms, (8192, 2048) 1.97 against 2.20."""
    if name != "bwd_sums":
        return name
    narrow = x2.shape[1] * x2.itemsize <= _NARROW_ROW_BYTES
    if not narrow and x2.nbytes > _config.LLC_BYTES:
        return name + "_wide"
    return name


@_memo_tiles
def _cf_row_tiles(NR, S):
    """``(RB, SB)``: tiles of ``RB`` runs by ``SB`` positions, about a chunk each, for the
    channels-first elementwise kernels over ``NR`` runs of ``S``; runs longer than a chunk are
    split evenly.  The tile count is rounded up to a multiple of ``_ELEMENTWISE_ITEMS`` where
    there are runs enough, the runs spread evenly over the tiles: threads take equal contiguous
    shares of the tiles, which then split about evenly among 1, 2, 4, 8 or 16 threads (the 64
    tiles of a 4 MB tensor give 4 to each of 16 threads, and one tile more would be 25 %).  At
    2 threads it measured even: (2048, 64, 3) and (32, 256, 14, 14) inference, 0.99-1.01x."""
    KS = -(-S // _config.CHUNK)
    SB = -(-S // KS)
    KR = -(-NR // max(1, _config.CHUNK // SB))
    step = _ELEMENTWISE_ITEMS // math.gcd(KS, _ELEMENTWISE_ITEMS)
    KR = min(NR, -(-KR // step) * step)
    return -(-NR // KR), SB


# Channels-last tensors whose blocks of 64 channels over every row stay this small (per array)
# also run the one-call kernels for training and backward: a block's normalisation then reads
# it from the core's cache (inference reads it once: no gain, and 8 MB ones were slower),
# and no partial buffers or merges are needed.  (256, 1024) float32 at 2 threads: train 80 ->
# 58 us, backward 95 -> 75 us, statistics 40 -> 21 us; with 256 KB blocks (2048, 512)
# backward measured 1.1x slower.
_FUSED_BLOCK_BYTES = 128 << 10
# Training and backward on this many rows or more take the tiled passes in one call
# (channels_last.train_tiled, backward_tiled) instead, though their blocks would fit: the
# column sweeps of a block over many rows, far apart, lost to the tiled reduction and the
# elementwise pass over whole rows.  Whole calls against the blocks, alternating in one process,
# float32, 2 and 1 threads: (256, 1024) backward 1.01-1.13x and 1.14-1.32x, training 0.96-1.27x
# and 1.18-1.46x; (512, 1024) backward 1.18-1.34x and 1.29-1.44x; (512, 256) 1.13x and 1.13x;
# float64 (256, 1024) backward 1.04-1.06x and 1.08x.  With fewer rows the tiles are too few
# and thin: (128, 256) backward 0.79x at 2 threads, (32, 4096) 0.83x, (8, 16384) training
# 0.63x.  Statistics keep the blocks at every row count ((256, 512): 0.54x tiled).
_FUSED_MAX_ROWS = 256
# Statistics read every value once, so there only the strided reading of tensors that do not
# fit in cache argues against blocks: from 16 blocks (C >= 1024) they measured faster up to
# (1024, 2048) float32 (155 vs 381 us), where partial buffers and their merge grow with C.
_FUSED_STATS_BLOCKS = 16


# Channels-first tensors up to an eighth of the last-level cache, with at least 16 channels
# (so that more cores each get one), also run every operation as its one-call kernel, channel
# by channel: a channel's runs are read from the core's own cache a second time, and the
# launches, partial buffers and merges of the tiled passes (about 20 us) are saved.  Whole
# calls against the tiled passes, float32, 2 threads: (8, 32, 1024) train 58 -> 50 us,
# inference 27 -> 22, statistics 30 -> 24, backward 71 -> 53; (2, 64, 3136) train 92 -> 57,
# backward 93 -> 74; (16, 32, 2048) train 168 -> 140; at 4 MB about even, and beyond it the
# strided reads of a channel's runs lose ((128, 16, 1024) backward 690 -> 944 us).
#
# Channels of fewer than _ONE_CALL_MIN_VALUES values: there the per-channel work weighs more
# against the launches saved.  Whole calls, float32, alternating in one process with the rule
# forced, at 1 and 2 threads:
# - statistics gained on every shape tried, down to 2 values per channel: (1, 1024, 7, 7) 1.9x
#   and 2.3x, (16, 4096, 4) 1.09x and 1.19x, (1, 32768, 2) 1.20x and 1.42x; they take no
#   minimum;
# - backward gained where runs hold 24 values or more: (1, 1024, 7, 7) 1.4x and 2.3x,
#   (2, 4096, 5, 5) 1.12x and 1.33x, (2, 1024, 32) 1.35x and 1.70x; not with shorter runs
#   ((16, 4096, 4) 0.89x and 0.83x, (2, 2048, 3, 3) 0.91x at one thread);
# - training gained so up to 512 KB ((2, 512, 7, 7) 1.41x and 1.87x, (4, 1024, 5, 5) 1.17x and
#   1.42x), but larger ones lost at one thread ((1, 4096, 7, 7), 800 KB: 0.82x; 1.09x at two);
# - inference lost or was even ((1, 2048, 7, 7) 0.88x at 2 threads, (1, 4096, 3, 3) 0.71x at
#   one), as it did with the rule forced on (16, 4096, 4) (411 -> 525 us at one thread).
# The statistics and gradient sums of these channels went 2-4x faster once the helpers they
# call took pointers instead of arrays (see channels_first._channel_moments); the rule of 128
# values was measured before.
#
# Inference and backward gain less that way (inference reads every value once, and backward
# reads two arrays per channel): with a last-level cache larger than 32 MB the share alone
# would send them tensors where the tiled passes measured faster, alternating in one process
# at 2 threads with the one-call rule forced: float32 (32, 128, 512), 8 MB, inference 135
# against 191 us, backward 621 against 678 us; (32, 256, 14, 14), 6 MB, 128 against 139 and
# 593 against 666 us; at 4 MB even ((16, 64, 32, 32): 83 and 82, 206 and 201 us).  Training
# and statistics gained at those sizes (6-8 MB: 1.06-1.27x), so they keep the share alone.
_ONE_CALL_LLC_SHARE = 8
_ONE_CALL_MIN_VALUES = 128
_ONE_CALL_PASS_BYTES = 4 << 20
# channels of fewer than _ONE_CALL_MIN_VALUES values: backward and training with runs this long,
# training only up to this size (see above)
_ONE_CALL_MIN_RUN = 24
_ONE_CALL_SHORT_TRAIN_BYTES = 512 << 10
# Fewer than 16 channels: up to this many values (and half as many in a channel, which one core
# works through alone) the one-call kernels still win, the launches and merges of the tiled
# passes weighing more than the cores left idle.  Whole calls against the tiled passes, float32,
# alternating in one process, at 2 threads and with the serial builds (one thread's code):
# backward (8, 8, 8, 8, 8) 13.4 -> 8.8 us and 13.0 -> 11.1 us (PyTorch 9.6 us at 2 threads),
# (32, 8, 8, 8, 8) 28.3 -> 22.7 and 34.5 -> 32.8 (PyTorch 22.0), (8, 1, 64, 64) 12.3 -> 8.3 and
# 11.9 -> 7.7, (4, 2, 128, 128) 31.7 -> 22.3 and 32.4 -> 30.1, (8, 1, 128, 128) 31.5 -> 29.3 and
# 32.2 -> 28.3; inference (8, 8, 8, 8, 8) 7.9 -> 6.2 and 6.7 -> 5.5, (32, 3, 32, 32) 10.1 -> 8.0;
# training (8, 8, 8, 8, 8) 15.6 -> 7.2, (4, 2, 128, 128) 23.6 -> 13.5; statistics about 2x.
# Beyond it a channel's one core loses: (16, 1, 128, 128) backward 44 against 56 us, (256, 3,
# 32, 32) 104-124 against 147 us.  (Short channels of many values per tensor are another case:
# (2, 2048, 3, 3) backward and training gain at 2 threads but lose at one, so they keep their
# rules above.)
_FEW_CHANNELS_VALUES = 1 << 17


def _cf_one_call(p, x, cap=None, short=False):
    """Whether the channels-first view ``x`` runs the one-call kernels (see above); ``cap``:
    a further bound on its bytes; ``short``: channels of fewer than ``_ONE_CALL_MIN_VALUES``
    values qualify too."""
    limit = _config.LLC_BYTES // _ONE_CALL_LLC_SHARE
    if cap is not None:
        limit = min(limit, cap)
    if p.channels_last or x.nbytes > limit:
        return False
    if p.C < _CHANNEL_MIN:
        return x.size <= _FEW_CHANNELS_VALUES and x.size // p.C <= _FEW_CHANNELS_VALUES // 2
    return short or x.size >= _ONE_CALL_MIN_VALUES * p.C


def _long_runs(p):
    """Whether the view's channels-first runs hold ``_ONE_CALL_MIN_RUN`` values or more."""
    return not p.channels_last and p.shape3[2] >= _ONE_CALL_MIN_RUN


# Channels-last rows of fewer channels than a masked vector step takes (simd.TAIL_MASK_FROM)
# run value by value in the one-call kernels, a row at a time; from this many values the tiled
# passes, which view several rows as one (see _cl_parts), win despite their launches.  Whole
# calls against the one-call kernels, float32, 2 threads, statistics, training and inference:
# (8, 32, 32, 3) 2.70x, 2.44x, 2.03x; (3072, 3) 1.25x, 1.20x, 1.06x; (4096, 2) 1.19x, 1.25x,
# 1.12x; (8192, 1) 1.18x, 1.53x, 1.60x; below it they lose ((2560, 3) 1.08x, 1.03x, 0.95x;
# (2048, 3) 0.91x, 0.87x, 0.84x; (4096, 1) 0.71x, 0.91x, 0.99x).  With 4 channels a row is one
# masked step, and the one-call kernels stay ahead ((4096, 4) statistics 0.68x tiled).
# Backward keeps its one-call kernel: even either way.
_NARROW_ROWS_TILED_FROM = 8192


def _narrow_rows(p, x):
    """Whether the small view ``x`` takes the tiled passes for its narrow channels-last rows
    (see above)."""
    return (p.channels_last and p.C < _TAIL_MASK_FROM
            and x.size >= _NARROW_ROWS_TILED_FROM)


def _fuse(p, x, cap=None, short=False, tiled=None):
    """Whether an operation runs as one kernel call (the ``*_small`` kernels): on small tensors
    the launches, not the memory traffic, are the cost.  By shape only, never by thread count,
    so that results do not depend on the number of threads.  ``cap``, ``short``: see
    :func:`_cf_one_call`; ``tiled``: the reduction of an operation whose tiled passes run in one
    call (:func:`_cl_tiled`), which channels-last kernel views ``x`` of ``_FUSED_MAX_ROWS`` rows
    or more take instead (training and backward)."""
    if x.size < _config.SERIAL_BELOW:
        return not _narrow_rows(p, x)
    if p.channels_last:
        M = p.shape3[0]
        if tiled is not None and M >= _FUSED_MAX_ROWS and _cl_tiled(p, x, tiled):
            return False
        return M * _cl.BLOCK * x.itemsize <= _FUSED_BLOCK_BYTES
    return _cf_one_call(p, x, cap, short)


def _fuse_train(p, x):
    """:func:`_fuse` for training (see ``_ONE_CALL_MIN_RUN``)."""
    return _fuse(p, x, short=_long_runs(p) and x.nbytes <= _ONE_CALL_SHORT_TRAIN_BYTES,
                 tiled="moments")


def _fuse_infer(p, x):
    """:func:`_fuse` for inference, which reads every value once: channels-last blocks of
    larger tensors measured no faster there (see ``_FUSED_BLOCK_BYTES``), nor channels-first
    tensors beyond ``_ONE_CALL_PASS_BYTES``."""
    if x.size < _config.SERIAL_BELOW:
        return not _narrow_rows(p, x)
    return _cf_one_call(p, x, _ONE_CALL_PASS_BYTES)


def _fuse_stats(p, x):
    """:func:`_fuse` for statistics, which also take the block kernels for wide channels-last
    tensors in cache (see ``_FUSED_STATS_BLOCKS``)."""
    if _fuse(p, x, short=True):
        return True
    return (p.channels_last and p.C >= _FUSED_STATS_BLOCKS * _cl.BLOCK
            and x.nbytes <= _config.LLC_BYTES // 4)


# Channels-first backward with long runs, and channels small enough to stay in cache, also runs
# the one-call kernel: each channel's sums and then its dx, so the second read of x and dy comes
# from cache (3 passes over memory instead of 5).  Shorter runs measured slower that way (the
# tiled passes stream whole rows; (8, 64, 16384) float32: 3.05 vs 2.70 ms), and channels beyond
# a sixteenth of the last-level cache (per array) leave it before they are read again.  At 2
# threads, whole calls: (4, 32, 16, 56, 56) float32 3.6 -> 2.8 ms, float64 10.4 -> 8.9 ms,
# (2, 64, 32768) float32 1.9 -> 1.4 ms; streaming dx past the cache (a reused output) then
# saved another 7-18% (kernel: 2.95 -> 2.58 ms).  At least 16 channels, so that more cores each
# get one.  Forward training gains the same way (2 passes over memory instead of 3), whole
# calls alternating in one process, 2 threads: (4, 32, 16, 56, 56) float32 1.58 -> 1.29 ms,
# float64 3.25 -> 3.0 ms; (2, 64, 32768) float32 1.27 -> 1.06 ms; (1, 32, 512, 512) float64
# 5.1 -> 4.2 ms; (1, 64, 224, 224) float32, which stays in the last-level cache, about even
# (0.91 -> 0.87 ms).
_CHANNEL_RUN_BYTES = 128 << 10
_CHANNEL_MIN = 16


def _long_channels(p, x):
    """Whether the channels-first view ``x`` has runs of ``_CHANNEL_RUN_BYTES`` or more and
    channels that stay in cache between two passes over them (see above)."""
    if p.channels_last or p.C < _CHANNEL_MIN:
        return False
    N, _, S = p.shape3
    return (S * x.itemsize >= _CHANNEL_RUN_BYTES
            and N * S * x.itemsize <= _config.LLC_BYTES // 16)


# Channels-first runs this short (a 4 x 4 map: 16 values) make poor work for either channels-first
# route: one vector or less per run, a channel's runs a sample apart.  In tensors from
# _RUNS_AS_ROWS_FROM values and _RUNS_AS_ROWS_MIN samples (float64 up to an eighth of the
# last-level cache, _RUNS_AS_ROWS_WIDE), forward training and training-mode backward take each
# sample as one row of C * S values, channel c the S columns from c * S, and run the
# channels-last kernels on those rows (blocks of whole channels below 256 rows, else the tiled
# passes, with G = S: channels_last.train_small_grouped, train_tiled, backward_small_grouped,
# backward_tiled): unit-stride vectors over whole rows.  The columns' moments are merged per
# channel (Chan), their gradient sums added up per channel, and the parameters spread back
# over the columns.  Whole calls against the channels-first routes, alternating in one process,
# 2 and 1 threads.  Training: float32 (64, 512, 4, 4) 164 -> 81 and 324 -> 141 us (PyTorch 337
# and 670), (32, 1024, 2, 2) 133 -> 31 and 259 -> 49 (PyTorch 115 and 226: the channels-first
# route was behind), (512, 128, 4, 4) 285 -> 145 and 755 -> 247, (64, 256, 3, 3) 40 -> 28 and
# 64 -> 43, (32, 256, 4, 4) 44 -> 32 and 80 -> 44; float64 (128, 128, 4, 4) 118 -> 69 and
# 220 -> 91, (64, 256, 3, 3) 44 -> 39 and 73 -> 60.  Backward: float32 (64, 512, 4, 4) 124 ->
# 104 and 266 -> 178 us (PyTorch 120 and 197), (128, 128, 4, 4) 81 -> 49 and 144 -> 77
# (PyTorch 53 and 91), (512, 128, 4, 4) 517 -> 213 and 1004 -> 354 (PyTorch 418 and 784),
# (32, 1024, 2, 2) 102 -> 44 and 185 -> 82, (32, 256, 4, 4) 52 -> 48 and 92 -> 65, (32, 512,
# 3, 3) 52 -> 52 and 94 -> 70; float64 (64, 256, 3, 3) 67 -> 54 and 103 -> 78, (128, 128, 4,
# 4) 94 -> 97 and 176 -> 161, (256, 64, 4, 4) 84 -> 85 and 143 -> 128.  Even or behind, so
# left out: 16 samples ((16, 512, 4, 4) training 1.02x and 0.98x, backward 0.75x and 0.72x),
# fewer values ((64, 64, 3, 3) training 0.94x; (32, 128, 4, 4) backward 0.67x and 1.15x),
# float64 past the bound ((256, 256, 4, 4) training 0.93x and 0.72x), runs of 25 values or
# more ((32, 256, 5, 5) backward 0.64x).  Evaluation-mode backward keeps the channels-first
# routes.
_RUNS_AS_ROWS_MAX = 16
_RUNS_AS_ROWS_MIN = 32
_RUNS_AS_ROWS_FROM = 1 << 17
_RUNS_AS_ROWS_WIDE = 8


def _runs_as_rows(p, arrays):
    """For a channels-first view of short runs (see above): the kernel views ``arrays`` as
    rows of ``C * S`` values, or None."""
    x = arrays[0]
    if p.channels_last or not (x.dtype == _F32
                               or x.nbytes <= _config.LLC_BYTES // _RUNS_AS_ROWS_WIDE):
        return None
    N, C, S = p.shape3
    if not (1 < S <= _RUNS_AS_ROWS_MAX and N >= _RUNS_AS_ROWS_MIN
            and N * C * S >= _RUNS_AS_ROWS_FROM):
        return None
    rows = tuple(_layout._reshape_nocopy(a, (N, C * S)) for a in arrays)
    if any(v is None or v.strides[1] != v.itemsize for v in rows):
        return None
    return rows


def _backward_runs_as_rows(p, rows3, mean, invstd, w, fresh, finish, dx):
    """Training-mode backward of a channels-first view of short runs taken as rows
    (:func:`_runs_as_rows`): ``(dx, dweight, dbias)``."""
    x2, dy2, dx2 = rows3
    S = p.shape3[2]
    p2 = _layout.plan(x2, 1)
    grads = np.empty((2, p.C), x2.dtype)
    if _fuse(p2, x2, tiled="bwd_sums"):
        _cl.backward_small_grouped(_items_size(p2, x2), x2, dy2, mean, invstd, w, True,
                                   _narrow(x2), dx2, grads, S)
    else:
        _backward_tiled(p2, rows3, mean, invstd, w, grads, fresh, S)
    if finish is not None:
        finish()
    return dx, grads[0], grads[1]


def _backward_tiled(p, arrays, mean, invstd, w, grads, fresh, G=1):
    """Training-mode backward past the one-call sizes as one call of the family's
    ``backward_tiled`` over the kernel views ``arrays`` (``x``, ``dy``, ``dx``), ``grads``
    filled; ``G``: channels-last columns per channel (see ``channels_last.backward_tiled``).
    Where float32 data needs float64 lanes, the elementwise pass runs from Python with the
    parameters the kernel left in its scratch."""
    x3, dy3, dx3 = arrays
    narrow = _narrow(x3)
    if p.channels_last:
        (xw, dyw, dxw), P, tiles, nt = _cl_tiled_args(p, x3, arrays, fresh)
        (a, rows), (a32, _) = _param_rows(p, 4, narrow, P)
        done = _cl.backward_tiled(x3.size, x3, dy3, xw, dyw, mean, invstd, w, *tiles, narrow, a,
                                  a32, dxw, grads, nt, G)
    else:
        (a, rows), (a32, _) = _param_rows(p, 4, narrow)
        tiles, nt = _apply_tiles(p, x3, dx3, fresh)
        done = _cf.backward_tiled(x3.size, x3, dy3, mean, invstd, w, *_cf_bwd_tiles(x3), *tiles,
                                  narrow, a, a32, dx3, grads, nt)
    if not done:  # float64 lanes needed: the parameters are in a
        _elementwise(p, "bwd_apply", (x3, dy3), rows, (), dx3, fresh)


def _fuse_backward(p, x, training):
    """:func:`_fuse` for the backward pass (see ``_ONE_CALL_PASS_BYTES`` and
    ``_CHANNEL_RUN_BYTES``); the tiled passes run in one call in training mode only."""
    if x.size < _config.SERIAL_BELOW:  # as _fuse, without its calls (small calls add up)
        return True
    return (_fuse(p, x, _ONE_CALL_PASS_BYTES, _long_runs(p), "bwd_sums" if training else None)
            or _long_channels(p, x))


def _items_size(p, x3):
    """The size that picks the serial or parallel build of a one-call kernel: 0 (serial) when
    it has a single work item (one channel, or channels-last with at most one block of
    channels), where a parallel launch only adds its cost ((256, 64) backward: 1.6 us)."""
    items = -(-p.C // _cl.BLOCK) if p.channels_last else p.C
    return x3.size if items > 1 else 0


def _family(p):
    """The kernel module for the view: channels-last ``(M, C)`` or channels-first."""
    return _cl if p.channels_last else _cf


# ----------------------------------------------------------------------------- kernel drivers


_scratch = threading.local()
_SCRATCH_KEYS = 64
# Scratch of up to _SCRATCH_BYTES is kept, up to _SCRATCH_TOTAL per thread: the per-channel rows
# of wide tensors (3 x 65536 float64, 1.5 MB), allocated afresh on every call, were mapped and
# faulted in again on every call whenever the allocator had returned them to the system:
# (2, 65536) float32 training at 2 threads took 150-680 us from one process to the next.
_SCRATCH_BYTES = 4 << 20
_SCRATCH_TOTAL = 16 << 20


def _line_rows(k, C, dtype=_F64):
    """``(a, rows)``: a ``(k, Cp)`` scratch array ``a``, ``Cp >= C``, C-contiguous, whose rows
    each start on a cache line, and the views ``a[i, :C]``: the channels-last passes read
    per-channel parameters as vectors, one load per value, and a vector that straddles two
    lines costs two.  Kernel alone, (256, 1024) float32 inference at 1 thread: 38 us with the
    parameter rows 16 bytes off a line (``np.empty`` gives any multiple of 16), 34 us on one;
    whole calls against ``np.empty`` rows, alternating in one process, 2 threads: (256, 1024)
    float32 inference 50 -> 46 us, (32, 56, 56, 64) 736 -> 616 us, (32, 28, 28, 3) training 79
    -> 72 us, backward 108 -> 101 us.  Finding an array's address costs 2 us (and slicing rows
    0.6 us), so each thread keeps its scratch and views (up to ``_SCRATCH_BYTES`` each) by
    ``(k, C, dtype)``; nothing returned to a caller points into it."""
    cache = getattr(_scratch, "rows", None)
    if cache is None:
        cache = _scratch.rows = {}
    key = (k, C, dtype.char)
    got = cache.get(key)
    if got is None:
        per = _LINE // dtype.itemsize
        Cp = -(-C // per) * per
        nbytes = k * Cp * dtype.itemsize
        a = _pool.on_line(np.empty(nbytes + _LINE, np.uint8), nbytes).view(dtype).reshape(k, Cp)
        got = a, tuple(a[i, :C] for i in range(k))
        if nbytes <= _SCRATCH_BYTES:
            total = getattr(_scratch, "total", 0) + nbytes
            if len(cache) >= _SCRATCH_KEYS or total > _SCRATCH_TOTAL:
                cache.clear()
                total = nbytes
            cache[key] = got
            _scratch.total = total
    return got


def _cl_params(params, C, P):
    """Per-channel parameter rows (``params``: ``(k, >= C)``, only the first ``C`` columns
    meaningful) for a channels-last pass over rows of ``P * C`` values (see :func:`_cl_parts`):
    each row tiled ``P`` times, starting on a cache line (see :func:`_line_rows`)."""
    k = len(params)
    if k == 0:
        return ()
    rows = _line_rows(k, P * C, params[0].dtype)[1]
    for i in range(k):
        rows[i].reshape(P, C)[...] = params[i][:C]
    return rows


# Channels-last views with at least this many channels run rows as they are in the
# reductions (see _cl_parts)
_CL_WHOLE_ROWS = 16
# ... and their elementwise passes view rows that are not a whole number of cache lines as
# one too, as below: each row then began and ended with vectors straddling lines, and a masked
# tail step.  Kernel alone, float32, 2 threads, rows as they are -> viewed as one (values):
# (200000, 24) 399 -> 269 us (96), (100000, 40) 278 -> 214 us (80), (8000, 24) 23.2 -> 12.3 us,
# (1600, 24) 5.4 -> 3.8 us.  Longer rows gained nothing ((40000, 100): even in rows of 400,
# (3136, 520) 0.93x in rows of 1040), nor did rows of whole lines out of cache ((60000, 64)
# float32, (100000, 24) float64: even, and 0.8x in rows of 48 values).
_CL_WIDEN_BELOW_BYTES = 256


@functools.lru_cache(maxsize=256)
def _cl_row_factor(M, C, itemsize, elementwise):
    """How many of the ``M`` rows of ``C`` values :func:`_cl_parts` views as one (cached:
    found afresh it cost 0.25 us of a 9 us call)."""
    line = _LINE // itemsize
    want = -(-64 // C)
    if C < _CL_WHOLE_ROWS:
        P = want
        while P * C % line:
            P += 1
        return P
    if not elementwise or C % line == 0 or C * itemsize >= _CL_WIDEN_BELOW_BYTES:
        return 1
    # rows of a whole number of lines, as below, and a P that divides M, so that no rows are
    # left over and the one-call kernels view the whole tensor alike
    step = line // math.gcd(C, line)
    for P in range(-(-want // step) * step, 0, -step):
        if M % P == 0:
            return P
    return 1


def _cl_parts(arrays, C, elementwise=False):
    """Split same-shaped channels-last views ``(M, C)`` into kernel-friendly parts.

    With few channels an inner loop across ``C`` is too short to vectorise, so ``P`` rows are
    viewed as one row of ``P * C`` values (channel of column ``j``: ``j % C``) and the
    per-channel parameters are tiled ``P`` times.  Rows left over go in a second, narrow part.
    ``P * C`` is at least 64 and a whole number of cache lines, so the column kernels have no
    scalar columns and the rows of a line-aligned output can take streaming stores: whole
    calls against rows of ``ceil(64 / C)`` values, alternating in one process, 2 threads,
    float32 (64, 224, 224, 3) (66 -> 96 values) inference 2.14 -> 1.63 ms, training 3.30 ->
    2.88 ms, backward 5.35 -> 4.67 ms; (32, 64, 64, 7) (70 -> 112) training 339 -> 240 us,
    backward 521 -> 315 us; float64 (64, 224, 224, 3) (66 -> 72) training 11.3 -> 9.4 ms.
    ``elementwise``: for an elementwise pass, which views rows of more channels as one too
    where they are not a whole number of lines (see above).  Returns ``[(views, P), ...]``.
    """
    M = arrays[0].shape[0]
    P = _cl_row_factor(M, C, arrays[0].itemsize, elementwise)
    if P == 1:
        return [(arrays, 1)]
    Mw = M - M % P
    if Mw == 0:
        return [(arrays, 1)]
    wide = []
    for a in arrays:
        if Mw == M and a.flags.c_contiguous:  # reshapes without a copy, 0.1 against 0.8 us
            wide.append(a.reshape(M // P, P * C))
            continue
        v = _layout._reshape_nocopy(a[:Mw], (Mw // P, P * C))
        # rows further apart than C values (a size-1 channel axis cut from a wider array,
        # x[:, :1]) reshape into rows with gaps: the kernels read a row as contiguous vectors
        if v is None or v.strides[-1] != v.itemsize:
            return [(arrays, 1)]
        wide.append(v)
    parts = [(tuple(wide), P)]
    if Mw < M:
        parts.append((tuple(a[Mw:] for a in arrays), 1))
    return parts


def _reduce(p, name, arrays, params, nout=2):
    """Run the partial-reduction kernel ``name`` of the view's family.

    Returns the ``nout`` partial buffers stacked as one ``(nout, K, C)`` array (each tile owns
    a contiguous row), and the number of values behind each of the ``K`` partials (None except
    for ``moments``).
    """
    C = p.C
    x3 = arrays[0]
    if not p.channels_last:
        N, _, S = x3.shape
        R, W, SB = _cf_tiles(N, C, S, x3.itemsize)
        if name == "moments" and SB * x3.itemsize <= _SHORT_MOMENTS_BYTES:
            name = "moments_short"
            R, W, SB = _cf_tiles(N, C, S, x3.itemsize, _SHORT_MOMENTS_GROUP)
        if name.startswith("moments") and _cf.lanes32(x3):
            name = "moments32"
        elif name == "bwd_sums" and SB < _SHORT_RUN:
            name = "bwd_sums_short"
        KN, KS = -(-N // R), -(-S // SB)
        bufs = np.empty((nout, KN * KS, C))
        getattr(_cf, name)(x3.size, *arrays, *params, R, W, SB, *bufs)
        if not name.startswith("moments"):  # only Chan's merge needs the counts
            return bufs, None
        return bufs, _tile_counts(N, R, S, SB)
    parts, counts = [], []
    for views, P in _cl_parts(arrays, C):
        M, Cw = views[0].shape
        R, W = _cl_tiles(M, Cw, True, views[0].itemsize)
        K = -(-M // R)
        bufs = np.empty((nout, K, Cw))
        tiled = params if P == 1 else _cl_params(params, C, P)
        getattr(_cl, _cl_reduction(name, views[0]))(views[0].size, *views, *tiled, R, W, *bufs)
        n = _tile_counts(M, R)
        parts.append(bufs.reshape(nout, K * P, C))
        counts.append(n if P == 1 else np.repeat(n, P))
    bufs = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
    return bufs, counts[0] if len(counts) == 1 else np.concatenate(counts)


@_memo_tiles
def _tile_counts(N, R, S=1, SB=1):
    """The values behind each partial of a reduction over ``N`` rows in blocks of ``R`` (by
    ``S`` positions in blocks of ``SB``), in the partials' order; memoised (two ``np.full``
    cost 1.2 us of a 12 us call) and read-only, as it is shared."""
    rows = np.full(-(-N // R), float(R))
    rows[-1] = N - R * (len(rows) - 1)
    lens = np.full(-(-S // SB), float(SB))
    lens[-1] = S - SB * (len(lens) - 1)
    counts = np.outer(rows, lens).ravel()
    counts.flags.writeable = False
    return counts


def _cl_tiled(p, x3, name):
    """Whether the tiled passes of the view run back to back in one kernel call
    (``channels_last.stats_tiled`` and its kin), ``name`` the reduction: channels-last views
    that :func:`_cl_parts` leaves whole and whose reduction is the column kernel (see
    :func:`_cl_reduction`)."""
    return p.channels_last and p.C >= _CL_WHOLE_ROWS and _cl_reduction(name, x3) == name


def _tiled_one_call(p, x3, name):
    """Whether the tiled passes of an operation on the kernel view run back to back in one
    kernel call (the ``*_tiled`` kernels), ``name`` its reduction, or ``"affine"`` for
    inference: channels-last views as :func:`_cl_tiled` says (inference: where rows run whole),
    channels-first ones for inference and backward (their statistics and training stay driven
    from Python: not measured as one call).  Whole calls against the driven passes, float32,
    2 threads: backward (64, 3, 578) 1.19x, (16, 3, 64, 64) 1.13x, (128, 8, 256) 1.09x,
    (32, 2048, 7, 7) 1.08x, (64, 256, 14, 14) 1.03-1.06x; inference (64, 5, 5, 24)
    channels-last 1.10x, (16, 12, 256) 1.08x, (4, 3, 64, 64) 1.07x, 8 MB and more even."""
    if not p.channels_last:
        return name != "moments"
    if name == "affine":
        return p.C >= _CL_WHOLE_ROWS
    return _cl_tiled(p, x3, name)


def _apply_tiles(p, x3, out3, fresh):
    """``(tiles, nt)``: the tiles of the elementwise pass from the kernel view ``x3`` into
    ``out3`` (channels-last ``(R, W)``, channels-first ``(RB, SB)``) and whether it streams,
    as :func:`_elementwise` takes them for a view it leaves whole; the one-call tiled kernels
    take the same."""
    if p.channels_last:  # x3 may view several rows as one (see _cl_parts)
        tiles = _cl_tiles(x3.shape[0], x3.shape[1], False, x3.itemsize)
        return tiles, _nt(out3, fresh) and _streams(tiles[1], out3)
    N, C, S = x3.shape
    return _cf_row_tiles(N * C, S), _cf_nt(out3, fresh)


def _cl_tiled_args(p, x3, arrays, fresh):
    """``(views, P, (R, W, Re, We), nt)`` for a channels-last one-call tiled kernel (reduction
    of ``x3``, then an elementwise pass over ``arrays``, its inputs then its output): those
    views as :func:`_cl_parts` gives them to :func:`_elementwise` (``P`` rows as one), the
    tiles of the reduction and of the pass, and its streaming choice, as :func:`_reduce` and
    :func:`_elementwise` take them."""
    R, W = _cl_tiles(x3.shape[0], p.C, True, x3.itemsize)
    views, P, tiles, nt = _cl_wide_args(p, arrays, fresh)
    return views, P, (R, W) + tiles, nt


def _cl_wide_args(p, arrays, fresh):
    """``(views, P, tiles, nt)``: the channels-last ``arrays`` (an elementwise pass's inputs,
    then its output) as :func:`_cl_parts` views them for a one-call kernel, ``P`` rows as one
    (``P`` divides the rows, so there is one part), and the pass's tiles and streaming choice
    (:func:`_apply_tiles`)."""
    ((views, P),) = _cl_parts(arrays, p.C, elementwise=True)
    tiles, nt = _apply_tiles(p, views[0], views[-1], fresh)
    return views, P, tiles, nt


def _cf_bwd_tiles(x3):
    """The tiles ``(R, W, SB, short)`` of the gradient sums of
    ``channels_first.backward_tiled`` for the kernel view ``x3``, as :func:`_reduce` takes them
    (``short``: the ``bwd_sums_short`` kernel)."""
    N, C, S = x3.shape
    R, W, SB = _cf_tiles(N, C, S, x3.itemsize)
    return R, W, SB, SB < _SHORT_RUN


def _nt(out3, fresh):
    """Whether ``out3`` is large enough, and mapped, for streaming stores (see
    ``_config.STREAM_BYTES``; the runs must allow it too, see :func:`_streams`)."""
    # A fresh output is faulted in (zeroed by the OS, so in cache) by this very pass: streaming
    # stores then lost to ordinary ones (100 MB inference: 9.9 vs 9.1 ms), while into a reused
    # ``out=`` buffer they won (5.0 vs 7.7 ms).
    return not fresh and out3.nbytes >= _config.STREAM_BYTES


def _cf_nt(out3, fresh):
    """Whether the channels-first kernel view ``out3`` takes streaming stores: large and
    mapped (:func:`_nt`), and runs that allow it (:func:`_streams`)."""
    return _nt(out3, fresh) and _streams(out3.shape[2], out3)


def _elementwise(p, name, inputs, params, scalars, out3, fresh=False):
    """Run the elementwise kernel ``name`` of the view's family: ``out3`` from ``inputs`` and
    per-channel ``params``."""
    if not p.channels_last:
        x3 = inputs[0]
        tiles, nt = _apply_tiles(p, x3, out3, fresh)
        getattr(_cf, name)(x3.size, *inputs, *params, *scalars, out3, *tiles, nt)
        return
    big = _nt(out3, fresh)
    for views, P in _cl_parts(inputs + (out3,), p.C, elementwise=True):
        M, Cw = views[0].shape
        R, W = _cl_tiles(M, Cw, False, views[0].itemsize)
        nt = big and _streams(W, views[-1])
        tiled = params if P == 1 else _cl_params(params, p.C, P)
        getattr(_cl, name)(views[0].size, *views[:-1], *tiled, *scalars, views[-1], R, W, nt)


def _merged_sums(parts):
    """Sums over the chunk axis of ``(nout, K, C)`` partials, in a fixed order: ``(nout, C)``."""
    out = np.empty((parts.shape[0], parts.shape[2]))
    _merge.merge_sums(parts.size, parts, out)
    return out


def _overflowed(var, d1):
    """A variance whose squares overflowed (finite data, spread beyond ~1e154 in float64) comes
    out as inf - inf = NaN; it is +inf.  NaN from NaN or infinite data (``d1`` not finite)
    stays NaN."""
    bad = np.isnan(var) & np.isfinite(d1)
    if bad.any():
        var = np.where(bad, np.inf, var)
    return var


def _moments(p, x3, method, ddof=0):
    """Per-channel float64 mean and variance (divided by L - ddof) of the kernel view."""
    L = float(x3.size // p.C)
    if method == "two_pass":
        parts, _ = _reduce(p, "sums", (x3,), (np.zeros(p.C),))
        mean = _merged_sums(parts)[0] / L
        parts, _ = _reduce(p, "sums", (x3,), (mean,))
        d1, d2 = _merged_sums(parts)
        # The sum of deviations from the computed mean corrects that mean's rounding error.
        with np.errstate(over="ignore", invalid="ignore"):  # spreads beyond float64: see below
            m, var = mean + d1 / L, _overflowed((d2 - d1 * d1 / L) / (L - ddof), d1)
        bad = ~np.isfinite(mean)
        if bad.any():  # the sum overflowed, or the channel holds infinities or NaN
            m[bad], var[bad] = _scaled_two_pass(p, x3, bad, ddof)
        mean = m
    elif _fuse_stats(p, x3):  # the kernel sets infinite means itself
        out = np.empty((2, p.C))
        _family(p).stats_small(_items_size(p, x3), x3, L - ddof, out)
        return out[0], out[1]
    else:
        mean = np.empty(p.C)
        var = np.empty(p.C)
        if _tiled_one_call(p, x3, "moments"):
            M = x3.shape[0]
            R, W = _cl_tiles(M, p.C, True, x3.itemsize)
            bad = _cl.stats_tiled(x3.size, x3, R, W, _tile_counts(M, R), float(ddof), mean, var)
        else:
            (hi, lo, m2), counts = _reduce(p, "moments", (x3,), (), nout=3)
            bad = _merge.merge_moments(hi.size, counts, hi, lo, m2, mean, var, float(ddof))
        if not bad:
            return mean, var
    return _nonfinite_means(p, x3, mean, var)


def _nonfinite_means(p, x3, mean, var):
    """``(mean, var)`` with the channels whose mean came out NaN or infinite summed again
    unshifted, each value scaled by ``1 / L``, as ``merge.unshifted`` says: channels with
    infinities of one sign get that infinity (the shifted sums and merges see ``inf - inf``),
    finite values whose sums of deviations overflowed their mean and an infinite variance (the
    two-pass method has already replaced a mean whose plain sum overflowed, see
    :func:`_moments`)."""
    bad = ~np.isfinite(mean)
    if bad.any():
        t = _scaled_means(p, x3, bad)
        mean[bad] = t
        var[bad] = np.where(np.isfinite(t), np.inf, var[bad])
    return mean, var


def _scaled_two_pass(p, x3, channels, ddof):
    """Two-pass mean and variance of the ``channels`` (a mask) of the kernel view whose plain
    sum overflowed: the mean from values scaled by ``1 / L``, the deviations from it scaled by
    2**-512 (exactly), so that neither their sum nor their squares overflow; only a variance
    beyond float64 comes out infinite.  Rare (magnitudes near 1e306), so in NumPy."""
    L = x3.size // p.C
    m0 = _scaled_means(p, x3, channels)
    sub, axes = _channel_values(p, x3, channels)
    with np.errstate(invalid="ignore", over="ignore"):
        d = (sub - np.expand_dims(m0, axes)) * 2.0 ** -512
        d1 = d.sum(axis=axes)
        d2 = (d * d).sum(axis=axes)
        up = 2.0 ** 512
        return m0 + d1 / L * up, (d2 - d1 * d1 / L) / (L - ddof) * up * up


def _scaled_means(p, x3, channels):
    """The means of the ``channels`` (a mask) of the kernel view as sums of the values each
    scaled by ``1 / L`` first, which finite values cannot overflow."""
    sub, axes = _channel_values(p, x3, channels)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.sum(np.multiply(sub, 1.0 / (x3.size // p.C), dtype=np.float64), axis=axes)


def _channel_values(p, x3, channels):
    """The ``channels`` (a mask) of the kernel view, and the axes that hold their values."""
    if p.channels_last:
        return x3[:, channels], (0,)
    return x3[:, channels, :], (0, 2)


def _affine(p, x3, y3, center, var, weight, bias, eps, lo, count=0, fresh=False):
    """``y = max((x - center) * weight / sqrt(var + eps) + bias, lo)`` per channel.

    ``count > 0`` (training: ``var`` is the batch variance over ``count`` values) lets the
    parameter preparation bound ``max |x - center|`` (see ``merge.affine_params``).
    """
    narrow = _narrow(x3)
    (a, rows), (a32, rows32) = _param_rows(p, 3, narrow)
    args = (center, var, weight, bias, eps, count, narrow, a, a32)
    if p.C <= _merge.PARAM_CHUNK:  # one chunk: the helper, without the kernel's dispatch
        ok = _merge.affine_params(*args)
    else:
        ok = _merge.affine_params_kernel(x3.size, *args)
    if ok:
        rows = rows32
    # float32 lanes are exact here: scale and shift round once; the centre's rounding is in shift
    _elementwise(p, "affine", (x3,), rows, (_floor(rows[0], lo),), y3, fresh)


def _infer_tiled(p, x3, y3, center, var, weight, bias, eps, lo, fresh):
    """:func:`_affine` with running statistics as one kernel call (the ``infer_tiled`` kernels,
    see :func:`_tiled_one_call`): the same parameters, tiles and stores, so the same results,
    without the Python steps and the second dispatch in between."""
    narrow = _narrow(x3)
    if p.channels_last:
        (xw, yw), P, tiles, nt = _cl_wide_args(p, (x3, y3), fresh)
    else:
        (xw, yw), P = (x3, y3), 1
        tiles, nt = _apply_tiles(p, x3, y3, fresh)
    (a, rows), (a32, rows32) = _param_rows(p, 3, narrow, P)
    if not _family(p).infer_tiled(x3.size, xw, center, var, weight, bias, eps, narrow, a, a32,
                                  _floor(rows32[0], lo), yw, *tiles, nt):
        # float64 lanes for float32 data: the parameters are in a
        _elementwise(p, "affine", (x3,), rows, (_floor(rows[0], lo),), y3, fresh)


def _param_rows(p, k, narrow, P=1):
    """``((a, rows), (a32, rows32))``: scratch ``a`` for ``k`` rows of float64 per-channel
    parameters of an elementwise pass (the ``out`` of the ``merge`` parameter functions) with
    its rows as a tuple of ``P * C``-long views (``P``: channels-last rows viewed as one, see
    :func:`_cl_parts`), and float32 alike (``narrow``: float32 data) for what those functions
    fill when float32 lanes are safe (else ``a`` again, never written).
    Rows start on cache lines for the channels-last passes, which read them as vectors (see
    :func:`_line_rows`); its cached row views also save building them on every call (1.2 us
    of a 35 us channels-first backward)."""
    f64 = _line_rows(k, P * p.C)
    return f64, _line_rows(k, P * p.C, _F32) if narrow else f64


_FLOORS = {(c, lo): np.dtype(c).type(lo) for c in "fd" for lo in (0.0, _NEG_INF)}


def _floor(row, lo):
    """The floor ``lo`` (0 or -inf) in the type of the parameter row ``row``: a float64 scalar
    would widen float32 lanes to float64."""
    return _FLOORS[row.dtype.char, lo]


def _resolve_method(method):
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    # "auto": the single pass reads memory once (measured 1.2-2x faster than two passes on
    # tensors that do not fit in cache) and, with shifted sums and base-plus-offset means in the
    # merge, matches the two-pass result (float64, mean 1e8, std 1: both ~1e-14 relative).
    return "welford" if method == "auto" else method


# ----------------------------------------------------------------------------- public API


def channel_stats(x, *, axis=1, ddof=0, method="auto"):
    """Per-channel mean and variance over every axis except ``axis``.

    Parameters
    ----------
    x : ndarray, float32 or float64, 2-D to 5-D
    axis : int
        The channel axis (1 for NC/NCL/NCHW/NCDHW, -1 for channels-last).
    ddof : int
        The variance divides by ``L - ddof`` where ``L`` is the number of values per channel
        (0: biased, as used to normalise; 1: unbiased, as used for running statistics).
    method : {"auto", "two_pass", "welford"}
        ``"two_pass"``: the mean in one pass over memory, then the corrected sum of squared
        deviations in a second.  ``"welford"``: one pass over memory; each run or tile gets its
        count, mean and M2 from sums of deviations from one of its own values (the shifted-data
        algorithm: deviations are of the order of the spread), and these are merged in a fixed
        order with Chan's formula, means carried as a base plus an offset so that their
        differences stay exact.  Both accumulate in
        float64 and are stable for data far from zero (float64 data with mean 1e8 and std 1
        gives the variance to ~1e-12 relative or better), unlike ``E[x^2] - E[x]^2``.  ``"auto"`` picks
        ``"welford"``, which reads memory once and was measured as accurate.

    Returns
    -------
    mean, var : ndarray, shape (C,), dtype of ``x``

    Raises
    ------
    TypeError
        ``x`` not float32/float64, ``axis``/``ddof`` not an integer.
    ValueError
        Bad rank or axis, unknown ``method``, no values per channel, ``ddof`` too large.
    """
    x, axis = _x_and_axis(x, axis)
    method = _resolve_method(method)
    ddof = _integer(ddof, "ddof")
    L = _values_per_channel(x, axis)
    if L == 0:
        raise ValueError(f"x has no values per channel (shape {x.shape}); the statistics are undefined")
    if not 0 <= ddof < L:
        raise ValueError(f"ddof must be in [0, {L}) for {L} values per channel, got {ddof}")
    p = _layout.plan(x, axis)
    x3 = p.as_input(x)
    out = np.empty((2, p.C), x.dtype)
    if method == "welford" and _fuse_stats(p, x3):  # straight into the caller's type
        _family(p).stats_small(_items_size(p, x3), x3, float(L - ddof), out)
    else:
        _merge.stats_out(*_moments(p, x3, method, ddof), out)
    return out[0], out[1]


def _train(x, axis, weight, bias, eps, out, guard=()):
    """Forward training; returns (y, mean64, var64) with var biased.  ``guard``: more
    ``(array, name)`` that ``out`` must not overlap."""
    C = x.shape[axis]
    w = _param(weight, "weight", C)
    b = _param(bias, "bias", C)
    p = _layout.plan(x, axis)
    y, y3, finish, fresh = _output(p, x, out, ((x, "x"), (w, "weight"), (b, "bias")) + guard,
                                   apart=x)
    x3 = p.as_input(x)
    rows3 = _runs_as_rows(p, (x3, y3))
    if rows3 is not None:
        mean, var = _train_runs_as_rows(p, x3, y3, rows3, w, b, eps, fresh)
    elif _fuse_train(p, x3) or _long_channels(p, x3):
        mean = np.empty(C)
        var = np.empty(C)
        args = (x3, w, b, eps, _narrow(x3), y3, mean, var)
        if p.channels_last:
            _cl.train_small(_items_size(p, x3), *args, mean, *_line_rows(2, C)[1], 1)
        else:  # channels that fit in cache: y may be large enough to stream
            _cf.train_small(_items_size(p, x3), *args, _cf_nt(y3, fresh))
    elif _tiled_one_call(p, x3, "moments"):
        mean, var = _train_tiled(p, x3, y3, w, b, eps, fresh, (p, x3, y3))
    else:
        mean, var = _moments(p, x3, "welford")
        _affine(p, x3, y3, mean, var, w, b, eps, _NEG_INF, x3.size // C,
                fresh=fresh)
    if finish is not None:
        finish()
    return y, mean, var


def _train_tiled(p, x3, y3, w, b, eps, fresh, whole, G=1):
    """Forward training of the kernel view as one call of ``channels_last.train_tiled``:
    ``(mean, var)``, ``y3`` written; ``G``: columns per channel (see there).  Where that
    kernel stops (a mean NaN or infinite, or float32 data that needs float64 lanes), the
    statistics are finished and ``y`` written from Python over ``whole``, the ``(plan, x3,
    y3)`` of the whole tensor."""
    C = p.C // G
    mean = np.empty(C)
    var = np.empty(C)
    (xw, yw), P, (R, W, Re, We), nt = _cl_tiled_args(p, x3, (x3, y3), fresh)
    narrow = _narrow(x3)
    (a, _), (a32, rows32) = _param_rows(p, 3, narrow, P)
    status = _cl.train_tiled(x3.size, x3, xw, R, W, _tile_counts(x3.shape[0], R), Re, We, w, b,
                             eps, narrow, a, a32, _floor(rows32[0], _NEG_INF), yw, mean, var, nt,
                             G)
    if status:  # nothing written yet: a mean NaN or infinite (1), float64 lanes needed (2)
        pw, xv, yv = whole
        if status == 1:
            mean, var = _nonfinite_means(pw, xv, mean, var)
        _affine(pw, xv, yv, mean, var, w, b, eps, _NEG_INF, xv.size // C, fresh=fresh)
    return mean, var


def _train_runs_as_rows(p, x3, y3, rows3, w, b, eps, fresh):
    """Forward training of a channels-first view of short runs taken as rows
    (:func:`_runs_as_rows`): ``(mean, var)``, ``y3`` written."""
    x2, y2 = rows3
    S = p.shape3[2]
    p2 = _layout.plan(x2, 1)
    if not _fuse_train(p2, x2):
        return _train_tiled(p2, x2, y2, w, b, eps, fresh, (p, x3, y3), S)
    mean = np.empty(p.C)
    var = np.empty(p.C)
    _cl.train_small_grouped(_items_size(p2, x2), x2, w, b, eps, _narrow(x2), y2, mean, var,
                            *_line_rows(3, p2.C)[1], S)
    return mean, var


def batch_norm_train(x, weight=None, bias=None, *, eps=1e-5, axis=1, out=None):
    """Batch normalisation in training mode, as ``torch.native_batch_norm(training=True)``.

    ``y = (x - mean) * invstd * weight + bias`` with ``invstd = 1 / sqrt(var + eps)`` and the
    biased per-channel batch variance ``var``.  Statistics use the single-pass chunked algorithm
    of :func:`channel_stats`; when a channel's data fits in cache, its statistics and its
    normalisation run back to back so memory is read once.

    Returns
    -------
    y : ndarray like ``x`` (or ``out``)
    mean, invstd : ndarray, shape (C,), dtype of ``x`` — what the backward pass needs.

    Raises
    ------
    ValueError
        Fewer than 2 values per channel ("Expected more than 1 value per channel when
        training"), bad rank/axis, parameters of the wrong shape, ``eps`` <= 0, bad ``out``.
    TypeError
        Non-float ``x``, parameters or ``out`` of the wrong dtype.
    """
    x, axis = _x_and_axis(x, axis)
    eps = _positive(eps, "eps")
    _require_training_size(x, axis)
    y, mean, var = _train(x, axis, weight, bias, eps, out)
    saved = np.empty((2, x.shape[axis]), x.dtype)
    _merge.saved_stats(mean, var, eps, saved)
    return y, saved[0], saved[1]


def batch_norm_infer(x, running_mean, running_var, weight=None, bias=None, *, eps=1e-5, axis=1,
                     activation=None, out=None):
    """Batch normalisation in inference mode, one pass over memory.

    ``y = (x - running_mean) * scale + bias`` with per-channel ``scale = weight /
    sqrt(running_var + eps)``, optionally followed by ReLU (``activation="relu"``).  This is the
    fused ``x * scale + shift`` form with the mean subtracted first, which costs nothing on a
    memory-bound pass and avoids cancellation when the mean is large.

    Raises
    ------
    ValueError / TypeError
        As :func:`batch_norm_train`, plus an unknown ``activation``.
    """
    x, axis = _x_and_axis(x, axis)
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    eps = _positive(eps, "eps")
    C = x.shape[axis]
    rm = _param(running_mean, "running_mean", C, required=True)
    rv = _param(running_var, "running_var", C, required=True)
    w = _param(weight, "weight", C)
    b = _param(bias, "bias", C)
    inputs = ((x, "x"), (rm, "running_mean"), (rv, "running_var"), (w, "weight"), (b, "bias"))
    if x.size == 0:
        return _new_output(x) if out is None else _check_out(out, x, inputs=inputs)
    p = _layout.plan(x, axis)
    y, y3, finish, fresh = _output(p, x, out, inputs)
    x3 = p.as_input(x)
    lo = 0.0 if activation == "relu" else _NEG_INF
    if _fuse_infer(p, x3):
        _family(p).infer_small(_items_size(p, x3), x3, rm, rv, w, b, eps, lo, _narrow(x3), y3,
                               np.empty((3, C)))
    elif _tiled_one_call(p, x3, "affine"):
        _infer_tiled(p, x3, y3, rm, rv, w, b, eps, lo, fresh)
    else:
        _affine(p, x3, y3, rm, rv, w, b, eps, lo, fresh=fresh)
    if finish is not None:
        finish()
    return y


def batch_norm_backward(dy, x, mean, invstd, weight=None, *, axis=1, training=True, out=None):
    """Gradients of batch normalisation, as ``torch.native_batch_norm_backward``.

    Training mode (``mean``/``invstd`` are the batch statistics saved by the forward pass)::

        dx = weight * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)),  xhat = (x - mean) * invstd

    Evaluation mode (``training=False``; ``mean``/``invstd`` come from the running statistics):
    ``dx = dy * weight * invstd``.  In both modes ``dweight = sum(dy * xhat)`` and
    ``dbias = sum(dy)`` over every axis but the channel axis.

    Two passes: per-channel sums of ``dy`` and ``dy * (x - mean)``, then an elementwise pass;
    for small tensors, and channels-first ones with long runs and channels that fit in cache,
    both run back to back on one channel (or block of channels) at a time.

    Returns
    -------
    dx : ndarray like ``x`` (or ``out``)
    dweight, dbias : ndarray, shape (C,), dtype of ``x``
    """
    x, axis = _x_and_axis(x, axis)
    dy = _array(dy, "dy")
    if dy.shape != x.shape:
        raise ValueError(f"dy must have the shape of x {x.shape}, got {dy.shape}")
    if dy.dtype is not x.dtype and dy.dtype != x.dtype:
        raise TypeError(f"dy must have the dtype of x ({x.dtype}), got {dy.dtype}")
    C = x.shape[axis]
    mean = _param(mean, "mean", C, required=True)
    invstd = _param(invstd, "invstd", C, required=True)
    w = _param(weight, "weight", C)
    training = _flag(training, "training")
    inputs = ((x, "x"), (dy, "dy"), (mean, "mean"), (invstd, "invstd"), (w, "weight"))
    if x.size == 0:
        dx = _new_output(x) if out is None else _check_out(out, x, inputs=inputs)
        z = np.zeros(C, dtype=x.dtype)
        return dx, z, z.copy()
    p = _layout.plan(x, axis)
    dx, dx3, finish, fresh = _output(p, x, out, inputs, apart=dy)
    x3 = p.as_input(x)
    dy3 = p.as_input(dy)
    rows3 = _runs_as_rows(p, (x3, dy3, dx3)) if training else None
    if rows3 is not None:
        return _backward_runs_as_rows(p, rows3, mean, invstd, w, fresh, finish, dx)
    if _fuse_backward(p, x3, training):
        grads = np.empty((2, C), x.dtype)
        size = _items_size(p, x3)
        if p.channels_last:
            _cl.backward_small(size, x3, dy3, mean, invstd, w, training, _narrow(x3), dx3, grads,
                               1)
        else:  # channels that fit in cache: dx may be large enough to stream
            _cf.backward_small(size, x3, dy3, mean, invstd, w, training, _narrow(x3), dx3, grads,
                               _cf_nt(dx3, fresh))
        if finish is not None:
            finish()
        return dx, grads[0], grads[1]
    if training and _tiled_one_call(p, x3, "bwd_sums"):
        grads = np.empty((2, C), x.dtype)
        _backward_tiled(p, (x3, dy3, dx3), mean, invstd, w, grads, fresh)
        if finish is not None:
            finish()
        return dx, grads[0], grads[1]
    L = _values_per_channel(x, axis)
    mu = mean.astype(np.float64)
    istd = invstd.astype(np.float64)
    parts, _ = _reduce(p, "bwd_sums", (x3, dy3), (mu,))
    sums = _merged_sums(parts)
    narrow = _narrow(x3)
    (a, rows), (a32, rows32) = _param_rows(p, 4, narrow)
    if _merge.backward_params(sums, mu, istd, w, float(L), training, narrow, a, a32):
        rows = rows32
    if training:
        _elementwise(p, "bwd_apply", (x3, dy3), rows, (), dx3, fresh)
    else:
        # Evaluation mode: dx = a * dy does not depend on x (an infinite x must not give NaN);
        # q is 0 there, and its row serves as centre and shift.
        _elementwise(p, "affine", (dy3,), (rows[2], rows[1], rows[2]),
                     (_floor(rows[0], _NEG_INF),), dx3, fresh)
    if finish is not None:
        finish()
    return _grads(x, sums, istd, dx)


def _grads(x, sums, istd, dx):
    """``(dx, dweight, dbias)`` from the merged sums ``(sum dy, sum dy * (x - mean))`` (a
    float32 gradient sum beyond the range is +-inf, rightly)."""
    grads = np.empty((2, sums.shape[1]), x.dtype)
    _merge.grads_out(sums, istd, grads)
    return dx, grads[0], grads[1]


def batch_norm(x, running_mean, running_var, weight=None, bias=None, *, training=False,
               momentum=0.1, eps=1e-5, axis=1, out=None):
    """Mirror of ``torch.nn.functional.batch_norm``.

    In training mode the batch statistics normalise ``x``, and the running statistics, when
    given (either may be None), are updated in place::

        running_mean = (1 - momentum) * running_mean + momentum * mean
        running_var  = (1 - momentum) * running_var  + momentum * var * L / (L - 1)

    (the unbiased batch variance, ``L`` values per channel).  They are written only after the
    output is computed, so a failing call leaves them untouched.  Otherwise the running
    statistics, which are then required, normalise ``x`` (:func:`batch_norm_infer`).
    """
    x, axis = _x_and_axis(x, axis)
    training = _flag(training, "training")
    eps = _positive(eps, "eps")
    momentum = _momentum(momentum)
    C = x.shape[axis]
    running_mean = _running(running_mean, "running_mean", C, training)
    running_var = _running(running_var, "running_var", C, training)
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var are required when training=False")
        return batch_norm_infer(x, running_mean, running_var, weight, bias, eps=eps, axis=axis,
                                out=out)
    L = _require_training_size(x, axis)
    y, mean, var = _train(x, axis, weight, bias, eps, out,
                          ((running_mean, "running_mean"), (running_var, "running_var")))
    _update_running(running_mean, running_var, mean, var, L, momentum)
    return y


def _running(v, name, C, training, of="x"):
    """A running statistic (or None); in training mode it is updated in place, so it must be
    a writeable ndarray: a list would be converted and the update lost."""
    if v is None:
        return None
    if training and (not isinstance(v, np.ndarray) or isinstance(v, np.ma.MaskedArray)):
        raise TypeError(f"{name} must be a numpy.ndarray when training (it is updated in "
                        f"place), got {type(v).__name__}")
    return _channel_vector(v, name, C, writeable=training, of=of)


def update_running_stats(running_mean, running_var, mean, var, count, momentum):
    """PyTorch's running-statistics update, in place (either running array may be None).

    ``var`` is the biased batch variance over ``count`` values per channel (an integer, at
    least 2); the running variance takes the unbiased one, ``var * count / (count - 1)``.

    Raises
    ------
    TypeError
        A running array that is not a float ndarray (it is updated in place), non-float
        ``mean``/``var``, a non-integer ``count``, a non-real ``momentum``.
    ValueError
        Arrays of different lengths or not 1-D, a read-only running array, ``count`` < 2,
        ``momentum`` outside [0, 1].
    """
    momentum = _momentum(momentum)
    count = _integer(count, "count")
    if count < 2:
        raise ValueError(f"count must be at least 2 (values per channel behind the batch "
                         f"variance), got {count}")
    mean = _array(mean, "mean")
    if mean.ndim != 1:
        raise ValueError(f"mean must be 1-D (one value per channel), got shape {mean.shape}")
    C = mean.shape[0]
    var = _channel_vector(var, "var", C, of="mean")
    running_mean = _running(running_mean, "running_mean", C, True, of="mean")
    running_var = _running(running_var, "running_var", C, True, of="mean")
    _update_running(running_mean, running_var, mean, var, count, momentum)


def _update_running(running_mean, running_var, mean, var, count, momentum):
    if running_mean is not None:
        running_mean[...] = (1.0 - momentum) * running_mean + momentum * mean
    if running_var is not None:
        running_var[...] = (1.0 - momentum) * running_var + momentum * (var * (count / (count - 1)))
