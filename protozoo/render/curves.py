"""Training curves: every numeric logged series, one panel per kind (losses, accuracies)."""
from __future__ import annotations

from pathlib import Path


def plot_curves(records: list[dict], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..fileio import atomic_path

    epochs = [r for r in records if any(k.startswith("train/") for k in r)]
    if not epochs:
        return
    keys = sorted({k for r in epochs for k, v in r.items()
                   if isinstance(v, (int, float)) and "/" in k})
    acc_keys = [k for k in keys if k.endswith("accuracy")]
    loss_keys = [k for k in keys if k not in acc_keys]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, group, title in ((axes[0], loss_keys, "loss terms"), (axes[1], acc_keys, "accuracy")):
        for key in group:
            xs = [r["epoch"] for r in epochs if key in r]
            ax.plot(xs, [r[key] for r in epochs if key in r], marker=".", label=key)
        for r in records:  # mark actions such as push
            if not any(k.startswith("train/") for k in r):
                ax.axvline(r["epoch"], color="grey", linestyle=":", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if group:
            ax.legend(fontsize=7)
    if loss_keys and all(r.get(k, 1) > 0 for r in epochs for k in loss_keys if k in r):
        axes[0].set_yscale("log")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
