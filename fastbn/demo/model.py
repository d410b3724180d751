"""A small float32 multi-layer perceptron in NumPy, with fastbn's ``BatchNorm1d`` as its BN layer.

Only what the demo needs: dense layers (Keras' Glorot-uniform init, zero biases), ReLU and
sigmoid, a batch-norm wrapper around :class:`fastbn.BatchNorm1d`, softmax cross-entropy with
integer labels, and Adam / SGD.  Every layer keeps what its ``backward`` needs from the last
``forward``; ``backward`` returns the gradient with respect to the layer's input and stores the
parameter gradients, which the optimiser reads through ``parameters()`` / ``gradients()``.

Conventions follow PyTorch where Keras and PyTorch differ (the demo's tests check one training
step against ``torch.nn`` / ``torch.optim.Adam``):

* Adam is PyTorch's ``torch.optim.Adam`` (no weight decay, no AMSGrad): bias-corrected moments and
  ``p -= lr * m_hat / (sqrt(v_hat) + eps)``; the demo uses ``eps=1e-8`` (Keras: ``1e-7``, added to
  ``sqrt(v)`` before bias correction).
* Batch norm uses fastbn's (= PyTorch's) defaults, ``eps=1e-5`` and ``momentum=0.1``; Keras'
  ``BatchNormalization`` defaults to ``epsilon=1e-3`` and ``momentum=0.99`` (= 0.01 here).
* The softmax of the output layer is folded into the loss (log-softmax of the logits), which is
  the same function as softmax followed by sparse categorical cross-entropy but without Keras'
  clipping of probabilities to ``[1e-7, 1 - 1e-7]``.
"""

from __future__ import annotations

import numpy as np

DTYPE = np.float32


def glorot_uniform(rng: np.random.Generator, fan_in: int, fan_out: int,
                   dtype=DTYPE) -> np.ndarray:
    """Keras' ``glorot_uniform``: U(-l, l) with ``l = sqrt(6 / (fan_in + fan_out))``, shape
    ``(fan_in, fan_out)``.  Drawn in float64 and rounded to float32 (the demo's dtype) whatever
    ``dtype`` is, so a float64 network starts from exactly the float32 network's weights."""
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    w = rng.uniform(-limit, limit, size=(fan_in, fan_out)).astype(np.float32)
    return w.astype(dtype)


class Dense:
    """``y = x @ W + b`` with ``W`` of shape ``(in, out)`` (Keras' layout; torch's ``Linear``
    stores ``W.T``)."""

    def __init__(self, fan_in: int, fan_out: int, rng: np.random.Generator, *, bias: bool = True,
                 dtype=DTYPE):
        self.W = glorot_uniform(rng, fan_in, fan_out, dtype)
        self.b = np.zeros(fan_out, dtype) if bias else None
        self.dW = np.zeros_like(self.W)
        self.db = None if self.b is None else np.zeros_like(self.b)
        self._x = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        self._x = x
        y = x @ self.W
        if self.b is not None:
            y += self.b
        return y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        np.matmul(self._x.T, dy, out=self.dW)
        if self.b is not None:
            np.sum(dy, axis=0, out=self.db)
        return dy @ self.W.T

    def parameters(self):
        return [self.W] if self.b is None else [self.W, self.b]

    def gradients(self):
        return [self.dW] if self.b is None else [self.dW, self.db]

    def __repr__(self):
        return f"Dense({self.W.shape[0]}, {self.W.shape[1]}, bias={self.b is not None})"


class ReLU:
    def forward(self, x):
        self._mask = x > 0
        return np.where(self._mask, x, x.dtype.type(0))

    def backward(self, dy):
        return np.where(self._mask, dy, dy.dtype.type(0))

    def parameters(self):
        return []

    def gradients(self):
        return []

    def __repr__(self):
        return "ReLU()"


class Sigmoid:
    def forward(self, x):
        # 1 / (1 + exp(-x)) overflows exp for x < -88 in float32 (to inf, giving the right 0):
        # silence the warning rather than branch.
        one = x.dtype.type(1)
        with np.errstate(over="ignore"):
            self._y = one / (one + np.exp(-x))
        return self._y

    def backward(self, dy):
        y = self._y
        return dy * y * (y.dtype.type(1) - y)

    def parameters(self):
        return []

    def gradients(self):
        return []

    def __repr__(self):
        return "Sigmoid()"


class BatchNorm:
    """fastbn's ``BatchNorm1d`` as a layer of the MLP: batch statistics in training mode, running
    statistics in evaluation mode; ``weight``/``bias`` are trained by the optimiser in place."""

    def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float = 0.1,
                 dtype=DTYPE):
        import fastbn

        self.layer = fastbn.BatchNorm1d(num_features, eps=eps, momentum=momentum, dtype=dtype)

    def forward(self, x):
        return self.layer(x)

    def backward(self, dy):
        return self.layer.backward(dy)

    def parameters(self):
        return [self.layer.weight, self.layer.bias]

    def gradients(self):
        return [self.layer.grad_weight, self.layer.grad_bias]

    def __repr__(self):
        return f"BatchNorm({self.layer.num_features})"


class MLP:
    """A stack of layers; the last one produces the logits."""

    def __init__(self, layers):
        self.layers = list(layers)

    def forward(self, x: np.ndarray) -> np.ndarray:
        for layer in self.layers:
            x = layer.forward(x)
        return x

    __call__ = forward

    def backward(self, dlogits: np.ndarray) -> np.ndarray:
        d = dlogits
        for layer in reversed(self.layers):
            d = layer.backward(d)
        return d

    def parameters(self):
        return [p for layer in self.layers for p in layer.parameters()]

    def gradients(self):
        return [g for layer in self.layers for g in layer.gradients()]

    def train(self, mode: bool = True):
        for layer in self.layers:
            if isinstance(layer, BatchNorm):
                layer.layer.train(mode)
        return self

    def eval(self):
        return self.train(False)

    @property
    def bn_layers(self):
        return [layer for layer in self.layers if isinstance(layer, BatchNorm)]

    def describe(self) -> str:
        return " -> ".join(repr(layer) for layer in self.layers)


def shallow_mlp(rng: np.random.Generator, *, use_bn: bool, n_in: int = 64, hidden: int = 128,
                n_out: int = 10, bn_eps: float = 1e-5, bn_momentum: float = 0.1,
                dtype=DTYPE) -> MLP:
    """The article's network: Flatten -> Dense(hidden, ReLU) -> [BatchNorm] -> Dense(n_out) (softmax
    in the loss).  The two Dense layers draw their weights from ``rng`` in the same order with or
    without BN, so equal seeds give equal initial weights.  ``dtype``: float32 for the demo;
    float64 only for the tests' exact comparison with PyTorch."""
    first = Dense(n_in, hidden, rng, dtype=dtype)
    last = Dense(hidden, n_out, rng, dtype=dtype)
    layers = [first, ReLU()]
    if use_bn:
        layers.append(BatchNorm(hidden, eps=bn_eps, momentum=bn_momentum, dtype=dtype))
    layers.append(last)
    return MLP(layers)


def deep_mlp(rng: np.random.Generator, *, use_bn: bool, n_in: int = 64, hidden: int = 100,
             depth: int = 4, n_out: int = 10, bn_eps: float = 1e-5,
             bn_momentum: float = 0.1, dtype=DTYPE) -> MLP:
    """``depth`` hidden sigmoid layers, as in the MNIST experiment of Ioffe & Szegedy (2015):
    Dense -> [BatchNorm] -> sigmoid per hidden layer, then Dense(n_out).  With BN the hidden Dense
    layers have no bias (BN's shift replaces it; a bias there gets an exactly-zero gradient)."""
    layers = []
    fan_in = n_in
    for _ in range(depth):
        layers.append(Dense(fan_in, hidden, rng, bias=not use_bn, dtype=dtype))
        if use_bn:
            layers.append(BatchNorm(hidden, eps=bn_eps, momentum=bn_momentum, dtype=dtype))
        layers.append(Sigmoid())
        fan_in = hidden
    layers.append(Dense(fan_in, n_out, rng, dtype=dtype))
    return MLP(layers)


# ------------------------------------------------------------------------------------ loss


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray):
    """Mean sparse categorical cross-entropy of ``softmax(logits)``.

    Returns ``(loss, dlogits, probs)``: ``loss`` a Python float, ``dlogits`` the gradient of the
    mean loss with respect to ``logits`` (``(softmax - onehot) / N``, dtype of ``logits``).
    """
    n = logits.shape[0]
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=1, keepdims=True)
    probs = e / s
    rows = np.arange(n)
    log_p = z[rows, labels] - np.log(s[:, 0])
    loss = -float(np.mean(log_p, dtype=np.float64))
    dlogits = probs.copy()
    dlogits[rows, labels] -= 1
    dlogits /= n
    return loss, dlogits.astype(logits.dtype, copy=False), probs


# ------------------------------------------------------------------------------------ optimisers


class Adam:
    """``torch.optim.Adam`` (``weight_decay=0``, ``amsgrad=False``) on NumPy arrays, in place."""

    def __init__(self, params, *, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.lr, self.betas, self.eps = float(lr), tuple(float(b) for b in betas), float(eps)
        self.m = [np.zeros_like(p) for p in self.params]
        self.v = [np.zeros_like(p) for p in self.params]
        self.t = 0

    def step(self, grads):
        self.t += 1
        b1, b2 = self.betas
        bc1 = 1.0 - b1 ** self.t
        bc2 = 1.0 - b2 ** self.t
        step_size = self.lr / bc1
        sqrt_bc2 = np.sqrt(bc2)
        for p, g, m, v in zip(self.params, grads, self.m, self.v, strict=True):
            m *= b1
            m += (1.0 - b1) * g
            v *= b2
            v += (1.0 - b2) * (g * g)
            denom = np.sqrt(v) / p.dtype.type(sqrt_bc2) + p.dtype.type(self.eps)
            p -= p.dtype.type(step_size) * (m / denom)

    def settings(self):
        return {"name": "Adam", "lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "formula": "torch.optim.Adam: p -= lr * m_hat / (sqrt(v_hat) + eps)"}


class SGD:
    """Plain mini-batch gradient descent, ``p -= lr * g``."""

    def __init__(self, params, *, lr: float = 0.1):
        self.params = list(params)
        self.lr = float(lr)

    def step(self, grads):
        for p, g in zip(self.params, grads, strict=True):
            p -= p.dtype.type(self.lr) * g

    def settings(self):
        return {"name": "SGD", "lr": self.lr, "momentum": 0.0}


def make_optimizer(name: str, params, lr: float, eps: float = 1e-8):
    if name == "adam":
        return Adam(params, lr=lr, eps=eps)
    if name == "sgd":
        return SGD(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}")
