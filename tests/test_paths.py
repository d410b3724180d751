"""Both decompositions of mid-size channels-first tensors against the float64 reference.

Channels-first tensors of up to an eighth of the last-level cache, with at least 16 channels
(or fewer channels in a small tensor), run every operation as one kernel call, channel by
channel (``functional._cf_one_call``); larger ones take the tiled passes (partial sums, an ordered merge, an elementwise pass).  The
inputs here are small enough for the first, so each test also runs them with the cache size
lowered until they take the second.  Spies on the kernels assert which path ran, so that a
test cannot pass by exercising one path twice.
"""

import numpy as np
import pytest
import reference as ref
from inputs import like, params
from util import assert_close, input_precision_slack

import fastbn
from fastbn import _config
from fastbn import functional as F
from fastbn._kernels import simd

# (shape, axis): short runs (the *_short reductions when tiled), runs of 128 values or more,
# runs of 1 KB in float32 (the short statistics, float32 lanes from 128 values, the per-run
# backward sums), an NCL tensor,
# every other sample of a batch (rows further apart than a sample), a channel axis that is
# not the second, samples a whole number of pages long (new outputs placed apart from the
# inputs, _pool.empty_apart), and fewer than 16 channels in tensors small enough for one call
SHAPES = [((16, 48, 7, 7), 1), ((4, 24, 40, 40), 1), ((12, 40, 16, 16), 1), ((6, 32, 300), 1),
          ((6, 64, 20, 20), "odd"), ((20, 20, 64, 3), 2), ((16, 64, 8, 8), 1),
          ((8, 8, 8, 8, 8), 1), ((4, 3, 100, 100), 1)]
DTYPES = [np.float32, np.float64]
ONE_CALL = ("train_small", "infer_small", "stats_small", "backward_small")
TILED = ("moments", "moments_short", "moments32", "affine", "infer_tiled", "bwd_sums",
         "bwd_sums_short", "bwd_apply", "backward_tiled")


def _spy(monkeypatch, names):
    """Record, in the returned list, each of the channels-first kernels ``names`` that runs."""
    seen = []
    for name in names:
        kernel = getattr(F._cf, name)

        def spy(size, *args, _kernel=kernel, _name=name):
            seen.append(_name)
            return _kernel(size, *args)

        monkeypatch.setattr(F._cf, name, spy)
    return seen


def _spy_columns(monkeypatch, names):
    """Record, in the returned list, ``(name, G)`` for each of the channels-last kernels
    ``names`` that runs, ``G`` its last argument (columns per channel)."""
    seen = []
    for name in names:
        def spy(size, *args, _kernel=getattr(F._cl, name), _name=name):
            seen.append((_name, args[-1]))
            return _kernel(size, *args)

        monkeypatch.setattr(F._cl, name, spy)
    return seen


@pytest.fixture(params=["one_call", "tiled"])
def path(request, monkeypatch):
    """Route to one decomposition and record the channels-first kernels that ran."""
    # a 32 MB cache takes every input here (at most 1.3 MB) to the one-call kernels
    monkeypatch.setattr(_config, "LLC_BYTES", 1024 if request.param == "tiled" else 32 << 20)
    return request.param, _spy(monkeypatch, ONE_CALL + TILED)


def _check_route(path, expected_one_call):
    kind, seen = path
    assert seen, "no channels-first kernel ran"
    if kind == "one_call":
        assert seen == [expected_one_call], seen
    else:
        assert not set(seen) & set(ONE_CALL), seen


def _input(shape, axis, dtype):
    """``(x, axis)``; axis "odd": every other sample of a batch of ``shape``, channels on 1."""
    rng = np.random.default_rng(abs(hash((shape, str(axis), np.dtype(dtype).name))) % 2**32)
    x = (rng.standard_normal(shape) * 2.0 + 0.5).astype(dtype)
    return (x[::2], 1) if axis == "odd" else (x, axis)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", SHAPES)
def test_train(path, shape, axis, dtype):
    x, axis = _input(shape, axis, dtype)
    w, b, _, _ = params(x.shape[axis], dtype, "paths")
    y, mean, invstd = fastbn.batch_norm_train(x, w, b, axis=axis)
    _check_route(path, "train_small")
    ry, rmean, rinvstd = ref.batch_norm_train(x, w, b, axis=axis)
    slack = input_precision_slack(x, rinvstd, w)
    assert_close(y, ry, dtype, slack=slack, name="y")
    assert_close(mean, rmean, dtype, name="mean")
    assert_close(invstd, rinvstd, dtype, name="invstd")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", SHAPES)
def test_stats(path, shape, axis, dtype):
    x, axis = _input(shape, axis, dtype)
    mean, var = fastbn.channel_stats(x, axis=axis)
    _check_route(path, "stats_small")
    rmean, rvar = ref.channel_stats(x, axis=axis)
    assert_close(mean, rmean, dtype, name="mean")
    assert_close(var, rvar, dtype, name="var")


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", SHAPES)
def test_infer(path, shape, axis, dtype, activation):
    x, axis = _input(shape, axis, dtype)
    w, b, rm, rv = params(x.shape[axis], dtype, "paths")
    y = fastbn.batch_norm_infer(x, rm, rv, w, b, axis=axis, activation=activation)
    _check_route(path, "infer_small")
    ry = ref.batch_norm_infer(x, rm, rv, w, b, axis=axis, activation=activation)
    assert_close(y, ry, dtype, name="y")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", SHAPES)
def test_backward(path, shape, axis, dtype, training):
    x, axis = _input(shape, axis, dtype)
    dy = like(x, "paths")
    w, _, _, _ = params(x.shape[axis], dtype, "paths")
    rmean, rvar = ref.channel_stats(x, axis=axis)
    mean = rmean.astype(dtype)
    invstd = (1.0 / np.sqrt(rvar + 1e-5)).astype(dtype)
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, training=training)
    _check_route(path, "backward_small")
    rdx, rdw, rdb = ref.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, training=training)
    assert_close(dx, rdx, dtype, name="dx")
    assert_close(dw, rdw, dtype, name="dweight")
    assert_close(db, rdb, dtype, name="dbias")


# Channels of fewer than 128 values: (shape, kernels of training, kernels of backward).
# Statistics run as one call whatever the runs (in training too), inference is tiled (the
# parameters and the elementwise pass in one call); runs of
# fewer than 24 values keep training's normalisation and backward tiled (the one-call kernels
# lost there; the tiled backward passes in one call), longer ones run backward as one call,
# and training too up to 512 KB.
SHORT_CHANNELS = [
    ((40, 1000, 3), ["stats_small", "affine"], ["backward_tiled"]),
    ((2, 600, 7, 7), ["train_small"], ["backward_small"]),
    ((2, 2000, 7, 7), ["stats_small", "affine"], ["backward_small"]),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, train, backward", SHORT_CHANNELS)
def test_short_channels_route(monkeypatch, dtype, shape, train, backward):
    """Channels of fewer than 128 values in a tensor small enough for the one-call kernels:
    each operation takes the kernels of ``SHORT_CHANNELS`` and matches the reference."""
    monkeypatch.setattr(_config, "LLC_BYTES", 32 << 20)
    seen = _spy(monkeypatch, ONE_CALL + TILED)
    x, axis = _input(shape, 1, dtype)
    w, b, rm, rv = params(shape[1], dtype, "paths")
    y, mean, invstd = fastbn.batch_norm_train(x, w, b)
    ry, rmean, rinvstd = ref.batch_norm_train(x, w, b)
    assert_close(y, ry, dtype, slack=input_precision_slack(x, rinvstd, w), name="y")
    assert_close(mean, rmean, dtype, name="mean")
    assert seen == train, seen
    seen.clear()
    m, v = fastbn.channel_stats(x)
    rm2, rv2 = ref.channel_stats(x)
    assert_close(m, rm2, dtype, name="stats mean")
    assert_close(v, rv2, dtype, name="stats var")
    assert seen == ["stats_small"], seen
    seen.clear()
    assert_close(fastbn.batch_norm_infer(x, rm, rv, w, b), ref.batch_norm_infer(x, rm, rv, w, b),
                 dtype, name="infer")
    assert seen == ["infer_tiled"], seen
    seen.clear()
    dy = like(x, "paths dy")
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, w)
    rdx, rdw, rdb = ref.batch_norm_backward(dy, x, mean, invstd, w)
    assert_close(dx, rdx, dtype, name="dx")
    assert_close(dw, rdw, dtype, name="dweight")
    assert_close(db, rdb, dtype, name="dbias")
    assert seen == backward, seen


@pytest.mark.parametrize("shape", [(8, 1, 128, 128), (4, 8, 64, 80)])
def test_few_channels_past_the_bound_tiled(monkeypatch, shape):
    """Fewer than 16 channels take the one-call kernels only up to 2**17 values and 2**16 in a
    channel (``functional._FEW_CHANNELS_VALUES``): one channel of 2**17 values, or 8 of 20480
    values, take the tiled passes, and match the reference."""
    monkeypatch.setattr(_config, "LLC_BYTES", 32 << 20)
    seen = _spy(monkeypatch, ONE_CALL + TILED)
    x, axis = _input(shape, 1, np.float32)
    dy = like(x, "paths dy")
    mean, var = fastbn.channel_stats(x)
    invstd = (1.0 / np.sqrt(var.astype(np.float64) + 1e-5)).astype(np.float32)
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd)
    assert seen and not set(seen) & set(ONE_CALL), seen
    rmean, rvar = ref.channel_stats(x)
    assert_close(mean, rmean, np.float32, name="mean")
    assert_close(var, rvar, np.float32, name="var")
    rdx, rdw, rdb = ref.batch_norm_backward(dy, x, mean, invstd)
    assert_close(dx, rdx, np.float32, name="dx")
    assert_close(dw, rdw, np.float32, name="dweight")
    assert_close(db, rdb, np.float32, name="dbias")


@pytest.mark.parametrize("dtype, run, expected", [
    (np.float32, 100, "moments_short"), (np.float32, 256, "moments32"),
    (np.float64, 100, "moments_short"), (np.float64, 256, "moments")])
def test_statistics_kernel_by_run_bytes(monkeypatch, dtype, run, expected):
    """Tiled statistics sum runs of up to 1 KB per channel block (``moments_short``), longer
    ones run by run (``moments``): 256 values are 1 KB in float32, 2 KB in float64.  Float32
    runs of 128 values or more go in float32 lanes (``moments32``) whatever their length."""
    monkeypatch.setattr(_config, "LLC_BYTES", 1024)
    seen = _spy(monkeypatch, ONE_CALL + TILED)
    x, axis = _input((12, 40, run), 1, dtype)
    mean, var = fastbn.channel_stats(x)
    rmean, rvar = ref.channel_stats(x)
    assert_close(mean, rmean, dtype, name="mean")
    assert_close(var, rvar, dtype, name="var")
    assert seen == [expected], seen


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_channels_train_and_backward_channel_by_channel(monkeypatch, dtype):
    """Beyond the one-call size, channels-first runs of 128 KB or more whose channels stay in
    cache (``functional._long_channels``) still train and backpropagate channel by channel,
    and match the reference."""
    monkeypatch.setattr(_config, "LLC_BYTES", 32 << 20)
    monkeypatch.setattr(F, "_ONE_CALL_LLC_SHARE", 1 << 20)  # no one-call by size
    seen = _spy(monkeypatch, ONE_CALL + TILED)
    x, axis = _input((2, 16, 32768), 1, dtype)
    w, b, _, _ = params(16, dtype, "paths")
    y, mean, invstd = fastbn.batch_norm_train(x, w, b)
    ry, rmean, rinvstd = ref.batch_norm_train(x, w, b)
    assert_close(y, ry, dtype, slack=input_precision_slack(x, rinvstd, w), name="y")
    assert_close(mean, rmean, dtype, name="mean")
    assert_close(invstd, rinvstd, dtype, name="invstd")
    dy = np.random.default_rng(3).standard_normal(x.shape).astype(dtype)
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, w)
    rdx, rdw, rdb = ref.batch_norm_backward(dy, x, mean, invstd, w)
    assert_close(dx, rdx, dtype, slack=input_precision_slack(x, rinvstd, w), name="dx")
    assert_close(dw, rdw, dtype, name="dweight")
    assert_close(db, rdb, dtype, name="dbias")
    assert seen == ["train_small", "backward_small"], seen


# Past the one-call sizes: channels-first runs long (the gradient sums run by run) and short
# (bwd_sums_short), a channels-first view of a channels-last array, few channels; channels-last
# rows of 48 channels (inference only: backward as above)
TILED_ONE_CALL = [((6, 40, 300), 1, "channels_first"), ((40, 1000, 3), 1, "channels_first"),
                  ((20, 20, 64, 3), 2, "channels_first"), ((64, 3, 578), 1, "channels_first"),
                  ((1152, 48), -1, "channels_last")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis, family", TILED_ONE_CALL)
@pytest.mark.parametrize("case", ["plain", "huge weight"])
def test_inference_and_backward_tiled_in_one_call(monkeypatch, shape, axis, family, dtype, case):
    """Inference and training-mode backward past the one-call sizes run their parameters and
    passes in one kernel call (``infer_tiled``, ``backward_tiled``), which must give exactly
    what the same passes give driven from Python, also where float32 data needs float64 lanes
    (a weight of 1e32: the kernel leaves the elementwise pass to Python); and match the
    reference."""
    monkeypatch.setattr(_config, "LLC_BYTES", 1024)  # no channels-first one-call kernels
    x, axis = _input(shape, axis, dtype)
    C = shape[axis]
    w, b, rm, rv = params(C, dtype, "paths")
    if case == "huge weight":
        w = w * dtype(1e32)
    dy = np.random.default_rng(7).standard_normal(shape).astype(dtype)
    _, mean, invstd = fastbn.batch_norm_train(x, w, b, axis=axis)
    module = getattr(F, "_cl" if family == "channels_last" else "_cf")
    seen = []
    for name in ("infer_tiled", "backward_tiled", "affine", "bwd_apply"):
        kernel = getattr(module, name)

        def spy(size, *args, _kernel=kernel, _name=name):
            seen.append(_name)
            return _kernel(size, *args)

        monkeypatch.setattr(module, name, spy)

    def run():
        y = fastbn.batch_norm_infer(x, rm, rv, w, b, axis=axis, activation="relu")
        return (y,) + fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)

    one_call = run()
    lanes64 = case == "huge weight" and dtype == np.float32
    expected = ["infer_tiled"] + ["affine"] * lanes64
    if family == "channels_first":
        expected += ["backward_tiled"] + ["bwd_apply"] * lanes64
    assert seen[:len(expected)] == expected, seen
    monkeypatch.setattr(F, "_tiled_one_call", lambda *args: False)
    seen.clear()
    driven = run()
    assert "infer_tiled" not in seen and "backward_tiled" not in seen, seen
    for got, want in zip(one_call, driven):
        np.testing.assert_array_equal(got, want)
    ry = np.maximum(ref.batch_norm_infer(x, rm, rv, w, b, axis=axis), 0)
    assert_close(one_call[0], ry, dtype, name="y")
    rdx, rdw, rdb = ref.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
    slack = input_precision_slack(x, invstd.astype(np.float64), w)
    assert_close(one_call[1], rdx, dtype, slack=slack, name="dx")
    assert_close(one_call[2], rdw, dtype, name="dweight")
    assert_close(one_call[3], rdb, dtype, name="dbias")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 1040), (40, 10, 10, 3), (50, 8, 8, 24)])
def test_channels_last_parameter_rows(monkeypatch, shape, dtype):
    """The channels-last elementwise passes read per-channel parameters as vectors: each row
    starts on a cache line, also when tiled for rows viewed as one (``functional._cl_params``,
    ``merge.tile_columns``: few channels, or rows not a whole number of lines), tiles
    of a tensor in cache span at most 4 KB of channels, and the results match the reference,
    twice in a row (the rows are per-thread scratch, reused)."""
    seen = []
    for name in ("affine", "bwd_apply"):
        kernel = getattr(F._cl, name)

        def spy(size, *args, _kernel=kernel):
            x2, W = args[0], args[-2]
            rows = [a for a in args if isinstance(a, np.ndarray) and a.ndim == 1]
            seen.append(([a.__array_interface__["data"][0] % 64 for a in rows],
                         W * x2.itemsize, all(a.shape[0] == x2.shape[1] for a in rows)))
            return _kernel(size, *args)

        monkeypatch.setattr(F._cl, name, spy)
    # the one-call tiled kernels take the elementwise pass's view of x, the scratch whole
    # (rows of at least as many values as that view's) and the elementwise tiles' width, at
    # these positions among their arguments
    for name, view, we, scratch in (("train_tiled", 1, 6, 11), ("backward_tiled", 2, 10, 12),
                                    ("infer_tiled", 0, 12, 7)):
        kernel = getattr(F._cl, name)

        def spy(size, *args, _kernel=kernel, _view=view, _we=we, _a=scratch):
            x2, W = args[_view], args[_we]
            rows = [r for a in args[_a:_a + 2] for r in a]
            seen.append(([r.__array_interface__["data"][0] % 64 for r in rows],
                         W * x2.itemsize, all(r.shape[0] >= x2.shape[1] for r in rows)))
            return _kernel(size, *args)

        monkeypatch.setattr(F._cl, name, spy)
    # past the one-call sizes, so that the tiled elementwise passes run
    monkeypatch.setattr(_config, "SERIAL_BELOW", 1)
    monkeypatch.setattr(F, "_FUSED_BLOCK_BYTES", 0)
    x = _input(shape, -1, dtype)[0]
    C = shape[-1]
    w, b, rm, rv = params(C, dtype, "paths")
    dy = np.random.default_rng(5).standard_normal(shape).astype(dtype)
    for _ in range(2):
        seen.clear()
        assert_close(fastbn.batch_norm_infer(x, rm, rv, w, b, axis=-1),
                     ref.batch_norm_infer(x, rm, rv, w, b, axis=-1), dtype, name="y")
        y, mean, invstd = fastbn.batch_norm_train(x, w, b, axis=-1)
        ry, _, rinvstd = ref.batch_norm_train(x, w, b, axis=-1)
        assert_close(y, ry, dtype, slack=input_precision_slack(x, rinvstd, w), name="y")
        for training in (True, False):
            dx, _, _ = fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=-1,
                                                  training=training)
            rdx, _, _ = ref.batch_norm_backward(dy, x, mean, invstd, w, axis=-1,
                                                training=training)
            assert_close(dx, rdx, dtype, slack=input_precision_slack(x, rinvstd, w), name="dx")
        assert len(seen) >= 4, seen  # one call per op, two where a part of rows is left over
        for offsets, tile_bytes, tiled_width in seen:
            assert offsets and set(offsets) == {0}, offsets
            assert tile_bytes <= 4096, tile_bytes
            assert tiled_width, "parameter rows do not span the kernel view's row"


# channels-last tensors past the one-call sizes: one block of 64 channels, rows of 48 float32
# values; two merge blocks (more than 256 channels); a row count that is not a multiple of the
# tile's; channels-last 4-D; rows not a whole number of cache lines, whose elementwise passes
# view several rows as one (functional._cl_row_factor; float32 only for 24 channels)
TILED_CL = [((1152, 48), -1), ((600, 300), -1), ((2001, 40), 1), ((4, 12, 12, 64), -1),
            ((2400, 20), -1), ((96, 5, 5, 24), -1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", TILED_CL)
@pytest.mark.parametrize("case", ["plain", "nonfinite", "huge weight"])
def test_channels_last_tiled_in_one_call(monkeypatch, shape, axis, dtype, case):
    """Channels-last tensors past the one-call sizes run their tiled passes back to back in one
    kernel call (``channels_last.stats_tiled``, ``train_tiled``, ``backward_tiled``), which
    must give exactly what the same passes give driven from Python, also where the kernels
    leave the rest to Python: infinities and NaN in some channels, or a weight of 1e32 (scales
    beyond float32 lanes); and match the reference."""
    x, axis = _input(shape, axis, dtype)
    C = shape[axis]
    nonfinite = case == "nonfinite"
    if nonfinite:
        xm = np.moveaxis(x, axis, -1)
        xm[..., 3].flat[7] = np.inf
        xm[..., 5].flat[2] = np.nan
        xm[..., 6].flat[0] = -np.inf
        xm[..., 6].flat[9] = np.inf
    w, b, _, _ = params(C, dtype, "paths")
    if case == "huge weight":
        w = w * dtype(1e32)
    dy = np.random.default_rng(6).standard_normal(shape).astype(dtype)
    seen = []
    for name in ("stats_tiled", "train_tiled", "backward_tiled"):
        kernel = getattr(F._cl, name)

        def spy(size, *args, _kernel=kernel, _name=name):
            seen.append(_name)
            return _kernel(size, *args)

        monkeypatch.setattr(F._cl, name, spy)

    def run():
        stats = fastbn.channel_stats(x, axis=axis, ddof=1)
        y, mean, invstd = fastbn.batch_norm_train(x, w, b, axis=axis)
        grads = [fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, training=t)
                 for t in (True, False)]
        return stats, (y, mean, invstd), *grads

    one_call = run()
    # evaluation-mode backward is driven from Python (see channels_last.train_tiled)
    assert seen == ["stats_tiled", "train_tiled", "backward_tiled"], seen
    monkeypatch.setattr(F, "_cl_tiled", lambda *args: False)
    seen.clear()
    driven = run()
    assert seen == [], seen
    for got, want in zip(one_call, driven):
        for g, v in zip(got, want):
            np.testing.assert_array_equal(g, v)
    if not nonfinite:
        (mean, var), (y, _, invstd) = one_call[:2]
        rmean, rvar = ref.channel_stats(x, axis, ddof=1)
        assert_close(mean, rmean, dtype, name="mean")
        assert_close(var, rvar, dtype, name="var")
        ry, _, rinvstd = ref.batch_norm_train(x, w, b, axis=axis)
        assert_close(y, ry, dtype, slack=input_precision_slack(x, rinvstd, w), name="y")
        for (dx, dw, db), training in zip(one_call[2:], (True, False)):
            rdx, rdw, rdb = ref.batch_norm_backward(dy, x, one_call[1][1], invstd, w, axis=axis,
                                                    training=training)
            assert_close(dx, rdx, dtype, slack=input_precision_slack(x, rinvstd, w), name="dx")
            assert_close(dw, rdw, dtype, name="dweight")
            assert_close(db, rdb, dtype, name="dbias")


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_call_bound_for_inference_and_backward(monkeypatch, dtype):
    """With a large last-level cache, training and statistics run channels-first tensors in
    one call up to a share of it, inference and backward only up to ``_ONE_CALL_PASS_BYTES``
    (lowered here to below the tensor's size); every route matches the reference."""
    monkeypatch.setattr(_config, "LLC_BYTES", 1 << 30)
    monkeypatch.setattr(F, "_ONE_CALL_PASS_BYTES", 64 << 10)
    seen = _spy(monkeypatch, ONE_CALL + TILED)
    x, _ = _input((8, 32, 24, 24), 1, dtype)  # 147k values: past the one-call cap
    w, b, rm, rv = params(32, dtype, "paths")
    dy = np.random.default_rng(4).standard_normal(x.shape).astype(dtype)
    y, mean, invstd = fastbn.batch_norm_train(x, w, b)
    ry, rmean, rinvstd = ref.batch_norm_train(x, w, b)
    assert_close(y, ry, dtype, slack=input_precision_slack(x, rinvstd, w), name="y")
    assert_close(mean, rmean, dtype, name="mean")
    assert_close(fastbn.channel_stats(x)[1], ref.channel_stats(x)[1], dtype, name="var")
    assert seen == ["train_small", "stats_small"], seen
    seen.clear()
    assert_close(fastbn.batch_norm_infer(x, rm, rv, w, b), ref.batch_norm_infer(x, rm, rv, w, b),
                 dtype, name="y")
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, w)
    rdx, rdw, rdb = ref.batch_norm_backward(dy, x, mean, invstd, w)
    assert_close(dx, rdx, dtype, slack=input_precision_slack(x, rinvstd, w), name="dx")
    assert_close(dw, rdw, dtype, name="dweight")
    assert_close(db, rdb, dtype, name="dbias")
    assert not set(seen) & set(ONE_CALL), seen
    assert "infer_tiled" in seen and "backward_tiled" in seen, seen


@pytest.mark.parametrize("shape, axis", [((1, 2, 1, 2), 1), ((8, 64, 1, 1), 1), ((4, 1, 5), 1),
                                         ((1, 1, 7, 3), 3), ((3, 5, 1), 1)])
def test_unit_axes_keep_the_callers_order(shape, axis):
    """Axes of size 1 carry no stride information; a C-contiguous array with some still maps
    onto the kernel view by a plain reshape (the fast paths of ``_layout.Plan``), and its
    results match the reference."""
    from fastbn import _layout

    x = like(np.empty(shape, np.float32), "unit-axes", axis)
    p = _layout.plan(x, axis)
    assert p.trivial, p.perm
    N = int(np.prod(shape[:axis]))
    S = int(np.prod(shape[axis + 1:]))
    assert p.shape3 == ((N, shape[axis]) if S == 1 else (N, shape[axis], S))
    if int(np.prod(shape)) // shape[axis] > 1:
        w, b = params(shape[axis], np.float32)[:2]
        y = fastbn.batch_norm_train(x, w, b, axis=axis)[0]
        ry, _, rinv = ref.batch_norm_train(x, w, b, axis=axis)
        assert_close(y, ry, np.float32, slack=input_precision_slack(x, rinv, w))


# Parameters of more channels than merge.PARAM_CHUNK are prepared in chunks, in parallel; the
# float32 lanes must still be taken for every channel or for none.  Two rows (the one-call
# kernel), eight (the tiled pass in one call, falling back to the Python-driven pass for
# float64 lanes) and channels-first runs of three values (the same, channels-first); a channel
# past the first chunk whose weight needs float64 lanes, or none.
@pytest.mark.parametrize("shape", [(2, None), (8, None), (4, None, 3)])
@pytest.mark.parametrize("huge", [None, 4500])
def test_chunked_parameters_choose_lanes_for_every_channel(shape, huge):
    from fastbn._kernels import merge

    C = 5000
    assert C > 2 * merge.PARAM_CHUNK and (huge is None or huge >= merge.PARAM_CHUNK)
    shape = tuple(C if n is None else n for n in shape)
    rng = np.random.default_rng(11)
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    m = rng.standard_normal(C).astype(np.float32)
    v = (rng.random(C) + 0.5).astype(np.float32)
    w = (rng.random(C) + 0.5).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    if huge is not None:
        w[huge] = 1e32
    y = fastbn.batch_norm_infer(x, m, v, w, b, eps=1e-5)
    if x.ndim == 3:  # per-channel values along axis 1
        m, v, w, b = (a[:, None] for a in (m, v, w, b))
    scale = 1.0 / np.sqrt(v.astype(np.float64) + 1e-5) * w
    if huge is None:  # float32 lanes: the centre rounded to float32, its rounding in the shift
        c32 = m.astype(np.float32)
        shift = (b - scale * (m.astype(np.float64) - c32)).astype(np.float32)
        expected = (x - c32) * scale.astype(np.float32) + shift
    else:  # float64 lanes for every channel, the first chunk's too
        expected = ((x - m.astype(np.float64)) * scale + b).astype(np.float32)
    np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, tiled", [((8, 32, 32, 3), True), ((8192, 1), True),
                                          ((2048, 3), False), ((4096, 4), False)])
def test_narrow_channels_last_rows_route(monkeypatch, shape, tiled, dtype):
    """Small channels-last tensors of fewer than 4 channels take the tiled passes (rows viewed
    several at a time) from 8192 values, for statistics, training and inference; backward, and
    smaller tensors or wider rows, keep the one-call kernels.  Every route matches the
    reference."""
    seen = []
    for name in ("stats_small", "train_small", "infer_small", "backward_small"):
        kernel = getattr(F._cl, name)

        def spy(size, *args, _kernel=kernel, _name=name):
            seen.append(_name)
            return _kernel(size, *args)

        monkeypatch.setattr(F._cl, name, spy)
    x, axis = _input(shape, -1, dtype)
    C = shape[-1]
    w, b, rm, rv = params(C, dtype, "paths")
    mean, var = fastbn.channel_stats(x, axis=axis)
    rmean, rvar = ref.channel_stats(x, axis)
    assert_close(mean, rmean, dtype, name="mean")
    assert_close(var, rvar, dtype, name="var")
    y, bmean, invstd = fastbn.batch_norm_train(x, w, b, axis=axis)
    ry, _, rinvstd = ref.batch_norm_train(x, w, b, axis=axis)
    assert_close(y, ry, dtype, slack=input_precision_slack(x, rinvstd, w), name="y")
    assert_close(fastbn.batch_norm_infer(x, rm, rv, w, b, axis=axis),
                 ref.batch_norm_infer(x, rm, rv, w, b, axis=axis), dtype, name="infer")
    assert seen == ([] if tiled else ["stats_small", "train_small", "infer_small"]), seen
    dy = like(x, "paths dy")
    dx, dw, db = fastbn.batch_norm_backward(dy, x, bmean, invstd, w, axis=axis)
    rdx, rdw, rdb = ref.batch_norm_backward(dy, x, bmean, invstd, w, axis=axis)
    assert_close(dx, rdx, dtype, slack=input_precision_slack(x, rinvstd, w), name="dx")
    assert_close(dw, rdw, dtype, name="dweight")
    assert_close(db, rdb, dtype, name="dbias")
    assert seen[-1] == "backward_small", seen


# channels-last rows of 1 to HOIST_LINES + 1 cache lines, whole or with a scalar tail: in the
# tiled passes rows of up to HOIST_LINES lines keep the per-element parameters in registers
# (simd._run_intrinsic with hoist), a separate code path per length
def _row_lengths(dtype):
    line = 64 // np.dtype(dtype).itemsize
    return [k * line + t for k in range(1, simd.HOIST_LINES + 2) for t in (0, 3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("route", ["one_call", "tiled"])
def test_channels_last_rows_of_every_length(monkeypatch, route, dtype):
    if route == "tiled":  # past the one-call sizes
        monkeypatch.setattr(_config, "SERIAL_BELOW", 1)
        monkeypatch.setattr(F, "_FUSED_BLOCK_BYTES", 0)
    rng = np.random.default_rng(11)
    for C in _row_lengths(dtype):
        x = (rng.standard_normal((37, C)) * 3 + 1).astype(dtype)
        dy = rng.standard_normal(x.shape).astype(dtype)
        # parameters different in every channel: one line's taken for another's shows
        w, b, rm, rv = params(C, dtype, "rows")
        for activation in (None, "relu"):
            assert_close(fastbn.batch_norm_infer(x, rm, rv, w, b, axis=-1, activation=activation),
                         ref.batch_norm_infer(x, rm, rv, w, b, axis=-1, activation=activation),
                         dtype, name=f"y, {C} channels")
        y, mean, invstd = fastbn.batch_norm_train(x, w, b, axis=-1)
        ry, _, rinvstd = ref.batch_norm_train(x, w, b, axis=-1)
        slack = input_precision_slack(x, rinvstd, w)
        assert_close(y, ry, dtype, slack=slack, name=f"train y, {C} channels")
        for training in (True, False):
            dx = fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=-1, training=training)[0]
            rdx = ref.batch_norm_backward(dy, x, mean, invstd, w, axis=-1, training=training)[0]
            assert_close(dx, rdx, dtype, slack=slack, name=f"dx, {C} channels")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, kernel", [((32, 256, 4, 4), "train_small_grouped"),
                                           ((64, 410, 5), "train_small_grouped"),
                                           ((48, 400, 2, 2, 2), "train_small_grouped"),
                                           ((40, 300, 3, 2, 2), "train_small_grouped"),
                                           ((256, 40, 13), "train_tiled")])
@pytest.mark.parametrize("case", ["plain", "far mean", "huge weight", "nonfinite", "strided out"])
def test_short_runs_train_as_rows(monkeypatch, shape, kernel, dtype, case):
    """Channels-first runs of at most 16 values, 32 samples or more, 2**17 values or more
    (``functional._runs_as_rows``): forward training takes each sample as a row of ``C * S``
    values through a channels-last kernel with ``G = S`` (blocks of whole channels below 256
    rows, else the tiled passes), the columns' moments merged per channel (Chan), the
    parameters spread back over the columns.  Checked against the reference, the running
    statistics too (their unbiased variance counts ``N * S`` values), with data far from 0
    (the merge must not cancel), a weight of 1e32 (float64 lanes; the tiled kernel leaves
    the elementwise pass to Python), and infinities and NaN in some channels (as the
    channels-first route gives them).  An ``out`` whose samples are not one row of memory
    takes the channels-first route."""
    seen = _spy_columns(monkeypatch, ("train_small", "train_small_grouped", "train_tiled"))
    x, _ = _input(shape, 1, dtype)
    C, S = shape[1], int(np.prod(shape[2:]))
    if case == "far mean":
        x += dtype(1e4)
    if case == "nonfinite":
        x[3, 7].flat[2] = np.inf
        x[1, 9].flat[0] = np.nan
        x[0, 11].flat[1] = -np.inf
        x[5, 11].flat[0] = np.inf
        x[2, 12].flat[S - 1] = np.inf
        x[4, 12].flat[0] = np.inf
    w, b, rm, rv = params(C, dtype, "paths")
    if case == "huge weight":
        w = w * dtype(1e32)
    out = None
    if case == "strided out":
        out = np.zeros(shape[:1] + (2 * C,) + shape[2:], dtype)[:, ::2]
    y, mean, invstd = fastbn.batch_norm_train(x, w, b, out=out)
    assert seen == ([(kernel, S)] if case != "strided out" else []), seen
    if out is not None:
        assert y is out
    if case == "nonfinite":  # against the channels-first route
        monkeypatch.setattr(F, "_RUNS_AS_ROWS_MAX", 0)
        for got, want in zip((y, mean, invstd), fastbn.batch_norm_train(x, w, b)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert np.isnan(mean[[9, 11]]).all() and (mean[[7, 12]] == np.inf).all(), mean
        return
    ry, rmean, rinvstd = ref.batch_norm_train(x, w, b)
    assert_close(y, ry, dtype, slack=input_precision_slack(x, rinvstd, w), name="y")
    assert_close(mean, rmean, dtype, name="mean")
    assert_close(invstd, rinvstd, dtype, name="invstd")
    got_m, got_v = rm.copy(), rv.copy()
    fastbn.batch_norm(x, got_m, got_v, w, b, training=True)
    _, want_m, want_v = ref.batch_norm(x, rm, rv, w, b, training=True)
    assert_close(got_m, want_m, dtype, name="running_mean")
    assert_close(got_v, want_v, dtype, name="running_var")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, kernel", [((32, 256, 4, 4), "backward_small_grouped"),
                                           ((64, 128, 4, 4), "backward_small_grouped"),
                                           ((64, 410, 5), "backward_small_grouped"),
                                           ((64, 300, 2, 2, 2), "backward_small_grouped"),
                                           ((256, 40, 13), "backward_tiled")])
@pytest.mark.parametrize("case", ["plain", "huge weight", "strided out"])
def test_short_runs_backward_as_rows(monkeypatch, shape, kernel, dtype, case):
    """Channels-first runs of at most 16 values, 32 samples or more, 2**17 values or more
    (``functional._runs_as_rows``): training-mode backward takes each sample as a row of
    ``C * S`` values through a channels-last kernel with ``G = S`` (blocks of whole channels
    below 256 rows, else the tiled passes), its column sums added up per channel, its
    parameters spread back over the columns (a weight of 1e32 takes float64 lanes, and in the
    tiled passes leaves the elementwise pass to Python with them).  An ``out`` whose samples
    are not one row of memory takes the channels-first route.  All match the reference."""
    seen = _spy_columns(monkeypatch, ("backward_small", "backward_small_grouped",
                                      "backward_tiled"))
    x, axis = _input(shape, 1, dtype)
    C, S = shape[1], int(np.prod(shape[2:]))
    w, _, _, _ = params(C, dtype, "paths")
    if case == "huge weight":
        w = w * dtype(1e32)
    dy = like(x, "paths dy")
    rmean, rvar = ref.channel_stats(x)
    mean = rmean.astype(dtype)
    invstd = (1.0 / np.sqrt(rvar + 1e-5)).astype(dtype)
    out = None
    if case == "strided out":
        out = np.zeros(shape[:1] + (2 * C,) + shape[2:], dtype)[:, ::2]
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, w, out=out)
    as_rows = case != "strided out"
    assert seen == ([(kernel, S)] if as_rows else []), seen
    if out is not None:
        assert dx is out
    rdx, rdw, rdb = ref.batch_norm_backward(dy, x, mean, invstd, w)
    slack = input_precision_slack(x, invstd.astype(np.float64), w)
    assert_close(dx, rdx, dtype, slack=slack, name="dx")
    assert_close(dw, rdw, dtype, name="dweight")
    assert_close(db, rdb, dtype, name="dbias")
