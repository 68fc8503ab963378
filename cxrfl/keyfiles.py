"""Private-key files readable by their owner only: 0600 in a 0700 folder.

NVFlare's provisioner writes `state/cert.json` (the root CA's and every participant's private key)
and its HEBuilder writes `client_context.tenseal` (the HE secret key) with the umask's mode,
0644 on most machines. `restrict_private_files` corrects them after the fact, `PrivateKeyModes`
does it as the last step of `nvflare provision` (listed first in provision/project.yml: the
provisioner finalizes its builders in reverse order).
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import tenseal as ts
from nvflare.lighter.spec import Builder

SECRET_CONTEXT = "client_context.tenseal"  # the TenSEAL context that holds the secret key
PEM_PRIVATE_KEY = b"PRIVATE KEY-----"  # BEGIN [RSA |EC |ENCRYPTED ]PRIVATE KEY-----
CONTENT_SCAN_LIMIT = 4 * 2**20  # key files are small; models and logs beside them are not read


def is_private_key_file(path: Path) -> bool:
    """A file that holds a private or secret key, by its name or its content."""
    path = Path(path)
    if path.suffix == ".key" or path.name == SECRET_CONTEXT:
        return True
    if path.name == "cert.json" and path.parent.name == "state":  # NVFlare's provisioning state
        return True
    if path.suffix == ".tenseal":
        return _private_tenseal_context(path)
    try:
        if path.stat().st_size > CONTENT_SCAN_LIMIT:
            return False
        return PEM_PRIVATE_KEY in path.read_bytes()
    except OSError:
        return False


def _private_tenseal_context(path: Path) -> bool:
    try:
        return ts.context_from(path.read_bytes()).is_private()
    except Exception:  # not a context tenseal can read: keep it private to be safe
        return True


def private_key_files(folder: Path) -> list[Path]:
    """Every private-key file under `folder` (symbolic links are not followed)."""
    found = []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            if path.is_file() and not path.is_symlink() and is_private_key_file(path):
                found.append(path)
    return sorted(found)


def make_private(path: Path) -> None:
    """A file readable and writable by its owner only, in a folder only its owner can enter."""
    path = Path(path)
    os.chmod(path, stat.S_IMODE(path.stat().st_mode) & 0o700 | 0o600)
    os.chmod(path.parent, 0o700)


def write_private_bytes(path: Path, data: bytes) -> None:
    """Write key material: the file is 0600 in a 0700 folder from its first byte on (a temp file
    beside it, renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # created 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def restrict_private_files(folder: Path) -> list[Path]:
    """Make every private-key file under `folder` 0600 and its folder 0700; returns those files."""
    files = private_key_files(folder)
    for path in files:
        make_private(path)
    return files


class PrivateKeyModes(Builder):
    """NVFlare provisioning builder: after every other builder has finalized (list it first),
    the provisioned workspace's key files are 0600 in 0700 folders."""

    def finalize(self, project, ctx) -> None:
        restrict_private_files(Path(ctx.get_workspace()))
