"""Run folders: where every training command writes, and how it writes safely."""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import tempfile
from pathlib import Path

from lightning_fabric.utilities.types import _PATH
from pytorch_lightning.plugins.io import TorchCheckpointIO

from app_custom.round_recorder import atomic_torch_save
from lightning_modules.data.manifest import atomic_write_text, write_json

RUNS_DIR = Path("runs")
MIN_FREE_BYTES = 200 * 1024 * 1024


class RunDirError(RuntimeError):
    """The run folder cannot be used; raised before any training starts."""


def new_run_dir(out: str | os.PathLike | None, kind: str) -> Path:
    """The given folder, or a new timestamped folder under runs/, as an absolute path; checked
    writable with free space before any training starts."""
    if out is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = RUNS_DIR / f"{stamp}-{kind}"
    out = Path(out).absolute()
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise RunDirError(f"{out}: run folder is not writable ({exc.strerror or exc}); choose another with --out") from None
    free = shutil.disk_usage(out).free
    if free < MIN_FREE_BYTES:
        raise RunDirError(f"{out}: only {free // 2**20} MiB free on this disk; need at least "
                          f"{MIN_FREE_BYTES // 2**20} MiB for checkpoints and logs")
    return out


def save_config(run_dir: Path, config: dict) -> None:
    write_json(run_dir / "config.json", config)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes to a temp file and renames it into place, so a kill
    mid-save never leaves a truncated checkpoint (Lightning's default writes in place)."""

    def save_checkpoint(self, checkpoint: dict, path: _PATH, storage_options=None) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(checkpoint, path)


def write_test_predictions(path: Path, module, classes: list[str]) -> None:
    """test_predictions.csv of a classifier's last `trainer.test` run: image, label, predicted,
    p_<class>... (what the report's ROC curves and confusion matrices read)."""
    import csv
    import io

    import torch

    out = module.test_outputs
    probs, targets = torch.cat(out["probs"]), torch.cat(out["target"])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "label", "predicted"] + [f"p_{c}" for c in classes])
    for image, t, p in zip(out["id"], targets.tolist(), probs.tolist()):
        w.writerow([image, classes[t], classes[max(range(len(p)), key=p.__getitem__)]] + [f"{x:.6f}" for x in p])
    atomic_write_text(path, buf.getvalue())
