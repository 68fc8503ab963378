"""Build the LightningModule for a task: one place for central training, NVFlare clients and the
server's model definition, so every side agrees on the network and its state_dict keys."""

from __future__ import annotations

from typing import Sequence

import pytorch_lightning as pl

from lightning_modules.classification import CXRClassifier
from lightning_modules.segmentation import LungSegmentation

DEFAULT_MODEL = {"segment": "unet", "classify": "densenet121"}


def module_spec(task: str, model: str | None = None, classes: Sequence[str] = ()) -> dict:
    """{"path": class path, "args": constructor args}: what NVFlare's persistor instantiates."""
    model = model or DEFAULT_MODEL[task]
    if task == "segment":
        return {"path": "lightning_modules.segmentation.LungSegmentation", "args": {"arch": model}}
    if task == "classify":
        return {"path": "lightning_modules.classification.CXRClassifier",
                "args": {"model": model, "num_classes": len(classes), "class_names": list(classes)}}
    raise ValueError(f"unknown task {task!r}")


def balanced_class_weights(counts: Sequence[int]) -> list[float]:
    """n / (k * n_c): each class contributes equally to the loss; 0 for absent classes."""
    total = sum(counts)
    return [total / (len(counts) * c) if c else 0.0 for c in counts]


def build_module(task: str, model: str | None = None, *, lr: float, classes: Sequence[str] = (),
                 class_counts: Sequence[int] | None = None) -> pl.LightningModule:
    """The module for a task; classification weights its loss by `class_counts` when given."""
    spec = module_spec(task, model, classes)
    if task == "segment":
        return LungSegmentation(**spec["args"], lr=lr)
    weights = balanced_class_weights(class_counts) if class_counts is not None else None
    return CXRClassifier(**spec["args"], lr=lr, class_weights=weights)
