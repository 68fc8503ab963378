"""Reading chest X-rays from disk into float32 arrays in [0, 1], whatever the container.

Handles PNG/JPEG (8/16-bit, grayscale/RGB/RGBA/palette) through Pillow and DICOM through pydicom
(rescale slope/intercept, VOI LUT windowing, MONOCHROME1 inverted so air is always dark).
Every failure is raised as `ImageReadError` with the file and the reason, so callers can log
one line and move on.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

DICOM_SUFFIXES = {".dcm", ".dicom"}
RASTER_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
IMAGE_SUFFIXES = DICOM_SUFFIXES | RASTER_SUFFIXES
# Larger than any real radiograph (~4k x 4k); guards against decompression bombs.
MAX_PIXELS = 64_000_000


class ImageReadError(ValueError):
    """An image or mask that cannot be used; str() is '<path>: <reason>'."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def is_dicom(path: str | os.PathLike) -> bool:
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
        return len(head) == 132 and head[128:132] == b"DICM"
    except OSError:
        return False


def check_file(path: str | os.PathLike) -> Path:
    """The cheap checks before decoding: the file exists, is a file and is not empty."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "file does not exist")
    if path.is_dir():
        raise ImageReadError(path, "is a directory, not an image")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "zero-byte file")
    return path


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Return a 2-D float32 array in [0, 1] (air dark, bone bright)."""
    path = check_file(path)
    if is_dicom(path):
        return _read_dicom(path)
    return _read_raster(path)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Return a 2-D uint8 {0, 1} mask (any non-zero pixel is foreground)."""
    return (read_image(path) > 0).astype(np.uint8)


def _to_gray(img: Image.Image, path: Path) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.float32) / 65535.0
    elif mode == "I":
        arr = np.asarray(img, dtype=np.float32)
        hi = 65535.0 if arr.max() > 255 else 255.0
        arr = arr / hi
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    elif mode in ("1", "L"):
        arr = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    elif mode in ("LA", "RGBA", "PA", "P", "RGB", "CMYK", "YCbCr", "LAB", "HSV"):
        # Alpha is dropped, not composited: radiographs carry no meaning in transparency.
        arr = np.asarray(img.convert("RGB").convert("L"), dtype=np.float32) / 255.0
    else:
        raise ImageReadError(path, f"unsupported pixel mode {mode!r}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _read_raster(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageReadError(path, f"image too large ({w}x{h} pixels, limit {MAX_PIXELS})")
            img.load()  # forces a full decode: truncated files fail here, not later
            arr = _to_gray(img, path)
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc) or exc.__class__.__name__
        if "truncated" in reason.lower() or isinstance(exc, SyntaxError):
            reason = f"truncated or corrupt image ({reason})"
        raise ImageReadError(path, reason) from None
    if arr.ndim != 2 or min(arr.shape) < 8:
        raise ImageReadError(path, f"image too small ({arr.shape})")
    return arr


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises many types for corrupt files
        raise ImageReadError(path, f"unreadable DICOM ({exc})") from None
    if "PixelData" not in ds:
        raise ImageReadError(path, "DICOM has no pixel data")
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        raise ImageReadError(path, f"cannot decode DICOM pixel data ({exc})") from None
    if pixels.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 3:
        pixels = pixels.astype(np.float32).mean(axis=-1)
    elif pixels.ndim == 3:
        pixels = pixels[0]  # multi-frame: first frame
    if pixels.ndim != 2:
        raise ImageReadError(path, f"unsupported DICOM pixel shape {pixels.shape}")
    arr = apply_modality_lut(pixels, ds)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        arr = apply_voi_lut(arr, ds)
    arr = np.asarray(arr, dtype=np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        arr = 1.0 - arr  # MONOCHROME1 stores air bright; flip to the usual display
    return np.ascontiguousarray(arr, dtype=np.float32)


def write_png(path: str | os.PathLike, array: np.ndarray, *, mask: bool = False) -> None:
    """Write a float [0,1] image (or {0,1} mask) as 8-bit PNG, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mask:
        data = (np.asarray(array) > 0).astype(np.uint8) * 255
    else:
        data = np.clip(np.round(np.asarray(array, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        Image.fromarray(data).save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
