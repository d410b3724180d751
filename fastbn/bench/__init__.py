"""Benchmarks for fastbn: ``python -m fastbn bench`` and the pieces the asv and pytest suites share.

* :mod:`fastbn.bench.suite` -- the public shape suite and the ``--shapes`` parser.
* :mod:`fastbn.bench.contenders` -- the one registry of timed calls (fastbn, PyTorch, NumPy,
  ONNX Runtime) and the NumPy baseline that doubles as the result check.
* :mod:`fastbn.bench.runner` -- the CLI: interleaved timing, roofline, table, ``--json``.
* :mod:`fastbn.bench.plot` -- the ``--plot`` chart (matplotlib, optional).

Nothing here is imported by ``import fastbn``; PyTorch, ONNX Runtime, matplotlib and tqdm are
optional and imported only when used.
"""


def main(argv=None) -> int:
    """Entry point used by ``python -m fastbn bench``; see :func:`fastbn.bench.runner.main`."""
    from .runner import main as _main

    return _main(argv)


__all__ = ["main"]
