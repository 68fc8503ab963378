"""Options shared by every training command, so users learn them once."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from lightning_modules.data.manifest import DATASET_JSON
from lightning_modules.data.phantom import generate_dataset

DEFAULT_DATA = Path("data/synthetic")
# The embedded default: 3 non-IID sites of 200 phantoms each + 200 held-out test images.
DEFAULT_SYNTH = {"sites": 3, "per_site": 200, "test_size": 200, "size": 256, "seed": 0}


def _number(text: str, kind=float):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a{'n integer' if kind is int else ' number'}: {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def probability(text: str) -> float:
    """Strictly between 0 and 1 (a threshold on a probability)."""
    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {value}")
    return value


def seed(text: str) -> int:
    value = _number(text, int)
    if not 0 <= value < 2**32:  # what numpy's and Lightning's seeding accept
        raise argparse.ArgumentTypeError(f"must be between 0 and {2**32 - 1}, got {value}")
    return value


def add_training_options(p: argparse.ArgumentParser, *, image_size: int, batch_size: int, lr: float) -> None:
    g = p.add_argument_group("common training options")
    g.add_argument("--data", type=Path, default=None,
                   help=f"data root with site folders and test/ (default: {DEFAULT_DATA}, the synthetic "
                   "phantom set, generated on first use)")
    g.add_argument("--image-size", type=positive_int, default=image_size, metavar="PX",
                   help=f"square input side in pixels (default {image_size})")
    g.add_argument("--batch-size", type=positive_int, default=batch_size, help=f"batch size (default {batch_size})")
    g.add_argument("--lr", type=positive_float, default=lr, help=f"learning rate (default {lr})")
    g.add_argument("--seed", type=seed, default=0, help="random seed for weights, shuffling and augmentation")
    g.add_argument("--out", type=Path, default=None, metavar="RUN_DIR",
                   help="run folder to write (default: a new timestamped folder under runs/)")
    g.add_argument("--workers", type=non_negative_int, default=0, help="DataLoader worker processes (default 0: data is cached)")
    g.add_argument("--deterministic", action="store_true",
                   help="torch's deterministic algorithms where they exist (same seed, same result also on GPU; "
                   "slower); on CPU runs with the same seed repeat without it")
    g.add_argument("--accelerator", default="auto", help="cpu, gpu or auto (default: GPU when one exists)")
    g.add_argument("--wandb", action="store_true",
                   help="also log to Weights & Biases (offline unless WANDB_API_KEY is set)")
    g.add_argument("--allow-leakage", action="store_true",
                   help="train even when the data root leaks between sites, splits or into the test set "
                   "(one patient, or identical image files, in two places; `cxrfl data check` lists them); "
                   "without it such a data root is refused")


def resolve_data_root(data: Path | None) -> Path:
    """The given data root, or the synthetic default (generated once)."""
    if data is not None:
        if not data.is_dir():
            raise SystemExit(f"cxrfl: --data {data}: folder does not exist "
                             "(create one with `cxrfl data synth` or `cxrfl data import` + `cxrfl data split`)")
        return data
    if not (DEFAULT_DATA / DATASET_JSON).is_file():
        print(f"generating the synthetic default data set in {DEFAULT_DATA} ...", flush=True)
        generate_dataset(DEFAULT_DATA, **DEFAULT_SYNTH)
    return DEFAULT_DATA
