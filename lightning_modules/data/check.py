"""Audit a whole data set (a data root, or one manifest) for everything that would break or bias training.

`check_data` decodes every image and mask completely (through `row_checks.inspect_record`, as the
training loader does), so a file that passes here also loads in training. It reports one
`Problem` per finding:

- ``warning``: a per-file problem; the loader skips that row (missing, zero-byte, truncated or
  non-image files; masks that are missing, unreadable, empty or of another size than the image;
  unknown labels; duplicate rows; rows whose split the loader ignores).
- ``error``: the set is unusable as it stands (unreadable manifest or dataset.json, missing site
  or test folders, leakage across sites or splits: one patient, or byte-identical image files under
  different patients, in two places; a site or the test set without usable images, fewer than 2
  classes among the usable training labels).

The per-row checks live in `row_checks`. `refuse_leakage` is the leakage part alone (no
decoding), which the training commands run before they start.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from lightning_modules.data.imageio import one_line
from lightning_modules.data.manifest import (
    DATASET_JSON,
    MANIFEST_NAME,
    TEST_SITE,
    ManifestError,
    Record,
    natural_key,
    read_dataset_info,
    read_manifest,
    resolve,
)
from lightning_modules.data.row_checks import (
    ERROR,
    WARNING,
    Problem,
    default_workers,
    file_digest,
    inspect_rows,
    shown_path,
    split_usable,
)

# A site manifest's rows: train, val, and test (the site's own test split, evaluated, never trained on).
SITE_SPLITS = ("train", "val", "test")
_SITE_NAME = re.compile(r"^site[-_]?\d+$")
# (location name, manifest path, splits the loader uses from it; None: a lone manifest, all rows)
Located = tuple[str, Path, tuple[str, ...] | None]


@dataclass
class CheckReport:
    """What `check_data` found: problems (errors first), usable/total rows per place and split, classes."""

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


# --------------------------------------------------------------------------- the audit


def check_data(path: str | os.PathLike, *, workers: int | None = None, require_mask: bool = False) -> CheckReport:
    """Check a data root (site folders + test/), a folder with a manifest.csv, or a manifest file.

    Every image and mask is decoded. See the module docstring for what is reported and how severe.
    """
    path = Path(path)
    report = CheckReport(path=str(path))
    located = _locate_manifests(path, report.problems)
    if located is None:
        return report
    manifests, classes = located
    report.classes = list(classes or [])
    used: list[tuple[str, Path, Record]] = []  # (location, folder, record) of rows the loader reads
    usable_by_loc: dict[str, list[Record]] = {}
    digests: dict[str, str] = {}  # abs image path -> sha256 of its bytes
    for name, manifest, splits in manifests:
        checked = _check_manifest(report, name, manifest, splits, classes, require_mask, workers)
        if checked is None:
            continue
        rows, usable_by_loc[name], row_digests = checked
        digests.update(row_digests)
        used.extend((name, manifest.parent, r) for r in rows)
    # Leakage across sites / splits (the rows the loader reads, usable or not).
    report.problems.extend(leakage_problems(used, digests))
    report.problems.extend(_too_few_classes(path, manifests, usable_by_loc))
    report.problems = [p for p in report.problems if p.severity == ERROR] + [p for p in report.problems if p.severity != ERROR]
    return report


def _locate_manifests(path: Path, problems: list[Problem]) -> tuple[list[Located], list[str] | None] | None:
    """(the manifests to check, the classes from dataset.json or None); None (with the ERROR added
    to `problems`) when `path` is neither a data root nor a manifest nor a folder with one."""
    if not path.exists():
        problems.append(Problem(str(path), "does not exist (expected a data root, a folder with a manifest.csv or a manifest.csv)", ERROR))
        return None
    if path.is_file() or not _is_data_root(path):
        manifest = path if path.is_file() else path / MANIFEST_NAME
        if not manifest.is_file():
            problems.append(Problem(str(path), f"no {MANIFEST_NAME} and no site folders: not a data root", ERROR))
            return None
        classes = _load_classes([manifest.parent, manifest.parent.parent], problems)
        return [(manifest.parent.name or str(manifest.parent), manifest, None)], classes
    classes = _load_classes([path], problems)
    return _data_root_manifests(path, problems), classes


def _is_data_root(path: Path) -> bool:
    if (path / TEST_SITE).is_dir() or (path / DATASET_JSON).is_file() and not (path / MANIFEST_NAME).is_file():
        return True
    return any(p.is_dir() and (p / MANIFEST_NAME).is_file() for p in path.iterdir())


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


def _data_root_manifests(path: Path, problems: list[Problem]) -> list[Located]:
    """The site manifests and the test manifest of a data root; missing ones are ERRORs."""
    manifests: list[Located] = []
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
    if not manifests:
        problems.append(
            Problem(str(path), "no site folders with a manifest.csv (create them with `cxrfl data split`)", ERROR)
        )
    if (path / TEST_SITE / MANIFEST_NAME).is_file():
        manifests.append((TEST_SITE, path / TEST_SITE / MANIFEST_NAME, ("", TEST_SITE)))
    else:
        problems.append(Problem(str(path / TEST_SITE / MANIFEST_NAME), "test set missing (no test/manifest.csv)", ERROR))
    return manifests


def _check_manifest(
    report: CheckReport, name: str, manifest: Path, splits: tuple[str, ...] | None,
    classes: list[str] | None, require_mask: bool, workers: int | None,
) -> tuple[list[Record], list[Record], dict[str, str]] | None:
    """Check every row of one manifest into `report` (problems, counts); returns (rows the loader
    reads, the usable ones, abs image path -> sha256), or None when the manifest is unreadable."""
    folder, problems = manifest.parent, report.problems
    try:
        records = read_manifest(manifest)
    except ManifestError as exc:
        problems.append(_manifest_problem(manifest, exc))
        return None
    rows = []
    for r in records:
        if splits is not None and r.split not in splits:
            expected = "train, val or test" if splits == SITE_SPLITS else "test or empty"
            problems.append(Problem(
                shown_path(resolve(folder, r.image)),
                f"split {r.split!r} in {name}/{MANIFEST_NAME} is ignored by the loader (expected {expected})",
            ))
            continue
        rows.append(r)
    per_row = inspect_rows(folder, rows, classes, require_mask, True, workers, digests=True)
    ok, found = split_usable(folder, rows, [f for f, _ in per_row])
    problems.extend(found)
    digests = {_abs_image(folder, r): digest for r, (_, digest) in zip(rows, per_row) if digest is not None}
    report.counts[name] = _split_counts(name, splits, rows, ok)
    if not ok:
        problems.append(Problem(str(manifest), f"no usable images in {name} ({len(rows)} rows, 0 usable)", ERROR))
    elif splits == SITE_SPLITS and not any(r.split == "train" for r in ok):
        problems.append(Problem(str(manifest), f"no usable training images in {name}", ERROR))
    return rows, ok, digests


def _split_counts(name: str, splits: tuple[str, ...] | None, rows: list[Record], ok: list[Record]) -> dict[str, tuple[int, int]]:
    """split -> (usable rows, rows) of one manifest, in train, val, test order."""

    def bucket(r: Record) -> str:
        return r.split or ("test" if name == TEST_SITE and splits else "unassigned")

    counts: dict[str, list[int]] = {}
    for r in rows:
        counts.setdefault(bucket(r), [0, 0])[1] += 1
    for r in ok:
        counts[bucket(r)][0] += 1
    return {s: (c[0], c[1]) for s, c in sorted(counts.items(), key=lambda kv: _split_order(kv[0]))}


def _split_order(split: str) -> tuple[int, str]:
    order = {"train": 0, "val": 1, "test": 2}
    return (order.get(split, 3), split)


def _too_few_classes(path: Path, manifests: list[Located], usable_by_loc: dict[str, list[Record]]) -> list[Problem]:
    """An ERROR when the usable training labels hold fewer than 2 classes (a classifier needs 2)."""
    if manifests and all(kind is None for _, _, kind in manifests):
        pool = [r for recs in usable_by_loc.values() for r in recs]
        train = [r for r in pool if r.split == "train"] or [r for r in pool if not r.split]
    else:
        train = [r for n, recs in usable_by_loc.items() if n != TEST_SITE for r in recs if r.split == "train"]
    labels = sorted({r.label for r in train if r.label})
    if not labels or len(labels) >= 2:
        return []
    return [Problem(
        str(path),
        f"only {len(labels)} class among the usable training labels ({', '.join(labels)}); "
        "a classifier needs at least 2",
        ERROR,
    )]


def _manifest_problem(path: Path, exc: Exception) -> Problem:
    msg = str(exc)
    prefix = str(path)
    if msg.startswith(prefix):
        rest = msg[len(prefix) :]
        m = re.match(r"^:(\d+):\s*(.*)$", rest, re.S)
        msg = f"line {m.group(1)}: {m.group(2)}" if m else rest.lstrip(": ")
    return Problem(str(path), msg, ERROR)


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


# --------------------------------------------------------------------------- leakage


def leakage_problems(rows: Sequence[tuple[str, Path, Record]], digests: dict[str, str]) -> list[Problem]:
    """ERRORs for data that would leak between sites, splits or into the test set.

    rows: (location: site name or "test", manifest folder, record) of every row the loader reads
    (a site's own test rows too: a patient in its train and its test split is leakage as well);
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
            copies.setdefault(digest, {}).setdefault(place, (shown_path(resolve(folder, r.image)), patient))
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
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        digests = {p: d for p, d in zip(paths, pool.map(file_digest, paths)) if d is not None}
    problems = leakage_problems(rows, digests)
    if problems:
        shown = "; ".join(one_line(f"{p.file}: {p.reason}", 240) for p in problems[:2])
        more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
        raise ManifestError(
            f"{root}: data leakage, training refused: {shown}{more}; `cxrfl data check {root}` lists every "
            "problem; pass --allow-leakage to train anyway"
        )


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
