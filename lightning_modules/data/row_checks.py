"""Whether one manifest row is usable: the per-row checks shared by the training loader,
`cxrfl data check` and `cxrfl data import`.

`inspect_record` is the one place that decides whether a row is usable; the training loader
(`datamodule.load_item`) calls it for each row it reads, so the loader and `data check` skip the
same files for the same reasons. `usable_records` applies it to the rows of one manifest (decoded
in threads) and also drops rows that repeat an earlier row's image; `row_problems` gives each
row's problems as `data import` needs them. Every finding here is a ``warning`` `Problem` (the
loader skips that row); `check.py` adds the whole-set ``error``s.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from lightning_modules.data.imageio import (
    DECODE_BUDGET,
    ImageReadError,
    check_file,
    decode_cost,
    read_image,
    read_mask,
)
from lightning_modules.data.manifest import Record, resolve

ERROR = "error"
WARNING = "warning"


@dataclass(frozen=True)
class Problem:
    """One finding about one file: ``warning`` (the loader skips that row) or ``error`` (the set is unusable)."""

    file: str
    reason: str
    severity: str = WARNING

    def __str__(self) -> str:
        return f"{self.severity.upper()} {self.file}: {self.reason}"


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _size(arr) -> str:
    return f"{arr.shape[1]}x{arr.shape[0]}"


def shown_path(path: Path) -> str:
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
            Problem(shown_path(image_path), f"unknown label {record.label!r} (dataset.json classes: {', '.join(classes)})")
        )
    image = lung_mask = None
    try:
        if decode:
            image = read_image(image_path)
        else:
            check_file(image_path)
    except ImageReadError as exc:
        problems.append(Problem(shown_path(image_path), exc.reason))

    for column, what in (("mask", "mask"), ("opacity", "opacity mask")) if use_masks else ():
        value = getattr(record, column)
        if not value:
            if column == "mask" and require_mask:
                problems.append(Problem(shown_path(image_path), "no mask given (segmentation needs a lung mask per image)"))
            continue
        mask_path = resolve(folder, value)
        try:
            if not decode:
                check_file(mask_path)
                continue
            mask = read_mask(mask_path)
        except ImageReadError as exc:
            problems.append(Problem(shown_path(mask_path), f"{what} unusable: {exc.reason}"))
            continue
        if image is not None and mask.shape != image.shape:
            problems.append(
                Problem(
                    shown_path(mask_path),
                    f"{what} size {_size(mask)} differs from image size {_size(image)} ({image_path.name})",
                )
            )
        elif column == "mask" and not mask.any():
            problems.append(Problem(shown_path(mask_path), "mask is empty (all zero)"))
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
    per_row = inspect_rows(folder, records, classes, require_mask, decode, workers, digests=False)
    return split_usable(folder, records, [found for found, _ in per_row])


def row_problems(
    folder: str | os.PathLike, records: Sequence[Record], classes: Sequence[str] | None = None,
    require_mask: bool = False, *, workers: int | None = None,
) -> list[list[Problem]]:
    """The problems of each row, decoded exactly as `data check` decodes it (for `data import`)."""
    return [found for found, _ in inspect_rows(Path(folder), list(records), classes, require_mask, True, workers, False)]


def file_digest(path: str | os.PathLike) -> str | None:
    """sha256 of a file's bytes (streamed), or None when it is missing, empty or unreadable."""
    try:
        check_file(path)
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except (ImageReadError, OSError):
        return None


def inspect_rows(
    folder: Path, records: list[Record], classes, require_mask: bool, decode: bool, workers: int | None, digests: bool
) -> list[tuple[list[Problem], str | None]]:
    """(problems, sha256 of the image file or None) per row, decoded in threads (decoders release
    the GIL; their memory is bounded by imageio.DECODE_BUDGET, not by the thread count)."""

    def one(record: Record) -> tuple[list[Problem], str | None]:
        found = check_record(folder, record, classes, require_mask, decode)
        return found, file_digest(resolve(folder, record.image)) if digests else None

    workers = workers or default_workers()
    if workers > 1 and len(records) > 8:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(one, records))
    return [one(r) for r in records]


def split_usable(folder: Path, records: list[Record], per_row: list[list[Problem]]) -> tuple[list[Record], list[Problem]]:
    """(usable records, problems) from each row's problems, adding one for a row that repeats an
    earlier row's image."""
    ok: list[Record] = []
    problems: list[Problem] = []
    first_row: dict[str, int] = {}
    for i, (record, found) in enumerate(zip(records, per_row)):
        key = os.path.normpath(str(resolve(folder, record.image)))
        if key in first_row:
            found = found + [
                Problem(shown_path(resolve(folder, record.image)), "duplicate row: image already listed in an earlier row")
            ]
        else:
            first_row[key] = i
        if found:
            problems.extend(found)
        else:
            ok.append(record)
    return ok, problems
