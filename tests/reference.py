"""Float64 two-pass NumPy reference ("slow" mirror) of every public fastbn function.

This module is the test oracle.  Obvious code over fast code:

* every input is first converted to float64 (float32 -> float64 is exact, so the reference sees
  exactly the values the library sees), whatever the input dtype;
* per-channel sums use ``math.fsum`` (correctly rounded), so the reference error is one rounding
  per quantity and cannot hide a cancellation problem of the library;
* variances are two-pass: mean first, then the mean of squared deviations;
* all results are float64; tests compare the library's output against them.

Conventions follow PyTorch (``torch.ops.aten.native_batch_norm`` and ``torch.nn.BatchNorm*``):
the normalisation uses the biased batch variance, the running variance is updated with the
unbiased one, ``invstd = 1 / sqrt(biased_var + eps)``.
"""

import math

import numpy as np

__all__ = [
    "BatchNorm",
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_infer",
    "batch_norm_train",
    "channel_count",
    "channel_stats",
    "channel_sum",
    "update_running_stats",
]


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def _bcast(v, ndim, axis):
    """View a per-channel vector so that it broadcasts along ``axis`` of an ``ndim`` array."""
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(v, dtype=np.float64).reshape(shape)


def channel_count(x, axis):
    """Number of values per channel (the "batch" size M of the statistics)."""
    return x.size // x.shape[axis]


def channel_sum(a, axis):
    """Correctly rounded float64 sum of ``a`` over every axis except ``axis``."""
    a = np.asarray(a, dtype=np.float64)
    rows = np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)
    return np.array([math.fsum(row) for row in rows], dtype=np.float64)


def channel_stats(x, axis=1, ddof=0):
    """Per-channel mean and variance (``ddof`` as in NumPy), two passes, float64."""
    x = _f64(x)
    m = channel_count(x, axis)
    mean = channel_sum(x, axis) / m
    dev = x - _bcast(mean, x.ndim, axis)
    var = channel_sum(dev * dev, axis) / (m - ddof)
    return mean, var


def _affine(xhat, weight, bias, axis):
    y = xhat
    if weight is not None:
        y = y * _bcast(weight, xhat.ndim, axis)
    if bias is not None:
        y = y + _bcast(bias, xhat.ndim, axis)
    return y


def _normalize(x, mean, invstd, weight, bias, axis):
    x = _f64(x)
    xhat = (x - _bcast(mean, x.ndim, axis)) * _bcast(invstd, x.ndim, axis)
    return _affine(xhat, weight, bias, axis)


def batch_norm_train(x, weight=None, bias=None, eps=1e-5, axis=1):
    """Training forward: ``(y, mean, invstd)`` with batch statistics (biased variance)."""
    mean, var = channel_stats(x, axis)
    invstd = 1.0 / np.sqrt(var + eps)
    return _normalize(x, mean, invstd, weight, bias, axis), mean, invstd


def batch_norm_infer(x, running_mean, running_var, weight=None, bias=None, eps=1e-5, axis=1,
                     activation=None):
    """Inference forward with running statistics, optional ReLU."""
    invstd = 1.0 / np.sqrt(_f64(running_var) + eps)
    y = _normalize(x, running_mean, invstd, weight, bias, axis)
    if activation == "relu":
        y = np.maximum(y, 0.0)
    elif activation is not None:
        raise ValueError(activation)
    return y


def batch_norm_backward(dy, x, mean, invstd, weight=None, axis=1, training=True):
    """Gradients ``(dx, dweight, dbias)`` of ``y = (x - mean) * invstd * weight + bias``.

    training=True: mean/invstd are the batch statistics of x, so they depend on x:
        dx = weight * invstd * (dy - mean(dy) - xhat * mean(dy * xhat))
    training=False: mean/invstd are constants (from running stats):
        dx = dy * weight * invstd
    In both cases dweight = sum(dy * xhat), dbias = sum(dy).
    """
    dy, x = _f64(dy), _f64(x)
    nd = x.ndim
    m = channel_count(x, axis)
    xhat = (x - _bcast(mean, nd, axis)) * _bcast(invstd, nd, axis)
    dbias = channel_sum(dy, axis)
    dweight = channel_sum(dy * xhat, axis)
    w = np.ones(x.shape[axis]) if weight is None else _f64(weight)
    scale = _bcast(w * _f64(invstd), nd, axis)
    if training:
        dx = scale * (dy - _bcast(dbias / m, nd, axis) - xhat * _bcast(dweight / m, nd, axis))
    else:
        dx = dy * scale
    return dx, dweight, dbias


def update_running_stats(running_mean, running_var, x, axis=1, momentum=0.1):
    """New running statistics after one training batch (unbiased variance, like PyTorch)."""
    mean, var_unbiased = channel_stats(x, axis, ddof=1)
    new_mean = (1.0 - momentum) * _f64(running_mean) + momentum * mean
    new_var = (1.0 - momentum) * _f64(running_var) + momentum * var_unbiased
    return new_mean, new_var


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, axis=1):
    """Mirror of ``torch.nn.functional.batch_norm``; returns ``(y, new_running_mean,
    new_running_var)`` instead of updating in place (the new stats are None when not given)."""
    if not training:
        y = batch_norm_infer(x, running_mean, running_var, weight, bias, eps, axis)
        return y, _f64(running_mean), _f64(running_var)
    y, _, _ = batch_norm_train(x, weight, bias, eps, axis)
    if running_mean is None:
        return y, None, None
    new_mean, new_var = update_running_stats(running_mean, running_var, x, axis, momentum)
    return y, new_mean, new_var


class BatchNorm:
    """Reference layer with the state machine of ``torch.nn.modules.batchnorm._BatchNorm``."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, axis=1):
        self.eps, self.momentum, self.axis = eps, momentum, axis
        self.affine, self.track_running_stats = affine, track_running_stats
        self.weight = np.ones(num_features) if affine else None
        self.bias = np.zeros(num_features) if affine else None
        if track_running_stats:
            self.running_mean = np.zeros(num_features)
            self.running_var = np.ones(num_features)
            self.num_batches_tracked = 0
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self.training = True
        self._saved = None

    def load_state_dict(self, sd):
        for k, v in sd.items():
            setattr(self, k, int(v) if k == "num_batches_tracked" else _f64(v).copy())

    def forward(self, x):
        factor = self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked += 1
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / self.num_batches_tracked
        use_batch_stats = self.training or not self.track_running_stats
        if use_batch_stats:
            y, mean, invstd = batch_norm_train(x, self.weight, self.bias, self.eps, self.axis)
            if self.training and self.track_running_stats:
                self.running_mean, self.running_var = update_running_stats(
                    self.running_mean, self.running_var, x, self.axis, factor)
        else:
            mean = self.running_mean
            invstd = 1.0 / np.sqrt(self.running_var + self.eps)
            y = batch_norm_infer(x, self.running_mean, self.running_var, self.weight, self.bias,
                                 self.eps, self.axis)
        self._saved = (_f64(x), mean, invstd, use_batch_stats)
        return y

    __call__ = forward

    def backward(self, dy):
        x, mean, invstd, use_batch_stats = self._saved
        return batch_norm_backward(dy, x, mean, invstd, self.weight, self.axis,
                                   training=use_batch_stats)
