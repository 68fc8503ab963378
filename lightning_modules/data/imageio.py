"""Reading chest X-rays from disk into float32 arrays in [0, 1], whatever the container.

Handles PNG/JPEG (8/16-bit, grayscale/RGB/RGBA/palette) through Pillow and DICOM through pydicom
(rescale slope/intercept, VOI LUT windowing, MONOCHROME1 inverted so air is always dark).
Every failure is raised as `ImageReadError` with the file and the reason, so callers can log
one line and move on.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.filereader import read_file_meta_info
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import DeflatedExplicitVRLittleEndian

from lightning_modules.data.atomic import atomic_path

DICOM_SUFFIXES = {".dcm", ".dicom"}
RASTER_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
IMAGE_SUFFIXES = DICOM_SUFFIXES | RASTER_SUFFIXES

# ---- Memory bounds of decoding: the one place these numbers live -------------------------------
# Per image: the declared size (raster width x height; DICOM rows x columns x frames x samples) is
# read from the header and checked BEFORE any pixel is decoded. Larger than any real radiograph
# (~4k x 4k = 16 M); a 1 KB file declaring more (a decompression bomb) costs nothing.
MAX_PIXELS = 64_000_000
# Peak bytes one decode may take per declared pixel, its float32 result included. Measured (peak
# RSS, 3000x3000): 16-bit DICOM with rescale + window 23, RGB PNG/JPEG 13, 16-bit PNG 10, 8-bit
# PNG 7, mask 6, JPEG 2000 DICOM 4; rounded up for 32-bit and multi-sample DICOMs.
DECODE_BYTES_PER_PIXEL = 32
# What the decodes running at once in one process may take together. Every row (image + masks) of
# `data check`, `data import` and the training loader reserves its declared cost before decoding
# and waits while the budget is spent (row_checks.inspect_record), so concurrency x cost <= budget: a
# row at the limit (2 x 64 M pixels x 32 B = 4.1 GB) decodes alone, while typical 3-9 M pixel
# images (100-300 MB each) run as many at once as there are threads (at most 8).
DECODE_MEMORY_BUDGET = 2 * MAX_PIXELS * DECODE_BYTES_PER_PIXEL  # 4.1 GB
# Decoded pixels `predict` holds at once (float32: 256 MB): it decodes one image at a time and cuts
# a batch before the image that would pass this.
PREDICT_BATCH_PIXELS = MAX_PIXELS
# Reasons are printed one per line; a decoder's message (pydicom lists its plugins on several
# lines) is folded into one line and cut at this length.
MAX_REASON_CHARS = 300

# Pillow's own bomb guard at the same limit (it refuses outright above 2x, for any Pillow user in
# this process). Its warning between 1x and 2x is silenced: every open here is followed by the
# MAX_PIXELS check below, which refuses that image with a one-line reason instead.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def one_line(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """`text` with every run of whitespace (newlines included) folded to one space, cut to `limit`."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


class ImageReadError(ValueError):
    """An image or mask that cannot be used; str() is '<path>: <reason>', always one line."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = one_line(reason)
        super().__init__(f"{self.path}: {self.reason}")


@dataclass(frozen=True)
class ImageHeader:
    """What a file's header declares, read without decoding pixels."""

    width: int
    height: int
    pixels: int  # declared pixels decoded in all: width x height (x frames x samples for DICOM)
    dicom: bool

    @property
    def decode_bytes(self) -> int:
        """Peak memory a decode of this file may take."""
        return self.pixels * DECODE_BYTES_PER_PIXEL


class DecodeBudget:
    """Bytes that concurrent decodes may hold together (a weighted semaphore).

    `reserve(n)` waits until n bytes are free; a request larger than the whole budget waits until
    nothing else is reserved and then runs alone."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.in_use = 0
        self.peak = 0  # the most ever reserved at once (tests read it)
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        nbytes = max(0, min(int(nbytes), self.capacity))
        with self._cond:
            self._cond.wait_for(lambda: self.in_use == 0 or self.in_use + nbytes <= self.capacity)
            self.in_use += nbytes
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= nbytes
                self._cond.notify_all()


DECODE_BUDGET = DecodeBudget(DECODE_MEMORY_BUDGET)


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


def _stat_reason(path: Path, exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "symbolic link loop (too many levels of symbolic links)"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        if os.path.islink(path):
            return f"broken symbolic link (its target {os.readlink(path)} does not exist)"
        return "file does not exist"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return f"cannot read file ({exc.strerror or exc})"


def check_file(path: str | os.PathLike) -> Path:
    """The cheap checks before decoding: the file exists, is a regular file and is not empty."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as exc:
        raise ImageReadError(path, _stat_reason(path, exc)) from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageReadError(path, "is a directory, not an image")
    if not stat.S_ISREG(st.st_mode):
        raise ImageReadError(path, "not a regular file")
    if st.st_size == 0:
        raise ImageReadError(path, "zero-byte file")
    return path


def _dicom_dataset(path: Path):
    """The DICOM header with its pixel data left on disk (deferred) until used."""
    try:
        meta = read_file_meta_info(path)
        if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            # pydicom inflates the whole body before anything can be checked: a zip bomb
            raise ImageReadError(path, "deflated DICOM (transfer syntax Deflated Explicit VR Little Endian) is not supported")
        return pydicom.dcmread(path, defer_size=1024)
    except ImageReadError:
        raise
    except Exception as exc:  # pydicom raises many types for corrupt files
        raise ImageReadError(path, f"unreadable DICOM ({exc or exc.__class__.__name__})") from None


def _dicom_declared(path: Path, ds) -> ImageHeader:
    if "PixelData" not in ds:
        raise ImageReadError(path, "DICOM has no pixel data")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames") or 1)
        samples = int(ds.get("SamplesPerPixel") or 1)
    except (AttributeError, TypeError, ValueError):
        raise ImageReadError(path, "DICOM has no valid Rows/Columns/NumberOfFrames/SamplesPerPixel") from None
    if min(rows, cols, frames, samples) < 1:
        raise ImageReadError(path, f"DICOM declares an empty image ({cols}x{rows}, {frames} frame(s), {samples} sample(s))")
    pixels = rows * cols * frames * samples
    if pixels > MAX_PIXELS:
        raise ImageReadError(path, f"image too large (DICOM declares {cols}x{rows} x {frames} frame(s) x {samples} "
                                   f"sample(s) = {pixels} pixels, limit {MAX_PIXELS} pixels)")
    return ImageHeader(cols, rows, pixels, dicom=True)


def read_header(path: str | os.PathLike) -> ImageHeader:
    """Size and decode cost from the file header, without decoding pixels. Raises ImageReadError
    with the same reason `read_image` gives for a missing, empty, unrecognised, unreadable or
    too large file (truncated pixel data is only found by decoding)."""
    path = check_file(path)
    if is_dicom(path):
        return _dicom_declared(path, _dicom_dataset(path))
    return _raster_header(path)


def decode_cost(*paths: str | os.PathLike | None) -> int:
    """Bytes decoding these files may take at peak (0 for a file whose header is unusable: its read
    fails before decoding)."""
    total = 0
    for path in paths:
        if path is None:
            continue
        try:
            total += read_header(path).decode_bytes
        except ImageReadError:
            pass
    return total


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Return a 2-D float32 array in [0, 1] (air dark, bone bright). The declared size is checked
    against MAX_PIXELS before any pixel is decoded."""
    path = check_file(path)
    if is_dicom(path):
        return _read_dicom(path)
    return _read_raster(path)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Return a 2-D uint8 {0, 1} mask (any non-zero pixel is foreground)."""
    return (read_image(path) > 0).astype(np.uint8)


def _corrupt(exc: BaseException) -> str:
    reason = str(exc) or exc.__class__.__name__
    if "truncated" in reason.lower() or isinstance(exc, SyntaxError):
        return f"truncated or corrupt image ({reason})"
    return reason


def _to_gray(img: Image.Image, path: Path) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.float32)
        arr /= 65535.0
    elif mode == "I":
        arr = np.asarray(img, dtype=np.float32)
        arr /= 65535.0 if arr.max() > 255 else 255.0
    elif mode == "F":
        arr = np.array(img, dtype=np.float32)
        _normalise(arr)
    elif mode in ("1", "L"):
        arr = np.asarray(img if mode == "L" else img.convert("L"), dtype=np.float32)
        arr /= 255.0
    elif mode in ("LA", "RGBA", "PA", "P", "RGB", "CMYK", "YCbCr", "LAB", "HSV"):
        # Alpha is dropped, not composited: radiographs carry no meaning in transparency.
        arr = np.asarray(img.convert("RGB").convert("L"), dtype=np.float32)
        arr /= 255.0
    else:
        raise ImageReadError(path, f"unsupported pixel mode {mode!r}")
    return np.ascontiguousarray(arr, dtype=np.float32)


@contextlib.contextmanager
def _open_raster(path: Path) -> Iterator[Image.Image]:
    """Pillow's lazy open (header only) with the MAX_PIXELS check; errors as one-line reasons."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageReadError(path, f"image too large ({w}x{h} = {w * h} pixels, limit {MAX_PIXELS} pixels)")
            yield img
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image (unrecognised format)") from None
    except Image.DecompressionBombError as exc:  # Pillow's own guard, above 2 x MAX_PIXELS
        pixels = next((t for t in str(exc).replace("(", " ").split() if t.isdigit()), "?")
        raise ImageReadError(path, f"image too large ({pixels} pixels, limit {MAX_PIXELS} pixels)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(path, _corrupt(exc)) from None


def _raster_header(path: Path) -> ImageHeader:
    with _open_raster(path) as img:
        w, h = img.size
    return ImageHeader(w, h, w * h, dicom=False)


def _read_raster(path: Path) -> np.ndarray:
    with _open_raster(path) as img:
        img.load()  # forces a full decode: truncated files fail here, not later
        arr = _to_gray(img, path)
    if arr.ndim != 2 or min(arr.shape) < 8:
        raise ImageReadError(path, f"image too small ({arr.shape})")
    return arr


def _read_dicom(path: Path) -> np.ndarray:
    ds = _dicom_dataset(path)
    _dicom_declared(path, ds)  # the size limit, before the pixel data is even read
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        raise ImageReadError(path, f"cannot decode DICOM pixel data ({exc or exc.__class__.__name__})") from None
    del ds.PixelData  # the encoded bytes are no longer needed
    if pixels.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 3:
        pixels = pixels.mean(axis=-1, dtype=np.float32)
    elif pixels.ndim == 3:
        pixels = pixels[0].copy()  # multi-frame: first frame
    elif pixels.ndim == 4:
        pixels = pixels[0].mean(axis=-1, dtype=np.float32)  # multi-frame colour: first frame
    if pixels.ndim != 2:
        raise ImageReadError(path, f"unsupported DICOM pixel shape {pixels.shape}")
    arr = apply_modality_lut(pixels, ds)
    del pixels
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        arr = apply_voi_lut(arr, ds)
    arr = np.asarray(arr, dtype=np.float32)
    _normalise(arr)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        np.subtract(1.0, arr, out=arr)  # MONOCHROME1 stores air bright; flip to the usual display
    return np.ascontiguousarray(arr, dtype=np.float32)


def _normalise(arr: np.ndarray) -> None:
    """Scale a float32 array to [0, 1] in place (all zero when constant)."""
    lo, hi = float(arr.min()), float(arr.max())
    if hi > lo:
        arr -= lo
        arr /= hi - lo
    else:
        arr[...] = 0


def write_png(path: str | os.PathLike, array: np.ndarray, *, mask: bool = False) -> None:
    """Write a float [0,1] image (or {0,1} mask) as 8-bit PNG, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mask:
        data = (np.asarray(array) > 0).astype(np.uint8) * 255
    else:
        data = np.clip(np.round(np.asarray(array, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    with atomic_path(path) as tmp:  # a kill never leaves half a file; mode from the umask
        Image.fromarray(data).save(tmp, format="PNG")
