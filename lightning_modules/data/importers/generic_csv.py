"""Any CSV list with one row per image (format name "csv").

Layout: SRC is the CSV file itself, e.g.::

    path,finding,patient,lungs
    images/a.png,normal,P1,masks/a.png

The image column is required (default ``image``); the label, mask and patient columns default to
``label`` / ``mask`` / ``patient_id`` and are used when present (a column named explicitly must
exist); without a patient column the patient id is the image file's stem. A split column (only
when named) keeps train/val/test assignments. Relative paths are resolved against --root
(default: the CSV's folder).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lightning_modules.data.imageio import ImageReadError
from lightning_modules.data.importers.common import ImportResult, ImportRun, probe
from lightning_modules.data.manifest import ManifestError, Record, read_csv

FORMAT = "csv"
LAYOUT = ("SRC is a CSV file with one row per image (columns chosen with --image-col, --label-col, ...); "
          "relative paths are resolved against --root (default: the CSV's folder)")
SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test", "holdout": "test",
}


@dataclass(frozen=True)
class _Columns:
    """Which CSV column holds what (None: not used), where relative paths start, the fixed classes."""

    image: str
    label: str | None
    mask: str | None
    patient: str | None
    split: str | None
    base: Path
    classes: list[str] | None


def import_generic_csv(
    src: str | os.PathLike,
    out: str | os.PathLike,
    image_col: str = "image",
    label_col: str | None = None,
    mask_col: str | None = None,
    patient_col: str | None = None,
    split_col: str | None = None,
    root: str | os.PathLike | None = None,
    classes: list[str] | str | None = None,
) -> ImportResult:
    """Any CSV with one row per image (see the module docstring for the columns).

    split_col maps train/val/test (and training/validation/valid/testing). classes: list (or
    comma-separated string) fixing the class order; default the sorted labels seen.
    """
    run = ImportRun(FORMAT, src, out, src_is_file=True)
    csv_path = run.src
    header, rows = read_csv(csv_path, [c for c in (image_col, label_col, mask_col, patient_col, split_col) if c])
    cols = _Columns(
        image=image_col,
        label=label_col or ("label" if "label" in header else None),
        mask=mask_col or ("mask" if "mask" in header else None),
        patient=patient_col or ("patient_id" if "patient_id" in header else None),
        split=split_col,
        base=Path(os.path.abspath(root)) if root is not None else csv_path.parent,
        classes=[c.strip() for c in classes.split(",") if c.strip()] if isinstance(classes, str) else classes,
    )
    if cols.label is None and cols.mask is None:
        raise ManifestError(
            f"{csv_path}: no label or mask column (name them with --label-col / --mask-col; "
            f"columns found: {', '.join(repr(c) for c in header)})"
        )
    if not cols.base.is_dir():
        raise ManifestError(f"{cols.base}: root folder not found")
    records, seen = [], set()
    for line_no, row in rows:
        record = _row_record(run, cols, row, f"{csv_path}:{line_no}", seen)
        if record is not None:
            records.append(record)
    class_list = list(cols.classes) if cols.classes else sorted({r.label for r in records if r.label})
    task_hint = "segment" if any(r.mask for r in records) else "classify"
    return run.finish(records, class_list, task_hint)


def _row_record(run: ImportRun, cols: _Columns, row: dict, where: str, seen: set[str]) -> Record | None:
    """The Record of one CSV row, or None when the row is skipped (logged in `run`); a label
    outside the fixed classes or an unknown split raises ManifestError. `seen`: images so far."""
    cell = row.get(cols.image, "")
    if not cell:
        run.skip(where, f"empty {cols.image!r} cell")
        return None
    image = cols.base / cell
    label = row.get(cols.label, "") if cols.label else ""
    if cols.classes and label and label not in cols.classes:
        raise ManifestError(f"{where}: label {label!r} is not one of the classes {', '.join(map(repr, cols.classes))}")
    split = _split(cols, row, where)
    try:
        probe(image)
    except ImageReadError as exc:
        run.skip(image, f"{exc.reason} ({where})")
        return None
    key = os.path.abspath(image)
    if key in seen:
        run.skip(image, f"listed twice ({where})")
        return None
    seen.add(key)
    mask = ""
    mask_cell = row.get(cols.mask, "") if cols.mask else ""
    if mask_cell:
        mask_file = cols.base / mask_cell
        try:
            probe(mask_file)
        except ImageReadError as exc:
            run.skip(mask_file, f"mask unusable: {exc.reason} ({where})")
            return None
        mask = os.path.abspath(mask_file)
    pid = (row.get(cols.patient, "") if cols.patient else "") or Path(cell).stem
    return Record(image=key, mask=mask, label=label, patient_id=pid, split=split)


def _split(cols: _Columns, row: dict, where: str) -> str:
    """The row's split (train/val/test) from the split column, "" when there is none."""
    raw = row.get(cols.split, "") if cols.split else ""
    if not raw:
        return ""
    split = SPLIT_ALIASES.get(raw.lower(), "")
    if not split:
        raise ManifestError(f"{where}: unknown split {raw!r} in column {cols.split!r} (expected train, val or test)")
    return split
