"""Every public function of fastbn against the float64 reference (tests/reference.py) and against
PyTorch, on every case of the input generator (tests/inputs.py).

Tolerances (tests/util.py): ``max|a - ref| <= rtol * max(1, max|ref|)`` with rtol 1e-5 for
float32 and 1e-10 for float64.  The only loosened bounds are for the large-offset cases, on the
outputs that depend on a mean the library computed (``_offset_slack``: y in training) and, in
float32, on xhat in the backward pass (``_backward_slack``); each is a stated number of ulps of
max|x| propagated through the normalisation scale.  Statistics (mean, var, invstd) keep the
plain tolerance everywhere: the inputs are exact and the reference computes them to ~1e-16.

Every call to fastbn goes through ``util.call``, which asserts that the call modified none of
its array arguments (only ``out=`` and batch_norm's running statistics may change).

PyTorch runs in float64 on the exact float64 upcast of the inputs, so it acts as an independent
oracle for the conventions (biased variance for normalisation, unbiased for running stats,
``invstd = 1/sqrt(var + eps)``, momentum direction); its own float64 rounding error is allowed for
with ``util.torch_slack`` (only relevant for the +1e8 cases).
"""

import inspect
import warnings

import inputs
import numpy as np
import pytest
import reference as ref
from util import (
    Unchanged,
    assert_close,
    call,
    from_torch,
    input_precision_slack,
    to_torch,
    torch_slack,
    vec_torch,
)

import fastbn

CASE_IDS = inputs.case_ids()
METHODS = ["auto", "two_pass", "welford"]
AFFINE = {  # which of weight / bias are passed
    "affine": (True, True),
    "no_affine": (False, False),
    "weight_only": (True, False),
    "bias_only": (False, True),
}


def _setup(case_id):
    c = inputs.build(case_id)
    C = c.x.shape[c.axis]
    w, b, rm, rv = inputs.params(C, c.x.dtype, case_id)
    return c, w, b, rm, rv


def _offset_slack(case, invstd, weight=None, ulps=4.0):
    """Extra allowance on outputs that depend on a mean the library computed, for the
    large-offset cases only (see util.input_precision_slack): 4 ulps of max|x| (in x's dtype)
    times the scale invstd*|w|.

    float32 +1e4: one ulp is 2**-10 ~ 1e-3 against a unit spread, so a float32 evaluation of
    ``x - mean`` (or of ``x * a + b``) only gives y to ~1e-3; the bound (~6e-3 on outputs of
    magnitude ~5) is still tight: a naive E[x^2]-E[x]^2 variance in float32 is wrong by O(1).
    float64 +1e8: the mean itself is representable only to 0.5 ulp(1e8) = 7.5e-9, so even the
    reference's y differs from exact arithmetic by up to 7.5e-9*invstd*|w| -- far above the
    1e-10 of the float64 tolerance, which would otherwise demand that the library round the mean
    exactly as the reference does.  4 ulps (~9e-8 here) allows the reference's 0.5 ulp plus a
    mean accurate to ~3 ulps of its magnitude.  The brief loosened float32 only; this is the same
    representability argument applied to float64 (stated in the suite report)."""
    if inputs.is_large_offset(case.id):
        return input_precision_slack(case.x, invstd, weight, ulps)
    return 0.0


def _check_vec(v, case, name):
    C = case.x.shape[case.axis]
    assert isinstance(v, np.ndarray), name
    assert v.shape == (C,), f"{name}: shape {v.shape}, expected ({C},)"
    assert v.dtype == case.x.dtype, f"{name}: dtype {v.dtype}, expected {case.x.dtype}"


def _check_full(v, case, name):
    assert isinstance(v, np.ndarray), name
    assert v.shape == case.x.shape, f"{name}: shape {v.shape}, expected {case.x.shape}"
    assert v.dtype == case.x.dtype, f"{name}: dtype {v.dtype}, expected {case.x.dtype}"
    assert not np.shares_memory(v, case.x), f"{name} aliases the input"


# --------------------------------------------------------------------------------------------
# API surface
# --------------------------------------------------------------------------------------------

SIGNATURES = {
    "channel_stats": "(x, *, axis=1, ddof=0, method='auto')",
    "batch_norm_train": "(x, weight=None, bias=None, *, eps=1e-05, axis=1, out=None)",
    "batch_norm_infer": "(x, running_mean, running_var, weight=None, bias=None, *, eps=1e-05, "
                        "axis=1, activation=None, out=None)",
    "batch_norm_backward": "(dy, x, mean, invstd, weight=None, *, axis=1, training=True, "
                           "out=None)",
    "batch_norm": "(x, running_mean, running_var, weight=None, bias=None, *, training=False, "
                  "momentum=0.1, eps=1e-05, axis=1, out=None)",
}


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signature(name):
    sig = inspect.signature(getattr(fastbn, name))
    plain = sig.replace(parameters=[p.replace(annotation=inspect.Parameter.empty)
                                    for p in sig.parameters.values()],
                        return_annotation=inspect.Signature.empty)
    assert str(plain) == SIGNATURES[name]


def test_public_names():
    for name in ["channel_stats", "batch_norm_train", "batch_norm_infer", "batch_norm_backward",
                 "batch_norm", "BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "load",
                 "set_num_threads", "get_num_threads"]:
        assert hasattr(fastbn, name), name


# --------------------------------------------------------------------------------------------
# channel_stats
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_channel_stats(case_id, method):
    c = inputs.build(case_id)
    keep = Unchanged(c.x)
    for ddof in (0, 1):
        mean, var = call(fastbn.channel_stats, c.x, axis=c.axis, ddof=ddof, method=method)
        _check_vec(mean, c, "mean")
        _check_vec(var, c, "var")
        rmean, rvar = ref.channel_stats(c.x, c.axis, ddof)
        assert_close(mean, rmean, c.x.dtype, name=f"mean (ddof={ddof})")
        assert_close(var, rvar, c.x.dtype, name=f"var (ddof={ddof})")
    keep.check()


def test_channel_stats_defaults():
    c = inputs.build("nchw_64x56-float64")
    m0, v0 = call(fastbn.channel_stats, c.x)
    m1, v1 = call(fastbn.channel_stats, c.x, axis=1, ddof=0, method="auto")
    np.testing.assert_array_equal(m0, m1)
    np.testing.assert_array_equal(v0, v1)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_channel_stats_vs_torch(case_id):
    torch = pytest.importorskip("torch")
    c = inputs.build(case_id)
    xt = to_torch(c.x, c.axis)
    dims = [d for d in range(xt.ndim) if d != 1]
    for ddof in (0, 1):
        tvar, tmean = torch.var_mean(xt, dim=dims, correction=ddof)
        mean, var = call(fastbn.channel_stats, c.x, axis=c.axis, ddof=ddof)
        slack = torch_slack(c.x, 1.0, m=ref.channel_count(c.x, c.axis))  # torch's sums
        assert_close(mean, tmean.numpy(), c.x.dtype, slack=slack, name="mean vs torch")
        assert_close(var, tvar.numpy(), c.x.dtype, slack=slack, name="var vs torch")


# --------------------------------------------------------------------------------------------
# batch_norm_train
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case_id", CASE_IDS)
def test_train(case_id):
    c, w, b, _, _ = _setup(case_id)
    for label, (use_w, use_b) in AFFINE.items():
        weight, bias = (w if use_w else None), (b if use_b else None)
        keep = Unchanged(c.x, w, b)
        y, mean, invstd = call(fastbn.batch_norm_train, c.x, weight, bias, axis=c.axis)
        keep.check()
        _check_full(y, c, "y")
        _check_vec(mean, c, "mean")
        _check_vec(invstd, c, "invstd")
        ry, rmean, rinvstd = ref.batch_norm_train(c.x, weight, bias, axis=c.axis)
        dt = c.x.dtype
        assert_close(mean, rmean, dt, name=f"mean [{label}]")
        assert_close(invstd, rinvstd, dt, name=f"invstd [{label}]")
        assert_close(y, ry, dt, slack=_offset_slack(c, rinvstd, weight), name=f"y [{label}]")


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_train_vs_torch(case_id):
    torch = pytest.importorskip("torch")
    c, w, b, _, _ = _setup(case_id)
    eps = 1e-5
    y, mean, invstd = call(fastbn.batch_norm_train, c.x, w, b, eps=eps, axis=c.axis)
    ty, tmean, tinvstd = torch.ops.aten.native_batch_norm(
        to_torch(c.x, c.axis), vec_torch(w), vec_torch(b), None, None, True, 0.1, eps)
    s = torch_slack(c.x, tinvstd.numpy(), w, ref.channel_count(c.x, c.axis))
    dt = c.x.dtype
    assert_close(mean, tmean.numpy(), dt, slack=s, name="mean vs torch")
    assert_close(invstd, tinvstd.numpy(), dt, slack=s, name="invstd vs torch")
    assert_close(y, from_torch(ty, c.axis), dt,
                 slack=s + _offset_slack(c, tinvstd.numpy(), w), name="y vs torch")


# --------------------------------------------------------------------------------------------
# batch_norm_infer
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_infer(case_id, activation):
    c, w, b, rm, rv = _setup(case_id)
    for label, (use_w, use_b) in AFFINE.items():
        weight, bias = (w if use_w else None), (b if use_b else None)
        keep = Unchanged(c.x, w, b, rm, rv)
        y = call(fastbn.batch_norm_infer, c.x, rm, rv, weight, bias, axis=c.axis,
                                    activation=activation)
        keep.check()
        _check_full(y, c, "y")
        ry = ref.batch_norm_infer(c.x, rm, rv, weight, bias, axis=c.axis, activation=activation)
        assert_close(y, ry, c.x.dtype, name=f"y [{label}, {activation}]")
        if activation == "relu":
            assert (y >= 0).all()


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_infer_vs_torch(case_id):
    torch = pytest.importorskip("torch")
    c, w, b, rm, rv = _setup(case_id)
    eps = 1e-5
    tinv = 1.0 / np.sqrt(rv.astype(np.float64) + eps)
    ty = torch.nn.functional.batch_norm(to_torch(c.x, c.axis), vec_torch(rm), vec_torch(rv),
                                        vec_torch(w), vec_torch(b), training=False, eps=eps)
    y = call(fastbn.batch_norm_infer, c.x, rm, rv, w, b, axis=c.axis)
    s = torch_slack(c.x, tinv, w, ref.channel_count(c.x, c.axis))
    assert_close(y, from_torch(ty, c.axis), c.x.dtype, slack=s, name="y vs torch")
    y = call(fastbn.batch_norm_infer, c.x, rm, rv, w, b, axis=c.axis, activation="relu")
    assert_close(y, from_torch(torch.relu(ty), c.axis), c.x.dtype, slack=s,
                 name="relu(y) vs torch")


# --------------------------------------------------------------------------------------------
# batch_norm_backward
# --------------------------------------------------------------------------------------------

def _backward_stats(c, rm, rv, training, eps=1e-5):
    """mean / invstd as the library would have them (x's dtype): the batch statistics in
    training mode, derived from running statistics otherwise."""
    dt = c.x.dtype
    if training:
        _, mean, invstd = ref.batch_norm_train(c.x, eps=eps, axis=c.axis)
        return mean.astype(dt), invstd.astype(dt)
    return rm.copy(), (1.0 / np.sqrt(rv.astype(np.float64) + eps)).astype(dt)


def _backward_slack(c, dy, mean, invstd, weight, training):
    """float32 +1e4 cases, training mode: dx and dweight depend on xhat = (x - mean) * invstd,
    which float32 arithmetic knows only to e = 4 ulps(max|x|) * invstd (see _offset_slack).
    dweight = sum(dy * xhat) accumulates that over the M values of a channel: M * max|dy| * e.
    dx = w * invstd * (dy - mean(dy) - xhat * k) with k = mean(dy * xhat) sees it through xhat
    and through k: |w| * invstd * 2 * max|dy| * max|xhat| * e.
    In eval mode xhat does not enter dx, and dweight is of the magnitude of x (no cancellation)."""
    if not (training and inputs.is_large_offset(c.id) and c.x.dtype == np.float32):
        return 0.0, 0.0
    m = ref.channel_count(c.x, c.axis)
    e_xhat = input_precision_slack(c.x, invstd)
    xhat = (c.x.astype(np.float64) - ref._bcast(mean, c.x.ndim, c.axis)) * ref._bcast(
        invstd, c.x.ndim, c.axis)
    dymax = float(np.max(np.abs(dy)))
    wmax = 1.0 if weight is None else float(np.max(np.abs(weight)))
    e_dw = m * dymax * e_xhat
    e_dx = wmax * float(np.max(invstd)) * 2 * dymax * float(np.max(np.abs(xhat))) * e_xhat
    return e_dx, e_dw


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_backward(case_id, training):
    c, w, _b, rm, rv = _setup(case_id)
    dy = inputs.like(c.x, case_id)
    mean, invstd = _backward_stats(c, rm, rv, training)
    for weight in (w, None):
        keep = Unchanged(dy, c.x, mean, invstd, w)
        dx, dw, db = call(fastbn.batch_norm_backward, dy, c.x, mean, invstd, weight, axis=c.axis,
                                                training=training)
        keep.check()
        _check_full(dx, c, "dx")
        _check_vec(dw, c, "dweight")
        _check_vec(db, c, "dbias")
        rdx, rdw, rdb = ref.batch_norm_backward(dy, c.x, mean, invstd, weight, c.axis, training)
        e_dx, e_dw = _backward_slack(c, dy, mean, invstd, weight, training)
        label = f"[training={training}, weight={'yes' if weight is not None else 'None'}]"
        assert_close(dx, rdx, c.x.dtype, slack=e_dx, name=f"dx {label}")
        assert_close(dw, rdw, c.x.dtype, slack=e_dw, name=f"dweight {label}")
        assert_close(db, rdb, c.x.dtype, name=f"dbias {label}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_backward_vs_torch(case_id, training):
    torch = pytest.importorskip("torch")
    c, w, _b, rm, rv = _setup(case_id)
    eps = 1e-5
    dy = inputs.like(c.x, case_id)
    mean, invstd = _backward_stats(c, rm, rv, training, eps)
    if training:
        args = (None, None, vec_torch(mean), vec_torch(invstd))
    else:
        args = (vec_torch(rm), vec_torch(rv), None, None)
    tdx, tdw, tdb = torch.ops.aten.native_batch_norm_backward(
        to_torch(dy, c.axis), to_torch(c.x, c.axis), vec_torch(w), *args, training, eps,
        [True, True, True])
    dx, dw, db = call(fastbn.batch_norm_backward, dy, c.x, mean, invstd, w, axis=c.axis,
                                            training=training)
    m = ref.channel_count(c.x, c.axis)
    s = torch_slack(c.x, invstd, w, m) * float(np.max(np.abs(dy)))
    e_dx, e_dw = _backward_slack(c, dy, mean, invstd, w, training)
    # eval mode: torch recomputes invstd from running_var in float64; ours was rounded to
    # x's dtype, a relative difference of <= 1 ulp of the dtype on dx and dweight.
    u = 0.0 if training else float(np.finfo(c.x.dtype).eps)
    assert_close(dx, from_torch(tdx, c.axis), c.x.dtype,
                 slack=s + e_dx + u * float(np.max(np.abs(tdx.numpy()))), name="dx vs torch")
    assert_close(dw, tdw.numpy(), c.x.dtype,
                 slack=np.sqrt(m) * s + e_dw + u * float(np.max(np.abs(tdw.numpy()))),
                 name="dweight vs torch")
    assert_close(db, tdb.numpy(), c.x.dtype, name="dbias vs torch")


# --------------------------------------------------------------------------------------------
# batch_norm (functional, with running-stat update)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_batch_norm(case_id, training):
    c, w, b, rm, rv = _setup(case_id)
    momentum = 0.1
    run_mean, run_var = rm.copy(), rv.copy()
    keep = Unchanged(c.x, w, b)
    y = call(fastbn.batch_norm, c.x, run_mean, run_var, w, b, training=training, momentum=momentum,
                          axis=c.axis)
    keep.check()
    _check_full(y, c, "y")
    ry, rmean, rvar = ref.batch_norm(c.x, rm, rv, w, b, training, momentum, 1e-5, c.axis)
    dt = c.x.dtype
    assert run_mean.dtype == dt and run_var.dtype == dt
    if training:
        _, _, rinv = ref.batch_norm_train(c.x, axis=c.axis)
        assert_close(y, ry, dt, slack=_offset_slack(c, rinv, w), name="y")
    else:
        assert_close(y, ry, dt, name="y")
        np.testing.assert_array_equal(run_mean, rm, err_msg="eval must not touch running_mean")
        np.testing.assert_array_equal(run_var, rv, err_msg="eval must not touch running_var")
    assert_close(run_mean, rmean, dt, name="running_mean")
    assert_close(run_var, rvar, dt, name="running_var")


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_batch_norm_vs_torch(case_id):
    torch = pytest.importorskip("torch")
    c, w, b, rm, rv = _setup(case_id)
    for training in (True, False):
        for momentum in (0.1, 0.75):
            run_mean, run_var = rm.copy(), rv.copy()
            t_mean, t_var = vec_torch(rm), vec_torch(rv)
            ty = torch.nn.functional.batch_norm(to_torch(c.x, c.axis), t_mean, t_var,
                                                vec_torch(w), vec_torch(b), training=training,
                                                momentum=momentum, eps=1e-5)
            y = call(fastbn.batch_norm, c.x, run_mean, run_var, w, b, training=training,
                                  momentum=momentum, axis=c.axis)
            _, _, rinv = ref.batch_norm_train(c.x, axis=c.axis)
            inv = rinv if training else 1.0 / np.sqrt(rv.astype(np.float64) + 1e-5)
            s = torch_slack(c.x, inv, w, ref.channel_count(c.x, c.axis))
            label = f"[training={training}, momentum={momentum}]"
            assert_close(y, from_torch(ty, c.axis), c.x.dtype,
                         slack=s + (_offset_slack(c, inv, w) if training else 0.0),
                         name=f"y vs torch {label}")
            assert_close(run_mean, t_mean.numpy(), c.x.dtype, slack=s,
                         name=f"running_mean vs torch {label}")
            assert_close(run_var, t_var.numpy(), c.x.dtype, slack=s,
                         name=f"running_var vs torch {label}")


@pytest.mark.parametrize("momentum", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("case_id", ["nchw_3x224-float32", "nhwc_56x64-float64",
                                     "strided_channel-float32", "constant_nchw-float64"])
def test_batch_norm_momentum(case_id, momentum):
    c, w, b, rm, rv = _setup(case_id)
    run_mean, run_var = rm.copy(), rv.copy()
    call(fastbn.batch_norm, c.x, run_mean, run_var, w, b, training=True, momentum=momentum,
                      axis=c.axis)
    _, rmean, rvar = ref.batch_norm(c.x, rm, rv, w, b, True, momentum, 1e-5, c.axis)
    assert_close(run_mean, rmean, c.x.dtype, name="running_mean")
    assert_close(run_var, rvar, c.x.dtype, name="running_var")
    if momentum == 0.0:
        np.testing.assert_array_equal(run_mean, rm)
        np.testing.assert_array_equal(run_var, rv)


@pytest.mark.parametrize("case_id", ["nchw_64x56-float32", "nhwc_224x3-float64",
                                     "c1_nc-float32", "transposed_5d-float64"])
def test_batch_norm_without_running_stats(case_id):
    c, w, b, _, _ = _setup(case_id)
    y = call(fastbn.batch_norm, c.x, None, None, w, b, training=True, axis=c.axis)
    ry, _, _ = ref.batch_norm(c.x, None, None, w, b, True, 0.1, 1e-5, c.axis)
    assert_close(y, ry, c.x.dtype, name="y")


# --------------------------------------------------------------------------------------------
# eps: a large eps separates "1/sqrt(var + eps)" from other placements
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [0.25, 1e-3])
@pytest.mark.parametrize("case_id", ["constant_nchw-float32", "constant_nhwc-float64",
                                     "nchw_256x14-float64", "odd_3x5x7_axis-1-float32"])
def test_eps(case_id, eps):
    c, w, b, rm, rv = _setup(case_id)
    dt = c.x.dtype
    y, _mean, invstd = call(fastbn.batch_norm_train, c.x, w, b, eps=eps, axis=c.axis)
    ry, _rmean, rinv = ref.batch_norm_train(c.x, w, b, eps=eps, axis=c.axis)
    assert_close(invstd, rinv, dt, name="invstd")
    assert_close(y, ry, dt, name="y")
    y = call(fastbn.batch_norm_infer, c.x, rm, rv, w, b, eps=eps, axis=c.axis)
    assert_close(y, ref.batch_norm_infer(c.x, rm, rv, w, b, eps=eps, axis=c.axis), dt,
                 name="infer y")
    run_mean, run_var = rm.copy(), rv.copy()
    y = call(fastbn.batch_norm, c.x, run_mean, run_var, w, b, training=True, eps=eps, axis=c.axis)
    assert_close(y, ry, dt, name="batch_norm y")


# --------------------------------------------------------------------------------------------
# out=
# --------------------------------------------------------------------------------------------

def _outs(x):
    yield "C", np.empty(x.shape, x.dtype)
    yield "F", np.empty(x.shape, x.dtype, order="F")
    yield "strided", np.empty(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)[..., ::2]


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_out(case_id):
    c, w, b, rm, rv = _setup(case_id)
    dt = c.x.dtype
    dy = inputs.like(c.x, case_id)
    y0, mean, invstd = call(fastbn.batch_norm_train, c.x, w, b, axis=c.axis)
    yi0 = call(fastbn.batch_norm_infer, c.x, rm, rv, w, b, axis=c.axis, activation="relu")
    dx0, dw0, db0 = call(fastbn.batch_norm_backward, dy, c.x, mean, invstd, w, axis=c.axis)
    ry, _, rinv = ref.batch_norm_train(c.x, w, b, axis=c.axis)
    slack = _offset_slack(c, rinv, w)
    for layout, out in _outs(c.x):
        keep = Unchanged(c.x, w, b, rm, rv, dy, mean, invstd)
        res = call(fastbn.batch_norm_train, c.x, w, b, axis=c.axis, out=out)
        assert res[0] is out, f"batch_norm_train(out=[{layout}]) did not return out"
        assert_close(out, ry, dt, slack=slack, name=f"train out [{layout}]")
        assert_close(out, y0, dt, name=f"train out [{layout}] vs no out")

        out[...] = np.nan
        res = call(fastbn.batch_norm_infer, c.x, rm, rv, w, b, axis=c.axis, activation="relu",
                                      out=out)
        assert res is out, f"batch_norm_infer(out=[{layout}]) did not return out"
        assert_close(out, yi0, dt, name=f"infer out [{layout}] vs no out")

        out[...] = np.nan
        res = call(fastbn.batch_norm_backward, dy, c.x, mean, invstd, w, axis=c.axis, out=out)
        assert res[0] is out, f"batch_norm_backward(out=[{layout}]) did not return out"
        assert_close(out, dx0, dt, name=f"backward out [{layout}] vs no out")
        assert_close(res[1], dw0, dt, name="dweight with out")
        assert_close(res[2], db0, dt, name="dbias with out")

        out[...] = np.nan
        run_mean, run_var = rm.copy(), rv.copy()
        res = call(fastbn.batch_norm, c.x, run_mean, run_var, w, b, training=True, axis=c.axis,
                                out=out)
        assert res is out, f"batch_norm(out=[{layout}]) did not return out"
        assert_close(out, ry, dt, slack=slack, name=f"batch_norm out [{layout}]")
        keep.check()


# --------------------------------------------------------------------------------------------
# read-only inputs are accepted (nothing may be written to them)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case_id", ["nchw_64x56-float32", "nhwc_56x64-float64",
                                     "reversed_channel-float32", "medium_c1_long-float64"])
def test_readonly_inputs(case_id):
    c, w, b, rm, rv = _setup(case_id)
    dy = inputs.like(c.x, case_id)
    for a in (c.x, w, b, rm, rv, dy):
        a.flags.writeable = False
    dt = c.x.dtype
    for method in METHODS:
        mean, var = call(fastbn.channel_stats, c.x, axis=c.axis, method=method)
        assert_close(var, ref.channel_stats(c.x, c.axis)[1], dt, name=f"var ({method})")
    y, mean, invstd = call(fastbn.batch_norm_train, c.x, w, b, axis=c.axis)
    assert_close(y, ref.batch_norm_train(c.x, w, b, axis=c.axis)[0], dt, name="train y")
    y = call(fastbn.batch_norm_infer, c.x, rm, rv, w, b, axis=c.axis)
    assert_close(y, ref.batch_norm_infer(c.x, rm, rv, w, b, axis=c.axis), dt, name="infer y")
    mean.flags.writeable = invstd.flags.writeable = False
    dx, _, _ = call(fastbn.batch_norm_backward, dy, c.x, mean, invstd, w, axis=c.axis)
    assert_close(dx, ref.batch_norm_backward(dy, c.x, mean, invstd, w, c.axis)[0], dt, name="dx")
    y = call(fastbn.batch_norm, c.x, rm, rv, w, b, training=False, axis=c.axis)
    assert_close(y, ref.batch_norm_infer(c.x, rm, rv, w, b, axis=c.axis), dt, name="eval y")


# --------------------------------------------------------------------------------------------
# gradients: finite differences (float64) and torch.autograd (float32)
# --------------------------------------------------------------------------------------------

def _fd_grad(f, arrays, h=1e-5):
    """Central differences of the scalar f() w.r.t. every element of every array (in place)."""
    grads = []
    for a in arrays:
        g = np.zeros(a.shape)
        for idx in np.ndindex(a.shape):
            old = a[idx]
            a[idx] = old + h
            fp = f()
            a[idx] = old - h
            fm = f()
            a[idx] = old
            g[idx] = (fp - fm) / (2 * h)
        grads.append(g)
    return grads


@pytest.mark.parametrize("shape, axis", [((3, 2, 2, 2), 1), ((3, 2, 2, 2), -1), ((5, 3), 1),
                                         ((2, 3, 4), 2)])
def test_train_gradients_finite_differences(shape, axis):
    rng = inputs.rng_for("fd-train", shape, axis)
    x = rng.standard_normal(shape) * 1.5 + 0.3
    C = shape[axis]
    w = rng.uniform(0.5, 1.5, C) * np.array([1, -1, 1, -1][:C] + [1] * max(0, C - 4))
    b = rng.uniform(-1, 1, C)
    g = rng.standard_normal(shape)  # loss = sum(y * g), so dL/dy = g

    def loss():
        y, _, _ = call(fastbn.batch_norm_train, x, w, b, axis=axis)
        return float(np.sum(y * g))

    fdx, fdw, fdb = _fd_grad(loss, [x, w, b])
    _, mean, invstd = call(fastbn.batch_norm_train, x, w, b, axis=axis)
    dx, dw, db = call(fastbn.batch_norm_backward, g, x, mean, invstd, w, axis=axis, training=True)
    # central differences with h=1e-5 in float64: truncation ~h^2, rounding ~1e-16/h ~ 1e-11
    np.testing.assert_allclose(dx, fdx, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dw, fdw, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(db, fdb, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape, axis", [((3, 2, 2, 2), 1), ((4, 3), -1)])
def test_infer_gradients_finite_differences(shape, axis):
    rng = inputs.rng_for("fd-infer", shape, axis)
    x = rng.standard_normal(shape)
    C = shape[axis]
    w, b = rng.uniform(-1.5, 1.5, C), rng.uniform(-1, 1, C)
    rm, rv = rng.uniform(-1, 1, C), rng.uniform(0.5, 2, C)
    g = rng.standard_normal(shape)

    def loss():
        return float(np.sum(call(fastbn.batch_norm_infer, x, rm, rv, w, b, axis=axis) * g))

    fdx, fdw, fdb = _fd_grad(loss, [x, w, b])
    invstd = 1.0 / np.sqrt(rv + 1e-5)
    dx, dw, db = call(fastbn.batch_norm_backward, g, x, rm, invstd, w, axis=axis, training=False)
    np.testing.assert_allclose(dx, fdx, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dw, fdw, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(db, fdb, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case_id", ["nchw_3x224-float32", "nhwc_56x64-float32",
                                     "nc_1024-float32", "ncdhw-float32",
                                     "torch_channels_last-float32"])
def test_gradients_vs_torch_autograd(case_id, training):
    """float32 end to end: torch autograd through F.batch_norm vs our forward + backward."""
    torch = pytest.importorskip("torch")
    c, w, b, rm, rv = _setup(case_id)
    g = inputs.like(c.x, "autograd", case_id)

    def t32(a, axis=None):
        a = np.ascontiguousarray(a if axis is None else np.moveaxis(a, axis, 1))
        return torch.tensor(a, requires_grad=True)

    xt, wt, bt = t32(c.x, c.axis), t32(w), t32(b)
    yt = torch.nn.functional.batch_norm(xt, torch.from_numpy(rm.copy()),
                                        torch.from_numpy(rv.copy()), wt, bt,
                                        training=training, momentum=0.1, eps=1e-5)
    (yt * torch.from_numpy(np.ascontiguousarray(np.moveaxis(g, c.axis, 1)))).sum().backward()

    if training:
        y, mean, invstd = call(fastbn.batch_norm_train, c.x, w, b, axis=c.axis)
    else:
        y = call(fastbn.batch_norm_infer, c.x, rm, rv, w, b, axis=c.axis)
        mean, invstd = rm, (1.0 / np.sqrt(rv.astype(np.float64) + 1e-5)).astype(np.float32)
    dx, dw, db = call(fastbn.batch_norm_backward, g, c.x, mean, invstd, w, axis=c.axis,
                                            training=training)
    dt = np.float32
    assert_close(y, np.moveaxis(yt.detach().numpy(), 1, c.axis), dt, name="y vs autograd")
    assert_close(dx, np.moveaxis(xt.grad.numpy(), 1, c.axis), dt, name="dx vs autograd")
    assert_close(dw, wt.grad.numpy(), dt, name="dweight vs autograd")
    assert_close(db, bt.grad.numpy(), dt, name="dbias vs autograd")


@pytest.mark.parametrize("shape, axis", [((0, 3, 4, 4), 1), ((0, 4, 4, 3), -1), ((0, 3), 1)])
def test_empty_batch_inference(shape, axis):
    """Inference on an empty batch is well defined (torch allows it): empty output, and the
    backward pass in eval mode gives empty dx and zero parameter gradients."""
    x = np.zeros(shape, np.float32)
    w, b, rm, rv = inputs.params(3, np.float32, "empty")
    y = call(fastbn.batch_norm_infer, x, rm, rv, w, b, axis=axis)
    assert y.shape == shape and y.dtype == np.float32
    y = call(fastbn.batch_norm, x, rm, rv, w, b, training=False, axis=axis)
    assert y.shape == shape
    inv = (1.0 / np.sqrt(rv + np.float32(1e-5))).astype(np.float32)
    dx, dw, db = call(fastbn.batch_norm_backward, x, x, rm, inv, w, axis=axis, training=False)
    assert dx.shape == shape
    np.testing.assert_array_equal(dw, np.zeros(3))
    np.testing.assert_array_equal(db, np.zeros(3))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [
    ((2, 3, 5, 5), 1), ((3, 4, 17), 1), ((1, 512, 7, 7), 1), ((4, 8, 40), 1), ((2, 6, 3, 3), 1),
    ((64, 33), 1), ((5, 7, 7, 20), -1), ((9, 3), 1), ((16, 64, 14, 14), 1)])
def test_out_may_be_the_input(shape, axis, dtype):
    """``out=x`` (``out=dy`` in backward) is allowed: every value is read before the same
    element is written, so the result equals the one into a separate array, bit for bit --
    also where the kernels' last vector step of a run overlaps the previous one."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    C = shape[axis]
    w, b = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
    rm, rv = rng.standard_normal(C).astype(dtype), (rng.random(C) + 0.5).astype(dtype)
    y, mean, invstd = fastbn.batch_norm_train(x, w, b, axis=axis)
    yi = fastbn.batch_norm_infer(x, rm, rv, w, b, axis=axis, activation="relu")
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
    dxe = fastbn.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, training=False)[0]

    a = x.copy()
    assert fastbn.batch_norm_train(a, w, b, axis=axis, out=a)[0] is a
    np.testing.assert_array_equal(a, y)
    a = x.copy()
    assert fastbn.batch_norm_infer(a, rm, rv, w, b, axis=axis, activation="relu", out=a) is a
    np.testing.assert_array_equal(a, yi)
    for training, want in ((True, dx), (False, dxe)):
        a = x.copy()
        res = fastbn.batch_norm_backward(dy, a, mean, invstd, w, axis=axis, training=training,
                                         out=a)
        assert res[0] is a
        np.testing.assert_array_equal(a, want)
        g = dy.copy()
        res = fastbn.batch_norm_backward(g, x, mean, invstd, w, axis=axis, training=training,
                                         out=g)
        assert res[0] is g
        np.testing.assert_array_equal(g, want)
    np.testing.assert_array_equal(res[1], dw)
    np.testing.assert_array_equal(res[2], db)


def test_out_with_gaps_or_transposed_is_accepted():
    """The self-overlap check on ``out`` refuses shared elements, not ordinary strided views."""
    x = inputs.build("nchw_64x56-float32").x
    want = ref.batch_norm_train(x)[0]
    for out in (np.empty(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)[..., ::2],
                np.empty(x.shape, x.dtype, order="F"),
                np.empty(x.shape[::-1], x.dtype).transpose(),
                np.empty(x.shape, x.dtype)[::-1, :, ::-1]):
        y = fastbn.batch_norm_train(x, out=out)[0]
        assert y is out
        assert_close(y, want, x.dtype, name="y")


def test_float32_variance_beyond_range_is_inf_without_warning():
    x = np.array([[3e38], [-3e38]], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean, var = fastbn.channel_stats(x)
    assert mean[0] == 0.0 and var[0] == np.inf


def test_subclass_inputs_are_plain_arrays():
    class Sub(np.ndarray):
        pass

    x = inputs.build("nchw_64x56-float32").x
    mean, var = fastbn.channel_stats(x.view(Sub))
    rmean, rvar = ref.channel_stats(x)
    assert_close(mean, rmean, x.dtype)
    assert_close(var, rvar, x.dtype)
    with pytest.raises(TypeError, match="masked"):
        fastbn.channel_stats(np.ma.array(x))
