"""The one on-disk contract every data source is turned into.

A *data root* holds one folder per site plus a held-out ``test`` folder, and a
``dataset.json`` with the class names::

    DATA/
      dataset.json            {"classes": ["normal", "pneumonia"], ...}
      site-1/manifest.csv     rows with split = train | val | test (test: the site's own test split)
      site-2/manifest.csv
      test/manifest.csv       rows with split = test (the shared test set)

A manifest is a CSV with the columns in ``COLUMNS`` (``image`` required, the rest may be
empty). Paths are relative to the manifest's folder or absolute. Manifests and
``dataset.json`` are written atomically (temp file + rename) so a kill never leaves half a file.
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from lightning_modules.data.atomic import atomic_write_text, read_json_object

MANIFEST_NAME = "manifest.csv"
DATASET_JSON = "dataset.json"
TEST_SITE = "test"
# load_split's name for the test rows inside the site manifests (each site's own held-out test split)
SITE_TEST = "site_test"
# image: image file; mask: binary lung mask; label: class name; patient_id: groups images of one
# patient (splits never separate them); split: train|val|test or empty (not yet assigned);
# site: where it came from; opacity: ground-truth lesion mask when known (synthetic data).
COLUMNS = ["image", "mask", "label", "patient_id", "split", "site", "opacity"]
SPLITS = ("train", "val", "test")


class ManifestError(ValueError):
    """A manifest or data root that cannot be used; the message names the file and the problem."""


@dataclass
class Record:
    image: str
    mask: str = ""
    label: str = ""
    patient_id: str = ""
    split: str = ""
    site: str = ""
    opacity: str = ""
    extra: dict = field(default_factory=dict)

    def as_row(self) -> dict:
        row = {c: getattr(self, c) for c in COLUMNS}
        row.update(self.extra)
        return row


def resolve(base: Path, value: str) -> Path | None:
    """Resolve a manifest path cell against the manifest's folder ('' -> None)."""
    if not value:
        return None
    p = Path(value)
    return p if p.is_absolute() else base / p


def read_csv(path: str | os.PathLike, required: Iterable[str] = (), what: str = "CSV") -> tuple[list[str], list[tuple[int, dict]]]:
    """(header, [(line number, stripped row)]) of a CSV; ManifestError naming the file when it is
    absent, unreadable, has no header, duplicate or missing required columns, or a ragged row."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: {what} not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read {what} ({exc})") from None
    reader = csv.DictReader(io.StringIO(text))
    header = [(h or "").strip() for h in (reader.fieldnames or [])]
    if not header:
        raise ManifestError(f"{path}: empty {what} (no header row)")
    if len(set(header)) != len(header):
        raise ManifestError(f"{path}: duplicate column names in header")
    missing = [c for c in required if c not in header]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {', '.join(repr(c) for c in missing)} "
                            f"(columns found: {', '.join(repr(c) for c in header)})")
    rows = []
    for line_no, raw in enumerate(reader, start=2):
        if None in raw:
            raise ManifestError(f"{path}:{line_no}: more cells than header columns")
        rows.append((line_no, {(k or "").strip(): (v or "").strip() for k, v in raw.items()}))
    return header, rows


def read_manifest(path: str | os.PathLike) -> list[Record]:
    """Parse a manifest; raises ManifestError naming the file, line and problem."""
    _, rows = read_csv(path, required=["image"], what="manifest")
    records = []
    for line_no, row in rows:
        if not row.get("image"):
            raise ManifestError(f"{path}:{line_no}: empty 'image' cell")
        split = row.get("split", "")
        if split and split not in SPLITS:
            raise ManifestError(f"{path}:{line_no}: unknown split {split!r} (expected one of {', '.join(SPLITS)})")
        extra = {k: v for k, v in row.items() if k not in COLUMNS}
        records.append(Record(**{c: row.get(c, "") for c in COLUMNS}, extra=extra))
    return records


def write_manifest(path: str | os.PathLike, records: Iterable[Record]) -> None:
    records = list(records)
    extra_cols = sorted({k for r in records for k in r.extra})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS + extra_cols, lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow(r.as_row())
    atomic_write_text(path, buf.getvalue())


def read_dataset_info(root: str | os.PathLike) -> dict:
    path = Path(root) / DATASET_JSON
    if not path.is_file():
        return {}
    try:
        return read_json_object(path)
    except ValueError as exc:
        raise ManifestError(str(exc)) from None


def class_names(root: str | os.PathLike, records: Iterable[Record] = ()) -> list[str]:
    """Classes from dataset.json, else the sorted labels seen in the records."""
    info = read_dataset_info(root)
    if info.get("classes"):
        return [str(c) for c in info["classes"]]
    return sorted({r.label for r in records if r.label})


def site_dirs(root: str | os.PathLike) -> list[Path]:
    """Site folders of a data root (every sub-folder with a manifest except test/), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"{root}: data root does not exist")
    sites = sorted(
        (p for p in root.iterdir() if p.is_dir() and p.name != TEST_SITE and (p / MANIFEST_NAME).is_file()),
        key=lambda p: natural_key(p.name),
    )
    if not sites:
        raise ManifestError(
            f"{root}: no site folders with a {MANIFEST_NAME} found "
            "(create one with `cxrfl data synth` or `cxrfl data split`)"
        )
    return sites


def natural_key(name: str):
    """Sort key that puts site-2 before site-10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def load_split(root: str | os.PathLike, split: str, sites: Iterable[str] | None = None) -> list[tuple[Path, Record]]:
    """(manifest folder, record) pairs of one split across the chosen sites (all when None).

    split='test' reads the shared test set ``root/test/manifest.csv`` (`sites` is ignored);
    split='site_test' the rows with split test in the chosen sites' own manifests.
    """
    root = Path(root)
    if split == TEST_SITE:
        folder = root / TEST_SITE
        return [(folder, r) for r in read_manifest(folder / MANIFEST_NAME) if r.split in ("", TEST_SITE)]
    if split == SITE_TEST:
        split = TEST_SITE
    folders = site_dirs(root)
    if sites is not None:
        wanted = list(sites)
        by_name = {p.name: p for p in folders}
        missing = [s for s in wanted if s not in by_name]
        if missing:
            raise ManifestError(f"{root}: no data for site(s) {', '.join(missing)} (found: {', '.join(by_name)})")
        folders = [by_name[s] for s in wanted]
    return [(f, r) for f in folders for r in read_manifest(f / MANIFEST_NAME) if r.split == split]
