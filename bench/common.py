"""What the benchmark cases share: the row of the results table, the synthetic data they train on,
a `cxrfl` command timed as a user runs it, a seeded classifier module, an update's bytes on the wire."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from nvflare.app_common.decomposers import common_decomposers
from nvflare.app_opt.pt.decomposers import TensorDecomposer
from nvflare.fuel.utils import fobs

from lightning_modules.data.phantom import generate_dataset
from lightning_modules.factory import build_module


def row(case: str, measured: float | None, target: str, ok: bool | None, unit: str = "", **detail) -> dict:
    return {"case": case, "measured": None if measured is None else round(measured, 3), "unit": unit,
            "target": target, "pass": ok, "detail": detail}


def synthetic_sites(root: Path, sites: int, train_per_site: int, size: int, test_size: int = 20) -> Path:
    """Synthetic sites with about `train_per_site` training images each (20 % more go to validation)."""
    if not (root / "dataset.json").is_file():
        generate_dataset(root, sites=sites, per_site=max(2, round(train_per_site / 0.8)), test_size=test_size,
                         size=size, seed=0)
    return root


def timed_cxrfl(args: list[str], log: Path) -> float:
    """Wall seconds of one `cxrfl` command run as a user would (its own process); raises on failure."""
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.call([sys.executable, "-m", "cxrfl", *args], stdout=out, stderr=subprocess.STDOUT,
                               env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if code != 0:
        raise RuntimeError(f"cxrfl {args[0]} failed ({code}); see {log}")
    return time.perf_counter() - start


def seeded_classifier(dm, model: str):
    torch.manual_seed(0)
    return build_module("classify", model, lr=1e-3, classes=dm.classes, class_counts=dm.class_counts("train"))


def wire_bytes(message) -> int:
    """Bytes of a message (a Shareable, a dict of tensors, a packed ciphertext) as NVFlare serialises it
    for sending (FOBS). A caller sending HE ciphertexts registers NVFlare's HE decomposers first."""
    common_decomposers.register()
    fobs.register(TensorDecomposer)
    return len(fobs.dumps(message))
