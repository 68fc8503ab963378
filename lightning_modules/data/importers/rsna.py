"""RSNA Pneumonia Detection Challenge (Kaggle: rsna-pneumonia-detection-challenge), stage 2.

Layout (SRC itself or its one sub-folder)::

    SRC/stage_2_train_labels.csv           patientId,x,y,width,height,Target (one row per box)
    SRC/stage_2_detailed_class_info.csv    patientId,class
    SRC/stage_2_train_images/<patientId>.dcm

classes="three" (default): labels Normal / No Lung Opacity / Not Normal / Lung Opacity (the
CXR-FL setting, from the detailed class CSV); classes="binary": normal / pneumonia from the
maximum Target. Boxes go into the extra column ``boxes`` as "x,y,w,h;x,y,w,h".
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lightning_modules.data.imageio import ImageReadError
from lightning_modules.data.importers.common import ImportResult, ImportRun, find_root, log, probe
from lightning_modules.data.manifest import ManifestError, Record, read_csv

FORMAT = "rsna"
CLASSES = ["Normal", "No Lung Opacity / Not Normal", "Lung Opacity"]
BINARY_CLASSES = ["normal", "pneumonia"]
LABELS_CSV = "stage_2_train_labels.csv"
CLASS_CSV = "stage_2_detailed_class_info.csv"
IMAGE_DIR = "stage_2_train_images"
LAYOUT = (f"SRC/{LABELS_CSV}, SRC/{CLASS_CSV}, SRC/{IMAGE_DIR}/<patientId>.dcm; "
          "--classes three (default: Normal / No Lung Opacity / Not Normal / Lung Opacity) or binary (normal/pneumonia)")


def import_rsna(src: str | os.PathLike, out: str | os.PathLike, classes: str = "three") -> ImportResult:
    """RSNA Pneumonia Detection: stage_2_train_labels.csv, stage_2_detailed_class_info.csv, stage_2_train_images/.

    classes="three" or "binary" (see the module docstring).
    """
    if classes not in ("binary", "three"):
        raise ManifestError(f"rsna: classes must be 'binary' or 'three', not {classes!r}")
    run = ImportRun(FORMAT, src, out)
    root = find_root(run.src, lambda p: (p / LABELS_CSV).is_file(), FORMAT, LAYOUT)
    labels_csv, class_csv, image_dir = root / LABELS_CSV, root / CLASS_CSV, root / IMAGE_DIR
    if not image_dir.is_dir():
        raise ManifestError(f"{image_dir}: image folder not found")
    targets, boxes = _read_targets(labels_csv)
    detailed: dict[str, str] | None = None
    if class_csv.is_file() or classes == "three":
        detailed = _read_detailed_classes(class_csv, labels_csv, targets)

    records = []
    for pid, target in targets.items():
        image = image_dir / f"{pid}.dcm"
        if classes == "three":
            label = detailed.get(pid)
            if label is None:
                run.skip(image, f"patient {pid} has no class in {class_csv}")
                continue
        else:
            label = "pneumonia" if target else "normal"
        try:
            probe(image)
        except ImageReadError as exc:
            run.skip(image, exc.reason)
            continue
        records.append(Record(image=os.path.abspath(image), label=label, patient_id=pid,
                              extra={"boxes": ";".join(boxes[pid])}))
    return run.finish(records, CLASSES if classes == "three" else BINARY_CLASSES, "classify")


def _read_targets(labels_csv: Path) -> tuple[dict[str, int], dict[str, list[str]]]:
    """(patient -> maximum Target, patient -> its boxes as "x,y,w,h") from the labels CSV."""
    _, rows = read_csv(labels_csv, ["patientId", "x", "y", "width", "height", "Target"])
    targets: dict[str, int] = {}
    boxes: dict[str, list[str]] = {}
    for line_no, row in rows:
        pid = row["patientId"]
        if not pid:
            raise ManifestError(f"{labels_csv}:{line_no}: empty patientId")
        if row["Target"] not in ("0", "1"):
            raise ManifestError(f"{labels_csv}:{line_no}: Target must be 0 or 1, not {row['Target']!r}")
        target = int(row["Target"])
        targets[pid] = max(targets.get(pid, 0), target)
        boxes.setdefault(pid, [])
        if target == 1:
            box = [_format_number(row[c], labels_csv, line_no, c) for c in ("x", "y", "width", "height")]
            boxes[pid].append(",".join(box))
    return targets, boxes


def _read_detailed_classes(class_csv: Path, labels_csv: Path, targets: dict[str, int]) -> dict[str, str]:
    """patient -> class from the detailed class CSV, checked against the labels CSV's Target."""
    _, class_rows = read_csv(class_csv, ["patientId", "class"])
    detailed: dict[str, str] = {}
    for line_no, row in class_rows:
        pid, cls = row["patientId"], row["class"]
        if cls not in CLASSES:
            raise ManifestError(
                f"{class_csv}:{line_no}: unknown class {cls!r} (expected one of {', '.join(map(repr, CLASSES))})"
            )
        if detailed.setdefault(pid, cls) != cls:
            raise ManifestError(f"{class_csv}:{line_no}: patient {pid} has two classes ({detailed[pid]!r} and {cls!r})")
    for pid, target in targets.items():
        cls = detailed.get(pid)
        if cls is not None and (target == 1) != (cls == "Lung Opacity"):
            raise ManifestError(
                f"patient {pid}: labels disagree: {labels_csv} has Target={target} but {class_csv} "
                f"has class {cls!r}"
            )
    extra_pids = [pid for pid in detailed if pid not in targets]
    if extra_pids:
        log.warning(
            "rsna: %d patient(s) in %s are not in %s and were ignored (first: %s)",
            len(extra_pids), class_csv, labels_csv, extra_pids[0],
        )
    return detailed


def _format_number(value: str, path: Path, line_no: int, col: str) -> str:
    try:
        num = float(value)
    except ValueError:
        raise ManifestError(f"{path}:{line_no}: column {col!r} is not a number ({value!r})") from None
    if not np.isfinite(num):
        raise ManifestError(f"{path}:{line_no}: column {col!r} is not finite ({value!r})")
    return f"{num:g}"
