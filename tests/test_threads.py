"""Concurrency and reproducibility.

* 8 Python threads x a few hundred mixed calls on shared read-only inputs give results
  bit-identical to the serial run (no shared scratch, no races, no thread-layer abort).
* Results are bit-identical with 1 and with 2 (or more) Numba threads: the reduction order
  must not depend on the thread count.
* multiprocessing children ("fork" after the parent already ran parallel kernels, and "spawn")
  run a call without crashing or hanging and get the parent's result.

Inputs come from the generator's medium cases: large enough (32k..131k elements) for the
parallel kernel builds to run.
"""

import concurrent.futures
import multiprocessing
import threading
import warnings

import inputs
import numpy as np
import pytest

import fastbn

CALLS_PER_THREAD = 200
N_THREADS = 8
CASE_IDS = ["medium_c1_long-float32", "medium_nhwc_c3-float64", "medium_nchw-float32",
            "torch_channels_last-float64", "strided_channel-float32", "odd_3x5x7_axis-1-float64"]


def _readonly(*arrays):
    for a in arrays:
        a.flags.writeable = False
    return arrays


def _tasks():
    """name -> zero-argument callable returning a tuple of arrays.  Inputs are shared by all
    threads and read-only, so any write to them raises instead of silently racing."""
    tasks = {}
    for cid in CASE_IDS:
        c = inputs.build(cid)
        x, axis = c.x, c.axis
        w, b, rm, rv = inputs.params(x.shape[axis], x.dtype, cid)
        dy = inputs.like(x, cid)
        _, mean, invstd = fastbn.batch_norm_train(x, w, b, axis=axis)
        inv_run = (1.0 / np.sqrt(rv.astype(np.float64) + 1e-5)).astype(x.dtype)
        _readonly(x, w, b, rm, rv, dy, mean, invstd, inv_run)

        def bn_train(x=x, w=w, b=b, rm=rm, rv=rv, axis=axis):
            run_mean, run_var = rm.copy(), rv.copy()  # per-call state: updated in place
            y = fastbn.batch_norm(x, run_mean, run_var, w, b, training=True, axis=axis)
            return y, run_mean, run_var

        for method in ("two_pass", "welford"):
            tasks[f"{cid}/stats-{method}"] = (
                lambda x=x, axis=axis, method=method: fastbn.channel_stats(x, axis=axis,
                                                                           method=method))
        tasks[f"{cid}/train"] = lambda x=x, w=w, b=b, axis=axis: fastbn.batch_norm_train(
            x, w, b, axis=axis)
        tasks[f"{cid}/infer"] = lambda x=x, rm=rm, rv=rv, w=w, b=b, axis=axis: (
            fastbn.batch_norm_infer(x, rm, rv, w, b, axis=axis, activation="relu"),)
        tasks[f"{cid}/backward"] = lambda dy=dy, x=x, m=mean, s=invstd, w=w, axis=axis: (
            fastbn.batch_norm_backward(dy, x, m, s, w, axis=axis))
        tasks[f"{cid}/backward-eval"] = lambda dy=dy, x=x, m=rm, s=inv_run, w=w, axis=axis: (
            fastbn.batch_norm_backward(dy, x, m, s, w, axis=axis, training=False))
        tasks[f"{cid}/batch_norm"] = bn_train
    return tasks


@pytest.fixture(scope="module")
def tasks():
    t = _tasks()
    for f in t.values():  # warm up: compile every kernel variant before timing-sensitive use
        f()
    return t


def _same(a, b):
    return len(a) == len(b) and all(
        x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y, equal_nan=True)
        for x, y in zip(a, b))


@pytest.fixture
def restore_threads():
    n = fastbn.get_num_threads()
    yield
    fastbn.set_num_threads(n)


def test_threads_bit_identical_to_serial(tasks):
    serial = {name: f() for name, f in tasks.items()}
    names = sorted(tasks)
    barrier = threading.Barrier(N_THREADS)

    def worker(seed):
        rng = np.random.default_rng(seed)
        order = rng.choice(len(names), CALLS_PER_THREAD)
        barrier.wait()
        bad = []
        for i in order:
            name = names[i]
            if not _same(tasks[name](), serial[name]):
                bad.append(name)
        return bad

    with concurrent.futures.ThreadPoolExecutor(N_THREADS) as ex:
        futures = [ex.submit(worker, seed) for seed in range(N_THREADS)]
        bad = [name for f in futures for name in f.result(timeout=300)]
    assert not bad, f"{len(bad)} concurrent results differ from serial, e.g. {sorted(set(bad))[:5]}"


def test_set_get_num_threads(restore_threads):
    import numba
    top = numba.config.NUMBA_NUM_THREADS
    fastbn.set_num_threads(1)
    assert fastbn.get_num_threads() == 1
    fastbn.set_num_threads(top)
    assert fastbn.get_num_threads() == top


def test_results_independent_of_thread_count(tasks, restore_threads):
    import numba
    top = numba.config.NUMBA_NUM_THREADS
    if top < 2:
        pytest.skip("needs NUMBA_NUM_THREADS >= 2")
    counts = sorted({1, 2, top})
    results = {}
    for n in counts:
        fastbn.set_num_threads(n)
        results[n] = {name: f() for name, f in tasks.items()}
    bad = [(name, n) for n in counts[1:] for name in tasks
           if not _same(results[n][name], results[1][name])]
    assert not bad, f"results differ between 1 thread and more: {bad[:6]}"


# ---- processes --------------------------------------------------------------------------------

def _child_inputs():
    c = inputs.build("medium_nchw-float32")
    w, b, _, _ = inputs.params(c.x.shape[c.axis], c.x.dtype, c.id)
    return c.x, w, b, c.axis


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_multiprocessing(method, tasks):
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} start method on this platform")
    x, w, b, axis = _child_inputs()
    # the parent has run parallel kernels (the tasks fixture warmed them up) before forking
    expected = fastbn.batch_norm_train(x, w, b, axis=axis)
    ctx = multiprocessing.get_context(method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork of a threaded process
        pool = ctx.Pool(2)
    try:
        jobs = [pool.apply_async(fastbn.batch_norm_train, (x, w, b), {"axis": axis})
                for _ in range(2)]
        stats = pool.apply_async(fastbn.channel_stats, (x,), {"axis": axis})
        results = [j.get(timeout=180) for j in jobs]
        child_stats = stats.get(timeout=180)
    finally:
        pool.terminate()
        pool.join()
    for r in results:
        assert _same(r, expected), f"{method} child result differs from the parent's"
    assert _same(child_stats, fastbn.channel_stats(x, axis=axis))
