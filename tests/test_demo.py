"""`cxrfl demo --quick`: the README's main command, end to end (FL and central, all three tasks)."""

from __future__ import annotations

import json

from cxrfl.cli import main


def test_quick_demo_prints_the_comparison_table(tmp_path, capsys):
    run = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    rows = summary["rows"]
    assert [(r["task"], r["setting"]) for r in rows] == [
        ("lung segmentation", "FL"), ("lung segmentation", "central"),
        ("classification (full image)", "FL"), ("classification (full image)", "central"),
        ("classification (lung ROI)", "FL"), ("classification (lung ROI)", "central")]
    assert all(r["value"] is not None and 0 <= r["value"] <= 1 and r["wall_seconds"] > 0 for r in rows)
    fl_segmentation = rows[0]["value"]
    assert fl_segmentation > 0.5  # the federated U-Net learned lungs in 3 rounds (random masks: ~0.3)
    # the ROI runs used the federated segmentation model
    roi_config = json.loads((run / "fl-roi" / "config.json").read_text())
    assert roi_config["segmenter"] == str(run / "fl-segment" / "models" / "global_best.pt")
    out = capsys.readouterr().out
    assert "| lung segmentation | FL | test_dice |" in out
    assert (run / "summary.md").read_text().count("\n") == 8  # header, rule, 6 rows
