"""Montgomery County chest X-ray set (NLM tuberculosis screening, with manual lung masks).

Layout (SRC itself or its one sub-folder)::

    SRC/CXR_png/MCUCXR_0001_0.png                      _0 normal, _1 tuberculosis
    SRC/ManualMask/leftMask/MCUCXR_0001_0.png          same name as the image
    SRC/ManualMask/rightMask/MCUCXR_0001_0.png

The written lung mask is left OR right (OUT/masks/<stem>.png); an image whose mask halves are
missing, unreadable or of another size is skipped.
"""

from __future__ import annotations

import os

import numpy as np

from lightning_modules.data.imageio import ImageReadError, read_mask, write_png
from lightning_modules.data.importers.common import ImportResult, ImportRun, find_root
from lightning_modules.data.importers.nlm_tb import CLASSES, IMAGE_DIR, tb_images
from lightning_modules.data.manifest import ManifestError, Record

FORMAT = "montgomery"
LAYOUT = ("SRC/CXR_png/MCUCXR_0001_0.png, SRC/ManualMask/{leftMask,rightMask}/<same name>; "
          "mask = left OR right; _0 normal, _1 tuberculosis")


def import_montgomery(src: str | os.PathLike, out: str | os.PathLike) -> ImportResult:
    """Montgomery County: CXR_png/*.png, ManualMask/{leftMask,rightMask}/<same name>; mask = left OR right."""
    run = ImportRun(FORMAT, src, out)
    root = find_root(run.src, lambda p: (p / IMAGE_DIR).is_dir(), FORMAT, LAYOUT)
    mask_dirs = [root / "ManualMask" / "leftMask", root / "ManualMask" / "rightMask"]
    for d in mask_dirs:
        if not d.is_dir():
            raise ManifestError(f"{d}: mask folder not found")
    records = []
    for path, pid, label, (w, h) in tb_images(run, root):
        halves = [d / path.name for d in mask_dirs]
        absent = [m for m in halves if not m.is_file()]
        if absent:
            run.skip(path, f"mask {absent[0]} is missing")
            continue
        try:
            parts = [read_mask(m) for m in halves]
        except ImageReadError as exc:
            run.skip(path, f"mask unreadable ({exc})")
            continue
        bad = [(m, p.shape) for m, p in zip(halves, parts) if p.shape != (h, w)]
        if bad:
            run.skip(path, f"mask {bad[0][0]} is {bad[0][1][1]}x{bad[0][1][0]}, image is {w}x{h}")
            continue
        mask_path = run.mask_path(path.stem)
        write_png(mask_path, np.logical_or(parts[0], parts[1]), mask=True)
        records.append(Record(image=os.path.abspath(path), mask=str(mask_path), label=label, patient_id=pid))
    return run.finish(records, CLASSES, "segment")
