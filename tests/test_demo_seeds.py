"""`cxrfl demo --seeds N`: the demo once per training seed, every number as mean ± spread and
FL ÷ central per task against the quality target (the demo's steps themselves: test_demo.py)."""

from __future__ import annotations

import json

import pytest

from cxrfl.cli import main
from cxrfl import demo

TASKS = [("lung segmentation", "test_dice"), ("classification (full image)", "test_auroc")]


def _summary(seed: int, fl: list[float], central: list[float]) -> dict:
    rows = []
    for (task, metric), f, c in zip(TASKS, fl, central):
        rows += [{"task": task, "setting": "FL", "metric": metric, "value": f, "wall_seconds": 100.0 + seed},
                 {"task": task, "setting": "central", "metric": metric, "value": c, "wall_seconds": 50.0}]
    return {"seed": seed, "rows": rows, "fl_over_central": demo.fl_ratios(rows),
            "interpretability": {"fl-classify": {"gradient_in_lung_ratio": {"ratio": 0.2 + seed / 10, "ci95": [0.1, 0.3]}}}}


def test_ratios_and_spread_over_seeds(tmp_path):
    summaries = [_summary(0, [0.90, 0.96], [1.0, 0.96]), _summary(1, [0.98, 0.95], [1.0, 1.0])]
    assert summaries[0]["fl_over_central"] == {"lung segmentation": pytest.approx(0.9),
                                              "classification (full image)": pytest.approx(1.0)}
    table = demo.write_seeded_summary(summaries, tmp_path, "quick", tmp_path / "data")
    assert "over 2 training seeds (0, 1)" in table
    assert "| lung segmentation | FL | test_dice | 0.9400 ± 0.0566 (n=2) | 100 ± 1 (n=2) |" in table
    # segmentation: ratios 0.90 and 0.98, mean 0.94 < 0.97; classification: 1.0 and 0.95, mean 0.975
    assert "| lung segmentation | 0.900, 0.980 | 0.9400 ± 0.0566 (n=2) | **below** |" in table
    assert "| classification (full image) | 1.000, 0.950 | 0.9750 ± 0.0354 (n=2) | pass |" in table
    assert "| fl-classify | 0.2500 ± 0.0707 (n=2) |" in table
    stored = json.loads((tmp_path / "summary.json").read_text())
    assert stored["seeds"] == [0, 1] and stored["fl_over_central"]["lung segmentation"]["mean"] == pytest.approx(0.94)
    assert stored["rows"][0]["values"] == [0.90, 0.98]
    assert (tmp_path / "summary.md").read_text().strip() == table


def test_a_missing_metric_is_counted_not_averaged_in(tmp_path):
    summaries = [_summary(0, [0.9, 0.9], [1.0, 1.0]), _summary(1, [0.9, 0.9], [1.0, 1.0])]
    summaries[1]["rows"][3]["value"] = None  # central AUROC undefined in seed 1
    summaries[1]["fl_over_central"] = demo.fl_ratios(summaries[1]["rows"])
    table = demo.write_seeded_summary(summaries, tmp_path, "quick", tmp_path)
    assert "| classification (full image) | 0.900, n/a | 0.9000 ± 0.0000 (n=1) | **below** |" in table


def test_demo_runs_once_per_seed_in_its_own_folder(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_run_demo(name, data, seed, run_dir, roi_variants):
        calls.append((name, seed, run_dir.name, roi_variants))
        run_dir.mkdir(parents=True)
        (run_dir / "summary.json").write_text(json.dumps(_summary(seed, [0.95, 0.99], [0.97, 1.0])))
        return "table"

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--seeds", "3", "--seed", "5", "--roi-variants", "--out", str(out)]) == 0
    assert calls == [("quick", 5, "seed-5", True), ("quick", 6, "seed-6", True), ("quick", 7, "seed-7", True)]
    assert "over 3 training seeds (5, 6, 7)" in (out / "summary.md").read_text()
    assert (out / "report" / "report.html").is_file()
    with pytest.raises(SystemExit):  # argparse: --seeds must be >= 1
        main(["demo", "--quick", "--seeds", "0", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_the_roi_variants_are_trained_only_on_request(tmp_path):
    """Two more centralized runs (about a quarter of the demo's time): `--roi-variants` asks for them."""
    data = tmp_path / "data"
    for site in ("site-1", "site-2"):
        (data / site).mkdir(parents=True)
        (data / site / "manifest.csv").write_text("image,label,split\n")
    plain = demo.demo_steps(demo.PRESETS["quick"], data, 0, tmp_path / "run")
    assert [(task, setting) for task, setting, _, _ in plain] == [
        ("lung segmentation", "FL"), ("lung segmentation", "central"),
        ("classification (full image)", "FL"), ("classification (full image)", "central"),
        ("classification (lung ROI)", "FL"), ("classification (lung ROI)", "central")]
    variants = demo.demo_steps(demo.PRESETS["quick"], data, 0, tmp_path / "run", roi_variants=True)
    assert [task for task, _, _, _ in variants[len(plain):]] == [
        "classification (lung ROI, crop)", "classification (lung ROI, mask at 0.05)"]
    assert variants[:len(plain)] and not (tmp_path / "run").exists()  # building the steps runs nothing
