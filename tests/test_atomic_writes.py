"""Checkpoints, round models, manifests and metric files are written to a temp file and renamed:
a write that fails, or a process killed while writing, leaves the previous file whole and no
temp file behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from lightning_modules.data.atomic import atomic_torch_save, write_json
from cxrfl.runs import AtomicCheckpointIO


class Unpicklable:
    def __reduce__(self):
        raise OSError("No space left on device")


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".tmp")


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    model, manifest, ckpt = tmp_path / "global_round_001.pt", tmp_path / "split.json", tmp_path / "last.ckpt"
    atomic_torch_save({"model": {"w": torch.ones(3)}}, model)
    write_json(manifest, {"train": ["a.png"]})
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}}, ckpt)

    with pytest.raises(OSError, match="No space"):
        atomic_torch_save({"model": {"w": Unpicklable()}}, model)
    with pytest.raises(OSError, match="No space"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": Unpicklable()}, ckpt)

    def disk_full(fd):
        raise OSError("No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_json(manifest, {"train": ["b.png"]})
    monkeypatch.undo()

    assert torch.equal(torch.load(model, weights_only=False)["model"]["w"], torch.ones(3))
    assert json.loads(manifest.read_text()) == {"train": ["a.png"]}
    assert torch.equal(torch.load(ckpt, weights_only=False)["state_dict"]["w"], torch.ones(2))
    assert _leftovers(tmp_path) == []


def test_a_process_killed_while_writing_leaves_a_whole_file(tmp_path):
    """SIGKILL a writer that keeps replacing a ~40 MB model file and a JSON file: whatever moment
    the kill lands, both files load and hold one complete version."""
    target, manifest = tmp_path / "global_final.pt", tmp_path / "round_metrics.json"
    writer = textwrap.dedent(f"""
        import torch
        from lightning_modules.data.atomic import atomic_torch_save
        from lightning_modules.data.atomic import write_json
        version = 0
        while True:
            atomic_torch_save({{"version": version, "model": {{"w": torch.full((10_000_000,), float(version))}}}},
                              {str(target)!r})
            write_json({str(manifest)!r}, {{"version": version, "rows": list(range(100_000))}})
            version += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", writer], cwd=os.getcwd(), start_new_session=True)
    try:
        deadline = time.time() + 120
        while not manifest.is_file():
            assert proc.poll() is None and time.time() < deadline, "the writer did not start"
            time.sleep(0.1)
        time.sleep(1.5)  # several versions in, somewhere inside a write
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    saved = torch.load(target, weights_only=False)
    assert torch.all(saved["model"]["w"] == saved["version"])
    assert json.loads(manifest.read_text())["rows"][-1] == 99_999
