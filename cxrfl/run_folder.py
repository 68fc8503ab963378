"""The run-folder contract: every run writes `config.json` as

    {"kind": "central" | "sim" | "poc" | "deployment" | "demo" | "study" | "stats", "version": 1, <the run's config fields>,
     "facts": {what the run found out before training: sample counts, skipped files, torch version}}

and `RunFolder` is the one reader of it (report, model loading, predict, study, interpretability and
resume). A central run's config is a `TrainConfig`, a federated run's an `FLConfig`; a demo or a study
holds sub-runs and records its own settings, as does a federated statistics run (`cxrfl stats`, no model).
Folders of the first release (no "kind") still load: their two schemas are converted here, and only here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from cxrfl.fl.config import FLConfig
from lightning_modules.config import ConfigError, TrainConfig
from lightning_modules.data.atomic import read_json_object, write_json

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
VERSION = 1
TRAINING_KINDS = ("central", "sim", "poc", "deployment")  # deployment: a job on provisioned hosts
CONTAINER_KINDS = ("demo", "study")  # folders of sub-runs
# no training config: their own settings (stats: cxrfl/fl/stats.py; audit: cxrfl/audit/run.py, its sub-runs in runs/)
SETTINGS_KINDS = CONTAINER_KINDS + ("stats", "audit")
KINDS = TRAINING_KINDS + SETTINGS_KINDS


class RunFolderError(ValueError):
    """Not a run folder, or one whose config.json cannot be read; the message names the file."""


@dataclass(frozen=True)
class RunFolder:
    path: Path
    kind: str
    config: TrainConfig | None  # FLConfig for sim/poc; None for a demo, a study or a stats run
    settings: dict = field(default_factory=dict)  # a demo's, study's or stats run's own settings
    facts: dict = field(default_factory=dict)

    @property
    def federated(self) -> bool:
        return isinstance(self.config, FLConfig)

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    def metrics(self) -> dict | None:
        """metrics.json (None before the run finished); RunFolderError for an unreadable one."""
        if not self.metrics_file.is_file():
            return None
        return _read_object(self.metrics_file)

    @property
    def finished(self) -> bool:
        return self.metrics_file.is_file()

    # -- writing -------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, kind: str, config: TrainConfig | None = None, settings: dict | None = None,
               facts: dict | None = None) -> "RunFolder":
        """Record a run's configuration in `path` (an existing, checked run folder)."""
        if kind not in KINDS:
            raise ValueError(f"run kind must be one of {', '.join(KINDS)}")
        folder = cls(Path(path), kind, config, dict(settings or {}), dict(facts or {}))
        body = config.as_dict() if config is not None else dict(folder.settings)
        write_json(folder.config_file, {"kind": kind, "version": VERSION, **body, "facts": folder.facts})
        return folder

    # -- reading -------------------------------------------------------------------------------
    @classmethod
    def read(cls, path: Path) -> "RunFolder":
        """The run in `path`; RunFolderError (one line, naming the file) when there is none."""
        path = Path(path)
        config_file = path / CONFIG_FILE
        if not config_file.is_file():
            raise RunFolderError(f"{path}: not a run folder (no {CONFIG_FILE})")
        data = _read_object(config_file)
        if "kind" not in data:
            data = _from_first_release(data, config_file)
        if data.get("version") != VERSION:
            raise RunFolderError(f"{config_file}: run-folder version {data.get('version')!r}; this cxrfl reads "
                                 f"version {VERSION}")
        kind = data.pop("kind")
        data.pop("version")
        facts = data.pop("facts", {}) or {}
        if kind in SETTINGS_KINDS:
            return cls(path, kind, None, data, facts)
        if kind not in TRAINING_KINDS:
            raise RunFolderError(f"{config_file}: unknown run kind {kind!r} (expected one of {', '.join(KINDS)})")
        config_cls = TrainConfig if kind == "central" else FLConfig
        try:
            return cls(path, kind, config_cls.from_dict(data, str(config_file)), {}, facts)
        except ConfigError as exc:
            raise RunFolderError(str(exc)) from None

    @classmethod
    def holding(cls, path: Path, levels: int = 3) -> "RunFolder":
        """The run folder that is `path` or holds it (up to `levels` folders up): a weights file's run."""
        path = Path(path)
        candidates = [path, *path.parents[:levels]] if path.is_dir() else list(path.parents[:levels])
        for folder in candidates:
            if (folder / CONFIG_FILE).is_file():
                return cls.read(folder)
        raise RunFolderError(f"{path}: no {CONFIG_FILE} next to it, so its preprocessing is unknown; pass its run "
                             "folder or a model bundle written by `cxrfl export-model`")

    @classmethod
    def is_run(cls, path: Path) -> bool:
        return (Path(path) / CONFIG_FILE).is_file()


def _read_object(path: Path) -> dict:
    try:
        return read_json_object(path)
    except ValueError as exc:
        raise RunFolderError(str(exc)) from None


# A central run of the first release recorded its command line (argparse names) plus these facts.
_FIRST_CENTRAL_FACTS = ("num_train", "num_val", "skipped", "torch")
_FIRST_CENTRAL_DROPPED = ("command", "verbose", "out", "allow_leakage", "func")
_FIRST_FL_DROPPED = ("turn_lock", "torch_threads")
_HINT = "re-run it with this cxrfl, or add \"kind\": \"central\" | \"sim\" and \"version\": 1 after converting by hand"


def _from_first_release(data: dict, config_file: Path) -> dict:
    """config.json of the first release (two schemas, no "kind") in the version-1 shape."""
    data = dict(data)
    if "aggregation" in data:  # an FLConfig: task "roi", local_epochs, dp_args; roi always "mask"
        task = data.get("task")
        data["roi"] = data.get("roi", "mask") if task == "roi" else None
        data["task"] = "classify" if task == "roi" else task
        data["epochs"] = data.pop("local_epochs", data.get("epochs", 1))
        for key, value in (data.pop("dp_args", None) or {}).items():
            data[f"dp_{key}"] = value
        for key in _FIRST_FL_DROPPED:
            data.pop(key, None)
        kind = "sim"
    elif "task" in data:  # `cxrfl central`: its argparse namespace
        data["data_root"] = data.pop("data", None)
        data["facts"] = {k: data.pop(k) for k in _FIRST_CENTRAL_FACTS if k in data}
        for key in _FIRST_CENTRAL_DROPPED:
            data.pop(key, None)
        kind = "central"
    else:
        raise RunFolderError(f"{config_file}: a config.json this cxrfl does not know (no \"kind\"); {_HINT}")
    known = {f.name for f in fields(FLConfig if kind == "sim" else TrainConfig)} | {"facts"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RunFolderError(f"{config_file}: unknown setting(s) {', '.join(unknown)} in a first-release "
                             f"config.json; {_HINT}")
    return {"kind": kind, "version": VERSION, **data}
