"""Operating points and calibration of a binary classifier, from its scores on validation data:
the decision threshold (Youden's J, or the highest threshold reaching a target sensitivity),
metrics at a threshold, expected calibration error and temperature scaling.

A score is called positive when `score >= threshold`: the convention of torchmetrics' `binary_roc`,
whose points the threshold is chosen from, so the sensitivity found on validation is the one the
threshold gives there.
"""

from __future__ import annotations

import math

import torch
from torchmetrics.functional.classification import (
    binary_calibration_error,
    binary_roc,
    multiclass_calibration_error,
)

DEFAULT_THRESHOLD = 0.5
ECE_BINS = 15
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0


def threshold_rule(target_sensitivity: float | None) -> str:
    return "youden" if target_sensitivity is None else f"sensitivity>={target_sensitivity:g}"


def choose_threshold(scores: torch.Tensor, labels: torch.Tensor, target_sensitivity: float | None = None) -> dict:
    """The decision threshold on positive-class `scores`: the one maximising Youden's J
    (sensitivity + specificity - 1), or with `target_sensitivity` the highest threshold whose
    sensitivity is at least that. Without both classes no ROC exists: 0.5, and the reason."""
    scores, labels = scores.detach().float().flatten().cpu(), labels.detach().long().flatten().cpu()
    rule = threshold_rule(target_sensitivity)
    if labels.unique().numel() < 2:
        return {"threshold": DEFAULT_THRESHOLD, "rule": "default 0.5 (validation lacks a class)",
                **metrics_at_threshold(scores, labels, DEFAULT_THRESHOLD)}
    fpr, tpr, thresholds = binary_roc(scores, labels)
    if target_sensitivity is None:
        best = int(torch.argmax(tpr - fpr))  # first maximum: the highest threshold among ties
    else:
        if not 0 < target_sensitivity < 1:
            raise ValueError(f"target sensitivity must be between 0 and 1, got {target_sensitivity}")
        best = int(torch.nonzero(tpr >= target_sensitivity)[0])  # thresholds fall, so the first is the highest
    threshold = float(thresholds[best])
    return {"threshold": threshold, "rule": rule, **metrics_at_threshold(scores, labels, threshold)}


def metrics_at_threshold(scores: torch.Tensor, labels: torch.Tensor, threshold: float) -> dict:
    """Accuracy, sensitivity, specificity and balanced accuracy of `score >= threshold`; NaN where the
    labels leave one undefined (no positives, no negatives). Counted here, not with torchmetrics'
    stat scores, which call a score positive only when it is strictly above the threshold."""
    predicted = scores.float().flatten() >= threshold
    positive = labels.long().flatten() == 1
    tp, fn = int((predicted & positive).sum()), int((~predicted & positive).sum())
    tn, fp = int((~predicted & ~positive).sum()), int((predicted & ~positive).sum())
    sensitivity = tp / (tp + fn) if tp + fn else math.nan
    specificity = tn / (tn + fp) if tn + fp else math.nan
    total = tp + fn + tn + fp
    return {"accuracy": (tp + tn) / total if total else math.nan, "sensitivity": sensitivity,
            "specificity": specificity, "balanced_accuracy": (sensitivity + specificity) / 2}


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE with `bins` equal-width bins (torchmetrics, L1 norm): for two classes on the
    positive-class probability (a 1-D tensor or the second column), else on the top-class confidence."""
    probs, labels = probs.detach().float().cpu(), labels.detach().long().cpu()
    if probs.ndim == 2 and probs.shape[1] == 2:
        probs = probs[:, 1].contiguous()
    if probs.ndim == 1:
        return float(binary_calibration_error(probs, labels, n_bins=bins))
    return float(multiclass_calibration_error(probs, labels, num_classes=probs.shape[1], n_bins=bins))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, steps: int = 100) -> float:
    """The temperature T minimising the cross-entropy of softmax(logits / T) on (validation)
    `logits` (Guo et al., 2017), by LBFGS on log T, within [0.01, 100]; torchmetrics has no
    temperature scaling."""
    logits, labels = logits.detach().float().cpu(), labels.detach().long().cpu()
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not math.isfinite(temperature):
        return 1.0
    # a model with no signal on validation drives T to infinity (uniform probabilities): kept bounded
    return min(max(temperature, MIN_TEMPERATURE), MAX_TEMPERATURE)


def operating_point(logits: torch.Tensor, labels: torch.Tensor, target_sensitivity: float | None = None) -> dict:
    """Everything chosen on validation for a classifier with these validation `logits`: the
    temperature and ECE before/after it for any number of classes, and for two classes the
    threshold on the (uncalibrated) positive-class probability with its validation metrics.
    Temperature scaling is monotone for two classes, so it never changes a thresholded decision."""
    logits, labels = logits.detach().float().cpu(), labels.detach().long().cpu()
    probs = torch.softmax(logits, dim=1)
    temperature = fit_temperature(logits, labels)
    point = {"temperature": temperature,
             "val_ece_before": expected_calibration_error(probs, labels),
             "val_ece_after": expected_calibration_error(torch.softmax(logits / temperature, dim=1), labels),
             "num_val": len(labels)}
    if logits.shape[1] == 2:
        chosen = choose_threshold(probs[:, 1], labels, target_sensitivity)
        point = {"threshold": chosen["threshold"], "rule": chosen["rule"],
                 **{f"val_{k}": v for k, v in chosen.items() if k not in ("threshold", "rule")}, **point}
    else:
        point["rule"] = "argmax (multiclass: no threshold)"
    return point


# ---- federated: the threshold from the sites' score histograms ------------------------------
HISTOGRAM_BINS = 40
HISTOGRAM_PREFIX = {0: "val_score_hist_neg_", 1: "val_score_hist_pos_"}


def score_histogram(scores: torch.Tensor, labels: torch.Tensor, bins: int = HISTOGRAM_BINS) -> dict[str, float]:
    """Counts of the positive-class score in `bins` equal-width bins on [0, 1], per true class, as
    scalar metrics a site can send instead of its images or per-image scores."""
    scores, labels = scores.detach().float().flatten().cpu().clamp(0, 1), labels.detach().long().flatten().cpu()
    index = (scores * bins).long().clamp(max=bins - 1)  # bin k holds [k/bins, (k+1)/bins), the last also 1.0
    out = {}
    for label, prefix in HISTOGRAM_PREFIX.items():
        counts = torch.bincount(index[labels == label], minlength=bins)
        out.update({f"{prefix}{k:02d}": float(c) for k, c in enumerate(counts.tolist())})
    return out


def histogram_counts(metrics: dict, bins: int = HISTOGRAM_BINS) -> tuple[list[float], list[float]] | None:
    """(negative, positive) counts per bin from a site's metrics; None when it sent none."""
    try:
        return tuple([float(metrics[f"{prefix}{k:02d}"]) for k in range(bins)] for prefix in HISTOGRAM_PREFIX.values())
    except (KeyError, TypeError, ValueError):
        return None


def threshold_from_histograms(histograms: list[tuple[list[float], list[float]]],
                              target_sensitivity: float | None = None) -> dict:
    """The decision threshold from pooled per-class score histograms (the sites' validation): the
    candidate thresholds are the bin edges k/bins, a score >= k/bins counting as positive; the same
    rules as `choose_threshold`. Its resolution is one bin width."""
    bins = len(histograms[0][0])
    neg = torch.tensor([h[0] for h in histograms], dtype=torch.float64).sum(0)
    pos = torch.tensor([h[1] for h in histograms], dtype=torch.float64).sum(0)
    if neg.sum() == 0 or pos.sum() == 0:
        return {"threshold": DEFAULT_THRESHOLD, "rule": "default 0.5 (validation lacks a class)", "bins": bins}
    # edges from the highest (bins-1)/bins down to 1/bins, as binary_roc orders its thresholds
    edges = range(bins - 1, 0, -1)
    sensitivity = torch.tensor([float(pos[k:].sum() / pos.sum()) for k in edges])
    specificity = torch.tensor([float(neg[:k].sum() / neg.sum()) for k in edges])
    if target_sensitivity is None:
        best = int(torch.argmax(sensitivity + specificity))
    else:
        reaching = torch.nonzero(sensitivity >= target_sensitivity)
        best = int(reaching[0]) if len(reaching) else len(sensitivity) - 1
    return {"threshold": list(edges)[best] / bins, "rule": threshold_rule(target_sensitivity), "bins": bins,
            "val_sensitivity": float(sensitivity[best]), "val_specificity": float(specificity[best]),
            "num_val": int(neg.sum() + pos.sum())}
