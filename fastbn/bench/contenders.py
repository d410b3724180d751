"""Who runs each op: fastbn, PyTorch, NumPy, ONNX Runtime, and the copy that sets the roofline.

This is the one registry of benchmark callables: the bench CLI (``runner.py``), the asv suite
(``benchmarks/``) and the pytest-benchmark tests all build their contenders here, so they time the
same calls. ``prepare(contender, op, spec, inputs)`` returns a :class:`Prepared` whose ``fn()`` is a
zero-argument call with every input already built; the first call may compile (fastbn) or warm
caches, so callers run it once before timing.

Contender choices (each is what a user of that library would run, minus avoidable overhead):

* fastbn: the public API (``batch_norm_train``, ``batch_norm_infer``, ``batch_norm_backward`` with
  ``training=True``, ``channel_stats``), allocating its outputs like every other contender.
* PyTorch: ``torch.ops.aten.native_batch_norm`` / ``native_batch_norm_backward`` -- the CPU kernels
  themselves, so autograd bookkeeping is not counted against PyTorch -- and ``torch.var_mean`` with
  ``correction=0`` over the non-channel dims for stats. Channels-last NumPy arrays become
  ``torch.channels_last`` (4-D) / ``channels_last_3d`` (5-D) tensors without a copy; other channel
  axes become a permuted view.
* NumPy: plain vectorised NumPy (``x.mean``/``x.var`` over axes, broadcasting).
* ONNX Runtime (inference only, channels on axis 1 only): a one-node ``BatchNormalization`` model.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .suite import OPS, ShapeSpec

__all__ = [
    "CONTENDERS",
    "EPS",
    "Prepared",
    "Unavailable",
    "make_inputs",
    "prepare",
    "numpy_ops",
    "reference",
    "torch_layout",
    "load_torch",
    "load_onnxruntime",
    "compare",
]

EPS = 1e-5
CONTENDERS = ("fastbn", "torch", "numpy", "onnxruntime")
TITLES = {"fastbn": "fastbn", "torch": "PyTorch", "numpy": "NumPy", "onnxruntime": "ONNX RT",
          "copy": "copy"}


class Unavailable(Exception):
    """A contender cannot run this case (library missing, layout unsupported); ``str`` says why."""


@dataclass
class Prepared:
    """A ready-to-time call and how to read its result back as NumPy arrays.

    ``to_numpy(result)`` returns the op's outputs in a fixed order, laid out like the NumPy input:
    train -> (y, mean, invstd); infer -> (y,); backward -> (dx, dweight, dbias);
    stats -> (mean, var).
    """

    fn: Callable[[], Any]
    to_numpy: Callable[[Any], tuple]
    note: str = ""
    keep: dict = field(default_factory=dict)  # objects the closure needs alive (sessions, tensors)


# --------------------------------------------------------------------------------------------------
# Inputs


def make_inputs(spec: ShapeSpec, *, seed: int = 0, backward: bool = True) -> dict[str, np.ndarray]:
    """Seeded inputs for ``spec``: x (and dy), per-channel weight, bias, running mean and variance.

    x is standard normal plus a per-channel offset in [-2, 2] so means are not all zero. Every
    array is written once here so page faults are not timed later.
    """
    rng = np.random.default_rng(seed)
    dtype = np.dtype(spec.dtype)
    C = spec.channels
    bshape = [1] * spec.ndim
    bshape[spec.channel_axis] = C

    x = rng.standard_normal(spec.shape, dtype=dtype)
    x += np.linspace(-2.0, 2.0, C, dtype=dtype).reshape(bshape)
    out = {
        "x": x,
        "weight": (1.0 + 0.1 * rng.standard_normal(C)).astype(dtype),
        "bias": (0.1 * rng.standard_normal(C)).astype(dtype),
        "running_mean": np.linspace(-2.0, 2.0, C).astype(dtype),
        "running_var": (1.0 + 0.25 * rng.random(C)).astype(dtype),
    }
    if backward:
        out["dy"] = rng.standard_normal(spec.shape, dtype=dtype)
    return out


def _bcast(v: np.ndarray, spec: ShapeSpec) -> np.ndarray:
    s = [1] * spec.ndim
    s[spec.channel_axis] = -1
    return v.reshape(s)


# --------------------------------------------------------------------------------------------------
# NumPy: the baseline and the oracle for the result check


def numpy_ops(spec: ShapeSpec, inp: dict, eps: float = EPS, *,
              accumulate=None) -> dict[str, Callable[[], tuple]]:
    """Plain vectorised NumPy for each op (outputs in :class:`Prepared` order).

    ``accumulate=None`` is the timed baseline: what a NumPy user writes, every reduction in the
    input dtype. ``accumulate=np.float64`` is the same arithmetic with float64 reductions and
    float64 results: the oracle every contender's first result is checked against. (NumPy's
    float32 sums are pairwise only along a contiguous axis; reducing over the leading axes of a
    channels-last tensor adds row after row, which drifts by ~1e-3 on nhwc_c3.)
    """
    red = spec.reduce_axes
    x, w, b = inp["x"], inp["weight"], inp["bias"]
    dtype = x.dtype if accumulate is None else np.dtype(accumulate)
    M = spec.size // spec.channels
    wb, bb = _bcast(w, spec), _bcast(b, spec)
    acc = {} if accumulate is None else {"dtype": accumulate}
    epsv = dtype.type(eps)

    def train():
        m = x.mean(axis=red, keepdims=True, **acc)
        v = x.var(axis=red, keepdims=True, **acc)
        invstd = (1.0 / np.sqrt(v + epsv)).astype(dtype, copy=False)
        y = (x - m) * (invstd * wb) + bb
        return y, m.reshape(-1), invstd.reshape(-1)

    def infer():
        scale = (w.astype(dtype) / np.sqrt(inp["running_var"] + epsv)).astype(dtype, copy=False)
        shift = b - inp["running_mean"] * scale
        y = x * _bcast(scale, spec)
        y += _bcast(shift, spec)
        return (y,)

    def stats():
        return x.mean(axis=red, **acc), x.var(axis=red, **acc)

    out = {"train": train, "infer": infer, "stats": stats}

    if "dy" in inp:
        dy = inp["dy"]
        # The saved statistics a training forward pass hands to backward.
        m_saved = x.mean(axis=red, keepdims=True, **acc)
        invstd_saved = (1.0 / np.sqrt(x.var(axis=red, keepdims=True, **acc) + epsv)).astype(
            dtype, copy=False)

        def backward():
            xhat = (x - m_saved) * invstd_saved
            dbias = dy.sum(axis=red, **acc)
            dweight = (dy * xhat).sum(axis=red, **acc)
            k = (wb * invstd_saved) / dtype.type(M)
            dx = k * (M * dy - _bcast(dbias, spec) - xhat * _bcast(dweight, spec))
            return dx.astype(dtype, copy=False), dweight, dbias

        out["backward"] = backward
    return out


def reference(op: str, spec: ShapeSpec, inp: dict, eps: float = EPS) -> tuple:
    """The oracle result of ``op``: NumPy with float64 reductions (see :func:`numpy_ops`)."""
    return tuple(np.asarray(a) for a in numpy_ops(spec, inp, eps, accumulate=np.float64)[op]())


# --------------------------------------------------------------------------------------------------
# Optional libraries


def load_torch():
    """Import PyTorch, or raise :class:`Unavailable` saying it is not installed."""
    try:
        return importlib.import_module("torch")
    except ImportError as exc:  # also covers sys.modules["torch"] = None
        raise Unavailable(f"PyTorch is not installed ({exc})") from None


def load_onnxruntime():
    """Import onnxruntime and onnx (the model is built with onnx), or raise :class:`Unavailable`."""
    try:
        ort = importlib.import_module("onnxruntime")
        onnx = importlib.import_module("onnx")
    except ImportError as exc:
        raise Unavailable(f"onnxruntime/onnx not installed ({exc})") from None
    return ort, onnx


def torch_layout(spec: ShapeSpec) -> tuple[tuple[int, ...], str]:
    """The permutation that puts channels on dim 1 for ``torch``, and what that tensor is called.

    A C-contiguous NHWC array permuted (0, 3, 1, 2) *is* a ``torch.channels_last`` tensor; NDHWC
    permuted (0, 4, 1, 2, 3) is ``channels_last_3d``. Any other channel axis becomes a permuted
    (strided) view, which PyTorch may copy internally.
    """
    ax = spec.channel_axis
    if ax == 1:
        return tuple(range(spec.ndim)), "contiguous"
    rest = [i for i in range(spec.ndim) if i != ax]
    perm = (rest[0], ax, *rest[1:])
    if spec.channels_last and spec.ndim == 4:
        return perm, "channels_last"
    if spec.channels_last and spec.ndim == 5:
        return perm, "channels_last_3d"
    return perm, "permuted view"


def _torch_to_numpy(perm):
    inv = tuple(int(i) for i in np.argsort(perm))

    def conv(t):
        a = t.detach().numpy()
        return a.transpose(inv) if a.ndim == len(inv) else a

    return conv


# --------------------------------------------------------------------------------------------------
# Builders


def _prepare_fastbn(op, spec, inp, eps, out):
    try:
        fb = importlib.import_module("fastbn")
    except ImportError as exc:
        raise Unavailable(f"fastbn cannot be imported ({exc})") from None
    ax = spec.axis
    x, w, b = inp["x"], inp["weight"], inp["bias"]
    buf = np.empty_like(x) if out else None
    if buf is not None:
        buf.fill(0)
    if op == "train":
        fn = lambda: fb.batch_norm_train(x, w, b, eps=eps, axis=ax, out=buf)  # noqa: E731
        conv = lambda r: (np.asarray(r[0]), np.asarray(r[1]), np.asarray(r[2]))  # noqa: E731
    elif op == "infer":
        rm, rv = inp["running_mean"], inp["running_var"]
        fn = lambda: fb.batch_norm_infer(x, rm, rv, w, b, eps=eps, axis=ax, out=buf)  # noqa: E731
        conv = lambda r: (np.asarray(r),)  # noqa: E731
    elif op == "backward":
        _, mean, invstd = fb.batch_norm_train(x, w, b, eps=eps, axis=ax)
        dy = inp["dy"]
        fn = lambda: fb.batch_norm_backward(  # noqa: E731
            dy, x, mean, invstd, w, axis=ax, training=True, out=buf)
        conv = lambda r: tuple(np.asarray(a) for a in r)  # noqa: E731
    elif op == "stats":
        fn = lambda: fb.channel_stats(x, axis=ax)  # noqa: E731
        conv = lambda r: (np.asarray(r[0]), np.asarray(r[1]))  # noqa: E731
    else:
        raise ValueError(op)
    return Prepared(fn, conv, note="out= preallocated" if out else "")


def _prepare_torch(op, spec, inp, eps, threads):
    torch = load_torch()
    if spec.ndim < 2:
        raise Unavailable("PyTorch batch norm needs at least 2 dimensions")
    if threads:
        torch.set_num_threads(int(threads))
    aten = torch.ops.aten
    perm, layout = torch_layout(spec)
    conv_x = _torch_to_numpy(perm)
    tx = torch.from_numpy(inp["x"]).permute(perm)
    tw, tb = torch.from_numpy(inp["weight"]), torch.from_numpy(inp["bias"])
    keep = {"x": tx}
    vec = lambda t: t.detach().numpy().reshape(-1)  # noqa: E731
    if op == "train":
        fn = lambda: aten.native_batch_norm(tx, tw, tb, None, None, True, 0.1, eps)  # noqa: E731
        conv = lambda r: (conv_x(r[0]), vec(r[1]), vec(r[2]))  # noqa: E731
    elif op == "infer":
        trm = torch.from_numpy(inp["running_mean"])
        trv = torch.from_numpy(inp["running_var"])
        fn = lambda: aten.native_batch_norm(tx, tw, tb, trm, trv, False, 0.1, eps)  # noqa: E731
        conv = lambda r: (conv_x(r[0]),)  # noqa: E731
    elif op == "backward":
        tdy = torch.from_numpy(inp["dy"]).permute(perm)
        _, save_mean, save_invstd = aten.native_batch_norm(tx, tw, tb, None, None, True, 0.1, eps)
        mask = [True, True, True]
        fn = lambda: aten.native_batch_norm_backward(  # noqa: E731
            tdy, tx, tw, None, None, save_mean, save_invstd, True, eps, mask)
        conv = lambda r: (conv_x(r[0]), vec(r[1]), vec(r[2]))  # noqa: E731
        keep["dy"] = tdy
    elif op == "stats":
        dims = [d for d in range(spec.ndim) if d != 1]
        fn = lambda: torch.var_mean(tx, dim=dims, correction=0)  # noqa: E731
        conv = lambda r: (vec(r[1]), vec(r[0]))  # noqa: E731
    else:
        raise ValueError(op)
    return Prepared(fn, conv, note=layout, keep=keep)


def _onnx_model(onnx, spec, inp, eps):
    from onnx import TensorProto, helper, numpy_helper

    elem = {"float32": TensorProto.FLOAT, "float64": TensorProto.DOUBLE}[spec.dtype]
    node = helper.make_node(
        "BatchNormalization", ["X", "scale", "B", "mean", "var"], ["Y"], epsilon=float(eps))
    inits = [
        numpy_helper.from_array(inp["weight"], "scale"),
        numpy_helper.from_array(inp["bias"], "B"),
        numpy_helper.from_array(inp["running_mean"], "mean"),
        numpy_helper.from_array(inp["running_var"], "var"),
    ]
    graph = helper.make_graph(
        [node], "fastbn_bench_bn",
        [helper.make_tensor_value_info("X", elem, list(spec.shape))],
        [helper.make_tensor_value_info("Y", elem, list(spec.shape))],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)],
                              producer_name="fastbn.bench")
    # Older runtimes reject models stamped with a newer IR version than they know.
    model.ir_version = min(model.ir_version, 9)
    return model


def _prepare_onnxruntime(op, spec, inp, eps, threads):
    if op != "infer":
        raise Unavailable("ONNX Runtime is an inference peer only")
    if spec.channel_axis != 1:
        raise Unavailable("ONNX BatchNormalization is NCHW only (channels on axis 1)")
    ort, onnx = load_onnxruntime()
    model = _onnx_model(onnx, spec, inp, eps)
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # ORT's pool spins after each run by default; in an interleaved run on few cores the spinning
    # threads would steal time from whichever contender runs next.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        sess = ort.InferenceSession(model.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # e.g. a dtype without a CPU kernel
        raise Unavailable(f"ONNX Runtime rejected the model: {exc}") from None
    x = inp["x"]
    fn = lambda: sess.run(["Y"], {"X": x})[0]  # noqa: E731
    return Prepared(fn, lambda r: (r,), note="no spinning", keep={"session": sess})


def prepare(contender: str, op: str, spec: ShapeSpec, inp: dict, *, eps: float = EPS,
            threads: int | None = None, out: bool = False) -> Prepared:
    """Build the timed call of ``contender`` for ``op`` on ``spec``.

    Raises :class:`Unavailable` when the contender cannot run here (say why in the output).
    ``threads`` sets PyTorch's / ONNX Runtime's pool size (fastbn's is set by the caller).
    ``out=True`` gives fastbn a preallocated output buffer.
    """
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}")
    if op == "backward" and "dy" not in inp:
        raise ValueError("inputs were made with backward=False")
    if contender == "fastbn":
        return _prepare_fastbn(op, spec, inp, eps, out)
    if contender == "torch":
        return _prepare_torch(op, spec, inp, eps, threads)
    if contender == "numpy":
        fn = numpy_ops(spec, inp, eps)[op]
        return Prepared(fn, lambda r: tuple(np.asarray(a) for a in r))
    if contender == "onnxruntime":
        return _prepare_onnxruntime(op, spec, inp, eps, threads)
    raise ValueError(f"unknown contender {contender!r}")


# --------------------------------------------------------------------------------------------------
# Result check


def compare(got: tuple, ref: tuple, floors: tuple | None = None) -> float:
    """Largest difference between two result tuples, relative to each reference array's max |value|
    (or to ``floors[i]`` where that is larger: the scale of the terms an array sums).

    Used to make sure every contender computes what :func:`reference` does (a benchmark of the
    wrong function is how asv suites rot). Returns ``inf`` on a shape mismatch, or on NaN where
    the reference has none.
    """
    worst = 0.0
    if len(got) != len(ref):
        return math.inf
    floors = floors or (0.0,) * len(ref)
    for a, r, floor in zip(got, ref, floors, strict=True):
        a = np.asarray(a, dtype=np.float64)
        r = np.asarray(r, dtype=np.float64)
        if a.size != r.size:
            return math.inf
        a = a.reshape(r.shape)
        if np.isnan(a).any() and not np.isnan(r).any():
            return math.inf
        scale = max(float(np.max(np.abs(r))) if r.size else 0.0, floor)
        diff = float(np.max(np.abs(a - r))) if r.size else 0.0
        worst = max(worst, diff / max(scale, np.finfo(np.float64).tiny))
    return worst


def tolerance(dtype: str) -> float:
    """How far apart float results may be and still be the same computation."""
    return 1e-3 if np.dtype(dtype).itemsize <= 4 else 1e-8
