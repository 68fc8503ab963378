"""Shenzhen No.3 Hospital chest X-ray set (NLM tuberculosis screening; lung masks published separately).

Layout (SRC itself or its one sub-folder)::

    SRC/CXR_png/CHNCXR_0001_0.png             _0 normal, _1 tuberculosis
    SRC/mask/CHNCXR_0001_0_mask.png           or mask/<same name>, or masks/ instead of mask/

Images without a (usable) mask are kept with an empty mask; without a mask folder at all the
images are imported without masks.
"""

from __future__ import annotations

import os

from lightning_modules.data.importers.common import ImportResult, ImportRun, find_root, log
from lightning_modules.data.importers.nlm_tb import CLASSES, IMAGE_DIR, tb_images
from lightning_modules.data.manifest import Record

FORMAT = "shenzhen"
LAYOUT = ("SRC/CXR_png/CHNCXR_0001_0.png, SRC/mask/CHNCXR_0001_0_mask.png (or same name); "
          "images without a mask are kept; _0 normal, _1 tuberculosis")


def import_shenzhen(src: str | os.PathLike, out: str | os.PathLike) -> ImportResult:
    """Shenzhen: CXR_png/*.png, masks mask/<stem>_mask.png or mask/<name>; images without a mask kept."""
    run = ImportRun(FORMAT, src, out)
    root = find_root(run.src, lambda p: (p / IMAGE_DIR).is_dir(), FORMAT, LAYOUT)
    mask_dir = next((root / d for d in ("mask", "masks") if (root / d).is_dir()), None)
    if mask_dir is None:
        log.warning("shenzhen: %s has no mask/ folder; importing images without masks", root)
    records = []
    for path, pid, label, _ in tb_images(run, root):
        mask = ""
        if mask_dir is not None:
            candidates = [mask_dir / f"{path.stem}_mask.png", mask_dir / path.name, mask_dir / f"{path.stem}.png"]
            found = next((m for m in candidates if m.is_file()), None)
            mask = os.path.abspath(found) if found is not None else ""
        records.append(Record(image=os.path.abspath(path), mask=mask, label=label, patient_id=pid))
    result = run.finish(records, CLASSES, "segment", optional_masks=True)  # unusable masks: logged, dropped
    unmasked = sum(not r.mask for r in result)
    if unmasked and mask_dir is not None:
        log.warning("shenzhen: %d of %d image(s) have no usable mask in %s; kept with an empty mask",
                    unmasked, len(result), mask_dir)
    return result
