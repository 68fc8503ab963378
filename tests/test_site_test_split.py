"""Each site's own held-out test split (issue 18 item 2): rows with split=test in a site's manifest,
made by `split_into_sites(site_test_fraction=...)` / `cxrfl data split --site-test-fraction` and by
`generate_dataset(site_test=...)` / `cxrfl data synth --site-test`, loaded only by the data module's
"site_test" stage, counted and leak-checked by `cxrfl data check`; the defaults write what they
always wrote."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrfl.cli import main
from lightning_modules.data.check import check_data, refuse_leakage
from lightning_modules.data.datamodule import CXRDataModule
from lightning_modules.data.manifest import ManifestError, Record, load_split, read_manifest, resolve, write_manifest
from lightning_modules.data.phantom import SITE_TEST_STREAM, _label_plan, generate_dataset, site_profiles
from lightning_modules.data.split import SUMMARY_CSV, patient_key, split_into_sites, write_data_root

CLASSES = ["normal", "pneumonia"]
MARKER_VALUE = 242  # round(0.95 * 255): the burned-in side marker's grey

# Content digests of data sets written by the code BEFORE per-site test splits existed (same
# inputs, computed from that commit's lightning_modules): the defaults must keep every byte.
PHANTOM_ARGS = dict(sites=2, per_site=6, test_size=3, size=32, seed=3)
PHANTOM_BEFORE = "642ce4e6e7346c28c0aaa3bc6471bfcaea636d97a0ad2d1579c101dbcd65477d"
SPLIT_BEFORE = "3bb3090187ba17e742963a1089a95f6cd4013a0a86c577d27a49f57f5e24bc66"


def _records(n_patients=60, seed=0, pos_rate=0.4, n_sources=3):
    """Patients with 1-3 images each, binary labels and a `site` column."""
    rng = np.random.default_rng(seed)
    records = []
    for p in range(n_patients):
        label = CLASSES[int(rng.random() < pos_rate)]
        for j in range(int(rng.integers(1, 4))):
            records.append(Record(image=f"img/p{p:03d}_{j}.png", label=label, patient_id=f"P{p:03d}",
                                  site=f"hospital-{p % n_sources}"))
    return records


def _digest(root: Path, skip_json_keys=()) -> str:
    """sha256 over every file's relative path and content (decoded pixels for PNGs, so the zlib
    build does not matter; dataset.json without `skip_json_keys` of its 'split' entry)."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        h.update(path.relative_to(root).as_posix().encode())
        if path.suffix == ".png":
            with Image.open(path) as image:
                h.update(np.asarray(image).tobytes())
        elif path.name == "dataset.json" and skip_json_keys:
            info = json.loads(path.read_text())
            for key in skip_json_keys:
                info.get("split", {}).pop(key, None)
            h.update(json.dumps(info, sort_keys=True).encode())
        else:
            h.update(path.read_bytes())
    return h.hexdigest()


def _write_source(folder: Path, records) -> Path:
    write_manifest(folder / "manifest.csv", records)
    return folder / "manifest.csv"


def _patients_by_place(root: Path) -> dict[tuple[str, str], set[str]]:
    """(site or 'test', split) -> its patient ids, read back from a data root."""
    places: dict[tuple[str, str], set[str]] = {}
    for folder in sorted(p for p in root.iterdir() if (p / "manifest.csv").is_file()):
        for r in read_manifest(folder / "manifest.csv"):
            places.setdefault((folder.name, r.split), set()).add(r.patient_id)
    return places


def _assert_disjoint(places: dict[tuple[str, str], set[str]]) -> None:
    seen: dict[str, tuple[str, str]] = {}
    for place, patients in places.items():
        for p in patients:
            assert seen.setdefault(p, place) == place, f"patient {p} in {seen[p]} and {place}"


# --------------------------------------------------------------------------- split


def test_split_holds_out_a_stratified_fraction_of_each_sites_patients():
    records = _records(n_patients=120, seed=1)
    result = split_into_sites(records, 3, mode="iid", site_test_fraction=0.25, seed=4, classes=CLASSES)
    labels = {patient_key(r): r.label for r in records}
    placed = Counter(r.image for r in result.all_records())
    assert placed == Counter(r.image for r in records)  # every image exactly once
    assert {r.split for r in result.test} == {"test"}
    shared = {patient_key(r) for r in result.test}
    for name, recs in result.sites.items():
        by_split: dict[str, set[str]] = {}
        for r in recs:
            by_split.setdefault(r.split, set()).add(patient_key(r))
        assert set(by_split) == {"train", "val", "test"}, name
        assert not (by_split["test"] & (by_split["train"] | by_split["val"] | shared))
        assert not (by_split["train"] & by_split["val"])
        site_patients = set().union(*by_split.values())
        assert abs(len(by_split["test"]) - 0.25 * len(site_patients)) <= len(CLASSES)
        for c in CLASSES:  # stratified: each class's share in the site's test split close to the site's
            n_class = sum(labels[p] == c for p in site_patients)
            n_test = sum(labels[p] == c for p in by_split["test"])
            assert n_test >= 1 and abs(n_test - 0.25 * n_class) <= 1, (name, c, n_test, n_class)
    assert result.params["site_test_fraction"] == 0.25


def test_a_class_keeps_a_train_patient_and_every_class_of_two_or_more_is_tested():
    # one site: 5 normal patients, 2 pneumonia, 1 "other" (a class with a single patient)
    labels = ["normal"] * 5 + ["pneumonia"] * 2 + ["other"]
    records = [Record(image=f"i{i}.png", label=lab, patient_id=f"P{i}") for i, lab in enumerate(labels)]
    result = split_into_sites(records, 1, site_test_fraction=0.1, test_fraction=0.0, val_fraction=0.0, seed=0)
    site = result.sites["site-1"]
    tested = Counter(r.label for r in site if r.split == "test")
    trained = Counter(r.label for r in site if r.split == "train")
    # 0.1 * 8 rounds to 1 patient, yet each class with >= 2 patients gives one; "other" stays in train
    assert tested == {"normal": 1, "pneumonia": 1}
    assert trained == {"normal": 4, "pneumonia": 1, "other": 1}


def test_source_mode_with_a_preassigned_test_set_keeps_patients_apart(tmp_path):
    records = _records(n_patients=90, seed=2)
    for r in records[:10]:
        r.split = "test"  # an official test set, with every image of those patients
    first = {patient_key(r) for r in records[:10]}
    for r in records[10:]:
        if patient_key(r) in first:
            r.split = "test"
    source = _write_source(tmp_path / "src", records)
    result = split_into_sites(records, None, mode="source", site_test_fraction=0.3, classes=CLASSES)
    write_data_root(result, tmp_path / "out", CLASSES, source.parent)
    places = _patients_by_place(tmp_path / "out")
    _assert_disjoint(places)
    assert places[("test", "test")] == {r.patient_id for r in records if r.split == "test"}
    assert all(places[(f"site-{i}", "test")] for i in (1, 2, 3))
    with open(tmp_path / "out" / SUMMARY_CSV, newline="") as f:
        rows = {row["site"]: row for row in csv.DictReader(f)}
    for i in (1, 2, 3):
        site_rows = read_manifest(tmp_path / "out" / f"site-{i}" / "manifest.csv")
        assert rows[f"site-{i}"]["n_site_test"] == str(sum(r.split == "test" for r in site_rows))
        assert rows[f"site-{i}"]["n_test"] == "0"
    assert rows["test"]["n_test"] == str(len(result.test)) and rows["test"]["n_site_test"] == "0"
    assert int(rows["all"]["n_site_test"]) == sum(int(rows[f"site-{i}"]["n_site_test"]) for i in (1, 2, 3))


def test_default_split_writes_the_same_bytes_as_before(tmp_path):
    source = _write_source(tmp_path / "src", _records())
    written = []
    for name, extra in (("default", []), ("zero", ["--site-test-fraction", "0"])):
        out = tmp_path / name
        assert main(["data", "split", "--manifest", str(source), "--out", str(out), "--sites", "3",
                     "--mode", "dirichlet", "--alpha", "0.3", "--seed", "2", *extra]) == 0
        written.append(out)
    assert _digest(written[0]) == _digest(written[1])
    assert "site_test_fraction" not in json.loads((written[0] / "dataset.json").read_text())["split"]
    assert _digest(written[0], skip_json_keys=("source_dir",)) == SPLIT_BEFORE


def test_split_cli_writes_site_test_rows(tmp_path, capsys):
    source = _write_source(tmp_path / "src", _records())
    out = tmp_path / "out"
    assert main(["data", "split", "--manifest", str(source), "--out", str(out), "--sites", "2",
                 "--site-test-fraction", "0.2"]) == 0
    assert "n_site_test" in capsys.readouterr().out
    places = _patients_by_place(out)
    _assert_disjoint(places)
    assert places[("site-1", "test")] and places[("site-2", "test")]
    assert json.loads((out / "dataset.json").read_text())["split"]["site_test_fraction"] == 0.2


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, float("nan")])
def test_split_refuses_unusable_site_test_fractions(tmp_path, capsys, value):
    with pytest.raises(ValueError, match="site_test_fraction.*--site-test-fraction"):
        split_into_sites(_records(), 2, site_test_fraction=value)
    source = _write_source(tmp_path / "src", _records())
    assert main(["data", "split", "--manifest", str(source), "--out", str(tmp_path / "out"), "--sites", "2",
                 "--site-test-fraction", str(value)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--site-test-fraction" in err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- phantom


def test_default_phantom_writes_the_same_bytes_as_before(tmp_path):
    generate_dataset(tmp_path / "default", **PHANTOM_ARGS)
    generate_dataset(tmp_path / "zero", **PHANTOM_ARGS, site_test=0)
    assert _digest(tmp_path / "default") == _digest(tmp_path / "zero") == PHANTOM_BEFORE
    assert "site_test" not in json.loads((tmp_path / "default" / "dataset.json").read_text())["generator"]


def _marker_corner(path: Path, size: int) -> int | None:
    """Which corner (0..3) holds the burned-in side marker's bar, or None."""
    pixels = np.asarray(Image.open(path))
    m = max(3, size // 20)
    corners = [(m, m), (m, size - 3 * m), (size - 3 * m, m), (size - 3 * m, size - 3 * m)]
    found = [k for k, (r0, c0) in enumerate(corners) if np.all(pixels[r0:r0 + 2 * m, c0:c0 + m // 2 + 1] == MARKER_VALUE)]
    return found[0] if len(found) == 1 else None


def test_phantom_site_test_images_are_new_patients_of_the_sites_profile(tmp_path):
    plain, held = tmp_path / "plain", tmp_path / "held"
    generate_dataset(plain, **PHANTOM_ARGS)
    info = generate_dataset(held, **PHANTOM_ARGS, site_test=5)
    assert info["generator"]["site_test"] == 5
    places = _patients_by_place(held)
    _assert_disjoint(places)
    for i, site in enumerate(("site-1", "site-2")):
        rows = read_manifest(held / site / "manifest.csv")
        tested = [r for r in rows if r.split == "test"]
        assert len(tested) == 5 and {r.site for r in tested} == {site}
        assert sum(info["counts"][site][k] for k in info["counts"][site] if k.startswith("test/")) == 5
        # train/val rows and their images are exactly those of the data set without a site test split
        assert [r for r in rows if r.split != "test"] == read_manifest(plain / site / "manifest.csv")
        for r in rows:
            if r.split == "test":
                assert _marker_corner(resolve(held / site, r.image), 32) == i % 4  # the site's own marker corner
            else:
                assert (held / site / r.image).read_bytes() == (plain / site / r.image).read_bytes()
    assert _digest(held / "test") == _digest(plain / "test")


def test_phantom_site_test_keeps_the_sites_planned_prevalence(tmp_path):
    info = generate_dataset(tmp_path, sites=2, per_site=4, test_size=2, size=32, seed=1, label_alpha=0.5, site_test=10)
    for i, profile in enumerate(site_profiles(2, 1, label_alpha=0.5)):
        rows = read_manifest(tmp_path / profile.name / "manifest.csv")
        expected = sum(_label_plan(10, profile.prevalence, 1, stream=SITE_TEST_STREAM + i + 1))
        assert sum(r.label == "pneumonia" for r in rows if r.split == "test") == expected
        assert info["counts"][profile.name].get("test/pneumonia", 0) == expected


@pytest.mark.parametrize("value", [-1, 2.5, True, "3"])
def test_generator_refuses_bad_site_test_counts(tmp_path, value):
    with pytest.raises(ValueError, match="site_test must be a whole number >= 0"):
        generate_dataset(tmp_path / "out", **PHANTOM_ARGS, site_test=value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["2.5", "-1", "many"])
def test_synth_cli_refuses_bad_site_test_in_one_line(tmp_path, capsys, value):
    assert main(["data", "synth", "--out", str(tmp_path / "out"), "--site-test", value]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--site-test must be a whole number" in err and value in err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- loading and checking


@pytest.fixture(scope="module")
def site_test_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("site_test")
    generate_dataset(root, sites=2, per_site=12, test_size=6, size=32, seed=2, site_test=4)
    return root


def _ids(items) -> set[str]:
    return {it["id"] for it in items}


def test_datamodule_loads_site_test_rows_only_for_the_site_test_stage(site_test_root):
    site_rows = {s: read_manifest(site_test_root / s / "manifest.csv") for s in ("site-1", "site-2")}
    tested = {str(resolve(site_test_root / s, r.image)) for s, rows in site_rows.items() for r in rows if r.split == "test"}
    dm = CXRDataModule(site_test_root, image_size=32, batch_size=4)
    dm.setup("fit")
    assert "site_test" not in dm.items and dm.num_site_test_samples == 0
    assert not (_ids(dm.items["train"]) | _ids(dm.items["val"])) & tested
    assert dm.num_train_samples + len(dm.items["val"]) == sum(r.split != "test" for rows in site_rows.values() for r in rows)
    dm.setup("test")
    assert not _ids(dm.items["test"]) & tested  # the shared test set stays test/ only
    assert {str(resolve(site_test_root / "test", r.image)) for _, r in load_split(site_test_root, "test")} == _ids(dm.items["test"])
    dm.setup("site_test")
    assert _ids(dm.items["site_test"]) == tested and dm.num_site_test_samples == 8
    labels = [r.label for rows in site_rows.values() for r in rows if r.split == "test"]
    assert dm.class_counts("site_test") == [labels.count(c) for c in CLASSES]
    batches = list(dm.site_test_dataloader())
    assert sum(len(b["label"]) for b in batches) == 8 and batches[0]["image"].shape[1:] == (1, 32, 32)
    one = CXRDataModule(site_test_root, image_size=32, sites=["site-2"])
    assert one.site_test_dataloader() is not None and one.num_site_test_samples == 4
    assert {it["id"] for it in one.items["site_test"]} <= {t for t in tested if "/site-2/" in t}


def test_no_site_test_split_gives_no_loader(synthetic_root):
    dm = CXRDataModule(synthetic_root, image_size=32)
    assert dm.site_test_dataloader() is None and dm.num_site_test_samples == 0
    assert dm.class_counts("site_test") == [0, 0]
    assert load_split(synthetic_root, "site_test") == []


def test_data_check_counts_site_test_rows_and_reports_their_leakage(site_test_root, tmp_path):
    report = check_data(site_test_root)
    assert report.usable and not report.warnings
    assert report.counts["site-1"]["test"] == (4, 4) and report.counts["site-2"]["test"] == (4, 4)
    assert report.counts["test"] == {"test": (6, 6)}
    # a site's train patient also in its own test split, or in the shared test set: leakage
    root = tmp_path / "leaky"
    shutil.copytree(site_test_root, root)
    rows = read_manifest(root / "site-1" / "manifest.csv")
    train_patient = next(r.patient_id for r in rows if r.split == "train")
    tested = next(i for i, r in enumerate(rows) if r.split == "test")
    rows[tested].patient_id = train_patient
    write_manifest(root / "site-1" / "manifest.csv", rows)
    shared = read_manifest(root / "test" / "manifest.csv")
    site2 = read_manifest(root / "site-2" / "manifest.csv")
    next(r for r in site2 if r.split == "test").patient_id = shared[0].patient_id
    write_manifest(root / "site-2" / "manifest.csv", site2)
    reasons = [p.reason for p in check_data(root).errors]
    assert any(train_patient in r and "two splits" in r for r in reasons), reasons
    assert any(shared[0].patient_id in r and "both a site and the test set" in r for r in reasons), reasons
    with pytest.raises(ManifestError, match="data leakage"):
        refuse_leakage(root)
    refuse_leakage(site_test_root)  # the clean root passes


def test_data_check_cli_prints_site_test_counts(site_test_root, capsys):
    assert main(["data", "check", str(site_test_root)]) == 0
    out = capsys.readouterr().out
    assert "site-1 train" in out and "test 4/4" in out
