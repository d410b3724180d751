#!/usr/bin/env python
"""Print a small table of the reliability tests: per category, how many cases pytest collected
and how they ended (passed / failed / error / skipped / xfail / xpass).

Three ways to get the numbers, none of which re-implements pytest's logic:

* ``scripts/reliability_report.py report.xml`` -- read a JUnit XML file that an earlier run
  wrote (``python -m pytest --junitxml=report.xml``).  The cheapest in CI: one test run, then
  this table.
* ``scripts/reliability_report.py --run [-- PYTEST ARGS]`` -- run pytest once (a subprocess, with
  ``--junitxml`` to a temporary file) on the reliability test files, then read that.
* ``scripts/reliability_report.py --collect-only [-- PYTEST ARGS]`` -- only count what would run
  (``pytest --collect-only -q``), no outcomes; takes seconds.

Categories are assigned from the test's node id by the first matching rule in ``CATEGORIES``;
anything unmatched is reported under its file name, so no test is silently dropped.  Deselected
tests (``-k``/``-m``) are not collected and do not appear; ``nightly`` tests appear as skipped
unless ``-m nightly`` is given.

Exit status: 1 if any case failed or errored, else 0 (2 when pytest could not run at all).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import OrderedDict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The test files --run / --collect-only use by default (the library's reliability suite; the
#: benchmark and demo tests are left out).
DEFAULT_FILES = ["tests/test_errors.py", "tests/test_odd_inputs.py", "tests/test_threads.py",
                 "tests/test_numerics.py", "tests/test_functional.py", "tests/test_layers.py"]

#: (category, regular expression searched in "file::test_name[params]"), first match wins.
CATEGORIES = [
    ("bad input -> ValueError/TypeError", r"test_errors\.py::"),
    ("threads x 1000 calls, thread count",
     r"test_threads\.py::test_(threads|results|set_get|schedule)"),
    ("process pools (fork, spawn)", r"test_threads\.py::test_multiprocessing"),
    ("odd layouts (F, strided, <0, T, bcast)", r"test_odd_inputs\.py::test_layout_every_function"),
    ("big-endian", r"test_odd_inputs\.py::test_big_endian"),
    ("read-only inputs", r"test_odd_inputs\.py::test_readonly|test_functional\.py::test_readonly"),
    ("constant channels (var = 0)", r"::test_constant_channels|::test_eps\["),
    ("near float max / overflow",
     r"::test_near_float32_max|::test_float64_variance_overflow|::test_backward_sums_of_huge"),
    ("subnormals", r"::test_subnormals"),
    ("NaN/Inf stays in its channel", r"::test_nonfinite_stays|::test_nan_stays"),
    ("far from unit scale", r"::test_far_from_unit_scale"),
    ("cancellation (large offsets)", r"test_numerics\.py::test_cancellation"),
    ("property tests (hypothesis)", r"test_numerics\.py::test_property"),
    ("vs PyTorch", r"test_(functional|layers)\.py::\w*(torch|autograd)"),
    ("vs float64 reference", r"test_functional\.py::"),
    ("layers", r"test_layers\.py::"),
]

OUTCOMES = ("passed", "failed", "error", "skipped", "xfail", "xpass")


def categorize(nodeid):
    for name, pattern in CATEGORIES:
        if re.search(pattern, nodeid):
            return name
    return nodeid.split("::", 1)[0]


def _nodeid(case):
    """``tests/test_x.py::test_name[params]`` from a JUnit <testcase> (classname is the dotted
    module path, plus the class for methods)."""
    classname = case.get("classname", "")
    name = case.get("name", "")
    file = case.get("file")
    if not file:
        parts = classname.split(".")
        # find the module part (test_*.py) of the dotted path
        for i in range(len(parts), 0, -1):
            candidate = os.path.join(*parts[:i]) + ".py"
            if os.path.exists(os.path.join(ROOT, candidate)):
                file = candidate
                extra = parts[i:]
                break
        else:
            file, extra = classname.replace(".", "/") + ".py", []
        name = "::".join(extra + [name])
    return f"{file}::{name}"


def _outcome(case):
    kids = {child.tag: child for child in case}
    if "failure" in kids:
        return "failed"
    if "error" in kids:
        return "error"
    if "skipped" in kids:
        return "xfail" if kids["skipped"].get("type") == "pytest.xfail" else "skipped"
    props = case.find("properties")
    if props is not None and any(p.get("name") == "xpass" for p in props):
        return "xpass"
    return "passed"


def from_junit(path):
    """{category: {outcome: count}} and the total time from a JUnit XML file."""
    tree = ET.parse(path)
    root = tree.getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    table, seconds = OrderedDict(), 0.0
    for suite in suites:
        seconds += float(suite.get("time", 0) or 0)
        for case in suite.iter("testcase"):
            cat = categorize(_nodeid(case))
            row = table.setdefault(cat, dict.fromkeys(OUTCOMES, 0))
            row[_outcome(case)] += 1
    return table, seconds


def _env():
    """The subprocess environment: this checkout importable even when not installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return env


def from_collect(pytest_args):
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
           *pytest_args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env(),
                          check=False)
    if proc.returncode not in (0, 5):  # 5: nothing collected
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(2)
    table = OrderedDict()
    for line in proc.stdout.splitlines():
        if "::" in line and not line.startswith(("=", " ")):
            cat = categorize(line.strip())
            table[cat] = table.get(cat, 0) + 1
    return table


def run(pytest_args):
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               f"--junitxml={xml}", "-o", "junit_family=xunit1", *pytest_args]
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(), check=False)
        if not os.path.exists(xml):
            raise SystemExit(2)
        return from_junit(xml), proc.returncode


def _order(table):
    names = [c for c, _ in CATEGORIES]
    return sorted(table, key=lambda c: (names.index(c) if c in names else len(names), c))


def print_outcomes(table, seconds=None, out=sys.stdout):
    shown = [o for o in OUTCOMES if any(row[o] for row in table.values())
             or o in ("passed", "failed")]
    width = max([len("category")] + [len(c) for c in table])
    head = f"{'category':<{width}}  {'cases':>6}" + "".join(f"  {o:>7}" for o in shown)
    out.write(head + "\n" + "-" * len(head) + "\n")
    total = dict.fromkeys(OUTCOMES, 0)
    for cat in _order(table):
        row = table[cat]
        n = sum(row.values())
        out.write(f"{cat:<{width}}  {n:>6}" + "".join(f"  {row[o]:>7}" for o in shown) + "\n")
        for o in OUTCOMES:
            total[o] += row[o]
    out.write("-" * len(head) + "\n")
    out.write(f"{'total':<{width}}  {sum(total.values()):>6}"
              + "".join(f"  {total[o]:>7}" for o in shown) + "\n")
    if seconds is not None:
        out.write(f"(pytest time {seconds:.1f} s)\n")
    return total


def print_counts(table, out=sys.stdout):
    width = max([len("category")] + [len(c) for c in table])
    out.write(f"{'category':<{width}}  {'collected':>9}\n" + "-" * (width + 11) + "\n")
    for cat in _order(table):
        out.write(f"{cat:<{width}}  {table[cat]:>9}\n")
    out.write("-" * (width + 11) + "\n" + f"{'total':<{width}}  {sum(table.values()):>9}\n")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args = []
    if "--" in argv:  # everything after "--" goes to pytest
        i = argv.index("--")
        argv, pytest_args = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="pytest arguments go after '--', e.g. --run -- -k 'not torch' tests/test_errors.py"
               f"; without test paths there, {' '.join(DEFAULT_FILES)}")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--run", action="store_true", help="run pytest, then report outcomes")
    mode.add_argument("--collect-only", action="store_true", help="only count collected cases")
    ap.add_argument("junit", nargs="?", help="JUnit XML file of an earlier pytest run")
    args = ap.parse_args(argv)
    if args.junit and (args.run or args.collect_only):
        ap.error("give a JUnit file or --run/--collect-only, not both")
    if not args.junit and not (args.run or args.collect_only):
        ap.error("give a JUnit XML file, --run or --collect-only")
    if pytest_args and not (args.run or args.collect_only):
        ap.error("pytest arguments only go with --run or --collect-only")
    paths = [a for a in pytest_args
             if os.path.exists(os.path.join(ROOT, a.split("::")[0]))]
    if not paths:
        pytest_args = DEFAULT_FILES + pytest_args
    if args.collect_only:
        print_counts(from_collect(pytest_args))
        return 0
    rc = 0
    if args.run:
        (table, seconds), rc = run(pytest_args)
    else:
        table, seconds = from_junit(args.junit)
    total = print_outcomes(table, seconds)
    if rc not in (0, 1, 5):  # interrupted, internal or usage error: the table may be partial
        print(f"pytest exited with status {rc}: the counts above may be incomplete")
        return 2
    return 1 if total["failed"] or total["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
