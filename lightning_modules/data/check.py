"""Check a data root (or one manifest) for everything that would break or bias training.

`check_data` decodes every image and mask completely (the same `read_image` the loader uses), so
a file that passes here also loads in training. It reports one `Problem` per finding:

- ``warning``: a per-file problem; the loader skips that row (missing, zero-byte, truncated or
  non-image files; masks that are missing, unreadable, empty or of another size than the image;
  unknown labels; duplicate rows; rows whose split the loader ignores).
- ``error``: the set is unusable as it stands (unreadable manifest or dataset.json, missing site
  or test folders, patient leakage across sites or splits, a site or the test set without usable
  images, fewer than 2 classes among the usable training labels).

`usable_records` is the per-row part, shared with the training data loader so both skip the same
files for the same reasons.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from lightning_modules.data.imageio import ImageReadError, check_file, read_image, read_mask
from lightning_modules.data.manifest import (
    DATASET_JSON,
    MANIFEST_NAME,
    TEST_SITE,
    ManifestError,
    Record,
    read_dataset_info,
    natural_key,
    read_manifest,
    resolve,
)

ERROR = "error"
WARNING = "warning"
SITE_SPLITS = ("train", "val")
_SITE_NAME = re.compile(r"^site[-_]?\d+$")


@dataclass(frozen=True)
class Problem:
    file: str
    reason: str
    severity: str = WARNING

    def __str__(self) -> str:
        return f"{self.severity.upper()} {self.file}: {self.reason}"


@dataclass
class CheckReport:
    path: str
    problems: list[Problem] = field(default_factory=list)
    # site (or "test") -> split -> (usable rows, rows)
    counts: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == WARNING]

    @property
    def usable(self) -> bool:
        return not self.errors


# --------------------------------------------------------------------------- per row


def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _size(arr) -> str:
    return f"{arr.shape[1]}x{arr.shape[0]}"


def _shown(path: Path) -> str:
    """How a file is named in a problem: the resolved cell, with ``..`` folded for reading."""
    return os.path.normpath(str(path))


def inspect_record(
    folder: Path, record: Record, classes: Sequence[str] | None = None, require_mask: bool = False,
    decode: bool = True, use_masks: bool = True,
) -> tuple[list[Problem], np.ndarray | None, np.ndarray | None]:
    """(problems, image, lung mask) of one manifest row: the one place that decides whether a
    row is usable, shared by `data check` and the training loader. Arrays are None when not
    decoded; ``use_masks=False`` ignores the mask and opacity columns (whole-image classification)."""
    folder = Path(folder)
    problems: list[Problem] = []
    image_path = resolve(folder, record.image)
    if classes is not None and record.label and record.label not in classes:
        problems.append(
            Problem(_shown(image_path), f"unknown label {record.label!r} (dataset.json classes: {', '.join(classes)})")
        )
    image = lung_mask = None
    try:
        if decode:
            image = read_image(image_path)
        else:
            check_file(image_path)
    except ImageReadError as exc:
        problems.append(Problem(_shown(image_path), exc.reason))

    for column, what in (("mask", "mask"), ("opacity", "opacity mask")) if use_masks else ():
        value = getattr(record, column)
        if not value:
            if column == "mask" and require_mask:
                problems.append(Problem(_shown(image_path), "no mask given (segmentation needs a lung mask per image)"))
            continue
        mask_path = resolve(folder, value)
        try:
            if not decode:
                check_file(mask_path)
                continue
            mask = read_mask(mask_path)
        except ImageReadError as exc:
            problems.append(Problem(_shown(mask_path), f"{what} unusable: {exc.reason}"))
            continue
        if image is not None and mask.shape != image.shape:
            problems.append(
                Problem(
                    _shown(mask_path),
                    f"{what} size {_size(mask)} differs from image size {_size(image)} ({image_path.name})",
                )
            )
        elif column == "mask" and not mask.any():
            problems.append(Problem(_shown(mask_path), "mask is empty (all zero)"))
        elif column == "mask":
            lung_mask = mask
    return problems, image, lung_mask


def check_record(
    folder: Path, record: Record, classes: Sequence[str] | None = None, require_mask: bool = False, decode: bool = True
) -> list[Problem]:
    """Problems (all warnings) of one manifest row; [] when the row is usable."""
    return inspect_record(folder, record, classes, require_mask, decode)[0]


def usable_records(
    folder: str | os.PathLike,
    records: Iterable[Record],
    classes: Sequence[str] | None = None,
    require_mask: bool = False,
    *,
    decode: bool = True,
    workers: int | None = None,
) -> tuple[list[Record], list[Problem]]:
    """Split the rows of one manifest folder into usable records and problems (warnings).

    A row is unusable when its image (or a given mask/opacity) cannot be decoded, a mask is empty
    or of another size than its image, its label is not in `classes`, a mask is required but
    absent, or it repeats an earlier row's image. ``decode=False`` only checks that files exist and
    are non-empty (the loader then meets decode errors when it reads them). Order is kept.
    """
    folder = Path(folder)
    records = list(records)
    workers = workers or _default_workers()
    if workers > 1 and len(records) > 8:
        with ThreadPoolExecutor(max_workers=workers) as pool:  # decoders release the GIL
            per_row = list(pool.map(lambda r: check_record(folder, r, classes, require_mask, decode), records))
    else:
        per_row = [check_record(folder, r, classes, require_mask, decode) for r in records]

    ok: list[Record] = []
    problems: list[Problem] = []
    first_row: dict[str, int] = {}
    for i, (record, found) in enumerate(zip(records, per_row)):
        key = os.path.normpath(str(resolve(folder, record.image)))
        if key in first_row:
            found = found + [
                Problem(_shown(resolve(folder, record.image)), "duplicate row: image already listed in an earlier row")
            ]
        else:
            first_row[key] = i
        if found:
            problems.extend(found)
        else:
            ok.append(record)
    return ok, problems


# --------------------------------------------------------------------------- whole sets


def _manifest_problem(path: Path, exc: Exception) -> Problem:
    msg = str(exc)
    prefix = str(path)
    if msg.startswith(prefix):
        rest = msg[len(prefix) :]
        m = re.match(r"^:(\d+):\s*(.*)$", rest, re.S)
        msg = f"line {m.group(1)}: {m.group(2)}" if m else rest.lstrip(": ")
    return Problem(str(path), msg, ERROR)


def _patient_key(folder: Path, record: Record) -> str:
    if record.patient_id:
        return record.patient_id
    return "image " + os.path.normpath(os.path.abspath(resolve(folder, record.image)))


def _load_classes(folders: Sequence[Path], problems: list[Problem]) -> list[str] | None:
    for folder in folders:
        if not (folder / DATASET_JSON).is_file():
            continue
        try:
            info = read_dataset_info(folder)
        except ManifestError as exc:
            problems.append(_manifest_problem(folder / DATASET_JSON, exc))
            return None
        classes = info.get("classes")
        if classes is None:
            return None
        if not isinstance(classes, list) or not classes:
            problems.append(Problem(str(folder / DATASET_JSON), "'classes' must be a non-empty list of names", ERROR))
            return None
        return [str(c) for c in classes]
    return None


def _is_data_root(path: Path) -> bool:
    if (path / TEST_SITE).is_dir() or (path / DATASET_JSON).is_file() and not (path / MANIFEST_NAME).is_file():
        return True
    return any(p.is_dir() and (p / MANIFEST_NAME).is_file() for p in path.iterdir())


def check_data(path: str | os.PathLike, *, workers: int | None = None, require_mask: bool = False) -> CheckReport:
    """Check a data root (site folders + test/), a folder with a manifest.csv, or a manifest file.

    Every image and mask is decoded. See the module docstring for what is reported and how severe.
    """
    path = Path(path)
    report = CheckReport(path=str(path))
    problems = report.problems
    if not path.exists():
        problems.append(Problem(str(path), "does not exist (expected a data root, a folder with a manifest.csv or a manifest.csv)", ERROR))
        return report

    # (location name, manifest path, splits the loader uses from it)
    manifests: list[tuple[str, Path, tuple[str, ...] | None]] = []
    if path.is_file() or not _is_data_root(path):
        manifest = path if path.is_file() else path / MANIFEST_NAME
        if not manifest.is_file():
            problems.append(Problem(str(path), f"no {MANIFEST_NAME} and no site folders: not a data root", ERROR))
            return report
        classes = _load_classes([manifest.parent, manifest.parent.parent], problems)
        manifests.append((manifest.parent.name or str(manifest.parent), manifest, None))
    else:
        classes = _load_classes([path], problems)
        try:
            listed = read_dataset_info(path).get("sites") or []
        except ManifestError:
            listed = []  # already reported by _load_classes
        listed = [s for s in listed if isinstance(s, str)] if isinstance(listed, list) else []
        subdirs = sorted((p for p in path.iterdir() if p.is_dir()), key=lambda p: natural_key(p.name))
        for name in listed:
            if not (path / name).is_dir():
                problems.append(Problem(str(path / name), "site folder missing (listed in dataset.json)", ERROR))
        for p in subdirs:
            if p.name == TEST_SITE:
                continue
            if (p / MANIFEST_NAME).is_file():
                manifests.append((p.name, p / MANIFEST_NAME, SITE_SPLITS))
            elif p.name in listed or _SITE_NAME.match(p.name):
                problems.append(Problem(str(p / MANIFEST_NAME), "site folder has no manifest.csv", ERROR))
        if not any(kind == SITE_SPLITS for _, _, kind in manifests):
            problems.append(
                Problem(str(path), "no site folders with a manifest.csv (create them with `cxrfl data split`)", ERROR)
            )
        if (path / TEST_SITE / MANIFEST_NAME).is_file():
            manifests.append((TEST_SITE, path / TEST_SITE / MANIFEST_NAME, ("", TEST_SITE)))
        else:
            problems.append(Problem(str(path / TEST_SITE / MANIFEST_NAME), "test set missing (no test/manifest.csv)", ERROR))
    report.classes = list(classes or [])

    # Per manifest: parse, check rows.
    used: list[tuple[str, Path, Record]] = []  # (location, folder, record) of rows the loader reads
    usable_by_loc: dict[str, list[Record]] = {}
    seen_images: dict[str, tuple[str, str]] = {}  # abs image path -> (location, patient key)
    for name, manifest, splits in manifests:
        folder = manifest.parent
        try:
            records = read_manifest(manifest)
        except ManifestError as exc:
            problems.append(_manifest_problem(manifest, exc))
            continue
        rows = []
        for r in records:
            if splits is not None and r.split not in splits:
                expected = "train or val" if splits == SITE_SPLITS else "test or empty"
                problems.append(
                    Problem(
                        _shown(resolve(folder, r.image)),
                        f"split {r.split!r} in {name}/{MANIFEST_NAME} is ignored by the loader (expected {expected})",
                    )
                )
                continue
            rows.append(r)
        ok, found = usable_records(folder, rows, classes, require_mask, workers=workers)
        problems.extend(found)
        usable_by_loc[name] = ok
        counts: dict[str, list[int]] = {}
        for r in rows:
            counts.setdefault(r.split or ("test" if name == TEST_SITE and splits else "unassigned"), [0, 0])[1] += 1
        for r in ok:
            counts[r.split or ("test" if name == TEST_SITE and splits else "unassigned")][0] += 1
        report.counts[name] = {s: (c[0], c[1]) for s, c in sorted(counts.items(), key=lambda kv: _split_order(kv[0]))}
        if not ok:
            problems.append(Problem(str(manifest), f"no usable images in {name} ({len(rows)} rows, 0 usable)", ERROR))
        elif splits == SITE_SPLITS and not any(r.split == "train" for r in ok):
            problems.append(Problem(str(manifest), f"no usable training images in {name}", ERROR))
        for r in rows:
            used.append((name, folder, r))
            img = os.path.normpath(os.path.abspath(resolve(folder, r.image)))
            key = _patient_key(folder, r)
            if img not in seen_images:
                seen_images[img] = (name, key)
            elif seen_images[img][0] != name and seen_images[img][1] != key:
                # same file under another patient elsewhere (same patient: reported as leakage below)
                problems.append(
                    Problem(_shown(resolve(folder, r.image)), f"duplicate image: also listed in {seen_images[img][0]}/{MANIFEST_NAME}")
                )

    # Patient leakage across sites / splits (the rows the loader reads, usable or not).
    where: dict[str, dict[tuple[str, str], Path]] = {}
    for name, folder, r in used:
        split = r.split or (TEST_SITE if name == TEST_SITE else "")
        where.setdefault(_patient_key(folder, r), {}).setdefault((name, split), folder / MANIFEST_NAME)
    for patient, locs in where.items():
        names = {n for n, _ in locs}
        if len(locs) < 2:
            continue
        if len(names - {TEST_SITE}) > 1:
            kind = "in two or more sites"
        elif TEST_SITE in names and len(names) > 1:
            kind = "in both a site and the test set"
        else:
            kind = "in two splits"
        places = ", ".join(f"{n} ({s or 'no split'})" for n, s in locs)
        who = f"{patient!r}" if not patient.startswith("image ") else f"with {patient}"
        problems.append(
            Problem(str(list(locs.values())[-1]), f"patient leakage: patient {who} is {kind}: {places}", ERROR)
        )

    # Enough classes to train a classifier.
    if manifests and all(kind is None for _, _, kind in manifests):
        pool = [r for recs in usable_by_loc.values() for r in recs]
        train = [r for r in pool if r.split == "train"] or [r for r in pool if not r.split]
    else:
        train = [r for n, recs in usable_by_loc.items() if n != TEST_SITE for r in recs if r.split == "train"]
    labels = sorted({r.label for r in train if r.label})
    if labels and len(labels) < 2:
        problems.append(
            Problem(
                str(path),
                f"only {len(labels)} class among the usable training labels ({', '.join(labels)}); "
                "a classifier needs at least 2",
                ERROR,
            )
        )

    report.problems = [p for p in problems if p.severity == ERROR] + [p for p in problems if p.severity != ERROR]
    return report


def _split_order(split: str) -> tuple[int, str]:
    order = {"train": 0, "val": 1, "test": 2}
    return (order.get(split, 3), split)


def format_report(report: CheckReport) -> str:
    """One line per problem (``<SEVERITY> <file>: <reason>``), then a summary line."""
    lines = [str(p) for p in report.problems]
    parts = []
    for name, splits in report.counts.items():
        if list(splits) == [name]:
            parts.append(f"{name} {splits[name][0]}/{splits[name][1]}")
        else:
            parts.append(name + " " + " ".join(f"{s} {u}/{n}" for s, (u, n) in splits.items()))
    n_err, n_warn = len(report.errors), len(report.warnings)
    verdict = "usable" if report.usable else "NOT usable"
    usable_txt = "; ".join(parts) if parts else "none"
    lines.append(
        f"summary: usable images {usable_txt} | {n_err} error{'s' * (n_err != 1)}, "
        f"{n_warn} warning{'s' * (n_warn != 1)}: {verdict}"
    )
    return "\n".join(lines)
