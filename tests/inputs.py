"""The one input generator of the test suite (bottleneck's ``tests/util.py`` idea).

``cases()`` yields ``Case(id, x, axis)`` triples: ``x`` is a float32 or float64 array, ``axis`` its
channel axis.  Every test that feeds arrays to fastbn draws them from here, so a layout added here
is exercised by every kernel.  Everything is seeded (per case id), so a case is the same array on
every run and ``build(case_id)`` regenerates it (fresh, so a test can never see an array an earlier
test modified).

Coverage:
* the public shape suite, scaled down to a few thousand elements, channels-first (axis=1) and
  channels-last (axis=-1) variants;
* other channel axes (0, 2, -2, 3), 2-D .. 5-D;
* C == 1, N == 1 with spatial dims > 1, odd sizes;
* strided views (``a[::2]``, strided channel axis, strided inner axis), transposed views
  (including torch's channels_last memory format: NHWC memory seen as NCHW), Fortran order,
  negative strides;
* constant channels (variance exactly 0, so ``eps`` matters);
* large offsets (+1e4 in float32, +1e8 in float64) with unit spread: variance cancellation;
* a few medium-size cases (32k .. 131k elements) so that the kernels' parallel / chunked paths run.

Per-channel helpers (``params``, ``like``) give weights, biases, running statistics and upstream
gradients from the same seeded source.
"""

import zlib
from collections import namedtuple

import numpy as np

__all__ = [
    "DTYPES",
    "OFFSETS",
    "Case",
    "build",
    "case_ids",
    "cases",
    "is_large_offset",
    "like",
    "params",
    "rng_for",
]

Case = namedtuple("Case", ["id", "x", "axis"])

DTYPES = (np.float32, np.float64)

#: offsets of the "large offset" cases: the spread is 1, so these stress the variance computation
#: (float32 keeps ~3 digits of the deviation at 1e4; float64 ~8 digits at 1e8).
OFFSETS = {np.dtype(np.float32): 1e4, np.dtype(np.float64): 1e8}

_OFFSET_TAG = "offset"


def rng_for(*key):
    """A numpy Generator seeded from a stable hash of ``key`` (no global state)."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _randn(rng, shape, axis, dtype, offset=0.0):
    """Normal data with a different mean (in [-2, 2]) and scale (in [0.5, 2]) per channel, so a
    kernel that mixes up channels cannot pass."""
    shape = tuple(shape)
    c = shape[axis]
    bshape = [1] * len(shape)
    bshape[axis] = c
    mean = rng.uniform(-2.0, 2.0, c).reshape(bshape)
    scale = rng.uniform(0.5, 2.0, c).reshape(bshape)
    x = rng.standard_normal(shape) * scale + mean + offset
    return x.astype(dtype)


def _plain(shape, axis):
    return lambda rng, dt: _randn(rng, shape, axis, dt)


def _view(base_shape, base_axis, fn):
    """Generate a base array (channels along base_axis) and return a view of it."""
    return lambda rng, dt: fn(_randn(rng, base_shape, base_axis, dt))


def _fortran(shape, axis):
    return lambda rng, dt: np.asfortranarray(_randn(rng, shape, axis, dt))


def _offset(shape, axis):
    return lambda rng, dt: _randn(rng, shape, axis, dt, offset=OFFSETS[np.dtype(dt)])


def _constant(shape, axis, values):
    """Some channels constant: var == 0 exactly, y must equal bias."""
    def make(rng, dt):
        x = _randn(rng, shape, axis, dt)
        xm = np.moveaxis(x, axis, 0)  # view
        for ch, v in values.items():
            xm[ch] = v
        return x
    return make


# (name, axis of the returned array, builder(rng, dtype) -> array)
_SPECS = [
    # --- the public shape suite, scaled down (public shape in the comment) --------------------
    ("nchw_64x56", 1, _plain((4, 16, 7, 7), 1)),           # (32, 64, 56, 56)
    ("nchw_256x14", 1, _plain((4, 32, 5, 5), 1)),          # (32, 256, 14, 14)
    ("nchw_2048x7", 1, _plain((2, 128, 3, 3), 1)),         # (32, 2048, 7, 7)
    ("nchw_3x224", 1, _plain((8, 3, 12, 12), 1)),          # (64, 3, 224, 224)
    ("nc_1024", 1, _plain((64, 48), 1)),                   # (256, 1024)
    ("n1_nchw_64x112", 1, _plain((1, 8, 20, 20), 1)),      # (1, 64, 112, 112)
    ("n1_nchw_512x7", 1, _plain((1, 64, 7, 7), 1)),        # (1, 512, 7, 7)
    ("nhwc_56x64", -1, _plain((4, 7, 7, 16), -1)),         # (32, 56, 56, 64) channels-last
    ("nhwc_224x3", -1, _plain((8, 12, 12, 3), -1)),        # (64, 224, 224, 3) channels-last
    ("ncl_128x512", 1, _plain((4, 16, 48), 1)),            # (32, 128, 512)
    ("ncdhw", 1, _plain((2, 8, 4, 7, 7), 1)),              # (4, 32, 16, 56, 56)
    # --- the same family with the channel axis on the other side --------------------------------
    ("nhwc_256x14", -1, _plain((4, 5, 5, 32), -1)),
    ("nhwc_2048x7", -1, _plain((2, 3, 3, 128), -1)),
    ("nc_1024_axis-1", -1, _plain((64, 48), -1)),
    ("n1_nhwc", -1, _plain((1, 20, 20, 8), -1)),
    ("nlc", -1, _plain((4, 48, 16), -1)),
    ("ndhwc", -1, _plain((2, 4, 7, 7, 8), -1)),
    ("nchw_56x64_as_axis1", 1, _plain((4, 16, 7, 7), 1)),
    # --- other channel axes ----------------------------------------------------------------------
    ("axis0_2d", 0, _plain((5, 40), 0)),
    ("axis0_3d", 0, _plain((5, 3, 7), 0)),
    ("axis2_4d", 2, _plain((3, 4, 5, 6), 2)),
    ("axis-2_4d", -2, _plain((3, 4, 5, 6), -2)),
    ("axis3_5d", 3, _plain((2, 3, 4, 5, 3), 3)),
    # --- C == 1, N == 1, odd sizes ---------------------------------------------------------------
    ("c1_nchw", 1, _plain((6, 1, 5, 5), 1)),
    ("c1_nc", 1, _plain((40, 1), 1)),
    ("c1_nhwc", -1, _plain((5, 6, 6, 1), -1)),
    ("n1_ncl", 1, _plain((1, 6, 9), 1)),
    ("n1_nhwc_odd", -1, _plain((1, 5, 5, 6), -1)),
    ("odd_3x5x7_axis1", 1, _plain((3, 5, 7), 1)),
    ("odd_3x5x7_axis-1", -1, _plain((3, 5, 7), -1)),
    ("odd_5d", 1, _plain((3, 5, 3, 1, 7), 1)),
    # --- strided views ---------------------------------------------------------------------------
    ("strided_batch", 1, _view((8, 6, 5, 5), 1, lambda a: a[::2])),
    ("strided_channel", 1, _view((4, 12, 5, 5), 1, lambda a: a[:, ::2])),
    ("strided_inner", 1, _view((4, 6, 5, 10), 1, lambda a: a[..., ::2])),
    ("strided_channel_last", -1, _view((4, 7, 7, 32), -1, lambda a: a[..., ::2])),
    ("strided_2d", 1, _view((64, 96), 1, lambda a: a[::3, ::2])),
    ("strided_nhwc_batch", -1, _view((6, 5, 5, 8), -1, lambda a: a[::2, :, 1:])),
    # --- transposed views ------------------------------------------------------------------------
    ("torch_channels_last", 1, _view((4, 7, 7, 16), -1, lambda a: a.transpose(0, 3, 1, 2))),
    ("transposed_4d_T", 2, _view((5, 6, 7, 4), 1, lambda a: a.T)),
    ("transposed_2d_T", 0, _view((40, 12), 1, lambda a: a.T)),
    ("transposed_ncl", 1, _view((4, 48, 16), -1, lambda a: a.transpose(0, 2, 1))),
    ("transposed_5d", 1, _view((2, 4, 5, 3, 6), -1, lambda a: a.transpose(0, 4, 2, 1, 3))),
    # --- Fortran order ---------------------------------------------------------------------------
    ("fortran_nchw", 1, _fortran((4, 6, 5, 5), 1)),
    ("fortran_nc", 1, _fortran((30, 8), 1)),
    ("fortran_nhwc", -1, _fortran((4, 5, 5, 6), -1)),
    # --- negative strides ------------------------------------------------------------------------
    ("reversed_batch", 1, _view((4, 6, 5, 5), 1, lambda a: a[::-1])),
    ("reversed_channel", 1, _view((4, 6, 5, 5), 1, lambda a: a[:, ::-1])),
    ("reversed_channel_last", -1, _view((4, 5, 5, 6), -1, lambda a: a[..., ::-1])),
    ("reversed_2d", 1, _view((30, 8), 1, lambda a: a[::-1, ::-1])),
    # --- constant channels: var == 0 -------------------------------------------------------------
    ("constant_nchw", 1, _constant((4, 6, 5, 5), 1, {2: 3.0, 4: 0.0})),
    ("constant_nhwc", -1, _constant((4, 5, 5, 6), -1, {1: -2.5, 5: 0.1})),
    ("constant_c1", 1, _constant((10, 1, 4), 1, {0: 7.0})),
    # --- large offsets (variance cancellation) ---------------------------------------------------
    ("offset_nchw", 1, _offset((4, 8, 6, 6), 1)),
    ("offset_nhwc", -1, _offset((4, 6, 6, 8), -1)),
    ("offset_nc", 1, _offset((200, 16), 1)),
    ("offset_long_nc", 1, _offset((2048, 3), 1)),       # many values per channel
    ("offset_long_nhwc", -1, _offset((8, 16, 16, 3), -1)),
    # --- small tensors whose one-call kernels split channels among threads ----------------------
    # (from fastbn._config.SMALL_PARALLEL_FROM = 8192 elements, under 32768)
    ("threaded_n1", 1, _plain((1, 384, 7, 7), 1)),
    ("threaded_nchw", 1, _plain((8, 32, 8, 8), 1)),
    ("threaded_strided_batch", 1, _view((24, 40, 6, 6), 1, lambda a: a[::2])),
    ("threaded_nhwc", -1, _plain((2, 12, 12, 64), -1)),
    ("threaded_nc", 1, _plain((96, 200), 1)),                # 3 blocks of 64 channels and 8
    ("threaded_nhwc_c5", -1, _plain((8, 24, 24, 5), -1)),
    ("threaded_strided_nc", 1, _view((240, 150), 1, lambda a: a[::2])),
    # --- medium sizes: enough work per channel for chunked / parallel reductions ----------------
    ("medium_c1_long", 1, _plain((2, 1, 256, 256), 1)),
    ("medium_nhwc_c3", -1, _plain((4, 64, 64, 3), -1)),
    ("medium_nchw", 1, _plain((8, 16, 24, 24), 1)),
    ("medium_short_runs", 1, _plain((16, 128, 5, 5), 1)),   # runs < 128: *_short reductions
    # channels-last with few rows: training and backward by blocks of channels (functional._fuse)
    ("medium_nc_few_rows", 1, _plain((128, 384), 1)),
    # statistics by blocks of channels from 16 blocks (functional._fuse_stats), more rows
    ("medium_nc_1024", 1, _plain((520, 1024), 1)),
    # channels-first runs of >= 128 KB: backward channel by channel (functional._fuse_backward)
    ("medium_long_runs", 1, _plain((2, 16, 32768), 1)),
]

_BY_NAME = {name: (axis, make) for name, axis, make in _SPECS}
assert len(_BY_NAME) == len(_SPECS), "duplicate case names"


def _case_id(name, dtype):
    return f"{name}-{np.dtype(dtype).name}"


def case_ids(dtypes=DTYPES, *, medium=True):
    """Ids of all cases (cheap: for pytest parametrization)."""
    return [_case_id(name, dt) for dt in dtypes for name, _, _ in _SPECS
            if medium or not name.startswith("medium")]


def build(case_id):
    """Regenerate the case with this id (a fresh array)."""
    name, dtname = case_id.rsplit("-", 1)
    axis, make = _BY_NAME[name]
    dtype = np.dtype(dtname)
    x = make(rng_for(name, dtname), dtype)
    assert x.dtype == dtype, case_id
    return Case(case_id, x, axis)


def cases(dtypes=DTYPES, *, medium=True):
    """Yield every ``Case(id, x, axis)`` (fresh arrays), for each dtype in ``dtypes``."""
    for cid in case_ids(dtypes, medium=medium):
        yield build(cid)


def is_large_offset(case_id):
    """True for the cases whose values carry a large offset (see OFFSETS)."""
    return case_id.startswith(_OFFSET_TAG)


def params(num_channels, dtype, *key, positive_weight=False):
    """Per-channel ``weight, bias, running_mean, running_var`` (seeded by ``key``).

    The weight includes a zero and a negative entry unless ``positive_weight``; the running
    variance is in [0.5, 2]."""
    rng = rng_for("params", num_channels, np.dtype(dtype).name, *key)
    weight = rng.uniform(0.5, 1.5, num_channels)
    if not positive_weight:
        weight[::3] *= -1.0
        weight[num_channels // 2] = 0.0 if num_channels > 2 else weight[num_channels // 2]
    bias = rng.uniform(-1.0, 1.0, num_channels)
    running_mean = rng.uniform(-1.0, 1.0, num_channels)
    running_var = rng.uniform(0.5, 2.0, num_channels)
    return tuple(a.astype(dtype) for a in (weight, bias, running_mean, running_var))


def like(x, *key):
    """A seeded standard-normal array with x's shape and dtype (e.g. an upstream gradient dy)."""
    rng = rng_for("like", x.shape, x.dtype.name, *key)
    return rng.standard_normal(x.shape).astype(x.dtype)
