"""Invariants of the patient-level site split and of the data root it writes."""

from __future__ import annotations

import argparse
import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cxrfl.commands import data_split
from lightning_modules.data.manifest import (
    Record,
    class_names,
    load_split,
    read_dataset_info,
    read_manifest,
    resolve,
    site_dirs,
    write_manifest,
)
from lightning_modules.data.split import (
    MODES,
    SUMMARY_CSV,
    SUMMARY_MD,
    patient_key,
    split_into_sites,
    write_data_root,
)

CLASSES = ["normal", "pneumonia"]


def make_records(n_patients=200, seed=0, pos_rate=0.4, n_sources=3, pretest=0, extra_source=False):
    """n_patients patients with 1-3 images each, binary labels and a `site` column."""
    rng = np.random.default_rng(seed)
    records = []
    for p in range(n_patients):
        label = CLASSES[int(rng.random() < pos_rate)]
        src = f"hospital-{p % n_sources}"
        for j in range(int(rng.integers(1, 4))):
            rec = Record(image=f"img/p{p:03d}_{j}.png", label=label, patient_id=f"P{p:03d}", site=src,
                         split="test" if p < pretest else "")
            if extra_source:
                rec.extra["scanner"] = f"scanner-{p % 2}"
            records.append(rec)
    return records


def site_of_patient(result):
    """patient -> set of places (site name or 'test')."""
    places: dict[str, set] = {}
    for name, recs in result.sites.items():
        for r in recs:
            places.setdefault(patient_key(r), set()).add(name)
    for r in result.test:
        places.setdefault(patient_key(r), set()).add("test")
    return places


def assert_invariants(records, result):
    out = result.all_records()
    # every record exactly once
    assert Counter(r.image for r in out) == Counter(r.image for r in records)
    assert len(out) == len(records)
    # patient in one place only, and in one split only
    for patient, places in site_of_patient(result).items():
        assert len(places) == 1, (patient, places)
    splits: dict[str, set] = {}
    for r in out:
        splits.setdefault(patient_key(r), set()).add(r.split)
    assert all(len(s) == 1 for s in splits.values())
    for recs in result.sites.values():
        assert recs, "empty site"
        assert {r.split for r in recs} <= {"train", "val"}
        assert any(r.split == "train" for r in recs), "site without train patients"
    assert all(r.split == "test" for r in result.test)
    # pre-assigned test records stay test
    pre = {r.image for r in records if r.split == "test"}
    assert pre <= {r.image for r in result.test}


@pytest.mark.parametrize("mode", MODES)
def test_invariants_each_mode(mode):
    records = make_records()
    n = None if mode == "source" else 4
    result = split_into_sites(records, n, mode=mode, alpha=0.3, seed=3)
    assert_invariants(records, result)
    assert result.test, "a test set is drawn"
    n_patients = len({r.patient_id for r in records})
    n_test = len({r.patient_id for r in result.test})
    assert abs(n_test - 0.15 * n_patients) <= 2


def test_iid_sites_near_equal_and_val_fraction():
    records = make_records()
    result = split_into_sites(records, 4, mode="iid", seed=1)
    sizes = [len({r.patient_id for r in recs}) for recs in result.sites.values()]
    assert max(sizes) - min(sizes) <= 1
    for recs in result.sites.values():
        pats = {r.patient_id: r.split for r in recs}
        n_val = sum(s == "val" for s in pats.values())
        assert abs(n_val - 0.2 * len(pats)) <= 1


def test_pre_assigned_test_is_kept_and_nothing_more_drawn():
    records = make_records(pretest=30)
    result = split_into_sites(records, 3, mode="iid", test_fraction=0.5, seed=0)
    assert_invariants(records, result)
    assert {r.image for r in result.test} == {r.image for r in records if r.split == "test"}
    assert result.test_preassigned


def test_patient_with_one_test_image_goes_wholly_to_test():
    records = make_records(n_patients=20)
    first = records[0].patient_id
    others = [r for r in records if r.patient_id == first]
    assert len(others) >= 1
    records[0].split = "test"
    result = split_into_sites(records, 2, seed=0)
    assert_invariants(records, result)
    assert {r.image for r in others} <= {r.image for r in result.test}


def test_deterministic_for_seed_and_different_for_other_seed():
    records = make_records()
    for mode in ("iid", "dirichlet", "quantity"):
        a = split_into_sites(records, 4, mode=mode, seed=7)
        b = split_into_sites(records, 4, mode=mode, seed=7)
        c = split_into_sites(records, 4, mode=mode, seed=8)
        assign = lambda res: sorted((r.image, r.split, name) for name, recs in res.sites.items() for r in recs) + sorted(  # noqa: E731
            r.image for r in res.test
        )
        assert assign(a) == assign(b)
        assert assign(a) != assign(c)


def _patient_pos_rates(result):
    rates = []
    for recs in result.sites.values():
        labels = {r.patient_id: r.label for r in recs}
        rates.append(np.mean([lab == "pneumonia" for lab in labels.values()]))
    return np.array(rates)


def test_dirichlet_skews_labels_far_more_than_iid():
    records = make_records(n_patients=300)
    global_rate = np.mean([r.label == "pneumonia" for r in {r.patient_id: r for r in records}.values()])
    mad = {"iid": [], "dirichlet": []}
    for seed in range(5):
        for mode in mad:
            res = split_into_sites(records, 5, mode=mode, alpha=0.1, seed=seed)
            mad[mode].append(np.mean(np.abs(_patient_pos_rates(res) - global_rate)))
    iid, dirichlet = np.mean(mad["iid"]), np.mean(mad["dirichlet"])
    assert dirichlet > 0.2
    assert dirichlet > 4 * iid, (dirichlet, iid)
    # and a larger alpha is much closer to iid
    res = [split_into_sites(records, 5, mode="dirichlet", alpha=100.0, seed=s) for s in range(5)]
    mild = np.mean([np.mean(np.abs(_patient_pos_rates(r) - global_rate)) for r in res])
    assert mild < dirichlet / 2


def test_dirichlet_every_site_gets_a_patient_even_when_tiny():
    records = make_records(n_patients=12)
    for seed in range(20):
        res = split_into_sites(records, 6, mode="dirichlet", alpha=0.05, test_fraction=0.0, seed=seed)
        assert_invariants(records, res)
        assert len(res.sites) == 6


def test_quantity_mode_unequal_sizes_iid_labels():
    records = make_records(n_patients=300)
    cv = {"iid": [], "quantity": []}
    for seed in range(5):
        for mode in cv:
            res = split_into_sites(records, 5, mode=mode, quantity_sigma=1.0, seed=seed)
            sizes = np.array([len({r.patient_id for r in recs}) for recs in res.sites.values()])
            cv[mode].append(sizes.std() / sizes.mean())
    assert np.mean(cv["quantity"]) > 0.3
    assert np.mean(cv["quantity"]) > 5 * np.mean(cv["iid"])
    # sigma 0 gives equal sizes
    res = split_into_sites(records, 5, mode="quantity", quantity_sigma=0.0, seed=0)
    sizes = [len({r.patient_id for r in recs}) for recs in res.sites.values()]
    assert max(sizes) - min(sizes) <= 1


def test_source_mode_one_value_per_site():
    records = make_records(n_sources=3)
    res = split_into_sites(records, None, mode="source", seed=0)
    assert_invariants(records, res)
    assert len(res.sites) == 3
    assert sorted(res.source_values.values()) == ["hospital-0", "hospital-1", "hospital-2"]
    for name, recs in res.sites.items():
        assert {r.site for r in recs} == {res.source_values[name]}
    # every source contributes to the test set
    assert {r.site for r in res.test} == {"hospital-0", "hospital-1", "hospital-2"}
    # n_sites equal to the number of values is accepted, 0 too; anything else is an error
    assert len(split_into_sites(records, 3, mode="source").sites) == 3
    assert len(split_into_sites(records, 0, mode="source").sites) == 3
    with pytest.raises(ValueError, match="--sites 3"):
        split_into_sites(records, 4, mode="source")


def test_source_mode_extra_column_and_errors():
    records = make_records(extra_source=True)
    res = split_into_sites(records, None, mode="source", source_column="scanner")
    assert sorted(res.source_values.values()) == ["scanner-0", "scanner-1"]
    for name, recs in res.sites.items():
        assert {r.extra["scanner"] for r in recs} == {res.source_values[name]}
    with pytest.raises(ValueError, match="not found"):
        split_into_sites(records, None, mode="source", source_column="nope")
    bad = make_records(n_patients=10)
    bad[0].site = "elsewhere"  # patient P000 has images from two sources (if it has >1 image)
    bad[-1].site = ""
    with pytest.raises(ValueError):
        split_into_sites(bad, None, mode="source")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_sites=0), "at least one site"),
        (dict(n_sites=-2), "at least one site"),
        (dict(n_sites=3, mode="dirichlet", alpha=0.0), "alpha"),
        (dict(n_sites=3, mode="dirichlet", alpha=-1.0), "alpha"),
        (dict(n_sites=3, val_fraction=1.0), "val_fraction"),
        (dict(n_sites=3, val_fraction=-0.1), "val_fraction"),
        (dict(n_sites=3, test_fraction=1.5), "test_fraction"),
        (dict(n_sites=500), "--sites"),
        (dict(n_sites=3, mode="banana"), "mode"),
        (dict(n_sites=3, quantity_sigma=-1.0, mode="quantity"), "quantity_sigma"),
    ],
)
def test_bad_arguments_raise_with_fix(kwargs, match):
    records = make_records(n_patients=50)
    n = kwargs.pop("n_sites")
    with pytest.raises(ValueError, match=match):
        split_into_sites(records, n, **kwargs)


def test_other_errors():
    records = make_records(n_patients=10)
    with pytest.raises(ValueError, match="not in the classes"):
        split_into_sites(records, 2, classes=["normal"])
    with pytest.raises(ValueError, match="empty"):
        split_into_sites([], 2)
    unlabeled = [Record(image=f"{i}.png", patient_id=str(i)) for i in range(10)]
    with pytest.raises(ValueError, match="label"):
        split_into_sites(unlabeled, 2, mode="dirichlet")
    # unlabeled data still splits in the other modes
    assert_invariants(unlabeled, split_into_sites(unlabeled, 2, mode="quantity"))
    all_test = make_records(n_patients=5, pretest=5)
    with pytest.raises(ValueError, match="test set"):
        split_into_sites(all_test, 1)
    # pre-assigned test leaves 3 patients: 4 sites are too many
    with pytest.raises(ValueError, match="only 3 patients"):
        split_into_sites(make_records(n_patients=8, pretest=5), 4)


def test_images_without_patient_id_are_their_own_patient():
    records = [Record(image=f"x{i}.png", label=CLASSES[i % 2]) for i in range(40)]
    res = split_into_sites(records, 3, seed=2)
    assert_invariants(records, res)


# ----------------------------------------------------------------------- property-based

@st.composite
def record_sets(draw):
    n_patients = draw(st.integers(1, 25))
    labelled = draw(st.booleans())
    with_pretest = draw(st.booleans())
    records = []
    for p in range(n_patients):
        n_img = draw(st.integers(1, 3))
        label = draw(st.sampled_from(CLASSES)) if labelled else ""
        src = draw(st.sampled_from(["a", "b", "c"]))
        pid = draw(st.sampled_from([f"P{p}", ""])) if n_img == 1 else f"P{p}"
        pre = with_pretest and draw(st.integers(0, 4)) == 0
        for j in range(n_img):
            records.append(Record(image=f"p{p}_{j}.png", label=label, patient_id=pid, site=src,
                                  split="test" if pre and j == 0 else ""))
    return records


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    records=record_sets(),
    n_sites=st.integers(1, 6),
    mode=st.sampled_from(MODES),
    val_fraction=st.sampled_from([0.0, 0.2, 0.5, 0.9]),
    test_fraction=st.sampled_from([0.0, 0.15, 0.4]),
    seed=st.integers(0, 3),
)
def test_property_invariants(records, n_sites, mode, val_fraction, test_fraction, seed):
    patients = {patient_key(r) for r in records}
    pretest = {patient_key(r) for r in records if r.split == "test"}
    available = len(patients - pretest)
    has_labels = any(r.label for r in records)
    kwargs = dict(mode=mode, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, alpha=0.2)
    n = None if mode == "source" else n_sites
    expect_error = available == 0 or (mode != "source" and n_sites > available) or (mode == "dirichlet" and not has_labels)
    if expect_error:
        with pytest.raises(ValueError):
            split_into_sites(records, n, **kwargs)
        return
    result = split_into_sites(records, n, **kwargs)
    assert_invariants(records, result)
    if mode == "source":
        values = sorted({r.site for r in records if patient_key(r) not in pretest})
        assert sorted(result.source_values.values()) == values
    else:
        assert len(result.sites) == n_sites
    if pretest:
        assert {patient_key(r) for r in result.test} == pretest
    elif test_fraction == 0:
        assert result.test == []
    # deterministic
    again = split_into_sites(records, n, **kwargs)
    assert [(r.image, r.split) for r in again.all_records()] == [(r.image, r.split) for r in result.all_records()]


# ----------------------------------------------------------------------- writing a data root

def _make_source(tmp_path, n_patients=30):
    src = tmp_path / "src"
    records = make_records(n_patients=n_patients, seed=4)
    for r in records:
        r.mask = r.image.replace("img/", "masks/")
        for rel in (r.image, r.mask):
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes(b"x")
    # one absolute path must stay absolute
    abs_img = (tmp_path / "elsewhere" / "abs.png")
    abs_img.parent.mkdir()
    abs_img.write_bytes(b"x")
    records.append(Record(image=str(abs_img), label="normal", patient_id="ABS", site="hospital-0"))
    write_manifest(src / "manifest.csv", records)
    return src, records


def test_write_data_root_roundtrip(tmp_path):
    src, records = _make_source(tmp_path)
    result = split_into_sites(records, 3, mode="dirichlet", alpha=0.5, seed=1, classes=CLASSES)
    out = tmp_path / "out"
    rows = write_data_root(result, out, CLASSES, src)

    assert [p.name for p in site_dirs(out)] == ["site-1", "site-2", "site-3"]
    info = read_dataset_info(out)
    assert info["classes"] == CLASSES and info["split"]["mode"] == "dirichlet" and info["split"]["alpha"] == 0.5
    assert class_names(out) == CLASSES
    train, val, test = load_split(out, "train"), load_split(out, "val"), load_split(out, "test")
    assert len(train) + len(val) + len(test) == len(records)
    assert len(test) == len(result.test) and len(train) == sum(r.split == "train" for r in result.all_records())
    for folder, r in train + val + test:
        for cell in (r.image, r.mask):
            if cell:
                assert resolve(folder, cell).is_file(), (folder, cell)
    abs_rows = [r for _, r in train + val + test if r.patient_id == "ABS"]
    assert len(abs_rows) == 1 and Path(abs_rows[0].image).is_absolute()
    for name, recs in result.sites.items():
        written = read_manifest(out / name / "manifest.csv")
        assert [r.split for r in written] == [r.split for r in recs]
        assert [r.patient_id for r in written] == [r.patient_id for r in recs]

    # summary files agree with the manifests
    assert (out / SUMMARY_MD).is_file() and "site-1" in (out / SUMMARY_MD).read_text()
    with open(out / SUMMARY_CSV, newline="") as f:
        summary = {row["site"]: row for row in csv.DictReader(f)}
    assert summary.keys() == {"site-1", "site-2", "site-3", "test", "all"}
    for name in ("site-1", "site-2", "site-3"):
        written = read_manifest(out / name / "manifest.csv")
        row = summary[name]
        assert int(row["n_train"]) == sum(r.split == "train" for r in written)
        assert int(row["n_val"]) == sum(r.split == "val" for r in written)
        assert int(row["patients"]) == len({r.patient_id for r in written})
        for c in CLASSES:
            assert int(row[f"n_{c}"]) == sum(r.label == c for r in written)
        assert float(row["pos_rate"]) == pytest.approx(
            sum(r.label == "pneumonia" for r in written) / len(written), abs=1e-3
        )
    assert int(summary["test"]["n_test"]) == len(read_manifest(out / "test" / "manifest.csv"))
    assert int(summary["all"]["patients"]) == len({r.patient_id for r in records})
    assert rows[0]["site"] == "site-1"

    # re-splitting into fewer sites removes the stale site folders written before
    fewer = split_into_sites(records, 2, seed=1)
    write_data_root(fewer, out, CLASSES, src)
    assert [p.name for p in site_dirs(out)] == ["site-1", "site-2"]


def test_write_refuses_foreign_site_folders(tmp_path):
    src, records = _make_source(tmp_path, n_patients=10)
    out = tmp_path / "out"
    write_manifest(out / "my-hospital" / "manifest.csv", records[:1])
    with pytest.raises(ValueError, match="my-hospital"):
        write_data_root(split_into_sites(records, 2), out, CLASSES, src)


# ----------------------------------------------------------------------- CLI

def _cli(argv):
    parser = argparse.ArgumentParser(prog="cxrfl data")
    data_split.add_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_split(tmp_path, capsys):
    src, records = _make_source(tmp_path, n_patients=20)
    out = tmp_path / "root"
    rc = _cli(["split", "--manifest", str(src / "manifest.csv"), "--out", str(out), "--sites", "2", "--seed", "3"])
    captured = capsys.readouterr()
    assert rc == 0
    assert "site-2" in captured.out and "n_train" in captured.out
    assert (out / "site-2" / "manifest.csv").is_file() and (out / "test" / "manifest.csv").is_file()

    rc = _cli(["split", "--manifest", str(src / "manifest.csv"), "--out", str(out), "--sites", "0"])
    assert rc == 2 and "--sites" in capsys.readouterr().err
    rc = _cli(["split", "--manifest", str(tmp_path / "missing.csv"), "--out", str(out), "--sites", "2"])
    assert rc == 2 and "not found" in capsys.readouterr().err
    rc = _cli(["split", "--manifest", str(src / "manifest.csv"), "--out", str(out)])
    assert rc == 2 and "--sites" in capsys.readouterr().err


def test_cli_split_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        _cli(["split", "--help"])
    text = capsys.readouterr().out
    for opt in ("--manifest", "--out", "--sites", "--mode", "--alpha", "--quantity-sigma", "--source-column",
                "--val-fraction", "--test-fraction", "--seed"):
        assert opt in text
    assert "dirichlet" in text and "patient" in text
