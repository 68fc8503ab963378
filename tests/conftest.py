"""Shared fixtures: a small synthetic data root, generated once per test session."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from lightning_modules.data.phantom import generate_dataset


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


@contextlib.contextmanager
def running_poc(base, sites: int = 2, he: bool = False, heartbeat_timeout: float = 60):
    """A POC (server + `sites` hospitals) on a free local port with its own HOME; always torn down.

    Yields (state, data root). After it: no POC process is left and the workspace is gone.
    """
    from cxrfl.poc import poc_down, poc_up, workspace_processes

    patch = pytest.MonkeyPatch()
    patch.setenv("HOME", str(base / "home"))  # nvflare registers admin kits under ~/.nvflare
    patch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # fl_admin.sh's python3
    data = base / "data"
    generate_dataset(data, sites=sites, per_site=16, test_size=8, size=32, seed=1)
    workspace = base / "ws"
    try:
        yield poc_up(workspace, sites, data, he=he, heartbeat_timeout=heartbeat_timeout), data
    finally:
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
