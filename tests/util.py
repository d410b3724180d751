"""Assertion helpers shared by the tests (no test data here: see inputs.py; no oracle: see
reference.py)."""

import numpy as np

#: Tolerance relative to the output scale: ``max|a - ref| <= RTOL * max(1, max|ref|)``.
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-10}


def rtol(dtype):
    return RTOL[np.dtype(dtype)]


def max_abs_err(actual, desired):
    """max |actual - desired| over positions where desired is not NaN (float64)."""
    a = np.asarray(actual, dtype=np.float64)
    d = np.asarray(desired, dtype=np.float64)
    ok = ~np.isnan(d)
    if not ok.any():
        return 0.0
    return float(np.max(np.abs(a[ok] - d[ok]))) if a[ok].size else 0.0


def assert_close(actual, desired, dtype, *, slack=0.0, name="result"):
    """Assert ``max|actual - desired| <= rtol(dtype) * max(1, max|desired|) + slack``.

    ``desired`` is a float64 reference.  NaN must be exactly where the reference has NaN.
    ``slack`` is an extra absolute allowance for ill-conditioned cases; callers must justify it.
    """
    actual = np.asarray(actual)
    desired = np.asarray(desired, dtype=np.float64)
    assert actual.shape == desired.shape, f"{name}: shape {actual.shape} != {desired.shape}"
    nan_a, nan_d = np.isnan(actual), np.isnan(desired)
    assert np.array_equal(nan_a, nan_d), (
        f"{name}: NaN pattern differs ({int(nan_a.sum())} NaN in result, "
        f"{int(nan_d.sum())} in reference)")
    finite = desired[~nan_d]
    scale = max(1.0, float(np.max(np.abs(finite)))) if finite.size else 1.0
    bound = rtol(dtype) * scale + slack
    err = max_abs_err(actual, desired)
    if not err <= bound:  # also catches err == nan (inf in result where reference is finite)
        diff = np.abs(actual.astype(np.float64) - desired)
        diff[nan_d] = 0
        idx = np.unravel_index(int(np.nanargmax(diff)), diff.shape) if diff.size else ()
        raise AssertionError(
            f"{name}: max abs error {err:.3g} > bound {bound:.3g} "
            f"(rtol {rtol(dtype):g} x scale {scale:.3g} + slack {slack:.3g}); worst at {idx}: "
            f"got {actual[idx]!r}, expected {desired[idx]!r}")


class Unchanged:
    """Snapshot arrays now; ``check()`` asserts none of them was modified (NaN == NaN)."""

    def __init__(self, *arrays, **named):
        items = [(f"arg{i}", a) for i, a in enumerate(arrays)] + list(named.items())
        self._items = [(k, a, a.copy()) for k, a in items if isinstance(a, np.ndarray)]

    def check(self):
        for k, a, before in self._items:
            assert a.dtype == before.dtype and a.shape == before.shape, f"{k} changed dtype/shape"
            equal_nan = a.dtype.kind in "fc"
            assert np.array_equal(a, before, equal_nan=equal_nan), f"input {k} was modified"


def call(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, asserting afterwards that no array argument was modified --
    except ``out=`` and, for ``batch_norm(training=True)``, the running statistics, which the
    call is meant to update in place."""
    mutable = {"out"}
    if getattr(fn, "__name__", "") == "batch_norm" and kwargs.get("training", False):
        mutable |= {1, 2, "running_mean", "running_var"}
    named = {f"arg{i}": a for i, a in enumerate(args) if i not in mutable}
    named.update({k: v for k, v in kwargs.items() if k not in mutable})
    keep = Unchanged(**named)
    result = fn(*args, **kwargs)
    keep.check()
    return result


def per_channel(v, ndim, axis):
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(v).reshape(shape)


def input_precision_slack(x, invstd, weight=None, ulps=4.0):
    """Absolute error allowance of ``ulps`` units in the last place of ``max|x|`` (in x's dtype),
    propagated through the normalisation scale ``invstd * |weight|``.

    This is the error any algorithm makes once it forms a quantity of the magnitude of x in x's
    precision (e.g. ``x - mean`` with a rounded mean, or ``x * a + b``): with x = 1e4 + N(0, 1)
    in float32 one ulp is 2**-10 ~ 1e-3 while y is O(1), so only ~3 significant digits of y are
    determined by a float32 computation.  For well-scaled inputs this term is ~1e-7 and irrelevant.
    """
    x = np.asarray(x)
    xmax = np.asarray(np.max(np.abs(x)), dtype=x.dtype)
    w = 1.0 if weight is None else np.max(np.abs(np.asarray(weight, dtype=np.float64)))
    return float(ulps * np.spacing(xmax) * np.max(np.abs(invstd)) * max(1.0, w))


def torch_slack(x, invstd, weight=None, m=1):
    """Bound on PyTorch's own float64 rounding error, for comparisons against torch.

    torch computes ``y = x * a + (b - mean * a)`` with ``a = invstd * weight``, and its float64
    reductions are accurate to roughly sqrt(M) ulps (measured: the mean of 2048 values of
    1e8 + N(0, 1) is 17 ulps off, y off by 2e-7).  Allowance: 8 sqrt(M) ulps of max|x| through
    the scale ``invstd * |weight|``.  It is < 1e-11 for well-scaled inputs and only matters for
    the +1e8 cases, whose accuracy is checked against the reference separately.
    """
    x = np.asarray(x, dtype=np.float64)
    w = 1.0 if weight is None else np.max(np.abs(np.asarray(weight, dtype=np.float64)))
    return float(8.0 * np.sqrt(m) * np.finfo(np.float64).eps * np.max(np.abs(x))
                 * np.max(np.abs(invstd)) * max(1.0, w))


def to_torch(a, axis):
    """float64 torch tensor with the channel axis moved to position 1 (torch's convention)."""
    import torch
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(a, np.float64), axis, 1)))


def vec_torch(v):
    import torch
    return None if v is None else torch.from_numpy(np.asarray(v, dtype=np.float64).copy())


def from_torch(t, axis):
    """Inverse of to_torch (a float64 numpy array with the channel axis back at ``axis``)."""
    return np.moveaxis(t.detach().numpy(), 1, axis)
