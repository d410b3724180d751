"""``python -m fastbn demo``: the NumPy MLP against PyTorch, and the command end to end.

Training steps are compared with the same network in PyTorch (``torch.nn.Linear``, ``ReLU`` /
``Sigmoid``, ``BatchNorm1d``, ``cross_entropy``, ``torch.optim.Adam`` with the same ``eps``),
started from the same weights, on the same batches.  Errors are measured per tensor as
``max|demo - ref| / max|ref|``, the gradients against their own magnitude (not against 1).

Tolerance basis.
* float64 (``test_float64_steps_match_torch``): the NumPy MLP built in float64 (fastbn's float64
  kernels) against float64 PyTorch, each with its own gradients and its own optimiser, to 1e-10:
  only rounding separates two implementations of the same formulas.
* float32, the demo's dtype (``test_float32_steps_match_torch``): the float32 demo against a float64
  PyTorch reference, to 1e-5.  The difference is the float32 rounding of the demo's path, about 6e-8
  per operation, grown by sums of up to 128 terms, and amplified by batch norm's ``1 / sqrt(var +
  eps)`` (up to ``1 / sqrt(eps)`` ~ 316) in channels that are nearly constant over the batch, such
  as a ReLU unit active for one sample.  That amplification is the problem's conditioning, not the
  implementation's: the same network in float32 PyTorch misses the float64 reference by the same
  amount (measured over 30 seeds: worst 8.0e-6 for PyTorch float32, 8.2e-6 for the demo).  So the
  bound is 1e-5, or twice float32 PyTorch's own error on the same tensor where that is larger.
  PyTorch's Adam is given the demo's gradients (themselves checked first): Adam's first step is
  ``lr * g / (|g| + eps)``, which turns float32 noise of 1e-9 in a gradient that is exactly zero in
  exact arithmetic (the bias of a ReLU unit active on the whole batch just before BN, whose
  constant shift BN removes) into a step of ``lr / 3``.  Any float32 implementation, PyTorch's too,
  takes such steps; the float64 test compares the optimiser end to end instead.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fastbn.demo import model as M

RTOL32 = 1e-5
RTOL64 = 1e-10
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _digits_like_batch(rng, n=32, features=64, classes=10):
    """A batch shaped like the demo's (pixels in [0, 1] in steps of 1/16, a few always-zero
    columns as in the 8x8 digits), without needing scikit-learn."""
    x = rng.integers(0, 17, size=(n, features)) / 16.0
    x[:, [0, 7, 32]] = 0.0
    y = rng.integers(0, classes, size=n)
    y[:classes] = np.arange(classes)
    return x.astype(np.float32), y.astype(np.int64)


def _torch_twin(torch, net, dtype):
    """The same network in PyTorch (``dtype``) with the NumPy network's current parameters and
    BN state.  Returns ``(module, pairs)``: ``pairs`` lists ``(numpy_array, torch_parameter,
    transposed)`` in the order of ``net.parameters()``."""
    nn = torch.nn
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    mods, pairs = [], []
    for layer in net.layers:
        if isinstance(layer, M.Dense):
            lin = nn.Linear(*layer.W.shape, bias=layer.b is not None, dtype=dtype)
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(layer.W.T.astype(np_dtype)))
                pairs.append((layer.W, lin.weight, True))
                if layer.b is not None:
                    lin.bias.copy_(torch.from_numpy(layer.b.astype(np_dtype)))
                    pairs.append((layer.b, lin.bias, False))
            mods.append(lin)
        elif isinstance(layer, M.ReLU):
            mods.append(nn.ReLU())
        elif isinstance(layer, M.Sigmoid):
            mods.append(nn.Sigmoid())
        elif isinstance(layer, M.BatchNorm):
            b = layer.layer
            bn = nn.BatchNorm1d(b.num_features, eps=b.eps, momentum=b.momentum, dtype=dtype)
            bn.load_state_dict({k: torch.from_numpy(np.asarray(v).astype(
                np.int64 if k == "num_batches_tracked" else np_dtype))
                for k, v in b.state_dict().items()})
            pairs.append((b.weight, bn.weight, False))
            pairs.append((b.bias, bn.bias, False))
            mods.append(bn)
        else:  # pragma: no cover
            raise TypeError(layer)
    return nn.Sequential(*mods), pairs


def _err(actual, ref, floor=1e-30):
    """max|actual - ref| / max(max|ref|, floor) in float64."""
    a = np.asarray(actual, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    scale = max(float(np.max(np.abs(r))), floor)
    return float(np.max(np.abs(a - r))) / scale


def _np(t, transposed=False):
    a = t.detach().double().numpy()
    return a.T if transposed else a


class _Checker:
    def __init__(self, rtol):
        self.rtol = rtol
        self.errors = {}

    def __call__(self, what, actual, ref, yardstick=None, floor=1e-30):
        """``yardstick``: the same tensor from float32 PyTorch; the bound widens to twice its
        error where the problem's conditioning makes float32 itself miss ``rtol``.  ``floor``:
        least scale the error is measured against."""
        e = _err(actual, ref, floor)
        bound = self.rtol
        if yardstick is not None:
            bound = max(bound, 2 * _err(yardstick, ref))
        self.errors[what] = e
        assert e <= bound, f"{what}: max|numpy - torch| / max|torch| = {e:.3g} > {bound:.3g}"

    def report(self, name):
        worst = max(self.errors, key=self.errors.get)
        print(f"{name}: worst relative error {self.errors[worst]:.2g} ({worst})")


NETWORKS = {
    "mlp-bn": lambda rng, dt: M.shallow_mlp(rng, use_bn=True, dtype=dt),
    "mlp-plain": lambda rng, dt: M.shallow_mlp(rng, use_bn=False, dtype=dt),
    "deep-bn": lambda rng, dt: M.deep_mlp(rng, use_bn=True, dtype=dt),
    "deep-plain": lambda rng, dt: M.deep_mlp(rng, use_bn=False, dtype=dt),
}
OPTIMISERS = [(1e-3, 1e-8), (3e-2, 1e-7)]


def _forward_backward(torch, module, x, y, zero_grad=True):
    if zero_grad:
        module.zero_grad()
    dtype = next(module.parameters()).dtype
    logits = module(torch.from_numpy(x).to(dtype))
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y))
    loss.backward()
    return logits, loss


@pytest.mark.parametrize("name", list(NETWORKS))
@pytest.mark.parametrize("lr, eps", OPTIMISERS)
def test_float32_steps_match_torch(name, lr, eps):
    """The demo's dtype: forward, loss, every parameter's gradient, the Adam update and BN's running
    statistics of three training steps (Adam's bias correction changes with the step), then an
    evaluation-mode forward, against float64 PyTorch (basis: module docstring)."""
    torch = pytest.importorskip("torch", reason="the comparison needs PyTorch")
    rng = np.random.default_rng(1234)
    net = NETWORKS[name](np.random.default_rng([0, 1]), np.float32)
    ref, pairs = _torch_twin(torch, net, torch.float64)
    opt = M.Adam(net.parameters(), lr=lr, eps=eps)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=lr, betas=(0.9, 0.999), eps=eps)
    assert len(pairs) == len(net.parameters()) == len(list(ref.parameters()))
    check = _Checker(RTOL32)
    for step in range(3):
        x, y = _digits_like_batch(rng)
        # float32 PyTorch from the demo's current parameters: the yardstick of float32 rounding
        yard, yard_pairs = _torch_twin(torch, net, torch.float32)
        net.train()
        logits = net.forward(x)
        loss, dlogits, _ = M.softmax_cross_entropy(logits, y)
        assert logits.dtype == np.float32 and dlogits.dtype == np.float32
        net.backward(dlogits)
        grads = net.gradients()
        ref.train()
        ref_logits, ref_loss = _forward_backward(torch, ref, x, y)
        yard_logits, yard_loss = _forward_backward(torch, yard, x, y)

        check(f"step {step} logits", logits, _np(ref_logits), _np(yard_logits))
        check(f"step {step} loss", loss, ref_loss.item(), yard_loss.item())
        triples = zip(pairs, yard_pairs, grads, strict=True)
        for i, ((p, tp, tr), (_, yp, _), g) in enumerate(triples):
            assert g.dtype == np.float32
            check(f"step {step} grad {i} {p.shape}", g, _np(tp.grad, tr), _np(yp.grad, tr))

        for (_, tp, tr), g in zip(pairs, grads, strict=True):
            g64 = g.astype(np.float64)
            tp.grad = torch.from_numpy(np.ascontiguousarray(g64.T if tr else g64))
        opt.step(grads)
        ref_opt.step()
        for i, (p, tp, tr) in enumerate(pairs):
            assert p.dtype == np.float32
            check(f"step {step} param {i} after Adam", p, _np(tp, tr))
        ref_bns = [m for m in ref if isinstance(m, torch.nn.BatchNorm1d)]
        for bn, tbn in zip(net.bn_layers, ref_bns, strict=True):
            check(f"step {step} running_mean", bn.layer.running_mean, _np(tbn.running_mean))
            check(f"step {step} running_var", bn.layer.running_var, _np(tbn.running_var))

    x, y = _digits_like_batch(rng, n=50)
    yard, _ = _torch_twin(torch, net, torch.float32)
    net.eval()
    ref.eval()
    yard.eval()
    with torch.no_grad():
        ref_logits = ref(torch.from_numpy(x.astype(np.float64)))
        yard_logits = yard(torch.from_numpy(x))
    check("eval logits", net.forward(x), _np(ref_logits), _np(yard_logits))
    check.report(f"float32 {name} lr={lr:g}")


@pytest.mark.parametrize("name", list(NETWORKS))
@pytest.mark.parametrize("lr, eps", OPTIMISERS)
def test_float64_steps_match_torch(name, lr, eps):
    """The same network in float64 on both sides, each with its own gradients and its own Adam,
    three steps and an evaluation-mode forward, to 1e-10: the formulas are PyTorch's."""
    torch = pytest.importorskip("torch", reason="the comparison needs PyTorch")
    rng = np.random.default_rng(4321)
    net = NETWORKS[name](np.random.default_rng([0, 1]), np.float64)
    ref, pairs = _torch_twin(torch, net, torch.float64)
    opt = M.Adam(net.parameters(), lr=lr, eps=eps)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=lr, betas=(0.9, 0.999), eps=eps)
    check = _Checker(RTOL64)
    for step in range(3):
        x, y = _digits_like_batch(rng)
        net.train()
        ref.train()
        logits = net.forward(x.astype(np.float64))
        loss, dlogits, _ = M.softmax_cross_entropy(logits, y)
        net.backward(dlogits)
        grads = net.gradients()
        ref_logits, ref_loss = _forward_backward(torch, ref, x, y)
        check(f"step {step} logits", logits, _np(ref_logits))
        check(f"step {step} loss", loss, ref_loss.item())
        for i, ((p, tp, tr), g) in enumerate(zip(pairs, grads, strict=True)):
            assert g.dtype == np.float64
            check(f"step {step} grad {i} {p.shape}", g, _np(tp.grad, tr))
        opt.step(grads)
        ref_opt.step()
        for i, (p, tp, tr) in enumerate(pairs):
            # Against max(1, max|p|): a zero-initialised bias is ~lr after one step, and Adam
            # moves a parameter by lr * g / (|g| + eps), turning 1e-17 of rounding in a
            # gradient that is exactly zero in exact arithmetic into lr * 1e-9.
            check(f"step {step} param {i} after Adam", p, _np(tp, tr), floor=1.0)
        ref_bns = [m for m in ref if isinstance(m, torch.nn.BatchNorm1d)]
        for bn, tbn in zip(net.bn_layers, ref_bns, strict=True):
            check(f"step {step} running_mean", bn.layer.running_mean, _np(tbn.running_mean))
            check(f"step {step} running_var", bn.layer.running_var, _np(tbn.running_var))
    x, y = _digits_like_batch(rng, n=50)
    net.eval()
    ref.eval()
    with torch.no_grad():
        ref_logits = ref(torch.from_numpy(x.astype(np.float64)))
    check("eval logits", net.forward(x.astype(np.float64)), _np(ref_logits))
    check.report(f"float64 {name} lr={lr:g}")


def test_adam_matches_torch_float64():
    """The optimiser on its own, in float64 (no float32 rounding to hide behind): 20 steps of
    random gradients, including exact zeros, agree with torch.optim.Adam to 1e-12."""
    torch = pytest.importorskip("torch", reason="the comparison needs PyTorch")
    rng = np.random.default_rng(7)
    p = rng.standard_normal((5, 6))
    tp = torch.nn.Parameter(torch.from_numpy(p.copy()))
    opt = M.Adam([p], lr=1e-2, eps=1e-7)
    topt = torch.optim.Adam([tp], lr=1e-2, betas=(0.9, 0.999), eps=1e-7)
    for _ in range(20):
        g = rng.standard_normal(p.shape) * rng.choice([0.0, 1e-6, 1.0], size=p.shape)
        opt.step([g])
        tp.grad = torch.from_numpy(g.copy())
        topt.step()
        np.testing.assert_allclose(p, tp.detach().numpy(), rtol=0, atol=1e-12)


def test_softmax_cross_entropy_large_logits():
    """The loss is computed from log-softmax: no overflow, and the gradient rows sum to zero."""
    logits = np.array([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0]], np.float32)
    loss, d, probs = M.softmax_cross_entropy(logits, np.array([0, 2]))
    assert np.isfinite(loss) and abs(loss - np.log(3) / 2) < 1e-6
    np.testing.assert_allclose(d.sum(axis=1), 0, atol=1e-7)
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-6)


def test_glorot_uniform_limits_and_seeding():
    w = M.glorot_uniform(np.random.default_rng(0), 64, 128)
    assert w.dtype == np.float32 and w.shape == (64, 128)
    limit = np.sqrt(6 / (64 + 128))
    assert np.abs(w).max() <= limit and np.abs(w).max() > 0.95 * limit
    a = M.shallow_mlp(np.random.default_rng([3, 1]), use_bn=False)
    b = M.shallow_mlp(np.random.default_rng([3, 1]), use_bn=True)
    # with and without BN start from the same weights, zero biases
    bn = b.bn_layers[0].layer
    dense_b = [q for q in b.parameters() if q is not bn.weight and q is not bn.bias]
    assert len(dense_b) == len(a.parameters()) == 4
    for pa, pb in zip(a.parameters(), dense_b, strict=True):
        np.testing.assert_array_equal(pa, pb)
    assert not a.layers[0].b.any()


# ------------------------------------------------------------------------------------ the command


def _need_demo_extra():
    """Skip unless scikit-learn and matplotlib import (any ImportError, not only a missing
    module: pytest.importorskip re-raises other import errors in recent pytest)."""
    for module, name in (("sklearn.datasets", "scikit-learn"), ("matplotlib", "matplotlib")):
        try:
            __import__(module)
        except ImportError as exc:
            pytest.skip(f"the demo needs {name} ({exc}): pip install 'fastbn[demo]'")


def test_demo_quick_end_to_end(tmp_path, capsys):
    _need_demo_extra()
    from fastbn.demo import main

    out = tmp_path / "out"
    assert main(["--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "curves.json" in printed and "loss_curves.png" in printed

    for png in ("loss_curves.png", "deep_loss_curves.png"):
        with open(out / png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", png
    with open(out / "curves.json") as f:
        doc = json.load(f)
    assert {"with_bn", "without_bn", "settings", "deep"} <= set(doc)
    assert {"with_bn", "without_bn", "settings"} <= set(doc["deep"])
    for runs in (doc, doc["deep"]):
        s = runs["settings"]
        assert s["epochs"] == 2 and s["batch_size"] == 32 and s["optimizer"]["name"] == "Adam"
        for key in ("with_bn", "without_bn"):
            h = runs[key]
            for k in ("loss", "val_loss", "val_accuracy"):
                assert len(h[k]) == 2, (key, k)
                assert all(v is not None and np.isfinite(v) for v in h[k]), (key, k, h[k])
            assert all(0 <= a <= 1 for a in h["val_accuracy"])
    st = doc["settings"]
    assert st["optimizer"]["lr"] == 1e-3 and st["optimizer"]["eps"] == 1e-8
    assert st["optimizer"]["betas"] == [0.9, 0.999]
    assert st["data"]["samples"] == 1797
    assert st["data"]["train_samples"] + st["data"]["val_samples"] == 1797
    assert st["data"]["val_samples"] == 360
    # learning happened: the article's network is far better than chance after 2 epochs
    assert doc["with_bn"]["val_accuracy"][-1] > 0.5
    assert doc["without_bn"]["val_accuracy"][-1] > 0.5


def test_demo_is_seeded(tmp_path):
    _need_demo_extra()
    from fastbn.demo import main

    docs = []
    for name in ("a", "b"):
        assert main(["--epochs", "1", "--no-deep", "--out", str(tmp_path / name),
                     "--no-progress"]) == 0
        with open(tmp_path / name / "curves.json") as f:
            docs.append(json.load(f))
    for key in ("with_bn", "without_bn"):
        for k in ("loss", "val_loss", "val_accuracy"):
            assert docs[0][key][k] == docs[1][key][k]
    assert "deep" not in docs[0]


def test_missing_optional_dependency_names_the_extra(tmp_path, monkeypatch, capsys):
    """Without scikit-learn the demo stops before training with a message naming the extra."""
    from fastbn.demo import main

    for mod in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn` raise ImportError
    assert main(["--quick", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "fastbn[demo]" in err and "scikit-learn" in err
    assert not (tmp_path / "x").exists()


def test_progress_falls_back_without_tqdm(monkeypatch, capsys):
    from fastbn.demo import train

    monkeypatch.setitem(sys.modules, "tqdm", None)
    bar = train.progress(3, "demo")
    assert isinstance(bar, train._LineProgress)
    bar.set_postfix_str("loss 1.0")
    bar.update(1)
    bar.close()
    err = capsys.readouterr().err
    assert "epoch 1/3" in err and "loss 1.0" in err


def test_bad_arguments():
    from fastbn.demo import main

    assert main(["--epochs", "0", "--no-progress"]) == 2
    assert main(["--no-such-option"]) == 2
    assert main(["--help"]) == 0


def test_command_line_help():
    r = subprocess.run([sys.executable, "-m", "fastbn", "demo", "--help"], cwd=REPO,
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": REPO + os.pathsep
                            + os.environ.get("PYTHONPATH", "")})
    assert r.returncode == 0, r.stderr
    assert "--quick" in r.stdout and "fastbn[demo]" in r.stdout
