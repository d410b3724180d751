"""Bad input: every public function and layer refuses it with ValueError or TypeError whose message
names the offending argument, and leaves everything the caller passed untouched (arrays, running
statistics, layer state).

Exception types: the spec says "ValueError or TypeError"; where the kind of mistake makes one of
them the obvious choice (a bad value or shape -> ValueError, a non-float dtype or a non-integer
axis -> TypeError, as NumPy does) the test asserts that one; for dtype mismatches of otherwise
valid float arrays (``out`` of the other float dtype) either is accepted.
"""

import builtins

import inputs
import numpy as np
import pytest
from util import Unchanged

import fastbn

VE, TE, EITHER = ValueError, TypeError, (ValueError, TypeError)
X_NAME = r"\bx\b"
LAYER_INPUT = r"(?i)\bx\b|input"
ONE_VALUE = "Expected more than 1 value per channel when training"
C = 3


def x4(shape=(4, C, 3, 3), dtype=np.float32):
    return inputs._randn(inputs.rng_for("errors", shape), shape, 1, dtype)


def vec(n=C, dtype=np.float32, lo=-1.0, hi=1.0):
    return inputs.rng_for("errors-vec", n).uniform(lo, hi, n).astype(dtype)


def stats(n=C, dtype=np.float32):
    return vec(n, dtype), vec(n, dtype, 0.5, 2.0)


CASES = []


def case(case_id, exc, match):
    """Register a bad-input case.  The function returns (callable, args, kwargs[, layer])."""
    def register(build):
        CASES.append(pytest.param(build, exc, match, id=case_id))
        return build
    return register


def _cs(x, **kw):
    return fastbn.channel_stats, (x,), kw


def _train(x, *args, **kw):
    return fastbn.batch_norm_train, (x,) + args, kw


def _infer(x, rm, rv, *args, **kw):
    return fastbn.batch_norm_infer, (x, rm, rv) + args, kw


def _bn(x, rm, rv, *args, **kw):
    return fastbn.batch_norm, (x, rm, rv) + args, kw


def _bwd(dy, x, mean, invstd, *args, **kw):
    return fastbn.batch_norm_backward, (dy, x, mean, invstd) + args, kw


# ---- input rank ------------------------------------------------------------------------------
case("stats-0d", VE, X_NAME)(lambda: _cs(np.array(1.0)))
case("stats-1d", VE, X_NAME)(lambda: _cs(np.ones(8)))
case("stats-6d", VE, X_NAME)(lambda: _cs(np.ones((2, 2, 2, 2, 2, 2))))
case("train-1d", VE, X_NAME)(lambda: _train(np.ones(8, np.float32)))
case("train-6d", VE, X_NAME)(lambda: _train(np.ones((2, 2, 2, 2, 2, 2), np.float32)))
case("infer-0d", VE, X_NAME)(lambda: _infer(np.array(1.0, np.float32), *stats(1)))
case("backward-1d", VE, r"\b(x|dy)\b")(
    lambda: _bwd(np.ones(6, np.float32), np.ones(6, np.float32), *stats(6)))
case("batch_norm-6d", VE, X_NAME)(
    lambda: _bn(np.ones((2, 3, 2, 2, 2, 2), np.float32), *stats(), training=True))

# ---- axis ------------------------------------------------------------------------------------
case("stats-axis-4-of-4d", VE, "axis")(lambda: _cs(x4(), axis=4))
case("stats-axis--5-of-4d", VE, "axis")(lambda: _cs(x4(), axis=-5))
case("train-axis-float", TE, "axis")(lambda: _train(x4(), axis=1.0))
case("train-axis-str", TE, "axis")(lambda: _train(x4(), axis="1"))
case("infer-axis-out-of-range", VE, "axis")(lambda: _infer(x4(), *stats(), axis=7))
case("backward-axis-none", TE, "axis")(
    lambda: _bwd(x4(), x4(), *stats(), axis=None))

# ---- dtype of x ------------------------------------------------------------------------------
case("stats-int64", TE, X_NAME)(lambda: _cs(np.ones((4, C, 2), np.int64)))
case("stats-bool", TE, X_NAME)(lambda: _cs(np.ones((4, C, 2), bool)))
case("train-complex", TE, X_NAME)(lambda: _train(np.ones((4, C, 2), np.complex128)))
case("train-object", TE, X_NAME)(lambda: _train(np.ones((4, C, 2), object)))
case("train-float16", TE, X_NAME)(lambda: _train(np.ones((4, C, 2), np.float16)))
case("infer-int32", TE, X_NAME)(lambda: _infer(np.ones((4, C, 2), np.int32), *stats()))
case("backward-x-int", TE, X_NAME)(
    lambda: _bwd(x4(), np.ones((4, C, 3, 3), np.int64), *stats()))
case("batch_norm-uint8", TE, X_NAME)(
    lambda: _bn(np.ones((4, C, 2), np.uint8), *stats(), training=True))

# ---- per-channel parameters --------------------------------------------------------------------
case("train-weight-too-long", VE, "weight")(lambda: _train(x4(), vec(C + 1)))
case("train-bias-too-short", VE, "bias")(lambda: _train(x4(), vec(), vec(C - 1)))
case("train-weight-2d", VE, "weight")(lambda: _train(x4(), vec().reshape(1, C)))
case("train-weight-int", TE, "weight")(lambda: _train(x4(), np.ones(C, np.int64)))
case("train-bias-complex", TE, "bias")(lambda: _train(x4(), vec(), np.ones(C, complex)))
case("infer-running_mean-shape", VE, "running_mean")(
    lambda: _infer(x4(), vec(C + 2), stats()[1]))
case("infer-running_var-shape", VE, "running_var")(
    lambda: _infer(x4(), stats()[0], vec(C - 1, lo=0.5)))
case("infer-running_var-None", EITHER, "running_var")(lambda: _infer(x4(), stats()[0], None))
case("infer-running_mean-int", TE, "running_mean")(
    lambda: _infer(x4(), np.zeros(C, np.int64), stats()[1]))
case("infer-weight-channel-mismatch-axis-1", VE, "weight")(
    lambda: _infer(x4((4, 3, 3, 5)), *stats(5), vec(C), axis=-1))
case("backward-weight-shape", VE, "weight")(lambda: _bwd(x4(), x4(), *stats(), vec(C + 1)))

# ---- eps / momentum / method / activation ------------------------------------------------------
case("train-eps-0", VE, "eps")(lambda: _train(x4(), eps=0.0))
case("train-eps-negative", VE, "eps")(lambda: _train(x4(), eps=-1e-5))
case("train-eps-nan", VE, "eps")(lambda: _train(x4(), eps=float("nan")))
case("infer-eps-0", VE, "eps")(lambda: _infer(x4(), *stats(), eps=0))
case("infer-eps-nan", VE, "eps")(lambda: _infer(x4(), *stats(), eps=np.nan))
case("batch_norm-eps-negative", VE, "eps")(lambda: _bn(x4(), *stats(), training=True, eps=-1.0))
case("batch_norm-momentum-negative", VE, "momentum")(
    lambda: _bn(x4(), *stats(), training=True, momentum=-0.1))
case("batch_norm-momentum-above-1", VE, "momentum")(
    lambda: _bn(x4(), *stats(), training=True, momentum=1.5))
case("batch_norm-momentum-nan", VE, "momentum")(
    lambda: _bn(x4(), *stats(), training=True, momentum=float("nan")))
case("batch_norm-momentum-None", EITHER, "momentum")(
    lambda: _bn(x4(), *stats(), training=True, momentum=None))
case("stats-method-unknown", VE, "method")(lambda: _cs(x4(), method="fast"))
case("stats-method-case", VE, "method")(lambda: _cs(x4(), method="Welford"))
case("infer-activation-unknown", VE, "activation")(
    lambda: _infer(x4(), *stats(), activation="gelu"))

# ---- training needs > 1 value per channel; empty batch ------------------------------------------
case("train-one-value-2d", VE, ONE_VALUE)(lambda: _train(x4((1, C))))
case("train-one-value-4d", VE, ONE_VALUE)(lambda: _train(x4((1, C, 1, 1))))
case("train-one-value-axis-1", VE, ONE_VALUE)(lambda: _train(x4((1, 1, C)), axis=-1))
case("batch_norm-one-value", VE, ONE_VALUE)(lambda: _bn(x4((1, C, 1)), *stats(), training=True))
case("train-empty-batch", VE, X_NAME)(lambda: _train(np.ones((0, C, 4, 4), np.float32)))
case("batch_norm-empty-batch", VE, X_NAME)(
    lambda: _bn(np.ones((0, C, 4), np.float32), *stats(), training=True))
case("batch_norm-eval-without-running-stats", EITHER, "running_mean|running_var")(
    lambda: _bn(x4(), None, None, training=False))

# ---- out -------------------------------------------------------------------------------------
case("train-out-shape", VE, r"\bout\b")(lambda: _train(x4(), out=np.empty((4, C, 3, 4), np.float32)))
case("train-out-dtype", EITHER, r"\bout\b")(lambda: _train(x4(), out=np.empty((4, C, 3, 3))))
case("train-out-int", TE, r"\bout\b")(lambda: _train(x4(), out=np.empty((4, C, 3, 3), np.int32)))
case("infer-out-shape", VE, r"\bout\b")(lambda: _infer(x4(), *stats(), out=np.empty((4, C, 9), np.float32)))
case("backward-out-dtype", EITHER, r"\bout\b")(
    lambda: _bwd(x4(), x4(), *stats(), out=np.empty((4, C, 3, 3), np.float64)))
case("batch_norm-out-shape", VE, r"\bout\b")(
    lambda: _bn(x4(), *stats(), training=True, out=np.empty((4, C + 1, 3, 3), np.float32)))

# ---- backward arguments ------------------------------------------------------------------------
case("backward-dy-shape", VE, r"\bdy\b")(lambda: _bwd(x4((4, C, 3, 2)), x4(), *stats()))
case("backward-dy-int", TE, r"\bdy\b")(lambda: _bwd(np.ones((4, C, 3, 3), np.int64), x4(), *stats()))
case("backward-mean-shape", VE, r"\bmean\b")(lambda: _bwd(x4(), x4(), vec(C + 1), stats()[1]))
case("backward-invstd-shape", VE, r"\binvstd\b")(lambda: _bwd(x4(), x4(), stats()[0], vec(1)))
case("backward-invstd-None", EITHER, r"\binvstd\b")(lambda: _bwd(x4(), x4(), stats()[0], None))


# ---- batch_norm in training: a failing call must not touch the running statistics --------------
case("batch_norm-running_var-shape", VE, "running_var")(
    lambda: _bn(x4(), vec(), vec(C + 1, lo=0.5), training=True))
case("batch_norm-running_mean-int", TE, "running_mean")(
    lambda: _bn(x4(), np.zeros(C, np.int64), stats()[1], training=True))
case("batch_norm-running_var-readonly", VE, "running_var")(
    lambda: _bn(x4(), vec(), _readonly(stats()[1]), training=True))
case("batch_norm-bias-shape-training", VE, "bias")(
    lambda: _bn(x4(), *stats(), vec(), vec(C + 3), training=True))


def _readonly(a):
    a.flags.writeable = False
    return a


# ---- layers ----------------------------------------------------------------------------------
def _layer_call(layer, x):
    return layer, (x,), {}, layer


case("layer-num_features-0", VE, "num_features")(lambda: (fastbn.BatchNorm2d, (0,), {}))
case("layer-num_features-negative", VE, "num_features")(lambda: (fastbn.BatchNorm, (-3,), {}))
case("layer-num_features-float", TE, "num_features")(lambda: (fastbn.BatchNorm1d, (2.5,), {}))
case("layer-eps-0", VE, "eps")(lambda: (fastbn.BatchNorm2d, (3,), {"eps": 0.0}))
case("layer-momentum-2", VE, "momentum")(lambda: (fastbn.BatchNorm2d, (3,), {"momentum": 2.0}))
case("layer-momentum-nan", VE, "momentum")(
    lambda: (fastbn.BatchNorm3d, (3,), {"momentum": float("nan")}))
case("layer-dtype-int", TE, "dtype")(lambda: (fastbn.BatchNorm, (3,), {"dtype": np.int32}))
case("layer-axis-float", TE, "axis")(lambda: (fastbn.BatchNorm, (3,), {"axis": 1.5}))
case("layer2d-3d-input", VE, LAYER_INPUT)(lambda: _layer_call(fastbn.BatchNorm2d(C), x4((4, C, 5))))
case("layer2d-5d-input", VE, LAYER_INPUT)(
    lambda: _layer_call(fastbn.BatchNorm2d(C), x4((2, C, 2, 2, 2))))
case("layer1d-4d-input", VE, LAYER_INPUT)(lambda: _layer_call(fastbn.BatchNorm1d(C), x4()))
case("layer1d-1d-input", VE, LAYER_INPUT)(
    lambda: _layer_call(fastbn.BatchNorm1d(C), np.ones(C, np.float32)))
case("layer3d-4d-input", VE, LAYER_INPUT)(lambda: _layer_call(fastbn.BatchNorm3d(C), x4()))
case("layer2d-channel-count", VE, r"(?i)channel|num_features|\bx\b|input")(
    lambda: _layer_call(fastbn.BatchNorm2d(C + 1), x4()))
case("layer-channels-last-count", VE, r"(?i)channel|num_features|\bx\b|input")(
    lambda: _layer_call(fastbn.BatchNorm(C, axis=-1), x4((4, C, 3, 5))))
case("layer-int-input", TE, LAYER_INPUT)(
    lambda: _layer_call(fastbn.BatchNorm2d(C), np.ones((4, C, 2, 2), np.int64)))
case("layer-training-one-value", VE, ONE_VALUE)(
    lambda: _layer_call(_trained(fastbn.BatchNorm2d(C)), x4((1, C, 1, 1))))
case("layer-training-one-value-momentum-None", VE, ONE_VALUE)(
    lambda: _layer_call(_trained(fastbn.BatchNorm1d(C, momentum=None)), x4((1, C))))
case("layer-training-empty-batch", VE, LAYER_INPUT)(
    lambda: _layer_call(_trained(fastbn.BatchNorm2d(C)), np.ones((0, C, 2, 2), np.float32)))
case("layer-backward-before-forward", EITHER, "forward")(
    lambda: (fastbn.BatchNorm2d(C).backward, (x4(),), {}))
case("layer-backward-dy-shape", VE, r"\bdy\b")(lambda: _backward_wrong_dy())


def _trained(layer):
    """A layer with a non-default state (one training step)."""
    shape = (4, layer.num_features) + ((3, 3) if isinstance(layer, fastbn.BatchNorm2d) else ())
    layer(x4(shape))
    return layer


def _backward_wrong_dy():
    layer = fastbn.BatchNorm2d(C)
    layer(x4())
    return layer.backward, (x4((4, C, 3, 2)),), {}, layer


# ---- load_state_dict: strict, all or nothing ----------------------------------------------------
def _sd(layer):
    return {k: np.array(v, copy=True) for k, v in layer.state_dict().items()}


def _load(mutate):
    layer = _trained(fastbn.BatchNorm2d(C))
    sd = _sd(layer)
    for k in ("weight", "bias", "running_mean", "running_var"):  # all valid, all different
        sd[k] = sd[k] + np.float32(0.5) if k != "running_var" else sd[k] * np.float32(2)
    sd["num_batches_tracked"] = np.array(7, np.int64)
    mutate(sd)
    return layer.load_state_dict, (sd,), {}, layer


def _drop(key):
    return lambda sd: sd.pop(key)


def _set(key, value):
    return lambda sd: sd.__setitem__(key, value)


case("load_state_dict-missing-running_var", EITHER, "running_var")(
    lambda: _load(_drop("running_var")))
case("load_state_dict-missing-weight", EITHER, "weight")(lambda: _load(_drop("weight")))
case("load_state_dict-extra-key", EITHER, "momentum_buffer")(
    lambda: _load(_set("momentum_buffer", np.zeros(C, np.float32))))
case("load_state_dict-running_var-shape", VE, "running_var")(
    lambda: _load(_set("running_var", np.ones(C + 1, np.float32))))
case("load_state_dict-num_batches_tracked-shape", EITHER, "num_batches_tracked")(
    lambda: _load(_set("num_batches_tracked", np.array([1, 2], np.int64))))
case("load_state_dict-bias-int", TE, "bias")(lambda: _load(_set("bias", np.zeros(C, np.int64))))


def _evil_file():
    import tempfile
    path = tempfile.mkdtemp() + "/evil.npz"
    fastbn.BatchNorm2d(2).save(path)
    with np.load(path, allow_pickle=False) as npz:
        contents = {k: npz[k] for k in npz.files}
    contents["weight"] = np.array([_Evil(), _Evil()], dtype=object)
    np.savez(path, **contents)
    return path


class _Evil:
    def __reduce__(self):
        return (exec, ("import builtins; builtins._fastbn_errors_pwned = True",))


case("load-pickled-npz", EITHER, r"(?i)pickle|object")(lambda: (fastbn.load, (_evil_file(),), {}))


# ---- found by an audit of odd inputs -----------------------------------------------------------
def _out_like_weight():
    """(dy, x, mean, invstd, weight, out) with ``weight`` a view into ``out``'s memory."""
    x, dy = x4((4, C, 5)), x4((4, C, 5)) * 0.5
    out = np.zeros_like(x)
    weight = out.reshape(-1)[:C]
    weight[:] = vec()
    return dy, x, *stats(), weight, out


case("batch_norm-running-stats-list-training", TE, "running_mean")(
    lambda: _bn(x4(), [0.0] * C, [1.0] * C, training=True))
case("backward-out-overlaps-weight", VE, "weight")(
    lambda: (lambda a: _bwd(*a[:5], out=a[5]))(_out_like_weight()))
case("backward-out-overlaps-mean", VE, "mean")(
    lambda: (lambda x, o: _bwd(x, x, o.reshape(-1)[:C], stats()[1], out=o))(x4(), np.zeros_like(x4())))
case("batch_norm-out-overlaps-running_var", VE, "running_var")(
    lambda: (lambda o: _bn(x4(), stats()[0], o.reshape(-1)[:C], training=True, out=o))(
        np.ones_like(x4())))
case("train-out-zero-stride", VE, "out")(
    lambda: _train(x4((4, C)), out=np.lib.stride_tricks.as_strided(
        np.zeros(C, np.float32), (4, C), (0, 4))))
case("train-out-overlapping-strides", VE, "out")(
    lambda: (lambda b: _train(np.ones((4, C), np.float32), out=np.lib.stride_tricks.as_strided(
        b, (4, C), (8, 4))))(np.zeros(12, np.float32)))
case("backward-training-none", TE, "training")(lambda: _bwd(x4(), x4(), *stats(), training=None))
case("backward-training-str", TE, "training")(lambda: _bwd(x4(), x4(), *stats(), training="no"))
case("backward-training-array", TE, "training")(
    lambda: _bwd(x4(), x4(), *stats(), training=np.array([1, 0])))
case("batch_norm-training-str", TE, "training")(lambda: _bn(x4(), *stats(), training="no"))
case("stats-masked", TE, X_NAME)(lambda: _cs(np.ma.array(np.ones((3, 2)), mask=[[0, 0], [0, 0], [1, 0]])))
case("train-out-masked", TE, "out")(
    lambda: _train(x4(), out=np.ma.masked_array(np.zeros_like(x4()), mask=False)))
case("infer-out-masked", TE, "out")(
    lambda: _infer(x4(), *stats(), out=np.ma.masked_array(np.zeros_like(x4()), mask=False)))
case("train-out-byte-order", TE, "native byte order")(
    lambda: _train(x4(), out=np.zeros_like(x4()).astype(x4().dtype.newbyteorder())))
case("infer-running_mean-masked", TE, "running_mean")(
    lambda: _infer(x4(), np.ma.array(stats()[0]), stats()[1]))
case("train-eps-str", TE, "eps")(lambda: _train(x4(), eps="1e-5"))
case("train-eps-bool", TE, "eps")(lambda: _train(x4(), eps=True))
case("batch_norm-momentum-str", TE, "momentum")(
    lambda: _bn(x4(), *stats(), training=True, momentum="0.1"))


def _update(*, count=8, momentum=0.1, running=None, mean=None, var=None):
    rm, rv = stats() if running is None else running
    m, v = stats() if mean is None else (mean, var)
    return fastbn.update_running_stats, (rm, rv, m, v, count, momentum), {}


case("update-count-1", VE, "count")(lambda: _update(count=1))
case("update-count-0", VE, "count")(lambda: _update(count=0))
case("update-count-float", TE, "count")(lambda: _update(count=2.5))
case("update-momentum-5", VE, "momentum")(lambda: _update(momentum=5))
case("update-momentum-none", TE, "momentum")(lambda: _update(momentum=None))
case("update-running-list", TE, "running_mean")(lambda: _update(running=([0.0] * C, stats()[1])))
case("update-running-int", TE, "running_var")(
    lambda: _update(running=(stats()[0], np.ones(C, np.int64))))
case("update-var-length", VE, "var")(lambda: _update(mean=vec(), var=vec(C + 1, lo=0.5)))


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def _bad_layer_file(config):
    import tempfile
    d = tempfile.mkdtemp()
    return _npz(f"{d}/layer.npz", __config__=np.array(config))


for _i, _cfg in enumerate(['{}', '[1]', '{"class": [1], "num_features": 3}', 'not json',
                           '{"class": "BatchNorm2d", "num_features": 3, "colour": 1}',
                           '{"class": "BatchNorm2d", "num_features": 3, "eps": "x"}']):
    case(f"load-bad-config-{_i}", VE, "layer")(
        lambda c=_cfg: (fastbn.load, (_bad_layer_file(c),), {}))


def _npy_file():
    import tempfile
    path = f"{tempfile.mkdtemp()}/plain.npy"
    np.save(path, np.ones(3))
    return path


case("load-npy", VE, "layer file")(lambda: (fastbn.load, (_npy_file(),), {}))
case("layer-affine-str", TE, "affine")(lambda: (fastbn.BatchNorm2d, (C,), {"affine": "no"}))
case("layer-train-str", VE, "boolean")(
    lambda: (lambda layer: (layer.train, ("no",), {}, layer))(fastbn.BatchNorm2d(C)))


def _huge_count_state():
    layer = fastbn.BatchNorm2d(C)
    sd = layer.state_dict()
    sd["num_batches_tracked"] = np.uint64(2**63 + 5)
    return layer.load_state_dict, (sd,), {}, layer


case("load_state_dict-count-overflow", VE, "num_batches_tracked")(_huge_count_state)


# ---- the test --------------------------------------------------------------------------------

def _layer_state(layer):
    return ({k: np.array(v, copy=True) for k, v in layer.state_dict().items()}, layer.training)


@pytest.mark.parametrize("build, exc, match", CASES)
def test_bad_input(build, exc, match):
    spec = build()
    func, args, kwargs = spec[:3]
    layer = spec[3] if len(spec) > 3 else None
    arrays = list(args) + list(kwargs.values())
    arrays += [v for a in arrays if isinstance(a, dict) for v in a.values()]  # state dicts
    keep = Unchanged(*arrays)
    before = _layer_state(layer) if layer is not None else None
    with pytest.raises(exc, match=match):
        func(*args, **kwargs)
    keep.check()  # nothing the caller passed was modified (running stats included)
    if layer is not None:  # and a layer's state is untouched (no partial update / load)
        sd, training = _layer_state(layer)
        assert training == before[1]
        assert set(sd) == set(before[0])
        for k in sd:
            np.testing.assert_array_equal(sd[k], before[0][k], err_msg=f"layer {k} changed")
    assert not getattr(builtins, "_fastbn_errors_pwned", False)


def test_enough_cases():
    assert len(CASES) >= 40
