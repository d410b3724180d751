"""The asv suite runs (quick mode, existing environment) and its dashboard renders in Chromium.

This is what keeps ``benchmarks/`` from rotting: CI runs every asv benchmark once
(``asv run --quick`` with ``FASTBN_ASV_QUICK=1``, which shrinks the parameter grid to one small
shape), then ``asv publish``, then loads the page in headless Chromium through a localhost HTTP
server (asv pages fetch JSON, so ``file://`` does not work) and checks that every benchmark is
listed in the rendered DOM.

asv's page loads jQuery/Flot/Bootstrap from CDNs; without internet the page is an error message,
so the published copy is pointed at the same releases from the npm registry first
(``fastbn.bench.asv_html``).

Skips (with the reason) when asv, git, Chromium or the dashboard's JavaScript is unavailable.
Runs in a temporary directory: nothing is written under the checkout.
"""

import functools
import http.server
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MACHINE = "fastbn-ci"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("asv") is None,
    reason="asv not installed: pip install 'fastbn[bench]' to run the asv suite check")


def _git(*args):
    return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def _asv(args, cfg, env, timeout):
    return subprocess.run([sys.executable, "-m", "asv", *args, "--config", str(cfg)],
                          cwd=os.path.dirname(cfg), env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def asv_run(tmp_path_factory):
    """Run the whole asv suite once in quick mode; returns (config path, env, stdout)."""
    if shutil.which("git") is None:
        pytest.skip("git not installed: asv needs it to read the repository")
    try:
        head = _git("rev-parse", "HEAD")
        branch = _git("rev-parse", "--abbrev-ref", "HEAD")
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"{REPO} is not a git checkout with a commit: {exc.stderr.strip()}")
    from asv.util import load_json

    tmp = tmp_path_factory.mktemp("asv")
    conf = load_json(os.path.join(REPO, "asv.conf.json"), js_comments=True)
    conf.update(
        repo=REPO,
        branches=[branch],  # 'HEAD' when detached: asv passes it to git rev-list as is
        benchmark_dir=os.path.join(REPO, "benchmarks"),
        env_dir=str(tmp / "env"),
        results_dir=str(tmp / "results"),
        html_dir=str(tmp / "html"),
    )
    cfg = tmp / "asv.conf.json"
    cfg.write_text(json.dumps(conf, indent=1))

    env = dict(os.environ)
    env.update(
        HOME=str(tmp / "home"),              # asv keeps its machine file in ~/.asv-machine.json
        ASV_PYTHONPATH=REPO,                 # the checkout's fastbn, installed or not
        FASTBN_ASV_QUICK="1",
    )
    env.pop("PYTHONPATH", None)
    os.makedirs(env["HOME"])
    proc = _asv(["machine", "--yes", "--machine", MACHINE], cfg, env, 120)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    proc = _asv(["run", "--quick", "-E", f"existing:{sys.executable}", "--set-commit-hash", head,
                 "--machine", MACHINE, "--show-stderr"], cfg, env, 900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert " failed" not in out, out
    return cfg, env, out, tmp


def test_asv_suite_runs_once_in_quick_mode(asv_run):
    cfg, env, out, tmp = asv_run
    with open(tmp / "results" / "benchmarks.json") as fh:
        benchmarks = {k: v for k, v in json.load(fh).items() if k != "version"}
    have_torch = importlib.util.find_spec("torch") is not None
    expected = {f"bench_batchnorm.Time{op}.time_{c}"
                for op in ("Infer", "Train", "Backward", "Stats")
                for c in ("fastbn", "torch", "numpy")}
    expected |= {f"bench_batchnorm.Time{op}.peakmem_{c}" for op in ("Train", "Backward")
                 for c in ("fastbn", "torch", "numpy")}
    expected |= {"bench_coldstart.ColdStart.timeraw_first_call_no_cache",
                 "bench_coldstart.ColdStart.timeraw_first_call_warm_cache",
                 "bench_coldstart.timeraw_import_fastbn"}
    assert expected <= set(benchmarks), sorted(expected - set(benchmarks))

    result_files = [p for p in (tmp / "results" / MACHINE).glob("*.json")
                    if p.name != "machine.json"]
    assert len(result_files) == 1
    results = json.loads(result_files[0].read_text())["results"]
    for name in expected:
        if "torch" in name and not have_torch:
            continue  # asv records a skip (setup raised NotImplementedError)
        value = results[name][0]
        flat = value if isinstance(value, list) else [value]
        assert flat and all(v is not None and v == v for v in flat), (name, value)


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_dashboard_renders_benchmark_list(asv_run):
    cfg, env, _, tmp = asv_run
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium not installed: apt-get install chromium (Debian) to render the "
                    "asv dashboard")
    proc = _asv(["publish"], cfg, env, 300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    html = tmp / "html"
    assert (html / "index.html").is_file()

    from fastbn.bench.asv_html import AssetError, make_offline

    try:
        make_offline(str(html), log=lambda msg: None)
    except AssetError as exc:
        pytest.skip(f"the dashboard's JavaScript is not available offline: {exc}")

    handler = functools.partial(_Quiet, directory=str(html))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/index.html"
        profile = tmp / "chromium-profile"
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=15000",
               "--dump-dom", url]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    finally:
        server.shutdown()
        server.server_close()
    dom = proc.stdout
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Can not determine continental origin of swallow" not in dom, \
        "asv's JavaScript failed to load"
    with open(tmp / "results" / "benchmarks.json") as fh:
        names = [k for k in json.load(fh) if k != "version"]
    missing = [n for n in names if n not in dom]
    assert not missing, f"benchmarks missing from the rendered dashboard: {missing}"
