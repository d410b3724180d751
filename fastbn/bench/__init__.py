"""Benchmarks for fastbn: ``python -m fastbn bench`` and the pieces the asv and pytest suites share.

* :mod:`fastbn.bench.suite` -- the public shape suite and the ``--shapes`` parser.
* :mod:`fastbn.bench.contenders` -- the one registry of timed calls (fastbn, PyTorch, NumPy,
  ONNX Runtime) and the NumPy baseline that doubles as the result check.
* :mod:`fastbn.bench.runner` -- the CLI: interleaved timing, roofline, table, ``--json``.
* :mod:`fastbn.bench.plot` -- the ``--plot`` chart (matplotlib, optional).
* :mod:`fastbn.bench.machine` -- CPU, versions, threading layer, and how busy other processes kept
  the CPUs during a run.
* :mod:`fastbn.bench.asv_html` -- makes an ``asv publish`` dashboard load without internet.

The asv suite lives in ``benchmarks/`` at the repository root, the pytest-benchmark tests in
``tests/test_bench_pytest.py``; both build their timed calls from :mod:`fastbn.bench.contenders`.

Nothing here is imported by ``import fastbn``; PyTorch, ONNX Runtime, matplotlib and tqdm are
optional and imported only when used.
"""


def main(argv=None) -> int:
    """Entry point used by ``python -m fastbn bench``; see :func:`fastbn.bench.runner.main`."""
    from .runner import main as _main

    return _main(argv)


__all__ = ["main"]
