"""Route any channel axis of any strided array to one of the two kernel families.

Batch norm reduces over every axis but the channel axis, so the order of those axes does not
matter.  :func:`plan` sorts them by stride (largest first) and reverses negative-stride axes,
then splits them into the axes with a larger stride than the channel axis (merged into ``N``) and
those with a smaller one (merged into ``S``).  The result is a view ``(N, C, S)`` for the
channels-first kernels, or ``(N, C)`` for the channels-last kernels when ``S`` is 1.  This is
decided from strides, not from the caller's ``axis``: an NCHW tensor stored channels-last goes to
the channels-last kernels.

When the axes cannot be merged without copying (a view with gaps in the middle, say
``x[:, :, ::2]``), the input is copied once into the kernel's layout; outputs are then computed
into a scratch array and copied back.
"""

import numpy as np

from . import _pool

try:  # NumPy >= 2.1 says so directly
    np.reshape(np.empty((2, 2))[:, :1], (2,), copy=False)

    def _reshape_nocopy(a, shape):
        try:
            return np.reshape(a, shape, copy=False)
        except ValueError:
            return None

except TypeError:  # older NumPy: assigning .shape refuses to copy

    def _reshape_nocopy(a, shape):
        v = a.view()
        try:
            v.shape = shape
        except AttributeError:
            return None
        return v


class Plan:
    """How an array of a given shape and strides maps onto a kernel view.

    ``channels_last`` tells the family; ``shape3`` is the view's shape (3-D or 2-D).  The same
    plan maps every array of the operation (``x``, ``dy``, ``y``, ``out``) so that element
    correspondence holds even when their strides differ.
    """

    __slots__ = ("shape", "axis", "C", "perm", "inverse", "kshape", "index", "shape3",
                 "channels_last", "trivial")

    def view(self, a):
        """``a`` as the kernel view without copying, or None if that is impossible.

        Kernels read and write the last axis of a view as contiguous, aligned vectors
        (see _kernels.simd), so a view with a gap or misalignment there does not count."""
        flags = a.flags
        if not flags.aligned:
            return None
        if self.trivial and flags.c_contiguous:
            return a.reshape(self.shape3)
        v = a
        if self.index is not None:
            v = v[self.index]
        v = _reshape_nocopy(v.transpose(self.perm), self.shape3)
        if v is not None and v.shape[-1] > 1 and v.strides[-1] != v.itemsize:
            return None
        return v

    def as_input(self, a):
        """The kernel view of ``a``, copying once if the strides allow no view."""
        if self.trivial:  # the common case, without the call to view (0.2 us of a 10 us call)
            flags = a.flags
            if flags.c_contiguous and flags.aligned:
                return a.reshape(self.shape3)
        v = self.view(a)
        if v is None:
            v = a if self.index is None else a[self.index]
            # a new array: contiguous and aligned even where ``a`` was contiguous but not
            buf = _pool.empty(self.kshape, a.dtype, a.nbytes)[0]
            np.copyto(buf, v.transpose(self.perm))
            v = buf.reshape(self.shape3)
        return v

    def new_output(self, x, apart=None):
        """A new output for the planned array ``x``, in its memory order: ``(y, y3, finish,
        reused)`` with its kernel view and finisher (see :meth:`output`), and whether its memory
        was written before (see _pool).  ``apart`` (None, or an input array like ``x``): for
        passes that walk a channel's rows, where those rows lie whole pages apart, start it away
        from the page offsets of ``x`` and ``apart`` (see ``_pool.empty_apart``; channels-first
        only: the channels-last passes measured no different)."""
        if self.trivial and x.nbytes < _pool.MIN_BYTES:  # never pooled: the common case, direct
            rows = self.shape3[0]
            if (apart is not None and not self.channels_last and rows > 1
                    and x.nbytes >= _pool.APART_MIN_BYTES
                    and x.nbytes // rows % _pool.PAGE == 0):
                y = _pool.empty_apart(self.shape, x.dtype, x.nbytes, x, apart)
            else:
                y = np.empty(self.shape, x.dtype)
            return y, y.reshape(self.shape3), None, False
        if self.index is None:  # axes in the kernel's order, which is x's order of strides
            base, reused = _pool.empty(self.kshape, x.dtype, x.nbytes)
            y = base if self.trivial else base.transpose(self.inverse)
            return (y, base.reshape(self.shape3), None, reused)
        y = np.empty_like(x, order="K")  # positive strides where x has negative ones
        return (y,) + self.output(y) + (False,)

    def output(self, out):
        """The kernel view to write into and, if ``out`` allows no view, a finisher that copies
        the scratch result back into ``out``."""
        v = self.view(out)
        if v is not None:
            return v, None
        scratch = _pool.empty(self.shape3, out.dtype, out.nbytes)[0]

        def finish():
            dst = out if self.index is None else out[self.index]
            dst = dst.transpose(self.perm)
            np.copyto(dst, scratch.reshape(dst.shape))

        return scratch, finish


_PLANS = {}
_PLANS_MAX = 256


def plan(x, axis):
    """Plan the kernel view for ``x`` reduced over every axis except ``axis`` (normalised).

    Plans depend on shape, strides and axis only; they are memoised because planning costs
    more than the whole kernel on small tensors.
    """
    key = (x.shape, x.strides, axis)
    p = _PLANS.get(key)
    if p is None:
        p = _plan(x, axis)
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        _PLANS[key] = p
    return p


def _plan(x, axis):
    p = Plan()
    shape = x.shape
    strides = x.strides
    C = shape[axis]
    p.shape = shape
    p.axis = axis
    p.C = C
    others = [d for d in range(x.ndim) if d != axis]
    flips = [d for d in others if strides[d] < 0 and shape[d] > 1]
    if flips:
        idx = [slice(None)] * x.ndim
        for d in flips:
            idx[d] = slice(None, None, -1)
        p.index = tuple(idx)
    else:
        p.index = None
    # Sizes of 1 carry no stride information: keep them with the outer axes, in order.
    ones = [d for d in others if shape[d] == 1]
    real = sorted((d for d in others if shape[d] > 1), key=lambda d: -abs(strides[d]))
    if C == 1:
        outer, inner = ones, real
    else:
        cs = abs(strides[axis])
        outer = ones + [d for d in real if abs(strides[d]) > cs]
        inner = [d for d in real if abs(strides[d]) <= cs]
    perm = outer + [axis] + inner
    order = [d for d in perm if shape[d] > 1 and (d != axis or C > 1)]
    if not flips and order == sorted(order):
        # Axes of size 1 may sit anywhere: where the others keep their order, the caller's own
        # order is the plan (trivial for C-contiguous arrays, which then take the reshape fast
        # paths).  Whole calls at one thread, fastest of 40 batches, (8, 64, 1, 1) float32:
        # training 5.1 -> 2.9 us, inference 3.1 -> 2.2, backward 4.2 -> 2.7, together with
        # the leaner one-call paths (PyTorch: 3.5, 2.4, 3.2 us).
        perm = list(range(x.ndim))
        outer, inner = perm[:axis], perm[axis + 1:]
    p.perm = tuple(perm)
    p.inverse = tuple(sorted(range(len(p.perm)), key=p.perm.__getitem__))
    p.kshape = tuple(shape[d] for d in p.perm)
    N = 1
    for d in outer:
        N *= shape[d]
    S = 1
    for d in inner:
        S *= shape[d]
    p.channels_last = S == 1
    p.shape3 = (N, C) if p.channels_last else (N, C, S)
    p.trivial = p.index is None and p.perm == tuple(range(x.ndim))
    return p
