"""Every training command's options, generated from the config dataclasses' fields (one declaration
per option: the field, its default and its help), and the configs built from them.

Written here instead of jsonargparse/LightningCLI: those nest options by class path and word their own
errors; ours keep the flat flags and the one-line errors users and tests rely on, in ~100 lines.
"""

from __future__ import annotations

import argparse
import json
import math
import typing
from dataclasses import fields, replace
from pathlib import Path

from cxrfl.fl.config import FLConfig
from lightning_modules.config import SEED_LIMIT, ConfigError, TrainConfig
from lightning_modules.data.check import refuse_leakage
from lightning_modules.data.manifest import DATASET_JSON, ManifestError, class_names, load_split, site_dirs
from lightning_modules.data.phantom import generate_dataset
from lightning_modules.segmentation import LungSegmentation

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


def _bounded(kind, test, rule: str):
    def parse(text: str):
        value = _number(text, kind)
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {value}")
        return value
    return parse


positive_int = _bounded(int, lambda v: v >= 1, ">= 1")
non_negative_int = _bounded(int, lambda v: v >= 0, ">= 0")
positive_float = _bounded(float, lambda v: v > 0, "> 0")
non_negative_float = _bounded(float, lambda v: v >= 0, ">= 0")
probability = _bounded(float, lambda v: 0 < v < 1, "between 0 and 1 (exclusive)")
seed = _bounded(int, lambda v: 0 <= v < SEED_LIMIT, f"between 0 and {SEED_LIMIT - 1}")


def schedule(text: str) -> dict[str, str]:
    """--schedule: inline JSON or a JSON file; {site: round ranges}."""
    source = Path(text)
    raw = source.read_text() if not text.lstrip().startswith("{") and source.is_file() else text
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{text}: not JSON (nor a JSON file): {exc}") from None
    if not isinstance(value, dict) or not all(isinstance(v, (str, int)) for v in value.values()):
        raise argparse.ArgumentTypeError('expected {"site name": "round ranges like 0-2,5,7-"}')
    return {str(k): str(v) for k, v in value.items()}


PARSERS = {"positive_int": positive_int, "non_negative_int": non_negative_int, "positive_float": positive_float,
           "non_negative_float": non_negative_float, "probability": probability, "seed": seed, "schedule": schedule,
           "path": Path}


def add_config_options(parser: argparse.ArgumentParser, config: type[TrainConfig], scope: str,
                       task: str | None = None, task_required: bool = True) -> None:
    """One option per field of `config` shown in `scope` ("central" | "fl"); `task` fixes the task
    (a job.py of one task) instead of asking for it. Unset options stay None: the dataclass default."""
    group = parser.add_argument_group("training options (see `lightning_modules/config.py`, `cxrfl/fl/config.py`)")
    types = typing.get_type_hints(config)
    for f in fields(config):
        meta = f.metadata
        if not meta.get("cli", True) or meta.get("scope", "all") not in ("all", scope):
            continue
        flags = [meta.get("flag") or "--" + f.name.replace("_", "-"), *meta.get("aliases", ())]
        kwargs = {"dest": f.name, "default": None, "help": meta["help"]}
        if types[f.name] in (bool, bool | None):
            kwargs.update(action="store_const", const=not meta.get("negate", False))
        else:
            if "choices" in meta:
                kwargs["choices"] = meta["choices"]
            if "const" in meta:
                kwargs.update(nargs="?", const=meta["const"])
            kwargs["type"] = PARSERS[meta["parse"]] if "parse" in meta else str
            if "metavar" in meta:
                kwargs["metavar"] = meta["metavar"]
        if f.name == "task":
            kwargs.update(required=task is None and task_required, default=task)
        group.add_argument(*flags, **kwargs)
    parser.add_argument("--out", type=Path, default=None, metavar="RUN_DIR",
                        help="run folder to write (default: a new timestamped folder under runs/)")
    parser.add_argument("--allow-leakage", action="store_true",
                        help="train even when the data root leaks between sites, splits or into the test set (one "
                        "patient, or identical image files, in two places; `cxrfl data check` lists them); without "
                        "it such a data root is refused")
    if scope == "fl":
        parser.add_argument("--sites", dest="site_count", type=positive_int, default=None, metavar="N",
                            help="number of sites: the first N site folders of the data root (default: all)")


def config_from_args(config: type[TrainConfig], args: argparse.Namespace, **overrides) -> TrainConfig:
    """The config the options ask for (ConfigError on a value that cannot work); not yet checked
    against the data root (see `ready`)."""
    given = {f.name: getattr(args, f.name) for f in fields(config) if getattr(args, f.name, None) is not None}
    return config(**{**given, **overrides})


def resolve_data_root(data: str | Path | None) -> Path:
    """The given data root, or the synthetic default (generated once)."""
    if data is not None:
        data = Path(data)
        if not data.is_dir():
            raise SystemExit(f"cxrfl: --data {data}: folder does not exist "
                             "(create one with `cxrfl data synth` or `cxrfl data import` + `cxrfl data split`)")
        return data
    if not (DEFAULT_DATA / DATASET_JSON).is_file():
        print(f"generating the synthetic default data set in {DEFAULT_DATA} ...", flush=True)
        generate_dataset(DEFAULT_DATA, **DEFAULT_SYNTH)
    return DEFAULT_DATA


def ready(cfg: TrainConfig, allow_leakage: bool = False) -> TrainConfig:
    """`cfg` checked against its data root before anything is written: the data root (the synthetic
    default generated on first use), leakage, the segmenter file, and the class names every site
    shares. ConfigError on a problem."""
    data_root = resolve_data_root(cfg.data_root)
    sites = list(cfg.sites) if isinstance(cfg, FLConfig) else None
    if not allow_leakage:  # a contaminated test set or split: refused before anything is written
        try:
            refuse_leakage(data_root, sites)
        except ManifestError as exc:
            raise ConfigError(str(exc)) from None
    if cfg.segmenter is not None:
        if not Path(cfg.segmenter).is_file():
            raise ConfigError(f"--segmenter {cfg.segmenter}: checkpoint not found")
        try:  # read (safely) and fitted to its network now: a wrong file stops before a run folder exists
            LungSegmentation.from_checkpoint(cfg.segmenter)
        except ValueError as exc:
            raise ConfigError(f"--segmenter {exc}") from None
    if sites is None:
        return replace(cfg, data_root=str(data_root))
    changes = {"data_root": str(data_root.absolute())}
    if cfg.segmenter is not None:
        changes["segmenter"] = str(Path(cfg.segmenter).absolute())
    if cfg.task == "classify" and not cfg.classes:
        changes["classes"] = class_names(data_root, (r for _, r in load_split(data_root, "train", sites)))
    return replace(cfg, **changes)


def site_names(data_root: Path, count: int | None) -> list[str]:
    """The first `count` site folders of the data root (all by default)."""
    try:
        available = [p.name for p in site_dirs(data_root)]
    except ManifestError as exc:
        raise ConfigError(str(exc)) from None
    n = count or len(available)
    if n > len(available):
        raise ConfigError(f"--sites {n}: the data root {data_root} has only {len(available)} site folders "
                          f"({', '.join(available)}); lower --sites or split the data into more sites")
    return available[:n]


def fl_config(args: argparse.Namespace, **overrides) -> FLConfig:
    """A federated command's options as a checked FLConfig, its sites from the data root."""
    data_root = resolve_data_root(getattr(args, "data_root", None))
    sites = site_names(data_root, getattr(args, "site_count", None))
    cfg = config_from_args(FLConfig, args, data_root=str(data_root.absolute()), sites=sites, **overrides)
    return ready(cfg, getattr(args, "allow_leakage", False))


def central_config(args: argparse.Namespace) -> TrainConfig:
    """`cxrfl central`'s options as a checked TrainConfig."""
    return ready(config_from_args(TrainConfig, args), args.allow_leakage)
