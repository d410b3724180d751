"""PNG chart of a bench run: speedup vs PyTorch (and NumPy) and roofline fraction per case.

Used by ``python -m fastbn bench --plot PATH``; ``python -m fastbn.bench.plot RUN.json OUT.png``
redraws a saved ``--json`` document. Needs matplotlib (optional: the ``bench`` extra).
"""

from __future__ import annotations

import json
import sys

from .suite import OP_TITLES

_ROOF_CLIP = 2.0


def _ratio(v: float) -> str:
    return f"{v:.2f}" if v < 10 else f"{v:.0f}"


_OP_COLORS = {"train": "#1f77b4", "infer": "#2ca02c", "backward": "#d62728", "stats": "#9467bd"}


def _require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError(
            "plotting needs matplotlib, which is not installed: pip install matplotlib "
            "(or pip install 'fastbn[bench]')") from None
    matplotlib.use("Agg", force=True)  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_results(doc: dict, path: str) -> None:
    """Draw the ``--json`` document ``doc`` into the PNG file ``path``."""
    plt = _require_matplotlib()
    rows = [r for r in doc["results"] if r.get("fastbn_s")]
    if not rows:
        raise RuntimeError("nothing to plot: no case has a fastbn time")
    labels = [f"{r['shape']['name']} · {OP_TITLES[r['op']]}" for r in rows]
    colors = [_OP_COLORS.get(r["op"], "gray") for r in rows]
    y = list(range(len(rows)))[::-1]
    has_torch = any(r.get("speedup_vs_torch") for r in rows)
    height = max(3.0, 0.24 * len(rows) + 1.6)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, height), sharey=True,
                                   gridspec_kw={"wspace": 0.05})

    key = "speedup_vs_torch" if has_torch else "speedup_vs_numpy"
    peer = "PyTorch" if has_torch else "NumPy (PyTorch not installed)"
    sp = [r.get(key) or 0.0 for r in rows]
    ax1.barh(y, sp, color=colors, height=0.7)
    if has_torch:  # NumPy as a marker on the same axis, for scale
        npy = [(yy, r["speedup_vs_numpy"]) for yy, r in zip(y, rows, strict=True)
               if r.get("speedup_vs_numpy")]
        if npy:
            ax1.scatter([v for _, v in npy], [yy for yy, _ in npy], marker="|", color="black",
                        s=60, zorder=3, label="vs NumPy")
            ax1.legend(loc="lower right", fontsize=8)
    positive = [v for v in sp if v > 0]
    if positive and max(positive) / min(positive) > 20:
        ax1.set_xscale("log")
    ax1.axvline(1.0, color="black", lw=0.8)
    ax1.set_xlabel(f"speedup vs {peer} (x, higher is better)")
    ax1.set_yticks(y)
    ax1.set_yticklabels(labels, fontsize=8)
    for yy, v in zip(y, sp, strict=True):
        if v:
            ax1.annotate(_ratio(v) + "x", (v, yy), xytext=(2, 0), textcoords="offset points",
                         va="center", fontsize=7)

    rf = [r.get("roofline_fraction") or 0.0 for r in rows]
    # Cache-resident tensors can beat the copy by orders of magnitude; clip those bars so the
    # memory-bound cases stay readable, and print the true value.
    top = min(max(1.1, max(rf) * 1.1), _ROOF_CLIP)
    ax2.barh(y, [min(v, top) for v in rf], color=colors, height=0.7)
    ax2.axvline(1.0, color="black", lw=0.8, ls="--")
    ax2.set_xlabel("fraction of the copy roofline (1.0 = memory-bound limit)")
    ax2.set_xlim(0, top * 1.12)
    for yy, v in zip(y, rf, strict=True):
        if v:
            ax2.annotate(_ratio(v) + (" (clipped)" if v > top else ""), (min(v, top), yy),
                         xytext=(2, 0), textcoords="offset points", va="center", fontsize=7)

    m = doc.get("machine", {})
    cfg = doc.get("config", {})
    title = (f"fastbn {m.get('fastbn', '?')} · {m.get('cpu', '?')} · {cfg.get('threads', '?')} "
             f"threads · torch {m.get('torch', 'n/a')} · numba {m.get('numba', '?')}")
    others = (m.get("load") or {}).get("others_cpu_fraction")
    if others is not None and others > 0.10:
        title += f"\nwarning: other processes used {others:.0%} of the CPUs during this run"
    fig.suptitle(title, fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _OP_COLORS.values()]
    fig.legend(handles, [OP_TITLES[o] for o in _OP_COLORS], loc="lower center", ncol=4,
               fontsize=8, frameon=False)
    fig.subplots_adjust(left=0.2, right=0.97, top=1 - 0.5 / height, bottom=0.9 / height)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m fastbn.bench.plot RUN.json OUT.png", file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as fh:
        doc = json.load(fh)
    try:
        plot_results(doc, argv[1])
    except RuntimeError as exc:
        print(f"fastbn bench plot: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
