"""Accuracy curves of one or several ``evaluate`` runs, overlaid in one PNG."""
from __future__ import annotations

from pathlib import Path


def plot_curves(results: list[dict], path, *, title: str | None = None) -> Path:
    """Plot clean test accuracy per epoch (solid) and training accuracy (dotted) of each run.

    results: documents from ``ue_fast.evaluate`` (or ``load_results``). path: the PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    if not results:
        raise ValueError("plot_curves needs at least one results document")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for i, r in enumerate(results):
        color = f"C{i % 10}"
        epochs = range(1, len(r["test_acc"]) + 1)
        name = r.get("label") or f"run {i + 1}"
        ax.plot(epochs, [100 * a for a in r["test_acc"]], color=color,
                label=f"{name}: test best {100 * r['best']:.1f}%, last {100 * r['last']:.1f}%")
        ax.plot(epochs, [100 * a for a in r["train_acc"]], color=color, linestyle=":", alpha=0.7)
    chance = 100 / len(results[0]["classes"])
    ax.axhline(chance, color="grey", linewidth=0.8, linestyle="--", label=f"chance ({chance:.0f}%)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)  — solid: clean test, dotted: train")
    ax.set_ylim(0, 100)
    s = results[0]["settings"]
    ax.set_title(title or f"victim {s['arch']}, {s['epochs']} epochs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")  # hidden, renamed when complete
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path
