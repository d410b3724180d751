"""``python -m fastbn bench``: the quick run, its JSON and plot, shapes, errors, README table.

The quick run is the README's headline command in small; it runs once per session (module fixture,
~10-20 s on 2 cores) and the JSON it writes feeds the other checks.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from fastbn.bench import runner, suite
from fastbn.bench.contenders import compare, make_inputs, numpy_ops, torch_layout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_MPL = importlib.util.find_spec("matplotlib") is not None


def run_cli(*args, timeout=300, pre=None):
    """Run ``python -m fastbn bench ARGS`` from the checkout; ``pre`` is code run before it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    if pre is None:
        cmd = [sys.executable, "-m", "fastbn", "bench", *args]
    else:
        code = (f"{pre}\nimport sys\nfrom fastbn.bench.runner import main\n"
                f"sys.exit(main({list(args)!r}))")
        cmd = [sys.executable, "-c", code]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    js, png = tmp / "quick.json", tmp / "quick.png"
    args = ["--quick", "--json", str(js), "--no-progress"]
    if HAS_MPL:
        args += ["--plot", str(png)]
    proc = run_cli(*args)
    assert proc.returncode == 0, f"bench --quick failed:\n{proc.stdout}\n{proc.stderr}"
    with open(js, encoding="utf-8") as fh:
        doc = json.load(fh)
    return proc, doc, js, png


def test_quick_prints_table_and_geomeans(quick):
    proc, doc, _, _ = quick
    out = proc.stdout
    for header in ("shape", "op", "fastbn", "PyTorch", "NumPy", "vs PyTorch", "roofline"):
        assert header in out
    assert "geometric mean" in out
    for name in suite.QUICK:
        assert name in out
    for title in suite.OP_TITLES.values():
        assert title in out
    assert "roofline = parallel-copy time" in out


def test_quick_json_has_every_figure(quick):
    _, doc, _, _ = quick
    for key in ("format", "command", "config", "machine", "peers", "results", "geomean", "method"):
        assert key in doc
    assert doc["command"].startswith("python -m fastbn bench --quick")
    m = doc["machine"]
    for key in ("cpu", "available_cores", "python", "numpy", "numba", "threading_layer", "fastbn"):
        assert key in m, key
    assert m["threading_layer"]  # known once a parallel kernel ran
    assert doc["config"]["threads"] >= 1
    n_cases = len(suite.QUICK) * len(suite.OPS)
    assert len(doc["results"]) == n_cases
    for r in doc["results"]:
        assert r["op"] in suite.OPS
        assert r["fastbn_s"] > 0 and r["numpy_s"] > 0 and r["copy_s"] > 0
        assert r["times"]["fastbn"]["n"] >= 3
        assert len(r["times"]["fastbn"]["samples_s"]) == r["times"]["fastbn"]["n"]
        assert r["bytes_moved"] == suite.OP_BYTES[r["op"]] * r["shape"]["nbytes"]
        assert math.isclose(r["roofline_s"], r["copy_s"] * r["bytes_moved_per_B"] / 2)
        assert math.isclose(r["roofline_fraction"], r["roofline_s"] / r["fastbn_s"])
        assert r["check_max_rel_diff"]["fastbn"] <= 1e-3, r["check_max_rel_diff"]
    assert set(doc["geomean"]) == set(suite.OPS)


@pytest.mark.skipif(not HAS_TORCH, reason="PyTorch not installed")
def test_quick_json_has_pytorch_columns(quick):
    proc, doc, _, _ = quick
    assert doc["peers"]["torch"]["available"]
    assert doc["machine"]["torch"]
    for r in doc["results"]:
        assert r["torch_s"] > 0
        assert r["speedup_vs_torch"] == pytest.approx(r["torch_s"] / r["fastbn_s"])
        assert r["check_max_rel_diff"]["torch"] <= 1e-3
        if r["shape"]["axis"] == -1:
            assert r["torch_layout"] == "channels_last"
        q = r["speedup_vs_torch_quartiles"]
        if r["times"]["fastbn"]["n"] >= runner.MIN_PAIRS and r["times"]["torch"]["n"] >= runner.MIN_PAIRS:
            assert 0 < q[0] <= q[1]
            want = "ahead" if q[0] > 1 else "behind" if q[1] < 1 else "tie"
            assert r["standing_vs_torch"] == want
        else:
            assert q is None and r["standing_vs_torch"] is None
    assert "channels_last for nhwc" in proc.stdout
    assert "~ marks a tie" in proc.stdout
    for g in doc["geomean"].values():
        assert g["speedup_vs_torch"] > 0


def test_quick_plot(quick):
    if not HAS_MPL:
        pytest.skip("matplotlib not installed: --plot not exercised")
    _, _, _, png = quick
    with open(png, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_readme_table_script(quick):
    _, doc, js, _ = quick
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "make_readme_table.py"),
                           str(js)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    md = proc.stdout
    assert md.lstrip().startswith("| shape")
    assert "| fastbn" in md and "roofline |" in md
    rows = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert len(rows) >= len(doc["results"]) + 2  # header + cases (+ geometric means)
    assert "geometric mean" in md.lower()
    assert doc["command"] in md
    assert doc["machine"]["cpu"] in md


def test_ceilings_script(quick):
    _, doc, js, _ = quick
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "ceilings.py"), str(js)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    cases = [r for r in doc["results"] if r.get("torch_s") and r.get("copy_s") and r.get("fastbn_s")]
    per_case = [ln for ln in lines if ln.startswith(tuple(r["label"] for r in cases))]
    assert len(per_case) == len(cases)
    for r, ln in zip(cases, per_case):
        # PyTorch's time over the least traffic at copy bandwidth (backward: 3 bytes, copy: 2)
        floor = r["copy_s"] * {"infer": 2, "train": 2, "backward": 3, "stats": 1}[r["op"]] / 2
        assert float(ln.split()[-1].rstrip("x")) == pytest.approx(r["torch_s"] / floor, abs=0.006)
    assert any(ln.startswith("backward") for ln in lines[lines.index("") + 1:])


def test_info_command():
    from fastbn.__main__ import main
    assert main(["info"]) == 0
    assert main(["info", "--bogus"]) == 2


def test_adhoc_shape_runs():
    proc = run_cli("--shapes", "4,8,16,16:1,mlp", "--ops", "infer,stats", "--repeat", "3",
                   "--budget", "0", "--no-progress", "--no-onnx")
    assert proc.returncode == 0, proc.stderr
    assert "4x8x16x16 (4,8,16,16) ax1 f32" in proc.stdout
    assert "mlp (256,1024)" in proc.stdout


def test_one_value_per_channel_leaves_training_out(tmp_path):
    # (1, 64): one value per channel; inference and statistics still run, training is refused by
    # fastbn (as by torch.nn.functional.batch_norm), so it is left out with a note, not an error
    js = tmp_path / "one.json"
    proc = run_cli("--shapes", "1,64:1", "--ops", "train,infer,backward,stats", "--repeat", "3",
                   "--budget", "0", "--no-progress", "--no-onnx", "--json", str(js))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ERROR" not in proc.stdout
    assert "left out 1x64 (1,64) ax1 f32 forward-train: training needs more than one value" in proc.stdout
    assert "left out 1x64 (1,64) ax1 f32 backward" in proc.stdout
    doc = json.loads(js.read_text(encoding="utf-8"))
    assert sorted(r["op"] for r in doc["results"]) == ["infer", "stats"]
    assert sorted(r["op"] for r in doc["left_out"]) == ["backward", "train"]
    assert all(r["fastbn_s"] > 0 for r in doc["results"])


@pytest.mark.parametrize("args, message", [
    (["--shapes", "2,3,4,5,6,7:1"], "need 2 to 5 positive dimensions"),
    (["--seed", "-1"], "--seed must be a non-negative integer"),
    (["--budget", "inf"], "--budget must be between 0 and"),
    (["--shapes", "1000000,1000000:1"], "GiB"),
    (["--json", os.path.dirname(os.path.abspath(__file__))], "is a directory"),
    (["--plot", "chart.xyz"], "cannot write .xyz"),
], ids=["rank-6", "seed", "budget", "too-big", "json-dir", "plot-ext"])
def test_usage_errors_before_running(args, message):
    if args[0] == "--plot" and not HAS_MPL:
        pytest.skip("needs matplotlib")
    proc = run_cli(*args, "--no-progress")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and "shape(s) x" not in proc.stdout  # nothing ran


def test_two_values_per_channel_backward_is_not_flagged(tmp_path):
    # with 2 values per channel dx is 0 but for eps: the check measures errors against the
    # scale of dx's terms, not against max|dx|
    js = tmp_path / "two.json"
    proc = run_cli("--shapes", "2,1:1,2,3:1,2,1,1,1:1", "--ops", "backward", "--repeat", "3",
                   "--budget", "0", "--no-progress", "--no-onnx", "--json", str(js))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(js.read_text(encoding="utf-8"))
    assert all(r["check_ok"] for r in doc["results"])


@pytest.mark.skipif(not HAS_MPL, reason="needs matplotlib")
def test_plot_without_extension_says_where_it_wrote(tmp_path):
    proc = run_cli("--shapes", "2,16:1", "--ops", "infer", "--repeat", "3", "--budget", "0",
                   "--no-progress", "--no-onnx", "--no-torch", "--plot", str(tmp_path / "chart"))
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {tmp_path / 'chart.png'}" in proc.stdout
    assert (tmp_path / "chart.png").is_file()


def test_nonsense_shape_fails_clearly():
    proc = run_cli("--shapes", "nonsense")
    assert proc.returncode == 2
    assert "unknown shape 'nonsense'" in proc.stderr
    assert "8,16,32,32:1" in proc.stderr  # tells the user what would work
    assert "Traceback" not in proc.stderr


def test_bad_options_fail_clearly():
    proc = run_cli("--ops", "train,fly")
    assert proc.returncode == 2 and "unknown op 'fly'" in proc.stderr
    proc = run_cli("--dtype", "float16")
    assert proc.returncode == 2 and "unknown dtype" in proc.stderr


def test_runs_without_pytorch():
    # Hide torch exactly as if it were not installed.
    proc = run_cli("--shapes", "edge_n1_late", "--ops", "train", "--repeat", "3", "--budget", "0",
                   "--no-progress", pre="import sys; sys.modules['torch'] = None")
    assert proc.returncode == 0, proc.stderr
    assert "PyTorch column missing: PyTorch is not installed" in proc.stdout
    assert "n/a" in proc.stdout


# --------------------------------------------------------------------------------------------------
# In-process checks of the pieces (no subprocess, milliseconds)


def test_parse_shapes():
    P = suite.parse_shapes
    assert [s.name for s in P(None)] == [s.name for s in suite.SUITE]
    assert [s.name for s in P(None, quick=True)] == list(suite.QUICK)
    assert [s.name for s in P("resnet_56,mlp")] == ["resnet_56", "mlp"]
    s, = P("8,16,32,32:1")
    assert (s.shape, s.axis, s.dtype) == ((8, 16, 32, 32), 1, "float32")
    a, b, c = P("8,16,32,32:-1:float64,mlp,2,3")
    assert (a.shape, a.axis, a.dtype, a.channels) == ((8, 16, 32, 32), -1, "float64", 32)
    assert b.name == "mlp"
    assert (c.shape, c.axis) == ((2, 3), 1)  # no ':axis' -> channels on axis 1
    assert P("resnet_56:f64")[0].dtype == "float64"
    for bad in ("nonsense", "8,16:7", "0,4:1", "8,x,4:1", "8:1", " , "):
        with pytest.raises(ValueError):
            P(bad)


def test_scaled_keeps_rank_axis_and_channels():
    for spec in suite.SUITE:
        small = suite.scaled(spec, 1 << 14)
        assert small.ndim == spec.ndim and small.axis == spec.axis and small.dtype == spec.dtype
        assert small.size <= max(1 << 14, spec.channels)
        assert small.channels == spec.channels or small.size <= 1 << 14


def test_torch_layout_names():
    assert torch_layout(suite.SUITE_BY_NAME["nhwc"]) == ((0, 3, 1, 2), "channels_last")
    assert torch_layout(suite.SUITE_BY_NAME["resnet_56"])[1] == "contiguous"
    assert torch_layout(suite.ShapeSpec("x", (2, 3, 4, 5, 6), -1))[1] == "channels_last_3d"
    assert torch_layout(suite.ShapeSpec("x", (2, 3, 4), -1)) == ((0, 2, 1), "permuted view")
    assert torch_layout(suite.ShapeSpec("x", (6, 5), 0)) == ((1, 0), "permuted view")


def test_numpy_baseline_matches_float64_reference():
    spec = suite.ShapeSpec("t", (3, 4, 5, 6), -1, "float64")
    inp = make_inputs(spec)
    ops = numpy_ops(spec, inp)
    x = inp["x"]
    red = spec.reduce_axes
    m, v = x.mean(axis=red), x.var(axis=red)
    assert compare(ops["stats"](), (m, v)) < 1e-12
    y, mean, invstd = ops["train"]()
    assert compare((mean, invstd), (m, 1 / (v + 1e-5) ** 0.5)) < 1e-12
    w, b = inp["weight"], inp["bias"]
    assert compare((y.mean(axis=red), y.var(axis=red)), (b, w**2 * v / (v + 1e-5))) < 1e-12
    (yi,) = ops["infer"]()
    rm, rv = inp["running_mean"], inp["running_var"]
    assert compare((yi,), ((x - rm) / (rv + 1e-5) ** 0.5 * w + b,)) < 1e-12
    dy = inp["dy"]
    dx, dw, db = ops["backward"]()
    xhat = (x - m) / (v + 1e-5) ** 0.5
    n = x.size // spec.channels
    dw_ref, db_ref = (dy * xhat).sum(axis=red), dy.sum(axis=red)
    dx_ref = w / (v + 1e-5) ** 0.5 / n * (n * dy - db_ref - xhat * dw_ref)
    assert compare((dx, dw, db), (dx_ref, dw_ref, db_ref)) < 1e-10


def test_roofline_and_speedup_arithmetic():
    spec = suite.SUITE_BY_NAME["resnet_56"]
    c = runner.CaseResult(spec, "backward")
    c.samples = {"fastbn": [2.0, 4.0, 3.0], "torch": [9.0], "copy": [1.0, 1.0, 1.2]}
    assert c.roofline_s == pytest.approx(2.5)  # backward moves 5B: 2.5 copies
    assert c.roofline_fraction == pytest.approx(2.5 / 3.0)
    assert c.speedup("torch") == pytest.approx(3.0)
    assert c.speedup("numpy") is None
    assert runner.geomean([1.0, 4.0, None]) == pytest.approx(2.0)
    assert runner.fmt_time(12.3e-6) == "12.3 us" and runner.fmt_time(0.01234) == "12.34 ms"


def test_simple_progress_bar_without_tqdm():
    import io

    stream = io.StringIO()
    bar = runner._SimpleBar(3, stream=stream)
    for i in range(3):
        bar.set_description(f"case {i}")
        bar.update()
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and lines[-1].startswith("[" + "#" * 28 + "] 3/3")


def test_list_prints_suite(capsys):
    assert runner.main(["--list"]) == 0
    out = capsys.readouterr().out
    for spec in suite.SUITE:
        assert spec.name in out


def test_plot_without_matplotlib_fails_before_running(tmp_path):
    proc = run_cli("--quick", "--plot", str(tmp_path / "x.png"),
                   pre="import sys; sys.modules['matplotlib'] = None")
    assert proc.returncode == 2
    assert "--plot needs matplotlib, which is not installed" in proc.stderr
    assert "forward-train" not in proc.stdout  # refused up front, not after minutes of timing


def test_per_round_ratio_quartiles_tell_ties_from_leads():
    spec = suite.SUITE_BY_NAME["resnet_56"]
    c = runner.CaseResult(spec, "infer")
    fast = [1.0] * 12
    # Sample i of every contender comes from round i: the peer is slower in most rounds,
    # faster in a few, so its median ratio is above 1 and its middle half straddles 1.
    c.samples = {"fastbn": fast, "torch": [0.8, 0.9, 0.95, 1.05, 1.1, 1.2] * 2,
                 "onnxruntime": [2.0 + 0.1 * i for i in range(12)], "numpy": [3.0] * 5}
    q1, q3 = c.ratio_quartiles("torch")
    assert q1 < 1.0 < q3 and c.standing("torch") == "tie"
    assert c.standing("onnxruntime") == "ahead"
    assert c.ratio_quartiles("numpy") is None  # too few rounds to say anything
    c.samples["torch"] = [0.7 + 0.01 * i for i in range(12)]
    assert c.standing("torch") == "behind"
    assert runner.CaseResult(spec, "infer").standing("torch") is None


def test_rounds_vary_who_comes_first_and_who_follows_whom():
    """No contender always follows the same one: a call runs faster after one that left its
    data in cache than after one that evicted it, so a fixed order -- or a rotation of it, whose
    neighbours never change -- would favour a fixed neighbour.  Each timed call is preceded by
    an untimed one of the same contender."""
    log = []
    names = ("a", "b", "c", "d")
    fns = {name: (lambda name=name: log.append(name)) for name in names}
    res = runner.CaseResult(suite.SUITE[0], "infer")
    runner._time_round_robin(fns, budget=1.0, repeat=40, result=res)
    assert {n: len(v) for n, v in res.samples.items()} == {n: 40 for n in names}
    timed = log[2 * len(names):]  # two warm-up calls each first
    assert all(timed[i] == timed[i + 1] for i in range(0, len(timed), 2))  # untimed, then timed
    order = timed[::2]
    rounds = [order[i:i + 4] for i in range(0, len(order), 4)]
    assert all(sorted(r) == list(names) for r in rounds)  # each contender once a round
    within = {(r[i - 1], r[i]) for r in rounds for i in range(1, 4)}
    # every contender follows every other one within some round
    assert within == {(p, q) for p in names for q in names if p != q}
    assert len({r[0] for r in rounds}) == len(names)
