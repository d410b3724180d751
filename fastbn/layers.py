"""Stateful batch-norm layers with PyTorch's semantics and state_dict keys."""

import json
from collections import namedtuple

import numpy as np

from . import functional as F

_STATE_KEYS_AFFINE = ("weight", "bias")
_STATE_KEYS_RUNNING = ("running_mean", "running_var", "num_batches_tracked")

#: What ``load_state_dict`` returns, as torch.nn.Module.load_state_dict does.
IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


class BatchNorm:
    """Batch normalisation over the channel axis ``axis`` of a 2-D to 5-D array.

    Mirrors ``torch.nn.BatchNorm{1,2,3}d``: ``weight`` (ones) and ``bias`` (zeros) when
    ``affine``; ``running_mean`` (zeros), ``running_var`` (ones) and ``num_batches_tracked``
    when ``track_running_stats``.  In training mode the batch statistics normalise the input and
    the running statistics are updated with ``momentum`` (``momentum=None``: cumulative average,
    ``1 / num_batches_tracked``); in evaluation mode the running statistics normalise the input
    (or the batch statistics when ``track_running_stats=False``).

    ``layer(x)`` runs forward and keeps what ``layer.backward(dy)`` needs (a reference to ``x``,
    not a copy: do not modify ``x`` in between).  ``backward`` returns ``dx`` and sets
    ``grad_weight``/``grad_bias`` (overwritten on each call, not accumulated).
    """

    _ranks = (2, 3, 4, 5)

    def __init__(self, num_features, *, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, axis=1, dtype=np.float32):
        num_features = F._integer(num_features, "num_features")
        if num_features <= 0:
            raise ValueError(f"num_features must be positive, got {num_features}")
        # None is PyTorch's default dtype, float32 (np.dtype(None) would be float64)
        dtype = np.dtype(np.float32 if dtype is None else dtype)
        if dtype not in F._FLOATS:
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        axis = F._integer(axis, "axis")
        self.num_features = num_features
        self.eps = F._positive(eps, "eps")
        self.momentum = None if momentum is None else F._momentum(momentum)
        self.affine = F._flag(affine, "affine")
        self.track_running_stats = F._flag(track_running_stats, "track_running_stats")
        self.axis = axis
        self.dtype = dtype
        self.training = True
        if self.affine:
            self.weight = np.ones(num_features, dtype)
            self.bias = np.zeros(num_features, dtype)
        else:
            self.weight = self.bias = None
        if self.track_running_stats:
            self.running_mean = np.zeros(num_features, dtype)
            self.running_var = np.ones(num_features, dtype)
            self.num_batches_tracked = np.array(0, dtype=np.int64)
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self.grad_weight = self.grad_bias = None
        self._saved = None

    # ------------------------------------------------------------------ modes
    def train(self, mode=True):
        if not isinstance(mode, (bool, np.bool_)):  # as torch.nn.Module.train
            raise ValueError(f"training mode is expected to be boolean, got {mode!r}")
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked[...] = 0

    def reset_parameters(self):
        self.reset_running_stats()
        if self.affine:
            self.weight[...] = 1
            self.bias[...] = 0

    # ------------------------------------------------------------------ forward / backward
    def _check_input(self, x):
        x = F._array(x, "x")
        if x.ndim not in self._ranks:
            want = " or ".join(f"{r}D" for r in self._ranks)
            raise ValueError(f"{type(self).__name__} expected {want} input (got {x.ndim}D input)")
        if x.dtype != self.dtype:
            raise TypeError(f"x has dtype {x.dtype} but this layer holds {self.dtype} parameters")
        x, axis = F._x_and_axis(x, self.axis)
        if x.shape[axis] != self.num_features:
            raise ValueError(f"x has {x.shape[axis]} channels on axis {self.axis}, "
                             f"expected num_features={self.num_features}")
        return x, axis

    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):
        x, axis = self._check_input(x)
        use_batch = self.training or not self.track_running_stats
        if use_batch:
            L = F._require_training_size(x, axis)
            y, mean, var = F._train(x, axis, self.weight, self.bias, self.eps, None)
            invstd = 1.0 / np.sqrt(var + self.eps)
            if self.training and self.track_running_stats:
                self.num_batches_tracked += 1
                if self.momentum is None:
                    factor = 1.0 / float(self.num_batches_tracked)
                else:
                    factor = self.momentum
                F._update_running(self.running_mean, self.running_var, mean, var, L, factor)
            self._saved = (x, axis, mean, invstd, True)
        else:
            y = F.batch_norm_infer(x, self.running_mean, self.running_var, self.weight, self.bias,
                                   eps=self.eps, axis=axis)
            invstd = 1.0 / np.sqrt(self.running_var.astype(np.float64) + self.eps)
            self._saved = (x, axis, self.running_mean.copy(), invstd, False)
        return y

    def backward(self, dy):
        """Gradient with respect to the last forward's input; sets grad_weight and grad_bias."""
        if self._saved is None:
            raise ValueError("backward called before a forward pass: there is no saved input")
        x, axis, mean, invstd, training = self._saved
        dy = F._array(dy, "dy")
        if dy.shape != x.shape:
            raise ValueError(f"dy must have the shape of the last forward input {x.shape}, got {dy.shape}")
        dx, dw, db = F.batch_norm_backward(dy, x, mean, invstd, self.weight, axis=axis,
                                           training=training)
        if self.affine:
            self.grad_weight = dw.astype(self.dtype, copy=False)
            self.grad_bias = db.astype(self.dtype, copy=False)
        return dx

    # ------------------------------------------------------------------ state
    def _state_keys(self):
        keys = []
        if self.affine:
            keys += _STATE_KEYS_AFFINE
        if self.track_running_stats:
            keys += _STATE_KEYS_RUNNING
        return keys

    def state_dict(self):
        """Copies of the state under PyTorch's keys (``num_batches_tracked`` as a 0-d int64)."""
        return {k: np.array(getattr(self, k), copy=True) for k in self._state_keys()}

    def load_state_dict(self, state_dict, strict=True):
        """Load state under PyTorch's keys, e.g. ``{k: v.numpy() for k, v in
        torch_module.state_dict().items()}``.  Every key and shape is checked before anything is
        written, so a failing call leaves the layer unchanged.  Returns the missing and
        unexpected keys (``IncompatibleKeys``; both empty unless ``strict=False``)."""
        if not hasattr(state_dict, "keys"):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        keys = self._state_keys()
        # As PyTorch with a plain dict (no version metadata): a missing num_batches_tracked is
        # not an error, and the layer keeps its own count.
        missing = [k for k in keys if k not in state_dict and k != "num_batches_tracked"]
        unexpected = [k for k in state_dict.keys() if k not in keys]
        if strict and (missing or unexpected):
            raise ValueError(f"Error(s) in loading state_dict for {type(self).__name__}: "
                             f"missing keys {missing}, unexpected keys {unexpected}")
        staged = {}
        for k in keys:
            if k not in state_dict:
                continue
            v = state_dict[k]
            if hasattr(v, "detach"):  # a torch tensor
                v = v.detach().cpu()
                try:
                    v = v.numpy()
                except TypeError as e:  # a type NumPy lacks
                    if not v.is_floating_point():
                        raise TypeError(f"{k}: {e}") from None
                    v = v.float().numpy()  # bfloat16 (or float8) widens to float32 exactly
            v = np.asarray(v)
            if k == "num_batches_tracked":
                if v.shape not in ((), (1,)) or v.dtype.kind not in "iu":
                    raise ValueError(f"num_batches_tracked must be an integer scalar, got dtype "
                                     f"{v.dtype} shape {v.shape}")
                n = int(v.reshape(()))
                if not 0 <= n < 2**63:
                    raise ValueError(f"num_batches_tracked must be in [0, 2**63), got {n}")
                staged[k] = np.array(n, dtype=np.int64)
                continue
            if v.dtype.kind != "f":
                raise TypeError(f"{k} must be a float array, got dtype {v.dtype}")
            if v.shape != (self.num_features,):
                raise ValueError(f"size mismatch for {k}: expected shape ({self.num_features},), "
                                 f"got {v.shape}")
            staged[k] = v.astype(self.dtype)
        for k, v in staged.items():
            getattr(self, k)[...] = v
        return IncompatibleKeys(missing, unexpected)

    def _config(self):
        return {
            "class": type(self).__name__, "num_features": self.num_features, "eps": self.eps,
            "momentum": self.momentum, "affine": self.affine,
            "track_running_stats": self.track_running_stats, "axis": self.axis,
            "dtype": self.dtype.name,
        }

    def save(self, path):
        """Save configuration and state to an ``.npz`` file (no pickle involved)."""
        np.savez(path, __config__=np.array(json.dumps(self._config())), **self.state_dict())

    @classmethod
    def load(cls, path):
        """A layer restored from :meth:`save`; files holding pickled objects are refused."""
        return load(path)

    def __repr__(self):
        c = self._config()
        return (f"{c['class']}({c['num_features']}, eps={c['eps']}, momentum={c['momentum']}, "
                f"affine={c['affine']}, track_running_stats={c['track_running_stats']}, "
                f"axis={c['axis']}, dtype={c['dtype']})")


class BatchNorm1d(BatchNorm):
    """``BatchNorm`` for (N, C) or (N, C, L) input, as ``torch.nn.BatchNorm1d``."""

    _ranks = (2, 3)


class BatchNorm2d(BatchNorm):
    """``BatchNorm`` for (N, C, H, W) input, as ``torch.nn.BatchNorm2d`` (``axis=-1`` for NHWC)."""

    _ranks = (4,)


class BatchNorm3d(BatchNorm):
    """``BatchNorm`` for (N, C, D, H, W) input, as ``torch.nn.BatchNorm3d``."""

    _ranks = (5,)


_CLASSES = {c.__name__: c for c in (BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d)}


def load(path):
    """Restore a layer saved with ``BatchNorm.save``; pickled content is refused, and a file
    that is not such a layer raises ValueError saying why."""
    try:
        data = np.load(path, allow_pickle=False)
    except ValueError as exc:  # NumPy's refusal of object arrays
        raise ValueError(f"{path}: refusing to load pickled objects ({exc})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: not a fastbn layer file (a single array, not an .npz archive)")
    try:
        with data:
            arrays = {k: data[k] for k in data.files}
    except ValueError as exc:  # an object array inside the archive
        raise ValueError(f"{path}: refusing to load pickled objects ({exc})") from None
    if "__config__" not in arrays:
        raise ValueError(f"{path}: not a fastbn layer file (no __config__ entry)")
    try:
        cfg = json.loads(str(arrays.pop("__config__")))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a fastbn layer file (bad __config__: {exc})") from None
    if not isinstance(cfg, dict) or not {"class", "num_features"} <= cfg.keys():
        raise ValueError(f"{path}: not a fastbn layer file (__config__ lacks class and "
                         f"num_features)")
    name = cfg.pop("class")
    cls = _CLASSES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"{path}: unknown layer class {name!r}")
    num_features = cfg.pop("num_features")
    try:  # unknown keys and bad values alike
        layer = cls(num_features, **cfg)
    except TypeError as exc:
        raise ValueError(f"{path}: bad layer configuration ({exc})") from None
    layer.load_state_dict(arrays)
    return layer
