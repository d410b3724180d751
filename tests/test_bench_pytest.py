"""pytest-benchmark: fastbn, PyTorch and NumPy on scaled-down suite shapes.

Each (shape, op) is one benchmark group holding all three contenders, so
``pytest tests/test_bench_pytest.py --benchmark-only`` prints them side by side. Under the default
``--benchmark-disable`` (pyproject addopts) every benchmark runs once: a smoke test that each
contender runs every op on every suite layout, and that fastbn and PyTorch agree with the
float64 NumPy reference.

The shapes keep each suite entry's rank, channel axis, dtype and (where possible) channel count,
shrunk to at most 64k elements so the whole file runs in seconds; the full-size numbers come from
``python -m fastbn bench`` and the asv suite.
"""

import pytest

from fastbn.bench.contenders import Unavailable, compare, make_inputs, prepare, reference, tolerance
from fastbn.bench.suite import OPS, SUITE, scaled

SMALL = [scaled(s, 1 << 16) for s in SUITE]
_INPUTS = {}


def _inputs(spec):
    if spec not in _INPUTS:
        _INPUTS[spec] = make_inputs(spec)
    return _INPUTS[spec]


def _prepared(contender, op, spec):
    if contender == "torch":
        pytest.importorskip("torch", reason="PyTorch not installed")
    try:
        p = prepare(contender, op, spec, _inputs(spec))
    except Unavailable as exc:
        pytest.skip(str(exc))
    return p


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("spec", SMALL, ids=[s.name for s in SMALL])
@pytest.mark.parametrize("contender", ["fastbn", "torch", "numpy"])
def test_bench(benchmark, contender, spec, op):
    p = _prepared(contender, op, spec)
    first = p.fn()  # compile / warm up outside the timing
    if contender != "numpy":
        diff = compare(p.to_numpy(first), reference(op, spec, _inputs(spec)))
        assert diff <= tolerance(spec.dtype), f"{contender} {op} {spec.label()}: {diff:.2e}"
    benchmark.group = f"{spec.name}-{op}"
    benchmark.extra_info.update(shape=list(spec.shape), axis=spec.axis, dtype=spec.dtype,
                                note=p.note)
    benchmark(p.fn)

