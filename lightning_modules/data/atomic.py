"""Atomic file writes (temp file in the same folder + rename) that keep the umask's permissions, and the
reader of the JSON objects they write.

`tempfile.mkstemp` creates its file 0600; renamed into place as it is, every manifest, image,
checkpoint and metrics file would be private to the writer, and a site's client running under
another account could not read what an operator prepared. The temp file is therefore given the
mode a plain ``open(path, "w")`` would have (0o666 & ~umask) before the rename. Key material is
not written through here: it is forced private where it is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import torch

_umask_lock = threading.Lock()
_umask_fallback: int | None = None


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows.

    Linux reports it in /proc/self/status. Elsewhere the only way is os.umask(x), which sets it
    while reading it: done once (under a lock) and cached, since it would race with other threads.
    """
    global _umask_fallback
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        if _umask_fallback is None:
            _umask_fallback = os.umask(0o022)
            os.umask(_umask_fallback)
        return _umask_fallback


def new_file_mode() -> int:
    """The permission bits a newly created (non-executable) file gets under the current umask."""
    return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temp file path beside `path`; on success it gets the umask's mode and is renamed
    onto `path`, on any failure it is removed and `path` keeps its previous content."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temp file, fsync, rename onto `path` (mode from the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json_object(path: str | os.PathLike) -> dict:
    """The JSON object `write_json` wrote; ValueError (one line naming the file) for anything else."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return value


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """torch.save to a temp file in the same folder, then rename: a kill never leaves half a file."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
