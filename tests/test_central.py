"""Short centralized runs on synthetic data: the loss falls and the metric beats chance."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from cxrfl.cli import main


def _epoch_losses(run_dir, key="train_loss"):
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


@pytest.fixture(scope="module")
def segmentation_run(synthetic_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("central") / "seg"
    rc = main(["central", "--task", "segment", "--data", str(synthetic_root), "--image-size", "64",
               "--epochs", "4", "--batch-size", "8", "--lr", "3e-3", "--out", str(run)])
    assert rc == 0
    return run


def test_central_segmentation_learns_lungs(segmentation_run):
    run = segmentation_run
    metrics = json.loads((run / "metrics.json").read_text())
    losses = _epoch_losses(run)
    assert len(losses) == 4 and losses[-1] < 0.7 * losses[0]
    assert metrics["monitor"] == "val_dice" and metrics["best_val"] > 0.6
    assert metrics["test"]["test_dice"] > 0.6  # an empty or random mask scores ~0-0.4
    assert 0 < metrics["test"]["test_iou"] < metrics["test"]["test_dice"]
    assert metrics["test"]["test_hd95"] is not None
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "config.json").is_file()
    assert list((run / "tb").glob("events.out.tfevents*"))
    # the best checkpoint reloads into the same module
    state = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert any(k.startswith("net.") for k in state["state_dict"])


def test_central_classification_beats_chance_with_wandb_offline(synthetic_root, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "cls"
    # CNN5 learns this reliably in seconds; DenseNet121 trains in the three-class test below
    rc = main(["central", "--task", "classify", "--model", "cnn5", "--data", str(synthetic_root), "--image-size", "64",
               "--epochs", "8", "--batch-size", "16", "--lr", "1e-3", "--out", str(run), "--wandb"])
    assert rc == 0
    metrics = json.loads((run / "metrics.json").read_text())
    losses = _epoch_losses(run)
    assert losses[-1] < losses[0]
    test = metrics["test"]
    assert test["test_auroc"] > 0.75 and test["test_auroc_ci_low"] > 0.6  # better than chance, with 95 % confidence
    assert test["test_auroc_ci_low"] <= test["test_auroc"] <= test["test_auroc_ci_high"]
    assert {"test_acc", "test_balanced_acc", "test_f1", "test_sensitivity", "test_specificity"} <= set(test)
    assert test["test_balanced_acc"] == pytest.approx((test["test_sensitivity"] + test["test_specificity"]) / 2, abs=1e-5)
    config = json.loads((run / "config.json").read_text())
    assert config["classes"] == ["normal", "pneumonia"] and config["model"] == "cnn5"
    with open(run / "test_predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == metrics["num_test"] == 60
    assert all(abs(float(r["p_normal"]) + float(r["p_pneumonia"]) - 1) < 1e-4 for r in rows)
    assert list((run / "wandb").glob("offline-run-*"))
    for f in (run / "wandb").rglob("*"):  # W&B gets metrics and the configuration, never the data's path
        assert not f.is_file() or str(synthetic_root).encode() not in f.read_bytes(), f


@pytest.mark.parametrize("argv,message", [
    (["--task", "segment", "--roi"], "--roi applies to --task classify only"),
    (["--task", "classify", "--model", "unet"], "not a classify network"),
    (["--task", "classify", "--segmenter", "missing.ckpt", "--roi"], "checkpoint not found"),
])
def test_central_refuses_bad_arguments(argv, message, synthetic_root, capsys):
    assert main(["central", "--data", str(synthetic_root)] + argv) == 2
    assert message in capsys.readouterr().err


def test_central_refuses_unwritable_run_folder(synthetic_root, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["central", "--task", "segment", "--data", str(synthetic_root), "--out", str(blocker / "run")]) == 2
    assert "not writable" in capsys.readouterr().err


def test_roi_classification_with_masks_from_the_segmentation_checkpoint(segmentation_run, synthetic_root, tmp_path):
    run = tmp_path / "roi"
    rc = main(["central", "--task", "classify", "--model", "cnn5", "--roi", "crop", "--segmenter",
               str(segmentation_run / "checkpoints" / "best.ckpt"), "--data", str(synthetic_root),
               "--image-size", "64", "--epochs", "1", "--out", str(run)])
    assert rc == 0
    metrics = json.loads((run / "metrics.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert metrics["roi"] == "crop" and config["segmenter"].endswith("best.ckpt")
    assert 0.0 <= metrics["test"]["test_auroc"] <= 1.0


def test_three_class_classification_into_the_default_run_folder(synthetic_root, tmp_path, monkeypatch):
    """The RSNA setting: three classes, macro AUROC; no --out: a timestamped folder under runs/."""
    import shutil

    from lightning_modules.data.atomic import write_json
    from lightning_modules.data.manifest import read_manifest, write_manifest

    root = tmp_path / "three"
    shutil.copytree(synthetic_root, root)
    classes = ["Normal", "No Lung Opacity / Not Normal", "Lung Opacity"]
    for manifest in root.glob("*/manifest.csv"):
        rows = read_manifest(manifest)
        for i, r in enumerate(rows):
            r.label = classes[2] if r.label == "pneumonia" else classes[i % 2]
        write_manifest(manifest, rows)
    write_json(root / "dataset.json", {"classes": classes})
    monkeypatch.chdir(tmp_path)
    assert main(["central", "--task", "classify", "--data", str(root), "--image-size", "48", "--epochs", "1"]) == 0
    [run] = list((tmp_path / "runs").glob("*-central-classify"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model"] == "densenet121"
    assert metrics["test"]["test_auroc_ci_low"] <= metrics["test"]["test_auroc"] <= metrics["test"]["test_auroc_ci_high"]
    with open(run / "test_predictions.csv") as f:
        header = next(csv.reader(f))
    assert header[3:] == [f"p_{c}" for c in classes]
