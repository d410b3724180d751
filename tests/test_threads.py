"""Concurrency and reproducibility.

* 8 Python threads x 1,000 mixed calls (statistics, training forward, inference, backward in
  both modes, ``batch_norm`` with running statistics) on shared read-only inputs, each thread
  writing into its own ``out=`` buffers and running statistics: no abort, and every result is
  bit-identical to the serial run.
* Results are bit-identical with 1 and with 2 (or more) Numba threads: the reduction order
  must not depend on the thread count.
* The same mixed calls through a process pool, with the ``fork`` start method (after the parent
  already ran parallel kernels: with GNU OpenMP the children must fall back to the serial
  builds instead of aborting) and with ``spawn``; each child also calls from 2 threads at once.
  Children's results are compared with the parent's serial run by digest.

Inputs mix small tensors (< ``fastbn._config.SERIAL_BELOW`` = 32768 elements: the kernels'
serial builds, except the one-call kernels of channels-first tensors of 8192 elements or more,
which split channels among threads), in every layout family of the input generator, with a few medium ones
(>= 32768: the parallel builds), which are called less often so the test stays short.
"""

import concurrent.futures
import hashlib
import multiprocessing
import threading
import warnings

import inputs
import numpy as np
import pytest

import fastbn

CALLS_PER_THREAD = 1000
N_THREADS = 8

#: the parallel builds run at and above this many elements
PARALLEL_FROM = getattr(fastbn._config, "SERIAL_BELOW", 1 << 15)

# < 32768 elements: serial builds.  Channels-first, channels-last, transposed (torch's
# channels_last), strided, Fortran, negative strides, other axes, C == 1.
SMALL_IDS = ["nchw_256x14-float32", "nhwc_56x64-float64", "torch_channels_last-float64",
             "strided_channel-float32", "odd_3x5x7_axis-1-float64", "fortran_nchw-float32",
             "reversed_channel_last-float64", "transposed_2d_T-float32", "c1_nc-float64",
             "nc_1024-float32"]
# small, but large enough for the one-call kernels' parallel builds
SMALL_THREADED_IDS = ["threaded_n1-float32", "threaded_strided_batch-float64",
                      "threaded_nhwc-float32", "threaded_nc-float64", "threaded_nhwc_c5-float32",
                      "threaded_strided_nc-float32"]
SMALL_IDS += SMALL_THREADED_IDS
# >= 32768 elements: parallel builds (channels-first, channels-last with few channels, C == 1)
LARGE_IDS = ["medium_nchw-float32", "medium_nhwc_c3-float64", "medium_c1_long-float32",
             "medium_short_runs-float64", "medium_nc_few_rows-float32",
             "medium_long_runs-float32"]
#: relative call frequency of a large case's tasks (small cases: 1)
LARGE_WEIGHT = 0.4

KINDS = ("stats-two_pass", "stats-welford", "train", "infer", "backward", "backward-eval",
         "batch_norm")


def _readonly(*arrays):
    for a in arrays:
        a.flags.writeable = False
    return arrays


class Task:
    """One kind of call on one case.  ``run(priv)`` makes the call with the caller's private
    buffers ``priv`` (a dict this task may fill on first use) and returns a tuple of arrays."""

    def __init__(self, name, fn, out_like=None, running=None):
        self.name = name
        self._fn = fn
        self._out_like = out_like  # shape/dtype template of out=, or None (no out= argument)
        self._running = running  # (running_mean, running_var) to restart from, or None

    def run(self, priv):
        bufs = priv.get(self.name)
        if bufs is None:
            out = None if self._out_like is None else np.empty_like(self._out_like)
            run = None if self._running is None else tuple(a.copy() for a in self._running)
            bufs = priv[self.name] = (out, run)
        out, run = bufs
        if out is not None:
            out.fill(np.nan)  # a kernel that skipped elements cannot pass unnoticed
        if run is not None:
            for dst, src in zip(run, self._running):
                np.copyto(dst, src)  # the call updates them in place: start from the same state
        return self._fn(out, run)


def _build_tasks():
    """name -> Task, and name -> sampling weight.  Every input array is shared by all callers
    and read-only, so a write to one raises instead of silently racing."""
    tasks, weights = {}, {}
    for cid in SMALL_IDS + LARGE_IDS:
        c = inputs.build(cid)
        x, axis = c.x, c.axis
        assert (x.size >= PARALLEL_FROM) == (cid in LARGE_IDS), (cid, x.size)
        if cid in SMALL_THREADED_IDS:
            assert x.size >= 2 * fastbn._config.SMALL_PARALLEL_FROM, (cid, x.size)
        w, b, rm, rv = inputs.params(x.shape[axis], x.dtype, cid)
        dy = inputs.like(x, cid)
        _, mean, invstd = fastbn.batch_norm_train(x, w, b, axis=axis)
        inv_run = (1.0 / np.sqrt(rv.astype(np.float64) + 1e-5)).astype(x.dtype)
        _readonly(x, w, b, rm, rv, dy, mean, invstd, inv_run)

        def stats(out, run, x=x, axis=axis, method="two_pass"):
            return fastbn.channel_stats(x, axis=axis, method=method)

        def stats_w(out, run, x=x, axis=axis):
            return fastbn.channel_stats(x, axis=axis, method="welford")

        def train(out, run, x=x, w=w, b=b, axis=axis):
            res = fastbn.batch_norm_train(x, w, b, axis=axis, out=out)
            assert res[0] is out
            return res

        def infer(out, run, x=x, rm=rm, rv=rv, w=w, b=b, axis=axis):
            res = fastbn.batch_norm_infer(x, rm, rv, w, b, axis=axis, activation="relu", out=out)
            assert res is out
            return (res,)

        def backward(out, run, dy=dy, x=x, m=mean, s=invstd, w=w, axis=axis):
            res = fastbn.batch_norm_backward(dy, x, m, s, w, axis=axis, out=out)
            assert res[0] is out
            return res

        def backward_eval(out, run, dy=dy, x=x, m=rm, s=inv_run, w=w, axis=axis):
            res = fastbn.batch_norm_backward(dy, x, m, s, w, axis=axis, training=False, out=out)
            assert res[0] is out
            return res

        def bn_train(out, run, x=x, w=w, b=b, axis=axis):
            run_mean, run_var = run
            res = fastbn.batch_norm(x, run_mean, run_var, w, b, training=True, axis=axis, out=out)
            assert res is out
            return res, run_mean, run_var

        fns = {"stats-two_pass": (stats, False), "stats-welford": (stats_w, False),
               "train": (train, True), "infer": (infer, True), "backward": (backward, True),
               "backward-eval": (backward_eval, True), "batch_norm": (bn_train, True)}
        assert set(fns) == set(KINDS)
        for kind, (fn, has_out) in fns.items():
            name = f"{cid}/{kind}"
            tasks[name] = Task(name, fn, x if has_out else None,
                               (rm, rv) if kind == "batch_norm" else None)
            weights[name] = LARGE_WEIGHT if cid in LARGE_IDS else 1.0
    return tasks, weights


def _schedule(names, weights, seed, n):
    p = np.array([weights[k] for k in names])
    rng = np.random.default_rng(seed)
    return [names[i] for i in rng.choice(len(names), n, p=p / p.sum())]


def _same(a, b):
    return len(a) == len(b) and all(
        x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y, equal_nan=True)
        for x, y in zip(a, b))


def _digest(result):
    h = hashlib.sha256()
    for a in result:
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def tasks():
    t, weights = _build_tasks()
    priv = {}
    for task in t.values():  # compile every kernel variant (serial and parallel builds)
        task.run(priv)
    return t, weights


@pytest.fixture(scope="module")
def serial(tasks):
    """The serial run: each task once, from the main thread, copied out of its buffers."""
    t, _ = tasks
    priv = {}
    return {name: tuple(np.array(a, copy=True) for a in task.run(priv))
            for name, task in t.items()}


@pytest.fixture
def restore_threads():
    n = fastbn.get_num_threads()
    yield
    fastbn.set_num_threads(n)


def _parallel_region_ran():
    import numba
    try:
        numba.threading_layer()
    except ValueError:  # raised until the first parallel region has run
        return False
    return True


def test_schedule_mixes_serial_and_parallel_sizes(tasks):
    t, weights = tasks
    names = sorted(t)
    order = _schedule(names, weights, 0, CALLS_PER_THREAD)
    large = sum(1 for n in order if n.split("/")[0] in LARGE_IDS)
    assert 0.05 * len(order) < large < 0.5 * len(order), large
    assert {n.split("/")[1] for n in order} == set(KINDS)
    assert len({n.split("/")[0] for n in order}) == len(SMALL_IDS) + len(LARGE_IDS)


def test_threads_bit_identical_to_serial(tasks, serial):
    t, weights = tasks
    names = sorted(t)
    barrier = threading.Barrier(N_THREADS)

    def worker(seed):
        order = _schedule(names, weights, seed, CALLS_PER_THREAD)
        priv = {}  # this thread's out= buffers and running statistics
        barrier.wait()
        bad = []
        for name in order:
            if not _same(t[name].run(priv), serial[name]):
                bad.append(name)
        return bad, len(order)

    with concurrent.futures.ThreadPoolExecutor(N_THREADS) as ex:
        futures = [ex.submit(worker, seed) for seed in range(N_THREADS)]
        results = [f.result(timeout=300) for f in futures]
    assert sum(n for _, n in results) == N_THREADS * CALLS_PER_THREAD
    bad = [name for b, _ in results for name in b]
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
    t, _ = tasks
    counts = sorted({1, 2, top})
    results = {}
    for n in counts:
        fastbn.set_num_threads(n)
        priv = {}
        results[n] = {name: tuple(np.array(a, copy=True) for a in task.run(priv))
                      for name, task in t.items()}
    bad = [(name, n) for n in counts[1:] for name in t
           if not _same(results[n][name], results[1][name])]
    assert not bad, f"results differ between 1 thread and more: {bad[:6]}"


# ---- processes --------------------------------------------------------------------------------

CHILD_JOBS = 4  # jobs over a pool of 2 processes
CHILD_THREADS = 2
CHILD_CALLS = 250  # per thread per job: 4 x 2 x 250 = 2000 calls

_CHILD_TASKS = None


def _child_job(seed):
    """Run in a pool process: CHILD_THREADS threads x CHILD_CALLS mixed calls.  Returns
    {task name: set of result digests} and whether parallel kernels may run in this process."""
    global _CHILD_TASKS
    if _CHILD_TASKS is None:
        _CHILD_TASKS = _build_tasks()
    t, weights = _CHILD_TASKS
    names = sorted(t)
    seen = {}
    calls = []
    errors = []
    lock = threading.Lock()

    def worker(k):
        priv = {}
        try:
            for name in _schedule(names, weights, (seed, k), CHILD_CALLS):
                d = _digest(t[name].run(priv))
                with lock:
                    seen.setdefault(name, set()).add(d)
                    calls.append(name)
        except Exception as exc:  # noqa: BLE001  (reported to the parent, not lost)
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(CHILD_THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise RuntimeError(f"child worker failed: {errors[:3]}")
    assert len(calls) == CHILD_THREADS * CHILD_CALLS
    force_serial = getattr(fastbn._config, "force_serial", None)
    return seen, bool(force_serial()) if force_serial else None


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_multiprocessing(method, tasks, serial):
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} start method on this platform")
    # the parent has run parallel kernels (the tasks fixture warmed them up) before forking: a
    # forked child inherits a started OpenMP runtime.  (With one thread fastbn runs the serial
    # builds only, so no parallel region exists to inherit.)
    if fastbn.get_num_threads() > 1:
        assert _parallel_region_ran()
    expected = {name: _digest(r) for name, r in serial.items()}
    ctx = multiprocessing.get_context(method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork of a threaded process
        pool = ctx.Pool(2)
    try:
        jobs = [pool.apply_async(_child_job, (seed,)) for seed in range(CHILD_JOBS)]
        results = [j.get(timeout=300) for j in jobs]
    finally:
        pool.terminate()
        pool.join()
    bad, calls = [], set()
    for seen, _forced_serial in results:
        calls |= set(seen)
        bad += [name for name, digests in seen.items() if digests != {expected[name]}]
    assert not bad, f"{method} children's results differ from the parent's: {sorted(set(bad))[:6]}"
    assert any(n.split("/")[0] in LARGE_IDS for n in calls)  # parallel sizes ran in children
    if method == "spawn":  # a fresh process is free to run the parallel builds
        assert not any(forced for _, forced in results)
