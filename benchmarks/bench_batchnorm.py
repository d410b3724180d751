"""fastbn against PyTorch and NumPy on the public shape suite, one class per op.

Each class times ``fastbn``, ``torch`` and ``numpy`` on the same cached inputs, so the dashboard
shows the speedup directly (asv compare / the graphs' parameter view). The PyTorch calls are its
kernels (``torch.ops.aten.native_batch_norm`` / ``native_batch_norm_backward``, ``torch.var_mean``);
channels-last shapes reach PyTorch as ``torch.channels_last`` tensors (see
``fastbn.bench.contenders``). Compilation happens in ``setup`` and is never timed.

Each timed method has its own ``setup`` attribute (asv runs the class ``setup``, then the method's,
with the parameters only), so a PyTorch benchmark neither compiles fastbn nor a fastbn benchmark
imports PyTorch -- asv starts a fresh process per benchmark -- and a missing PyTorch skips only the
PyTorch benchmarks.

``peakmem_*`` is the process's peak resident memory after one call: it includes the interpreter,
imports and inputs, so compare it within a class, not across classes.
"""

from . import common
from .common import setup_for


class _Op:
    params = common.PARAMS
    param_names = common.PARAM_NAMES
    timeout = 300.0
    # A few samples of at least 20 ms each keep the whole suite at a few minutes per environment.
    repeat = (2, 5, 4.0)
    min_run_count = 2
    sample_time = 0.02
    warmup_time = 0.05

    def setup(self, shape, dtype):
        common.inputs(shape, dtype)


CONTENDERS = ("fastbn", "torch", "numpy")


def _benchmark(op, contender):
    """One benchmark body with its own setup (see the module docstring)."""

    def run(self, shape, dtype):
        common.prepared(op, contender, shape, dtype)()

    run.setup = setup_for(op, contender)
    return run


def _op_class(name, op, doc, kinds):
    """An asv class for ``op``: a ``{kind}_{contender}`` method per kind and contender, generated
    rather than written out so every op and contender is measured the same way."""
    body = {"__doc__": doc, "__module__": __name__}
    for kind in kinds:
        for contender in CONTENDERS:
            fn = _benchmark(op, contender)
            fn.__name__ = fn.__qualname__ = f"{kind}_{contender}"
            body[fn.__name__] = fn
    return type(name, (_Op,), body)


TimeInfer = _op_class("TimeInfer", "infer",
                      "Inference: fused per-channel scale and shift (2B of memory traffic).",
                      ("time",))
TimeTrain = _op_class("TimeTrain", "train",
                      "Forward pass in training mode: batch statistics, then normalise (3B).",
                      ("time", "peakmem"))
TimeBackward = _op_class("TimeBackward", "backward",
                         "Backward pass in training mode: two reductions, then dx (5B).",
                         ("time", "peakmem"))
TimeStats = _op_class("TimeStats", "stats", "Per-channel mean and biased variance alone (1B).",
                      ("time",))
