"""Build the LightningModule for a task: one place for central training and the NVFlare sites. The
server holds only the network (`app_custom/global_model.py`, from `lightning_modules.networks`), whose
state_dict keys (`net.*`) match these modules'."""

from __future__ import annotations

from typing import Sequence

import pytorch_lightning as pl

from lightning_modules.classification import CXRClassifier
from lightning_modules.config import DEFAULT_MODEL
from lightning_modules.segmentation import LungSegmentation


def balanced_class_weights(counts: Sequence[int]) -> list[float]:
    """n / (k * n_c): each class contributes equally to the loss; 0 for absent classes."""
    total = sum(counts)
    return [total / (len(counts) * c) if c else 0.0 for c in counts]


def build_module(task: str, model: str | None = None, *, lr: float, classes: Sequence[str] = (),
                 class_counts: Sequence[int] | None = None, dp_compatible: bool = False) -> pl.LightningModule:
    """The module for a task; classification weights its loss by `class_counts` when given, and with
    `dp_compatible` has the layers DP-SGD can train (lightning_modules/privacy.py)."""
    model = model or DEFAULT_MODEL[task]
    if task == "segment":
        return LungSegmentation(arch=model, lr=lr)
    if task != "classify":
        raise ValueError(f"unknown task {task!r}")
    weights = balanced_class_weights(class_counts) if class_counts is not None else None
    return CXRClassifier(model=model, num_classes=len(classes), class_names=list(classes), lr=lr,
                         class_weights=weights, dp_compatible=dp_compatible)
