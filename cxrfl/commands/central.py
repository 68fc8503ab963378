"""`cxrfl central`: the centralized baseline on the union of all sites."""

from __future__ import annotations

import sys

from cxrfl.central import train_central
from cxrfl.options import add_config_options, central_config
from cxrfl.fl.outcome import privacy_notes
from cxrfl.runs import RunDirError, new_run_dir, print_test_metrics
from lightning_modules.config import ConfigError, TrainConfig
from lightning_modules.data.manifest import ManifestError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "central",
        help="train the centralized baseline on all sites' data",
        description="Train one model on the union of every site's training split, select the best epoch "
        "on the union of the validation splits (Dice for segmentation, AUROC for classification), then "
        "evaluate that checkpoint once on the held-out test set. Writes checkpoints/best.ckpt, "
        "metrics.json, config.json, TensorBoard logs (tb/) and, for classification, test_predictions.csv.",
    )
    add_config_options(p, TrainConfig, "central")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        cfg = central_config(args)
        run_dir = new_run_dir(args.out, f"central-{cfg.task}")
        metrics = train_central(cfg, run_dir)
    except (ConfigError, ManifestError, RunDirError) as exc:
        print(f"cxrfl central: {exc}", file=sys.stderr)
        return 2
    print(f"\nrun folder: {run_dir}")
    for note in privacy_notes(metrics.get("privacy")):  # DP-SGD: what the run spent
        print(note)
    print_test_metrics(metrics["test"], metrics.get("undefined_reason", ""))
    if metrics.get("operating_point"):
        print_operating_point(metrics["operating_point"])
    return 0


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
