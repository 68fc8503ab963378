"""Operating points and calibration: the threshold math on hand-made scores, ECE and temperature
scaling, a central run that chooses its threshold on validation (never on test), and `predict`
using the stored threshold (0.5 for a run folder or export without one)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from cxrfl.cli import build_parser, main
from cxrfl.models import load_classifier
from lightning_modules.operating_point import (
    choose_threshold,
    expected_calibration_error,
    fit_temperature,
    histogram_counts,
    metrics_at_threshold,
    operating_point,
    score_histogram,
    threshold_from_histograms,
)

# Hand-made ROC: negatives 0.1 0.2 0.3 0.6, positives 0.4 0.5 0.7 0.9.
SCORES = torch.tensor([0.1, 0.2, 0.3, 0.6, 0.4, 0.5, 0.7, 0.9])
LABELS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


def test_youden_picks_the_threshold_maximising_sensitivity_plus_specificity():
    # thresholds >=0.9: J=.25; >=0.7: .5; >=0.6: .25; >=0.5: .5; >=0.4: .75 (sens 1, spec .75); >=0.3: .5
    chosen = choose_threshold(SCORES, LABELS)
    assert chosen["rule"] == "youden"
    assert chosen["threshold"] == pytest.approx(0.4)
    assert chosen["sensitivity"] == 1.0 and chosen["specificity"] == 0.75
    # a 0.5 threshold would have given sensitivity 0.75: the rule moved the operating point
    assert metrics_at_threshold(SCORES, LABELS, 0.5)["sensitivity"] == 0.75


def test_target_sensitivity_takes_the_highest_threshold_reaching_it():
    chosen = choose_threshold(SCORES, LABELS, target_sensitivity=0.5)
    assert chosen["threshold"] == pytest.approx(0.7) and chosen["sensitivity"] == 0.5
    assert chosen["specificity"] == 1.0 and chosen["rule"] == "sensitivity>=0.5"
    chosen = choose_threshold(SCORES, LABELS, target_sensitivity=0.8)
    assert chosen["threshold"] == pytest.approx(0.4) and chosen["sensitivity"] == 1.0


def test_one_class_validation_falls_back_to_one_half():
    chosen = choose_threshold(torch.tensor([0.2, 0.8]), torch.tensor([1, 1]))
    assert chosen["threshold"] == 0.5 and "lacks a class" in chosen["rule"]
    assert math.isnan(chosen["specificity"]) and chosen["sensitivity"] == 0.5


def test_ece_is_small_for_calibrated_and_large_for_over_confident_scores():
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(20000, generator=gen)
    calibrated_labels = (torch.rand(20000, generator=gen) < p).long()  # P(y=1 | p) = p
    assert expected_calibration_error(p, calibrated_labels) < 0.02
    over_confident = (p > 0.5).float() * 0.99 + (p <= 0.5).float() * 0.01  # same ranking, pushed to 0/1
    assert expected_calibration_error(over_confident, calibrated_labels) > 0.2
    # the two-column form is the positive-class probability
    two_col = torch.stack([1 - p, p], dim=1)
    assert expected_calibration_error(two_col, calibrated_labels) == pytest.approx(
        expected_calibration_error(p, calibrated_labels))


def test_temperature_scaling_cools_over_confident_logits():
    gen = torch.Generator().manual_seed(1)
    true_logits = torch.randn(4000, 2, generator=gen)
    labels = torch.multinomial(torch.softmax(true_logits, 1), 1, generator=gen).squeeze(1)
    over_confident = true_logits * 4  # a calibrated model made 4x too sure
    temperature = fit_temperature(over_confident, labels)
    assert 3.0 < temperature < 5.5
    nll = lambda z: float(torch.nn.functional.cross_entropy(z, labels))  # noqa: E731
    assert nll(over_confident / temperature) < nll(over_confident)
    point = operating_point(over_confident, labels)
    assert point["val_ece_after"] < point["val_ece_before"]
    # monotone for two classes: the same decisions at the matching threshold
    assert point["temperature"] == pytest.approx(temperature)
    three = operating_point(torch.randn(50, 3, generator=gen) * 5, torch.randint(0, 3, (50,), generator=gen))
    assert "threshold" not in three and three["rule"].startswith("argmax")


def test_pooled_site_histograms_give_the_threshold_of_the_pooled_scores():
    """Two sites' histograms (bin edges at multiples of 1/40: the hand-made scores sit on them)
    pooled give the threshold Youden's J gives on all their scores together."""
    site_a, site_b = score_histogram(SCORES[::2], LABELS[::2]), score_histogram(SCORES[1::2], LABELS[1::2])
    assert all(v == int(v) for v in site_a.values()) and sum(site_a.values()) == 4
    pooled = threshold_from_histograms([histogram_counts(site_a), histogram_counts(site_b)])
    assert pooled["threshold"] == pytest.approx(choose_threshold(SCORES, LABELS)["threshold"])
    assert pooled["val_sensitivity"] == 1.0 and pooled["val_specificity"] == 0.75 and pooled["num_val"] == 8
    by_sensitivity = threshold_from_histograms([histogram_counts(site_a), histogram_counts(site_b)], 0.5)
    assert by_sensitivity["threshold"] == pytest.approx(0.7)
    assert histogram_counts({"val_auroc": 0.9}) is None  # a site that sent none
    one_class = score_histogram(torch.tensor([0.3]), torch.tensor([1]))
    assert threshold_from_histograms([histogram_counts(one_class)])["threshold"] == 0.5


# ---- a central run -------------------------------------------------------------------------
def _predictions(run_dir):
    with open(run_dir / "test_predictions.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def central_run(synthetic_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("op") / "cls"
    assert main(["central", "--task", "classify", "--model", "cnn5", "--data", str(synthetic_root), "--image-size",
                 "32", "--epochs", "2", "--batch-size", "16", "--out", str(run)]) == 0
    return run


def test_central_run_stores_the_threshold_chosen_on_validation_not_test(central_run, synthetic_root, capsys):
    from lightning_modules.data.datamodule import CXRDataModule

    metrics = json.loads((central_run / "metrics.json").read_text())
    point = metrics["operating_point"]
    assert point["rule"] == "youden" and 0 < point["threshold"] < 1 and point["temperature"] > 0
    assert point["val_ece_before"] is not None and point["val_ece_after"] is not None
    # recompute on the validation predictions of the saved best model: the same threshold
    clf = load_classifier(central_run)
    dm = CXRDataModule(synthetic_root, task="classify", image_size=32, batch_size=16, seed=0)
    dm.setup("fit")
    dm.setup("test")
    val_logits, val_labels = clf.module.logits_and_labels(dm.val_dataloader())
    val_choice = choose_threshold(torch.softmax(val_logits, 1)[:, 1], val_labels)
    assert point["threshold"] == pytest.approx(val_choice["threshold"], abs=1e-5)
    assert point["val_sensitivity"] == pytest.approx(val_choice["sensitivity"])
    test_logits, test_labels = clf.module.logits_and_labels(dm.test_dataloader())
    test_scores = torch.softmax(test_logits, 1)[:, 1]
    test_choice = choose_threshold(test_scores, test_labels)
    assert test_choice["threshold"] != pytest.approx(point["threshold"], abs=1e-6), \
        "validation and test give the same threshold here; the check cannot tell them apart"
    # test metrics are reported at the validation threshold, next to AUROC
    at = metrics_at_threshold(test_scores, test_labels, point["threshold"])
    test = metrics["test"]
    assert test["test_sensitivity_at_threshold"] == pytest.approx(at["sensitivity"])
    assert test["test_balanced_acc_at_threshold"] == pytest.approx(at["balanced_accuracy"])
    assert "test_auroc" in test and test["test_ece"] is not None
    rows = _predictions(central_run)
    assert all(r["predicted"] == ("pneumonia" if float(r["p_pneumonia"]) >= point["threshold"] else "normal")
               for r in rows)
    assert clf.threshold == pytest.approx(point["threshold"]) and clf.temperature == pytest.approx(point["temperature"])


def test_target_sensitivity_option(synthetic_root, tmp_path):
    run = tmp_path / "sens"
    assert main(["central", "--task", "classify", "--model", "cnn5", "--data", str(synthetic_root), "--image-size",
                 "32", "--epochs", "1", "--batch-size", "16", "--target-sensitivity", "0.95", "--out", str(run)]) == 0
    point = json.loads((run / "metrics.json").read_text())["operating_point"]
    assert point["rule"] == "sensitivity>=0.95" and point["val_sensitivity"] >= 0.95
    assert main(["central", "--task", "segment", "--target-sensitivity", "0.9", "--data", str(synthetic_root)]) == 2


def _image_folder(folder, n=6):
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(n):
        Image.fromarray((rng.random((40, 40)) * 255).astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


def _predicted(out):
    with open(out / "predictions.csv") as f:
        return [(r["predicted"], float(r["p_pneumonia"])) for r in csv.DictReader(f)]


def test_predict_uses_the_stored_threshold_and_old_runs_fall_back_to_one_half(central_run, tmp_path):
    import shutil

    images = _image_folder(tmp_path / "images")
    threshold = json.loads((central_run / "metrics.json").read_text())["operating_point"]["threshold"]
    assert main(["predict", str(images), "--classifier", str(central_run), "--out", str(tmp_path / "p")]) == 0
    for label, p in _predicted(tmp_path / "p"):
        assert label == ("pneumonia" if p >= threshold else "normal")
    # --calibrated: probabilities of softmax(logits / T), the same decisions
    temperature = load_classifier(central_run).temperature
    assert main(["predict", str(images), "--classifier", str(central_run), "--out", str(tmp_path / "pc"),
                 "--calibrated"]) == 0
    raw, scaled = _predicted(tmp_path / "p"), _predicted(tmp_path / "pc")
    assert [label for label, _ in raw] == [label for label, _ in scaled]
    for (_, p), (_, q) in zip(raw, scaled):  # p = sigmoid(d), q = sigmoid(d / T)
        d = math.log(p / (1 - p))
        assert q == pytest.approx(1 / (1 + math.exp(-d / temperature)), abs=1e-5)
    # the exported file carries it too
    bundle = tmp_path / "model.pt"
    assert main(["export-model", str(central_run), "--out", str(bundle)]) == 0
    exported = load_classifier(bundle)
    assert exported.threshold == pytest.approx(threshold) and exported.temperature == pytest.approx(temperature)
    # an old run folder (metrics.json without an operating point): 0.5, no error
    old = tmp_path / "old"
    shutil.copytree(central_run, old)
    metrics = json.loads((old / "metrics.json").read_text())
    del metrics["operating_point"]
    (old / "metrics.json").write_text(json.dumps(metrics))
    assert load_classifier(old).threshold == 0.5
    # a forced threshold shows the column follows it: every image above 1e-6 is pneumonia
    forced = tmp_path / "forced"
    shutil.copytree(central_run, forced)
    metrics["operating_point"] = {"threshold": 1e-6, "rule": "youden"}
    (forced / "metrics.json").write_text(json.dumps(metrics))
    assert main(["predict", str(images), "--classifier", str(forced), "--out", str(tmp_path / "pf")]) == 0
    assert all(label == "pneumonia" for label, _ in _predicted(tmp_path / "pf"))
    assert main(["predict", str(images), "--classifier", str(old), "--out", str(tmp_path / "po")]) == 0
    for label, p in _predicted(tmp_path / "po"):
        assert label == ("pneumonia" if p >= 0.5 else "normal")


# ---- a federated run (the simulator run itself: tests/test_federated.py) ----------------------
def test_federated_target_sensitivity_moves_the_threshold_down_to_reach_it(synthetic_root):
    """`sim --target-sensitivity S`: the pooled site histograms give the highest threshold whose
    validation sensitivity reaches S (below Youden's where Youden's misses positives)."""
    from cxrfl.fl.config import FLConfig
    from cxrfl.options import fl_config
    from cxrfl.fl.evaluation import federated_operating_point

    gen = torch.Generator().manual_seed(4)
    by_site = {}
    for site in ("site-1", "site-2"):
        labels = torch.randint(0, 2, (200,), generator=gen)
        scores = (torch.rand(200, generator=gen) * 0.6 + labels * 0.35).clamp(0, 1)
        by_site[site] = score_histogram(scores, labels)
    by_site["test"] = by_site["site-1"]  # the test column never counts
    cfg = FLConfig(task="classify", sites=["site-1", "site-2"], classes=["normal", "pneumonia"])
    youden = federated_operating_point(cfg, by_site)
    sensitive = federated_operating_point(dataclasses.replace(cfg, target_sensitivity=0.99), by_site)
    assert youden["rule"] == "youden" and sensitive["rule"] == "sensitivity>=0.99"
    assert sensitive["val_sensitivity"] >= 0.99 > youden["val_sensitivity"]
    assert sensitive["threshold"] < youden["threshold"] and sensitive["sites"] == 2

    parser = build_parser()
    args = parser.parse_args(["sim", "--task", "segment", "--data", str(synthetic_root), "--target-sensitivity", "0.9"])
    with pytest.raises(ValueError, match="--target-sensitivity applies to --task classify"):
        fl_config(args)
    with pytest.raises(SystemExit) as exit_:
        main(["sim", "--task", "classify", "--target-sensitivity", "1.5", "--data", str(synthetic_root)])
    assert exit_.value.code == 2
