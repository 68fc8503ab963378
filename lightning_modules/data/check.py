"""Check a data root (or one manifest) for everything that would break or bias training.

`check_data` decodes every image and mask completely (the same `read_image` the loader uses), so
a file that passes here also loads in training. It reports one `Problem` per finding:

- ``warning``: a per-file problem; the loader skips that row (missing, zero-byte, truncated or
  non-image files; masks that are missing, unreadable, empty or of another size than the image;
  unknown labels; duplicate rows; rows whose split the loader ignores).
- ``error``: the set is unusable as it stands (unreadable manifest or dataset.json, missing site
  or test folders, leakage across sites or splits: one patient, or byte-identical image files under
  different patients, in two places; a site or the test set without usable images, fewer than 2
  classes among the usable training labels).

`usable_records` is the per-row part, shared with the training data loader so both skip the same
files for the same reasons. `refuse_leakage` is the leakage part alone (no decoding), which the
training commands run before they start.
"""

from __future__ import annotations

import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from lightning_modules.data.imageio import (
    DECODE_BUDGET,
    ImageReadError,
    check_file,
    decode_cost,
    one_line,
    read_image,
    read_mask,
)
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
    if decode:  # the row's image and masks decode under the process-wide memory budget (imageio)
        columns = ("mask", "opacity") if use_masks else ()
        paths = [resolve(folder, record.image)] + [resolve(folder, getattr(record, c)) for c in columns]
        with DECODE_BUDGET.reserve(decode_cost(*paths)):
            return _inspect_record(folder, record, classes, require_mask, decode, use_masks)
    return _inspect_record(folder, record, classes, require_mask, decode, use_masks)


def _inspect_record(
    folder: Path, record: Record, classes: Sequence[str] | None, require_mask: bool, decode: bool, use_masks: bool
) -> tuple[list[Problem], np.ndarray | None, np.ndarray | None]:
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
    folder, records = Path(folder), list(records)
    per_row = _inspect_rows(folder, records, classes, require_mask, decode, workers, digests=False)
    return _split_usable(folder, records, [found for found, _ in per_row])


def row_problems(
    folder: str | os.PathLike, records: Sequence[Record], classes: Sequence[str] | None = None,
    require_mask: bool = False, *, workers: int | None = None,
) -> list[list[Problem]]:
    """The problems of each row, decoded exactly as `data check` decodes it (for `data import`)."""
    return [found for found, _ in _inspect_rows(Path(folder), list(records), classes, require_mask, True, workers, False)]


def file_digest(path: str | os.PathLike) -> str | None:
    """sha256 of a file's bytes (streamed), or None when it is missing, empty or unreadable."""
    try:
        check_file(path)
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except (ImageReadError, OSError):
        return None


def _inspect_rows(
    folder: Path, records: list[Record], classes, require_mask: bool, decode: bool, workers: int | None, digests: bool
) -> list[tuple[list[Problem], str | None]]:
    """(problems, sha256 of the image file or None) per row, decoded in threads (decoders release
    the GIL; their memory is bounded by imageio.DECODE_BUDGET, not by the thread count)."""

    def one(record: Record) -> tuple[list[Problem], str | None]:
        found = check_record(folder, record, classes, require_mask, decode)
        return found, file_digest(resolve(folder, record.image)) if digests else None

    workers = workers or _default_workers()
    if workers > 1 and len(records) > 8:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(one, records))
    return [one(r) for r in records]


def _split_usable(folder: Path, records: list[Record], per_row: list[list[Problem]]) -> tuple[list[Record], list[Problem]]:
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


def _abs_image(folder: Path, record: Record) -> str:
    return os.path.normpath(os.path.abspath(resolve(folder, record.image)))


def _where(names: set[str]) -> str:
    if len(names - {TEST_SITE}) > 1:
        return "in two or more sites"
    if TEST_SITE in names and len(names) > 1:
        return "in both a site and the test set"
    return "in two splits"


def leakage_problems(rows: Sequence[tuple[str, Path, Record]], digests: dict[str, str]) -> list[Problem]:
    """ERRORs for data that would leak between sites, splits or into the test set.

    rows: (location: site name or "test", manifest folder, record) of every row the loader reads;
    digests: absolute image path -> sha256 of the file. Reported: one patient in two places, and
    byte-identical image files (whatever their names) in two places under different patients (the
    same patient is already reported as patient leakage).
    """
    problems: list[Problem] = []
    where: dict[str, dict[tuple[str, str], Path]] = {}
    copies: dict[str, dict[tuple[str, str], tuple[str, str]]] = {}  # digest -> place -> (image, patient)
    for name, folder, r in rows:
        place = (name, r.split or (TEST_SITE if name == TEST_SITE else ""))
        patient = _patient_key(folder, r)
        where.setdefault(patient, {}).setdefault(place, folder / MANIFEST_NAME)
        digest = digests.get(_abs_image(folder, r))
        if digest is not None:
            copies.setdefault(digest, {}).setdefault(place, (_shown(resolve(folder, r.image)), patient))
    for patient, locs in where.items():
        if len(locs) < 2:
            continue
        places = ", ".join(f"{n} ({s or 'no split'})" for n, s in locs)
        who = f"{patient!r}" if not patient.startswith("image ") else f"with {patient}"
        problems.append(Problem(str(list(locs.values())[-1]),
                                f"patient leakage: patient {who} is {_where({n for n, _ in locs})}: {places}", ERROR))
    for digest, locs in copies.items():
        if len(locs) < 2 or len({patient for _, patient in locs.values()}) < 2:
            continue
        shown = [f"{n} ({s or 'no split'}) {image}" for (n, s), (image, _) in locs.items()]
        more = f" and {len(shown) - 3} more" if len(shown) > 3 else ""
        problems.append(Problem(
            list(locs.values())[-1][0],
            f"identical-file leakage: the same file content (sha256 {digest[:12]}) is "
            f"{_where({n for n, _ in locs})} under different patients: {', '.join(shown[:3])}{more}",
            ERROR,
        ))
    return problems


def refuse_leakage(data_root: str | os.PathLike, sites: Sequence[str] | None = None, *, workers: int | None = None) -> None:
    """Raise ManifestError (one line) when the rows training would read leak between sites, splits or
    into the test set (see `leakage_problems`); the training commands call this before they start,
    unless the user passed --allow-leakage. Only hashes the image files (no decoding); manifests
    that cannot be read are left to the loader, which reports them."""
    root = Path(data_root)
    wanted = None if sites is None else set(sites)
    folders = sorted((p for p in root.iterdir() if p.is_dir() and p.name != TEST_SITE
                      and (wanted is None or p.name in wanted)), key=lambda p: natural_key(p.name)) if root.is_dir() else []
    rows: list[tuple[str, Path, Record]] = []
    for folder, splits in [(f, SITE_SPLITS) for f in folders] + [(root / TEST_SITE, ("", TEST_SITE))]:
        try:
            records = read_manifest(folder / MANIFEST_NAME)
        except ManifestError:
            continue
        rows.extend((folder.name, folder, r) for r in records if r.split in splits)
    paths = sorted({_abs_image(folder, r) for _, folder, r in rows})
    with ThreadPoolExecutor(max_workers=workers or _default_workers()) as pool:
        digests = {p: d for p, d in zip(paths, pool.map(file_digest, paths)) if d is not None}
    problems = leakage_problems(rows, digests)
    if problems:
        shown = "; ".join(one_line(f"{p.file}: {p.reason}", 240) for p in problems[:2])
        more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
        raise ManifestError(
            f"{root}: data leakage, training refused: {shown}{more}; `cxrfl data check {root}` lists every "
            "problem; pass --allow-leakage to train anyway"
        )


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
    digests: dict[str, str] = {}  # abs image path -> sha256 of its bytes
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
        per_row = _inspect_rows(folder, rows, classes, require_mask, True, workers, digests=True)
        ok, found = _split_usable(folder, rows, [f for f, _ in per_row])
        problems.extend(found)
        for r, (_, digest) in zip(rows, per_row):
            if digest is not None:
                digests[_abs_image(folder, r)] = digest
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
        used.extend((name, folder, r) for r in rows)

    # Leakage across sites / splits (the rows the loader reads, usable or not).
    problems.extend(leakage_problems(used, digests))

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
