"""Odd but valid inputs, for every public function, at serial (< 32768 elements) and parallel
(>= 32768 elements, ``fastbn._config.SERIAL_BELOW``) sizes:

* layouts: Fortran order, negative strides, strided views (mergeable and not), transposed views,
  zero strides (``np.broadcast_to``, read-only), misaligned data, big-endian ('>f4', '>f8');
* read-only arrays (``flags.writeable = False``) for every function and the layers;
* big-endian: the result is bit-identical to the native-order call, or a clear error (``out=``);
* constant channels (var = 0, y = bias) on the channels-last and Fortran paths;
* values near the float32 maximum for inference and backward (stats/training: test_numerics);
* subnormal data: no flush to zero;
* NaN / +-Inf in one channel (of ``x`` or ``dy``) stays in that channel: statistics, training,
  inference, backward (both modes) and ``batch_norm``'s running statistics, channels-first and
  channels-last, serial and parallel sizes, float32 and float64;
* data far from unit scale (batch norm is scale invariant: ``dx(k x) = dx(x) / k``).

Every call is wrapped so that it asserts no input array was modified (``util.Unchanged``).
"""

import warnings

import inputs
import numpy as np
import pytest
import reference as ref
from util import Unchanged, assert_close

import fastbn

PARALLEL_FROM = getattr(fastbn._config, "SERIAL_BELOW", 1 << 15)  # parallel builds from here
SIZES = ("serial", "parallel")
DTYPES = (np.float32, np.float64)


def _check_size(x, size):
    if size == "parallel":
        assert x.size >= PARALLEL_FROM, x.shape
    else:
        assert x.size < PARALLEL_FROM, x.shape


def _unaligned(a):
    """A copy of ``a`` whose data pointer is not aligned to its itemsize."""
    buf = np.empty(a.nbytes + 1, np.uint8)
    u = buf[1:].view(a.dtype).reshape(a.shape)
    u[...] = a
    assert not u.flags.aligned
    return u


# layout name -> (axis, {size: base shape}, transform(base) -> view).  Base arrays are generated
# with per-channel means and scales along the channel axis of the *view* (see _make).
LAYOUTS = {
    "fortran": (1, {"serial": (4, 6, 5, 7), "parallel": (8, 6, 32, 32)}, np.asfortranarray),
    "fortran_nhwc": (-1, {"serial": (4, 5, 7, 6), "parallel": (8, 32, 32, 6)}, np.asfortranarray),
    "reversed": (1, {"serial": (4, 6, 5, 7), "parallel": (8, 6, 32, 32)},
                 lambda a: a[::-1, ::-1, :, ::-1]),
    "reversed_nhwc": (-1, {"serial": (4, 5, 7, 6), "parallel": (8, 32, 32, 6)},
                      lambda a: a[::-1, :, ::-1, ::-1]),
    "strided_batch": (1, {"serial": (8, 6, 5, 7), "parallel": (16, 6, 32, 32)}, lambda a: a[::2]),
    # channels-last with few rows: training and backward by blocks of channels
    "nc_few_rows": (1, {"serial": (40, 48), "parallel": (128, 384)}, lambda a: a),
    # runs shorter than 128 values: the channels-first *_short reductions
    "short_runs": (1, {"serial": (4, 24, 5, 5), "parallel": (64, 24, 5, 5)}, lambda a: a),
    "short_runs_strided_batch": (1, {"serial": (8, 24, 3, 7), "parallel": (160, 24, 3, 7)},
                                 lambda a: a[::2]),
    # runs of >= 128 KB: the channels-first backward channel by channel
    "long_runs_strided_batch": (1, {"serial": (4, 3, 8, 8), "parallel": (4, 16, 32768)},
                                lambda a: a[::2]),
    "strided_inner": (1, {"serial": (4, 6, 5, 14), "parallel": (8, 6, 32, 64)},
                      lambda a: a[..., ::2]),  # no mergeable view: copied once
    "strided_channel_nhwc": (-1, {"serial": (4, 5, 7, 12), "parallel": (8, 32, 32, 12)},
                             lambda a: a[..., ::2]),
    "strided_2d": (1, {"serial": (150, 12), "parallel": (16384, 12)}, lambda a: a[::2, ::2]),
    "nhwc_memory_as_nchw": (1, {"serial": (4, 5, 7, 6), "parallel": (8, 32, 32, 6)},
                            lambda a: a.transpose(0, 3, 1, 2)),
    "transposed_T": (1, {"serial": (7, 5, 6, 4), "parallel": (32, 32, 6, 8)}, lambda a: a.T),
    "transposed_ncl_axis2": (2, {"serial": (4, 6, 35), "parallel": (8, 6, 1024)},
                             lambda a: a.transpose(0, 2, 1)),
    "broadcast_batch": (1, {"serial": (1, 6, 5, 7), "parallel": (1, 6, 32, 32)},
                        lambda a: np.broadcast_to(a, (8,) + a.shape[1:])),
    "broadcast_nhwc": (-1, {"serial": (1, 5, 7, 6), "parallel": (1, 32, 32, 6)},
                       lambda a: np.broadcast_to(a, (8,) + a.shape[1:])),
    "unaligned": (1, {"serial": (4, 6, 5, 7), "parallel": (8, 6, 32, 32)}, _unaligned),
    "unaligned_nhwc": (-1, {"serial": (4, 5, 7, 6), "parallel": (8, 32, 32, 6)}, _unaligned),
    "big_endian": (1, {"serial": (4, 6, 5, 7), "parallel": (8, 6, 32, 32)},
                   lambda a: a.astype(a.dtype.newbyteorder(">"))),
    "big_endian_nhwc_reversed": (-1, {"serial": (4, 5, 7, 6), "parallel": (8, 32, 32, 6)},
                                 lambda a: a.astype(a.dtype.newbyteorder(">"))[:, ::-1]),
}


def _base_axis(layout, shape):
    """The channel axis of the base array, given the view's channel axis."""
    axis = LAYOUTS[layout][0]
    if layout == "nhwc_memory_as_nchw":
        return 3
    if layout == "transposed_T":
        return len(shape) - 2
    if layout == "transposed_ncl_axis2":
        return 1
    return axis


def _make(layout, size, dtype, key="x"):
    axis, shapes, transform = LAYOUTS[layout]
    shape = shapes[size]
    base_axis = _base_axis(layout, shape)
    rng = inputs.rng_for("odd", layout, size, np.dtype(dtype).name, key)
    base = inputs._randn(rng, shape, base_axis, dtype)
    x = transform(base)
    return x, axis


def _native(a):
    return None if a is None else a.astype(a.dtype.newbyteorder("="))


def _like_layout(layout, x):
    """Per-channel parameters in the layout's byte order."""
    C = x.shape[LAYOUTS[layout][0]]
    w, b, rm, rv = inputs.params(C, np.dtype(x.dtype.newbyteorder("=")), "odd", layout)
    if layout.startswith("big_endian"):
        w, b, rm, rv = (a.astype(a.dtype.newbyteorder(">")) for a in (w, b, rm, rv))
    return w, b, rm, rv


def _call(fn, *args, **kwargs):
    """fn(*args, **kwargs) asserting that no array argument (other than out= and batch_norm's
    running statistics in training) changed."""
    mutable = {"out"}
    if fn is fastbn.batch_norm and kwargs.get("training", False):
        mutable |= {1, 2}
    keep = Unchanged(**{f"a{i}": a for i, a in enumerate(args) if i not in mutable},
                     **{k: v for k, v in kwargs.items() if k not in mutable})
    result = fn(*args, **kwargs)
    keep.check()
    return result


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_every_function(layout, size, dtype):
    x, axis = _make(layout, size, dtype)
    dy, _ = _make(layout, size, dtype, key="dy")
    _check_size(x, size)
    w, b, rm, rv = _like_layout(layout, x)
    dt = np.dtype(dtype)

    for method in ("two_pass", "welford"):
        for ddof in (0, 1):
            mean, var = _call(fastbn.channel_stats, x, axis=axis, method=method, ddof=ddof)
            rmean, rvar = ref.channel_stats(x, axis, ddof)
            assert mean.dtype == dt and var.dtype == dt
            assert_close(mean, rmean, dt, name=f"mean ({method})")
            assert_close(var, rvar, dt, name=f"var ({method}, ddof={ddof})")

    y, mean, invstd = _call(fastbn.batch_norm_train, x, w, b, axis=axis)
    ry, rmean, rinv = ref.batch_norm_train(x, w, b, axis=axis)
    assert y.dtype == dt and y.shape == x.shape
    assert_close(y, ry, dt, name="train y")
    assert_close(mean, rmean, dt, name="train mean")
    assert_close(invstd, rinv, dt, name="train invstd")

    yi = _call(fastbn.batch_norm_infer, x, rm, rv, w, b, axis=axis, activation="relu")
    assert_close(yi, ref.batch_norm_infer(x, rm, rv, w, b, axis=axis, activation="relu"), dt,
                 name="infer y")

    dx, dw, db = _call(fastbn.batch_norm_backward, dy, x, mean, invstd, w, axis=axis)
    rdx, rdw, rdb = ref.batch_norm_backward(dy, x, mean, invstd, w, axis)
    assert_close(dx, rdx, dt, name="dx")
    assert_close(dw, rdw, dt, name="dweight")
    assert_close(db, rdb, dt, name="dbias")

    inv_run = (1.0 / np.sqrt(rv.astype(np.float64) + 1e-5)).astype(rv.dtype)
    dxe, dwe, dbe = _call(fastbn.batch_norm_backward, dy, x, rm, inv_run, w, axis=axis,
                          training=False)
    rdx, rdw, rdb = ref.batch_norm_backward(dy, x, rm, inv_run, w, axis, training=False)
    assert_close(dxe, rdx, dt, name="eval dx")
    assert_close(dwe, rdw, dt, name="eval dweight")
    assert_close(dbe, rdb, dt, name="eval dbias")

    run_mean, run_var = rm.copy(), rv.copy()
    yb = _call(fastbn.batch_norm, x, run_mean, run_var, w, b, training=True, axis=axis)
    _, new_mean, new_var = ref.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, axis)
    assert_close(yb, ry, dt, name="batch_norm y")
    assert_close(run_mean, new_mean, dt, name="running_mean")
    assert_close(run_var, new_var, dt, name="running_var")
    ye = _call(fastbn.batch_norm, x, rm, rv, w, b, training=False, axis=axis)
    assert_close(ye, ref.batch_norm_infer(x, rm, rv, w, b, axis=axis), dt, name="eval y")

    # out= in odd layouts of its own (reversed, transposed): the same values as without out=
    for out in (np.empty(x.shape, dt)[::-1, ::-1], np.empty(x.shape[::-1], dt).T):
        res = _call(fastbn.batch_norm_train, x, w, b, axis=axis, out=out)
        assert res[0] is out and np.array_equal(out, y), "train out="
        res = _call(fastbn.batch_norm_infer, x, rm, rv, w, b, axis=axis, activation="relu",
                    out=out)
        assert res is out and np.array_equal(out, yi), "infer out="
        res = _call(fastbn.batch_norm_backward, dy, x, mean, invstd, w, axis=axis, out=out)
        assert res[0] is out and np.array_equal(out, dx), "backward out="

    # the layer on the same input
    layer = fastbn.BatchNorm(x.shape[axis], axis=axis, dtype=dt)
    keep = Unchanged(x, dy)
    assert_close(layer(x), ref.batch_norm_train(x, axis=axis)[0], dt, name="layer y")
    ldx = layer.backward(dy)
    rmean, rinv = ref.batch_norm_train(x, axis=axis)[1:]
    assert_close(ldx, ref.batch_norm_backward(dy, x, rmean, rinv, None, axis)[0], dt,
                 name="layer dx")
    keep.check()


# --------------------------------------------------------------------------------------------
# big-endian: bit-identical to native byte order, or a clear error
# --------------------------------------------------------------------------------------------

def _same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and np.array_equal(a, b, equal_nan=True)


@pytest.mark.parametrize("be", [">f4", ">f8"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_big_endian_bit_identical_to_native(layout, size, be):
    shape = {"serial": (4, 6, 5, 7), "parallel": (8, 6, 32, 32)}[size]
    axis = 1
    if layout == "nhwc":
        shape, axis = (shape[0], shape[2], shape[3], shape[1]), -1
    dt = np.dtype(be).newbyteorder("=")
    xn = inputs._randn(inputs.rng_for("be", shape, be), shape, axis, dt)
    _check_size(xn, size)
    dyn = inputs.like(xn, "be")
    C = shape[axis]
    wn, bn, rmn, rvn = inputs.params(C, dt, "be")

    def big(a):
        return a.astype(a.dtype.newbyteorder(">"))

    x, dy, w, b, rm, rv = map(big, (xn, dyn, wn, bn, rmn, rvn))
    assert x.dtype.byteorder == ">" and np.array_equal(x, xn)

    for method in ("two_pass", "welford"):
        got = _call(fastbn.channel_stats, x, axis=axis, method=method)
        want = fastbn.channel_stats(xn, axis=axis, method=method)
        assert all(_same(g, e) for g, e in zip(got, want)), f"stats ({method})"
    y, mean, invstd = _call(fastbn.batch_norm_train, x, w, b, axis=axis)
    yn, meann, invn = fastbn.batch_norm_train(xn, wn, bn, axis=axis)
    assert _same(y, yn) and _same(mean, meann) and _same(invstd, invn), "train"
    assert _same(_call(fastbn.batch_norm_infer, x, rm, rv, w, b, axis=axis),
                 fastbn.batch_norm_infer(xn, rmn, rvn, wn, bn, axis=axis)), "infer"
    for training in (True, False):
        got = _call(fastbn.batch_norm_backward, dy, x, big(mean), big(invstd), w, axis=axis,
                    training=training)
        want = fastbn.batch_norm_backward(dyn, xn, meann, invn, wn, axis=axis, training=training)
        assert all(_same(g, e) for g, e in zip(got, want)), f"backward (training={training})"
    # mixed byte orders: big-endian x with native dy, and the other way round
    got = _call(fastbn.batch_norm_backward, dyn, x, meann, invn, wn, axis=axis)
    assert all(_same(g, e) for g, e in zip(got, fastbn.batch_norm_backward(
        dyn, xn, meann, invn, wn, axis=axis)))
    # running statistics stored big-endian are updated in place, correctly
    r1, r2 = rm.copy(), rv.copy()
    n1, n2 = rmn.copy(), rvn.copy()
    yb = _call(fastbn.batch_norm, x, r1, r2, w, b, training=True, axis=axis)
    ybn = fastbn.batch_norm(xn, n1, n2, wn, bn, training=True, axis=axis)
    assert _same(yb, ybn) and _same(r1, n1) and _same(r2, n2), "batch_norm"
    assert r1.dtype.byteorder == ">"  # still the caller's arrays
    # out=: big-endian out is refused with an error naming it; never silently wrong
    for fn, args in ((fastbn.batch_norm_train, (x, w, b)),
                     (fastbn.batch_norm_infer, (x, rm, rv, w, b)),
                     (fastbn.batch_norm_backward, (dy, x, mean, invstd, w))):
        out = np.full(x.shape, 7, x.dtype)
        try:
            res = fn(*args, axis=axis, out=out)
        except (TypeError, ValueError) as exc:
            assert "out" in str(exc), exc
            assert np.all(out == 7), "a refused out= was written to"
        else:
            y_out = res if isinstance(res, np.ndarray) else res[0]
            assert y_out is out
            native = fn(*(_native(a) for a in args), axis=axis)
            assert _same(out, native if isinstance(native, np.ndarray) else native[0])
    # layers: big-endian input and state dict
    layer = fastbn.BatchNorm(C, axis=axis, dtype=dt)
    layer_n = fastbn.BatchNorm(C, axis=axis, dtype=dt)
    sd = {"weight": w, "bias": b, "running_mean": rm, "running_var": rv,
          "num_batches_tracked": np.array(3, ">i8")}
    layer.load_state_dict(sd)
    layer_n.load_state_dict({k: _native(v) for k, v in sd.items()})
    assert _same(layer(x), layer_n(xn)) and _same(layer.backward(dy), layer_n.backward(dyn))
    for k, v in layer.state_dict().items():
        assert _same(v, layer_n.state_dict()[k]), k
    layer.eval()
    layer_n.eval()
    assert _same(layer(x), layer_n(xn))


# --------------------------------------------------------------------------------------------
# read-only arrays for every function and the layers
# --------------------------------------------------------------------------------------------

def _ro(*arrays):
    for a in arrays:
        a.flags.writeable = False
    return arrays


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("layout", ["fortran", "reversed_nhwc", "strided_inner", "unaligned"])
def test_readonly_every_function(layout, size, dtype):
    x, axis = _make(layout, size, dtype)
    dy, _ = _make(layout, size, dtype, key="dy")
    w, b, rm, rv = _like_layout(layout, x)
    _ro(x, dy, w, b, rm, rv)
    dt = np.dtype(dtype)
    C = x.shape[axis]

    for method in ("auto", "two_pass", "welford"):
        _, var = _call(fastbn.channel_stats, x, axis=axis, method=method)
        assert_close(var, ref.channel_stats(x, axis)[1], dt, name="var")
    y, mean, invstd = _call(fastbn.batch_norm_train, x, w, b, axis=axis)
    assert_close(y, ref.batch_norm_train(x, w, b, axis=axis)[0], dt, name="train y")
    _ro(mean, invstd)
    assert_close(_call(fastbn.batch_norm_infer, x, rm, rv, w, b, axis=axis),
                 ref.batch_norm_infer(x, rm, rv, w, b, axis=axis), dt, name="infer y")
    for training in (True, False):
        dx, _, _ = _call(fastbn.batch_norm_backward, dy, x, mean, invstd, w, axis=axis,
                         training=training)
        assert_close(dx, ref.batch_norm_backward(dy, x, mean, invstd, w, axis, training)[0], dt,
                     name="dx")
    # batch_norm training: read-only x, weight, bias; the running statistics must be writable
    run_mean, run_var = rm.copy(), rv.copy()
    _call(fastbn.batch_norm, x, run_mean, run_var, w, b, training=True, axis=axis)
    _, new_mean, new_var = ref.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, axis)
    assert_close(run_mean, new_mean, dt, name="running_mean")
    assert_close(run_var, new_var, dt, name="running_var")
    _call(fastbn.batch_norm, x, None, None, w, b, training=True, axis=axis)
    _call(fastbn.batch_norm, x, rm, rv, w, b, training=False, axis=axis)  # read-only is fine
    # update_running_stats: read-only batch statistics
    r1, r2 = rm.copy(), rv.copy()
    bm, bv = _ro(*(a.copy() for a in ref.channel_stats(x, axis)))
    fastbn.update_running_stats(r1, r2, bm, bv, x.size // C, 0.25)
    assert_close(r1, 0.75 * rm.astype(np.float64) + 0.25 * bm, dt, name="update mean")
    # read-only out= is refused with an error naming it
    with pytest.raises(ValueError, match="out"):
        fastbn.batch_norm_train(x, axis=axis, out=_ro(np.empty(x.shape, x.dtype))[0])

    # layers: read-only input and gradient; a read-only state dict is copied, not aliased
    layer = fastbn.BatchNorm(C, axis=axis, dtype=np.dtype(x.dtype.newbyteorder("=")))
    sd = {"weight": w, "bias": b, "running_mean": rm, "running_var": rv,
          "num_batches_tracked": _ro(np.array(2, np.int64))[0]}
    keep = Unchanged(x, dy, *sd.values())
    layer.load_state_dict(sd)
    for _ in range(2):  # training updates its own running statistics
        layer(x)
        layer.backward(dy)
    assert int(layer.num_batches_tracked) == 4
    assert not np.shares_memory(layer.running_mean, rm)
    layer.eval()
    layer(x)
    layer.backward(dy)
    keep.check()


# --------------------------------------------------------------------------------------------
# constant channels on the channels-last and Fortran paths, serial and parallel
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("layout", ["fortran", "fortran_nhwc", "reversed_nhwc",
                                    "nhwc_memory_as_nchw", "strided_channel_nhwc"])
def test_constant_channels_give_bias(layout, size, dtype):
    x, axis = _make(layout, size, dtype)
    if not x.flags.writeable:
        x = x.copy()
    C = x.shape[axis]
    xm = np.moveaxis(x, axis, 0)
    consts = {0: 0.0, 2: 0.1, 3: -2.5, C - 1: 1e3}
    for ch, v in consts.items():
        xm[ch] = v
    w, b, rm, rv = inputs.params(C, dtype, "const-odd")
    w[w == 0] = 0.75
    dt = np.dtype(dtype)
    y, mean, invstd = _call(fastbn.batch_norm_train, x, w, b, axis=axis)
    run_mean, run_var = rm.copy(), rv.copy()
    yb = _call(fastbn.batch_norm, x, run_mean, run_var, w, b, training=True, axis=axis)
    layer = fastbn.BatchNorm(C, axis=axis, dtype=dt)
    layer.load_state_dict({"weight": w, "bias": b, "running_mean": rm, "running_var": rv,
                           "num_batches_tracked": np.array(0)})
    yl = layer(x)
    for name, out in (("train", y), ("batch_norm", yb), ("layer", yl)):
        om = np.moveaxis(out, axis, 0)
        for ch, v in consts.items():
            assert_close(om[ch], np.full(om[ch].shape, b[ch], np.float64), dt,
                         name=f"{name}: y of constant channel {v}")
    for ch, v in consts.items():
        assert_close(mean[ch], v, dt, name="mean")
        assert_close(invstd[ch], 1.0 / np.sqrt(1e-5), dt, name="invstd")
        assert_close(run_var[ch], 0.9 * float(rv[ch]), dt, name="running_var")  # + 0.1 * 0
    for method in ("two_pass", "welford"):
        _, var = fastbn.channel_stats(x, axis=axis, method=method)
        np.testing.assert_allclose(var[list(consts)], 0.0, atol=(np.finfo(dt).eps * 1e3) ** 2,
                                   err_msg=method)
    assert_close(y, ref.batch_norm_train(x, w, b, axis=axis)[0], dt, name="y (all channels)")


# --------------------------------------------------------------------------------------------
# values near the float32 maximum: inference and backward
# --------------------------------------------------------------------------------------------

F32MAX = float(np.finfo(np.float32).max)
HUGE_SHAPES = {("nchw", "serial"): ((16, 3, 8, 8), 1),
               ("nhwc", "serial"): ((16, 8, 8, 3), -1),
               ("nchw", "parallel"): ((8, 3, 64, 64), 1),
               ("nhwc", "parallel"): ((8, 64, 64, 3), -1)}


def _huge(shape, axis):
    rng = inputs.rng_for("huge-odd", shape, axis)
    x = np.empty(shape, np.float32)
    xm = np.moveaxis(x, axis, 0)
    xm[0] = rng.uniform(1e38, 3.4e38, xm[0].shape)
    xm[1] = rng.uniform(-3.4e38, -1e38, xm[1].shape)
    xm[2] = rng.uniform(-3.4e38, 3.4e38, xm[2].shape)
    return x


def _assert_f32_rounding(actual, desired, name):
    """``actual`` (float32) against a float64 reference whose float32 rounding may overflow:
    +-inf exactly where the rounded reference is, the finite part within tolerance."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rounded = np.asarray(desired, np.float64).astype(np.float32)
    assert np.array_equal(np.isposinf(actual), np.isposinf(rounded)), f"{name}: +inf pattern"
    assert np.array_equal(np.isneginf(actual), np.isneginf(rounded)), f"{name}: -inf pattern"
    fin = np.isfinite(rounded)
    assert_close(np.asarray(actual)[fin], np.asarray(desired, np.float64)[fin], np.float32,
                 name=name)


@pytest.mark.parametrize("layout, size", sorted(HUGE_SHAPES))
def test_near_float32_max_infer_and_backward(layout, size):
    shape, axis = HUGE_SHAPES[(layout, size)]
    x = _huge(shape, axis)
    _check_size(x, size)
    dy = inputs.like(x, "huge")
    rm = np.array([2e38, -2e38, 0.0], np.float32)
    rv = np.array([3e38, 1e38, 3.4e38], np.float32)
    w = np.array([1.5, -0.5, 2.0], np.float32)
    b = np.array([0.25, -1.0, 3e38], np.float32)  # a bias near the maximum too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # float32 overflow of var is expected
        y, mean, invstd = _call(fastbn.batch_norm_train, x, w, b, axis=axis)
    assert np.isfinite(y).all() and np.isfinite(mean).all()
    yi = _call(fastbn.batch_norm_infer, x, rm, rv, w, b, axis=axis)
    assert np.isfinite(yi).all()
    assert_close(yi, ref.batch_norm_infer(x, rm, rv, w, b, axis=axis), np.float32, name="infer")
    yr = _call(fastbn.batch_norm_infer, x, rm, rv, w, b, axis=axis, activation="relu")
    assert_close(yr, ref.batch_norm_infer(x, rm, rv, w, b, axis=axis, activation="relu"),
                 np.float32, name="infer relu")
    # backward in training mode, with the forward pass's statistics
    dx, dw, db = _call(fastbn.batch_norm_backward, dy, x, mean, invstd, w, axis=axis)
    rdx, rdw, rdb = ref.batch_norm_backward(dy, x, mean, invstd, w, axis)
    assert np.isfinite(dx).all()
    assert_close(dx, rdx, np.float32, name="dx")
    assert_close(dw, rdw, np.float32, name="dweight")
    assert_close(db, rdb, np.float32, name="dbias")
    # evaluation mode with huge running statistics
    inv_run = (1.0 / np.sqrt(rv.astype(np.float64) + 1e-5)).astype(np.float32)
    dx, dw, db = _call(fastbn.batch_norm_backward, dy, x, rm, inv_run, w, axis=axis,
                       training=False)
    rdx, rdw, rdb = ref.batch_norm_backward(dy, x, rm, inv_run, w, axis, training=False)
    assert_close(dx, rdx, np.float32, name="eval dx")
    assert_close(dw, rdw, np.float32, name="eval dweight")
    # a huge upstream gradient on ordinary data: dx is huge but finite, sums may overflow
    x0 = inputs.like(x, "ordinary")
    dyh = (np.clip(inputs.like(x, "dy-huge"), -3, 3) * np.float32(1e38)).astype(np.float32)
    _, m0, s0 = fastbn.batch_norm_train(x0, axis=axis)
    for training in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # float32 overflow of the sums
            dx, dw, db = _call(fastbn.batch_norm_backward, dyh, x0, m0, s0, axis=axis,
                               training=training)
        rdx, rdw, rdb = ref.batch_norm_backward(dyh, x0, m0, s0, None, axis, training)
        _assert_f32_rounding(dx, rdx, f"dx, huge dy (training={training})")
        _assert_f32_rounding(dw, rdw, "dweight, huge dy")
        _assert_f32_rounding(db, rdb, "dbias, huge dy")
    # running statistics: the unbiased variance (~1e76) overflows to +inf in float32 storage,
    # the mean stays finite and accurate
    run_mean, run_var = np.zeros(3, np.float32), np.ones(3, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _call(fastbn.batch_norm, x, run_mean, run_var, w, b, training=True, axis=axis)
    _, new_mean, new_var = ref.batch_norm(x, np.zeros(3), np.ones(3), w, b, True, 0.1, 1e-5, axis)
    assert_close(run_mean, new_mean, np.float32, name="running_mean")
    _assert_f32_rounding(run_var, new_var, "running_var")


@pytest.mark.parametrize("shape, axis", [((64, 20), 1), ((16, 4, 4, 20), -1), ((16, 20, 4), 1),
                                         ((64, 4, 16, 3), -1), ((32, 4, 32, 32), 1)])
def test_backward_sums_of_huge_dy_do_not_overflow(shape, axis):
    """Upstream gradients of +-3e38 whose per-channel sums are exactly 0 (rows +, +, -, -):
    the sums are accumulated in float64 (README), so dbias is 0, dweight matches the reference
    (or its float32 overflow) and dx is finite and matches the reference.  A float32 partial sum of two such rows overflows to inf, and
    inf - inf then turns the whole channel into NaN."""
    # x's spread is 2..8 per channel, so invstd <= 0.5 and dx (~ invstd * dy) stays finite
    x = 4 * inputs._randn(inputs.rng_for("huge-dy", shape, axis), shape, axis, np.float32)
    xm = np.moveaxis(x, axis, 0)
    pattern = np.array([3e38, 3e38, -3e38, -3e38], np.float32)
    dy = np.empty_like(x)
    dym = np.moveaxis(dy, axis, 0)  # (C, rest...): the sign pattern runs along the batch axis
    dym[...] = pattern[np.arange(xm.shape[1]) % 4].reshape((1, -1) + (1,) * (x.ndim - 2))
    assert np.all(ref.channel_sum(dy, axis) == 0)
    _, mean, invstd = fastbn.batch_norm_train(x, axis=axis)
    for training in (True, False):
        dx, dw, db = _call(fastbn.batch_norm_backward, dy, x, mean, invstd, axis=axis,
                           training=training)
        rdx, rdw, _ = ref.batch_norm_backward(dy, x, mean, invstd, None, axis, training)
        assert np.all(db == 0), f"dbias {db[:4]} (exact: 0), training={training}"
        _assert_f32_rounding(dw, rdw, f"dweight (training={training})")
        assert np.isfinite(dx).all(), f"dx is not finite (training={training})"
        assert_close(dx, rdx, np.float32, name=f"dx (training={training})")


# --------------------------------------------------------------------------------------------
# subnormals: no flush to zero
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("layout, size", sorted(HUGE_SHAPES))
def test_subnormals(layout, size, dtype):
    """Data made only of subnormals (multiples of the smallest one, up to +-1000 of them).

    * The mean is accurate to a few units of the smallest subnormal ``s`` (float32 data is
      accumulated in float64, where it is normal: exact; float64 chunk means are subnormal
      themselves, so a few ``s`` of error are unavoidable), the variance rounds to ~0.
    * Training: ``y = (x - mean) * invstd`` with ``invstd = 1/sqrt(eps)`` ~ 316: within
      ``(4 * 316 + 1) s`` of the reference (the reference values are up to ~3e5 s: flushing the
      inputs to zero would be caught).
    * Inference with unit scale, and eval-mode backward with unit invstd, are the identity on
      subnormals: bit-exact.
    """
    shape, axis = HUGE_SHAPES[(layout, size)]
    dt = np.dtype(dtype)
    s = float(np.finfo(dt).smallest_subnormal)
    rng = inputs.rng_for("subnormal", shape, axis, dt.name)
    x = (rng.integers(-1000, 1001, shape) * s).astype(dt)
    assert np.all(np.abs(x) < np.finfo(dt).tiny) and np.count_nonzero(x) > 0.99 * x.size
    C = shape[axis]

    rmean, rvar = ref.channel_stats(x, axis)
    for method in ("two_pass", "welford"):
        mean, var = _call(fastbn.channel_stats, x, axis=axis, method=method)
        assert np.max(np.abs(mean - rmean)) <= 4 * s, (method, mean, rmean)
        assert np.max(np.abs(var - rvar)) <= 4 * s, (method, var, rvar)

    y, mean, invstd = _call(fastbn.batch_norm_train, x, axis=axis)
    ry, _, rinv = ref.batch_norm_train(x, axis=axis)
    assert_close(invstd, rinv, dt, name="invstd")
    err = float(np.max(np.abs(y.astype(np.float64) - ry)))
    assert err <= (4 * 316 + 1) * s, f"y error {err / s:.3g} smallest subnormals"

    tiny_eps = 1e-300 if dt == np.float64 else 1e-40  # 1 + eps == 1: unit scale exactly
    ones, zeros = np.ones(C, dt), np.zeros(C, dt)
    yi = _call(fastbn.batch_norm_infer, x, zeros, ones, axis=axis, eps=tiny_eps)
    assert np.array_equal(yi, x), "inference with unit scale is not the identity on subnormals"
    dy = x
    dx, _, db = _call(fastbn.batch_norm_backward, dy, inputs.like(x, "sub"), zeros, ones,
                       axis=axis, training=False)
    assert np.array_equal(dx, dy), "eval backward with invstd 1 is not the identity"
    assert np.max(np.abs(db - ref.channel_sum(dy, axis))) <= 4 * s


# --------------------------------------------------------------------------------------------
# NaN / Inf in one channel stays in that channel
# --------------------------------------------------------------------------------------------

CONTAIN_SHAPES = {
    ("nchw", "serial"): ((4, 5, 3, 3), 1),
    ("nchw", "parallel"): ((16, 5, 24, 24), 1),
    ("nhwc_c5", "serial"): ((4, 3, 3, 5), -1),          # few channels: rows viewed as one
    ("nhwc_c5", "parallel"): ((16, 24, 24, 5), -1),
    ("nhwc_c20", "serial"): ((4, 3, 3, 20), -1),
    ("nhwc_c20", "parallel"): ((16, 12, 12, 20), -1),
}
BAD = 1  # the poisoned channel


def _same_nonfinite(actual, desired, name):
    a, d = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    for pred in (np.isnan, np.isposinf, np.isneginf):
        assert np.array_equal(pred(a), pred(d)), f"{name}: {pred.__name__} pattern differs"


@pytest.mark.parametrize("where", ["x", "dy"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("layout, size", sorted(CONTAIN_SHAPES))
def test_nonfinite_stays_in_its_channel(layout, size, dtype, value, where):
    shape, axis = CONTAIN_SHAPES[(layout, size)]
    dt = np.dtype(dtype)
    clean = inputs._randn(inputs.rng_for("contain", shape, axis), shape, axis, dt)
    dy_clean = inputs.like(clean, "contain")
    _check_size(clean, size)
    C = shape[axis]
    good = np.arange(C) != BAD
    x, dy = clean.copy(), dy_clean.copy()
    target = x if where == "x" else dy
    tm = np.moveaxis(target, axis, 0)
    first = (BAD,) + (0,) * (len(shape) - 1)
    last = (BAD,) + tuple(n - 1 for n in tm.shape[1:])
    tm[first] = value
    tm[last] = value
    w, b, rm, rv = inputs.params(C, dt, "contain")
    inv_run = (1.0 / np.sqrt(rv.astype(np.float64) + 1e-5)).astype(dt)

    def goodpart(a):
        a = np.asarray(a)
        return a[good] if a.ndim == 1 else np.moveaxis(a, axis, 0)[good]

    def check(actual, desired, name):
        assert np.isfinite(goodpart(actual)).all(), f"{name}: non-finite value leaked"
        assert_close(goodpart(actual), goodpart(desired), dt, name=name)

    def badpart(a):
        a = np.asarray(a)
        return a[BAD] if a.ndim == 1 else np.moveaxis(a, axis, 0)[BAD]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # NumPy-side inf - inf etc.
        for method in ("two_pass", "welford"):
            mean, var = _call(fastbn.channel_stats, x, axis=axis, method=method)
            rmean, rvar = ref.channel_stats(clean, axis)
            check(mean, rmean, f"mean ({method})")
            check(var, rvar, f"var ({method})")
            if where == "x":
                assert not np.isfinite(mean[BAD]) and not np.isfinite(var[BAD]), method

        y, mean, invstd = _call(fastbn.batch_norm_train, x, w, b, axis=axis)
        ry, rmean, rinv = ref.batch_norm_train(clean, w, b, axis=axis)
        check(y, ry, "train y")
        check(mean, rmean, "train mean")
        check(invstd, rinv, "train invstd")
        if where == "x":  # the batch statistics of the channel are poisoned: all of it
            assert not np.isfinite(badpart(y)).any()

        for act in (None, "relu"):
            yi = _call(fastbn.batch_norm_infer, x, rm, rv, w, b, axis=axis, activation=act)
            ryi = ref.batch_norm_infer(x, rm, rv, w, b, axis=axis, activation=act)
            check(yi, ryi, f"infer y ({act})")
            _same_nonfinite(yi, ryi, f"infer y ({act})")  # elementwise: exactly those elements

        # backward, training mode, with the (possibly poisoned) statistics of the forward pass
        dx, dw, db = _call(fastbn.batch_norm_backward, dy, x, mean, invstd, w, axis=axis)
        rdx, rdw, rdb = ref.batch_norm_backward(dy_clean, clean, np.where(good, mean, 0),
                                                np.where(good, invstd, 1), w, axis)
        check(dx, rdx, "dx")
        check(dw, rdw, "dweight")
        check(db, rdb, "dbias")
        assert not np.isfinite(badpart(dx)).all()

        # evaluation mode: dx = dy * w * invstd is elementwise and does not depend on x
        dx, dw, db = _call(fastbn.batch_norm_backward, dy, x, rm, inv_run, w, axis=axis,
                           training=False)
        rdx, rdw, rdb = ref.batch_norm_backward(dy_clean, clean, rm, inv_run, w, axis, False)
        check(dx, rdx, "eval dx")
        check(dw, rdw, "eval dweight")
        check(db, rdb, "eval dbias")
        if where == "x":
            assert np.isfinite(dx).all(), "eval-mode dx depends on x"
        else:  # elementwise dy * w * invstd: non-finite exactly where dy is
            bshape = [-1 if d == axis % len(shape) else 1 for d in range(len(shape))]
            scale = (w.astype(np.float64) * inv_run).reshape(bshape)
            _same_nonfinite(dx, dy.astype(np.float64) * scale, "eval dx")

        run_mean, run_var = rm.copy(), rv.copy()
        yb = _call(fastbn.batch_norm, x, run_mean, run_var, w, b, training=True, axis=axis)
        _, new_mean, new_var = ref.batch_norm(clean, rm, rv, w, b, True, 0.1, 1e-5, axis)
        check(yb, ry, "batch_norm y")
        check(run_mean, new_mean, "running_mean")
        check(run_var, new_var, "running_var")
        if where == "x":
            assert not np.isfinite(run_mean[BAD]) or not np.isfinite(run_var[BAD])


# --------------------------------------------------------------------------------------------
# far from unit scale: batch norm is scale invariant
# --------------------------------------------------------------------------------------------

# (dtype, log2 of the scale k).  float32 spans 2**-126 .. 2**128, float64 2**-1022 .. 2**1024;
# with the data scaled by k, eps is scaled by k**2 so that the exact results are those of the
# unscaled problem (y identical, dx divided by k).  Powers of two: the scaling itself is exact.
SCALES = [(np.float32, 40), (np.float32, 64), (np.float32, -60), (np.float32, 70),
          (np.float32, 100), (np.float32, -70),
          (np.float64, 300), (np.float64, -300), (np.float64, 400), (np.float64, -400)]


@pytest.mark.parametrize("shape, axis", [((4, 3, 5, 5), 1), ((4, 5, 5, 3), -1),
                                         ((16, 3, 32, 32), 1)])
@pytest.mark.parametrize("dtype, log2k", SCALES,
                         ids=[f"{np.dtype(d).name}-2^{k}" for d, k in SCALES])
def test_far_from_unit_scale(dtype, log2k, shape, axis):
    """``x * k`` (k a power of two, eps * k**2) must give the same y and ``dx / k``.

    Compared against the float64 reference of the scaled problem, after multiplying dx back by
    k so that the usual tolerance (relative to an O(1) output) applies: a dx that loses its
    ``xhat`` term, or turns into inf/NaN, at scales the dtype represents comfortably fails."""
    dt = np.dtype(dtype)
    k = 2.0 ** log2k
    rng = inputs.rng_for("scale", shape, axis, dt.name)
    x1 = inputs._randn(rng, shape, axis, dt)
    x = (x1 * dt.type(k)).astype(dt)
    assert np.array_equal(x / dt.type(k), x1)  # exact scaling
    eps = 1e-5 * k * k
    dy = inputs.like(x, "scale")
    C = shape[axis]
    w, b, _, _ = inputs.params(C, dt, "scale")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        y, mean, invstd = _call(fastbn.batch_norm_train, x, w, b, eps=eps, axis=axis)
        dx, dw, db = _call(fastbn.batch_norm_backward, dy, x, mean, invstd, w, axis=axis)
    ry, rmean, rinv = ref.batch_norm_train(x, w, b, eps=eps, axis=axis)
    assert_close(y, ry, dt, name="y")
    assert_close(mean / k, rmean / k, dt, name="mean / k")
    assert_close(invstd * k, rinv * k, dt, name="invstd * k")
    rdx, rdw, rdb = ref.batch_norm_backward(dy, x, mean, invstd, w, axis)
    assert np.isfinite(dx).all(), "dx is not finite"
    assert_close(dx * k, rdx * k, dt, name="dx * k")
    assert_close(dw, rdw, dt, name="dweight")
    assert_close(db, rdb, dt, name="dbias")


@pytest.mark.parametrize("log2k", [520, 700, 1000, 1015, 1019])
@pytest.mark.parametrize("shape, axis", [((4, 3, 5, 5), 1), ((16, 32, 32, 3), -1),
                                         ((8, 4, 64, 64), 1)])
def test_float64_variance_overflow_is_inf_not_nan(shape, axis, log2k):
    """float64 data with a spread of 2**520 .. 2**1019: the variance (~2**1040 .. 2**2038) is
    beyond float64, so +inf is its correctly rounded value (as for float32 near its maximum,
    test_numerics.test_near_float32_max); NaN is not.  The mean is finite and accurate, also
    from 2**1015, where the sums of the values or of their deviations overflow (summed again
    scaled, see merge.unshifted)."""
    k = 2.0 ** log2k
    x1 = inputs._randn(inputs.rng_for("f64-huge", shape, axis), shape, axis, np.float64)
    x = x1 * k
    rmean, _ = ref.channel_stats(x1, axis)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for method in ("two_pass", "welford", "auto"):
            mean, var = _call(fastbn.channel_stats, x, axis=axis, method=method)
            assert_close(mean / k, rmean, np.float64, name=f"mean / k ({method})")
            assert np.all(np.isposinf(var)), f"var ({method}): {var}"
        y, mean, invstd = _call(fastbn.batch_norm_train, x, axis=axis)
    assert np.all(invstd == 0), invstd
    assert not np.isnan(y).any(), "y has NaN for finite input"
    assert_close(mean / k, rmean, np.float64, name="batch mean / k")


def test_float64_halves_near_the_maximum():
    """Two halves at +-1e306: every shifted sum of deviations (2e306 each) overflows; the mean
    is 0 and the variance (1e612) beyond float64, as for any spread that wide."""
    x = np.empty((1, 1, 300))
    x[..., :150] = 1e306
    x[..., 150:] = -1e306
    for method in ("two_pass", "welford", "auto"):
        mean, var = fastbn.channel_stats(x, method=method)
        assert abs(mean[0]) < 1e292 and np.isposinf(var[0]), (method, mean, var)
    y, mean, invstd = fastbn.batch_norm_train(x)
    assert abs(mean[0]) < 1e292 and invstd[0] == 0 and np.all(y == 0), (mean, invstd)


# A channel axis of size 1 whose values are not adjacent in memory (a channel cut from a wider
# array, a broadcast one), large enough for the tiled passes: channels-last rows of one value
# may not be merged into longer rows there, whose vectors would read and write the gaps.
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["every_other", "nhwc_first", "broadcast"])
def test_single_channel_with_gaps(kind, dtype):
    rng = inputs.rng_for("single-channel-gaps", kind, np.dtype(dtype).name)
    if kind == "every_other":
        base = rng.standard_normal((40_000, 2)).astype(dtype)
        x, axis = base[:, :1], 1
    elif kind == "nhwc_first":
        base = rng.standard_normal((8, 64, 64, 3)).astype(dtype)
        x, axis = base[..., :1], -1
    else:
        base = np.array([2.0] + [100.0] * 63, dtype)
        x, axis = np.broadcast_to(base[:1], (40_000, 1)), 1
    xc = np.ascontiguousarray(x)
    rmean, rvar = ref.channel_stats(xc, axis)
    before = Unchanged(base)
    mean, var = fastbn.channel_stats(x, axis=axis)
    assert_close(mean, rmean, dtype, name="mean")
    assert_close(var, rvar, dtype, name="var")
    y, _, _ = fastbn.batch_norm_train(x, axis=axis)
    assert_close(y, ref.batch_norm_train(xc, axis=axis)[0], dtype, name="y")
    dy = rng.standard_normal(x.shape).astype(dtype)
    m, s = fastbn.batch_norm_train(xc, axis=axis)[1:]
    got = fastbn.batch_norm_backward(dy, x, m, s, axis=axis)
    want = fastbn.batch_norm_backward(dy, xc, m, s, axis=axis)
    for a, b, name in zip(got, want, ("dx", "dweight", "dbias")):
        assert_close(a, b, dtype, name=name)
    before.check()
    # out= with gaps: the values between its elements stay as they were
    holder = np.zeros(x.shape[:-1] + (2,), dtype)
    out = holder[..., :1]
    rm, rv = np.zeros(1, dtype), np.ones(1, dtype)
    fastbn.batch_norm_infer(xc, rm, rv, axis=axis, out=out)
    assert_close(out, ref.batch_norm_infer(xc, rm, rv, axis=axis), dtype, name="out")
    assert not holder[..., 1].any()


@pytest.mark.parametrize("shape", [(1000, 1), (8, 3, 50), (64, 4, 64, 64)])
def test_float64_constant_channels_whose_sum_overflows(shape):
    """Every value 1e307: the plain sum (two-pass method) overflows, the deviations are all 0;
    the mean is 1e307 and the variance 0 by every method."""
    x = np.full(shape, 1e307)
    for method in ("two_pass", "welford", "auto"):
        mean, var = fastbn.channel_stats(x, method=method)
        assert_close(mean, np.full(shape[1], 1e307), np.float64, name=f"mean ({method})")
        assert np.all(var == 0), (method, var)


@pytest.mark.parametrize("axis", [0, 1])
def test_out_may_be_an_ndarray_subclass(axis):
    """``out=`` an ndarray subclass is filled as a plain array would be and returned as given:
    an ``np.matrix`` stays 2-D when reshaped, and the kernels must not see it as such."""
    x = np.arange(12, dtype=np.float32).reshape(4, 3) * 0.5 + 1
    dy = np.cos(x)
    C = x.shape[axis]
    rm, rv = np.full(C, 0.5, np.float32), np.full(C, 2.0, np.float32)
    out = np.matrix(np.zeros_like(x))
    got = fastbn.batch_norm_infer(x, rm, rv, axis=axis, out=out)
    assert got is out
    assert_close(np.asarray(out), ref.batch_norm_infer(x, rm, rv, axis=axis), np.float32)
    out = np.matrix(np.zeros_like(x))
    y, mean, invstd = fastbn.batch_norm_train(x, axis=axis, out=out)
    assert y is out
    assert_close(np.asarray(out), ref.batch_norm_train(x, axis=axis)[0], np.float32)
    out = np.matrix(np.zeros_like(x))
    dx, _, _ = fastbn.batch_norm_backward(dy, x, mean, invstd, axis=axis, out=out)
    assert dx is out
    rdx = ref.batch_norm_backward(dy, x, mean, invstd, None, axis)[0]
    assert_close(np.asarray(out), rdx, np.float32)
    np.testing.assert_array_equal(np.asarray(out), fastbn.batch_norm_backward(dy, x, mean, invstd, axis=axis)[0])
