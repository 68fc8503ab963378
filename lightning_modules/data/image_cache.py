"""A content-addressed, on-disk cache of the deterministic per-image work (decode + resize), shared by
every process of the machine.

Centralized runs and each federated site process used to decode and resize the same files on every
start and keep a private float16 copy each. Here the result of one manifest row -- the resized image
[1,S,S] (float16, or float32 where an ROI step still has to run on it) and, where the run needs
masks, the resized lung mask [1,S,S] uint8 -- is stored once as ``.npy`` files named by the sha256 of
the row's file bytes, the size, the dtype, the decoding libraries' versions and `CACHE_VERSION`.
Processes map those files (copy-on-write), so the pages are read from disk once and held once in the
page cache, however many processes use them.

Keys hash the files' bytes on every start rather than trusting a (path, size, mtime) index: a file
rewritten with its size and mtime restored must not serve stale pixels, and hashing costs little
beside decoding (measured: 0.12 ms vs 26 ms for a 39 kB 256 px PNG, 16 ms vs 354 ms for an 8.9 MB
2048x2500 16-bit PNG, decode + resize to 224).

An entry exists only for a row that decoded cleanly with exactly these bytes, so a hit never hides
a decode problem `cxrfl data check` would report. Entries are written atomically (temp file +
fsync + rename: whole or absent after a crash) and checked on reading (loadable, right shape and
dtype); a broken one is rebuilt. The
cache folder (`$CXRFL_CACHE_DIR`, else ``$XDG_CACHE_HOME/cxrfl/images`` or ``~/.cache/cxrfl/images``;
``CXRFL_CACHE_DIR=off`` disables it) is created private (0700): its entries are patient images. A
folder that cannot be written is used read-only, or not at all, with one warning. Nothing is ever
evicted: delete the folder to reclaim the space (old `CACHE_VERSION` subfolders are dead weight).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
import weakref
from pathlib import Path
from typing import Sequence

import numpy as np

from lightning_modules.data.atomic import atomic_path
from lightning_modules.data.row_checks import file_digest

log = logging.getLogger("cxrfl.data")

# Bump whenever what a file becomes changes in this project's code: the decoders (imageio),
# deterministic_transforms, or the layout of the entries below (library upgrades are in the key
# already). Old entries are then simply never looked up again.
CACHE_VERSION = 1
CACHE_ENV = "CXRFL_CACHE_DIR"
CACHE_OFF = "off"

_IMAGE_DTYPES = (np.float16, np.float32)
_MASK_DTYPE = np.uint8


@functools.cache
def _library_versions() -> str:
    """The libraries that decode and resize: an upgrade may change what a file becomes, so it starts
    new entries rather than serve values the uncached path would no longer give."""
    import monai
    import PIL
    import pydicom
    import torch

    return " ".join(f"{m.__name__}={m.__version__}" for m in (np, torch, monai, PIL, pydicom))


def default_cache_dir() -> Path | None:
    """`$CXRFL_CACHE_DIR` (None when it is "off"), else the user's cache folder + cxrfl/images."""
    chosen = os.environ.get(CACHE_ENV, "").strip()
    if chosen.lower() == CACHE_OFF:
        return None
    if chosen:
        return Path(chosen).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or Path.home() / ".cache"
    return Path(base) / "cxrfl" / "images"


def _map_budget() -> int:
    """How many entry files one process maps before reading the rest into memory: each mapping takes
    one of the kernel's vm.max_map_count slots (65530 by default), which malloc and torch need too."""
    try:
        limit = int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        limit = 65530
    return limit // 4


class _Mappings:
    """Counts this process's live entry mappings (each is released when its last array view dies)."""

    def __init__(self, budget: int):
        self.budget, self.live = budget, 0
        self._lock = threading.Lock()

    def load(self, path: Path) -> np.ndarray:
        with self._lock:
            mapped = self.live < self.budget
            self.live += mapped
        if not mapped:
            return np.load(path, allow_pickle=False)
        try:
            # "c" (copy-on-write), not "r": the pages are shared all the same until written, and a stray
            # in-place write makes a private copy instead of a segfault or a changed cache file.
            array = np.load(path, mmap_mode="c", allow_pickle=False)
        except BaseException:
            self._release()
            raise
        if isinstance(array, np.memmap):
            weakref.finalize(array, self._release)
        else:  # a zero-size array is read, not mapped
            self._release()
        return array

    def _release(self) -> None:
        with self._lock:
            self.live -= 1


_mappings = _Mappings(_map_budget())
_unwritable: set[Path] = set()  # cache folders this process failed to write: warned about once, not retried


class ImageCache:
    """Entries of one cache folder: `key` names a row's content, `load` and `store` its arrays."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.root = self.folder / f"v{CACHE_VERSION}"

    def key(self, files: Sequence[tuple[str, Path | None]], image_size: int, dtype) -> str | None:
        """sha256 over the format version, library versions, size, dtype and each (role, file)'s bytes
        (None: no such file in the row); None when a file cannot be read (the uncached path says why)."""
        parts = [f"cxrfl-image-cache v{CACHE_VERSION}", _library_versions(), f"size={int(image_size)}",
                 f"dtype={np.dtype(dtype).name}"]
        for role, path in files:
            digest = "-" if path is None else file_digest(path)
            if digest is None:
                return None
            parts.append(f"{role}={digest}")
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def _path(self, key: str, what: str) -> Path:
        return self.root / key[:2] / f"{key}.{what}.npy"

    def load(self, key: str, image_size: int, dtype, with_mask: bool) -> tuple[np.ndarray, np.ndarray | None] | None:
        """The entry's (image, mask or None) mapped read-shared, or None when it is missing or broken."""
        shape = (1, image_size, image_size)
        image = self._read(self._path(key, "image"), shape, np.dtype(dtype))
        if image is None:
            return None
        if not with_mask:
            return image, None
        mask = self._read(self._path(key, "mask"), shape, np.dtype(_MASK_DTYPE))
        return None if mask is None else (image, mask)

    def _read(self, path: Path, shape: tuple, dtype: np.dtype) -> np.ndarray | None:
        try:
            array = _mappings.load(path)
        except OSError:  # missing, or a folder this process cannot read: a miss (`store` warns if it cannot write)
            return None
        except (ValueError, EOFError) as exc:  # what np.load raises for a truncated or garbled file
            log.warning("image cache: %s is unreadable (%s); rebuilding it", path, exc)
            return None
        if array.shape != shape or array.dtype != dtype:
            log.warning("image cache: %s holds %s %s, expected %s %s; rebuilding it",
                        path, array.dtype, array.shape, dtype, shape)
            return None
        return array

    def store(self, key: str, image: np.ndarray, mask: np.ndarray | None) -> bool:
        """Write the entry (mask first, image last); False when the folder cannot be written (one
        warning per folder and process, the first time)."""
        if image.dtype not in _IMAGE_DTYPES or (mask is not None and mask.dtype != _MASK_DTYPE):
            raise TypeError(f"image cache: entries are float16/float32 images and uint8 masks, got {image.dtype}"
                            + (f" and {mask.dtype}" if mask is not None else ""))
        if self.folder in _unwritable:
            return False
        try:
            self._make_folder(self._path(key, "image").parent)
            if mask is not None:
                _save(self._path(key, "mask"), mask)
            _save(self._path(key, "image"), image)
            return True
        except OSError as exc:
            _unwritable.add(self.folder)
            log.warning("image cache: cannot write to %s (%s); images are decoded and kept in memory instead",
                        self.folder, exc)
            return False

    def _make_folder(self, folder: Path) -> None:
        if folder.is_dir():
            return
        # patient images: the cache folder is private unless an operator made it otherwise beforehand;
        # its subfolders get the umask's mode, so a folder shared on purpose stays shared
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.mkdir(parents=True, exist_ok=True)


def _save(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to the temp name
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())  # after a crash the entry is whole or absent, never renamed-but-empty
