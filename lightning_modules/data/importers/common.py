"""What every importer shares: the output folder, the skip log, the final check and write.

An importer reads a source in place (it never writes there) and writes into an output folder::

    OUT/manifest.csv    one row per usable image (see manifest.COLUMNS; extra columns per format)
    OUT/dataset.json    {"classes": [...], "source": "<format>", "task_hint": "classify"|"segment", ...}
    OUT/masks/*.png     masks the importer had to create (combined left/right lungs, rasterised polygons)

Before the manifest is written every kept row is decoded exactly as ``cxrfl data check`` decodes
it (image, mask: size, emptiness), so import and check give the same verdict and the same one-line
reason for a file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Iterable

from lightning_modules.data.imageio import read_header
from lightning_modules.data.atomic import write_json
from lightning_modules.data.manifest import DATASET_JSON, MANIFEST_NAME, ManifestError, Record, natural_key, write_manifest
from lightning_modules.data.row_checks import row_problems

log = logging.getLogger("cxrfl.data")

MASK_DIR = "masks"


class ImportResult(list):
    """The imported records (a plain list of Record) plus what was skipped and why."""

    def __init__(self, records: Iterable[Record] = (), skipped: Iterable[tuple[str, str]] = ()):
        super().__init__(records)
        self.skipped: list[tuple[str, str]] = list(skipped)


class ImportRun:
    """Book-keeping of one import: output folder, skipped items, final check and write."""

    def __init__(self, fmt: str, src: str | os.PathLike, out: str | os.PathLike, *, src_is_file: bool = False):
        self.fmt = fmt
        self.src = Path(os.path.abspath(src))
        self.out = Path(os.path.abspath(out))
        self.skipped: list[tuple[str, str]] = []
        if src_is_file:
            if not self.src.is_file():
                raise ManifestError(f"{self.src}: CSV file not found")
            if (self.out / MANIFEST_NAME).resolve() == self.src.resolve():
                raise ManifestError(f"{self.src}: output would overwrite the source CSV; choose another --out")
        else:
            if not self.src.is_dir():
                raise ManifestError(f"{self.src}: source folder not found")
            if self.out.resolve().is_relative_to(self.src.resolve()):
                raise ManifestError(
                    f"{self.out}: output folder is inside the source folder {self.src}; "
                    "sources are read in place and never written to, choose another --out"
                )

    def skip(self, path: str | os.PathLike, reason: str) -> None:
        self.skipped.append((str(path), reason))
        log.warning("%s: skipped %s: %s", self.fmt, path, reason)

    def mask_path(self, stem: str) -> Path:
        return self.out / MASK_DIR / f"{stem}.png"

    def finish(self, records: list[Record], classes: list[str], task_hint: str, *,
               optional_masks: bool = False) -> ImportResult:
        """Decode every row as `data check` does, drop (or, with optional_masks, un-mask) the
        unusable ones, then write the manifest and dataset.json."""
        records = self._verify(records, classes, optional_masks)
        if not records:
            if self.skipped:
                path, reason = self.skipped[0]
                raise ManifestError(
                    f"{self.src}: no usable images: all {len(self.skipped)} item(s) were skipped "
                    f"(first: {path}: {reason}); is the source path / --root right?"
                )
            raise ManifestError(f"{self.src}: no images found for format {self.fmt!r}")
        self.out.mkdir(parents=True, exist_ok=True)
        write_manifest(self.out / MANIFEST_NAME, records)
        write_json(
            self.out / DATASET_JSON,
            {"classes": list(classes), "source": self.fmt, "task_hint": task_hint, "source_path": str(self.src)},
        )
        return ImportResult(records, self.skipped)

    def _verify(self, records: list[Record], classes: list[str], optional_masks: bool) -> list[Record]:
        kept = []
        for record, found in zip(records, row_problems(self.out, records, classes or None)):
            mask = os.path.normpath(record.mask) if record.mask else None
            if found and optional_masks and all(p.file == mask for p in found):
                for p in found:
                    log.warning("%s: mask %s not used: %s", self.fmt, p.file, p.reason)
                self._drop_created(record.mask)
                record.mask = ""
                found = []
            if not found:
                kept.append(record)
                continue
            self.skip(found[0].file, found[0].reason)
            for p in found[1:]:
                log.warning("%s: also %s: %s", self.fmt, p.file, p.reason)
            self._drop_created(record.mask)
        return kept

    def _drop_created(self, mask: str) -> None:
        """Delete a mask this import wrote (under OUT/masks/) for a row it does not keep."""
        if mask and Path(mask).parent == self.out / MASK_DIR:
            Path(mask).unlink(missing_ok=True)


def probe(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the file header, without decoding pixels; ImageReadError (with the reason
    `cxrfl data check` gives) if missing, empty, unrecognised, unreadable or too large."""
    header = read_header(path)
    return header.width, header.height


def visible_files(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    return sorted(files, key=lambda p: natural_key(p.name))


def find_root(src: Path, ok: Callable[[Path], bool], fmt: str, layout: str) -> Path:
    """src itself if it has the expected layout, else its one sub-folder that has it; `layout` is
    the format's LAYOUT (its first clause names what was expected)."""
    if ok(src):
        return src
    subs = [p for p in sorted(src.iterdir()) if p.is_dir() and not p.name.startswith((".", "__MACOSX"))]
    hits = [p for p in subs if ok(p)]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise ManifestError(f"{src}: several folders look like {fmt}: {', '.join(p.name for p in hits)}; pass one")
    raise ManifestError(f"{src}: not a {fmt} folder (expected {layout.split(';')[0]})")
