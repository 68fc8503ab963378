"""`cxrfl central`: the centralized baseline on the union of all sites."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from cxrfl.commands.options import (add_training_options, non_negative_int, positive_int, probability,
                                    resolve_data_root)
from cxrfl.runs import (WANDB_PRIVATE_SETTINGS, AtomicCheckpointIO, RunDirError, finite_or_none, new_run_dir,
                        print_test_metrics, save_config, test_at_operating_point, undefined_reason,
                        write_test_predictions)
from lightning_modules.data.check import refuse_leakage
from lightning_modules.data.datamodule import CXRDataModule
from lightning_modules.data.manifest import ManifestError, write_json
from lightning_modules.data.transforms import ROI_MODES
from lightning_modules.factory import DEFAULT_MODEL, build_module
from lightning_modules.operating_point import operating_point
from lightning_modules.networks import CLASSIFIERS, SEGMENTERS, input_size_problem
from lightning_modules.segmentation import LungSegmentation

# Best-model selection uses the sites' validation splits only, never the test set.
MONITOR = {"segment": "val_dice", "classify": "val_auroc"}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "central",
        help="train the centralized baseline on all sites' data",
        description="Train one model on the union of every site's training split, select the best epoch "
        "on the union of the validation splits (Dice for segmentation, AUROC for classification), then "
        "evaluate that checkpoint once on the held-out test set. Writes checkpoints/best.ckpt, "
        "metrics.json, config.json, TensorBoard logs (tb/) and, for classification, test_predictions.csv.",
    )
    p.add_argument("--task", choices=["segment", "classify"], required=True,
                   help="segment: lung masks (U-Net); classify: pathology labels (DenseNet121 or CNN5)")
    p.add_argument("--epochs", type=positive_int, default=10, help="training epochs (default 10)")
    p.add_argument("--model", default=None,
                   help=f"network: classify {'|'.join(CLASSIFIERS)} (default densenet121), "
                   f"segment {'|'.join(SEGMENTERS)} (default unet)")
    p.add_argument("--roi", nargs="?", const="mask", choices=ROI_MODES, default=None,
                   help="classify on the lung region only: 'mask' zeroes the background (default when the flag "
                   "is given alone), 'crop' crops to the lungs' bounding box")
    p.add_argument("--segmenter", type=Path, default=None, metavar="CKPT",
                   help="with --roi: predict lung masks with this segmentation checkpoint (default: ground-truth masks)")
    p.add_argument("--roi-threshold", type=probability, default=0.5,
                   help="with --roi: lung probability above which a pixel counts as lung (default 0.5)")
    p.add_argument("--class-weights", choices=["none", "balanced"], default="balanced",
                   help="cross-entropy class weights from training label counts (default balanced)")
    p.add_argument("--patience", type=non_negative_int, default=0, help="stop after this many epochs without improvement (0: off)")
    p.add_argument("--target-sensitivity", type=probability, default=None, metavar="S",
                   help="classify, two classes: decision threshold = the highest one whose sensitivity on the "
                   "validation split is at least S (default: the threshold maximising Youden's J on validation)")
    p.add_argument("--limit", type=positive_int, default=None, help="use at most this many images per split (quick checks)")
    add_training_options(p, image_size=128, batch_size=16, lr=1e-3)
    p.set_defaults(func=run)


def validate_args(args) -> str | None:
    if args.task == "segment" and args.roi:
        return "--roi applies to --task classify only"
    if args.segmenter is not None and not args.roi:
        return "--segmenter needs --roi"
    if args.segmenter is not None and not args.segmenter.is_file():
        return f"--segmenter {args.segmenter}: checkpoint not found"
    valid = CLASSIFIERS if args.task == "classify" else SEGMENTERS
    if args.model is not None and args.model not in valid:
        return f"--model {args.model!r} is not a {args.task} network; choose one of {', '.join(valid)}"
    if getattr(args, "target_sensitivity", None) is not None and args.task != "classify":
        return "--target-sensitivity applies to --task classify only"
    if not 0 < args.roi_threshold < 1:
        return "--roi-threshold must be between 0 and 1"
    if args.segmenter is not None:
        try:  # read (safely) and fitted to its network now: a wrong file stops before a run folder exists
            LungSegmentation.from_checkpoint(args.segmenter)
        except ValueError as exc:
            return f"--segmenter {exc}"
    return None


def input_problem(args) -> str | None:
    """What does not fit the chosen network, found before anything starts."""
    return input_size_problem(args.model or DEFAULT_MODEL[args.task], args.image_size)


def run(args) -> int:
    problem = validate_args(args) or input_problem(args)
    if problem:
        print(f"cxrfl central: {problem}", file=sys.stderr)
        return 2
    try:
        data_root = resolve_data_root(args.data)
        if not args.allow_leakage:  # a contaminated test set or split: refused before anything is written
            refuse_leakage(data_root)
        run_dir = new_run_dir(args.out, f"central-{args.task}")
        metrics = train_central(args, data_root, run_dir)
    except (ManifestError, RunDirError) as exc:
        print(f"cxrfl central: {exc}", file=sys.stderr)
        return 2
    print(f"\nrun folder: {run_dir}")
    print_test_metrics(metrics["test"], metrics.get("undefined_reason", ""))
    if metrics.get("operating_point"):
        print_operating_point(metrics["operating_point"])
    return 0


def _loggers(args, run_dir: Path) -> list:
    loggers = [TensorBoardLogger(run_dir, name="tb", version=""), CSVLogger(run_dir, name="csv", version="")]
    if args.wandb:
        from pytorch_lightning.loggers import WandbLogger

        offline = not os.environ.get("WANDB_API_KEY")
        loggers.append(WandbLogger(project="cxr-fl", name=run_dir.name, save_dir=str(run_dir), offline=offline,
                                   job_type=f"central-{args.task}", settings=WANDB_PRIVATE_SETTINGS))
    return loggers


def train_central(args, data_root: Path, run_dir: Path) -> dict:
    pl.seed_everything(args.seed, workers=True)
    mask_predictor = None
    if args.segmenter is not None:
        segmenter = LungSegmentation.from_checkpoint(args.segmenter)
        mask_predictor = segmenter.mask_predictor(args.roi_threshold)
    dm = CXRDataModule(data_root, task=args.task, image_size=args.image_size, batch_size=args.batch_size,
                       num_workers=args.workers, roi=args.roi, roi_threshold=args.roi_threshold,
                       mask_predictor=mask_predictor, seed=args.seed, limit=args.limit)
    dm.setup("fit")
    balanced = args.task == "classify" and args.class_weights == "balanced"
    module = build_module(args.task, args.model, lr=args.lr, classes=dm.classes,
                          class_counts=dm.class_counts("train") if balanced else None)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    config.update(data=str(data_root), classes=dm.classes, num_train=dm.num_train_samples,
                  num_val=len(dm.items["val"]), skipped=dm.skipped, torch=torch.__version__)
    save_config(run_dir, config)

    monitor = MONITOR[args.task]
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor=monitor, mode="max",
                                 save_last=True, auto_insert_metric_name=False)
    callbacks = [checkpoint]
    if args.patience:
        callbacks.append(EarlyStopping(monitor=monitor, mode="max", patience=args.patience))
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator=args.accelerator, devices=1, logger=_loggers(args, run_dir),
                         callbacks=callbacks, plugins=[AtomicCheckpointIO()], log_every_n_steps=5,
                         deterministic=args.deterministic, enable_model_summary=False)
    start = time.time()
    trainer.fit(module, datamodule=dm)
    train_seconds = time.time() - start
    best = checkpoint.best_model_path or checkpoint.last_model_path
    test_results = trainer.test(module, datamodule=dm, ckpt_path=best, verbose=False)[0]

    metrics = {
        "task": args.task,
        "model": module.hparams.get("model") or module.hparams.get("arch"),
        "roi": args.roi,
        "monitor": monitor,
        "best_val": finite_or_none(checkpoint.best_model_score),
        "best_checkpoint": str(Path(best).relative_to(run_dir)) if best else None,
        "epochs_run": trainer.current_epoch,
        "train_seconds": round(train_seconds, 2),
        "num_train": dm.num_train_samples,
        "num_test": len(dm.items["test"]),
        "test": {k: finite_or_none(v) for k, v in test_results.items()},
    }
    if args.task == "classify":  # chosen on validation with the tested (best) weights, then applied to test
        val_logits, val_labels = module.logits_and_labels(dm.val_dataloader())
        point = operating_point(val_logits, val_labels, getattr(args, "target_sensitivity", None))
        metrics["operating_point"] = {k: finite_or_none(v) if isinstance(v, float) else v for k, v in point.items()}
        metrics["test"].update({k: finite_or_none(v) for k, v in test_at_operating_point(module, point).items()})
    if None in metrics["test"].values():  # e.g. AUROC on a test set of one class
        metrics["undefined_reason"] = undefined_reason(dm.classes, dm.class_counts("test") if dm.classes else None)
    write_json(run_dir / "metrics.json", metrics)
    if args.task == "classify":
        write_test_predictions(run_dir / "test_predictions.csv", module, dm.classes,
                               metrics["operating_point"].get("threshold"))
    return metrics


def print_operating_point(point: dict) -> None:
    if "threshold" in point:
        print(f"  operating point (chosen on validation): threshold {point['threshold']:.4f} by {point['rule']}, "
              f"validation sensitivity {_shown(point.get('val_sensitivity'))}, "
              f"specificity {_shown(point.get('val_specificity'))}")
    else:
        print(f"  operating point: {point['rule']}")
    print(f"  temperature scaling (fitted on validation): T = {_shown(point.get('temperature'))}, validation ECE "
          f"{_shown(point.get('val_ece_before'))} -> {_shown(point.get('val_ece_after'))}")


def _shown(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"
