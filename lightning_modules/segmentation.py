"""`LungSegmentation`: MONAI U-Net (or FlexibleUNet/EfficientNet-B4) for binary lung masks."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytorch_lightning as pl
import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU
from monai.transforms import Compose, FillHoles, KeepLargestConnectedComponent
from monai.utils import convert_to_tensor

from lightning_modules.data.transforms import normalize_image
from lightning_modules.networks import build_segmenter
from lightning_modules.weights import load_checkpoint, load_weights


def _run_config(weights: Path) -> dict:
    """config.json of the run folder holding a weights file (up to three levels up), if any."""
    for folder in list(weights.parents)[:3]:
        config = folder / "config.json"
        if config.is_file():
            try:
                return json.loads(config.read_text())
            except (OSError, json.JSONDecodeError):
                return {}
    return {}


class LungSegmentation(pl.LightningModule):
    """Owns the network, Dice+CE loss, Dice / Jaccard (IoU) / HD95 metrics and the optimizer."""

    def __init__(self, arch: str = "unet", lr: float = 1e-3, weight_decay: float = 1e-5, threshold: float = 0.5):
        super().__init__()
        self.save_hyperparameters()
        self.net = build_segmenter(arch)
        self.loss_fn = DiceCELoss(sigmoid=True)
        self.metrics = {
            "dice": DiceMetric(include_background=True, reduction="mean"),
            "iou": MeanIoU(include_background=True, reduction="mean"),
            "hd95": HausdorffDistanceMetric(include_background=True, percentile=95, reduction="mean"),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        loss = self.loss_fn(self(batch["image"]), batch["mask"])
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(batch["image"]))
        return loss

    def _eval_step(self, batch, stage: str):
        logits = self(batch["image"])
        loss = self.loss_fn(logits, batch["mask"])
        self.log(f"{stage}_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(batch["image"]))
        pred = (torch.sigmoid(logits) > self.hparams.threshold).float()
        target = batch["mask"]
        for metric in self.metrics.values():
            metric(y_pred=pred, y=target)

    def _eval_epoch_end(self, stage: str):
        for name, metric in self.metrics.items():
            # HD95 is NaN when every prediction in the epoch is empty; it is logged as such.
            value = torch.as_tensor(metric.aggregate(), dtype=torch.float32)
            self.log(f"{stage}_{name}", value.to(self.device), prog_bar=name == "dice")
            metric.reset()

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self):
        self._eval_epoch_end("val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def on_test_epoch_end(self):
        self._eval_epoch_end("test")

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    @classmethod
    def from_checkpoint(cls, path, arch: str | None = None, map_location="cpu") -> "LungSegmentation":
        """The one loader of segmentation weights, for sites, central runs and `cxrfl.models`: a
        Lightning checkpoint (central runs), an NVFlare persistor/round file (`{"model": state_dict}`,
        federated runs), a `cxrfl export-model` bundle folder or single-file export, read without
        running code from it (lightning_modules/weights.py). The network is `arch` if given, else the
        one the file names (Lightning, export) or its run's config.json does, else a U-Net. ValueError
        (one line, naming the file) for anything else, a classifier's weights included."""
        model = load_checkpoint(path, map_location)
        threshold = 0.5
        if model.kind == "lightning":
            if "arch" not in model.info and "num_classes" in model.info:
                raise ValueError(f"{model.path}: a classifier's checkpoint, not a segmenter")
            arch, threshold = arch or model.info.get("arch"), model.info.get("threshold", threshold)
        elif model.kind in ("bundle", "export"):
            if model.info.get("task") != "segment":
                raise ValueError(f"{model.path}: an exported {model.info.get('task')!r} model, not a segmenter")
            arch, threshold = arch or model.info.get("model"), model.info.get("threshold", threshold)
        else:  # NVFlare
            config = _run_config(model.path)
            if config.get("task") not in (None, "segment"):
                raise ValueError(f"{model.path}: a model of a {config['task']!r} run, not a segmenter")
            arch = arch or config.get("model")
        if not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
            raise ValueError(f"{model.path}: threshold {threshold!r} is not a probability between 0 and 1")
        if arch is not None and not isinstance(arch, str):
            raise ValueError(f"{model.path}: network name {arch!r} is not a name")
        return cls.from_state_dict(model.state, arch, threshold=float(threshold), source=model.path)

    @classmethod
    def from_state_dict(cls, state: dict, arch: str | None = None, threshold: float = 0.5,
                        source="weights") -> "LungSegmentation":
        """A segmenter in eval mode with `state` loaded; errors name `source` and what does not fit."""
        arch = arch or "unet"
        try:
            module = cls(arch=arch, threshold=threshold)
        except ValueError as exc:  # an unknown network name
            raise ValueError(f"{source}: {exc}") from None
        return load_weights(module, state, source, f"a {arch!r} segmentation network")

    def mask_predictor(self, threshold: float | None = None):
        """predict_masks with a fixed threshold: the MaskPredictor the data module and predict take."""
        return functools.partial(self.predict_masks, threshold=threshold)

    @torch.no_grad()
    def predict_masks(self, images: torch.Tensor, threshold: float | None = None, postprocess: bool = True) -> torch.Tensor:
        """Lung masks [N,1,H,W] for images [N,1,H,W] in [0,1] at any size.

        With postprocess (default) the probabilities are thresholded (default: the module's
        threshold), only the two largest components are kept and holes are filled (MONAI
        transforms), giving a {0,1} mask; without it the raw probabilities are returned.
        """
        self.eval()
        h, w = images.shape[-2:]
        standardise = normalize_image()  # what the data module applies before the network
        x = torch.stack([convert_to_tensor(standardise(im), track_meta=False) for im in images.float()])
        probs = torch.sigmoid(self(x.to(self.device))).cpu()
        if probs.shape[-2:] != (h, w):
            probs = torch.nn.functional.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)
        if not postprocess:
            return probs
        threshold = self.hparams.threshold if threshold is None else threshold
        clean = Compose([KeepLargestConnectedComponent(applied_labels=[1], num_components=2),
                         FillHoles(applied_labels=[1])])
        masks = [convert_to_tensor(clean((p > threshold).float()), track_meta=False) for p in probs]
        return torch.stack(masks).float()
