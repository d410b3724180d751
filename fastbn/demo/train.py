"""Data, training loop and progress display for the demo."""

from __future__ import annotations

import math
import sys
import time

import numpy as np

from .model import DTYPE, MLP, softmax_cross_entropy

DEMO_EXTRA_HINT = "pip install 'fastbn[demo]'"


class MissingDependency(RuntimeError):
    pass


def require(module: str, purpose: str):
    """Import ``module`` or raise :class:`MissingDependency` naming the ``demo`` extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependency(
            f"the demo needs {purpose} ({module!r} could not be imported: {exc}); "
            f"install the demo extra: {DEMO_EXTRA_HINT}") from None


# ------------------------------------------------------------------------------------ data


def load_digits_split(seed: int, validation_split: float = 0.2):
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, shipped inside sklearn: no
    download), pixels scaled to [0, 1] by dividing by 16, flattened to 64 features, float32.

    The samples are shuffled once with ``seed``; the last ``validation_split`` of them (Keras'
    rule: ``int(n * (1 - split))`` training samples) is held out for validation.
    Returns ``(x_train, y_train, x_val, y_val, info)``.
    """
    datasets = require("sklearn.datasets", "scikit-learn's bundled digits data set")
    digits = datasets.load_digits()
    images = np.asarray(digits.images, dtype=np.float64)
    x = (images.reshape(len(images), -1) / 16.0).astype(DTYPE)  # Flatten
    y = np.asarray(digits.target, dtype=np.int64)
    perm = np.random.default_rng([seed, 0]).permutation(len(x))
    x, y = x[perm], y[perm]
    n_train = int(len(x) * (1.0 - validation_split))
    info = {
        "name": "sklearn.datasets.load_digits",
        "samples": int(len(x)),
        "features": int(x.shape[1]),
        "classes": int(y.max() + 1),
        "scaling": "pixel / 16 -> [0, 1]",
        "validation_split": validation_split,
        "train_samples": n_train,
        "val_samples": int(len(x) - n_train),
        "split": "one seeded shuffle, then the last 20 % held out",
    }
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:], info


# ------------------------------------------------------------------------------------ progress


class _LineProgress:
    """Stand-in for tqdm: one stderr line per epoch."""

    def __init__(self, total: int, desc: str, stream=None):
        self.total, self.desc, self.n = total, desc, 0
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        self.postfix = ""

    def set_postfix_str(self, s: str, refresh: bool = True):
        self.postfix = s

    def update(self, k: int = 1):
        self.n += k
        width = 20
        filled = int(width * self.n / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(f"{self.desc} [{bar}] epoch {self.n}/{self.total} "
                          f"{time.perf_counter() - self.t0:5.1f}s {self.postfix}\n")
        self.stream.flush()

    def close(self):
        pass


class _NoProgress:
    def set_postfix_str(self, s, refresh=True):
        pass

    def update(self, k=1):
        pass

    def close(self):
        pass


def progress(total: int, desc: str, enabled: bool = True):
    """A per-epoch progress bar on stderr: tqdm if installed, else one line per epoch."""
    if not enabled:
        return _NoProgress()
    try:
        from tqdm import tqdm
    except ImportError:
        return _LineProgress(total, desc)
    return tqdm(total=total, desc=desc, unit="epoch", file=sys.stderr, dynamic_ncols=True,
                leave=True)


# ------------------------------------------------------------------------------------ training


def _finite(v: float):
    return float(v) if math.isfinite(v) else None


def evaluate(model: MLP, x: np.ndarray, y: np.ndarray):
    """Loss and accuracy in evaluation mode (BN uses its running statistics)."""
    model.eval()
    logits = model.forward(x)
    loss, _, probs = softmax_cross_entropy(logits, y)
    acc = float(np.mean(np.argmax(probs, axis=1) == y))
    return loss, acc


def fit(model: MLP, optimizer, x_train, y_train, x_val, y_val, *, epochs: int, batch_size: int,
        seed: int, desc: str = "", show_progress: bool = True) -> dict:
    """Keras-style ``fit``: every epoch a fresh seeded shuffle, mini-batches of ``batch_size``
    (the last one smaller) in training mode, then validation in evaluation mode.

    ``loss``/``accuracy`` per epoch are the sample-weighted means over the epoch's mini-batches,
    measured during training, as Keras' history reports them.  Non-finite losses are stored as
    ``None`` (JSON has no NaN).
    """
    rng = np.random.default_rng([seed, 2])
    n = len(x_train)
    hist = {"loss": [], "accuracy": [], "val_loss": [], "val_accuracy": [], "epoch_seconds": []}
    bar = progress(epochs, desc, show_progress)
    try:
        for _ in range(epochs):
            t0 = time.perf_counter()
            model.train()
            order = rng.permutation(n)
            total_loss = 0.0
            correct = 0
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                xb, yb = x_train[idx], y_train[idx]
                logits = model.forward(xb)
                loss, dlogits, probs = softmax_cross_entropy(logits, yb)
                model.backward(dlogits)
                optimizer.step(model.gradients())
                total_loss += loss * len(idx)
                correct += int(np.sum(np.argmax(probs, axis=1) == yb))
            val_loss, val_acc = evaluate(model, x_val, y_val)
            hist["loss"].append(_finite(total_loss / n))
            hist["accuracy"].append(correct / n)
            hist["val_loss"].append(_finite(val_loss))
            hist["val_accuracy"].append(val_acc)
            hist["epoch_seconds"].append(round(time.perf_counter() - t0, 4))
            bar.set_postfix_str(f"loss {total_loss / n:.4f} val_loss {val_loss:.4f} "
                                f"val_acc {val_acc:.4f}", refresh=False)
            bar.update(1)
    finally:
        bar.close()
    return hist
