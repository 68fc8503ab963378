"""What the two NLM tuberculosis sets (Montgomery County, Shenzhen) share: images in CXR_png/
named <patient>_0.png (normal) or <patient>_1.png (tuberculosis)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from lightning_modules.data.imageio import RASTER_SUFFIXES, ImageReadError
from lightning_modules.data.importers.common import ImportRun, probe, visible_files

CLASSES = ["normal", "tuberculosis"]
IMAGE_DIR = "CXR_png"


def tb_label(stem: str) -> tuple[str, str] | None:
    """'MCUCXR_0001_0' -> ('MCUCXR_0001', 'normal'); None if the name has no _0/_1 suffix."""
    m = re.match(r"^(.+)_([01])$", stem)
    if not m:
        return None
    return m.group(1), CLASSES[int(m.group(2))]


def tb_images(run: ImportRun, root: Path) -> Iterator[tuple[Path, str, str, tuple[int, int]]]:
    """(image, patient id, label, (w, h)) for every usable CXR_png image; skips are logged."""
    for path in visible_files(root / IMAGE_DIR):
        if path.suffix.lower() not in RASTER_SUFFIXES:
            run.skip(path, f"not an image file (suffix {path.suffix or 'none'!r})")
            continue
        parsed = tb_label(path.stem)
        if parsed is None:
            run.skip(path, "file name does not end in _0 (normal) or _1 (tuberculosis)")
            continue
        try:
            size = probe(path)
        except ImageReadError as exc:
            run.skip(path, exc.reason)
            continue
        yield path, parsed[0], parsed[1], size
