"""Real-data adapters: each public data set's native layout -> one pooled manifest.

Every adapter reads a source folder in place (it never writes there) and writes into an output
folder::

    OUT/manifest.csv    one row per usable image (see manifest.COLUMNS; extra columns per format)
    OUT/dataset.json    {"classes": [...], "source": "<format>", "task_hint": "classify"|"segment", ...}
    OUT/masks/*.png     masks the adapter had to create (combined left/right lungs, rasterised polygons)

All paths written to the manifest are absolute, so the manifest can be read from anywhere and
copied into site folders by ``cxrfl data split``.

Errors. A problem with the source as a whole (a missing folder or CSV, missing CSV columns,
unparsable annotation JSON, labels that contradict each other, nothing usable at all) raises
``ManifestError`` naming the file and the problem. A single unusable item (a missing, empty or
unrecognisable image, a missing mask) is skipped and reported through the ``cxrfl.data`` logger
with one line naming the file and why, so one bad file never aborts an import. Before the manifest is
written every kept row is decoded exactly as ``cxrfl data check`` decodes it (image, mask: size,
emptiness), so import and check give the same verdict and the same one-line reason for a file.

Each adapter returns an ``ImportResult``: a ``list`` of ``Record`` that also carries ``skipped``
(the (path, reason) pairs of the skipped items).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image, ImageDraw

from lightning_modules.data.check import row_problems
from lightning_modules.data.imageio import (
    RASTER_SUFFIXES,
    ImageReadError,
    read_header,
    read_mask,
    write_png,
)
from lightning_modules.data.manifest import (
    DATASET_JSON,
    MANIFEST_NAME,
    ManifestError,
    Record,
    natural_key,
    read_csv,
    write_json,
    write_manifest,
)

log = logging.getLogger("cxrfl.data")

MASK_DIR = "masks"
RSNA_CLASSES = ["Normal", "No Lung Opacity / Not Normal", "Lung Opacity"]
RSNA_LABELS_CSV = "stage_2_train_labels.csv"
RSNA_CLASS_CSV = "stage_2_detailed_class_info.csv"
RSNA_IMAGE_DIR = "stage_2_train_images"
_SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test", "holdout": "test",
}


class ImportResult(list):
    """The imported records (a plain list of Record) plus what was skipped and why."""

    def __init__(self, records: Iterable[Record] = (), skipped: Iterable[tuple[str, str]] = ()):
        super().__init__(records)
        self.skipped: list[tuple[str, str]] = list(skipped)


# ----------------------------------------------------------------------------------------- helpers


class _Import:
    """Book-keeping shared by the adapters: output folder, skipped items, final write."""

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


def _abs(path: str | os.PathLike) -> str:
    return os.path.abspath(path)


def probe(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the file header, without decoding pixels; ImageReadError (with the reason
    `cxrfl data check` gives) if missing, empty, unrecognised, unreadable or too large."""
    header = read_header(path)
    return header.width, header.height


def _visible_files(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    return sorted(files, key=lambda p: natural_key(p.name))


def _find_root(src: Path, ok: Callable[[Path], bool], what: str) -> Path:
    """src itself if it has the expected layout, else its one sub-folder that has it."""
    if ok(src):
        return src
    subs = [p for p in sorted(src.iterdir()) if p.is_dir() and not p.name.startswith((".", "__MACOSX"))]
    hits = [p for p in subs if ok(p)]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise ManifestError(f"{src}: several folders look like {what}: {', '.join(p.name for p in hits)}; pass one")
    raise ManifestError(f"{src}: not a {what} folder (expected {_LAYOUT_SHORT.get(what, what)})")


# ----------------------------------------------------------------------------------------- Kermany

_KERMANY_CLASSES = ["normal", "pneumonia"]
_KERMANY_SPLITS = ("train", "val", "test")


def kermany_patient_id(name: str) -> str:
    """person1_bacteria_1.jpeg -> person1; IM-0115-0001.jpeg -> IM-0115; NORMAL2-IM-1427-0001 -> NORMAL2-IM-1427."""
    stem = Path(name).stem
    m = re.match(r"^(person\d+)_", stem, re.IGNORECASE)
    if m:
        return m.group(1)
    m = re.match(r"^(.*IM-\d+)-\d+$", stem, re.IGNORECASE)
    if m:
        return m.group(1)
    return stem


def kermany(src: str | os.PathLike, out: str | os.PathLike) -> ImportResult:
    """Kermany 'Chest X-Ray Images (Pneumonia)': SRC/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg."""
    run = _Import("kermany", src, out)
    root = _find_root(run.src, lambda p: any((p / s).is_dir() for s in _KERMANY_SPLITS), "kermany")
    records = []
    for split in _KERMANY_SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        class_dirs = {p.name.lower(): p for p in split_dir.iterdir() if p.is_dir() and p.name.lower() in _KERMANY_CLASSES}
        if not class_dirs:
            raise ManifestError(f"{split_dir}: no NORMAL/ or PNEUMONIA/ class folder")
        for label in _KERMANY_CLASSES:
            if label not in class_dirs:
                continue
            for path in _visible_files(class_dirs[label]):
                if path.suffix.lower() not in RASTER_SUFFIXES:
                    run.skip(path, f"not an image file (suffix {path.suffix or 'none'!r})")
                    continue
                try:
                    probe(path)
                except ImageReadError as exc:
                    run.skip(path, exc.reason)
                    continue
                records.append(
                    Record(
                        image=_abs(path),
                        label=label,
                        patient_id=kermany_patient_id(path.name),
                        split="test" if split == "test" else "",
                        extra={"source_split": split},
                    )
                )
    return run.finish(records, _KERMANY_CLASSES, "classify")


# -------------------------------------------------------------------------------------------- RSNA


def _fmt_num(value: str, path: Path, line_no: int, col: str) -> str:
    try:
        num = float(value)
    except ValueError:
        raise ManifestError(f"{path}:{line_no}: column {col!r} is not a number ({value!r})") from None
    if not np.isfinite(num):
        raise ManifestError(f"{path}:{line_no}: column {col!r} is not finite ({value!r})")
    return f"{num:g}"


def rsna(src: str | os.PathLike, out: str | os.PathLike, classes: str = "three") -> ImportResult:
    """RSNA Pneumonia Detection: stage_2_train_labels.csv, stage_2_detailed_class_info.csv, stage_2_train_images/.

    classes="three": labels Normal / No Lung Opacity / Not Normal / Lung Opacity (the CXR-FL setting);
    classes="binary": normal / pneumonia from the maximum Target. Boxes go into the extra column
    ``boxes`` as "x,y,w,h;x,y,w,h".
    """
    if classes not in ("binary", "three"):
        raise ManifestError(f"rsna: classes must be 'binary' or 'three', not {classes!r}")
    run = _Import("rsna", src, out)
    root = _find_root(run.src, lambda p: (p / RSNA_LABELS_CSV).is_file(), "rsna")
    labels_csv = root / RSNA_LABELS_CSV
    class_csv = root / RSNA_CLASS_CSV
    image_dir = root / RSNA_IMAGE_DIR
    if not image_dir.is_dir():
        raise ManifestError(f"{image_dir}: image folder not found")

    _, rows = read_csv(labels_csv, ["patientId", "x", "y", "width", "height", "Target"])
    targets: dict[str, int] = {}
    boxes: dict[str, list[str]] = {}
    for line_no, row in rows:
        pid = row["patientId"]
        if not pid:
            raise ManifestError(f"{labels_csv}:{line_no}: empty patientId")
        if row["Target"] not in ("0", "1"):
            raise ManifestError(f"{labels_csv}:{line_no}: Target must be 0 or 1, not {row['Target']!r}")
        target = int(row["Target"])
        targets[pid] = max(targets.get(pid, 0), target)
        boxes.setdefault(pid, [])
        if target == 1:
            box = [_fmt_num(row[c], labels_csv, line_no, c) for c in ("x", "y", "width", "height")]
            boxes[pid].append(",".join(box))

    detailed: dict[str, str] | None = None
    if class_csv.is_file() or classes == "three":
        _, class_rows = read_csv(class_csv, ["patientId", "class"])
        detailed = {}
        for line_no, row in class_rows:
            pid, cls = row["patientId"], row["class"]
            if cls not in RSNA_CLASSES:
                raise ManifestError(
                    f"{class_csv}:{line_no}: unknown class {cls!r} (expected one of {', '.join(map(repr, RSNA_CLASSES))})"
                )
            if detailed.setdefault(pid, cls) != cls:
                raise ManifestError(f"{class_csv}:{line_no}: patient {pid} has two classes ({detailed[pid]!r} and {cls!r})")
        for pid, target in targets.items():
            cls = detailed.get(pid)
            if cls is not None and (target == 1) != (cls == "Lung Opacity"):
                raise ManifestError(
                    f"patient {pid}: labels disagree: {labels_csv} has Target={target} but {class_csv} "
                    f"has class {cls!r}"
                )
        extra_pids = [pid for pid in detailed if pid not in targets]
        if extra_pids:
            log.warning(
                "rsna: %d patient(s) in %s are not in %s and were ignored (first: %s)",
                len(extra_pids), class_csv, labels_csv, extra_pids[0],
            )

    records = []
    for pid, target in targets.items():
        image = image_dir / f"{pid}.dcm"
        if classes == "three":
            cls = detailed.get(pid)
            if cls is None:
                run.skip(image, f"patient {pid} has no class in {class_csv}")
                continue
            label = cls
        else:
            label = "pneumonia" if target else "normal"
        try:
            probe(image)
        except ImageReadError as exc:
            run.skip(image, exc.reason)
            continue
        records.append(Record(image=_abs(image), label=label, patient_id=pid, extra={"boxes": ";".join(boxes[pid])}))
    return run.finish(records, RSNA_CLASSES if classes == "three" else ["normal", "pneumonia"], "classify")


# --------------------------------------------------------------------------- Montgomery / Shenzhen

_TB_CLASSES = ["normal", "tuberculosis"]


def _tb_label(stem: str) -> tuple[str, str] | None:
    """'MCUCXR_0001_0' -> ('MCUCXR_0001', 'normal'); None if the name has no _0/_1 suffix."""
    m = re.match(r"^(.+)_([01])$", stem)
    if not m:
        return None
    return m.group(1), _TB_CLASSES[int(m.group(2))]


def _tb_images(run: _Import, root: Path) -> Iterable[tuple[Path, str, str, tuple[int, int]]]:
    """(image, patient id, label, (w, h)) for every usable CXR_png image; skips are logged."""
    for path in _visible_files(root / "CXR_png"):
        if path.suffix.lower() not in RASTER_SUFFIXES:
            run.skip(path, f"not an image file (suffix {path.suffix or 'none'!r})")
            continue
        parsed = _tb_label(path.stem)
        if parsed is None:
            run.skip(path, "file name does not end in _0 (normal) or _1 (tuberculosis)")
            continue
        try:
            size = probe(path)
        except ImageReadError as exc:
            run.skip(path, exc.reason)
            continue
        yield path, parsed[0], parsed[1], size


def montgomery(src: str | os.PathLike, out: str | os.PathLike) -> ImportResult:
    """Montgomery County: CXR_png/*.png, ManualMask/{leftMask,rightMask}/<same name>; mask = left OR right."""
    run = _Import("montgomery", src, out)
    root = _find_root(run.src, lambda p: (p / "CXR_png").is_dir(), "montgomery")
    mask_dirs = [root / "ManualMask" / "leftMask", root / "ManualMask" / "rightMask"]
    for d in mask_dirs:
        if not d.is_dir():
            raise ManifestError(f"{d}: mask folder not found")
    records = []
    for path, pid, label, (w, h) in _tb_images(run, root):
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
        records.append(Record(image=_abs(path), mask=str(mask_path), label=label, patient_id=pid))
    return run.finish(records, _TB_CLASSES, "segment")


def shenzhen(src: str | os.PathLike, out: str | os.PathLike) -> ImportResult:
    """Shenzhen: CXR_png/*.png, masks mask/<stem>_mask.png or mask/<name>; images without a mask kept."""
    run = _Import("shenzhen", src, out)
    root = _find_root(run.src, lambda p: (p / "CXR_png").is_dir(), "shenzhen")
    mask_dir = next((root / d for d in ("mask", "masks") if (root / d).is_dir()), None)
    if mask_dir is None:
        log.warning("shenzhen: %s has no mask/ folder; importing images without masks", root)
    records = []
    for path, pid, label, _ in _tb_images(run, root):
        mask = ""
        if mask_dir is not None:
            candidates = [mask_dir / f"{path.stem}_mask.png", mask_dir / path.name, mask_dir / f"{path.stem}.png"]
            found = next((m for m in candidates if m.is_file()), None)
            mask = _abs(found) if found is not None else ""
        records.append(Record(image=_abs(path), mask=mask, label=label, patient_id=pid))
    result = run.finish(records, _TB_CLASSES, "segment", optional_masks=True)  # unusable masks: logged, dropped
    unmasked = sum(not r.mask for r in result)
    if unmasked and mask_dir is not None:
        log.warning("shenzhen: %d of %d image(s) have no usable mask in %s; kept with an empty mask",
                    unmasked, len(result), mask_dir)
    return result


# ---------------------------------------------------------------------------------------------- V7


def _v7_points(path_obj, json_path: Path) -> list[tuple[float, float]]:
    try:
        return [(float(p["x"]), float(p["y"])) for p in path_obj]
    except (TypeError, KeyError, ValueError):
        raise ManifestError(f"{json_path}: malformed polygon path (expected a list of {{'x':..,'y':..}})") from None


def _v7_paths(ann: dict, json_path: Path) -> list[list[tuple[float, float]]]:
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
    return [_v7_points(r, json_path) for r in rings]


def _v7_load(json_path: Path) -> dict:
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
        for ring in _v7_paths(ann, Path(json_path)):
            if len(ring) >= 3:
                draw.polygon(ring, fill=1, outline=1)
    return np.asarray(canvas, dtype=np.uint8)


def v7(src: str | os.PathLike, out: str | os.PathLike) -> ImportResult:
    """V7 Labs COVID-19 X-ray: images/*.(png|jpg|jpeg) + annotations/*.json (Darwin JSON)."""
    run = _Import("v7", src, out)
    root = _find_root(run.src, lambda p: (p / "images").is_dir() and (p / "annotations").is_dir(), "v7")
    image_dir, ann_dir = root / "images", root / "annotations"
    by_stem: dict[str, Path] = {}
    for p in _visible_files(image_dir):
        if p.suffix.lower() in RASTER_SUFFIXES:
            by_stem.setdefault(p.stem, p)
    used: set[Path] = set()
    records, no_lungs = [], 0
    for json_path in _visible_files(ann_dir):
        if json_path.suffix.lower() != ".json":
            continue
        info = _v7_load(json_path)
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
        records.append(Record(image=_abs(image), mask=mask, label=label, patient_id=info["patient"]))
    if no_lungs:
        log.warning("v7: %d of %d annotation file(s) have no lung polygon; kept with an empty mask", no_lungs, len(records))
    unannotated = [p for p in by_stem.values() if p not in used]
    if unannotated:
        log.warning("v7: %d image(s) in %s have no annotation file and were ignored (first: %s)",
                    len(unannotated), image_dir, unannotated[0].name)
    classes = sorted({r.label for r in records if r.label})
    return run.finish(records, classes, "segment")


# --------------------------------------------------------------------------------------- generic CSV


def generic_csv(
    src: str | os.PathLike,
    out: str | os.PathLike,
    image_col: str = "image",
    label_col: str | None = None,
    mask_col: str | None = None,
    patient_col: str | None = None,
    split_col: str | None = None,
    root: str | os.PathLike | None = None,
    classes: list[str] | str | None = None,
) -> ImportResult:
    """Any CSV with one row per image.

    image_col is required. label_col / mask_col / patient_col default to 'label' / 'mask' /
    'patient_id' and are used when present; a column named explicitly must exist. Without a
    patient column the patient id is the image file's stem. split_col (only when given) maps
    train/val/test (and training/validation/valid/testing). Relative paths are resolved against
    root (default: the CSV's folder). classes: list (or comma-separated string) fixing the class
    order; default the sorted labels seen.
    """
    run = _Import("csv", src, out, src_is_file=True)
    csv_path = run.src
    explicit = [c for c in (image_col, label_col, mask_col, patient_col, split_col) if c]
    header, rows = read_csv(csv_path, explicit)
    label_col = label_col or ("label" if "label" in header else None)
    mask_col = mask_col or ("mask" if "mask" in header else None)
    patient_col = patient_col or ("patient_id" if "patient_id" in header else None)
    if label_col is None and mask_col is None:
        raise ManifestError(
            f"{csv_path}: no label or mask column (name them with --label-col / --mask-col; "
            f"columns found: {', '.join(repr(c) for c in header)})"
        )
    base = Path(os.path.abspath(root)) if root is not None else csv_path.parent
    if not base.is_dir():
        raise ManifestError(f"{base}: root folder not found")
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",") if c.strip()]
    records, seen = [], set()
    for line_no, row in rows:
        where = f"{csv_path}:{line_no}"
        cell = row.get(image_col, "")
        if not cell:
            run.skip(where, f"empty {image_col!r} cell")
            continue
        image = base / cell
        label = row.get(label_col, "") if label_col else ""
        if classes and label and label not in classes:
            raise ManifestError(f"{where}: label {label!r} is not one of the classes {', '.join(map(repr, classes))}")
        split = ""
        if split_col:
            raw = row.get(split_col, "")
            if raw:
                split = _SPLIT_ALIASES.get(raw.lower(), "")
                if not split:
                    raise ManifestError(f"{where}: unknown split {raw!r} in column {split_col!r} (expected train, val or test)")
        try:
            probe(image)
        except ImageReadError as exc:
            run.skip(image, f"{exc.reason} ({where})")
            continue
        key = os.path.abspath(image)
        if key in seen:
            run.skip(image, f"listed twice ({where})")
            continue
        seen.add(key)
        mask = ""
        mask_cell = row.get(mask_col, "") if mask_col else ""
        if mask_cell:
            mask_file = base / mask_cell
            try:
                probe(mask_file)
            except ImageReadError as exc:
                run.skip(mask_file, f"mask unusable: {exc.reason} ({where})")
                continue
            mask = _abs(mask_file)
        pid = (row.get(patient_col, "") if patient_col else "") or Path(cell).stem
        records.append(Record(image=key, mask=mask, label=label, patient_id=pid, split=split))
    class_list = list(classes) if classes else sorted({r.label for r in records if r.label})
    task_hint = "segment" if any(r.mask for r in records) else "classify"
    return run.finish(records, class_list, task_hint)


# ------------------------------------------------------------------------------------------ registry

ADAPTERS: dict[str, Callable[..., ImportResult]] = {
    "kermany": kermany,
    "rsna": rsna,
    "montgomery": montgomery,
    "shenzhen": shenzhen,
    "v7": v7,
    "csv": generic_csv,
}

# Native layout of each format, for error messages and `cxrfl data import --help`.
LAYOUTS: dict[str, str] = {
    "kermany": "SRC/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg (or SRC/chest_xray/...); "
    "labels normal/pneumonia; test/ stays the held-out test split",
    "rsna": f"SRC/{RSNA_LABELS_CSV}, SRC/{RSNA_CLASS_CSV}, SRC/{RSNA_IMAGE_DIR}/<patientId>.dcm; "
    "--classes three (default: Normal / No Lung Opacity / Not Normal / Lung Opacity) or binary (normal/pneumonia)",
    "montgomery": "SRC/CXR_png/MCUCXR_0001_0.png, SRC/ManualMask/{leftMask,rightMask}/<same name>; "
    "mask = left OR right; _0 normal, _1 tuberculosis",
    "shenzhen": "SRC/CXR_png/CHNCXR_0001_0.png, SRC/mask/CHNCXR_0001_0_mask.png (or same name); "
    "images without a mask are kept; _0 normal, _1 tuberculosis",
    "v7": "SRC/images/*.(png|jpg|jpeg), SRC/annotations/*.json (V7 Darwin JSON); "
    "'lung' polygons rasterised to one mask, label = first tag",
    "csv": "SRC is a CSV file with one row per image (columns chosen with --image-col, --label-col, ...); "
    "relative paths are resolved against --root (default: the CSV's folder)",
}
_LAYOUT_SHORT = {k: v.split(";")[0] for k, v in LAYOUTS.items()}


def import_dataset(fmt: str, src: str | os.PathLike, out: str | os.PathLike, **options) -> ImportResult:
    """Run the adapter for ``fmt``; options that are None are dropped, unknown ones raise ManifestError."""
    if fmt not in ADAPTERS:
        raise ManifestError(f"unknown data set format {fmt!r} (known: {', '.join(ADAPTERS)})")
    adapter = ADAPTERS[fmt]
    options = {k: v for k, v in options.items() if v is not None}
    accepted = [p for p in inspect.signature(adapter).parameters if p not in ("src", "out")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ManifestError(
            f"option(s) {', '.join(unknown)} do not apply to format {fmt!r}"
            + (f" (it accepts: {', '.join(accepted)})" if accepted else " (it takes no options)")
        )
    return adapter(src, out, **options)
