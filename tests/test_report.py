"""`cxrfl report`: the HTML report of a demo-like run folder renders in a real headless Chromium."""

from __future__ import annotations

import ast
import base64
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait
from torchmetrics.functional.classification import binary_auroc, binary_calibration_error, multiclass_auroc

import cxrfl.report as report_package
from cxrfl.cli import main
from cxrfl.fl.config import FLConfig
from cxrfl.report import Predictions, ReportError, auc, reliability, roc_curve, roc_of, write_report

CLASSES = ["normal", "pneumonia"]
SITES = ["site-1", "site-2", "site-3"]
ROUNDS = 4


# ---------------------------------------------------------------------------------------------- run folders


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def _write_predictions(path: Path, rng: np.random.Generator, n: int, separation: float) -> None:
    """Binary test predictions whose pneumonia probability rises with the label by `separation`."""
    labels = rng.integers(0, 2, n)
    p_pos = np.clip(rng.normal(0.5 + separation * (labels - 0.5), 0.2), 0.001, 0.999).round(3)  # ties on purpose
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "predicted"] + [f"p_{c}" for c in CLASSES])
        for i, (y, p) in enumerate(zip(labels, p_pos)):
            w.writerow([f"test/img_{i:03d}.png", CLASSES[y], CLASSES[int(p > 0.5)], f"{1 - p:.6f}", f"{p:.6f}"])


def _round_metrics(path: Path, rng: np.random.Generator, metric: str, start: float) -> None:
    """Each site's validation of the global model per round, as NVFlare's MetricsArtifactWriter writes it."""
    lines = []
    for r in range(ROUNDS):
        sites = [{"name": s, "weight": 40 + 10 * i,
                  "metrics": [{"name": metric, "value": min(0.99, start + 0.08 * r + rng.normal(0, 0.02))},
                              {"name": "val_loss", "value": 0.7 - 0.1 * r + rng.normal(0, 0.02)}]}
                 for i, s in enumerate(SITES)]
        lines.append(json.dumps({"round": r, "aggregated_metrics": [], "sites": sites, "skipped_metrics": []}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _cross_site(path: Path, rng: np.random.Generator, metric: str) -> None:
    models = ["global_final", "global_best"] + [f"local_{s}" for s in SITES]
    matrix = {m: {s: {metric: float(rng.uniform(0.6, 0.95))} for s in SITES} for m in models}
    for m in models:
        matrix[m]["test"] = {"test_" + metric.removeprefix("val_"): float(rng.uniform(0.6, 0.95))}
    _write_json(path, {"key_metric": metric, "matrix": matrix})


def _fl_run(folder: Path, rng: np.random.Generator, task: str) -> None:
    cfg = FLConfig(task=task, sites=SITES, rounds=ROUNDS, image_size=64, model="cnn5" if task != "segment" else None)
    _write_json(folder / "config.json", cfg.as_dict())
    test = {"test_dice": 0.91, "test_iou": 0.84} if task == "segment" else {"test_auroc": 0.87, "test_acc": 0.8}
    _write_json(folder / "metrics.json", {"task": task, "key_metric": cfg.key_metric, "selected_model": "global_best",
                                          "test": test, "wall_seconds": 123.4, "rounds": ROUNDS, "sites": SITES})
    _round_metrics(folder / "metrics" / "round_metrics.jsonl", rng, cfg.key_metric, 0.6)
    _cross_site(folder / "cross_site.json", rng, cfg.key_metric)
    if task != "segment":
        _write_predictions(folder / "test_predictions.csv", rng, 60, separation=0.5)


def _central_run(folder: Path, rng: np.random.Generator, task: str, roi: str | None = None) -> None:
    _write_json(folder / "config.json", {"command": "central", "task": task, "epochs": 12, "image_size": 64,
                                         "model": "cnn5", "roi": roi, "classes": CLASSES, "lr": 0.001})
    _write_json(folder / "metrics.json", {"task": task, "monitor": "val_auroc", "best_val": 0.9, "train_seconds": 45.6,
                                          "test": {"test_auroc": 0.9, "test_acc": 0.83}})
    if task == "classify":
        _write_predictions(folder / "test_predictions.csv", rng, 60, separation=0.6)


def _png(path: Path) -> None:
    fig = Figure(figsize=(3, 2))
    FigureCanvasAgg(fig)
    fig.subplots().imshow(np.random.default_rng(0).random((16, 16)), cmap="inferno")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


@pytest.fixture
def demo_dir(tmp_path) -> Path:
    """A demo folder: FL + central classification, FL segmentation, interpretability results and a figure."""
    rng = np.random.default_rng(7)
    root = tmp_path / "demo"
    _fl_run(root / "fl-classify", rng, "classify")
    _central_run(root / "central-classify", rng, "classify")
    _fl_run(root / "fl-segment", rng, "segment")
    with open(root / "fl-classify" / "metrics" / "round_metrics.jsonl", "a") as f:
        f.write('{"round": 4, "sites": [\n')  # a line cut short by a crash
    rows = [{"task": "classification (full image)", "setting": s, "metric": "test_auroc", "value": v, "wall_seconds": t}
            for s, v, t in (("FL", 0.87, 123.4), ("central", 0.9, 45.6))]
    _write_json(root / "summary.json", {"preset": "quick", "data": "data/x", "rows": rows, "total_seconds": 170.0})
    _write_json(root / "interpretability.json", {
        "fl-classify": {"in_lung_share": 0.62, "in_opacity_share": 0.31, "test_auroc": 0.87},
        "fl-roi": {"in_lung_share": 0.95, "in_opacity_share": 0.44, "test_auroc": 0.89}})
    _png(root / "figures" / "gradcam_full_vs_roi.png")
    return root


# ---------------------------------------------------------------------------------------------- browser


def _chromium() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,2000"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


# Figures the demo folder yields: rounds x2 (FL runs), ROC x1 (one class set), confusion x2, reliability x1,
# cross-site x2, figures/ x1.
EXPECTED_IMAGES = 9
SECTIONS = ["notes", "summary", "runs", "test-metrics", "rounds", "roc", "confusion", "calibration", "cross-site",
            "interpretability",
            "parameters"]


def test_report_renders_every_figure_in_chromium(demo_dir, tmp_path):
    html_path = write_report(demo_dir)
    assert html_path == demo_dir / "report" / "report.html"
    text = html_path.read_text()
    assert "http://" not in text and "https://" not in text and "<script" not in text  # self-contained
    pngs = sorted(p.name for p in html_path.parent.glob("*.png"))
    assert len(pngs) == EXPECTED_IMAGES - 1  # figures/ PNGs are embedded, not copied
    assert "rounds-fl-classify.png" in pngs and "cross-site-fl-segment.png" in pngs

    driver = _chromium()
    try:
        driver.get(html_path.as_uri())
        WebDriverWait(driver, 20).until(lambda d: d.execute_script("return document.readyState") == "complete")
        images = driver.execute_script(
            "return Array.from(document.images, i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight]);")
        assert len(images) >= EXPECTED_IMAGES
        broken = [alt for alt, complete, width, height in images if not (complete and width > 0 and height > 0)]
        assert broken == []
        present = driver.execute_script("return Array.from(document.querySelectorAll('section'), s => s.id);")
        assert present == SECTIONS
        body = driver.find_element("tag name", "body").text
        assert "round_metrics.jsonl: line 5 is malformed" in body  # the broken line is a note, not a crash
        assert "gradcam_full_vs_roi" in body and "in_opacity_share" in body  # figure caption + interpretability
        roc = driver.find_element("id", "roc").text
        assert "fl-classify" in roc and "central-classify" in roc  # both runs in one ROC figure's AUC table
        calibration = driver.find_element("id", "calibration").text
        assert "fl-classify" in calibration and "central-classify" in calibration and "ECE" in calibration
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    assert shot.stat().st_size > 10_000 and shot.read_bytes().startswith(b"\x89PNG")


def test_embedded_figures_match_the_saved_pngs(demo_dir):
    html = write_report(demo_dir).read_text()
    for png in (demo_dir / "report").glob("*.png"):
        assert base64.b64encode(png.read_bytes()).decode() in html


def test_roc_auc_matches_torchmetrics():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.random(300) * 0.6 + labels * 0.3, 2)  # many ties
    fpr, tpr = roc_curve(labels == 1, scores)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1 and np.all(np.diff(fpr) >= 0)
    expected = binary_auroc(torch.tensor(scores), torch.tensor(labels)).item()
    assert auc(fpr, tpr) == pytest.approx(expected, abs=1e-6)

    # three classes: the macro average of the one-vs-rest AUCs
    labels3 = rng.integers(0, 3, 300)
    logits = rng.normal(size=(300, 3)) + np.eye(3)[labels3] * 1.5
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pred = Predictions(["a", "b", "c"], labels3, probs.argmax(1), probs)
    expected3 = multiclass_auroc(torch.tensor(probs), torch.tensor(labels3), num_classes=3, average="macro").item()
    assert roc_of(pred)[2] == pytest.approx(expected3, abs=1e-6)


def test_roc_curve_moves_tied_images_together():
    # thresholds 0.9 (one positive and one negative tied), 0.5 (a positive), 0.1 (a negative)
    fpr, tpr = roc_curve(np.array([True, False, True, False]), np.array([0.9, 0.9, 0.5, 0.1]))
    np.testing.assert_array_equal(fpr, [0, 0.5, 0.5, 1])
    np.testing.assert_array_equal(tpr, [0, 0.5, 1, 1])
    assert auc(fpr, tpr) == pytest.approx(0.625)  # 2 of 4 pairs ranked right, the tied pair counts half


def test_only_the_reading_module_reads_run_files():
    """The report parses run folders in one module, so that one reader can replace it."""
    readers = {"open", "read_text", "read_bytes", "loads", "load", "DictReader", "reader"}
    for module in sorted(Path(report_package.__file__).parent.glob("*.py")):
        calls = {node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
                 for node in ast.walk(ast.parse(module.read_text())) if isinstance(node, ast.Call)}
        if module.name == "reading.py":
            assert calls & readers  # the check sees the calls it looks for
        else:
            assert not calls & readers, f"{module.name} reads files: {sorted(calls & readers)}"


def test_reliability_matches_torchmetrics_ece():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 400)
    scores = np.clip(rng.random(400) * 0.5 + labels * 0.45, 0, 1)  # overconfident on positives, some at 1.0
    scores[:5] = 1.0
    predicted, observed, counts, ece = reliability(labels == 1, scores)
    expected = binary_calibration_error(torch.tensor(scores), torch.tensor(labels), n_bins=15).item()
    assert ece == pytest.approx(expected, abs=1e-6) and ece > 0.05
    assert counts.sum() == 400 and np.all((observed >= 0) & (observed <= 1))
    assert np.all(np.diff(predicted) > 0)  # one point per non-empty bin, in order
    # a calibrated model: observed fractions follow the predictions
    calibrated = rng.random(20000)
    assert reliability(rng.random(20000) < calibrated, calibrated)[3] < 0.02


def test_run_without_optional_files_renders(tmp_path):
    run = tmp_path / "central-segment"
    _write_json(run / "config.json", {"command": "central", "task": "segment", "epochs": 3, "image_size": 64})
    _write_json(run / "metrics.json", {"task": "segment", "train_seconds": 12.0, "test": {"test_dice": 0.9}})
    html = write_report(run).read_text()
    assert "<section id='runs'>" in html and "<section id='parameters'>" in html
    assert "<img" not in html and "id='notes'" not in html

    # a malformed predictions file is a note, not a crash
    broken = tmp_path / "central-classify"
    _write_json(broken / "config.json", {"command": "central", "task": "classify", "classes": CLASSES})
    _write_json(broken / "metrics.json", {"task": "classify", "test": {"test_auroc": 0.8}})
    header = "image,label,predicted,p_normal,p_pneumonia\n"
    (broken / "test_predictions.csv").write_text(header + "x.png,normal,normal,0.9,oops\n")
    html = write_report(broken).read_text()
    assert "test_predictions.csv: unreadable" in html and "<img" not in html


def test_not_a_run_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ReportError, match=str(tmp_path / "nowhere")):
        write_report(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="not a run folder"):
        write_report(tmp_path / "empty")


def test_cli_report(tmp_path, capsys):
    missing = tmp_path / "missing"
    assert main(["report", str(missing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cxrfl report:") and str(missing) in err[0]

    run = tmp_path / "run"
    _central_run(run, np.random.default_rng(1), "classify", roi="mask")
    assert main(["report", str(run)]) == 0
    assert f"report: {run / 'report' / 'report.html'}" in capsys.readouterr().out
    assert "classification (lung ROI)" in (run / "report" / "report.html").read_text()
