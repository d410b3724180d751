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


class TimeInfer(_Op):
    """Inference: fused per-channel scale and shift (2B of memory traffic)."""

    def time_fastbn(self, shape, dtype):
        common.prepared("infer", "fastbn", shape, dtype)()

    time_fastbn.setup = setup_for("infer", "fastbn")

    def time_torch(self, shape, dtype):
        common.prepared("infer", "torch", shape, dtype)()

    time_torch.setup = setup_for("infer", "torch")

    def time_numpy(self, shape, dtype):
        common.prepared("infer", "numpy", shape, dtype)()

    time_numpy.setup = setup_for("infer", "numpy")


class TimeTrain(_Op):
    """Forward pass in training mode: batch statistics, then normalise (3B)."""

    def time_fastbn(self, shape, dtype):
        common.prepared("train", "fastbn", shape, dtype)()

    time_fastbn.setup = setup_for("train", "fastbn")

    def time_torch(self, shape, dtype):
        common.prepared("train", "torch", shape, dtype)()

    time_torch.setup = setup_for("train", "torch")

    def time_numpy(self, shape, dtype):
        common.prepared("train", "numpy", shape, dtype)()

    time_numpy.setup = setup_for("train", "numpy")

    def peakmem_fastbn(self, shape, dtype):
        common.prepared("train", "fastbn", shape, dtype)()

    peakmem_fastbn.setup = setup_for("train", "fastbn")

    def peakmem_torch(self, shape, dtype):
        common.prepared("train", "torch", shape, dtype)()

    peakmem_torch.setup = setup_for("train", "torch")

    def peakmem_numpy(self, shape, dtype):
        common.prepared("train", "numpy", shape, dtype)()

    peakmem_numpy.setup = setup_for("train", "numpy")


class TimeBackward(_Op):
    """Backward pass in training mode: two reductions, then dx (5B)."""

    def time_fastbn(self, shape, dtype):
        common.prepared("backward", "fastbn", shape, dtype)()

    time_fastbn.setup = setup_for("backward", "fastbn")

    def time_torch(self, shape, dtype):
        common.prepared("backward", "torch", shape, dtype)()

    time_torch.setup = setup_for("backward", "torch")

    def time_numpy(self, shape, dtype):
        common.prepared("backward", "numpy", shape, dtype)()

    time_numpy.setup = setup_for("backward", "numpy")

    def peakmem_fastbn(self, shape, dtype):
        common.prepared("backward", "fastbn", shape, dtype)()

    peakmem_fastbn.setup = setup_for("backward", "fastbn")

    def peakmem_torch(self, shape, dtype):
        common.prepared("backward", "torch", shape, dtype)()

    peakmem_torch.setup = setup_for("backward", "torch")

    def peakmem_numpy(self, shape, dtype):
        common.prepared("backward", "numpy", shape, dtype)()

    peakmem_numpy.setup = setup_for("backward", "numpy")


class TimeStats(_Op):
    """Per-channel mean and biased variance alone (1B)."""

    def time_fastbn(self, shape, dtype):
        common.prepared("stats", "fastbn", shape, dtype)()

    time_fastbn.setup = setup_for("stats", "fastbn")

    def time_torch(self, shape, dtype):
        common.prepared("stats", "torch", shape, dtype)()

    time_torch.setup = setup_for("stats", "torch")

    def time_numpy(self, shape, dtype):
        common.prepared("stats", "numpy", shape, dtype)()

    time_numpy.setup = setup_for("stats", "numpy")
