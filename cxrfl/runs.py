"""Run folders: where every training command writes, and how it writes safely."""

from __future__ import annotations

import csv
import datetime as _dt
import io
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from lightning_fabric.utilities.types import _PATH
from pytorch_lightning.plugins.io import TorchCheckpointIO

from lightning_modules.data.atomic import atomic_torch_save, atomic_write_text
from lightning_modules.operating_point import expected_calibration_error, metrics_at_threshold

RUNS_DIR = Path("runs")
MIN_FREE_BYTES = 200 * 1024 * 1024
# W&B's system metadata holds the process's command line (data and model paths) and host facts:
# tracking gets metrics and the configuration without paths only.
WANDB_PRIVATE_SETTINGS = {"x_disable_meta": True, "disable_code": True, "disable_git": True}


class RunDirError(RuntimeError):
    """The run folder cannot be used; raised before any training starts."""


def new_run_dir(out: str | os.PathLike | None, kind: str) -> Path:
    """A folder for a new run, as an absolute path: the given one, which must be new or empty (a
    run folder holds one run; `--resume` is the only way to continue one), or a new timestamped
    folder under runs/. Checked writable with free space before any training starts."""
    if out is None:
        out = _claim_new_folder(RUNS_DIR, f"{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{kind}")
    out = Path(out).absolute()
    if out.is_dir() and any(out.iterdir()):
        held = sorted(p.name for p in out.iterdir())
        shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        raise RunDirError(f"{out}: already holds files ({shown}); a run folder holds one run: choose a new --out "
                          "(to continue an interrupted run use --resume RUN_DIR)")
    return run_dir_ready(out)


def _claim_new_folder(parent: Path, name: str) -> Path:
    """parent/name, or name-2, name-3, ..., created here: two runs started in the same second, even in
    two processes, get folders of their own (mkdir fails on a folder another run created first)."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for n in range(1, 1000):
            folder = parent / (name if n == 1 else f"{name}-{n}")
            try:
                folder.mkdir()
                return folder
            except FileExistsError:
                continue
    except OSError as exc:
        raise RunDirError(f"{parent.absolute()}: cannot create a run folder here ({exc.strerror or exc}); "
                          "choose one with --out") from None
    raise RunDirError(f"{parent.absolute()}: 999 run folders named {name} already; choose one with --out")


def run_dir_ready(out: Path) -> Path:
    """`out` created if needed and checked writable with free space (an existing run continued)."""
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out}: exists and is not a folder; choose another with --out")
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


def finite_or_none(value) -> float | None:
    """A metric as JSON can hold it: NaN/Inf (undefined, e.g. AUROC on one class) become null."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def undefined_reason(classes: list[str], test_counts: list[int] | None) -> str:
    """Why a test metric can be undefined on this test set, for the terminal."""
    present = [c for c, n in zip(classes, test_counts or []) if n]
    if classes and test_counts is not None and len(present) < 2:
        only = f"only class {present[0]!r}" if present else "no labelled image"
        return f"the test set holds {only}"
    return "not a finite number on this test set"


def print_test_metrics(test: dict, why_undefined: str, indent: str = "  ") -> None:
    """One line per metric; an undefined one (null/NaN) prints as n/a with the reason."""
    width = max([24, *map(len, test)])
    for key in sorted(test):
        value = finite_or_none(test[key])
        shown = f"{value:.4f}" if value is not None else f"n/a ({why_undefined})"
        print(f"{indent}{key:>{width}}: {shown}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes to a temp file and renames it into place, so a kill
    mid-save never leaves a truncated checkpoint (Lightning's default writes in place)."""

    def save_checkpoint(self, checkpoint: dict, path: _PATH, storage_options=None) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(checkpoint, path)


def write_test_predictions(path: Path, module, classes: list[str], threshold: float | None = None) -> None:
    """test_predictions.csv of a classifier's last `trainer.test` run: image, label, predicted,
    p_<class>... (what the report's ROC curves and confusion matrices read). `predicted`: for two
    classes with a `threshold`, the second class where its probability >= threshold; else argmax."""
    out = module.test_outputs
    probs, targets = torch.cat(out["probs"]), torch.cat(out["target"])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "label", "predicted"] + [f"p_{c}" for c in classes])
    for image, t, p in zip(out["id"], targets.tolist(), probs.tolist()):
        w.writerow([image, classes[t], classes[predicted_index(p, threshold)]] + [f"{x:.6f}" for x in p])
    atomic_write_text(path, buf.getvalue())


def predicted_index(probs, threshold: float | None = None) -> int:
    """The predicted class of one image's class probabilities: for two classes with a decision
    threshold, 1 where p[1] >= threshold (the operating point's convention), else the argmax."""
    probs = [float(p) for p in probs]
    if threshold is not None and len(probs) == 2:
        return int(probs[1] >= threshold)
    return max(range(len(probs)), key=probs.__getitem__)


def test_at_operating_point(module, point: dict) -> dict:
    """Test metrics of a classifier's last `trainer.test` run at the operating point chosen on
    validation (the trainer's own test metrics use argmax, i.e. 0.5), and the test ECE; for more
    than two classes (no threshold) the ECE only."""
    probs, target = torch.cat(module.test_outputs["probs"]), torch.cat(module.test_outputs["target"])
    values = {"test_ece": expected_calibration_error(probs, target)}
    if point.get("threshold") is not None:
        at = metrics_at_threshold(probs[:, 1], target, point["threshold"])
        values.update({f"test_{name}_at_threshold": at[key] for name, key in [
            ("acc", "accuracy"), ("sensitivity", "sensitivity"), ("specificity", "specificity"),
            ("balanced_acc", "balanced_accuracy")]})
    return {k: finite_or_none(v) for k, v in values.items()}
