"""Real-data importers: each native layout -> manifest.csv + dataset.json (+ masks)."""

from __future__ import annotations

import argparse
import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from conftest import write_dicom

from lightning_modules.data.importers import IMPORTERS, import_dataset
from lightning_modules.data.importers.kermany import import_kermany, kermany_patient_id
from lightning_modules.data.importers.v7 import rasterise_lungs
from lightning_modules.data.imageio import read_image, read_mask
from lightning_modules.data.manifest import ManifestError, read_manifest

SIZE = 32


def _png(path: Path, array: np.ndarray | None = None, size=(SIZE, SIZE)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if array is None:
        rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
        array = rng.integers(0, 255, size=(size[1], size[0]), dtype=np.uint8)
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def _jpeg(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((SIZE, SIZE), 128, np.uint8)).save(path, format="JPEG")
    return path


def _mask(path: Path, rows: slice, cols: slice, size=(SIZE, SIZE)) -> np.ndarray:
    arr = np.zeros((size[1], size[0]), np.uint8)
    arr[rows, cols] = 255
    _png(path, arr)
    return arr > 0


def _skip_logs(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "cxrfl.data"]


def _by_name(records):
    return {Path(r.image).name: r for r in records}


def _cli(argv: list[str]) -> int:
    from cxrfl.commands import data_import

    parser = argparse.ArgumentParser(prog="cxrfl data")
    sub = parser.add_subparsers(dest="cmd", required=True)
    data_import.add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


# ------------------------------------------------------------------------------------------ Kermany


@pytest.fixture
def kermany_src(tmp_path):
    root = tmp_path / "src" / "chest_xray"
    for rel in [
        "train/NORMAL/IM-0115-0001.jpeg",
        "train/NORMAL/IM-0115-0002.jpeg",
        "train/NORMAL/NORMAL2-IM-1427-0001.jpeg",
        "train/PNEUMONIA/person1_bacteria_1.jpeg",
        "train/PNEUMONIA/person1_virus_6.jpeg",
        "train/PNEUMONIA/person2_bacteria_3.jpeg",
        "val/NORMAL/NORMAL2-IM-1430-0001.jpeg",
        "test/NORMAL/IM-0001-0001.jpeg",
        "test/PNEUMONIA/person100_bacteria_475.jpeg",
    ]:
        _jpeg(root / rel)
    (root / "train/PNEUMONIA/person3_bacteria_9.jpeg").write_bytes(b"")  # bad item
    (root / "train/NORMAL/.DS_Store").write_bytes(b"junk")  # hidden: ignored silently
    return tmp_path / "src"


def test_kermany(kermany_src, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="cxrfl.data"):
        records = IMPORTERS["kermany"](kermany_src, out)
    assert len(records) == 9
    by = _by_name(records)
    assert by["IM-0115-0001.jpeg"].patient_id == by["IM-0115-0002.jpeg"].patient_id == "IM-0115"
    assert by["NORMAL2-IM-1427-0001.jpeg"].patient_id == "NORMAL2-IM-1427"
    assert by["person1_bacteria_1.jpeg"].patient_id == by["person1_virus_6.jpeg"].patient_id == "person1"
    assert by["person2_bacteria_3.jpeg"].patient_id == "person2"
    assert by["IM-0115-0001.jpeg"].label == "normal" and by["person2_bacteria_3.jpeg"].label == "pneumonia"
    # Only the official test split is assigned; the native split is kept in source_split.
    assert {n: r.split for n, r in by.items() if r.split} == {
        "IM-0001-0001.jpeg": "test", "person100_bacteria_475.jpeg": "test"}
    assert by["NORMAL2-IM-1430-0001.jpeg"].extra["source_split"] == "val"
    assert by["person1_virus_6.jpeg"].extra["source_split"] == "train"
    assert all(Path(r.image).is_absolute() and Path(r.image).is_file() for r in records)
    # The zero-byte image is skipped with one log line naming it.
    assert records.skipped and "person3_bacteria_9.jpeg" in records.skipped[0][0]
    assert any("person3_bacteria_9.jpeg" in m and "zero-byte" in m for m in _skip_logs(caplog))
    # What was written matches what was returned.
    written = read_manifest(out / "manifest.csv")
    assert [(r.image, r.label, r.patient_id, r.split) for r in written] == [
        (r.image, r.label, r.patient_id, r.split) for r in records]
    assert written[0].extra["source_split"] in ("train", "val", "test")
    info = json.loads((out / "dataset.json").read_text())
    assert info["classes"] == ["normal", "pneumonia"] and info["source"] == "kermany"
    assert info["task_hint"] == "classify"


def test_kermany_patient_id_rules():
    assert kermany_patient_id("person1_bacteria_1.jpeg") == "person1"
    assert kermany_patient_id("person1_virus_6.jpeg") == "person1"
    assert kermany_patient_id("IM-0115-0001.jpeg") == "IM-0115"
    assert kermany_patient_id("NORMAL2-IM-1427-0001.jpeg") == "NORMAL2-IM-1427"


def test_kermany_layout_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="empty"):
        import_kermany(tmp_path / "empty", tmp_path / "out")
    _jpeg(tmp_path / "odd" / "train" / "cats" / "a.jpeg")
    with pytest.raises(ManifestError, match=r"train.*NORMAL"):
        import_kermany(tmp_path / "odd", tmp_path / "out")
    with pytest.raises(ManifestError, match="not found"):
        import_kermany(tmp_path / "nowhere", tmp_path / "out")


def test_output_inside_source_is_refused(kermany_src):
    with pytest.raises(ManifestError, match="inside the source"):
        import_kermany(kermany_src, kermany_src / "out")
    assert not (kermany_src / "out").exists()


# --------------------------------------------------------------------------------------------- RSNA


def _air_body(air: int, body: int) -> np.ndarray:
    """Left half 'air', right half 'body' raw values."""
    arr = np.full((SIZE, SIZE), body, np.uint16)
    arr[:, : SIZE // 2] = air
    return arr


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def rsna_src(tmp_path):
    src = tmp_path / "rsna"
    src.mkdir()
    _write_csv(src / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"], [
        ["p-normal", "", "", "", "", 0],
        ["p-opacity", 264.0, 152.0, 213.0, 379.0, 1],
        ["p-opacity", 562.0, 152.0, 256.0, 453.0, 1],
        ["p-other", "", "", "", "", 0],
        ["p-missing", "", "", "", "", 0],
    ])
    _write_csv(src / "stage_2_detailed_class_info.csv", ["patientId", "class"], [
        ["p-normal", "Normal"],
        ["p-opacity", "Lung Opacity"],
        ["p-opacity", "Lung Opacity"],
        ["p-other", "No Lung Opacity / Not Normal"],
        ["p-missing", "Normal"],
    ])
    images = src / "stage_2_train_images"
    write_dicom(images / "p-normal.dcm", _air_body(100, 3000))
    write_dicom(images / "p-opacity.dcm", _air_body(100, 3000))
    # MONOCHROME1 stores air bright: the same anatomy has inverted raw values.
    write_dicom(images / "p-other.dcm", _air_body(3000, 100), photometric="MONOCHROME1")
    return src


def test_rsna_three_classes(rsna_src, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="cxrfl.data"):
        records = import_dataset("rsna", rsna_src, out, classes="three")
    by = {r.patient_id: r for r in records}
    assert set(by) == {"p-normal", "p-opacity", "p-other"}  # one record per patient
    assert by["p-normal"].label == "Normal"
    assert by["p-opacity"].label == "Lung Opacity"
    assert by["p-other"].label == "No Lung Opacity / Not Normal"
    assert by["p-opacity"].extra["boxes"] == "264,152,213,379;562,152,256,453"
    assert by["p-normal"].extra["boxes"] == ""
    assert any("p-missing.dcm" in m and "does not exist" in m for m in _skip_logs(caplog))
    info = json.loads((out / "dataset.json").read_text())
    assert info["classes"] == ["Normal", "No Lung Opacity / Not Normal", "Lung Opacity"]
    assert info["source"] == "rsna"
    written = {r.patient_id: r for r in read_manifest(out / "manifest.csv")}
    assert written["p-opacity"].extra["boxes"] == "264,152,213,379;562,152,256,453"
    assert written["p-other"].label == "No Lung Opacity / Not Normal"


def test_rsna_binary(rsna_src, tmp_path):
    records = import_dataset("rsna", rsna_src, tmp_path / "out", classes="binary")
    labels = {r.patient_id: r.label for r in records}
    assert labels == {"p-normal": "normal", "p-opacity": "pneumonia", "p-other": "normal"}
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["classes"] == ["normal", "pneumonia"]


def test_rsna_monochrome1_is_inverted_so_air_stays_dark(rsna_src):
    images = rsna_src / "stage_2_train_images"
    mono2 = read_image(images / "p-normal.dcm")
    mono1 = read_image(images / "p-other.dcm")
    for arr in (mono1, mono2):
        assert arr[:, : SIZE // 2].max() < 0.05  # air dark
        assert arr[:, SIZE // 2 :].min() > 0.95  # body bright
    np.testing.assert_allclose(mono1, mono2, atol=1e-6)


def test_rsna_disagreeing_labels(rsna_src, tmp_path):
    _write_csv(rsna_src / "stage_2_detailed_class_info.csv", ["patientId", "class"], [
        ["p-normal", "Normal"], ["p-opacity", "Normal"], ["p-other", "Normal"], ["p-missing", "Normal"]])
    with pytest.raises(ManifestError) as err:
        import_dataset("rsna", rsna_src, tmp_path / "out", classes="three")
    msg = str(err.value)
    assert "p-opacity" in msg and "stage_2_train_labels.csv" in msg and "stage_2_detailed_class_info.csv" in msg
    assert not (tmp_path / "out" / "manifest.csv").exists()


def test_rsna_structural_errors(rsna_src, tmp_path):
    _write_csv(rsna_src / "stage_2_train_labels.csv", ["patientId", "x", "y", "Target"], [["p-normal", "", "", 0]])
    with pytest.raises(ManifestError, match=r"stage_2_train_labels\.csv: missing column.*'width'.*columns found"):
        import_dataset("rsna", rsna_src, tmp_path / "out")
    (rsna_src / "stage_2_train_labels.csv").unlink()
    with pytest.raises(ManifestError, match="rsna"):
        import_dataset("rsna", rsna_src, tmp_path / "out")
    with pytest.raises(ManifestError, match="binary.*three"):
        import_dataset("rsna", rsna_src, tmp_path / "out", classes="four")


# ---------------------------------------------------------------------------------------- Montgomery


def test_montgomery(tmp_path, caplog):
    src = tmp_path / "MontgomerySet"
    for name in ("MCUCXR_0001_0.png", "MCUCXR_0002_1.png", "MCUCXR_0003_0.png"):
        _png(src / "CXR_png" / name)
    left = _mask(src / "ManualMask/leftMask/MCUCXR_0001_0.png", slice(4, 28), slice(2, 12))
    right = _mask(src / "ManualMask/rightMask/MCUCXR_0001_0.png", slice(6, 30), slice(18, 30))
    _mask(src / "ManualMask/leftMask/MCUCXR_0002_1.png", slice(4, 28), slice(2, 14))
    _mask(src / "ManualMask/rightMask/MCUCXR_0002_1.png", slice(4, 28), slice(10, 30))  # overlaps left
    _mask(src / "ManualMask/leftMask/MCUCXR_0003_0.png", slice(4, 28), slice(2, 12))  # no right mask
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="cxrfl.data"):
        records = import_dataset("montgomery", src, out)
    by = _by_name(records)
    assert set(by) == {"MCUCXR_0001_0.png", "MCUCXR_0002_1.png"}
    assert by["MCUCXR_0001_0.png"].label == "normal" and by["MCUCXR_0002_1.png"].label == "tuberculosis"
    assert by["MCUCXR_0001_0.png"].patient_id == "MCUCXR_0001"
    mask_path = Path(by["MCUCXR_0001_0.png"].mask)
    assert mask_path.parent == out / "masks" and mask_path.is_file()
    np.testing.assert_array_equal(read_mask(mask_path).astype(bool), left | right)
    assert read_mask(by["MCUCXR_0002_1.png"].mask)[4:28, 2:30].all()
    assert any("MCUCXR_0003_0.png" in m and "rightMask" in m for m in _skip_logs(caplog))
    # The source tree is untouched.
    assert sorted(p.name for p in (src / "ManualMask" / "rightMask").iterdir()) == [
        "MCUCXR_0001_0.png", "MCUCXR_0002_1.png"]
    assert json.loads((out / "dataset.json").read_text())["classes"] == ["normal", "tuberculosis"]


def test_montgomery_missing_mask_folder(tmp_path):
    _png(tmp_path / "src" / "CXR_png" / "MCUCXR_0001_0.png")
    with pytest.raises(ManifestError, match="leftMask"):
        import_dataset("montgomery", tmp_path / "src", tmp_path / "out")


# ------------------------------------------------------------------------------------------ Shenzhen


def test_shenzhen(tmp_path, caplog):
    src = tmp_path / "shenzhen"
    for name in ("CHNCXR_0001_0.png", "CHNCXR_0002_1.png", "CHNCXR_0003_0.png", "CHNCXR_bad.png"):
        _png(src / "CXR_png" / name)
    _mask(src / "mask" / "CHNCXR_0001_0_mask.png", slice(2, 20), slice(2, 20))
    _mask(src / "mask" / "CHNCXR_0002_1.png", slice(2, 20), slice(2, 20))
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="cxrfl.data"):
        records = import_dataset("shenzhen", src, out)
    by = _by_name(records)
    assert set(by) == {"CHNCXR_0001_0.png", "CHNCXR_0002_1.png", "CHNCXR_0003_0.png"}
    assert by["CHNCXR_0001_0.png"].mask.endswith("CHNCXR_0001_0_mask.png")
    assert by["CHNCXR_0002_1.png"].mask == str(src / "mask" / "CHNCXR_0002_1.png")
    assert by["CHNCXR_0003_0.png"].mask == ""
    assert [r.label for r in records] == ["normal", "tuberculosis", "normal"]
    assert by["CHNCXR_0002_1.png"].patient_id == "CHNCXR_0002"
    logs = _skip_logs(caplog)
    assert sum("no usable mask" in m for m in logs) == 1
    assert any("1 of 3" in m for m in logs)
    assert any("CHNCXR_bad.png" in m and "_0" in m for m in logs)
    assert not (out / "masks").exists()  # existing masks are referenced in place, not copied


# ------------------------------------------------------------------------------------------------ V7


def _darwin(path: Path, filename: str, annotations: list, width=SIZE, height=SIZE, **image_extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = {"filename": filename, "width": width, "height": height, **image_extra}
    path.write_text(json.dumps({"dataset": "covid-19-xray", "image": image, "annotations": annotations}))
    return path


def _pts(*xy):
    return [{"x": x, "y": y} for x, y in xy]


@pytest.fixture
def v7_src(tmp_path):
    src = tmp_path / "v7"
    _png(src / "images" / "a.png")
    _png(src / "images" / "b.jpg")
    _png(src / "images" / "c.png")
    _darwin(src / "annotations" / "a.json", "a.png", [
        {"name": "Left Lung", "polygon": {"path": _pts((2, 2), (12, 2), (12, 28), (2, 28))}},
        {"name": "Right Lung", "complex_polygon": {"path": [
            _pts((18, 2), (28, 2), (28, 12), (18, 12)), _pts((18, 18), (28, 18), (28, 28), (18, 28))]}},
        {"name": "COVID-19", "tag": {}},
        {"name": "Pneumonia", "tag": {}},
        {"name": "Heart", "polygon": {"path": _pts((13, 13), (17, 13), (17, 17))}},
    ], original_filename="patient7_scan.png")
    _darwin(src / "annotations" / "b.json", "b.jpg", [
        {"name": "lungs", "polygon": {"path": _pts((4, 4), (20, 4), (20, 20), (4, 20))}},
        {"name": "No Pneumonia (healthy)", "tag": {}},
    ], metadata={"patient_id": "P42"})
    _darwin(src / "annotations" / "c.json", "c.png", [{"name": "COVID-19", "tag": {}}],
            original_filename="patient7_followup.png", metadata={"patientId": "patient7"})
    _darwin(src / "annotations" / "gone.json", "gone.png", [{"name": "COVID-19", "tag": {}}])
    return src


def test_v7(v7_src, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="cxrfl.data"):
        records = import_dataset("v7", v7_src, out)
    by = _by_name(records)
    assert set(by) == {"a.png", "b.jpg", "c.png"}
    assert by["a.png"].label == "covid-19"  # first tag, lower-cased
    assert by["b.jpg"].label == "no pneumonia (healthy)"
    assert by["a.png"].patient_id == "patient7_scan"
    assert by["b.jpg"].patient_id == "P42"
    assert by["c.png"].patient_id == "patient7"
    assert by["c.png"].mask == ""  # no lung polygon
    assert any("gone.png" in m and "gone.json" in m for m in _skip_logs(caplog))

    m = read_mask(by["a.png"].mask)
    assert m.shape == (SIZE, SIZE)
    assert m[3:28, 3:12].all() and m[3:12, 19:28].all() and m[19:28, 19:28].all()  # interiors
    assert not m[:, 14:17].any()  # between the lungs: the 'Heart' polygon is not a lung
    assert not m[14:17, 19:28].any()  # gap between the two rings of the complex polygon
    assert not m[30:, :].any() and not m[:, 30:].any()  # outside
    mb = read_mask(by["b.jpg"].mask)
    assert mb[5:20, 5:20].all() and mb.sum() == 17 * 17  # boundary-inclusive 4..20 square
    info = json.loads((out / "dataset.json").read_text())
    assert info["classes"] == ["covid-19", "no pneumonia (healthy)"]
    assert info["task_hint"] == "segment"


def test_v7_rasterise_triangle():
    ann = [{"name": "LUNG", "polygon": {"path": _pts((0, 0), (31, 0), (0, 31))}}]
    m = rasterise_lungs(ann, SIZE, SIZE)
    assert m[2, 2] == 1 and m[28, 28] == 0 and m[0, 31] == 1 and m[31, 31] == 0


def test_v7_bad_json(v7_src, tmp_path):
    (v7_src / "annotations" / "broken.json").write_text("{not json")
    with pytest.raises(ManifestError, match=r"broken\.json: unparsable JSON"):
        import_dataset("v7", v7_src, tmp_path / "out")
    (v7_src / "annotations" / "broken.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(ManifestError, match=r"broken\.json"):
        import_dataset("v7", v7_src, tmp_path / "out")


# ----------------------------------------------------------------------------------------------- CSV


@pytest.fixture
def csv_src(tmp_path):
    src = tmp_path / "mine"
    for name in ("a.png", "b.png", "c.png"):
        _png(src / "img" / name)
    _mask(src / "msk" / "a.png", slice(0, 10), slice(0, 10))
    _write_csv(src / "list.csv", ["path", "finding", "pid", "fold", "lung"], [
        ["img/a.png", "covid", "P1", "training", "msk/a.png"],
        ["img/b.png", "normal", "P1", "test", ""],
        ["img/c.png", "normal", "", "", ""],
        ["img/missing.png", "normal", "P3", "", ""],
    ])
    return src


def test_generic_csv(csv_src, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="cxrfl.data"):
        records = import_dataset("csv", csv_src / "list.csv", out, image_col="path", label_col="finding",
                                 mask_col="lung", patient_col="pid", split_col="fold")
    by = _by_name(records)
    assert set(by) == {"a.png", "b.png", "c.png"}
    assert by["a.png"].patient_id == by["b.png"].patient_id == "P1"
    assert by["c.png"].patient_id == "c"  # empty cell -> image stem
    assert (by["a.png"].split, by["b.png"].split, by["c.png"].split) == ("train", "test", "")
    assert by["a.png"].mask == str(csv_src / "msk" / "a.png") and by["b.png"].mask == ""
    assert any("missing.png" in m and "list.csv:5" in m for m in _skip_logs(caplog))
    info = json.loads((out / "dataset.json").read_text())
    assert info["classes"] == ["covid", "normal"] and info["task_hint"] == "segment"
    assert [r.image for r in read_manifest(out / "manifest.csv")] == [r.image for r in records]


def test_generic_csv_root_and_classes(csv_src, tmp_path):
    moved = tmp_path / "list.csv"
    moved.write_text((csv_src / "list.csv").read_text())
    records = import_dataset("csv", moved, tmp_path / "out", image_col="path", label_col="finding",
                             root=csv_src, classes="normal,covid")
    assert len(records) == 3
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["classes"] == ["normal", "covid"]
    with pytest.raises(ManifestError, match="'covid' is not one of"):
        import_dataset("csv", moved, tmp_path / "out2", image_col="path", label_col="finding",
                       root=csv_src, classes=["normal"])


def test_generic_csv_errors(csv_src, tmp_path):
    with pytest.raises(ManifestError, match=r"list\.csv: missing column\(s\) 'image'.*columns found: 'path'"):
        import_dataset("csv", csv_src / "list.csv", tmp_path / "out", label_col="finding")
    with pytest.raises(ManifestError, match=r"list\.csv: missing column\(s\) 'diagnosis'"):
        import_dataset("csv", csv_src / "list.csv", tmp_path / "out", image_col="path", label_col="diagnosis")
    with pytest.raises(ManifestError, match="all 4 item"):  # wrong root: nothing resolves
        import_dataset("csv", csv_src / "list.csv", tmp_path / "out", image_col="path", label_col="finding",
                       root=tmp_path)
    with pytest.raises(ManifestError, match="do not apply"):
        import_dataset("montgomery", csv_src, tmp_path / "out", image_col="path")
    with pytest.raises(ManifestError, match="unknown data set format"):
        import_dataset("nih", csv_src, tmp_path / "out")


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_import(kermany_src, tmp_path, capsys):
    out = tmp_path / "imported"
    assert _cli(["import", "kermany", str(kermany_src), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert len(read_manifest(out / "manifest.csv")) == 9
    assert "normal: 5" in stdout and "pneumonia: 4" in stdout and "skipped: 1" in stdout
    assert f"next: cxrfl data split --manifest {out}/manifest.csv --out DATA --sites N" in stdout


def test_cli_csv_options(csv_src, tmp_path, capsys):
    out = tmp_path / "o"
    rc = _cli(["import", "csv", str(csv_src / "list.csv"), "--out", str(out), "--image-col", "path",
               "--label-col", "finding", "--mask-col", "lung", "--patient-col", "pid", "--split-col", "fold",
               "--classes", "normal,covid"])
    assert rc == 0
    assert "masks: 1 of 3" in capsys.readouterr().out
    assert {r.patient_id for r in read_manifest(out / "manifest.csv")} == {"P1", "c"}


def test_cli_error_exit_code(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    assert _cli(["import", "montgomery", str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "CXR_png" in err
    assert not (tmp_path / "out").exists()


def test_cli_help_lists_formats_and_options(capsys):
    with pytest.raises(SystemExit) as exc:
        _cli(["import", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for fmt in IMPORTERS:
        assert f"  {fmt} " in text
    for opt in ("--out", "--classes", "--image-col", "--label-col", "--mask-col", "--patient-col",
                "--split-col", "--root"):
        assert opt in text
    for layout_bit in ("{train,val,test}/{NORMAL,PNEUMONIA}", "stage_2_train_labels.csv", "ManualMask",
                       "CHNCXR_0001_0_mask.png", "annotations/*.json"):
        assert layout_bit in text
