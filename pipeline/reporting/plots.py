"""The report's figures, drawn with matplotlib's object API (no pyplot, no
global state, no display: PNGs render with Agg). Each ``plot_*`` returns the
Figure and, given a path, also writes it as a PNG; in a notebook
``display(fig)`` shows it."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.reporting.oof import FinalOOF, confusion_matrix
from pipeline.workdir import atomic_write_bytes


def new_figure(figsize):
    from matplotlib.figure import Figure
    return Figure(figsize=figsize)


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def save_png(fig, path: Path | None) -> None:
    """Write ``fig`` to ``path`` as a PNG (atomically); nothing when path is None."""
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, png_bytes(fig))


def plot_per_class(table: pd.DataFrame, path: Path | None = None, title: str = "Per-class MAP@3"):
    """Horizontal bars of per-class MAP@3 (all rows; verified rows as dots)."""
    t = table.sort_values("map3", kind="stable")
    fig = new_figure((7, max(2.5, 0.28 * len(t) + 1)))
    ax = fig.subplots()
    pos = np.arange(len(t))
    ax.barh(pos, t["map3"].fillna(0), color="tab:blue", label="all rows")
    if "map3_verified" in t:
        ax.plot(t["map3_verified"], pos, "o", color="tab:orange", ms=4, label="verified rows")
    ax.set_yticks(pos, [f"{c} ({n})" for c, n in zip(t["class"], t["clips"])], fontsize=8)
    ax.set_xlim(0, 1.05)
    ax.set_xlabel("MAP@3")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    save_png(fig, path)
    return fig


def plot_confusion(final: FinalOOF, path: Path | None = None, title: str | None = None):
    """Row-normalised confusion matrix of top-1 vs given label (counts written when small)."""
    cm = confusion_matrix(final)
    counts = cm.to_numpy()
    rows = counts.sum(axis=1, keepdims=True)
    norm = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=float), where=rows > 0)
    k = len(final.classes)
    size = max(4.0, 0.32 * k + 2)
    fig = new_figure((size + 1, size))
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), final.classes, rotation=90, fontsize=7)
    ax.set_yticks(range(k), final.classes, fontsize=7)
    ax.set_xlabel("top-1 predicted")
    ax.set_ylabel("given label")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
    n_unver = int((~final.verified).sum())
    ax.set_title(title or f"{final.name}: OOF top-1 vs given label\n"
                 f"({len(final.y)} clips, {n_unver} not verified)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the given label's clips")
    save_png(fig, path)
    return fig


def plot_training(model: str, history: pd.DataFrame, path: Path | None = None):
    """Validation MAP@3 per epoch, one line per fold."""
    from matplotlib.ticker import MaxNLocator
    fig = new_figure((6, 3.5))
    ax = fig.subplots()
    for fold, h in history.groupby("fold"):
        h = h.sort_values("epoch")
        ax.plot(h["epoch"], h["val_map3"], marker="o", ms=3, label=f"fold {fold}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation MAP@3")
    ax.set_title(f"{model}: validation MAP@3 per epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save_png(fig, path)
    return fig
