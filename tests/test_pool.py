"""Reuse of large output buffers (fastbn._pool).

A released output's memory may back a later output, so the tests check what must never happen:
an output sharing memory with an array the caller still holds (directly or through a view), a
wrong result computed into reused memory, more memory kept than the bound allows.  Most tests
lower the size threshold so that small arrays go through the pool; one uses a real large size.
"""

import concurrent.futures
import gc

import inputs
import numpy as np
import pytest
import reference
from util import assert_close, input_precision_slack

import fastbn
from fastbn import _pool


@pytest.fixture
def pooled(monkeypatch):
    """Pool arrays of 4 KB and more, with a 1 MB bound, starting empty; restored after."""
    limit = fastbn.get_output_cache()
    fastbn.set_output_cache(0)
    monkeypatch.setattr(_pool, "MIN_BYTES", 4096)
    fastbn.set_output_cache(1 << 20)
    yield
    fastbn.set_output_cache(0)
    fastbn.set_output_cache(limit)


def _data(shape=(4, 8, 16, 16), dtype=np.float32, key="x"):
    return inputs._randn(inputs.rng_for("pool", shape, key), shape, 1, dtype)


def _params(C, dtype):
    return inputs.params(C, np.dtype(dtype), "pool")


def test_output_never_aliases_a_live_array(pooled):
    x = _data()
    w, b, rm, rv = _params(8, np.float32)
    first = fastbn.batch_norm_infer(x, rm, rv, w, b)
    kept = first.copy()
    second = fastbn.batch_norm_infer(x, rm, rv, w, b)
    assert not np.shares_memory(first, second)
    view = first[1:, ::2]
    del first
    gc.collect()
    third = fastbn.batch_norm_infer(x, rm, rv, w, b)
    assert not np.shares_memory(view, third) and not np.shares_memory(second, third)
    np.testing.assert_array_equal(view, kept[1:, ::2])  # nobody wrote into the held view


def test_released_output_is_reused_and_results_are_right(pooled):
    x = _data()
    dy = _data(key="dy")
    w, b, rm, rv = _params(8, np.float32)
    y, mean, invstd = fastbn.batch_norm_train(x, w, b)
    block = id(y.base)
    del y
    gc.collect()
    dx, dw, db = fastbn.batch_norm_backward(dy, x, mean, invstd, w)
    assert id(dx.base) == block, "the released block was not reused"
    ref_dx, ref_dw, ref_db = reference.batch_norm_backward(dy, x, mean, invstd, w)
    assert_close(dx, ref_dx, np.float32, name="dx in reused memory")
    assert_close(dw, ref_dw, np.float32, name="dweight")
    assert_close(db, ref_db, np.float32, name="dbias")
    assert fastbn.get_output_cache() == 1 << 20 and _pool.cached_bytes() <= 1 << 20


def test_bound_is_kept_and_zero_turns_reuse_off(pooled):
    x = _data()
    w, b, rm, rv = _params(8, np.float32)
    held = [fastbn.batch_norm_infer(x, rm, rv, w, b) for _ in range(40)]  # 32 KB each
    assert _pool.cached_bytes() <= 1 << 20
    assert len({a.__array_interface__["data"][0] for a in held}) == len(held)
    fastbn.set_output_cache(0)
    assert _pool.cached_bytes() == 0
    y = fastbn.batch_norm_infer(x, rm, rv, w, b)
    assert _pool.cached_bytes() == 0
    assert y.base is None or y.base.dtype == y.dtype, "still carved from a byte block"
    for a in held:
        assert_close(a, reference.batch_norm_infer(x, rm, rv, w, b), np.float32)


@pytest.mark.parametrize("value, error", [(-1, ValueError), (1.5, TypeError), (True, TypeError),
                                          ("1", TypeError), (None, TypeError)])
def test_set_output_cache_rejects(value, error):
    with pytest.raises(error, match="nbytes"):
        fastbn.set_output_cache(value)


def test_environment_bound(monkeypatch):
    monkeypatch.setenv("FASTBN_OUTPUT_CACHE", "12345")
    assert _pool._default_limit() == 12345
    monkeypatch.setenv("FASTBN_OUTPUT_CACHE", "lots")
    with pytest.warns(UserWarning, match="FASTBN_OUTPUT_CACHE"):
        assert _pool._default_limit() == 512 << 20


def test_threads_never_share_an_output(pooled):
    x = _data((2, 8, 32, 32))
    w, b, rm, rv = _params(8, np.float32)
    want = fastbn.batch_norm_infer(x, rm, rv, w, b).copy()

    def work(k):
        held = []
        for i in range(200):
            y = fastbn.batch_norm_infer(x, rm, rv, w, b)
            y[0, 0, 0, 0] = k  # marks this thread's array; a shared one would be overwritten
            held.append(y)
            if len(held) > 3:
                old = held.pop(0)
                if old[0, 0, 0, 0] != k:
                    return "an output was shared between threads"
                old[0, 0, 0, 0] = want[0, 0, 0, 0]
                if not np.array_equal(old, want):
                    return "wrong result"
        return None

    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        errors = [e for e in ex.map(work, range(4)) if e]
    assert not errors, errors


def test_large_output_reused():
    """At the real threshold: a 32 MiB training output is reused once released."""
    if fastbn.get_output_cache() < 2 * _pool.MIN_BYTES:
        pytest.skip("output cache bound below two large outputs")
    x = _data((8, 16, 256, 256), key="large")
    w, b, _, _ = _params(16, np.float32)
    y, _, _ = fastbn.batch_norm_train(x, w, b)
    assert y.nbytes >= _pool.MIN_BYTES
    block = id(y.base)
    del y
    gc.collect()
    y, _, _ = fastbn.batch_norm_train(x, w, b)
    assert id(y.base) == block
    ref, _, _ = reference.batch_norm_train(x, w, b)
    assert_close(y, ref, np.float32, name="y in reused memory")


@pytest.mark.parametrize("layout", ["fortran", "torch_channels_last", "strided_batch",
                                    "negative_strides", "unmergeable_input_and_out"])
def test_other_layouts_through_the_pool(pooled, layout):
    """New outputs follow x's memory order; copies of inputs and scratch outputs (strides that
    allow no kernel view) come from the pool too; results stay right when blocks are reused."""
    base = _data((4, 8, 16, 16), key=layout)
    x = {"fortran": np.asfortranarray(base),
         "torch_channels_last": np.ascontiguousarray(base.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2),
         "strided_batch": np.concatenate([base, base])[::2],
         "negative_strides": base[::-1, :, ::-1],
         "unmergeable_input_and_out": np.concatenate([base, base], axis=3)[..., ::2]}[layout]
    w, b, rm, rv = _params(8, np.float32)
    want = reference.batch_norm_infer(x, rm, rv, w, b)
    for _ in range(3):  # the second and third calls run in reused blocks
        if layout == "unmergeable_input_and_out":
            out = np.empty((4, 8, 16, 32), np.float32)[..., ::2]
            y = fastbn.batch_norm_infer(x, rm, rv, w, b, out=out)
            assert y is out
        else:
            y = fastbn.batch_norm_infer(x, rm, rv, w, b)
            order = np.argsort([-abs(s) for s in x.strides], kind="stable")
            assert list(np.argsort([-abs(s) for s in y.strides], kind="stable")) == list(order)
        assert_close(y, want, np.float32, name=f"{layout} output")
        del y
        gc.collect()
    assert _pool.cached_bytes() > 0


def _page_offset(a):
    return a.__array_interface__["data"][0] % 4096


def _at_offset(shape, dtype, offset):
    """A C-contiguous array starting ``offset`` bytes into a page."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + 8192, np.uint8)
    start = (offset - _page_offset(raw)) % 4096
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _page_gap(a, b):
    d = (_page_offset(a) - _page_offset(b)) % 4096
    return min(d, 4096 - d)


@pytest.mark.parametrize("ox, ody", [(16, 16), (0, 2048), (16, 1040), (4000, 64), (2048, 2048)])
def test_empty_apart_keeps_a_quarter_page_from_both_inputs(ox, ody):
    shape = (8, 64, 16, 16)
    x = _at_offset(shape, np.float32, ox)
    dy = _at_offset(shape, np.float32, ody)
    for _ in range(8):  # whatever the allocator hands out first
        y = _pool.empty_apart(shape, np.float32, x.nbytes, x, dy)
        assert y.shape == shape and y.dtype == np.float32 and y.flags.c_contiguous
        assert y.flags.writeable and y.nbytes == x.nbytes
        assert _page_gap(y, x) >= 1024 and _page_gap(y, dy) >= 1024, (_page_offset(x),
                                                                      _page_offset(dy),
                                                                      _page_offset(y))
        assert not np.may_share_memory(y, x) and not np.may_share_memory(y, dy)


@pytest.mark.parametrize("ox, ody", [(8, 16), (24, 24), (8, 2056)])
def test_empty_apart_aligns_float64(ox, ody):
    # inputs on 8 bytes but not 16: the output must still be aligned to its element (the
    # kernels take unaligned views for copies) and apart from both
    shape = (8, 64, 16, 16)
    x = _at_offset(shape, np.float64, ox)
    dy = _at_offset(shape, np.float64, ody)
    for _ in range(8):
        y = _pool.empty_apart(shape, np.float64, x.nbytes, x, dy)
        assert y.flags.aligned and y.flags.c_contiguous and _page_offset(y) % 8 == 0
        assert _page_gap(y, x) >= 1024 - 8 and _page_gap(y, dy) >= 1024 - 8


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_outputs_of_page_strided_rows_lie_apart_and_are_right(dtype):
    # (16, 64, 8, 8): each sample's rows lie 16 KB (32 KB) apart, and the tensor is large enough
    # for new outputs to be placed away from the inputs' page offsets
    shape = (16, 64, 8, 8)
    x = _at_offset(shape, dtype, 64)
    x[...] = _data(shape, dtype)
    dy = _at_offset(shape, dtype, 64)
    dy[...] = _data(shape, dtype, key="dy")
    w, b, _, _ = _params(64, dtype)
    y, mean, invstd = fastbn.batch_norm_train(x, w, b)
    assert _page_gap(y, x) >= 1024
    ry, rmean, rinvstd = reference.batch_norm_train(x, w, b)
    assert_close(y, ry, dtype, slack=input_precision_slack(x, rinvstd, w), name="y")
    dx, dw, db = fastbn.batch_norm_backward(dy, x, rmean.astype(dtype), rinvstd.astype(dtype), w)
    assert _page_gap(dx, x) >= 1024 and _page_gap(dx, dy) >= 1024
    rdx, rdw, rdb = reference.batch_norm_backward(dy, x, rmean.astype(dtype),
                                                  rinvstd.astype(dtype), w)
    assert_close(dx, rdx, dtype, name="dx")
    assert_close(dw, rdw, dtype, name="dweight")
    assert_close(db, rdb, dtype, name="dbias")
