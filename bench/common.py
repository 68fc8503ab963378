"""What the benchmark cases share: the row of the results table, the synthetic data they train on,
a `cxrfl` command timed as a user runs it, a seeded classifier module."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

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
