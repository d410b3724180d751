"""``python -m fastbn demo``: batch norm's effect on training, reproduced with fastbn's kernels.

The article this project started from trains one small network with and without a batch-norm
layer and compares the loss curves.  This package does the same in NumPy (float32) with
:class:`fastbn.BatchNorm1d` as the BN layer, on scikit-learn's bundled 8x8 digits, and adds a
deeper sigmoid network at a high learning rate.  scikit-learn and matplotlib are optional
dependencies (``pip install 'fastbn[demo]'``), imported only when the demo runs.
"""

from .cli import main

__all__ = ["main"]
