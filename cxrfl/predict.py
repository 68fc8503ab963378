"""`cxrfl predict`: run a trained classifier (and segmenter) on image files, with lung masks and
Grad-CAM overlays, preprocessing every image exactly as the model's training data was."""

from __future__ import annotations

import csv
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cxrfl.models import Classifier
from cxrfl.runs import predicted_index
from lightning_modules.data.imageio import (
    IMAGE_SUFFIXES,
    PREDICT_BATCH_PIXELS,
    ImageReadError,
    read_header,
    read_image,
    write_png,
)
from lightning_modules.data.transforms import model_inputs
from lightning_modules.interpret import heat_maps, mass_inside, overlay

CSV_NAME = "predictions.csv"


@dataclass
class Loaded:
    path: Path
    image: np.ndarray | None = None
    error: str | None = None


def collect_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files as given (whatever their suffix: a bad one gets its own error row) and, from
    folders, every file with an image suffix, recursively, in a stable order."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            found.append(item)
    return found


def _read(path: Path) -> Loaded:
    try:
        return Loaded(path, image=read_image(path))
    except (ImageReadError, OSError, ValueError) as exc:
        return Loaded(path, error=str(exc).replace("\n", " "))


def _batches(files: list[Path], batch_size: int):
    """(index of the first file, decoded files) in batches of at most `batch_size` files and
    PREDICT_BATCH_PIXELS decoded pixels, so the images held at once stay bounded whatever the
    folder holds. Sizes come from the headers, before decoding."""
    batch: list[Loaded] = []
    first = pixels = 0
    for index, path in enumerate(files):
        try:
            size = read_header(path).pixels
        except (ImageReadError, OSError, ValueError):
            size = 0  # _read reports it
        if batch and (len(batch) >= batch_size or pixels + size > PREDICT_BATCH_PIXELS):
            yield first, batch
            batch, first, pixels = [], index, 0
        batch.append(_read(path))
        pixels += size
    if batch:
        yield first, batch


def _columns(clf: Classifier) -> list[str]:
    return (["file", "status", "error", "predicted"] + [f"p_{c}" for c in clf.classes]
            + ["lung_area_fraction", "cam_in_lung", "mask_png", "gradcam_png"])


def predict(clf: Classifier, inputs: list[str | Path], out: Path, cam: str = "gradcam", batch_size: int = 8,
            log=None, calibrated: bool = False) -> dict:
    """Write per image a lung mask PNG and a Grad-CAM overlay PNG (full resolution) and one row of
    predictions.csv; returns counts and throughput. `calibrated`: the p_<class> columns are the
    temperature-scaled probabilities (the model's temperature, fitted on validation); the
    predicted class is the same either way (the threshold applies to the unscaled probability).
    `log`: where unreadable files are reported, sys.stderr as it is at the call (a default bound at
    import would keep a stream that has since been replaced and closed)."""
    log = log or sys.stderr
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = collect_inputs(inputs)
    if not files:
        raise ValueError(f"no image files found in {', '.join(map(str, inputs))}")
    partial = out / f".{CSV_NAME}.partial"
    start, ok, failed = time.time(), 0, 0
    with open(partial, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_columns(clf), lineterminator="\n")
        writer.writeheader()
        for first, batch in _batches(files, batch_size):
            good = [b for b in batch if b.error is None]
            rows = {}
            if good:
                try:
                    rows = _predict_batch(clf, good, first, out, cam, calibrated)
                except Exception as exc:  # e.g. an image too small for the network: per file, not fatal
                    for b in good:
                        b.error = f"prediction failed: {exc}"
            for index, b in enumerate(batch, start=first):
                if b.error is None and b.path in rows:
                    writer.writerow(rows[b.path])
                    ok += 1
                else:
                    writer.writerow({"file": str(b.path), "status": "error", "error": b.error})
                    print(f"cxrfl predict: {b.path}: {b.error}", file=log)
                    failed += 1
            f.flush()
    os.replace(partial, out / CSV_NAME)
    seconds = time.time() - start
    return {"images": ok, "errors": failed, "seconds": round(seconds, 2),
            "images_per_second": round(ok / seconds, 2) if seconds > 0 else None, "csv": str(out / CSV_NAME)}


def _predict_batch(clf: Classifier, batch: list[Loaded], first: int, out: Path, cam: str,
                   calibrated: bool = False) -> dict:
    x, resized, masks = model_inputs([b.image for b in batch], clf.image_size, clf.roi, clf.roi_threshold,
                                     clf.mask_predictor())
    module = clf.module
    with torch.no_grad():
        logits = module(x.to(module.device)).float().cpu()
    probs = torch.softmax(logits, dim=1)
    shown = torch.softmax(logits / clf.temperature, dim=1) if calibrated else probs
    maps = heat_maps(module, x, class_index=None, method=cam)  # for each image's predicted class
    in_lung = mass_inside(maps, masks[:, 0]) if masks is not None else None
    rows = {}
    for i, b in enumerate(batch):
        stem = f"{first + i:05d}_{b.path.stem}"
        h, w = b.image.shape
        # two classes: at the threshold chosen on validation (before: argmax, i.e. 0.5)
        row = {"file": str(b.path), "status": "ok", "error": "",
               "predicted": clf.classes[predicted_index(probs[i].tolist(), clf.threshold)]}
        row.update({f"p_{c}": f"{float(p):.6f}" for c, p in zip(clf.classes, shown[i])})
        if masks is not None:
            full_mask = _resize(masks[i, 0].numpy(), (h, w), Image.NEAREST) > 0.5
            write_png(out / f"{stem}_mask.png", full_mask.astype(np.uint8), mask=True)
            row.update(lung_area_fraction=f"{float(full_mask.mean()):.4f}", cam_in_lung=_share(float(in_lung[i])),
                       mask_png=f"{stem}_mask.png")
        heat = _resize(maps[i].numpy(), (h, w), Image.BILINEAR)
        Image.fromarray(overlay(b.image, heat)).save(out / f"{stem}_gradcam.png")
        row["gradcam_png"] = f"{stem}_gradcam.png"
        rows[b.path] = row
    return rows


def _share(value: float) -> str:
    return "" if np.isnan(value) else f"{value:.4f}"  # empty: an all-zero heat map has no mass to share


def _resize(array: np.ndarray, size_hw: tuple[int, int], resample) -> np.ndarray:
    img = Image.fromarray(array.astype(np.float32), mode="F")
    return np.asarray(img.resize((size_hw[1], size_hw[0]), resample=resample))
