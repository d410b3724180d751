"""The asv suite's plumbing, without asv: parameters follow the shape suite, every timed method has
its own setup, and a missing PyTorch turns into asv's skip signal (NotImplementedError in setup).

(The full run of the suite through asv is tests/test_bench_dashboard.py.)
"""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _py(code, **env):
    e = dict(os.environ)
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=e, capture_output=True,
                          text=True, timeout=120)


def test_params_follow_the_suite_and_methods_have_setups():
    code = r"""
import inspect
from benchmarks import bench_batchnorm as b, common
from fastbn.bench.suite import SUITE
assert common.SHAPES == [s.name for s in SUITE if s.name != "mlp_f64"], common.SHAPES
assert common.DTYPES == ["float32", "float64"]
for cls in (b.TimeInfer, b.TimeTrain, b.TimeBackward, b.TimeStats):
    assert cls.params == [common.SHAPES, common.DTYPES]
    names = [n for n in dir(cls) if n.startswith(("time_", "peakmem_"))]
    assert {"time_fastbn", "time_torch", "time_numpy"} <= set(names), names
    for n in names:
        assert callable(getattr(getattr(cls, n), "setup", None)), (cls, n)
assert {"peakmem_fastbn", "peakmem_torch", "peakmem_numpy"} <= set(dir(b.TimeTrain))
assert {"peakmem_fastbn", "peakmem_torch", "peakmem_numpy"} <= set(dir(b.TimeBackward))
print("ok")
"""
    proc = _py(code, FASTBN_ASV_QUICK="0")
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


def test_quick_grid_is_small():
    proc = _py("from benchmarks import common; print(common.SHAPES, common.DTYPES)",
               FASTBN_ASV_QUICK="1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['edge_n1_late'] ['float32']"


def test_missing_torch_skips_only_torch_benchmarks():
    code = r"""
import sys
sys.modules["torch"] = None  # as if PyTorch were not installed
from benchmarks import bench_batchnorm as b
bench = b.TimeTrain()
bench.setup("edge_n1_late", "float32")
b.TimeTrain.time_fastbn.setup("edge_n1_late", "float32")   # fastbn still prepares
bench.time_fastbn("edge_n1_late", "float32")
try:
    b.TimeTrain.time_torch.setup("edge_n1_late", "float32")
except NotImplementedError as exc:
    print("skip:", exc)
"""
    proc = _py(code)
    assert proc.returncode == 0, proc.stderr
    assert "skip: PyTorch is not installed" in proc.stdout


def test_cold_start_code_runs():
    code = r"""
import subprocess, sys, tempfile
from benchmarks import common
stmt, setup = common.cold_code("stats", tempfile.mkdtemp())
subprocess.run([sys.executable, "-c", setup + stmt], check=True)
print("ok")
"""
    proc = _py(code)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr
