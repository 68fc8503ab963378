"""Shared fixtures: a small synthetic data root, generated once per test session."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

from lightning_modules.data.phantom import generate_dataset

# Tests that start servers and hospitals (POC, provisioned kits, network namespaces): one xdist worker runs
# them one after another, so two never contend for ports, kits or timing.
HOST_TEST_FILES = {"test_poc.py", "test_poc_intermittent.py", "test_poc_safety.py", "test_rehearsal.py"}


# Module-scoped fixtures that train or provision (seconds to a minute each): the tests sharing one stay on one
# worker. Cheap module fixtures (small synthetic roots) are simply built again on the other worker.
SHARED_RUN_FIXTURES = {"classify_run", "segment_run", "segmentation_run", "central_run", "trained", "ours",
                       "theirs", "contexts"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    """Groups for `pytest -n 2 --dist loadgroup` (`make test`); tests in no group go to whichever worker is
    free."""
    for item in items:
        if item.path.name in HOST_TEST_FILES:
            group = "hosts"
        else:
            shared = sorted(SHARED_RUN_FIXTURES.intersection(getattr(item, "fixturenames", ())))
            group = f"{item.path.name}:{','.join(shared)}" if shared else None
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # the host tests are the longest group (~10 min): first, so the other worker's share runs beside it
        items.sort(key=lambda item: item.path.name not in HOST_TEST_FILES)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    """Stop when xdist has dropped the groups (pytest 9.2 with pytest-xdist 3.8 does so silently): two POCs
    or two copies of a shared run at once would fail or waste minutes far from the cause."""
    host_tests = [i for i in ids if Path(i.split("::")[0]).name in HOST_TEST_FILES]
    if node.config.getvalue("dist") == "loadgroup" and host_tests and not any("@" in i for i in host_tests):
        pytest.exit(f"pytest-xdist ignored the test groups of tests/conftest.py (e.g. {host_tests[0]} has none): "
                    "use the pytest the test extras pin (pyproject.toml)", returncode=4)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread_per_worker():
    """Under xdist the two workers share the cores: two OpenMP teams of two threads on two cores spin
    against each other (measured 5x slower rounds when a machine's threads are oversubscribed)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def image_cache_dir(tmp_path_factory):
    """The image cache (lightning_modules.data.image_cache) of every test and the processes they start:
    a session folder, never the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("image-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("CXRFL_CACHE_DIR", str(folder))
    yield folder
    patch.undo()


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """3 non-IID sites x 80 phantoms at 64 px + 60 held-out test images."""
    root = tmp_path_factory.mktemp("synthetic")
    generate_dataset(root, sites=3, per_site=80, test_size=60, size=64, seed=0)
    return root


def send_signal(pids: list[int], sig: int) -> None:
    """Signal each process; one that has already ended is skipped."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


PEM_PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----")


def _holds_secret_key(path: Path) -> bool:
    """By content: a PEM private key (also inside JSON, as in NVFlare's state/cert.json), or a
    TenSEAL context with its secret key; by name: *.key."""
    if path.suffix == ".key":
        return True
    if path.stat().st_size > 16 * 2**20:
        return False
    data = path.read_bytes()
    if PEM_PRIVATE_KEY.search(data):
        return True
    if path.suffix == ".tenseal":
        import tenseal as ts

        try:
            return ts.context_from(data).is_private()
        except Exception:
            return path.name == "client_context.tenseal"
    return False


def readable_private_keys(folder: Path) -> list[str]:
    """Every file under `folder` holding a private or secret key that is not 0600 in a 0700 folder
    (group or others may read it, or enter its folder), as "MODE FOLDER_MODE PATH"; [] if none."""
    found = []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            if path.is_symlink() or not path.is_file() or not _holds_secret_key(path):
                continue
            mode, folder_mode = stat.S_IMODE(path.stat().st_mode), stat.S_IMODE(path.parent.stat().st_mode)
            if mode & 0o077 or folder_mode & 0o077:
                found.append(f"{mode:o} {folder_mode:o} {path}")
    return sorted(found)


@contextlib.contextmanager
def running_poc(base, sites: int = 2, he: bool = False, heartbeat_timeout: float = 60):
    """A POC (server + `sites` hospitals) on a free local port with its own HOME; always torn down.

    Yields (state, data root). Its key files are private to their owner. After it: no POC process
    is left and the workspace is gone (`poc down` never fails for a slow shutdown).
    """
    from cxrfl.fl.poc import poc_down, poc_up, workspace_processes

    patch = pytest.MonkeyPatch()
    patch.setenv("HOME", str(base / "home"))  # nvflare registers admin kits under ~/.nvflare
    patch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # fl_admin.sh's python3
    data = base / "data"
    generate_dataset(data, sites=sites, per_site=16, test_size=8, size=32, seed=1)
    workspace = base / "ws"
    try:
        # generous: on a busy machine the sites take a while to connect
        state = poc_up(workspace, sites, data, he=he, heartbeat_timeout=heartbeat_timeout, connect_timeout=400)
        assert readable_private_keys(workspace) == []
        yield state, data
    finally:
        if workspace.exists():  # poc_up removes what it made when provisioning fails
            poc_down(workspace, clean=True)
        patch.undo()
    assert workspace_processes(workspace) == []
    assert not workspace.exists()


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2") -> Path:
    """A minimal 16-bit DICOM file of `pixels` (CR, uncompressed)."""
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = path.stem
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
