"""The non-temporal store path (``_kernels.simd``, chosen for outputs larger than the last-level
cache) against the ordinary stores and the float64 reference.

Tensors here are small, so the threshold ``_config.STREAM_BYTES`` is lowered to 0 to force the
path; a spy on the kernels asserts that it was really taken (or refused, for short runs), so
that these tests cannot pass by exercising the ordinary path twice.
"""

import numpy as np
import pytest
import reference as ref
from util import assert_close

import fastbn
from fastbn import _config
from fastbn import functional as F

# (shape, axis), all above the small-tensor size (which has its own one-call kernels): long
# channels-first runs and channels-last tiles wide enough to stream whatever their alignment;
# short runs that are whole cache lines, which stream only when the output starts on a line;
# and short runs that are not, which never stream.
STREAMED = [((4, 8, 40, 40), 1), ((8, 5, 1000), 1), ((300, 2048), -1), ((40, 5, 5, 1100), -1),
            ((2, 16, 32768), 1)]  # the last: training and backward channel by channel
# (12, 32, 32, 3): three channels, whose rows are viewed 32 (float64: 24) at a time as rows of
# whole lines (functional._cl_parts)
ALIGNED = [((2048, 64), -1), ((64, 32, 128), 1), ((12, 32, 32, 3), -1)]
REFUSED = [((48, 16, 7, 7), 1), ((600, 100), -1)]


def _spy(monkeypatch, module, name, seen):
    kernel = getattr(module, name)

    def spy(size, *args):
        seen.append(args[-1])  # the nt flag
        return kernel(size, *args)

    monkeypatch.setattr(module, name, spy)


def _inputs(shape, axis, dtype):
    rng = np.random.default_rng(abs(hash((shape, axis, dtype.__name__))) % 2**32)
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    x.flat[::97] = np.nan  # NaN must stay where it is, streamed or not
    dy = rng.standard_normal(shape).astype(dtype)
    C = shape[axis]
    w = rng.uniform(0.5, 2, C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    rm = rng.standard_normal(C).astype(dtype)
    rv = rng.uniform(0.5, 2, C).astype(dtype)
    return x, dy, w, b, rm, rv


def _all_ops(x, dy, w, b, rm, rv, axis, out_offset):
    """Every op writing a large output, each into a new output that starts ``out_offset``
    elements past a line boundary, so the scalar head before the streamed lines is exercised."""

    def out():
        buf = np.empty(x.size + 16, x.dtype)
        start = -buf.__array_interface__["data"][0] % 64 // x.itemsize + out_offset
        return buf[start:start + x.size].reshape(x.shape)

    res = {}
    res["infer"] = fastbn.batch_norm_infer(x, rm, rv, w, b, axis=axis, out=out())
    res["infer_relu"] = fastbn.batch_norm_infer(x, rm, rv, w, b, axis=axis, activation="relu",
                                               out=out())
    y, mean, invstd = fastbn.batch_norm_train(np.nan_to_num(x), w, b, axis=axis, out=out())
    res["train"] = (y, mean, invstd)
    res["backward"] = fastbn.batch_norm_backward(dy, np.nan_to_num(x), mean, invstd, w,
                                                 axis=axis, out=out())
    res["backward_eval"] = fastbn.batch_norm_backward(dy, x, rm, 1 / np.sqrt(rv + 1e-5), w,
                                                      axis=axis, training=False, out=out())
    return res


def _flags(monkeypatch, threshold):
    monkeypatch.setattr(_config, "STREAM_BYTES", threshold)
    seen = []
    for mod in (F._cf, F._cl):
        for name in ("affine", "infer_tiled", "bwd_apply"):
            _spy(monkeypatch, mod, name, seen)
    for name in ("train_small", "backward_small", "backward_tiled"):
        _spy(monkeypatch, F._cf, name, seen)
    return seen


@pytest.mark.parametrize("out_offset", [0, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", STREAMED + ALIGNED + REFUSED)
def test_streamed_equals_ordinary_and_reference(monkeypatch, shape, axis, dtype, out_offset):
    data = _inputs(shape, axis, dtype)
    with monkeypatch.context() as m:
        flags = _flags(m, 1 << 62)
        plain = _all_ops(*data, axis, out_offset)
    assert flags and not any(flags)
    with monkeypatch.context() as m:
        flags = _flags(m, 0)
        streamed = _all_ops(*data, axis, out_offset)
    # Long runs must stream; short ones only when they are whole lines (partial lines measured
    # 2.5x slower).
    stream = (shape, axis) in STREAMED or (shape, axis) in ALIGNED and out_offset == 0
    assert all(flags) if stream else not any(flags), flags
    for key in plain:
        for a, b in zip(_tuple(plain[key]), _tuple(streamed[key])):
            np.testing.assert_array_equal(a, b, err_msg=key)

    x, dy, w, b, rm, rv = data
    assert_close(streamed["infer"], ref.batch_norm_infer(x, rm, rv, w, b, axis=axis), dtype)
    relu = np.maximum(ref.batch_norm_infer(x, rm, rv, w, b, axis=axis), 0)
    relu[np.isnan(x)] = np.nan
    assert_close(streamed["infer_relu"], relu, dtype)
    xf = np.nan_to_num(x)
    y_ref = ref.batch_norm_train(xf, w, b, axis=axis)[0]
    assert_close(streamed["train"][0], y_ref, dtype)
    dx_ref = ref.batch_norm_backward(dy, xf, streamed["train"][1], streamed["train"][2], w,
                                     axis=axis)[0]
    assert_close(streamed["backward"][0], dx_ref, dtype, slack=_xhat_slack(xf, dtype))


def _xhat_slack(x, dtype):
    # The reference is given the float32-rounded mean/invstd, as fastbn is; dx still differs by
    # the rounding of xhat in the data type (a few ulps of max|x - mean| * invstd).
    return 0.0 if dtype == np.float64 else 8 * np.finfo(np.float32).eps * float(np.max(np.abs(x)))


def _tuple(v):
    return v if isinstance(v, tuple) else (v,)


def test_stream_threshold_from_environment(monkeypatch):
    monkeypatch.setenv("FASTBN_STREAM_BYTES", "12345")
    assert _config._stream_bytes() == 12345
    monkeypatch.setenv("FASTBN_STREAM_BYTES", "-5")
    assert _config._stream_bytes() == 0
    monkeypatch.setenv("FASTBN_STREAM_BYTES", "lots")
    with pytest.warns(UserWarning, match="FASTBN_STREAM_BYTES"):
        assert _config._stream_bytes() == _config._last_level_cache() // 2
    monkeypatch.delenv("FASTBN_STREAM_BYTES")
    assert _config._stream_bytes() == _config._last_level_cache() // 2 > 0


@pytest.mark.parametrize("shape,axis", STREAMED[:1] + STREAMED[2:3])
def test_fresh_outputs_never_stream(monkeypatch, shape, axis):
    # An output allocated by the call is faulted in by the pass itself, where streaming stores
    # measured slower; only caller-provided buffers (out=) stream.
    x, dy, w, b, rm, rv = _inputs(shape, axis, np.float32)
    flags = _flags(monkeypatch, 0)
    y = fastbn.batch_norm_infer(x, rm, rv, w, b, axis=axis)
    _, mean, invstd = fastbn.batch_norm_train(np.nan_to_num(x), w, b, axis=axis)
    fastbn.batch_norm_backward(dy, np.nan_to_num(x), mean, invstd, w, axis=axis)
    assert flags and not any(flags), flags
    assert_close(y, ref.batch_norm_infer(x, rm, rv, w, b, axis=axis), np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1200, 200), (24, 7, 9, 130)])
def test_wide_row_reductions_match_reference(monkeypatch, shape, dtype):
    # Channels-last gradient sums over rows of more than 512 bytes take the row-by-row
    # ``_wide`` kernel when the tensor does not fit in cache, the column kernel when it does;
    # the statistics always take the column kernel.  The threshold is lowered here so that both
    # gradient kernels run on the same small tensor.
    x, dy, w, b, _, _ = _inputs(shape, -1, dtype)
    x = np.nan_to_num(x)
    names = []
    original = F._cl_reduction

    def spy(name, x2):
        chosen = original(name, x2)
        names.append(chosen)
        return chosen

    monkeypatch.setattr(F, "_cl_reduction", spy)
    for threshold, suffix in ((1 << 62, ""), (0, "_wide")):
        monkeypatch.setattr(_config, "LLC_BYTES", threshold)
        names.clear()
        mean, var = fastbn.channel_stats(x, axis=-1)
        y, bmean, invstd = fastbn.batch_norm_train(x, w, b, axis=-1)
        dx, dw, db = fastbn.batch_norm_backward(dy, x, bmean, invstd, w, axis=-1)
        assert set(names) == {"moments", "bwd_sums" + suffix}, names
        rmean, rvar = ref.channel_stats(x, -1)
        assert_close(mean, rmean, dtype, name="mean")
        assert_close(var, rvar, dtype, name="var")
        assert_close(y, ref.batch_norm_train(x, w, b, axis=-1)[0], dtype, name="y")
        rdx, rdw, rdb = ref.batch_norm_backward(dy, x, bmean, invstd, w, axis=-1)
        assert_close(dx, rdx, dtype, slack=_xhat_slack(x, dtype), name="dx")
        assert_close(dw, rdw, dtype, name="dweight")
        assert_close(db, rdb, dtype, name="dbias")
