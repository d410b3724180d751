"""Loops over one contiguous run, written as explicit vector code in LLVM IR.

Two things Numba's own loops do not give:

* **Short runs vectorise.**  LLVM vectorises a Numba loop in steps of its vector width times its
  interleave count (64 float32 values with AVX-512), so a 49-element run (a 7x7 feature map) ran
  entirely scalar.  Here the step is one cache line (16 float32 or 8 float64 values), and a
  run's last partial line one masked step (see ``TAIL_MASK_FROM``): 7x7 inference measured
  1.5x faster, and long runs gained too.
* **Non-temporal stores.**  An ordinary store first reads the destination line (the write
  allocate), so producing an output that does not fit in cache moves three bytes per byte
  written, not two.  The ``_nt`` variants store whole aligned lines past the cache, then fence.

The arithmetic is the same sequence of IR operations for every lane and every step, without
fast-math flags, so a value does not depend on where in a run it falls and results are
bit-identical to the scalar formulas they replace.

An op is a body written once (``_affine``, ``_bwd_apply``) from which every variant is generated:
the data type (float32/float64), the compute type (the parameters' type: float32 data may be
computed in float64 lanes), parameters per run (scalars) or per element (pointers, for
channels-last rows), and ordinary or non-temporal stores.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

LINE = 64  # bytes per vector step: one cache line, the unit non-temporal stores write


@intrinsic
def at(typingctx, arr, index):
    """Pointer to ``arr[index]`` (``index`` a tuple of in-range, non-negative integers)."""
    sig = types.CPointer(arr.dtype)(arr, index)

    def codegen(context, builder, signature, args):
        aryty, idxty = signature.args
        ary = context.make_array(aryty)(context, builder, args[0])
        inds = [context.cast(builder, v, t, types.intp)
                for v, t in zip(cgutils.unpack_tuple(builder, args[1]), idxty)]
        return cgutils.get_item_pointer(context, builder, aryty, ary, inds, wraparound=False)

    return sig, codegen


@intrinsic
def load(typingctx, ptr, index):
    """``ptr[index]``, for a pointer from :func:`at`.  Helpers called once per channel take
    pointers, not arrays: a jitted function given an array takes a reference to it on entry
    and drops it on exit, two atomic operations on a count that every thread shares."""
    sig = ptr.dtype(ptr, index)

    def codegen(context, builder, signature, args):
        i = context.cast(builder, args[1], signature.args[1], types.intp)
        return builder.load(builder.gep(args[0], [i]))

    return sig, codegen


@intrinsic
def store(typingctx, ptr, index, value):
    """``ptr[index] = value`` (converted to the pointer's type), for a pointer from :func:`at`
    (see :func:`load`)."""
    sig = types.none(ptr, index, value)

    def codegen(context, builder, signature, args):
        i = context.cast(builder, args[1], signature.args[1], types.intp)
        v = context.cast(builder, args[2], signature.args[2], signature.args[0].dtype)
        builder.store(v, builder.gep(args[0], [i]))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def fence(typingctx):
    """Order this thread's non-temporal stores before whatever the caller does next."""
    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.none(), codegen


def _splat(builder, value, width):
    vec = ir.VectorType(value.type, width)
    one = builder.insert_element(ir.Constant(vec, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, ir.Constant(vec, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), width), [0] * width))


def _lane_mask(builder, count, width):
    """``<i < count for each lane i>`` (``count`` < ``width``): the lanes of a run's tail."""
    i32 = ir.IntType(32)
    n = _splat(builder, builder.trunc(count, i32), width)
    return builder.icmp_unsigned("<", ir.Constant(ir.VectorType(i32, width), list(range(width))), n)


def _masked(builder, op, vt, ptr, mask, value=None):
    """``llvm.masked.load``/``store`` of the vector type ``vt`` at ``ptr`` (a scalar pointer,
    aligned to its element): the lanes off ``mask`` are neither read nor written, so a run's
    tail never touches memory past its end."""
    single = vt.element == ir.FloatType()
    suffix = f"v{vt.count}{'f32' if single else 'f64'}.p0"
    vp = builder.bitcast(ptr, vt.as_pointer())
    i32 = ir.IntType(32)
    align = 4 if single else 8
    if op == "load":
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vt, [vt.as_pointer(), i32, mask.type, vt]),
            "llvm.masked.load." + suffix)
        return builder.call(fn, [vp, ir.Constant(i32, align), mask, ir.Constant(vt, None)])
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [vt, vt.as_pointer(), i32, mask.type]),
        "llvm.masked.store." + suffix)
    return builder.call(fn, [value, vp, ir.Constant(i32, align), mask])


# A run's tail (its last partial line) of at least this many values goes as one masked vector
# step, a shorter one value by value.  Runs of 3x3 and 5x5 feature maps gained most, whole
# one-call kernels at one thread, both versions built in one process and timed alternately, the
# geometric mean of both build orders: float32 (16, 32, 3, 3) statistics 2.8x, training 1.8x,
# backward 1.6x, inference 1.1x; (16, 64, 5, 5) 1.9x, 1.5x, 1.3x, 1.2x; (8, 256, 14, 14),
# tails of 4 values, 0.96-1.02x; the last columns of channels-last reductions, (512, 40)
# statistics 2.0x, training and backward 1.3x, (1024, 200) 1.3x, 1.07x, 1.06x.  A masked step
# costs a whole line of work (float64 lanes in the reductions), so fewer values stay scalar.
TAIL_MASK_FROM = 4


def _tail_kinds(builder, rest):
    """``builder.if_else`` on whether a tail of ``rest`` values goes as one masked step
    (``TAIL_MASK_FROM`` values or more) or value by value."""
    big = builder.icmp_signed(">=", rest, ir.Constant(rest.type, TAIL_MASK_FROM))
    return builder.if_else(big)


# Rows of a channels-last tile at most this many lines long can keep their per-element
# parameters in vector registers for the whole tile (3 of them for the affine, 4 for the
# backward: up to 32 vectors) instead of loading them again for every row, where the loads, not
# the arithmetic, bound the loop (four loads and a store per line of output): (64, 5, 5, 24)
# float32 inference (rows of 96 values), kernel alone at one thread, 4.10 -> 2.90 us.  Each
# length is a code path of its own: only the tiled passes take them (``*_rows_hoisted``), as in
# every kernel they doubled the cold compile of the one-call kernels of small tensors.
HOIST_LINES = 8


def _run_intrinsic(body, nt, rows=False, hoist=False):
    """An intrinsic ``run(ins, out, n, params)``: ``out[t] = body(ins[.][t], params)`` for
    ``t < n``.  ``ins`` is a tuple of data pointers; each parameter is a scalar (the same for
    the whole run) or a pointer (one value per element).

    With ``rows``: ``run(ins, out, n, params, nrows, strides)`` does that for ``nrows`` rows of
    ``n`` values, row ``r`` of each array ``r * strides[.]`` elements on (``strides``: one per
    input, then the output's), the same per-element parameters for every row.  One call per
    channels-last tile instead of one per row: per-row setup cost as much as a 64-value row.
    With ``hoist`` too, rows of up to ``HOIST_LINES`` whole lines (and a scalar tail) load the
    per-element parameters once per call (ordinary stores only: streamed rows are long)."""

    def codegen(context, builder, signature, args):
        ins_t, out_t, _, par_t = signature.args[:4]
        dtype = out_t.dtype
        # Computed in the widest of the data and parameter types, as Numba's own
        # promotion would (float32 data with float64 parameters: float64 lanes).
        kinds = [p.dtype if isinstance(p, types.CPointer) else p for p in par_t]
        ctype = max([dtype] + kinds, key=lambda t: t.bitwidth)
        d_ll = context.get_value_type(dtype)
        c_ll = context.get_value_type(ctype)
        isz = dtype.bitwidth // 8
        width = LINE // isz
        base_ptrs = cgutils.unpack_tuple(builder, args[0])
        base_out = args[1]
        count = args[2]
        pars = [(v, t) if isinstance(t, types.CPointer) else
                (context.cast(builder, v, t, ctype), None)
                for v, t in zip(cgutils.unpack_tuple(builder, args[3]), par_t)]
        intp = count.type
        # Splats are built once, outside the loops.
        splats = [None if t is not None else _splat(builder, v, width) for v, t in pars]

        def load(ptr, idx, vector, ll):
            p = builder.gep(ptr, [idx])
            if vector:
                p = builder.bitcast(p, ir.VectorType(ll, width).as_pointer())
            return builder.load(p, align=isz if vector else None)

        def convert(v, to, widen):
            if v.type == to:
                return v
            return builder.fpext(v, to) if widen else builder.fptrunc(v, to)

        def params(idx, vector, mask=None):
            """The parameters at ``idx``: per-element ones loaded, scalars splat."""
            c_t = ir.VectorType(c_ll, width) if vector else c_ll
            out = []
            for (v, t), s in zip(pars, splats):
                if t is None:
                    out.append(s if vector else v)
                    continue
                ll = context.get_value_type(t.dtype)
                got = (load(v, idx, vector, ll) if mask is None else
                       _masked(builder, "load", ir.VectorType(ll, width), builder.gep(v, [idx]),
                               mask))
                out.append(convert(got, c_t, True))
            return out

        def step(ptrs, outp, idx, vector, stream, mask=None, ps=None):
            c_t = ir.VectorType(c_ll, width) if vector else c_ll

            def get(ptr, ll):
                if mask is None:
                    return load(ptr, idx, vector, ll)
                return _masked(builder, "load", ir.VectorType(ll, width),
                               builder.gep(ptr, [idx]), mask)

            xs = [convert(get(p, d_ll), c_t, True) for p in ptrs]
            if ps is None:
                ps = params(idx, vector, mask)
            y = convert(body(builder, xs, ps), ir.VectorType(d_ll, width) if vector else d_ll,
                        False)
            p = builder.gep(outp, [idx])
            if mask is not None:
                _masked(builder, "store", y.type, p, mask, y)
                return
            if vector:
                p = builder.bitcast(p, y.type.as_pointer())
            st = builder.store(y, p, align=LINE if stream else (isz if vector else None))
            if stream:
                st.set_metadata("nontemporal",
                                builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))

        def scalar_loop(ptrs, outp, start, stop):
            with cgutils.for_range(builder, builder.sub(stop, start)) as loop:
                step(ptrs, outp, builder.add(start, loop.index), False, False)

        zero = ir.Constant(intp, 0)
        w = ir.Constant(intp, width)

        def emit(ptrs, outp):
            head = zero
            if nt:
                # Scalar head up to the first line-aligned output element; an output not even
                # aligned to its element size never streams (all scalar is still correct).
                addr = builder.ptrtoint(outp, intp)
                mis = builder.and_(addr, ir.Constant(intp, isz - 1))
                skip = builder.udiv(builder.and_(builder.neg(addr), ir.Constant(intp, LINE - 1)),
                                    ir.Constant(intp, isz))
                head = builder.select(builder.icmp_unsigned("==", mis, zero), skip, count)
                head = builder.select(builder.icmp_signed("<", count, head), count, head)
                scalar_loop(ptrs, outp, zero, head)
            nvec = builder.sdiv(builder.sub(count, head), w)
            done = builder.add(head, builder.mul(nvec, w))
            rest = builder.sub(count, done)
            with cgutils.for_range(builder, nvec) as loop:
                step(ptrs, outp, builder.add(head, builder.mul(loop.index, w)), True, nt)
            if nt or rows:
                # Streaming runs are long (the tail is noise) and it must not stream; in the
                # rows of a channels-last tile, masked tails (a masked store per row) measured
                # slower: inference (1024, 200) float32 0.85x, (128, 1000) 0.88x.
                scalar_loop(ptrs, outp, done, count)
            else:
                # A tail of TAIL_MASK_FROM values or more as one masked vector step; its
                # loads and stores touch its own elements only, in the same order as the
                # scalar steps (an output that is the input itself, ``out=x``, stays correct).
                with _tail_kinds(builder, rest) as (masked, scalar):
                    with masked:
                        step(ptrs, outp, done, True, False, _lane_mask(builder, rest, width))
                    with scalar:
                        scalar_loop(ptrs, outp, done, count)

        def each_row(body_of_row):
            strides = cgutils.unpack_tuple(builder, args[5])
            with cgutils.for_range(builder, args[4]) as row:
                offs = [builder.mul(row.index, st) for st in strides]
                body_of_row([builder.gep(p, [o]) for p, o in zip(base_ptrs, offs)],
                            builder.gep(base_out, [offs[-1]]))

        if not rows:
            emit(base_ptrs, base_out)
            return context.get_dummy_value()
        if not hoist or nt or all(t is None for _, t in pars):
            each_row(emit)
            return context.get_dummy_value()
        # One case per row length in whole lines, each with its parameter vectors loaded
        # before the rows and its steps written out, so that they stay in registers.
        nvec = builder.sdiv(count, w)
        after = builder.append_basic_block("rows.after")
        general = builder.append_basic_block("rows.general")
        switch = builder.switch(nvec, general)
        for k in range(1, HOIST_LINES + 1):
            block = builder.append_basic_block(f"rows.lines{k}")
            switch.add_case(ir.Constant(intp, k), block)
            builder.position_at_end(block)
            pre = [params(ir.Constant(intp, j * width), True) for j in range(k)]

            def row_of_lines(ptrs, outp, k=k, pre=pre):
                for j in range(k):
                    step(ptrs, outp, ir.Constant(intp, j * width), True, False, ps=pre[j])
                scalar_loop(ptrs, outp, ir.Constant(intp, k * width), count)

            each_row(row_of_lines)
            builder.branch(after)
        builder.position_at_end(general)
        each_row(emit)
        builder.branch(after)
        builder.position_at_end(after)
        return context.get_dummy_value()

    if rows:
        @intrinsic
        def run(typingctx, ins, out, n, params, nrows, strides):
            return types.none(ins, out, n, params, nrows, strides), codegen
    else:
        @intrinsic
        def run(typingctx, ins, out, n, params):
            return types.none(ins, out, n, params), codegen

    return run


def _hsum(builder, v):
    """The sum of a vector's lanes, halving the vector each step: a fixed order, in log2 steps
    instead of a chain of ``n`` dependent adds."""
    n = v.type.count
    while n > 1:
        h = n // 2
        halves = [builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), h),
                                                           list(range(i, i + h))))
                  for i in (0, h)]
        v = builder.fadd(*halves)
        n = h
    return builder.extract_element(v, ir.Constant(ir.IntType(32), 0))


# Lines of float32 data whose terms a float32-lane block sum (see _block_intrinsic) adds in
# float32 before they join the float64 accumulators: each lane then rounds like a sum of 16
# values, 1e-8..1e-7 relative.  A term or partial sum beyond float32's range makes the block's
# sum infinite, which callers take as the sign to sum in float64 lanes instead.
FLUSH = 16


# Software prefetch distance of the ``prefetch`` block sums, in lines (8 KB): the tiled
# channels-first reductions issue no loads while they finish a run, and hardware prefetchers,
# trained by demand misses, then fall behind.  Float32 statistics of (128, 256, 28, 28), from
# memory, at one thread: 3.9-4.6 ms without, 3.9 with 32 lines, 3.4-3.5 with 64, 3.1-3.2 with
# 128, 3.4 with 256 and 3.5 with 512 lines ahead.
PREFETCH_LINES = 128


def _prefetch(builder, ptr, idx):
    """``llvm.prefetch`` (read, all cache levels) of the line ``PREFETCH_LINES`` lines past
    ``ptr[idx]``; beyond the array it is dropped, not a fault."""
    i8p = ir.IntType(8).as_pointer()
    p = builder.gep(builder.bitcast(builder.gep(ptr, [idx]), i8p),
                    [ir.Constant(idx.type, PREFETCH_LINES * LINE)])
    i32 = ir.IntType(32)
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0")
    builder.call(fn, [p, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])


def _block_intrinsic(body, lanes32=False, prefetch=False):
    """An intrinsic ``run(ins, n, nrows, strides, params) -> (s1, s2)``: the float64 sums of
    the two terms of ``body`` (the bodies of :func:`_column_intrinsic`) over ``nrows`` rows of
    ``n`` contiguous values
    (row ``r`` of input ``i`` is ``r * strides[i]`` elements on); ``params`` are scalars.  For
    one channel's runs of a small channels-first tensor.

    ``lanes32``: for float32 data, the terms of whole lines are computed and summed in float32
    lanes, ``FLUSH`` lines at a time, then added to the float64 accumulators: half the vector
    work of float64 lanes, for cache-resident data where that work is the bound.  The
    parameters are rounded to float32 first (the scalar tail uses the same rounded values in
    float64).  Callers check the sums and fall back to float64 lanes where float32 cannot be
    trusted (``channels_first._sound32``).

    ``prefetch``: each line step also prefetches the line ``PREFETCH_LINES`` ahead, for tiles
    of tensors that stream from memory.  The one-call kernels, on data in cache, go without:
    there the extra instructions measured up to 8% slower.

    Each row goes in steps of one cache line into a float64 vector accumulator per term; its
    last partial line too, masked, if it holds ``TAIL_MASK_FROM`` values or more, else value by
    value into scalar accumulators.  The lanes are summed once at the end.  The order is fixed
    by ``n`` and ``nrows`` alone and the code carries no fast-math flags, so the serial and the
    parallel build of a kernel give the same bits, which lets the small kernels use threads.
    Against Numba's loop with reassociation (which vectorises only runs of 64 float32 values or
    more), float32: (16, 64, 16) moments 6.4 -> 3.3 us, backward sums 6.8 -> 4.4 us; (1, 512, 49)
    about even; runs of thousands of values about 1.3x slower (more float64 work per value
    than LLVM's interleaved loop), which small tensors seldom have.
    """

    def codegen(context, builder, signature, args):
        ins_t, _, _, _, par_t = signature.args
        dtype = ins_t[0].dtype
        d_ll = context.get_value_type(dtype)
        f64 = ir.DoubleType()
        isz = dtype.bitwidth // 8
        width = LINE // isz
        vt = ir.VectorType(f64, width)
        ptrs = cgutils.unpack_tuple(builder, args[0])
        n, nrows = args[1], args[2]
        strides = cgutils.unpack_tuple(builder, args[3])
        pars = [context.cast(builder, v, t, types.float64)
                for v, t in zip(cgutils.unpack_tuple(builder, args[4]), par_t)]
        narrow = lanes32 and dtype == types.float32
        intp = n.type
        if narrow:
            p32 = [builder.fptrunc(v, d_ll) for v in pars]
            pars = [builder.fpext(v, f64) for v in p32]
            vt32 = ir.VectorType(d_ll, width)
            vpars32 = [_splat(builder, v, width) for v in p32]
            zeros32 = ir.Constant(vt32, [0.0] * width)
            accs32 = [cgutils.alloca_once_value(builder, zeros32) for _ in range(2)]
            count = cgutils.alloca_once_value(builder, ir.Constant(intp, 0))
        vpars = [_splat(builder, v, width) for v in pars]
        zeros = ir.Constant(vt, [0.0] * width)
        accs = [cgutils.alloca_once_value(builder, zeros) for _ in range(2)]
        tail = [cgutils.alloca_once_value(builder, ir.Constant(f64, 0.0)) for _ in range(2)]
        w = ir.Constant(intp, width)
        done = builder.mul(builder.sdiv(n, w), w)

        def flush():
            for a32, a in zip(accs32, accs):
                wide = builder.fpext(builder.load(a32), vt)
                builder.store(builder.fadd(builder.load(a), wide), a)
                builder.store(zeros32, a32)

        def make_room(steps):
            """Flush first if ``steps`` more float32 terms a lane would exceed ``FLUSH``."""
            full = builder.icmp_signed(">", builder.add(builder.load(count), steps),
                                       ir.Constant(intp, FLUSH))
            with builder.if_then(full, likely=False):
                flush()
                builder.store(ir.Constant(intp, 0), count)

        def step(base, idx, vector, acc, mask=None):
            lanes = narrow and acc is accs32
            ft = vt32 if lanes else vt if vector else f64

            def widen(v):
                return v if v.type == ft else builder.fpext(v, ft)

            def load(p):
                p = builder.gep(p, [idx])
                if mask is not None:
                    return _masked(builder, "load", ir.VectorType(d_ll, width), p, mask)
                if vector:
                    p = builder.bitcast(p, ir.VectorType(d_ll, width).as_pointer())
                return builder.load(p, align=isz)

            if prefetch and vector and mask is None:
                for p in base:
                    _prefetch(builder, p, idx)
            terms = body(builder, [load(p) for p in base],
                         vpars32 if lanes else vpars if vector else pars, widen)
            for a, t in zip(acc, terms):
                old = builder.load(a)
                new = _accumulate(builder, old, t)
                builder.store(new if mask is None else builder.select(mask, new, old), a)

        rest = builder.sub(n, done)
        lines = builder.sdiv(n, w)

        def rows(masked):
            mask = _lane_mask(builder, rest, width) if masked else None
            if narrow:  # vector steps a row, at most FLUSH (longer rows flush in between)
                q = builder.add(lines, ir.Constant(intp, 1 if masked else 0))
                q = builder.select(builder.icmp_signed(">", q, ir.Constant(intp, FLUSH)),
                                   ir.Constant(intp, FLUSH), q)
            with cgutils.for_range(builder, nrows) as row:
                base = [builder.gep(p, [builder.mul(row.index, st)])
                        for p, st in zip(ptrs, strides)]
                if narrow:
                    make_room(q)
                    lines32(base)
                else:
                    with cgutils.for_range(builder, lines) as loop:
                        step(base, builder.mul(loop.index, w), True, accs)
                if masked:
                    step(base, done, True, accs32 if narrow else accs, mask)
                    if narrow:
                        builder.store(builder.add(builder.load(count), ir.Constant(intp, 1)),
                                      count)
                else:
                    with cgutils.for_range(builder, rest) as loop:
                        step(base, builder.add(done, loop.index), False, tail)

        def lines32(base):
            # whole chunks of FLUSH lines, each flushed; then the rest, counted
            span = ir.Constant(intp, FLUSH)
            chunks = builder.sdiv(lines, span)
            with cgutils.for_range(builder, chunks) as chunk:
                first = builder.mul(chunk.index, span)
                with cgutils.for_range(builder, span) as loop:
                    step(base, builder.mul(builder.add(first, loop.index), w), True, accs32)
                flush()
            first = builder.mul(chunks, span)
            left = builder.sub(lines, first)
            with cgutils.for_range(builder, left) as loop:
                step(base, builder.mul(builder.add(first, loop.index), w), True, accs32)
            builder.store(builder.add(builder.load(count), left), count)

        # one loop over the rows for each kind of tail, not a branch in every row
        with _tail_kinds(builder, rest) as (masked, scalar):
            with masked:
                rows(True)
            with scalar:
                rows(False)
        if narrow:
            flush()
        sums = [builder.fadd(_hsum(builder, builder.load(a)), builder.load(t))
                for a, t in zip(accs, tail)]
        return context.make_tuple(builder, signature.return_type, sums)

    @intrinsic
    def run(typingctx, ins, n, nrows, strides, params):
        sig = types.UniTuple(types.float64, 2)(ins, n, nrows, strides, params)
        return sig, codegen

    return run


GROUP = 4  # line-wide strips summed together: 4 lines of each row per sweep, 16 accumulators


def _column_intrinsic(body):
    """An intrinsic ``run(ins, nrows, ncols, strides, params, ps1, ps2)`` for channels-last
    tiles: for each of ``ncols`` columns ``j``, the float64 sums over ``nrows`` rows of the two
    terms ``body(ins[.][r, j], params[.][j])`` into ``ps1[j]`` and ``ps2[j]``.  Row ``r`` of
    input ``i`` is ``r * strides[i]`` elements on; parameters are per-column pointers.

    Columns go in strips of one cache line, up to ``GROUP`` strips at a time row by row (so
    each sweep reads whole consecutive lines), their sums in float64 vector registers for the
    whole tile: each value is loaded once and no accumulator touches memory per row (measured
    2x faster than accumulating in memory every four rows).  The last columns (fewer than a
    strip) go as one masked strip, or one by one if fewer than ``TAIL_MASK_FROM``.  The
    summation order is fixed by the tile alone.
    """

    def codegen(context, builder, signature, args):
        ins_t, _, _, _, par_t = signature.args[:5]
        dtype = ins_t[0].dtype
        d_ll = context.get_value_type(dtype)
        f64 = ir.DoubleType()
        isz = dtype.bitwidth // 8
        width = LINE // isz
        ptrs = cgutils.unpack_tuple(builder, args[0])
        nrows, ncols = args[1], args[2]
        strides = cgutils.unpack_tuple(builder, args[3])
        pars = list(zip(cgutils.unpack_tuple(builder, args[4]), par_t))
        s1, s2 = args[5], args[6]
        intp = nrows.type

        def load(ptr, idx, ll, vector, mask=None):
            p = builder.gep(ptr, [idx])
            if mask is not None:
                return _masked(builder, "load", ir.VectorType(ll, width), p, mask)
            if vector:
                p = builder.bitcast(p, ir.VectorType(ll, width).as_pointer())
            return builder.load(p, align=isz)

        def sweep(j0, strips, vector, mask=None):
            """Sum columns ``j0 ..`` (``strips`` lines, or one column, or the columns of
            ``mask`` in one line) over every row."""
            ft = ir.VectorType(f64, width) if vector else f64

            def widen(v):
                return v if v.type == ft else builder.fpext(v, ft)

            offs = [builder.add(j0, ir.Constant(intp, g * width)) for g in range(strips)]
            ps = [[load(p, o, context.get_value_type(t.dtype), vector, mask) for p, t in pars]
                  for o in offs]
            init = ir.Constant(ft, [0.0] * width) if vector else ir.Constant(f64, 0.0)
            acc = [cgutils.alloca_once_value(builder, init) for _ in range(2 * strips)]
            with cgutils.for_range(builder, nrows) as loop:
                rows = [builder.mul(loop.index, st) for st in strides]
                for g, o in enumerate(offs):
                    xs = [load(p, builder.add(r, o), d_ll, vector, mask)
                          for p, r in zip(ptrs, rows)]
                    for a, t in zip(acc[2 * g:2 * g + 2], body(builder, xs, ps[g], widen)):
                        builder.store(_accumulate(builder, builder.load(a), t), a)
            for g, o in enumerate(offs):
                for out, a in ((s1, acc[2 * g]), (s2, acc[2 * g + 1])):
                    p = builder.gep(out, [o])
                    if mask is not None:
                        _masked(builder, "store", ft, p, mask, builder.load(a))
                        continue
                    if vector:
                        p = builder.bitcast(p, ft.as_pointer())
                    builder.store(builder.load(a), p, align=8)

        w = ir.Constant(intp, width)
        nstrips = builder.sdiv(ncols, w)
        ngroups = builder.sdiv(nstrips, ir.Constant(intp, GROUP))
        with cgutils.for_range(builder, ngroups) as loop:
            sweep(builder.mul(loop.index, ir.Constant(intp, GROUP * width)), GROUP, True)
        first = builder.mul(ngroups, ir.Constant(intp, GROUP))
        with cgutils.for_range(builder, builder.sub(nstrips, first)) as loop:
            sweep(builder.mul(builder.add(first, loop.index), w), 1, True)
        done = builder.mul(nstrips, w)
        rest = builder.sub(ncols, done)
        with _tail_kinds(builder, rest) as (masked, scalar):
            with masked:
                sweep(done, 1, True, _lane_mask(builder, rest, width))
            with scalar:
                with cgutils.for_range(builder, rest) as loop:
                    sweep(builder.add(done, loop.index), 1, False)
        return context.get_dummy_value()

    @intrinsic
    def run(typingctx, ins, nrows, ncols, strides, params, ps1, ps2):
        return types.none(ins, nrows, ncols, strides, params, ps1, ps2), codegen

    return run


def _accumulate(b, acc, term):
    """``acc + term``; a term given as a pair ``(u, v)`` adds ``u * v`` in one fused
    multiply-add (``llvm.fmuladd``: fused where the CPU has FMA, as every build on one machine
    then does alike).  One rounding instead of two, and one operation fewer on the adder
    ports, which bound these loops on cache-resident data: float32 at 2 threads, kernels
    side by side in one process, (32, 256, 14, 14) moments 166 -> 142 us, backward sums
    196 -> 168 us; (32, 2048, 7, 7) moments 379 -> 342 us."""
    if isinstance(term, tuple):
        t = acc.type
        vector = isinstance(t, ir.VectorType)
        kind = "f32" if (t.element if vector else t) == ir.FloatType() else "f64"
        name = f"llvm.fmuladd.{f'v{t.count}' if vector else ''}{kind}"
        fma = cgutils.get_or_insert_function(b.module, ir.FunctionType(t, [t, t, t]), name)
        return b.call(fma, [term[0], term[1], acc])
    return b.fadd(acc, term)


def _moments_terms(b, xs, ps, widen):
    # d = x - c in float64 (data widened first): exact for x near c, and neither d nor its
    # square overflows or underflows, whatever the data.  Float32 lanes (block_moments32) save
    # nothing on data streamed from memory, but half the work on data in cache, where that
    # work is the bound; they need the checks and fallback of channels_first._moments32.  The
    # square is accumulated fused (see _accumulate).
    d = b.fsub(widen(xs[0]), widen(ps[0]))
    return d, (d, d)


def _bwd_sums_terms(b, xs, ps, widen):
    # dy and dy * (x - mu), in float64 (four float32 gradients near the maximum would overflow)
    g = widen(xs[1])
    return g, (g, b.fsub(widen(xs[0]), widen(ps[0])))


def _affine(b, xs, ps):
    # (x - center) * scale + shift, then the ReLU floor; NaN fails the comparison and passes.
    # Centring before scaling keeps float32 results accurate when the mean is large relative to
    # the spread (x * scale + shift would cancel): x - center is exact for x near center, and
    # the centre's float32 rounding is folded into shift (functional._affine).
    center, scale, shift, lo = ps
    v = b.fadd(b.fmul(b.fsub(xs[0], center), scale), shift)
    return b.select(b.fcmp_ordered("<", v, lo), lo, v)


def _bwd_apply(b, xs, ps):
    # a * ((dy + q * (x - mu)) + r)
    x, dy = xs
    mu, a, q, r = ps
    return b.fmul(a, b.fadd(b.fadd(dy, b.fmul(q, b.fsub(x, mu))), r))


affine_run = _run_intrinsic(_affine, nt=False)
affine_run_nt = _run_intrinsic(_affine, nt=True)
bwd_apply_run = _run_intrinsic(_bwd_apply, nt=False)
bwd_apply_run_nt = _run_intrinsic(_bwd_apply, nt=True)
affine_rows = _run_intrinsic(_affine, nt=False, rows=True)
affine_rows_nt = _run_intrinsic(_affine, nt=True, rows=True)
bwd_apply_rows = _run_intrinsic(_bwd_apply, nt=False, rows=True)
bwd_apply_rows_nt = _run_intrinsic(_bwd_apply, nt=True, rows=True)
affine_rows_hoisted = _run_intrinsic(_affine, nt=False, rows=True, hoist=True)
bwd_apply_rows_hoisted = _run_intrinsic(_bwd_apply, nt=False, rows=True, hoist=True)
column_moments = _column_intrinsic(_moments_terms)
column_bwd_sums = _column_intrinsic(_bwd_sums_terms)
block_moments = _block_intrinsic(_moments_terms)
block_moments32 = _block_intrinsic(_moments_terms, lanes32=True)
block_bwd_sums = _block_intrinsic(_bwd_sums_terms)
block_moments_pf = _block_intrinsic(_moments_terms, prefetch=True)
block_moments32_pf = _block_intrinsic(_moments_terms, lanes32=True, prefetch=True)
block_bwd_sums_pf = _block_intrinsic(_bwd_sums_terms, prefetch=True)


if numba.config.DISABLE_JIT:
    # With the JIT off (coverage runs) kernels execute as Python and intrinsics cannot be
    # called: a "pointer" is the array and index it was taken at, and the runs evaluate the
    # same formulas with NumPy on the slices they cover.

    def at(arr, index):
        return arr, tuple(index)

    def load(ptr, index):
        return _span(ptr, index + 1)[index]

    def store(ptr, index, value):
        _span(ptr, index + 1)[index] = value

    def fence():
        return None

    def _span(ptr, n, row=0):
        if isinstance(ptr, tuple):
            arr, index = ptr
            lead = (index[0] + row,) + index[1:-1] if len(index) > 1 else ()
            return arr[lead][index[-1]:index[-1] + n]
        return ptr

    def _python_run(body, rows=False):
        def run(ins, out, n, params, nrows=1, strides=None):
            for row in range(nrows if rows else 1):
                ps = [_span(p, n) for p in params]
                _span(out, n, row)[:] = body(*[_span(a, n, row) for a in ins], *ps)
        return run

    def _affine_py(x, center, scale, shift, lo):
        v = (x - center) * scale + shift
        return np.where(v < lo, lo, v)

    def _bwd_apply_py(x, dy, mu, a, q, r):
        return a * ((dy + q * (x - mu)) + r)

    affine_run = affine_run_nt = _python_run(_affine_py)
    bwd_apply_run = bwd_apply_run_nt = _python_run(_bwd_apply_py)
    affine_rows = affine_rows_nt = affine_rows_hoisted = _python_run(_affine_py, rows=True)

    def _python_columns(body):
        def run(ins, nrows, ncols, strides, params, ps1, ps2):
            ps = [_span(p, ncols) for p in params]
            t1 = np.zeros(ncols)
            t2 = np.zeros(ncols)
            for row in range(nrows):
                a, b = body(*[_span(p, ncols, row) for p in ins], *ps)
                t1 += a
                t2 += b
            _span(ps1, ncols)[:] = t1
            _span(ps2, ncols)[:] = t2
        return run

    def _moments_py(x, c):
        d = x.astype(np.float64) - c
        return d, d * d

    def _bwd_sums_py(x, dy, mu):
        g = dy.astype(np.float64)
        return g, g * (x.astype(np.float64) - mu)

    def _python_block(body):
        def run(ins, n, nrows, strides, params):
            t1 = t2 = 0.0
            for row in range(nrows):
                a, b = body(*[_span(p, n, row) for p in ins], *params)
                t1 += a.sum()
                t2 += b.sum()
            return t1, t2
        return run

    block_moments = _python_block(_moments_py)

    def _moments32_py(x, c):
        if x.dtype != np.float32:
            return _moments_py(x, c)
        d = x - np.float32(c)  # float32 terms, as the lanes; their sums in float64
        return d.astype(np.float64), (d * d).astype(np.float64)

    block_moments32 = _python_block(_moments32_py)
    column_moments = _python_columns(_moments_py)
    column_bwd_sums = _python_columns(_bwd_sums_py)
    block_bwd_sums = _python_block(_bwd_sums_py)
    block_moments_pf, block_moments32_pf = block_moments, block_moments32
    block_bwd_sums_pf = block_bwd_sums
    bwd_apply_rows = bwd_apply_rows_nt = bwd_apply_rows_hoisted = _python_run(_bwd_apply_py,
                                                                              rows=True)
