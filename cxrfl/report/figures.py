"""The report's figures (matplotlib, no display needed): each function draws one figure from parsed data."""

from __future__ import annotations

import io
import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cxrfl.report.reading import WEIGHTED_MEAN


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def rounds_figure(title: str, key_metric: str, per_site: dict[str, dict[str, list[tuple[int, float]]]]) -> Figure:
    """The key metric and the loss per round, a line per site (the weighted mean dashed)."""
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    for ax, metric in zip(fig.subplots(1, 2), (key_metric, "val_loss")):
        for site, metrics in per_site.items():
            points = sorted(metrics.get(metric, []))
            if points:
                style = {"color": "black", "linestyle": "--"} if site == WEIGHTED_MEAN else {}
                ax.plot(*zip(*points), marker="o", label=site, **style)
        ax.set(xlabel="round", ylabel=metric, title=f"{metric} of the global model")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def roc_figure(curves: list[tuple[str, np.ndarray, np.ndarray, float]], what: str) -> Figure:
    """ROC curves (label, fpr, tpr, AUC) over the chance diagonal; `what` says which class(es) they are of."""
    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
    for label, fpr, tpr, area in curves:
        ax.plot(fpr, tpr, label=f"{label} (AUC {area:.3f})")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01),
           title=f"ROC on the held-out test set\n({what})")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def confusion_figure(counts: np.ndarray, classes: list[str], title: str) -> Figure:
    n = len(classes)
    fig = Figure(figsize=(1.6 + 1.1 * n, 1.2 + 1.1 * n))
    ax = fig.subplots()
    ax.imshow(counts, cmap="Blues", vmin=0)
    for (i, j), c in np.ndenumerate(counts):
        ax.text(j, i, str(c), ha="center", va="center", color="white" if c > counts.max() / 2 else "black")
    ax.set(xticks=range(n), yticks=range(n), xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="true", title=title)
    return fig


def reliability_figure(points: list[tuple[str, np.ndarray, np.ndarray, float]], positive_class: str) -> Figure:
    """Reliability diagrams (label, mean predicted, observed fraction, ECE) over the calibrated diagonal."""
    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="calibrated")
    for label, predicted, observed, ece in points:
        ax.plot(predicted, observed, marker="o", markersize=3, label=f"{label} (ECE {ece:.3f})")
    ax.set(xlabel=f"predicted probability of {positive_class}", ylabel="observed fraction",
           xlim=(0, 1), ylim=(0, 1.01), title="Reliability on the held-out test set")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return fig


def cross_site_figure(values: np.ndarray, models: list[str], columns: list[str], title: str) -> Figure:
    """Heat map of a metric in [0, 1]: models (rows) on sites' validation splits and "test" (columns)."""
    fig = Figure(figsize=(1.8 + 1.2 * len(columns), 1.4 + 0.55 * len(models)))
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, "–" if math.isnan(v) else f"{v:.3f}", ha="center", va="center",
                color="black" if not math.isnan(v) and v > 0.6 else "white")
    ax.set(xticks=range(len(columns)), yticks=range(len(models)), xlabel="evaluated on", ylabel="model",
           title=title)
    ax.set_xticklabels([c if c == "test" else f"{c} val" for c in columns])
    ax.set_yticklabels(models)
    ax.set_facecolor("lightgrey")
    fig.colorbar(image, ax=ax, fraction=0.05)
    return fig


def site_histograms_figure(title: str, xlabel: str, per_site: dict[str, list], overall: list | None) -> Figure:
    """Histograms ([[low, high, count], ...] per site, on the same bins) as the share of each site's count
    per bin, the sites' bars side by side in each bin; `overall` (all sites pooled) as a black step line."""
    fig = Figure(figsize=(7.5, 3.8), layout="constrained")
    ax = fig.subplots()
    width = 1.0 / (len(per_site) + 1)
    for i, (site, bins) in enumerate(per_site.items()):
        counts = np.array([b[2] for b in bins], dtype=float)
        share = counts / counts.sum() if counts.sum() else counts
        ax.bar(np.arange(len(bins)) + (i - (len(per_site) - 1) / 2) * width, share, width=width, label=site)
    if overall:
        counts = np.array([b[2] for b in overall], dtype=float)
        share = counts / counts.sum() if counts.sum() else counts
        ax.step(np.arange(len(overall) + 1) - 0.5, np.append(share, share[-1]), where="post", color="black",
                label="all sites")
    edges = overall or next(iter(per_site.values()))
    ax.set_xticks(np.arange(len(edges)))
    ax.set_xticklabels([f"{b[0]:.3g}–{b[1]:.3g}" for b in edges], rotation=45, ha="right", fontsize=7)
    ax.set(xlabel=xlabel, ylabel="share of the site's total", title=title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return fig


def site_shares_figure(title: str, values: list[str], per_site: dict[str, list[float | None]]) -> Figure:
    """Each value's share of a site's rows (a category: split, class, column value), sites side by side;
    a site that returned no share for a value (withheld) has no bar there."""
    fig = Figure(figsize=(max(5.0, 1.2 + 0.5 * len(values) * max(1, len(per_site)) / 2), 3.6), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(per_site))
    for i, (site, shares) in enumerate(per_site.items()):
        x = [j for j, s in enumerate(shares) if s is not None]
        ax.bar(np.array(x) - 0.4 + (i + 0.5) * width, [shares[j] for j in x], width=width, label=site)
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(values, rotation=30 if len(values) > 4 else 0, ha="right" if len(values) > 4 else "center")
    ax.set(ylabel="share of the site's rows", ylim=(0, 1.05), title=title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return fig
