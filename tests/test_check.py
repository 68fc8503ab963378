"""`check_data` / `cxrfl data check` on a small data root with a corpus of broken files."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrfl.commands import data_check
from lightning_modules.data.check import ERROR, WARNING, check_data, format_report
from lightning_modules.data.imageio import write_png
from lightning_modules.data.manifest import Record, read_manifest, write_manifest
from lightning_modules.data.row_checks import usable_records

CLASSES = ["normal", "pneumonia"]
RNG = np.random.default_rng(0)


def _image(path: Path, size=32):
    write_png(path, RNG.random((size, size)))
    return path


def _mask(path: Path, size=32, empty=False):
    m = np.zeros((size, size), dtype=np.uint8)
    if not empty:
        m[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    write_png(path, m, mask=True)
    return path


def _rec(name, label, patient, split, mask=None):
    return Record(image=f"../images/{name}", mask=f"../images/{mask}" if mask else "", label=label,
                  patient_id=patient, split=split)


@pytest.fixture()
def root(tmp_path):
    """A valid root (2 sites + test) whose site-1 also lists a corpus of broken items (warnings only)."""
    root = tmp_path / "root"
    img = root / "images"
    (root / "dataset.json").parent.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"classes": CLASSES}))
    valid = {}
    for pid in ("A1", "A2", "A3", "B1", "B2", "B3", "T1", "T2"):
        valid[pid] = (_image(img / f"{pid}.png"), _mask(img / f"{pid}_mask.png"))
    # a 16-bit grayscale and an RGBA PNG are valid images
    Image.fromarray((RNG.random((32, 32)) * 65535).astype(np.uint16)).save(img / "B4_16bit.png")
    Image.fromarray((RNG.random((32, 32, 4)) * 255).astype(np.uint8), mode="RGBA").save(img / "B5_rgba.png")
    valid["B4"] = (img / "B4_16bit.png", None)
    valid["B5"] = (img / "B5_rgba.png", None)

    # broken corpus
    broken = {}
    (img / "zero.png").write_bytes(b"")
    broken["zero"] = img / "zero.png"
    good = (img / "A1.png").read_bytes()
    (img / "trunc.png").write_bytes(good[: len(good) // 2])
    broken["trunc_png"] = img / "trunc.png"
    Image.fromarray((RNG.random((32, 32)) * 255).astype(np.uint8)).save(img / "full.jpg", quality=95)
    jpg = (img / "full.jpg").read_bytes()
    (img / "trunc.jpg").write_bytes(jpg[: len(jpg) // 2])
    (img / "full.jpg").unlink()
    broken["trunc_jpg"] = img / "trunc.jpg"
    (img / "text.png").write_text("this is not a PNG\n")
    broken["text"] = img / "text.png"
    broken["missing"] = img / "missing.png"
    _image(img / "C5.png")
    _mask(img / "C5_small_mask.png", size=16)
    broken["mask_size"] = img / "C5_small_mask.png"
    _image(img / "C6.png")
    _mask(img / "C6_empty_mask.png", empty=True)
    broken["mask_empty"] = img / "C6_empty_mask.png"
    _image(img / "C7.png")
    broken["label"] = img / "C7.png"
    broken["missing_mask"] = img / "C8_missing_mask.png"
    _image(img / "C8.png")

    site1 = [
        _rec("A1.png", "normal", "A1", "train", "A1_mask.png"),
        _rec("A2.png", "pneumonia", "A2", "train", "A2_mask.png"),
        _rec("A3.png", "normal", "A3", "val", "A3_mask.png"),
        _rec("zero.png", "normal", "C1", "train"),
        _rec("trunc.png", "normal", "C2", "train"),
        _rec("trunc.jpg", "pneumonia", "C3", "train"),
        _rec("text.png", "normal", "C4", "train"),
        _rec("missing.png", "normal", "C9", "train"),
        _rec("C5.png", "normal", "C5", "train", "C5_small_mask.png"),
        _rec("C6.png", "pneumonia", "C6", "val", "C6_empty_mask.png"),
        _rec("C7.png", "covid", "C7", "train"),
        _rec("C8.png", "normal", "C8", "train", "C8_missing_mask.png"),
        _rec("A2.png", "pneumonia", "A2", "train", "A2_mask.png"),  # duplicate row
    ]
    site2 = [
        _rec("B1.png", "normal", "B1", "train", "B1_mask.png"),
        _rec("B2.png", "pneumonia", "B2", "train", "B2_mask.png"),
        _rec("B3.png", "pneumonia", "B3", "val", "B3_mask.png"),
        _rec("B4_16bit.png", "normal", "B4", "train"),
        _rec("B5_rgba.png", "pneumonia", "B5", "train"),
    ]
    test = [_rec("T1.png", "normal", "T1", "test", "T1_mask.png"), _rec("T2.png", "pneumonia", "T2", "test", "T2_mask.png")]
    write_manifest(root / "site-1" / "manifest.csv", site1)
    write_manifest(root / "site-2" / "manifest.csv", site2)
    write_manifest(root / "test" / "manifest.csv", test)
    return root, valid, broken


def _by_file(report):
    out = {}
    for p in report.problems:
        out.setdefault(Path(p.file), []).append(p)
    return out


def _cli(argv):
    parser = argparse.ArgumentParser(prog="cxrfl data")
    data_check.add_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(argv)
    return args.func(args)


EXPECTED = {
    "zero": "zero-byte",
    "trunc_png": "truncated",
    "trunc_jpg": "truncated",
    "text": "not an image",
    "missing": "does not exist",
    "mask_size": "size",
    "mask_empty": "empty",
    "label": "unknown label",
    "missing_mask": "does not exist",
}


def test_each_broken_item_reported_once_with_reason(root):
    root, valid, broken = root
    report = check_data(root)
    by_file = _by_file(report)
    for key, word in EXPECTED.items():
        found = by_file.get(broken[key], [])
        assert len(found) == 1, (key, report.problems)
        assert word in found[0].reason.lower(), (key, found[0].reason)
        assert found[0].severity == WARNING
    # mask problems name the mask, not the image
    assert "mask" in by_file[broken["mask_size"]][0].reason and "16x16" in by_file[broken["mask_size"]][0].reason
    # the duplicate row is reported on the repeated image
    dup = [p for p in by_file.get(valid["A2"][0], [])]
    assert len(dup) == 1 and "duplicate" in dup[0].reason
    # nothing else is reported: valid files (16-bit, RGBA included) are clean
    reported = set(by_file)
    assert reported == {broken[k] for k in EXPECTED} | {valid["A2"][0]}
    for pid, (image, mask) in valid.items():
        if pid != "A2":
            assert image not in reported and mask not in reported
    # warnings only -> usable
    assert report.usable and not report.errors
    assert len(report.warnings) == len(EXPECTED) + 1
    # usable counts: site-1 has 3 good rows of 13 (A1, A2 train; A3 val)
    assert report.counts["site-1"] == {"train": (2, 11), "val": (1, 2)}
    assert report.counts["site-2"] == {"train": (4, 4), "val": (1, 1)}
    assert report.counts["test"] == {"test": (2, 2)}


def test_format_report_and_cli_exit_codes(root, capsys):
    root, valid, broken = root
    text = format_report(check_data(root))
    lines = text.splitlines()
    assert any(line.startswith(f"WARNING {broken['zero']}: zero-byte") for line in lines)
    assert lines[-1].startswith("summary:") and "site-1 train 2/11 val 1/2" in lines[-1] and "usable" in lines[-1]
    capsys.readouterr()
    assert _cli(["check", str(root)]) == 0
    out = capsys.readouterr().out
    assert "WARNING" in out and "ERROR" not in out
    assert _cli(["check", str(root), "--strict"]) == 1


def test_clean_root_passes_strict(root, capsys):
    root, valid, broken = root
    # keep only the valid rows of site-1
    rows = read_manifest(root / "site-1" / "manifest.csv")[:3]
    write_manifest(root / "site-1" / "manifest.csv", rows)
    report = check_data(root)
    assert report.problems == [] and report.usable
    assert _cli(["check", str(root), "--strict"]) == 0
    assert "0 errors, 0 warnings" in capsys.readouterr().out


def test_patient_leakage_is_an_error(root, capsys):
    root, valid, broken = root
    site2 = read_manifest(root / "site-2" / "manifest.csv")
    site2.append(_rec("A1.png", "normal", "A1", "train"))  # same patient in site-1 and site-2
    write_manifest(root / "site-2" / "manifest.csv", site2)
    test = read_manifest(root / "test" / "manifest.csv")
    test.append(Record(image="../images/B3.png", label="pneumonia", patient_id="B3", split="test"))  # site + test
    write_manifest(root / "test" / "manifest.csv", test)
    report = check_data(root)
    assert not report.usable
    leaks = [p for p in report.errors if "leakage" in p.reason]
    assert len(leaks) == 2
    a1 = next(p for p in leaks if "'A1'" in p.reason)
    assert "site-1" in a1.reason and "site-2" in a1.reason and "patient" in a1.reason
    assert Path(a1.file) == root / "site-2" / "manifest.csv"
    b3 = next(p for p in leaks if "'B3'" in p.reason)
    assert "site-2" in b3.reason and "test" in b3.reason
    assert Path(b3.file) == root / "test" / "manifest.csv"
    assert _cli(["check", str(root)]) == 1
    assert "ERROR" in capsys.readouterr().out


def test_train_and_val_of_one_patient_is_leakage(root):
    root, valid, broken = root
    rows = read_manifest(root / "site-2" / "manifest.csv")
    rows.append(Record(image="../images/B4_16bit.png", label="normal", patient_id="B1", split="val"))
    write_manifest(root / "site-2" / "manifest.csv", rows)
    report = check_data(root)
    assert [p for p in report.errors if "'B1'" in p.reason and "two splits" in p.reason]
    assert not report.usable


def test_errors_that_make_the_root_unusable(root):
    root, valid, broken = root
    # unreadable manifest
    (root / "site-2" / "manifest.csv").write_text("path,label\nx.png,normal\n")
    report = check_data(root)
    err = [p for p in report.errors if Path(p.file) == root / "site-2" / "manifest.csv"]
    assert err and "image" in err[0].reason
    assert not report.usable

    # a site with no usable images
    write_manifest(root / "site-2" / "manifest.csv", [_rec("zero.png", "normal", "Z", "train")])
    report = check_data(root)
    assert any("no usable images in site-2" in p.reason for p in report.errors)

    # missing test folder and a site listed in dataset.json but absent
    write_manifest(root / "site-2" / "manifest.csv", [_rec("B1.png", "normal", "B1", "train")])
    shutil.rmtree(root / "test")
    (root / "dataset.json").write_text(json.dumps({"classes": CLASSES, "sites": ["site-1", "site-2", "site-3"]}))
    report = check_data(root)
    reasons = {Path(p.file).relative_to(root).as_posix(): p.reason for p in report.errors}
    assert "test set missing" in reasons["test/manifest.csv"]
    assert "site folder missing" in reasons["site-3"]


def test_fewer_than_two_training_classes_is_an_error(tmp_path):
    root = tmp_path / "r"
    img = root / "images"
    for name in ("a", "b", "c"):
        _image(img / f"{name}.png")
    write_manifest(root / "site-1" / "manifest.csv", [_rec("a.png", "normal", "a", "train"), _rec("b.png", "pneumonia", "b", "val")])
    write_manifest(root / "test" / "manifest.csv", [_rec("c.png", "pneumonia", "c", "test")])
    report = check_data(root)
    assert [p for p in report.errors if "at least 2" in p.reason]
    # unlabeled (segmentation-only) data has no class requirement
    write_manifest(root / "site-1" / "manifest.csv", [_rec("a.png", "", "a", "train"), _rec("b.png", "", "b", "val")])
    write_manifest(root / "test" / "manifest.csv", [_rec("c.png", "", "c", "test")])
    assert check_data(root).usable


def test_single_manifest_and_folder(root):
    root, valid, broken = root
    for target in (root / "site-1" / "manifest.csv", root / "site-1"):
        report = check_data(target)
        assert report.usable
        files = {Path(p.file) for p in report.problems}
        assert broken["zero"] in files and broken["label"] in files  # classes come from ../dataset.json
    assert not check_data(root / "nowhere").usable


def test_usable_records_for_the_loader(root):
    root, valid, broken = root
    folder = root / "site-1"
    records = read_manifest(folder / "manifest.csv")
    ok, problems = usable_records(folder, records, CLASSES)
    assert [r.patient_id for r in ok] == ["A1", "A2", "A3"]
    assert len(problems) == len(EXPECTED) + 1 and all(p.severity == WARNING for p in problems)
    # without classes, the unknown label is not a problem
    ok, _ = usable_records(folder, records)
    assert "C7" in [r.patient_id for r in ok]
    # require_mask: rows without a mask are skipped
    ok, problems = usable_records(root / "site-2", read_manifest(root / "site-2" / "manifest.csv"), CLASSES, require_mask=True)
    assert [r.patient_id for r in ok] == ["B1", "B2", "B3"]
    assert sum("no mask" in p.reason for p in problems) == 2
    # lazy mode: only existence checks, so the truncated files pass and missing ones do not
    ok, problems = usable_records(folder, records, CLASSES, decode=False)
    assert {Path(p.file) for p in problems} >= {broken["zero"], broken["missing"], broken["missing_mask"]}
    assert broken["trunc_png"] not in {Path(p.file) for p in problems}


def test_many_files_are_fast(tmp_path):
    import time

    root = tmp_path / "big"
    rows = []
    for i in range(400):
        _image(root / "site-1" / "img" / f"{i}.png")
        rows.append(Record(image=f"img/{i}.png", label=CLASSES[i % 2], patient_id=str(i), split="train"))
    write_manifest(root / "site-1" / "manifest.csv", rows[:380])
    write_manifest(root / "test" / "manifest.csv", [Record(image=f"../site-1/{r.image}", label=r.label, patient_id=r.patient_id, split="test") for r in rows[380:]])
    t0 = time.perf_counter()
    report = check_data(root)
    assert time.perf_counter() - t0 < 10
    assert report.usable and report.counts["site-1"] == {"train": (380, 380)}


def test_help_explains_options(capsys):
    with pytest.raises(SystemExit):
        _cli(["check", "--help"])
    text = capsys.readouterr().out
    for opt in ("--strict", "--require-mask", "--workers", "DIR"):
        assert opt in text
    assert ERROR.upper() in text and WARNING.upper() in text
