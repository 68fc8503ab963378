"""`CXRClassifier`: DenseNet121 (MONAI) or the seed paper's CNN5 on 1-channel chest X-rays."""

from __future__ import annotations

from typing import Sequence

import pytorch_lightning as pl
import torch
import torchmetrics
from torch import nn
from torchmetrics.functional.classification import binary_auroc, multiclass_auroc

from lightning_modules.networks import build_classifier
from lightning_modules.operating_point import score_histogram


def _metrics(num_classes: int) -> torchmetrics.MetricCollection:
    if num_classes == 2:
        c = torchmetrics.classification
        # balanced accuracy is derived from sensitivity and specificity in `compute_metrics`
        return torchmetrics.MetricCollection({
            "acc": c.BinaryAccuracy(),
            "auroc": c.BinaryAUROC(),
            "f1": c.BinaryF1Score(),
            "sensitivity": c.BinaryRecall(),
            "specificity": c.BinarySpecificity(),
        })
    c = torchmetrics.classification
    return torchmetrics.MetricCollection({
        "acc": c.MulticlassAccuracy(num_classes=num_classes, average="micro"),
        "balanced_acc": c.MulticlassRecall(num_classes=num_classes, average="macro"),
        "auroc": c.MulticlassAUROC(num_classes=num_classes, average="macro"),
        "f1": c.MulticlassF1Score(num_classes=num_classes, average="macro"),
        "sensitivity": c.MulticlassRecall(num_classes=num_classes, average="macro"),
        "specificity": c.MulticlassSpecificity(num_classes=num_classes, average="macro"),
    })


def compute_metrics(metrics: torchmetrics.MetricCollection) -> dict[str, torch.Tensor]:
    """compute() plus, for binary tasks, balanced accuracy = (sensitivity + specificity) / 2
    (torchmetrics has no binary balanced accuracy on probabilities)."""
    values = dict(metrics.compute())
    prefix = metrics.prefix or ""
    if f"{prefix}balanced_acc" not in values:
        values[f"{prefix}balanced_acc"] = (values[f"{prefix}sensitivity"] + values[f"{prefix}specificity"]) / 2
    return values


def undefined_as_nan(values: dict, target: torch.Tensor, num_classes: int, prefix: str) -> dict:
    """Metrics the labels cannot define set to NaN (reported as n/a), where torchmetrics returns
    0 with a warning: AUROC without both classes; for two classes, sensitivity without positives,
    specificity without negatives, and the balanced accuracy of either."""
    present = set(target.unique().tolist())
    nan = torch.tensor(float("nan"))
    undefined = []
    if len(present) < 2:
        undefined.append("auroc")
    if num_classes == 2 and 1 not in present:
        undefined += ["sensitivity", "balanced_acc", "f1"]
    if num_classes == 2 and 0 not in present:
        undefined += ["specificity", "balanced_acc"]
    return {k: (nan if k.removeprefix(prefix) in undefined else v) for k, v in values.items()}


def bootstrap_auroc(probs: torch.Tensor, target: torch.Tensor, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of AUROC by resampling the whole test set (torchmetrics'
    BootStrapper resamples within each batch, which is not the test-set bootstrap)."""
    gen = torch.Generator().manual_seed(seed)
    n, scores = len(target), []
    for _ in range(n_boot):
        idx = torch.randint(0, n, (n,), generator=gen)
        t = target[idx]
        if t.unique().numel() < 2:
            continue
        if probs.ndim == 1:
            scores.append(float(binary_auroc(probs[idx], t)))
        else:
            scores.append(float(multiclass_auroc(probs[idx], t, num_classes=probs.shape[1], average="macro")))
    if not scores:
        return float("nan"), float("nan")
    s = torch.tensor(scores)
    return float(torch.quantile(s, 0.025)), float(torch.quantile(s, 0.975))


class CXRClassifier(pl.LightningModule):
    """Owns the network, the (optionally class-weighted) cross-entropy, the metrics and the optimizer.

    Binary tasks use 2 logits and report metrics on the positive class (index 1).
    """

    def __init__(self, model: str = "densenet121", num_classes: int = 2, class_names: Sequence[str] | None = None,
                 lr: float = 1e-3, weight_decay: float = 1e-4, class_weights: Sequence[float] | None = None,
                 bootstrap: int = 1000, dp_compatible: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.net = build_classifier(model, num_classes, dp_compatible)  # dp_compatible: DP-SGD's layers
        # Not persistent: class weights are a site's own (its label counts); they must not enter
        # the state_dict that federated averaging combines.
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("class_weights", weight, persistent=False)
        self.train_metrics = _metrics(num_classes).clone(prefix="train_")
        self.val_metrics = _metrics(num_classes).clone(prefix="val_")
        self.test_metrics = _metrics(num_classes).clone(prefix="test_")
        self.test_outputs: dict[str, list] = {}
        # Set by a federated site for cross-site evaluation: validation also logs per-class score
        # histograms (counts only, no image's score), from which the server chooses the threshold.
        self.report_score_histogram = False
        self._val_scores: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def binary(self) -> bool:
        return self.hparams.num_classes == 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _scores(self, logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float(), dim=1)
        return probs[:, 1] if self.binary else probs

    def _step(self, batch, metrics: torchmetrics.MetricCollection, stage: str):
        logits = self(batch["image"])
        target = batch["label"].long()
        if len(target) == 0:  # an empty Poisson batch (DP-SGD): a noise-only step, nothing to measure or log
            return logits.sum(), logits
        loss = nn.functional.cross_entropy(logits, target, weight=self.class_weights)
        metrics.update(self._scores(logits.detach()), target)
        self.log(f"{stage}_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(target))
        return loss, logits

    def training_step(self, batch, batch_idx):
        loss, _ = self._step(batch, self.train_metrics, "train")
        return loss

    def on_train_epoch_end(self):
        self.log_dict(compute_metrics(self.train_metrics))
        self.train_metrics.reset()

    def on_validation_epoch_start(self):
        self._val_scores = []

    def validation_step(self, batch, batch_idx):
        _, logits = self._step(batch, self.val_metrics, "val")
        if self.report_score_histogram and self.binary:
            self._val_scores.append((self._scores(logits.detach()).cpu(), batch["label"].long().cpu()))

    def on_validation_epoch_end(self):
        if self._val_scores:  # not to the loggers: the metrics sent back to the server only
            scores, labels = (torch.cat(part) for part in zip(*self._val_scores))
            self.log_dict(score_histogram(scores, labels), logger=False)
            self._val_scores = []
        computed = compute_metrics(self.val_metrics)
        self.log("val_auroc", computed.pop("val_auroc"), prog_bar=True)
        self.log_dict(computed)
        self.val_metrics.reset()

    def on_test_epoch_start(self):
        self.test_outputs = {"id": [], "target": [], "probs": []}

    def test_step(self, batch, batch_idx):
        _, logits = self._step(batch, self.test_metrics, "test")
        self.test_outputs["id"] += list(batch["id"])
        self.test_outputs["target"].append(batch["label"].long().cpu())
        self.test_outputs["probs"].append(torch.softmax(logits.float(), dim=1).cpu())

    def on_test_epoch_end(self):
        target = torch.cat(self.test_outputs["target"])
        probs = torch.cat(self.test_outputs["probs"])
        self.log_dict(undefined_as_nan(compute_metrics(self.test_metrics), target, self.hparams.num_classes, "test_"))
        self.test_metrics.reset()
        if self.hparams.bootstrap:
            low, high = bootstrap_auroc(probs[:, 1] if self.binary else probs, target, self.hparams.bootstrap)
            self.log_dict({"test_auroc_ci_low": low, "test_auroc_ci_high": high})

    @torch.no_grad()
    def logits_and_labels(self, loader) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and labels over a whole loader in eval mode (e.g. the validation split, for
        choosing the operating point after training)."""
        was_training = self.training
        self.eval()
        logits, labels = [], []
        for batch in loader:
            logits.append(self(batch["image"].to(self.device)).float().cpu())
            labels.append(batch["label"].long().cpu())
        self.train(was_training)
        return torch.cat(logits), torch.cat(labels)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
