"""Write a `SplitResult` as a data root (site-1..N/, test/, dataset.json) with its summary next to it."""

from __future__ import annotations

import csv
import io
import os
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from lightning_modules.data.atomic import atomic_write_text, write_json
from lightning_modules.data.manifest import DATASET_JSON, MANIFEST_NAME, TEST_SITE, ManifestError, Record, read_dataset_info, resolve, write_manifest
from lightning_modules.data.split.partition import SplitResult
from lightning_modules.data.split.summary import describe, format_summary, summarize

SUMMARY_CSV = "split_summary.csv"
SUMMARY_MD = "split_summary.md"
# Manifest cells that hold paths (rewritten by write_data_root so they still resolve).
PATH_COLUMNS = ("image", "mask", "opacity")


def _rebase(record: Record, src_dir: Path, dest_dir: Path) -> Record:
    """Copy of `record` whose path cells are relative to `dest_dir` (absolute ones stay absolute)."""
    changes = {}
    for col in PATH_COLUMNS:
        value = getattr(record, col)
        if not value or Path(value).is_absolute():
            continue
        target = os.path.abspath(resolve(src_dir, value))
        changes[col] = Path(os.path.relpath(target, dest_dir)).as_posix()
    return replace(record, extra=dict(record.extra), **changes)


def write_data_root(
    result: SplitResult,
    out_dir: str | os.PathLike,
    classes: Sequence[str] | None,
    source_manifest_dir: str | os.PathLike,
) -> list[dict]:
    """Write `result` as a data root; returns the summary rows.

    Writes ``out_dir/site-1..N/manifest.csv`` (train and val rows, plus test rows: the site's own
    test split, when the split has one), ``out_dir/test/manifest.csv`` (the shared test set),
    ``out_dir/dataset.json`` (classes + how it was split; other keys of a dataset.json next to the
    source manifest are kept) and ``split_summary.csv`` / ``split_summary.md``. Relative image/mask
    paths (relative to `source_manifest_dir`) are rewritten relative to each new manifest's folder.
    Site folders left over from an earlier split into more sites are removed (their manifest only);
    a folder with a manifest that this module did not write makes it raise ValueError instead.
    """
    out_dir = Path(out_dir)
    src_dir = Path(os.path.abspath(source_manifest_dir))
    if classes is None:
        classes = sorted({r.label for r in result.all_records() if r.label})
    classes = [str(c) for c in classes]
    _remove_stale_sites(out_dir, result)

    out_abs = Path(os.path.abspath(out_dir))
    for name, recs in result.sites.items():
        write_manifest(out_dir / name / MANIFEST_NAME, [_rebase(r, src_dir, out_abs / name) for r in recs])
    write_manifest(out_dir / TEST_SITE / MANIFEST_NAME, [_rebase(r, src_dir, out_abs / TEST_SITE) for r in result.test])
    rows = _write_summary(out_dir, result, classes)
    write_json(out_dir / DATASET_JSON, _dataset_info(result, src_dir, classes))  # last: a root with dataset.json is complete
    return rows


def _remove_stale_sites(out_dir: Path, result: SplitResult) -> None:
    """Stale site folders would be picked up by site_dirs(): remove them only if we wrote them
    (dataset.json lists them as split sites), else raise ValueError."""
    if not out_dir.is_dir():
        return
    stale = [
        p
        for p in out_dir.iterdir()
        if p.is_dir() and p.name != TEST_SITE and p.name not in result.sites and (p / MANIFEST_NAME).is_file()
    ]
    if not stale:
        return
    try:
        previous = read_dataset_info(out_dir)
    except ManifestError:
        previous = {}
    ours = set(previous.get("sites", [])) if isinstance(previous.get("split"), dict) else set()
    foreign = [p.name for p in stale if p.name not in ours]
    if foreign:
        raise ValueError(
            f"{out_dir} already holds site folder(s) {', '.join(sorted(foreign))} that this split would not "
            "replace; write to an empty --out folder or delete them first"
        )
    for p in stale:
        (p / MANIFEST_NAME).unlink()
        try:
            p.rmdir()
        except OSError:
            pass  # other files in it: leave the folder, it is no longer a site without a manifest


def _write_summary(out_dir: Path, result: SplitResult, classes: list[str]) -> list[dict]:
    """split_summary.csv and split_summary.md; returns the summary rows."""
    rows = summarize(result, classes)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / SUMMARY_CSV, buf.getvalue())
    atomic_write_text(out_dir / SUMMARY_MD, format_summary(rows, title=f"# Site split\n\n{describe(result)}"))
    return rows


def _dataset_info(result: SplitResult, src_dir: Path, classes: list[str]) -> dict:
    """The data root's dataset.json: the source's (if any) plus classes, sites and how they were split."""
    try:
        info = dict(read_dataset_info(src_dir))
    except ManifestError:
        info = {}
    split_info = {"mode": result.mode, "seed": result.seed, **result.params, "test_preassigned": result.test_preassigned,
                  "source_dir": str(src_dir)}
    if result.source_values:
        split_info["source_values"] = dict(result.source_values)
    info.update(classes=classes, sites=list(result.sites), split=split_info)
    return info
