"""The heterogeneity study (`cxrfl study --config cxrfl/studies/heterogeneity.yaml`): its arithmetic (t-intervals,
per-site gain over the local model, generalisability) on hand-computed numbers, its configuration errors, and
one tiny run whose table holds the run folders' numbers and whose re-run trains nothing."""

from __future__ import annotations

import csv
import json
import math

import pytest
import yaml

from cxrfl.cli import main
from cxrfl.heterogeneity_study import _first_patients, is_heterogeneity_config, load_config
from cxrfl.heterogeneity_summary import generalisability, gain, site_rows, summarise, t_interval, tables
from cxrfl.study import CONFIGS, StudyError
from lightning_modules.data.manifest import Record

T_975 = {1: 12.706204736174698, 2: 4.302652729749464}  # Student's t, 97.5th percentile, by degrees of freedom


def test_t_interval_of_three_seeds():
    found = t_interval([0.7, 0.8, 0.9])  # mean 0.8, sd 0.1
    half = T_975[2] * 0.1 / math.sqrt(3)  # 0.248414
    assert found["mean"] == pytest.approx(0.8) and found["n"] == 3 and found["missing"] == 0
    assert found["low"] == pytest.approx(0.8 - half) and found["high"] == pytest.approx(0.8 + half)
    assert found["low"] == pytest.approx(0.551586, abs=1e-6)


def test_t_interval_of_one_number_and_of_none():
    assert t_interval([0.75, None]) == {"mean": 0.75, "low": None, "high": None, "n": 1, "missing": 1}
    assert t_interval([None, float("nan")]) is None


def test_gain_and_generalisability():
    assert gain(0.85, 0.6) == pytest.approx(0.25)
    assert gain(None, 0.6) is None and gain(0.8, None) is None
    tests = {"site-1": 0.9, "site-2": 0.6, "site-3": 0.7}  # one site's model on each site's own test split
    assert generalisability(tests, "site-1") == pytest.approx(0.65)  # (0.6 + 0.7) / 2: the others only
    assert generalisability({"site-1": 0.9, "site-2": None}, "site-1") is None


def _used(shared, tests):
    return {"model": "m.pt", "shared": shared, "tests": tests}


def test_rows_and_cells_over_seeds():
    """Two sites, two seeds: gain = own test minus the local model's own test; the cell's number is the
    seeds' mean over sites, then the t-interval over seeds."""
    facts = {"site-1": {"train_images": 40, "prevalence": 0.25}, "site-2": {"train_images": 10, "prevalence": 0.5}}
    rows = []
    for seed, (own_1, own_2) in {0: (0.8, 0.7), 1: (0.9, 0.9)}.items():
        evaluated = {
            "local": {"site-1": _used(0.6, {"site-1": 0.7, "site-2": 0.5}),
                      "site-2": _used(0.5, {"site-1": 0.4, "site-2": 0.6})},
            "fedavg": {s: _used(0.75 + seed / 10, {"site-1": own_1, "site-2": own_2}) for s in ("site-1", "site-2")},
        }
        rows += site_rows("iid", seed, evaluated, facts, "auroc")
    fedavg = {(r["seed"], r["site"]): r for r in rows if r["method"] == "fedavg"}
    assert fedavg[0, "site-1"]["gain_vs_local"] == pytest.approx(0.1)  # 0.8 - 0.7
    assert fedavg[0, "site-2"]["gain_vs_local"] == pytest.approx(0.1)  # 0.7 - 0.6
    assert fedavg[1, "site-2"]["gain_vs_local"] == pytest.approx(0.3)  # 0.9 - 0.6
    assert fedavg[0, "site-1"]["generalisability"] == pytest.approx(0.7)  # its model on site-2's test
    assert fedavg[0, "site-2"]["train_images"] == 10
    cell = next(c for c in summarise(rows) if c["method"] == "fedavg")
    shared = cell["shared_test"]["mean_over_sites"]  # seeds: 0.75, 0.85
    assert shared["mean"] == pytest.approx(0.8)
    assert shared["high"] == pytest.approx(0.8 + T_975[1] * math.sqrt(0.005) / math.sqrt(2))
    gains = cell["gain_vs_local"]["mean_over_sites"]  # seed 0: (0.1 + 0.1) / 2, seed 1: (0.2 + 0.3) / 2
    assert gains["mean"] == pytest.approx(0.175) and gains["n"] == 2
    assert cell["gain_vs_local"]["by_site"]["site-2"]["mean"] == pytest.approx(0.2)  # (0.1 + 0.3) / 2
    which = next(t for t in tables(summarise(rows), {"iid": facts}, "auroc") if "which sites gain" in t[0])
    assert which[1] == ["site", "train images", "prevalence", "local-only own test", "fedavg"]
    assert [row[:3] for row in which[2]] == [["site-1", 40, 0.25], ["site-2", 10, 0.5]]
    assert which[2][1][4].startswith("+0.2000 [")  # site-2's gain with its interval


def test_smaller_sites_keep_their_first_patients_and_their_own_test_split():
    records = [Record(image=f"{i}.png", label="normal", patient_id=f"p{i // 2}", split="val" if i >= 16 else "train")
               for i in range(20)] + [Record(image=f"t{i}.png", label="normal", patient_id=f"t{i}", split="test")
                                      for i in range(5)]
    kept = _first_patients(records, 10)
    assert sum(r.split == "test" for r in kept) == 5
    assert [r.image for r in kept if r.split == "train"] == [f"{i}.png" for i in range(8)]  # 4 patients, 2 images each
    assert [r.image for r in kept if r.split == "val"] == ["16.png", "17.png"]  # 20 % of 10: one patient's two


BASE = {"study": "heterogeneity", "name": "t", "data": {"sites": 2, "per_site": 20, "site_test": 8},
        "settings": {"iid": {"site_shift": 0, "label_signal": "opacity"}}, "algorithms": ["fedavg"],
        "train": {"model": "cnn5", "image_size": 32}}


@pytest.mark.parametrize("change, problem", [
    ({"settings": None}, "missing 'settings'"),
    ({"algorithms": ["fedavg", "fednova"]}, "unknown algorithm(s) fednova"),
    ({"seeds": 0}, "'seeds' must be a whole number >= 1, got 0"),
    ({"baselines": ["pooled"]}, "unknown baseline(s) pooled"),
    ({"data": {"sites": 2, "per_site": 20, "site_test": 0}}, "data.site_test must be >= 1"),
    ({"settings": {"skew": {"site_shift": 0, "label_alpha": -1}}}, "settings.skew.label_alpha"),
])
def test_configuration_errors_are_one_line_naming_the_file(tmp_path, capsys, change, problem):
    config = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(StudyError, match="bad.yaml") as raised:
        load_config(path)
    assert problem in str(raised.value)
    assert main(["study", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"cxrfl study: {path}: ") and problem in err and "\n" not in err
    assert not (tmp_path / "out").exists()  # nothing started


def test_the_shipped_heterogeneity_configs_load_and_the_default_study_is_unchanged():
    for name in ("heterogeneity.yaml", "heterogeneity-full.yaml"):
        assert is_heterogeneity_config(CONFIGS / name)
        config = load_config(CONFIGS / name)
        assert set(config["settings"]) == {"iid", "label-skew", "feature-shift"}
        assert config["algorithms"] == ["fedavg", "fedprox", "scaffold", "fedbn", "ditto"] and config["seeds"] >= 3
        assert config["baselines"] == ["central", "local", "ensemble", "fedavg-finetune"]
    assert not is_heterogeneity_config(CONFIGS / "default.yaml")


TINY = {
    "study": "heterogeneity", "name": "tiny", "task": "classify", "seeds": 1,
    "data": {"sites": 2, "per_site": [20, 12], "site_test": 8, "test_size": 12, "size": 32, "seed": 3,
             "val_fraction": 0.4},
    "settings": {"feature-shift": {"site_shift": 2, "label_signal": "opacity"}},
    "algorithms": ["fedavg", "ditto"],
    "train": {"model": "cnn5", "image_size": 32, "batch_size": 4, "lr": 0.001, "seed": 0},
    "federated": {"rounds": 1, "local_epochs": 1}, "central": {"epochs": 1}, "local": {"epochs": 1},
    "finetune": {"epochs": 1},
}


@pytest.mark.e2e
def test_tiny_study_table_holds_the_run_folders_numbers_and_resumes(tmp_path, capsys):
    config, out = tmp_path / "tiny.yaml", tmp_path / "study"
    config.write_text(yaml.safe_dump(TINY))
    assert main(["study", "--config", str(config), "--out", str(out)]) == 0
    with open(out / "study.csv") as f:
        rows = {(r["method"], r["seed"], r["site"]): r for r in csv.DictReader(f)}
    methods = {"fedavg", "ditto", "local", "central", "ensemble", "fedavg-finetune"}
    assert set(rows) == {(m, "0", s) for m in methods for s in ("site-1", "site-2")}
    for seed in ("0",):  # the intervals over several seeds: the arithmetic tests above
        folder = out / "feature-shift" / f"seed-{seed}"
        fedavg = json.loads((folder / "fedavg" / "metrics.json").read_text())
        assert float(rows["fedavg", seed, "site-2"]["shared_test"]) == pytest.approx(fedavg["test"]["test_auroc"],
                                                                                      abs=1e-6)
        ditto = json.loads((folder / "ditto" / "metrics.json").read_text())  # the personal models, per site
        for site, other in (("site-1", "site-2"), ("site-2", "site-1")):
            row = rows["ditto", seed, site]
            assert row["model"].endswith(f"ditto/models/local_{site}.pt")
            assert float(row["shared_test"]) == pytest.approx(ditto["test_by_model"][f"local_{site}"]["test_auroc"],
                                                              abs=1e-6)
            assert float(row["own_test"]) == pytest.approx(ditto["site_test"][f"local_{site}"][site], abs=1e-6)
            assert float(row["generalisability"]) == pytest.approx(ditto["site_test"][f"local_{site}"][other],
                                                                   abs=1e-6)
            local = json.loads((folder / f"local-{site}" / "metrics.json").read_text())
            assert float(rows["local", seed, site]["shared_test"]) == pytest.approx(local["test"]["test_auroc"],
                                                                                     abs=1e-6)
            assert float(row["gain_vs_local"]) == pytest.approx(
                float(row["own_test"]) - float(rows["local", seed, site]["own_test"]))
    assert int(rows["local", "0", "site-1"]["train_images"]) > int(rows["local", "0", "site-2"]["train_images"])
    study = json.loads((out / "study.json").read_text())
    cell = next(c for c in study["cells"] if c["method"] == "ditto")
    assert cell["own_test"]["by_site"]["site-1"]["mean"] == pytest.approx(float(rows["ditto", "0", "site-1"]["own_test"]))
    assert "which sites gain" in (out / "study.md").read_text()
    figures = out / "heterogeneity_study" / "figures"
    assert (figures / "shared_test.png").is_file() and (figures / "site_gain.png").is_file()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("feature-shift/seed-*/*/metrics.json")}
    assert len(stamps) == 2 + 1 + 2 + 2  # fedavg, ditto, central, local and fine-tuned per site
    capsys.readouterr()
    assert main(["study", "--config", str(config), "--out", str(out)]) == 0  # resumed: nothing to train
    log = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[study]")]
    assert len(log) == len(stamps) and all(line.endswith("done, skipped") for line in log)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps and not list(out.glob("**/*.unfinished-*"))
    assert main(["report", str(out)]) == 0
    page = (out / "report" / "report.html").read_text()
    assert "Heterogeneity study" in page and "which sites gain" in page
    assert (out / "report" / "study_site_gain.png").read_bytes() == (figures / "site_gain.png").read_bytes()
