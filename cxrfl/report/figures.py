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
