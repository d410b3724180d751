"""Private Numba kernels.

Two families cover every layout (see ``fastbn._layout``):

* ``channels_first`` works on a 3-D view ``(N, C, S)`` whose last axis is the longest
  contiguous run: reductions walk each channel's ``N`` runs of ``S`` elements, vectorising along
  ``S``.
* ``channels_last`` works on a 2-D view ``(M, C)`` with ``C`` innermost: reductions walk blocks
  of rows and vectorise across ``C``, with per-block partial vectors.

Each kernel is written once with ``prange`` and compiled lazily, per dtype and memory layout, as a
parallel and a serial build (``fastbn._config.Kernel``).  Reductions split the data into work
items whose number depends only on the shape, and partial results are merged in a fixed order, so
results are bit-identical whatever the thread count.
"""
