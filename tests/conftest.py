"""Suite-wide pytest configuration.

``@pytest.mark.nightly`` tests (the 10 000-example property runs) are skipped unless the marker
expression selects them, e.g. ``pytest -m nightly``.
"""

import pytest


def pytest_configure(config):
    # also declared in pyproject.toml; repeated so the suite works from a bare checkout
    config.addinivalue_line("markers", "nightly: long-running tests, run with -m nightly")


def pytest_collection_modifyitems(config, items):
    markexpr = config.getoption("markexpr", default="") or ""
    if "nightly" in markexpr and "not nightly" not in markexpr:
        return
    skip = pytest.mark.skip(reason="nightly test: run with -m nightly")
    for item in items:
        if "nightly" in item.keywords:
            item.add_marker(skip)
