"""`cxrfl stats`: a site's statistics (app_custom/cxr_statistics.py) against what the files hold, NVFlare's
privacy cleansers on the real job's result (min count, histogram bins, noise), one-line errors, and the
simulator run end to end (JSON, figures, report). The POC run is in tests/test_poc.py (its running POC)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app_custom.cxr_statistics import DATASET, CXRStatistics
from cxrfl.cli import main
from cxrfl.run_folder import RunFolder
from lightning_modules.data.manifest import read_manifest, write_manifest
from lightning_modules.data.phantom import generate_dataset

SITES = ["site-1", "site-2", "site-3"]
CLASSES = ["normal", "pneumonia"]
AGE_ROWS_AT_SITE_3 = 3  # below --min-count 5: its age statistics must be withheld
ROWS_WITHOUT_MASK_AT_SITE_2 = 3  # 9 lung images: a mean (9 >= 5) but no 4-bin histogram (4 >= 40 % of 9)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """3 sites x 12 phantoms (32 px) with two manifest columns: age (numeric; only 3 rows at site-3) and
    sex (F/M); 3 rows of site-2 have no lung mask."""
    root = tmp_path_factory.mktemp("stats") / "data"
    generate_dataset(root, sites=3, per_site=12, test_size=2, size=32, seed=3)
    for i, site in enumerate(SITES):
        records = read_manifest(root / site / "manifest.csv")
        for j, r in enumerate(records):
            r.extra["age"] = str(30 + 7 * i + j) if site != "site-3" or j < AGE_ROWS_AT_SITE_3 else ""
            r.extra["sex"] = "FM"[(i + j) % 2]
            if site == "site-2" and j < ROWS_WITHOUT_MASK_AT_SITE_2:
                r.mask = ""
        write_manifest(root / site / "manifest.csv", records)
    return root


def _pixels(path: Path) -> np.ndarray:
    """8-bit grey levels in [0, 1] as float32, the models' precision (a level on a bin edge counts alike)."""
    return np.asarray(Image.open(path), dtype=np.float32) / np.float32(255)


def test_a_sites_statistics_are_what_its_files_hold(root):
    """Counts, prevalence, column statistics and histograms, each computed here straight from the manifest
    and the PNGs (Pillow, not the data layer the site uses)."""
    for site in SITES:
        folder = root / site
        records = read_manifest(folder / "manifest.csv")
        stats = CXRStatistics(classes=CLASSES, numeric_columns=["age"], categories={"sex": ["F", "M"]},
                              bins=5).load(folder)
        labels, splits = Counter(r.label for r in records), Counter(r.split for r in records)
        for c in CLASSES:
            assert stats.count(DATASET, f"label={c}") == len(records)
            assert stats.sum(DATASET, f"label={c}") == labels[c]
        for s in ("train", "val"):
            assert stats.sum(DATASET, f"split={s}") == splits[s]
        assert stats.sum(DATASET, "sex=F") == sum(r.extra["sex"] == "F" for r in records)
        assert stats.sum(DATASET, "sex=(other)") == 0
        ages = np.array([float(r.extra["age"]) for r in records if r.extra["age"]])
        assert stats.count(DATASET, "age") == len(ages)
        assert stats.mean(DATASET, "age") == pytest.approx(ages.mean())
        assert stats.stddev(DATASET, "age") == pytest.approx(ages.std(ddof=1) if len(ages) > 1 else 0.0)
        images = [_pixels(folder / r.image) for r in records]
        widths = [Image.open(folder / r.image).size[0] for r in records]
        width_hist = stats.histogram(DATASET, "image:width", 3, 20.0, 44.0)
        assert [b.sample_count for b in width_hist.bins] == np.histogram(widths, bins=3, range=(20, 44))[0].tolist()
        whole = sum(np.histogram(img, bins=5, range=(0, 1))[0] for img in images)
        assert [b.sample_count for b in stats.histogram(DATASET, "image:intensity", 5, 0.0, 1.0).bins] == whole.tolist()
        assert stats.mean(DATASET, "image:intensity") == pytest.approx(np.mean([img.mean() for img in images]))
        lungs = [img[_pixels(folder / r.mask) > 0] for img, r in zip(images, records) if r.mask]
        assert stats.count(DATASET, "image:lung_intensity") == len(lungs)
        lung_hist = sum(np.histogram(px, bins=5, range=(0, 1))[0] for px in lungs)
        assert [b.sample_count for b in stats.histogram(DATASET, "image:lung_intensity", 5, 0.0, 1.0).bins] \
            == lung_hist.tolist()
    assert stats.count(DATASET, "age") == AGE_ROWS_AT_SITE_3  # the last site: few ages


def test_a_feature_a_site_has_no_value_for_is_not_declared(root, tmp_path):
    """A column the site's manifest lacks: no feature (an NVFlare mean of nothing would divide by zero)."""
    site = tmp_path / "site"
    records = read_manifest(root / "site-1" / "manifest.csv")
    for r in records:
        r.extra = {}
        r.image, r.mask, r.opacity = (str(root / "site-1" / p) if p else "" for p in (r.image, r.mask, r.opacity))
    write_manifest(site / "manifest.csv", records)
    stats = CXRStatistics(classes=CLASSES, numeric_columns=["age"]).load(site)
    declared = {f.feature_name for f in stats.features()[DATASET]}
    assert "age" not in declared and {"label=normal", "image:intensity", "split=train"} <= declared


@pytest.mark.parametrize("options,named", [
    (["--column", "weight"], "--column weight"),
    (["--column", "patient_id"], "--column patient_id"),
    (["--column", "sex=F,F"], "--column"),
    (["--min-noise", "0.5", "--max-noise", "0.2"], "--min-noise"),
    (["--site-names", "site-9"], "site-9"),
], ids=["unknown column", "identifier column", "repeated value", "noise order", "unknown site"])
def test_wrong_input_is_one_line_and_writes_nothing(options, named, root, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["stats", "--data", str(root), "--out", str(run)] + options) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cxrfl stats: ") and named in err[0], err
    assert not run.exists()


def test_a_missing_data_folder_is_one_line(tmp_path, capsys):
    assert main(["stats", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0] and "does not exist" in err[0]


@pytest.mark.parametrize("value", ["0", "-3", "ten"])
def test_a_bad_min_count_is_refused_by_the_parser(value, root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["stats", "--data", str(root), "--out", str(tmp_path / "run"), "--min-count", value])
    assert exc.value.code == 2
    assert "--min-count" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


def test_the_report_of_a_malformed_stats_file_keeps_what_it_can(tmp_path):
    """A feature without its fields is left out with a note; the others are still shown."""
    good = {"group": "label", "value": "pneumonia", "kind": "indicator", "global": {"count": 30},
            "sites": {"a": {"count": 12, "sum": 3.0, "mean": 0.25}, "b": {"count": 18, "withheld": ["few"]}}}
    (tmp_path / "stats.json").write_text(json.dumps({"sites": ["a", "b"], "features": {
        "label=pneumonia": good, "broken": {"group": "x", "sites": {"a": {}}}}}))
    assert main(["report", str(tmp_path)]) == 0
    html = (tmp_path / "report" / "report.html").read_text()
    assert "3 of 12 (25.0%)" in html and "withheld (n=18)" in html and "broken" in html  # the note names it
    assert (tmp_path / "report" / "stats-label.png").is_file()


@pytest.mark.e2e
def test_the_simulator_run_applies_nvflares_cleansers_and_reports(root, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["stats", "--data", str(root), "--out", str(run), "--column", "age", "--column", "sex",
                 "--min-count", "5", "--bins", "4", "--max-bins-percent", "40"]) == 0
    raw = json.loads((run / "nvflare_statistics.json").read_text())  # as NVFlare's JSON writer wrote it
    summary = json.loads((run / "stats.json").read_text())
    features = summary["features"]

    # MinCountCleanser: site-3 counted age on 3 rows < 5: only its count reached the server
    assert {stat for stat, by_site in raw["age"].items() if "site-3" in by_site} == {"count"}
    assert raw["age"]["count"]["site-3"][DATASET] == AGE_ROWS_AT_SITE_3
    assert features["age"]["sites"]["site-3"] == {"count": 3, "withheld": ["count below the minimum count 5"]}
    assert {"mean", "stddev", "histogram"} <= set(features["age"]["sites"]["site-1"])
    # ... so the global is pooled over site-1 and site-2 (NVFlare's divides their sum by all 27 rows)
    ages = [float(r.extra["age"]) for s in SITES[:2] for r in read_manifest(root / s / "manifest.csv")]
    assert features["age"]["global"]["mean"] == pytest.approx(np.mean(ages), abs=1e-3)
    assert features["age"]["global"]["stddev"] == pytest.approx(np.std(ages, ddof=1), abs=1e-3)
    assert raw["age"]["mean"]["Global"][DATASET] == pytest.approx(sum(ages) / (len(ages) + 3), abs=1e-3)

    # HistogramBinsCleanser: 4 bins need a count above 10 (40 %): site-2's 9 lung images keep their mean only
    lung = features["image:lung_intensity"]["sites"]
    assert lung["site-2"]["count"] == 9 and "mean" in lung["site-2"] and "histogram" not in lung["site-2"]
    assert "histogram" in lung["site-1"] and len(lung["site-1"]["histogram"]) == 4
    assert "site-2" not in raw["image:lung_intensity"]["histogram"]

    # AddNoiseToMinMax: every width is 32, the histogram range (noised min/max) lies 10-30 % beyond it
    edges = features["image:width"]["global"]["histogram"]
    assert 32 * 0.7 - 1e-3 <= edges[0][0] <= 32 * 0.9 + 1e-3 and 32 * 1.1 - 1e-3 <= edges[-1][1] <= 32 * 1.3 + 1e-3

    # counts and prevalence per site as the manifests hold them
    for site in SITES:
        labels = Counter(r.label for r in read_manifest(root / site / "manifest.csv"))
        assert features["label=pneumonia"]["sites"][site]["sum"] == labels["pneumonia"]
    assert features["label=pneumonia"]["global"]["count"] == 36

    # the run folder, the figures (one per feature or category) and the report
    assert RunFolder.read(run).kind == "stats" and RunFolder.read(run).settings["min_count"] == 5
    report = run / "report"
    names = {p.name for p in report.glob("*.png")}
    assert {"stats-label.png", "stats-split.png", "stats-sex.png", "stats-age.png", "stats-image-width.png",
            "stats-image-intensity.png", "stats-image-lung_intensity.png"} <= names
    html = (report / "report.html").read_text()
    assert "Federated statistics" in html and "withheld (n=3)" in html
    out = capsys.readouterr().out
    assert "report.html" in out and any(line.startswith("site-1 ") for line in out.splitlines())
    (report / "report.html").unlink()
    assert main(["report", str(run)]) == 0 and (report / "report.html").is_file()
