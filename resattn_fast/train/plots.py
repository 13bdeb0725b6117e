"""curves.png: loss and accuracy against epoch (matplotlib, Agg backend, no display)."""

from __future__ import annotations

from typing import Dict, List

from .checkpoint import atomic_write

__all__ = ["plot_curves"]


def plot_curves(history: List[Dict[str, float]], path: str, title: str = "") -> None:
    """Draw train/val loss and accuracy from ``history`` (metrics.csv rows) into ``path``
    (PNG, written atomically)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [int(r["epoch"]) for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    try:
        ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
        ax_loss.plot(epochs, [r["val_loss"] for r in history], "s-", label="val")
        ax_loss.set_xlabel("epoch")
        ax_loss.set_ylabel("cross-entropy loss")
        # Log scale: the first epochs' validation loss (batch-norm statistics not yet
        # settled) can be orders of magnitude above the rest and would flatten the curve.
        ax_loss.set_yscale("log")
        ax_loss.legend()
        ax_loss.grid(alpha=0.3)
        ax_acc.plot(epochs, [r["train_acc"] for r in history], "o-", label="train")
        ax_acc.plot(epochs, [r["val_acc"] for r in history], "s-", label="val")
        ax_acc.set_xlabel("epoch")
        ax_acc.set_ylabel("top-1 accuracy")
        ax_acc.set_ylim(0, 1)
        ax_acc.legend()
        ax_acc.grid(alpha=0.3)
        for ax in (ax_loss, ax_acc):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
