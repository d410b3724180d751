"""Loss-curve figures of the demo (matplotlib, Agg backend: files only, no display needed)."""

from __future__ import annotations

from .train import require

_COLORS = {"without_bn": "tab:blue", "with_bn": "tab:red"}
_NAMES = {"without_bn": "No BN", "with_bn": "With BN"}


def _pyplot():
    matplotlib = require("matplotlib", "matplotlib to draw the loss curves")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _nan(values):
    return [float("nan") if v is None else v for v in values]


def plot_losses(runs: dict, path: str, title: str, subtitle: str = "", log_y: bool = False):
    """Training (dashed) and validation (solid) loss per epoch of ``runs['without_bn']`` and
    ``runs['with_bn']`` into the PNG file ``path``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for key in ("without_bn", "with_bn"):
        hist = runs[key]
        epochs = list(range(1, len(hist["loss"]) + 1))
        ax.plot(epochs, _nan(hist["loss"]), linestyle="--", marker="o", markersize=3,
                color=_COLORS[key], label=f"{_NAMES[key]} - Training Loss")
        ax.plot(epochs, _nan(hist["val_loss"]), linestyle="-", marker="o", markersize=3,
                color=_COLORS[key], label=f"{_NAMES[key]} - Validation Loss")
    ax.set_xlabel("Epoch")
    ax.set_ylabel("Loss (sparse categorical cross-entropy)")
    if log_y:
        ax.set_yscale("log")
    n_epochs = max(len(runs[k]["loss"]) for k in ("without_bn", "with_bn"))
    ax.set_xticks(list(range(1, n_epochs + 1)))
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
