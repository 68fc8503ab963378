"""Kermany et al., 'Chest X-Ray Images (Pneumonia)' (Kaggle: paultimothymooney/chest-xray-pneumonia).

Layout (SRC itself or its one sub-folder, e.g. SRC/chest_xray/)::

    SRC/train/NORMAL/*.jpeg     SRC/train/PNEUMONIA/*.jpeg
    SRC/val/NORMAL/*.jpeg       SRC/val/PNEUMONIA/*.jpeg
    SRC/test/NORMAL/*.jpeg      SRC/test/PNEUMONIA/*.jpeg

Labels normal / pneumonia from the class folder; the patient id comes from the file name
(`kermany_patient_id`); test/ stays the held-out test split, train/ and val/ are pooled.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lightning_modules.data.imageio import RASTER_SUFFIXES, ImageReadError
from lightning_modules.data.importers.common import ImportResult, ImportRun, find_root, probe, visible_files
from lightning_modules.data.manifest import ManifestError, Record

FORMAT = "kermany"
LAYOUT = ("SRC/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg (or SRC/chest_xray/...); "
          "labels normal/pneumonia; test/ stays the held-out test split")
CLASSES = ["normal", "pneumonia"]
SPLITS = ("train", "val", "test")


def kermany_patient_id(name: str) -> str:
    """person1_bacteria_1.jpeg -> person1; IM-0115-0001.jpeg -> IM-0115; NORMAL2-IM-1427-0001 -> NORMAL2-IM-1427."""
    stem = Path(name).stem
    m = re.match(r"^(person\d+)_", stem, re.IGNORECASE)
    if m:
        return m.group(1)
    m = re.match(r"^(.*IM-\d+)-\d+$", stem, re.IGNORECASE)
    if m:
        return m.group(1)
    return stem


def import_kermany(src: str | os.PathLike, out: str | os.PathLike) -> ImportResult:
    """Kermany 'Chest X-Ray Images (Pneumonia)': SRC/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg."""
    run = ImportRun(FORMAT, src, out)
    root = find_root(run.src, lambda p: any((p / s).is_dir() for s in SPLITS), FORMAT, LAYOUT)
    records = []
    for split in SPLITS:
        if (root / split).is_dir():
            records.extend(_split_records(run, root / split))
    return run.finish(records, CLASSES, "classify")


def _split_records(run: ImportRun, split_dir: Path) -> list[Record]:
    """The usable images of one of train/, val/, test/ (the unusable ones are skipped in `run`)."""
    class_dirs = {p.name.lower(): p for p in split_dir.iterdir() if p.is_dir() and p.name.lower() in CLASSES}
    if not class_dirs:
        raise ManifestError(f"{split_dir}: no NORMAL/ or PNEUMONIA/ class folder")
    records = []
    for label in CLASSES:
        if label not in class_dirs:
            continue
        for path in visible_files(class_dirs[label]):
            if path.suffix.lower() not in RASTER_SUFFIXES:
                run.skip(path, f"not an image file (suffix {path.suffix or 'none'!r})")
                continue
            try:
                probe(path)
            except ImageReadError as exc:
                run.skip(path, exc.reason)
                continue
            records.append(Record(
                image=os.path.abspath(path),
                label=label,
                patient_id=kermany_patient_id(path.name),
                split="test" if split_dir.name == "test" else "",
                extra={"source_split": split_dir.name},
            ))
    return records
