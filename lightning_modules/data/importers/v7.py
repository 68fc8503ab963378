"""V7 Labs COVID-19 X-ray data set (github.com/v7labs/covid-19-xray-dataset), Darwin JSON annotations.

Layout (SRC itself or its one sub-folder)::

    SRC/images/<name>.(png|jpg|jpeg)
    SRC/annotations/<name>.json      V7 Darwin 1.0 ("image") or 2.0 ("item"/"slots") JSON

Every polygon / complex polygon whose name contains "lung" is rasterised into one lung mask
(OUT/masks/<name>.png); the label is the first tag annotation (lower case). Images without an
annotation file are ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from lightning_modules.data.imageio import RASTER_SUFFIXES, ImageReadError, write_png
from lightning_modules.data.importers.common import ImportResult, ImportRun, find_root, log, probe, visible_files
from lightning_modules.data.manifest import ManifestError, Record

FORMAT = "v7"
LAYOUT = ("SRC/images/*.(png|jpg|jpeg), SRC/annotations/*.json (V7 Darwin JSON); "
          "'lung' polygons rasterised to one mask, label = first tag")


def import_v7(src: str | os.PathLike, out: str | os.PathLike) -> ImportResult:
    """V7 Labs COVID-19 X-ray: images/*.(png|jpg|jpeg) + annotations/*.json (Darwin JSON)."""
    run = ImportRun(FORMAT, src, out)
    root = find_root(run.src, lambda p: (p / "images").is_dir() and (p / "annotations").is_dir(), FORMAT, LAYOUT)
    image_dir, ann_dir = root / "images", root / "annotations"
    by_stem: dict[str, Path] = {}
    for p in visible_files(image_dir):
        if p.suffix.lower() in RASTER_SUFFIXES:
            by_stem.setdefault(p.stem, p)
    used: set[Path] = set()
    records, no_lungs = [], 0
    for json_path in visible_files(ann_dir):
        if json_path.suffix.lower() != ".json":
            continue
        info = _load_darwin(json_path)
        image = image_dir / info["filename"]
        if not image.is_file():
            image = by_stem.get(Path(info["filename"]).stem, image)
        try:
            w, h = probe(image)
        except ImageReadError as exc:
            run.skip(image, f"{exc.reason} (referenced by {json_path})")
            continue
        used.add(image)
        W, H = info["width"] or w, info["height"] or h
        if (W, H) != (w, h):
            run.skip(image, f"{json_path} says {W}x{H}, image is {w}x{h}")
            continue
        mask_arr = rasterise_lungs(info["annotations"], W, H, json_path)
        mask = ""
        if mask_arr.any():
            mask_path = run.mask_path(json_path.stem)
            write_png(mask_path, mask_arr, mask=True)
            mask = str(mask_path)
        else:
            no_lungs += 1
        tags = [a.get("name") for a in info["annotations"] if "tag" in a and a.get("name")]
        label = str(tags[0]).strip().lower() if tags else ""
        records.append(Record(image=os.path.abspath(image), mask=mask, label=label, patient_id=info["patient"]))
    if no_lungs:
        log.warning("v7: %d of %d annotation file(s) have no lung polygon; kept with an empty mask", no_lungs, len(records))
    unannotated = [p for p in by_stem.values() if p not in used]
    if unannotated:
        log.warning("v7: %d image(s) in %s have no annotation file and were ignored (first: %s)",
                    len(unannotated), image_dir, unannotated[0].name)
    classes = sorted({r.label for r in records if r.label})
    return run.finish(records, classes, "segment")


def _ring_points(path_obj, json_path: Path) -> list[tuple[float, float]]:
    try:
        return [(float(p["x"]), float(p["y"])) for p in path_obj]
    except (TypeError, KeyError, ValueError):
        raise ManifestError(f"{json_path}: malformed polygon path (expected a list of {{'x':..,'y':..}})") from None


def _polygon_rings(ann: dict, json_path: Path) -> list[list[tuple[float, float]]]:
    """Polygon rings of one annotation: polygon.path, polygon.paths (Darwin 2.0), complex_polygon.path."""
    rings = []
    poly = ann.get("polygon")
    if isinstance(poly, dict):
        if "path" in poly:
            rings.append(poly["path"])
        rings.extend(poly.get("paths") or [])
    cpoly = ann.get("complex_polygon")
    if isinstance(cpoly, dict):
        rings.extend(cpoly.get("path") or [])
        rings.extend(cpoly.get("paths") or [])
    if not isinstance(rings, list) or not all(isinstance(r, list) for r in rings):
        raise ManifestError(f"{json_path}: malformed polygon in annotation {ann.get('name')!r}")
    return [_ring_points(r, json_path) for r in rings]


def _load_darwin(json_path: Path) -> dict:
    """Normalise a Darwin 1.0 (image) or 2.0 (item/slots) file to filename/width/height/patient/annotations."""
    try:
        data = json.loads(json_path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{json_path}: unparsable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{json_path}: expected a JSON object (Darwin annotation file)")
    if isinstance(data.get("image"), dict):
        info = data["image"]
        filename, original = info.get("filename"), info.get("original_filename")
        width, height = info.get("width"), info.get("height")
        meta = info.get("metadata") if isinstance(info.get("metadata"), dict) else {}
    elif isinstance(data.get("item"), dict):
        item = data["item"]
        slots = item.get("slots") if isinstance(item.get("slots"), list) else []
        slot = slots[0] if slots and isinstance(slots[0], dict) else {}
        files = slot.get("source_files") if isinstance(slot.get("source_files"), list) else []
        original = files[0].get("file_name") if files and isinstance(files[0], dict) else None
        filename = item.get("name") or original
        width, height = slot.get("width"), slot.get("height")
        meta = slot.get("metadata") if isinstance(slot.get("metadata"), dict) else {}
        info = item
    else:
        raise ManifestError(f"{json_path}: not a Darwin annotation file (no 'image' object)")
    if not filename or not isinstance(filename, str):
        raise ManifestError(f"{json_path}: no image filename")
    annotations = data.get("annotations", [])
    if not isinstance(annotations, list) or not all(isinstance(a, dict) for a in annotations):
        raise ManifestError(f"{json_path}: 'annotations' must be a list of objects")
    patient = None
    for holder in (meta, info):
        for key in ("patient_id", "patientId"):
            if holder.get(key) not in (None, ""):
                patient = str(holder[key])
                break
        if patient:
            break
    if not patient:
        patient = Path(original if isinstance(original, str) and original else filename).stem
    for name, value in (("width", width), ("height", height)):
        if value is not None and (not isinstance(value, (int, float)) or value <= 0):
            raise ManifestError(f"{json_path}: invalid image {name} {value!r}")
    return {
        "filename": filename,
        "width": int(width) if width is not None else None,
        "height": int(height) if height is not None else None,
        "patient": patient,
        "annotations": annotations,
    }


def rasterise_lungs(annotations: list[dict], width: int, height: int, json_path: Path | str = "") -> np.ndarray:
    """Union of every polygon / complex_polygon annotation whose name contains 'lung' -> uint8 {0,1} (H, W)."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for ann in annotations:
        if "lung" not in str(ann.get("name", "")).lower():
            continue
        for ring in _polygon_rings(ann, Path(json_path)):
            if len(ring) >= 3:
                draw.polygon(ring, fill=1, outline=1)
    return np.asarray(canvas, dtype=np.uint8)
