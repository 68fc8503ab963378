"""Centralized training: the baseline on the union of all sites, from one `TrainConfig`."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from cxrfl.run_folder import RunFolder
from cxrfl.runs import (WANDB_PRIVATE_SETTINGS, AtomicCheckpointIO, finite_or_none, test_at_operating_point,
                        undefined_reason, write_test_predictions)
from lightning_modules.accelerate import device_callbacks, trainer_precision, training_data_device
from lightning_modules.config import TrainConfig
from lightning_modules.data.atomic import write_json
from lightning_modules.data.datamodule import CXRDataModule
from lightning_modules.factory import build_module
from lightning_modules.operating_point import operating_point
from lightning_modules.segmentation import LungSegmentation


def _loggers(cfg: TrainConfig, run_dir: Path) -> list:
    loggers = [TensorBoardLogger(run_dir, name="tb", version=""), CSVLogger(run_dir, name="csv", version="")]
    if cfg.wandb:
        offline = not os.environ.get("WANDB_API_KEY")
        loggers.append(WandbLogger(project=cfg.wandb_project, name=run_dir.name, save_dir=str(run_dir), offline=offline,
                                   job_type=f"central-{cfg.task}", settings=WANDB_PRIVATE_SETTINGS))
    return loggers


def train_central(cfg: TrainConfig, run_dir: Path) -> dict:
    """Train on every site's training split, select the best epoch on their validation splits, test
    that checkpoint once on the held-out test set; writes the run folder and returns metrics.json."""
    pl.seed_everything(cfg.seed, workers=True)
    # settings this machine cannot run stop here, before the data is read or config.json written
    precision, data_device = trainer_precision(cfg), training_data_device(cfg)
    dm, module = _data_and_module(cfg, data_device)
    privacy = None  # refused before the run folder is made when the plan exceeds --target-epsilon
    if cfg.dp_sgd:  # the whole run is one data holder's: one plan over its epochs
        from lightning_modules.privacy import DPSGD, plan_for  # lazy: Opacus only for DP-SGD runs

        privacy = DPSGD(plan_for(cfg, dm.num_train_samples, who=str(cfg.data_root)), cfg.dp_max_grad_norm)
    RunFolder.create(run_dir, "central", replace(cfg, classes=dm.classes),
                     facts={"num_train": dm.num_train_samples, "num_val": len(dm.items["val"]), "skipped": dm.skipped,
                            "torch": torch.__version__})
    checkpoint, trainer = _trainer(cfg, run_dir, [privacy] if privacy else [], precision)
    start = time.time()
    trainer.fit(module, datamodule=privacy.datamodule(dm) if privacy else dm)
    train_seconds = time.time() - start
    best = checkpoint.best_model_path or checkpoint.last_model_path
    test_results = trainer.test(module, datamodule=dm, ckpt_path=best, verbose=False)[0]
    metrics = {
        "task": cfg.task,
        "model": cfg.network,
        "roi": cfg.roi,
        "monitor": cfg.key_metric,
        "best_val": finite_or_none(checkpoint.best_model_score),
        "best_checkpoint": str(Path(best).relative_to(run_dir)) if best else None,
        "epochs_run": trainer.current_epoch,
        "train_seconds": round(train_seconds, 2),
        "num_train": dm.num_train_samples,
        "num_test": len(dm.items["test"]),
        "test": {k: finite_or_none(v) for k, v in test_results.items()},
    }
    if cfg.task == "classify":  # chosen on validation with the tested (best) weights, then applied to test
        val_logits, val_labels = module.logits_and_labels(dm.val_dataloader())
        point = operating_point(val_logits, val_labels, cfg.target_sensitivity)
        metrics["operating_point"] = {k: finite_or_none(v) if isinstance(v, float) else v for k, v in point.items()}
        metrics["test"].update({k: finite_or_none(v) for k, v in test_at_operating_point(module, point).items()})
    if None in metrics["test"].values():  # e.g. AUROC on a test set of one class
        metrics["undefined_reason"] = undefined_reason(dm.classes, dm.class_counts("test") if dm.classes else None)
    if privacy is not None:  # what every step taken spent (the best epoch's model included)
        metrics["privacy"] = {**privacy.plan.as_dict(), "steps": privacy.steps_taken, "epsilon": privacy.epsilon}
    write_json(run_dir / "metrics.json", metrics)
    if cfg.task == "classify":
        write_test_predictions(run_dir / "test_predictions.csv", module, dm.classes,
                               metrics["operating_point"].get("threshold"))
    return metrics


def _data_and_module(cfg: TrainConfig, data_device=None):
    mask_predictor = None
    if cfg.segmenter is not None:
        mask_predictor = LungSegmentation.from_checkpoint(cfg.segmenter).mask_predictor(cfg.roi_threshold)
    dm = CXRDataModule(cfg.data_root, task=cfg.task, image_size=cfg.image_size, batch_size=cfg.batch_size,
                       num_workers=cfg.workers, roi=cfg.roi, roi_threshold=cfg.roi_threshold,
                       mask_predictor=mask_predictor, seed=cfg.seed, limit=cfg.limit)
    dm.setup("fit")
    dm.keep_training_images_on(data_device)
    balanced = cfg.task == "classify" and cfg.class_weights == "balanced"
    module = build_module(cfg.task, cfg.model, lr=cfg.lr, classes=dm.classes,
                          class_counts=dm.class_counts("train") if balanced else None, dp_compatible=cfg.dp_sgd)
    return dm, module


def _trainer(cfg: TrainConfig, run_dir: Path, extra_callbacks: list, precision: str):
    """Best checkpoint by the validation metric (never the test set), optional early stopping."""
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor=cfg.key_metric,
                                 mode="max", save_last=True, auto_insert_metric_name=False)
    callbacks = [checkpoint, *extra_callbacks, *device_callbacks(cfg)]
    if cfg.patience:
        callbacks.append(EarlyStopping(monitor=cfg.key_metric, mode="max", patience=cfg.patience))
    trainer = pl.Trainer(max_epochs=cfg.epochs, accelerator=cfg.accelerator, devices=1, logger=_loggers(cfg, run_dir),
                         callbacks=callbacks, plugins=[AtomicCheckpointIO()], log_every_n_steps=5,
                         deterministic=cfg.deterministic, enable_model_summary=False, precision=precision)
    return checkpoint, trainer
