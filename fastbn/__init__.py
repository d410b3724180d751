"""fastbn: batch normalization for CPUs, Numba kernels behind a NumPy API.

Importing fastbn compiles nothing: each kernel is compiled on first use (and cached on disk).
"""

__version__ = "0.1.0"

from ._config import get_num_threads, info, set_num_threads  # noqa: E402  (sets Numba's env first)
from .functional import (  # noqa: E402
    batch_norm,
    batch_norm_backward,
    batch_norm_infer,
    batch_norm_train,
    channel_stats,
    update_running_stats,
)
from .layers import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, load  # noqa: E402
from ._pool import get_output_cache, set_output_cache  # noqa: E402

__all__ = [
    "channel_stats",
    "batch_norm_train",
    "batch_norm_infer",
    "batch_norm_backward",
    "batch_norm",
    "update_running_stats",
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "load",
    "set_num_threads",
    "get_num_threads",
    "set_output_cache",
    "get_output_cache",
    "info",
]
