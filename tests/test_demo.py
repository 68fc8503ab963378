"""`cxrfl demo --quick --roi-variants`: the README's main command, end to end (FL and central, all three
tasks, the lung-ROI variants, Grad-CAM scores and the report)."""

from __future__ import annotations

import json

from cxrfl.cli import main


def test_quick_demo_prints_the_comparison_table(tmp_path, capsys):
    run = tmp_path / "demo"
    assert main(["demo", "--quick", "--roi-variants", "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    rows = summary["rows"]
    assert [(r["task"], r["setting"]) for r in rows] == [
        ("lung segmentation", "FL"), ("lung segmentation", "central"),
        ("classification (full image)", "FL"), ("classification (full image)", "central"),
        ("classification (lung ROI)", "FL"), ("classification (lung ROI)", "central"),
        ("classification (lung ROI, crop)", "central"), ("classification (lung ROI, mask at 0.05)", "central")]
    assert all(r["value"] is not None and 0 <= r["value"] <= 1 and r["wall_seconds"] > 0 for r in rows)
    fl_segmentation = rows[0]["value"]
    assert fl_segmentation > 0.5  # the federated U-Net learned lungs in 3 rounds (random masks: ~0.3)
    # the ROI runs used the federated segmentation model
    roi_config = json.loads((run / "fl-roi" / "config.json").read_text())
    selected = json.loads((run / "fl-segment" / "metrics.json").read_text())["selected_model"]
    assert roi_config["segmenter"] == str(run / "fl-segment" / "models" / f"{selected}.pt")
    out = capsys.readouterr().out
    assert "| lung segmentation | FL | test_dice |" in out
    assert "| lung segmentation | FL | test_dice |" in (run / "summary.md").read_text()
    assert "One training seed (0): a single draw" in (run / "summary.md").read_text()  # never a bare single draw
    # where each classifier looks, next to its test AUROC; ROI settings as trained
    scores = json.loads((run / "interpretability.json").read_text())
    assert set(scores) == {"fl-classify", "central-classify", "fl-roi", "central-roi", "central-roi-crop",
                           "central-roi-t0.05"}
    assert scores["central-roi-crop"]["roi"] == "crop" and scores["central-roi-t0.05"]["roi_threshold"] == 0.05
    assert scores["fl-classify"]["roi"] is None
    for name, row in scores.items():
        assert row["test_auroc"] is not None and row["images"] > 0 and 0 <= row["maps_with_mass"] <= row["images"]
        for share in ("in_lung_share", "in_opacity_share"):
            if row["maps_with_mass"]:
                assert 0 <= row[share] <= 1, (name, share)
            else:  # a weak model whose heat maps are all zero: no share to report, not a made-up one
                assert row[share] is None, (name, share)
        for ratio in ("in_lung_ratio", "gradient_in_lung_ratio", "occlusion_in_lung_ratio"):  # over a uniform map, with its interval
            assert set(row[ratio]) == {"ratio", "ci95"} and len(row[ratio]["ci95"]) == 2, (name, ratio)
    for figure in ("gradcam_grid.png", "gradient_grid.png", "segmentation_overlays.png"):
        assert (run / "figures" / figure).stat().st_size > 0
    report = (run / "report" / "report.html").read_text()
    assert "gradcam_grid" in report and report.count("data:image/png;base64,") >= 8
