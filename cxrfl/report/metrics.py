"""The report's numbers from test predictions: ROC curves and their AUC (torchmetrics), reliability and
expected calibration error, confusion matrices."""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.functional.classification import binary_roc
from torchmetrics.utilities.compute import auc as _trapezoid_auc

from cxrfl.report.reading import Predictions


def roc_curve(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct score threshold, from (0, 0) to (1, 1)
    (torchmetrics' exact binary ROC: tied images cross the threshold together)."""
    fpr, tpr, _ = binary_roc(torch.as_tensor(scores), torch.as_tensor(np.asarray(positive), dtype=torch.long))
    return fpr.double().numpy(), tpr.double().numpy()


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under a ROC curve, by the trapezoidal rule binary_auroc applies to its own curve."""
    return float(_trapezoid_auc(torch.as_tensor(fpr), torch.as_tensor(tpr)))


def roc_of(pred: Predictions) -> tuple[np.ndarray, np.ndarray, float] | None:
    """Binary: ROC of the last class. Multi-class: macro average of the one-vs-rest curves (and AUCs).
    None when a class needed for the curve is missing from the labels."""
    n = len(pred.classes)
    if n == 2:
        positive = pred.labels == 1
        if positive.all() or not positive.any():
            return None
        fpr, tpr = roc_curve(positive, pred.probs[:, 1])
        return fpr, tpr, auc(fpr, tpr)
    curves = []
    for k in range(n):
        positive = pred.labels == k
        if positive.all() or not positive.any():
            return None
        curves.append(roc_curve(positive, pred.probs[:, k]))
    grid = np.unique(np.concatenate([fpr for fpr, _ in curves]))
    mean_tpr = np.mean([np.interp(grid, fpr, tpr) for fpr, tpr in curves], axis=0)
    # interp takes the top of each vertical step at fpr 0: start the drawn curve at (0, 0) again
    return np.r_[0.0, grid], np.r_[0.0, mean_tpr], float(np.mean([auc(fpr, tpr) for fpr, tpr in curves]))


RELIABILITY_BINS = 15  # as the test ECE in metrics.json (lightning_modules.operating_point.ECE_BINS)


def reliability(positive: np.ndarray, scores: np.ndarray, bins: int = RELIABILITY_BINS):
    """Per equal-width bin of the positive-class probability: mean predicted probability, observed
    fraction of positives and image count (empty bins left out), and the expected calibration error
    (count-weighted mean |observed - predicted|, as torchmetrics' binary calibration error).
    Written here because torchmetrics' binary_calibration_error returns the ECE only, not the per-bin
    points the reliability diagram draws."""
    # left-closed bins; a probability of exactly 1 gets a bin of its own, as in torchmetrics
    index = np.floor(scores * bins).astype(int)
    counts = np.bincount(index, minlength=bins + 1)
    keep = counts > 0
    predicted = np.bincount(index, weights=scores, minlength=bins + 1)[keep] / counts[keep]
    observed = np.bincount(index, weights=positive.astype(float), minlength=bins + 1)[keep] / counts[keep]
    ece = float(np.sum(np.abs(observed - predicted) * counts[keep]) / len(scores))
    return predicted, observed, counts[keep], ece


def confusion_matrix(pred: Predictions) -> np.ndarray:
    """Counts: rows are the true class, columns the predicted class."""
    n = len(pred.classes)
    return np.bincount(pred.labels * n + pred.predicted, minlength=n * n).reshape(n, n)
