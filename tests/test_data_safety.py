"""Hostile or careless input files (issue 14, items 5, 10, 13, 14): size bombs are refused from their
header, decode memory is bounded, leaked data is an error and training refuses it, written data
keeps the umask's permissions, and `data import` gives the verdict `data check` gives, one line each."""

from __future__ import annotations

import argparse
import io
import json
import os
import stat
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_dicom
from PIL import Image

from lightning_modules.data.atomic import atomic_torch_save, write_json
from cxrfl.fl.config import FLConfig
from cxrfl.options import add_config_options
from lightning_modules.config import TrainConfig
from lightning_modules.data import row_checks
from lightning_modules.data import imageio
from lightning_modules.data.importers import import_dataset
from lightning_modules.data.check import ERROR, check_data, refuse_leakage
from lightning_modules.data.imageio import MAX_PIXELS, DecodeBudget, ImageReadError, read_header, read_image, write_png
from lightning_modules.data.manifest import ManifestError, Record, read_manifest, write_manifest
from lightning_modules.data.phantom import generate_dataset
from lightning_modules.data.row_checks import usable_records

REPO = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(14)


def _png(path: Path, size: int = 32) -> Path:
    write_png(path, RNG.random((size, size)))
    return path


def _mask(path: Path, size: int = 32, empty: bool = False) -> Path:
    m = np.zeros((size, size), np.uint8)
    if not empty:
        m[4:20, 4:20] = 1
    write_png(path, m, mask=True)
    return path


def _dicom_declaring(path: Path, rows: int, cols: int, frames: int = 1, samples: int = 1, j2k: bool = False) -> Path:
    """A small DICOM whose header declares rows x cols (x frames x samples) pixels it does not hold."""
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    write_dicom(path, np.zeros((8, 8), np.uint16))
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = rows, cols
    if frames > 1:
        ds.NumberOfFrames = frames
    if samples > 1:
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = samples, "RGB", 0
    if j2k:  # a 64x64 JPEG 2000 stream: the decoder allocates the declared 8100x8100 first
        buf = io.BytesIO()
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(buf, format="JPEG2000", irreversible=False)
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
    ds.save_as(path)
    return path


def _undecodable_dicom(path: Path) -> Path:
    """A JPEG-LS DICOM: no installed plugin decodes it (pydicom lists the plugins on several lines)."""
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless

    write_dicom(path, np.zeros((32, 32), np.uint16))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8 not a JPEG-LS stream " * 4])
    ds["PixelData"].VR = "OB"
    ds.save_as(path)
    return path


def _huge_png(path: Path, width: int = 12000, height: int = 12000) -> Path:
    """A valid 1-bit black PNG of width x height in ~20 KB (its rows compress to almost nothing)."""
    row = b"\0" * (1 + (width + 7) // 8)
    z = zlib.compressobj(9)
    data = b"".join(z.compress(row) for _ in range(height)) + z.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


# ------------------------------------------------------------------------- item 5: size bombs


def test_a_1kb_dicom_declaring_8100x8100_is_refused_from_its_header(tmp_path):
    bomb = _dicom_declaring(tmp_path / "bomb.dcm", 8100, 8100, j2k=True)
    assert bomb.stat().st_size < 2048
    tracemalloc.start()
    try:
        start = time.perf_counter()
        with pytest.raises(ImageReadError) as err:
            read_image(bomb)
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seconds < 1.0
    assert peak < 5_000_000, f"{peak / 1e6:.0f} MB allocated for a refused file"  # decoding allocates 66 MB+
    reason = err.value.reason
    assert "too large" in reason and "8100x8100" in reason and str(MAX_PIXELS) in reason
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("rows, cols, frames, samples", [(4000, 4000, 5, 1), (5000, 5000, 1, 3)])
def test_frames_and_samples_count_towards_the_limit(tmp_path, rows, cols, frames, samples):
    path = _dicom_declaring(tmp_path / "multi.dcm", rows, cols, frames, samples)
    with pytest.raises(ImageReadError, match=rf"too large .*{rows * cols * frames * samples} pixels"):
        read_header(path)
    with pytest.raises(ImageReadError, match="too large"):
        read_image(path)


def test_data_check_of_a_folder_of_bombs_decodes_none(tmp_path):
    rows = []
    for i in range(12):
        _dicom_declaring(tmp_path / "site-1" / f"b{i}.dcm", 8100, 8100, j2k=True)
        rows.append(Record(image=f"b{i}.dcm", label="normal", patient_id=f"p{i}", split="train"))
    write_manifest(tmp_path / "site-1" / "manifest.csv", rows)
    tracemalloc.start()
    try:
        report = check_data(tmp_path / "site-1", workers=4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20_000_000
    assert len(report.warnings) == 12 and all("too large" in p.reason for p in report.warnings)


def _count_concurrent_decodes(monkeypatch) -> dict:
    state = {"now": 0, "most": 0}
    lock = threading.Lock()
    real = row_checks.read_image

    def counting(path):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        try:
            time.sleep(0.02)
            return real(path)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(row_checks, "read_image", counting)
    return state


@pytest.mark.parametrize("rows_that_fit", [1, 2])
def test_decode_threads_respect_the_memory_budget(tmp_path, monkeypatch, rows_that_fit):
    records = [Record(image=_png(tmp_path / f"{i}.png").name, label="normal", patient_id=str(i)) for i in range(16)]
    row_cost = imageio.read_header(tmp_path / "0.png").decode_bytes
    budget = DecodeBudget(rows_that_fit * row_cost)
    monkeypatch.setattr(row_checks, "DECODE_BUDGET", budget)
    state = _count_concurrent_decodes(monkeypatch)
    ok, problems = usable_records(tmp_path, records, workers=8)
    assert len(ok) == 16 and not problems
    assert 1 <= state["most"] <= rows_that_fit
    assert budget.peak <= budget.capacity and budget.in_use == 0


def test_a_request_larger_than_the_budget_runs_alone():
    budget = DecodeBudget(100)
    with budget.reserve(10):
        pass
    with budget.reserve(10_000):  # clamped to the whole budget: it waits for nothing else, then runs
        assert budget.in_use == 100
    assert budget.in_use == 0


def test_predict_holds_a_bounded_number_of_decoded_pixels(tmp_path, monkeypatch):
    from cxrfl import predict

    files = [_png(tmp_path / f"{i}.png") for i in range(5)]
    bomb = _dicom_declaring(tmp_path / "bomb.dcm", 8100, 8100, j2k=True)
    monkeypatch.setattr(predict, "PREDICT_BATCH_PIXELS", 2 * 32 * 32)
    batches = list(predict._batches(files[:2] + [bomb] + files[2:], batch_size=8))
    assert [len(b) for _, b in batches] == [3, 2, 1]  # the bomb costs nothing: refused from its header
    assert [first for first, _ in batches] == [0, 3, 5]
    refused = [item for _, b in batches for item in b if item.error]
    assert [item.path for item in refused] == [bomb] and "too large" in refused[0].error


# ------------------------------------------------------------------ item 10: identical files


CLASSES = ["normal", "pneumonia"]


def _root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    img = root / "images"
    (img).mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"classes": CLASSES}))
    for name in ("a1", "a2", "a3", "b1", "b2", "b3", "t1", "t2"):
        _png(img / f"{name}.png")

    def rec(name, label, split):
        return Record(image=f"../images/{name}.png", label=label, patient_id=name.upper(), split=split)

    write_manifest(root / "site-1" / "manifest.csv", [rec("a1", "normal", "train"), rec("a2", "pneumonia", "train"),
                                                       rec("a3", "normal", "val")])
    write_manifest(root / "site-2" / "manifest.csv", [rec("b1", "normal", "train"), rec("b2", "pneumonia", "train"),
                                                       rec("b3", "pneumonia", "val")])
    write_manifest(root / "test" / "manifest.csv", [rec("t1", "normal", "test"), rec("t2", "pneumonia", "test")])
    return root


def _add(root: Path, site: str, record: Record) -> None:
    rows = read_manifest(root / site / "manifest.csv")
    write_manifest(root / site / "manifest.csv", rows + [record])


def test_a_training_image_copied_into_the_test_set_under_another_patient_is_an_error(tmp_path):
    root = _root(tmp_path)
    assert check_data(root).problems == []
    refuse_leakage(root)  # a clean root trains
    copy = root / "images" / "t9_renamed.png"
    copy.write_bytes((root / "images" / "a1.png").read_bytes())
    _add(root, "test", Record(image="../images/t9_renamed.png", label="normal", patient_id="T9", split="test"))
    report = check_data(root)
    assert not report.usable
    [leak] = [p for p in report.errors if "identical" in p.reason]
    assert Path(leak.file) == copy and leak.severity == ERROR
    assert "site-1 (train)" in leak.reason and "test (test)" in leak.reason and "a1.png" in leak.reason
    assert "in both a site and the test set" in leak.reason
    with pytest.raises(ManifestError) as err:
        refuse_leakage(root)
    message = str(err.value)
    assert "\n" not in message and "identical" in message and "--allow-leakage" in message
    assert "cxrfl data check" in message


def test_the_same_file_in_two_sites_under_two_patients_is_an_error(tmp_path):
    root = _root(tmp_path)
    _add(root, "site-2", Record(image="../images/a2.png", label="pneumonia", patient_id="B9", split="train"))
    report = check_data(root)
    assert [p for p in report.errors if "identical" in p.reason and "two or more sites" in p.reason]
    with pytest.raises(ManifestError, match="identical"):
        refuse_leakage(root)
    refuse_leakage(root, sites=["site-1"])  # training only site-1 reads no copy
    # identical files within one split of one site are no leakage
    root2 = _root(tmp_path / "again")
    (root2 / "images" / "a1_dup.png").write_bytes((root2 / "images" / "a1.png").read_bytes())
    _add(root2, "site-1", Record(image="../images/a1_dup.png", label="normal", patient_id="A9", split="train"))
    assert check_data(root2).usable
    refuse_leakage(root2)


def test_training_refuses_patient_leakage_and_the_option_exists(tmp_path):
    root = _root(tmp_path)
    _add(root, "site-2", Record(image="../images/b1.png", label="normal", patient_id="A1", split="train"))
    with pytest.raises(ManifestError, match=r"patient leakage: patient 'A1'.*--allow-leakage"):
        refuse_leakage(root)
    for config, scope in ((TrainConfig, "central"), (FLConfig, "fl")):
        parser = argparse.ArgumentParser()
        add_config_options(parser, config, scope, task="classify")
        assert parser.parse_args([]).allow_leakage is False
        assert parser.parse_args(["--allow-leakage"]).allow_leakage is True


def test_the_synthetic_data_has_no_leakage(tmp_path):
    generate_dataset(tmp_path, sites=2, per_site=8, test_size=4, size=32, seed=3)
    refuse_leakage(tmp_path)


# --------------------------------------------------------------------- item 13: file modes


def _write_each_kind(folder: Path) -> dict[str, Path]:
    write_manifest(folder / "manifest.csv", [Record(image="a.png")])
    write_json(folder / "metrics.json", {"accuracy": 0.5})
    atomic_torch_save({"state_dict": {"w": torch.ones(2)}}, folder / "best.ckpt")
    generate_dataset(folder / "synthetic", sites=1, per_site=4, test_size=2, size=32, seed=0)
    image = next((folder / "synthetic").rglob("*.png"))
    return {"manifest": folder / "manifest.csv", "metrics": folder / "metrics.json",
            "checkpoint": folder / "best.ckpt", "synthetic image": image,
            "synthetic manifest": folder / "synthetic" / "site-1" / "manifest.csv"}


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_data_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        written = _write_each_kind(tmp_path)
    finally:
        os.umask(old)
    modes = {kind: oct(stat.S_IMODE(path.stat().st_mode)) for kind, path in written.items()}
    assert modes == {kind: oct(mode) for kind in written}


# ----------------------------------------------------- item 14: import and check agree, one line each


@pytest.fixture
def hostile_csv(tmp_path):
    src = tmp_path / "src"
    img = src / "img"
    good = _png(img / "good.png")
    _png(img / "other.png")
    trunc = img / "trunc.png"
    data = good.read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    _huge_png(img / "huge.png")
    _undecodable_dicom(img / "jpegls.dcm")
    _png(img / "wrong_mask_image.png")
    _mask(img / "small_mask.png", size=16)
    _png(img / "empty_mask_image.png")
    _mask(img / "empty_mask.png", empty=True)
    _mask(img / "good_mask.png")
    os.symlink("loop_b.png", img / "loop_a.png")
    os.symlink("loop_a.png", img / "loop_b.png")
    rows = [("img/good.png", "normal", "img/good_mask.png"), ("img/other.png", "pneumonia", ""),
            ("img/trunc.png", "normal", ""), ("img/huge.png", "normal", ""), ("img/jpegls.dcm", "normal", ""),
            ("img/wrong_mask_image.png", "normal", "img/small_mask.png"),
            ("img/empty_mask_image.png", "pneumonia", "img/empty_mask.png"), ("img/loop_a.png", "normal", "")]
    lines = ["image,label,mask"] + [",".join(r) for r in rows]
    (src / "list.csv").write_text("\n".join(lines) + "\n")
    return src


EXPECTED_REASONS = {
    "trunc.png": "truncated",
    "huge.png": "too large",
    "jpegls.dcm": "cannot decode DICOM pixel data",
    "small_mask.png": "mask size 16x16 differs from image size 32x32",
    "empty_mask.png": "mask is empty (all zero)",
    "loop_a.png": "symbolic link loop",
}


def test_import_gives_the_verdict_and_reason_check_gives(hostile_csv, tmp_path):
    out = tmp_path / "out"
    records = import_dataset("csv", hostile_csv / "list.csv", out)
    assert sorted(Path(r.image).name for r in records) == ["good.png", "other.png"]
    skipped = {Path(path).name: reason for path, reason in records.skipped}
    assert set(skipped) == set(EXPECTED_REASONS)
    for name, words in EXPECTED_REASONS.items():
        assert words in skipped[name], (name, skipped[name])
        assert "\n" not in skipped[name] and len(skipped[name]) <= imageio.MAX_REASON_CHARS + 40

    # `data check` on every row of the same CSV: the same files, the same reasons
    every_row = [Record(image=str(hostile_csv / line.split(",")[0]), label=line.split(",")[1],
                        mask=str(hostile_csv / line.split(",")[2]) if line.split(",")[2] else "", patient_id=str(i))
                 for i, line in enumerate((hostile_csv / "list.csv").read_text().splitlines()[1:])]
    write_manifest(tmp_path / "all" / "manifest.csv", every_row)
    report = check_data(tmp_path / "all")
    checked = {Path(p.file).name: p.reason for p in report.problems}
    assert set(checked) == set(skipped)
    for name, reason in checked.items():
        assert skipped[name].startswith(reason), (name, skipped[name], reason)
        assert "\n" not in reason


def test_import_cli_prints_one_line_per_problem_and_no_raw_warning(hostile_csv, tmp_path):
    # `cxrfl data import` as the CLI runs it (logging as cxrfl/cli.py sets it up), without the
    # seconds cxrfl.cli takes to import torch and NVFlare
    script = (
        "import argparse, logging, sys\n"
        "logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')\n"
        "from cxrfl.commands import data_import\n"
        "parser = argparse.ArgumentParser(); data_import.add_parser(parser.add_subparsers())\n"
        "args = parser.parse_args(sys.argv[1:]); sys.exit(args.func(args))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, "import", "csv", str(hostile_csv / "list.csv"),
                           "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "DecompressionBomb" not in proc.stderr and "Traceback" not in proc.stderr
    warned = [line for line in proc.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warned) == len(EXPECTED_REASONS), proc.stderr
    for name, words in EXPECTED_REASONS.items():
        assert [line for line in warned if name in line and words in line], (name, proc.stderr)
    assert not [line for line in proc.stderr.splitlines() if not line.startswith(("WARNING", "INFO"))], proc.stderr
    assert "imported 2 image(s)" in proc.stdout and "skipped: 6" in proc.stdout


def test_a_broken_symlink_and_a_loop_are_named_as_such(tmp_path):
    os.symlink("nowhere.png", tmp_path / "dangling.png")
    os.symlink("b.png", tmp_path / "a.png")
    os.symlink("a.png", tmp_path / "b.png")
    with pytest.raises(ImageReadError, match="broken symbolic link .*nowhere.png"):
        read_image(tmp_path / "dangling.png")
    with pytest.raises(ImageReadError, match="symbolic link loop"):
        read_image(tmp_path / "a.png")
    with pytest.raises(ImageReadError, match="file does not exist"):
        read_image(tmp_path / "absent.png")


def test_tb_sets_with_an_all_zero_mask_agree_with_check(tmp_path, caplog):
    """Montgomery needs its mask: an all-zero one drops the image (and the combined mask written for
    it); Shenzhen keeps images without a usable mask: the empty one is left out. Either way
    `data check` of the imported manifest then finds no bad file."""
    mont = tmp_path / "montgomery"
    for name in ("MCUCXR_0001_0.png", "MCUCXR_0002_1.png"):
        _png(mont / "CXR_png" / name)
        for side, empty in (("leftMask", name.startswith("MCUCXR_0002")), ("rightMask", name.startswith("MCUCXR_0002"))):
            _mask(mont / "ManualMask" / side / name, empty=empty)
    with caplog.at_level("WARNING", logger="cxrfl.data"):
        records = import_dataset("montgomery", mont, tmp_path / "m_out")
    assert [Path(r.image).name for r in records] == ["MCUCXR_0001_0.png"]
    assert [(Path(p).name, reason) for p, reason in records.skipped] == [("MCUCXR_0002_1.png", "mask is empty (all zero)")]
    assert sorted(p.name for p in (tmp_path / "m_out" / "masks").iterdir()) == ["MCUCXR_0001_0.png"]
    assert check_data(tmp_path / "m_out").warnings == []  # (its one class left is an error of its own)

    shen = tmp_path / "shenzhen"
    for name in ("CHNCXR_0001_0.png", "CHNCXR_0002_1.png"):
        _png(shen / "CXR_png" / name)
    _mask(shen / "mask" / "CHNCXR_0001_0_mask.png")
    _mask(shen / "mask" / "CHNCXR_0002_1_mask.png", empty=True)
    caplog.clear()
    with caplog.at_level("WARNING", logger="cxrfl.data"):
        records = import_dataset("shenzhen", shen, tmp_path / "s_out")
    assert {Path(r.image).name: Path(r.mask).name if r.mask else "" for r in records} == {
        "CHNCXR_0001_0.png": "CHNCXR_0001_0_mask.png", "CHNCXR_0002_1.png": ""}
    assert any("CHNCXR_0002_1_mask.png not used: mask is empty (all zero)" in r.getMessage() for r in caplog.records)
    assert check_data(tmp_path / "s_out").warnings == []
