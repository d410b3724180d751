"""Suite-wide pytest configuration.

``@pytest.mark.nightly`` tests (the 10 000-example property runs) are skipped unless the marker
expression selects them, e.g. ``pytest -m nightly``.
"""

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # also declared in pyproject.toml; repeated so the suite works from a bare checkout
    config.addinivalue_line("markers", "nightly: long-running tests, run with -m nightly")
    # pyproject's addopts disable pytest-benchmark's timing so that the normal run executes each
    # benchmark once as a smoke test; asking for --benchmark-only (or --benchmark-enable) means
    # the timings are wanted.
    opt = config.option
    if getattr(opt, "benchmark_only", False) or getattr(opt, "benchmark_enable", False):
        opt.benchmark_disable = False


def pytest_collection_modifyitems(config, items):
    markexpr = config.getoption("markexpr", default="") or ""
    if "nightly" in markexpr and "not nightly" not in markexpr:
        return
    skip = pytest.mark.skip(reason="nightly test: run with -m nightly")
    for item in items:
        if "nightly" in item.keywords:
            item.add_marker(skip)
