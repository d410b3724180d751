"""Stateful layers: fastbn.BatchNorm / BatchNorm1d / 2d / 3d.

A 5-step train/eval sequence from one initial state, against the reference layer
(tests/reference.py, float64) and against torch.nn.BatchNorm*d loaded with the same state:
outputs, running statistics, num_batches_tracked, and gradients (layer.backward vs autograd).
Then state_dict / load_state_dict, .npz save/load, and refusal of pickled .npz files.
"""

import os

import inputs
import numpy as np
import pytest
import reference as ref
from util import Unchanged, assert_close

import fastbn

STEPS = ["train", "train", "eval", "train", "eval"]

# name: (fastbn class, torch class name, input shape, axis of the fastbn layer)
LAYERS = {
    "1d_nc": ("BatchNorm1d", "BatchNorm1d", (12, 5), 1),
    "1d_ncl": ("BatchNorm1d", "BatchNorm1d", (6, 5, 7), 1),
    "2d": ("BatchNorm2d", "BatchNorm2d", (4, 5, 4, 6), 1),
    "3d": ("BatchNorm3d", "BatchNorm3d", (2, 5, 3, 4, 3), 1),
    "generic_axis-1": ("BatchNorm", "BatchNorm2d", (4, 4, 6, 5), -1),
}
CONFIGS = {  # (affine, track_running_stats)
    "affine-track": (True, True),
    "noaffine-track": (False, True),
    "affine-notrack": (True, False),
    "noaffine-notrack": (False, False),
}


def _make_layer(name, C, dtype=np.float32, **kw):
    cls_name, _, _, axis = LAYERS[name]
    cls = getattr(fastbn, cls_name)
    if cls_name == "BatchNorm":
        kw["axis"] = axis
    return cls(C, dtype=dtype, **kw)


def _initial_state(C, dtype, affine, track, *key):
    """A non-trivial state dict with PyTorch's keys and dtypes."""
    w, b, rm, rv = inputs.params(C, dtype, "layer-state", *key)
    sd = {}
    if affine:
        sd["weight"], sd["bias"] = w, b
    if track:
        sd["running_mean"], sd["running_var"] = rm, rv
        sd["num_batches_tracked"] = np.array(3, dtype=np.int64)
    return sd


def _batches(shape, axis, dtype, n, *key):
    """Seeded inputs for the steps: varying per-channel mean/scale, and upstream gradients."""
    rng = inputs.rng_for("layer-batches", shape, axis, np.dtype(dtype).name, *key)
    xs, dys = [], []
    for i in range(n):
        x = inputs._randn(rng, shape, axis, dtype, offset=0.5 * i)
        xs.append(x)
        dys.append(rng.standard_normal(shape).astype(dtype))
    return xs, dys


def _state(layer):
    sd = layer.state_dict()
    return {k: np.array(v, copy=True) for k, v in sd.items()}


def _assert_state_equal(a, b):
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "momentumNone"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", list(LAYERS))
def test_sequence_vs_reference(name, config, momentum):
    affine, track = CONFIGS[config]
    _, _, shape, axis = LAYERS[name]
    C = shape[axis]
    dt = np.float32
    layer = _make_layer(name, C, dt, momentum=momentum, affine=affine, track_running_stats=track)
    rlayer = ref.BatchNorm(C, momentum=momentum, affine=affine, track_running_stats=track,
                           axis=axis)
    sd = _initial_state(C, dt, affine, track, name, config)
    layer.load_state_dict({k: v.copy() for k, v in sd.items()})
    rlayer.load_state_dict(sd)
    xs, dys = _batches(shape, axis, dt, len(STEPS), name, config)
    for step, (mode, x, dy) in enumerate(zip(STEPS, xs, dys)):
        label = f"step {step} ({mode})"
        if mode == "train":
            layer.train()
        else:
            layer.eval()
        rlayer.training = mode == "train"
        assert layer.training == (mode == "train")
        keep = Unchanged(x, dy)
        y = layer(x)
        ry = rlayer(x)
        assert y.dtype == dt and y.shape == x.shape
        assert_close(y, ry, dt, name=f"y {label}")
        dx = layer.backward(dy)
        keep.check()
        rdx, rdw, rdb = rlayer.backward(dy)
        assert dx.dtype == dt and dx.shape == x.shape
        assert_close(dx, rdx, dt, name=f"dx {label}")
        if affine:
            assert_close(layer.grad_weight, rdw, dt, name=f"grad_weight {label}")
            assert_close(layer.grad_bias, rdb, dt, name=f"grad_bias {label}")
        if track:
            assert_close(layer.running_mean, rlayer.running_mean, dt, name=f"running_mean {label}")
            assert_close(layer.running_var, rlayer.running_var, dt, name=f"running_var {label}")
            assert int(layer.num_batches_tracked) == rlayer.num_batches_tracked, label


def _torch_module(torch, name, C, dtype, sd, **kw):
    _, tname, _, _ = LAYERS[name]
    m = getattr(torch.nn, tname)(C, **kw)
    m = m.double() if dtype == np.float64 else m
    if sd is not None:
        m.load_state_dict({k: torch.from_numpy(np.array(v, copy=True)) for k, v in sd.items()})
    return m


def _to_t(torch, a, axis):
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, axis, 1)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "momentumNone"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", list(LAYERS))
def test_sequence_vs_torch(name, config, momentum, dtype):
    torch = pytest.importorskip("torch")
    affine, track = CONFIGS[config]
    _, _, shape, axis = LAYERS[name]
    C = shape[axis]
    kw = {"momentum": momentum, "affine": affine, "track_running_stats": track}
    m = _torch_module(torch, name, C, dtype, None, **kw)
    with torch.no_grad():  # a non-trivial initial state, copied over through the state dict
        if affine:
            m.weight.uniform_(-1.5, 1.5)
            m.bias.uniform_(-1.0, 1.0)
        if track:
            m.running_mean.uniform_(-1.0, 1.0)
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(3)
    layer = _make_layer(name, C, dtype, **kw)
    tsd = {k: v.numpy().copy() for k, v in m.state_dict().items()}
    layer.load_state_dict(tsd)
    assert set(layer.state_dict()) == set(m.state_dict()), "state_dict keys differ from torch"
    xs, dys = _batches(shape, axis, dtype, len(STEPS), name, config, "torch")
    for step, (mode, x, dy) in enumerate(zip(STEPS, xs, dys)):
        label = f"step {step} ({mode})"
        m.train(mode == "train")
        if mode == "train":
            layer.train()
        else:
            layer.eval()
        m.zero_grad(set_to_none=True)
        xt = _to_t(torch, x, axis).requires_grad_(True)
        yt = m(xt)
        (yt * _to_t(torch, dy, axis)).sum().backward()
        y = layer(x)
        dx = layer.backward(dy)
        assert_close(y, np.moveaxis(yt.detach().numpy(), 1, axis), dtype, name=f"y {label}")
        assert_close(dx, np.moveaxis(xt.grad.numpy(), 1, axis), dtype, name=f"dx {label}")
        if affine:
            assert_close(layer.grad_weight, m.weight.grad.numpy(), dtype,
                         name=f"grad_weight {label}")
            assert_close(layer.grad_bias, m.bias.grad.numpy(), dtype, name=f"grad_bias {label}")
        if track:
            assert_close(layer.running_mean, m.running_mean.numpy(), dtype,
                         name=f"running_mean {label}")
            assert_close(layer.running_var, m.running_var.numpy(), dtype,
                         name=f"running_var {label}")
            assert int(layer.num_batches_tracked) == int(m.num_batches_tracked), label
    # the final state converts back into the torch module (same keys, shapes, dtypes)
    m2 = _torch_module(torch, name, C, dtype, layer.state_dict(), **kw)
    for k, v in m2.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), np.asarray(layer.state_dict()[k]), err_msg=k)


# --------------------------------------------------------------------------------------------
# defaults, modes, attributes
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls_name", ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"])
def test_defaults(cls_name):
    layer = getattr(fastbn, cls_name)(7)
    assert layer.training is True
    assert layer.weight.dtype == np.float32 and layer.weight.shape == (7,)
    np.testing.assert_array_equal(layer.weight, np.ones(7))
    np.testing.assert_array_equal(layer.bias, np.zeros(7))
    np.testing.assert_array_equal(layer.running_mean, np.zeros(7))
    np.testing.assert_array_equal(layer.running_var, np.ones(7))
    assert int(layer.num_batches_tracked) == 0
    sd = layer.state_dict()
    assert list(sd) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert all(isinstance(v, np.ndarray) for v in sd.values())
    assert sd["num_batches_tracked"].dtype == np.int64 and sd["num_batches_tracked"].shape == ()
    layer.eval()
    assert layer.training is False
    layer.train()
    assert layer.training is True


@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5)])
def test_batchnorm1d_accepts_2d_and_3d(shape):
    layer = fastbn.BatchNorm1d(3)
    x = inputs._randn(inputs.rng_for("1d", shape), shape, 1, np.float32)
    y = layer(x)
    assert_close(y, ref.batch_norm_train(x)[0], np.float32, name="y")


def test_eval_without_running_stats_uses_batch_stats():
    layer = fastbn.BatchNorm2d(3, track_running_stats=False)
    layer.eval()
    c = inputs.build("nchw_3x224-float32")
    y = layer(c.x)
    assert_close(y, ref.batch_norm_train(c.x)[0], np.float32, name="y (eval, no running stats)")
    dy = inputs.like(c.x)
    dx = layer.backward(dy)
    _, mean, invstd = ref.batch_norm_train(c.x)
    assert_close(dx, ref.batch_norm_backward(dy, c.x, mean, invstd, np.ones(3))[0], np.float32,
                 name="dx (eval, no running stats: batch-statistics gradient)")


def test_eval_leaves_state_unchanged():
    layer = fastbn.BatchNorm2d(3)
    c = inputs.build("nchw_3x224-float32")
    layer(c.x)  # one training step
    layer.eval()
    before = _state(layer)
    layer(c.x)
    layer.backward(inputs.like(c.x))
    _assert_state_equal(before, _state(layer))


def test_momentum_none_is_cumulative_average():
    """With momentum=None the running mean after k batches is the plain average of the k batch
    means (starting from a fresh layer), as in PyTorch."""
    layer = fastbn.BatchNorm1d(4, momentum=None, dtype=np.float64)
    xs, _ = _batches((10, 4), 1, np.float64, 4, "cma")
    means, vars_ = [], []
    for x in xs:
        layer(x)
        mu, var = ref.channel_stats(x, 1, ddof=1)
        means.append(mu)
        vars_.append(var)
    assert int(layer.num_batches_tracked) == 4
    assert_close(layer.running_mean, np.mean(means, axis=0), np.float64, name="running_mean")
    # running_var starts at 1 and the first batch has weight 1: average of the batch variances
    assert_close(layer.running_var, np.mean(vars_, axis=0), np.float64, name="running_var")


def test_float64_layer():
    c = inputs.build("nhwc_56x64-float64")
    layer = fastbn.BatchNorm(16, axis=-1, dtype=np.float64)
    assert layer.weight.dtype == np.float64 and layer.running_var.dtype == np.float64
    y = layer(c.x)
    assert y.dtype == np.float64
    assert_close(y, ref.batch_norm_train(c.x, axis=-1)[0], np.float64, name="y")


# --------------------------------------------------------------------------------------------
# state_dict / load_state_dict
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", list(CONFIGS))
def test_state_dict_round_trip(config):
    affine, track = CONFIGS[config]
    xs, _ = _batches((6, 4, 3, 3), 1, np.float32, 2, "roundtrip", config)
    a = fastbn.BatchNorm2d(4, affine=affine, track_running_stats=track, momentum=0.3)
    a.load_state_dict(_initial_state(4, np.float32, affine, track, config))
    for x in xs:
        a(x)
    sd = a.state_dict()
    b = fastbn.BatchNorm2d(4, affine=affine, track_running_stats=track, momentum=0.3)
    b.load_state_dict(sd)
    _assert_state_equal(_state(a), _state(b))
    a.eval()
    b.eval()
    np.testing.assert_array_equal(a(xs[0]), b(xs[0]))
    a.train()
    b.train()
    np.testing.assert_array_equal(a(xs[1]), b(xs[1]))
    _assert_state_equal(_state(a), _state(b))


def test_load_state_dict_copies():
    """Like torch, load_state_dict copies: later changes to the caller's arrays (e.g. a torch
    module's buffers seen through .numpy()) must not leak into the layer, and vice versa."""
    sd = _initial_state(4, np.float32, True, True, "copies")
    layer = fastbn.BatchNorm2d(4)
    layer.load_state_dict(sd)
    before = _state(layer)
    keep = Unchanged(**sd)
    xs, _ = _batches((5, 4, 2, 2), 1, np.float32, 1, "copies")
    layer(xs[0])  # a training step updates the layer's running stats ...
    keep.check()  # ... but not the dict it was loaded from
    layer2 = fastbn.BatchNorm2d(4)
    layer2.load_state_dict(sd)
    for v in sd.values():
        v[...] = 42
    _assert_state_equal(before, _state(layer2))


def test_load_state_dict_from_torch():
    torch = pytest.importorskip("torch")
    m = torch.nn.BatchNorm3d(3, momentum=None)
    with torch.no_grad():
        m.weight.uniform_()
        m.running_var.uniform_(1, 2)
        m.num_batches_tracked.fill_(11)
    layer = fastbn.BatchNorm3d(3, momentum=None)
    layer.load_state_dict({k: v.numpy() for k, v in m.state_dict().items()})
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(np.asarray(layer.state_dict()[k]), v.numpy(), err_msg=k)
    assert int(layer.num_batches_tracked) == 11


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_load_state_dict_from_narrow_torch_tensors(dtype):
    """Tensors of a type NumPy lacks (bfloat16) load through float32, exactly, as float16 ones
    do through NumPy."""
    torch = pytest.importorskip("torch")
    m = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        m.weight.uniform_()
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(1, 2)
    m = m.to(getattr(torch, dtype))
    layer = fastbn.BatchNorm2d(3)
    layer.load_state_dict(m.state_dict())
    for k, v in m.state_dict().items():
        want = v.float().numpy() if v.is_floating_point() else v.numpy()
        np.testing.assert_array_equal(np.asarray(layer.state_dict()[k]), want, err_msg=k)


# --------------------------------------------------------------------------------------------
# save / load (.npz, never pickle)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loader", ["BatchNorm.load", "fastbn.load", "subclass.load"])
@pytest.mark.parametrize("config", ["affine-track", "noaffine-notrack"])
def test_save_load(tmp_path, config, loader):
    affine, track = CONFIGS[config]
    layer = fastbn.BatchNorm2d(4, eps=1e-3, momentum=0.25, affine=affine,
                               track_running_stats=track)
    xs, _ = _batches((6, 4, 3, 3), 1, np.float32, 3, "save", config)
    layer(xs[0])
    layer(xs[1])
    path = str(tmp_path / "layer.npz")
    layer.save(path)
    assert os.path.exists(path)
    with np.load(path, allow_pickle=False) as npz:  # a plain, pickle-free .npz
        for k in layer.state_dict():
            assert k in npz.files, k
    load = {"BatchNorm.load": fastbn.BatchNorm.load, "fastbn.load": fastbn.load,
            "subclass.load": fastbn.BatchNorm2d.load}[loader]
    loaded = load(path)
    assert isinstance(loaded, fastbn.BatchNorm)
    _assert_state_equal(_state(layer), _state(loaded))
    assert loaded.eps == layer.eps and loaded.momentum == layer.momentum
    assert loaded.affine == affine and loaded.track_running_stats == track
    for mode in ("eval", "train"):  # same hyper-parameters: same outputs, same updates
        getattr(layer, mode)()
        getattr(loaded, mode)()
        np.testing.assert_array_equal(layer(xs[2]), loaded(xs[2]), err_msg=mode)
        _assert_state_equal(_state(layer), _state(loaded))


def test_save_load_generic_axis(tmp_path):
    c = inputs.build("nhwc_224x3-float64")
    layer = fastbn.BatchNorm(3, axis=-1, dtype=np.float64, momentum=None)
    layer(c.x)
    path = str(tmp_path / "g.npz")
    layer.save(path)
    loaded = fastbn.load(path)
    assert loaded.axis == layer.axis
    assert loaded.momentum is None and loaded.weight.dtype == np.float64
    layer.eval()
    loaded.eval()
    np.testing.assert_array_equal(layer(c.x), loaded(c.x))


class _Evil:
    """Unpickling this runs code: a loader that unpickles would set the flag."""

    def __reduce__(self):
        return (exec, ("import builtins; builtins._fastbn_test_pwned = True",))


@pytest.mark.parametrize("loader", ["BatchNorm.load", "fastbn.load"])
def test_load_refuses_pickle(tmp_path, loader):
    import builtins
    path = str(tmp_path / "evil.npz")
    good = fastbn.BatchNorm2d(2)
    good.save(path)
    with np.load(path, allow_pickle=False) as npz:
        contents = {k: npz[k] for k in npz.files}
    contents["running_mean"] = np.array([_Evil(), _Evil()], dtype=object)
    np.savez(path, **contents)
    load = fastbn.BatchNorm.load if loader == "BatchNorm.load" else fastbn.load
    with pytest.raises(ValueError, match="(?i)pickle|object"):
        load(path)
    assert not getattr(builtins, "_fastbn_test_pwned", False), "the loader unpickled the payload"


def test_load_state_dict_reports_keys_like_torch():
    torch = pytest.importorskip("torch")
    layer, tlayer = fastbn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    sd = layer.state_dict()
    del sd["bias"]
    sd["extra"] = np.ones(1)
    got = layer.load_state_dict(sd, strict=False)
    want = tlayer.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()},
                                  strict=False)
    assert (got.missing_keys, got.unexpected_keys) == (want.missing_keys, want.unexpected_keys)
    assert layer.load_state_dict(layer.state_dict()) == ([], [])


def test_load_state_dict_without_num_batches_tracked_keeps_the_count_as_torch():
    torch = pytest.importorskip("torch")
    layer, tlayer = fastbn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    layer.num_batches_tracked[...] = 5
    tlayer.num_batches_tracked.fill_(5)
    sd = {k: v for k, v in fastbn.BatchNorm1d(3).state_dict().items()
          if k != "num_batches_tracked"}
    sd["running_var"] = np.full(3, 2.0, np.float32)
    got = layer.load_state_dict(sd)
    want = tlayer.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()})
    assert (got.missing_keys, got.unexpected_keys) == (want.missing_keys, want.unexpected_keys)
    assert int(layer.num_batches_tracked) == int(tlayer.num_batches_tracked) == 5
    np.testing.assert_array_equal(layer.running_var, tlayer.running_var.numpy())


def test_dtype_none_is_float32_as_torch():
    layer = fastbn.BatchNorm2d(3, dtype=None)
    assert layer.dtype == np.float32 and layer.weight.dtype == np.float32
    x = inputs.params(3, np.float32, "dtype-none")[0].reshape(1, 3, 1, 1) * np.ones((2, 3, 2, 2), np.float32)
    assert layer(x).dtype == np.float32
