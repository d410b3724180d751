"""Numerical behaviour: cancellation, NaN containment, constant channels, huge values, and a
Hypothesis property test against the reference.

Hypothesis profiles: the quick test runs 50 examples on every run; the ``nightly`` test runs
10 000 and is skipped unless selected with ``-m nightly`` (see conftest.py).
"""

import warnings

import inputs
import numpy as np
import pytest
import reference as ref
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from util import Unchanged, assert_close, input_precision_slack, rtol

import fastbn

METHODS = ["auto", "two_pass", "welford"]
ONE_VALUE = "Expected more than 1 value per channel when training"

# layouts for the cancellation tests: the parallel path (>= 32k elements), channels-last,
# a small serial case, a long 2-D channel
CANCEL_SHAPES = [((16, 3, 32, 32), 1), ((8, 32, 32, 3), -1), ((4, 3, 5, 5), 1), ((4096, 2), 1)]


def _offset_data(shape, axis, dtype, offset, seed=1):
    rng = inputs.rng_for("cancellation", shape, axis, np.dtype(dtype).name, seed)
    return (rng.standard_normal(shape) + offset).astype(dtype)


def _naive_var(x, axis, dtype):
    """The textbook one-pass formula E[x^2] - E[x]^2, accumulated in ``dtype``."""
    r = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis]).astype(dtype)
    return (r * r).mean(axis=0, dtype=dtype) - r.mean(axis=0, dtype=dtype) ** 2


def _max_rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.abs(b)))


# --------------------------------------------------------------------------------------------
# catastrophic cancellation
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape, axis", CANCEL_SHAPES)
def test_cancellation_float64(shape, axis, method):
    """mean 1e8, std 1 in float64: the variance to 1e-6 relative.  The naive formula on the same
    data is visibly wrong (E[x^2] ~ 1e16 has an ulp of 2, larger than the variance itself)."""
    x = _offset_data(shape, axis, np.float64, 1e8)
    _, rvar = ref.channel_stats(x, axis)
    naive = _max_rel(_naive_var(x, axis, np.float64), rvar)
    assert naive > 1e-1, f"naive formula unexpectedly accurate here ({naive:.2g})"
    _, var = fastbn.channel_stats(x, axis=axis, method=method)
    assert _max_rel(var, rvar) <= 1e-6, f"var rel err {_max_rel(var, rvar):.3g} (naive {naive:.3g})"
    for ddof in (0, 1):
        _, var = fastbn.channel_stats(x, axis=axis, method=method, ddof=ddof)
        assert _max_rel(var, ref.channel_stats(x, axis, ddof)[1]) <= 1e-6


# float32, mean 1e4, std 1 (data stored in float32, so the "exact" variance is that of the
# float32 values, computed by the float64 reference).  Measured (2 cores, AMD EPYC, fastbn 0.1.0):
# max relative error 4.7e-8 over CANCEL_SHAPES and all methods, i.e. at the float32 rounding of
# the result itself (half an ulp is 2**-24 = 6.0e-8).  Bound: 2**-23 = 1.19e-7, one float32 ulp --
# the variance must be the float32 rounding of the exact one, up to 2x.  The naive formula in
# float32 is wrong by factors 10..3000 on the same data.
FLOAT32_VAR_BOUND = 2.0 ** -23


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape, axis", CANCEL_SHAPES)
def test_cancellation_float32(shape, axis, method):
    x = _offset_data(shape, axis, np.float32, 1e4)
    _, rvar = ref.channel_stats(x, axis)
    naive = _max_rel(_naive_var(x, axis, np.float32), rvar)
    assert naive > 1.0, f"naive float32 formula unexpectedly accurate here ({naive:.2g})"
    _, var = fastbn.channel_stats(x, axis=axis, method=method)
    err = _max_rel(var, rvar)
    assert err <= FLOAT32_VAR_BOUND, f"var rel err {err:.3g} > {FLOAT32_VAR_BOUND:.3g}"
    _, _, invstd = fastbn.batch_norm_train(x, axis=axis)
    _, _, rinv = ref.batch_norm_train(x, axis=axis)
    assert _max_rel(invstd, rinv) <= FLOAT32_VAR_BOUND


# --------------------------------------------------------------------------------------------
# NaN stays in its channel
# --------------------------------------------------------------------------------------------

NAN_CASES = ["nchw_256x14-float32", "nhwc_56x64-float64", "medium_nhwc_c3-float32",
             "medium_nchw-float64", "transposed_4d_T-float32"]


@pytest.mark.parametrize("case_id", NAN_CASES)
def test_nan_stays_in_channel(case_id):
    c = inputs.build(case_id)
    x, axis, dt = c.x, c.axis, c.x.dtype
    C = x.shape[axis]
    bad = 1 % C
    xm = np.moveaxis(x, axis, 0)
    pos = (bad,) + tuple(s // 2 for s in xm.shape[1:])
    xm[pos] = np.nan
    w, b, rm, rv = inputs.params(C, dt, case_id)
    dy = inputs.like(x, case_id)
    keep = Unchanged(x, w, b, rm, rv, dy)
    good = np.arange(C) != bad

    for method in METHODS:
        mean, var = fastbn.channel_stats(x, axis=axis, method=method)
        assert np.isnan(mean[bad]) and np.isnan(var[bad]), method
        assert np.isfinite(mean[good]).all() and np.isfinite(var[good]).all(), method
        rmean, rvar = ref.channel_stats(x, axis)
        assert_close(mean, rmean, dt, name=f"mean ({method})")  # also checks the NaN pattern
        assert_close(var, rvar, dt, name=f"var ({method})")

    y, mean, invstd = fastbn.batch_norm_train(x, w, b, axis=axis)
    ry, rmean, _rinv = ref.batch_norm_train(x, w, b, axis=axis)
    assert np.isnan(np.moveaxis(y, axis, 0)[bad]).all()
    assert_close(y, ry, dt, name="train y")  # NaN exactly in channel `bad`, the rest correct

    y = fastbn.batch_norm_infer(x, rm, rv, w, b, axis=axis)
    assert int(np.isnan(y).sum()) == 1 and np.isnan(np.moveaxis(y, axis, 0)[pos])
    assert_close(y, ref.batch_norm_infer(x, rm, rv, w, b, axis=axis), dt, name="infer y")

    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
    rdx, rdw, rdb = ref.batch_norm_backward(dy, x, mean, invstd, w, axis)
    assert_close(dx, rdx, dt, name="dx")
    assert_close(dw, rdw, dt, name="dweight")
    assert_close(db, rdb, dt, name="dbias")
    assert np.isnan(dw[bad]) and np.isfinite(db).all()

    run_mean, run_var = rm.copy(), rv.copy()
    fastbn.batch_norm(x, run_mean, run_var, w, b, training=True, axis=axis)
    assert np.isnan(run_mean[bad]) and np.isnan(run_var[bad])
    assert np.isfinite(run_mean[good]).all() and np.isfinite(run_var[good]).all()
    keep.check()


# --------------------------------------------------------------------------------------------
# constant channels: var == 0, y == bias
# --------------------------------------------------------------------------------------------

CONSTANTS = [0.0, 1.0, -2.5, 0.1, 1e3, 7.25]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis", [((6, 6, 4, 4), 1), ((6, 4, 4, 6), -1),
                                         ((2, 6, 64, 64), 1), ((5, 6), 1)])
def test_constant_channels(shape, axis, dtype):
    """A constant channel has variance 0, so y = (x - mean) * invstd * w + b with
    invstd = 1/sqrt(eps) ~ 316: y must be b (up to the dtype's tolerance: any error in
    ``x - mean`` is multiplied by 316)."""
    x = inputs._randn(inputs.rng_for("const", shape, axis), shape, axis, dtype)
    xm = np.moveaxis(x, axis, 0)
    for ch, v in enumerate(CONSTANTS):
        xm[ch] = v
    C = x.shape[axis]
    w, b, _, _ = inputs.params(C, dtype, "const")
    w[w == 0] = 1.0
    y, mean, invstd = fastbn.batch_norm_train(x, w, b, axis=axis)
    ym = np.moveaxis(y, axis, 0)
    for ch, v in enumerate(CONSTANTS):
        assert_close(ym[ch], np.full(ym[ch].shape, b[ch], np.float64), dtype,
                     name=f"y of constant channel {v}")
        assert_close(mean[ch], v, dtype, name=f"mean of constant channel {v}")
        assert_close(invstd[ch], 1.0 / np.sqrt(1e-5), dtype, name=f"invstd of constant {v}")
    for method in METHODS:
        _, var = fastbn.channel_stats(x, axis=axis, method=method)
        np.testing.assert_allclose(var, 0.0, atol=(np.finfo(dtype).eps * 1e3) ** 2,
                                   err_msg=method)
    dy = inputs.like(x, "const")
    dx, dw, _ = fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
    rdx, rdw, _ = ref.batch_norm_backward(dy, x, mean, invstd, w, axis)
    assert_close(dx, rdx, dtype, name="dx")
    assert_close(dw, rdw, dtype, name="dweight")


# --------------------------------------------------------------------------------------------
# values near the float32 maximum
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, axis", [((64, 3, 8, 8), 1), ((64, 8, 8, 3), -1),
                                         ((2, 1, 256, 256), 1)])
def test_near_float32_max(shape, axis):
    """Sums of values near 3.4e38 overflow float32; accumulating in float64 they do not, so the
    mean is finite and accurate.  The variance (~1e76) does not fit float32: +inf is the correct
    rounding of the result.  y itself is O(1) and must be finite."""
    rng = inputs.rng_for("huge", shape, axis)
    x = np.empty(shape, np.float32)
    xm = np.moveaxis(x, axis, 0)
    xm[0] = rng.uniform(1e38, 3.4e38, xm[0].shape)
    if shape[axis] > 1:
        xm[1] = rng.uniform(-3.4e38, -1e38, xm[1].shape)
        xm[2] = rng.uniform(-3.4e38, 3.4e38, xm[2].shape)
    rmean, rvar = ref.channel_stats(x, axis)
    f32max = float(np.finfo(np.float32).max)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # overflow of var to inf is expected
        for method in METHODS:
            mean, var = fastbn.channel_stats(x, axis=axis, method=method)
            assert np.isfinite(mean).all(), method
            assert_close(mean, rmean, np.float32, name=f"mean ({method})")
            assert not np.isnan(var).any(), method
            assert np.all(np.isposinf(var) | (rvar <= f32max)), method
        y, mean, _invstd = fastbn.batch_norm_train(x, axis=axis)
    assert np.isfinite(mean).all()
    assert_close(mean, rmean, np.float32, name="train mean")
    assert np.isfinite(y).all()
    assert_close(y, ref.batch_norm_train(x, axis=axis)[0], np.float32, name="y")


# --------------------------------------------------------------------------------------------
# Hypothesis property test against the reference
# --------------------------------------------------------------------------------------------

@st.composite
def bn_problems(draw):
    ndim = draw(st.integers(2, 5))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    offset = draw(st.sampled_from([0.0, 1.0, -10.0, 100.0])) * scale  # |offset| <= 100 * scale
    layout = draw(st.sampled_from(["C", "F", "transposed", "reversed", "strided"]))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    if layout == "transposed":
        x = rng.standard_normal(shape[::-1]).T
    elif layout == "strided":
        x = rng.standard_normal((2 * shape[0],) + shape[1:])[::2]
    else:
        x = rng.standard_normal(shape)
        if layout == "F":
            x = np.asfortranarray(x)
        elif layout == "reversed":
            x = x[::-1, ..., ::-1]
    x = (x * scale + offset).astype(dtype)
    C = shape[axis]
    params = [(rng.uniform(-2, 2, C)).astype(dtype),                        # weight
              (rng.uniform(-1, 1, C)).astype(dtype),                        # bias
              (offset + scale * rng.uniform(-1, 1, C)).astype(dtype),       # running_mean
              (scale ** 2 * rng.uniform(0.5, 2, C)).astype(dtype)]          # running_var
    dy = rng.standard_normal(shape).astype(dtype)
    method = draw(st.sampled_from(METHODS))
    return x, axis, params, dy, method


def _check_problem(problem):
    x, axis, (w, b, rm, rv), dy, method = problem
    dt = x.dtype
    keep = Unchanged(x, w, b, rm, rv, dy)
    m = ref.channel_count(x, axis)

    # statistics: compared relative to their own natural scale (max|x| for the mean, the largest
    # variance for the variance), since the data scale is drawn from 1e-3 .. 1e3
    mean, var = fastbn.channel_stats(x, axis=axis, method=method)
    rmean, rvar = ref.channel_stats(x, axis)
    xmax = float(np.max(np.abs(x)))
    assert np.max(np.abs(mean - rmean)) <= rtol(dt) * xmax
    assert np.max(np.abs(var - rvar)) <= rtol(dt) * max(float(np.max(rvar)), 1e-300) + 1e-300

    y = fastbn.batch_norm_infer(x, rm, rv, w, b, axis=axis)
    assert_close(y, ref.batch_norm_infer(x, rm, rv, w, b, axis=axis), dt, name="infer y")
    inv_run = (1.0 / np.sqrt(rv.astype(np.float64) + 1e-5)).astype(dt)
    dx, dw, db = fastbn.batch_norm_backward(dy, x, rm, inv_run, w, axis=axis, training=False)
    rdx, rdw, rdb = ref.batch_norm_backward(dy, x, rm, inv_run, w, axis, training=False)
    assert_close(dx, rdx, dt, name="eval dx")
    assert_close(dw, rdw, dt, name="eval dweight")
    assert_close(db, rdb, dt, name="eval dbias")

    if m < 2:
        with pytest.raises(ValueError, match=ONE_VALUE):
            fastbn.batch_norm_train(x, w, b, axis=axis)
        keep.check()
        return
    y, mean, invstd = fastbn.batch_norm_train(x, w, b, axis=axis)
    ry, rmean, rinv = ref.batch_norm_train(x, w, b, axis=axis)
    assert_close(invstd, rinv, dt, name="invstd")
    # offsets up to 100x the spread: allow 4 ulps of max|x| through the scale (see
    # util.input_precision_slack) -- the inputs carry no more information than that.
    assert_close(y, ry, dt, slack=input_precision_slack(x, rinv, w), name="train y")
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, training=True)
    rdx, rdw, rdb = ref.batch_norm_backward(dy, x, mean, invstd, w, axis, training=True)
    assert_close(dx, rdx, dt, name="train dx")
    assert_close(dw, rdw, dt, name="train dweight")
    assert_close(db, rdb, dt, name="train dbias")
    keep.check()


_SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow,
                                                      HealthCheck.data_too_large],
                 "print_blob": True}


@settings(max_examples=50, **_SETTINGS)
@given(bn_problems())
def test_property_quick(problem):
    _check_problem(problem)


@pytest.mark.nightly
@settings(max_examples=10_000, **_SETTINGS)
@given(bn_problems())
def test_property_nightly(problem):
    _check_problem(problem)


@pytest.mark.parametrize("method", ["welford", "two_pass"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, axis, where", [
    ((8, 4), 1, (0, 0)),                 # the first value: the shift of the one-call kernels
    ((8, 4), 1, (5, 0)),
    ((2, 3, 20000), 1, (0, 0, 5000)),    # tiled channels-first: infinity inside a merged chunk
    ((4096, 64), -1, (100, 0)),          # tiled channels-last
    ((40, 32, 300), 1, (7, 0, 3)),       # channels-first one call, channel by channel
])
def test_infinite_values_give_infinite_means(shape, axis, where, dtype, method):
    """A channel holding infinities of one sign has that infinite mean (sum / L, as PyTorch's
    saved mean); with both signs, or NaN, the mean is NaN.  Other channels stay finite."""
    x = inputs.like(np.zeros(shape, dtype), "infinite-means")
    ch = where[axis]
    for sign, expect in ((1.0, np.inf), (-1.0, -np.inf)):
        x[where] = sign * np.inf
        mean, _ = fastbn.channel_stats(x, axis=axis, method=method)
        assert mean[ch] == expect
        assert np.isfinite(np.delete(mean, ch)).all()
        if method == "welford":
            assert fastbn.batch_norm_train(x, axis=axis)[1][ch] == expect
    other = (1 if where[0] == 0 else 0,) + where[1:]  # the same channel, another sample
    x[other] = np.inf
    x[where] = -np.inf
    assert np.isnan(fastbn.channel_stats(x, axis=axis, method=method)[0][ch])


# --------------------------------------------------------------------------------------------
# float32 lanes: the statistics of float32 channels with long enough runs are summed in float32
# lanes, checked, and summed again in float64 where float32 cannot be trusted
# --------------------------------------------------------------------------------------------

# one call (cache-sized), tiles of long runs, tiles of short runs
LANES32_SHAPES = [(8, 16, 16, 16), (4, 4, 1024, 300), (96, 128, 160)]


def _lanes32_data(kind, shape, rng):
    x = rng.standard_normal(shape)
    if kind == "offset":  # far from zero: the shift must absorb it
        x = x + 1e4
    elif kind == "padded":  # a run's first 16 values far from the rest: the first shift is off
        first = (np.arange(int(np.prod(shape[2:]))) < 16).reshape(shape[2:])
        x = np.where(first, x + 1e3, 0.01 * x)
    elif kind == "sorted":  # a channel's first values are its smallest
        x = np.sort(x.reshape(shape[0], shape[1], -1), axis=-1).reshape(shape)
    elif kind == "tiny":  # float32 squares near the subnormal range; the variance is normal
        x = x * 1e-18
    elif kind == "huge":  # float32 squares overflow; the variance itself fits
        x = x * 1e19 + 1e20
    elif kind == "constant":
        x = np.full(shape, 3.0)
    return x.astype(np.float32)


@pytest.mark.parametrize("kind", ["normal", "offset", "padded", "sorted", "tiny", "huge",
                                  "constant"])
@pytest.mark.parametrize("shape", LANES32_SHAPES)
def test_float32_lanes_match_the_reference(shape, kind):
    from fastbn import _layout
    from fastbn._kernels import channels_first

    rng = inputs.rng_for("lanes32", shape, 1, kind)
    x = _lanes32_data(kind, shape, rng)
    assert channels_first.lanes32(_layout.plan(x, 1).as_input(x))  # the path under test
    rmean, rvar = ref.channel_stats(x, 1)
    mean, var = fastbn.channel_stats(x)
    assert_close(mean, rmean, np.float32, name="mean")
    scale = np.maximum(rvar, np.finfo(np.float64).tiny)
    err = float(np.max(np.abs(var - rvar) / scale))
    assert err <= FLOAT32_VAR_BOUND or kind == "constant" and np.all(var == 0), err
    y, tmean, _ = fastbn.batch_norm_train(x)
    assert_close(tmean, rmean, np.float32, name="train mean")
    assert_close(y, ref.batch_norm_train(x)[0], np.float32, name="y")


@pytest.mark.parametrize("method", METHODS)
def test_spread_beyond_float64_is_infinite_and_silent(method):
    """Squares beyond float64 (data near 1e200): the variance is +inf, the mean finite, and no
    NumPy overflow warning escapes (the result is the correct rounding, not an accident)."""
    x = _offset_data((8, 4, 25), 1, np.float64, 0.0) * 1e200
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean, var = fastbn.channel_stats(x, method=method)
    assert np.isposinf(var).all()
    with np.errstate(over="ignore"):  # the reference's own squares overflow
        rmean = ref.channel_stats(x)[0]
    assert_close(mean, rmean, np.float64, name="mean")
