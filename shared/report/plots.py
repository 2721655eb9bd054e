"""PNG plots of the report: AUROC per round per site, the cross-site heatmap, ROC curves.
Every title says "synthetic data" when the numbers come from synthetic data."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_rounds(series: Mapping[str, Mapping[str, list[tuple[int, float]]]], path: Path, tag: str) -> Path:
    """``series[method][site] = [(round, auroc), ...]``: one panel per method, one line per site."""
    methods = list(series)
    fig, axes = plt.subplots(1, len(methods), figsize=(4.5 * len(methods), 3.6), squeeze=False)
    for ax, method in zip(axes[0], methods):
        for site, points in series[method].items():
            points = sorted(points)
            style = "--" if site in ("pooled", "mean-of-sites") else "-"
            ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", ms=3, label=site)
        ax.set_title(method, fontsize=10)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("macro AUROC")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Macro AUROC per round per site, validation split{tag}")
    return _save(fig, path)


def plot_heatmap(matrix: np.ndarray, sites: Sequence[str], path: Path, tag: str,
                 title: str = "Cross-site macro AUROC") -> Path:
    fig, ax = plt.subplots(figsize=(1.2 * len(sites) + 2, 1.0 * len(sites) + 1.5))
    low = float(np.nanmin(matrix)) if not np.all(np.isnan(matrix)) else 0.5
    im = ax.imshow(matrix, vmin=min(0.5, low), vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(sites)), sites)
    ax.set_yticks(range(len(sites)), sites)
    ax.set_xlabel("test site")
    ax.set_ylabel("trained on (local only)")
    for i in range(len(sites)):
        for j in range(len(sites)):
            v = matrix[i, j]
            ax.text(j, i, "n/a" if np.isnan(v) else f"{v:.3f}", ha="center", va="center",
                    color="white" if not np.isnan(v) and v < 0.75 else "black", fontsize=8)
    fig.colorbar(im, ax=ax, label="AUROC")
    ax.set_title(f"{title}{tag}", fontsize=10)
    return _save(fig, path)


def plot_roc(curves: Mapping[str, Mapping[str, np.ndarray]], classes: Sequence[str], path: Path, tag: str) -> Path:
    """``curves[method] = pooled prediction set``: one panel per class, one curve per method."""
    fig, axes = plt.subplots(1, len(classes), figsize=(3.2 * len(classes), 3.3), squeeze=False)
    for k, (ax, name) in enumerate(zip(axes[0], classes)):
        for method, pred in curves.items():
            known = np.asarray(pred["mask"])[:, k] > 0
            y = np.asarray(pred["targets"])[known, k] > 0.5
            if not (0 < y.sum() < y.size):
                continue
            fpr, tpr, _ = roc_curve(y, np.asarray(pred["probs"])[known, k])
            ax.plot(fpr, tpr, label=method, lw=1.2)
        ax.plot([0, 1], [0, 1], ":", color="grey", lw=0.8)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("false positive rate")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("true positive rate")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"ROC curves on the pooled test set (all sites' test records){tag}")
    return _save(fig, path)
