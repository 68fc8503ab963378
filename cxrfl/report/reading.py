"""Everything the report reads from a run folder, parsed; the only module of the report that opens files.

A run is a folder with config.json + metrics.json (`Run` is the one place that interprets them). A file
that cannot be read, or holds something unexpected, becomes a note (`Notes`) and is skipped: the report
is still written with what remains.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxrfl.fl.outcome import run_notes
from cxrfl.run_folder import CONFIG_FILE, METRICS_FILE, RunFolder, RunFolderError
from lightning_modules.config import TrainConfig

REPORT_DIR = "report"  # inside RUN_DIR; never searched for runs
# Sub-runs are found this many folder levels below RUN_DIR (demo: 1; a study of demos: 2).
MAX_DEPTH = 2
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WEIGHTED_MEAN = "weighted mean"  # the pseudo-site of read_round_metrics: all sites, sample-weighted
STATS_FILE = "stats.json"  # a `cxrfl stats` run (cxrfl/fl/stats.py writes it)


@dataclass
class Notes:
    """Problems with input files, each as 'path relative to RUN_DIR: problem'."""

    root: Path
    items: list[str] = field(default_factory=list)

    def add(self, path: Path, problem: str) -> None:
        try:
            where = path.relative_to(self.root).as_posix() or "."
        except ValueError:
            where = str(path)
        self.items.append(f"{where}: {problem}")


@dataclass
class Run:
    """One training run: its folder (the one reader of config.json, cxrfl/run_folder.py) and metrics.json."""

    name: str
    folder: RunFolder
    metrics: dict

    @property
    def path(self) -> Path:
        return self.folder.path

    @property
    def config(self) -> TrainConfig:
        return self.folder.config

    @property
    def federated(self) -> bool:
        return self.folder.federated

    @property
    def setting(self) -> str:
        return "FL" if self.federated else "central"

    @property
    def kind(self) -> str:
        return self.config.task

    @property
    def roi(self) -> bool:
        return bool(self.config.roi)

    @property
    def task_label(self) -> str:
        if self.kind == "segment":
            return "lung segmentation"
        return "classification (lung ROI)" if self.roi else "classification (full image)"

    @property
    def key_metric(self) -> str:
        return self.metrics.get("key_metric") or self.config.key_metric

    @property
    def test(self) -> dict:
        """Held-out test metrics of the run's selected model ({} when it was not tested)."""
        test = self.metrics.get("test")
        return test if isinstance(test, dict) else {}

    @property
    def wall_seconds(self) -> float | None:
        return self.metrics.get("wall_seconds", self.metrics.get("train_seconds"))

    @property
    def model(self) -> str:
        return self.config.model or self.metrics.get("model") or "default"

    @property
    def image_size(self):
        return self.config.image_size

    @property
    def sites(self):
        """The FL run's sites as configured; "pooled" for a central run."""
        return list(self.config.sites) if self.federated else "pooled"

    @property
    def failed(self) -> bool:
        return self.metrics.get("status") == "failed"

    @property
    def notes(self) -> list[str]:
        """How the run went besides its test metrics: its failure, missing sites and rounds, an early stop."""
        return run_notes(self.metrics)

    @property
    def training_length(self) -> str:
        if self.federated:
            stopped = self.metrics.get("stopped_early")
            if isinstance(stopped, dict) and isinstance(stopped.get("round"), int):
                return (f"{stopped['round'] + 1} of {self.config.rounds} rounds (stopped early) x "
                        f"{self.config.epochs} epochs")
            return f"{self.config.rounds} rounds x {self.config.epochs} epochs"
        return f"{self.config.epochs} epochs"

    @property
    def parameters(self) -> list[tuple[str, object]]:
        """The run's configuration as (name, value) pairs, sorted by name."""
        return sorted(self.config.as_dict().items())

    @property
    def predictions_file(self) -> Path:
        return self.path / "test_predictions.csv"

    @property
    def round_metrics_file(self) -> Path:
        return self.path / "metrics" / "round_metrics.jsonl"

    @property
    def cross_site_file(self) -> Path:
        return self.path / "cross_site.json"


@dataclass
class Predictions:
    classes: list[str]
    labels: np.ndarray  # class index per image
    predicted: np.ndarray  # class index per image
    probs: np.ndarray  # images x classes


@dataclass
class CrossSite:
    """A FL run's cross-site evaluation: the key metric of each model (rows) on each column."""

    metric: str
    models: list[str]
    columns: list[str]  # the sites' validation splits, then "test"
    values: np.ndarray  # models x columns, NaN where missing


# ---------------------------------------------------------------------------------------------- runs


def discover_runs(run_dir: Path, notes: Notes) -> list[Run]:
    """RUN_DIR itself when it is a run, else every sub-folder (up to MAX_DEPTH deep) that is one."""
    if is_run(run_dir):
        found = [run_dir]
    else:
        found = []
        level = [run_dir]
        for _ in range(MAX_DEPTH):
            below = [d for parent in level for d in sorted(parent.iterdir())
                     if d.is_dir() and not d.name.startswith(".") and d.name != REPORT_DIR]
            found += [d for d in below if is_run(d)]
            level = [d for d in below if not is_run(d)]  # runs do not nest
    runs = []
    for path in sorted(found):
        try:
            folder = RunFolder.read(path)
        except RunFolderError as exc:
            notes.add(path / CONFIG_FILE, f"{exc}; skipped")
            continue
        metrics = read_json(folder.metrics_file, notes, dict)
        if folder.config is None or metrics is None:
            continue
        name = path.name if path == run_dir else path.relative_to(run_dir).as_posix()
        runs.append(Run(name, folder, metrics))
    return runs


def is_run(folder: Path) -> bool:
    """A finished training run (a demo's or study's own folder holds runs, it is none)."""
    return RunFolder.is_run(folder) and (folder / METRICS_FILE).is_file()


def read_json(path: Path, notes: Notes, expected: type):
    """The parsed file, or None with a note when it is unreadable or not the expected JSON type."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        notes.add(path, f"unreadable ({exc}); skipped")
        return None
    if not isinstance(value, expected):
        notes.add(path, f"expected a JSON {'object' if expected is dict else expected.__name__}; skipped")
        return None
    return value


def read_summary(run_dir: Path, notes: Notes) -> dict | None:
    """A demo's summary.json; None when there is none (or with a note when it is malformed)."""
    path = run_dir / "summary.json"
    return read_json(path, notes, dict) if path.exists() else None


# ---------------------------------------------------------------------------------------------- per-round metrics


def read_round_metrics(path: Path, notes: Notes) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """round_metrics.jsonl as {site: {metric: [(round, value), ...]}} plus the sample-weighted mean of all
    sites as site WEIGHTED_MEAN; malformed lines are skipped with a note."""
    per_site: dict[str, dict[str, list[tuple[int, float]]]] = {}
    weighted: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            points = _round_points(json.loads(line))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            notes.add(path, f"line {number} is malformed ({type(exc).__name__}: {exc}); skipped")
            continue
        for site, metric, round_, value, weight in points:
            per_site.setdefault(site, {}).setdefault(metric, []).append((round_, value))
            weighted.setdefault((round_, metric), []).append((weight, value))
    per_site = dict(sorted(per_site.items()))  # the same colour per site in every figure
    if len(per_site) > 1:
        mean: dict[str, list[tuple[int, float]]] = {}
        for (round_, metric), pairs in sorted(weighted.items()):
            weights, values = np.array(pairs).T
            mean.setdefault(metric, []).append((round_, float(np.average(values, weights=weights))))
        per_site[WEIGHTED_MEAN] = mean
    return per_site


def _round_points(record: dict) -> list[tuple[str, str, int, float, float]]:
    """(site, metric, round, value, weight) of one round's record; numeric metrics only."""
    round_ = int(record["round"])
    points = []
    for site in record.get("sites", []):
        weight = float(site.get("weight") or 1.0)
        for m in site.get("metrics", []):
            value = m["value"]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                points.append((str(site["name"]), str(m["name"]), round_, float(value), weight))
    return points


def fl_round_metrics(runs: list[Run], notes: Notes) -> list[tuple[Run, dict]]:
    """The FL runs with a non-empty per-round log, with it (as read_round_metrics gives it)."""
    found = []
    for run in runs:
        if run.federated and run.round_metrics_file.is_file():
            per_site = read_round_metrics(run.round_metrics_file, notes)
            if per_site:
                found.append((run, per_site))
    return found


# ---------------------------------------------------------------------------------------------- test predictions


def read_predictions(path: Path, notes: Notes) -> Predictions | None:
    """test_predictions.csv (image,label,predicted,p_<class>...), or None with a note when malformed."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = [c for c in (reader.fieldnames or []) if c.startswith("p_")]
            classes = [c[2:] for c in columns]
            if not {"label", "predicted"} <= set(reader.fieldnames or []) or len(classes) < 2:
                notes.add(path, "needs columns label, predicted and p_<class> for at least two classes; skipped")
                return None
            index = {c: i for i, c in enumerate(classes)}
            labels, predicted, probs = [], [], []
            for row in reader:
                labels.append(index[row["label"]])
                predicted.append(index[row["predicted"]])
                probs.append([float(row[c]) for c in columns])
    except KeyError as exc:
        notes.add(path, f"line {reader.line_num}: class {exc} has no p_ column; skipped")
        return None
    except (OSError, UnicodeDecodeError, ValueError, TypeError, csv.Error) as exc:
        notes.add(path, f"unreadable ({exc}); skipped")
        return None
    if not labels:
        notes.add(path, "no predictions; skipped")
        return None
    return Predictions(classes, np.array(labels), np.array(predicted), np.array(probs, dtype=float))


def load_predictions(runs: list[Run], notes: Notes) -> list[tuple[Run, Predictions]]:
    """The classification runs that have readable test predictions, with them."""
    found = []
    for run in runs:
        if run.kind == "classify" and run.predictions_file.is_file():
            pred = read_predictions(run.predictions_file, notes)
            if pred is not None:
                found.append((run, pred))
    return found


# ---------------------------------------------------------------------------------------------- cross-site evaluation


def read_cross_site(run: Run, notes: Notes) -> CrossSite | None:
    """The FL run's cross_site.json as a table; None when it has none (with a note when it is malformed)."""
    path = run.cross_site_file
    if not run.federated or not path.is_file():
        return None
    data = read_json(path, notes, dict)
    matrix = data.get("matrix") if data else None
    if not isinstance(matrix, dict) or not matrix:
        if data is not None:
            notes.add(path, "no cross-site matrix; skipped")
        return None
    metric = data.get("key_metric") or run.key_metric
    models = list(matrix)
    data_sites = sorted({s for row in matrix.values() if isinstance(row, dict) for s in row} - {"test"})
    columns = data_sites + ["test"]
    values = np.array([[_cell(matrix[m], c, metric) for c in columns] for m in models], dtype=float)
    return CrossSite(metric, models, columns, values)


def _cell(row: dict, column: str, metric: str) -> float:
    """The key metric of one model on one column: val_<m> on a site's split, test_<m> on the test set."""
    metrics = row.get(column) if isinstance(row, dict) else None
    if not isinstance(metrics, dict):
        return math.nan
    value = metrics.get(metric, metrics.get("test_" + metric.removeprefix("val_")))
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


# ---------------------------------------------------------------------------------------------- interpretability


def read_interpretability(run_dir: Path, notes: Notes) -> dict[str, dict]:
    """interpretability.json as {model: {score: value}}; entries that are not a dict are skipped with a note."""
    path = run_dir / "interpretability.json"
    if not path.is_file():
        return {}
    data = read_json(path, notes, dict)
    rows = {k: v for k, v in (data or {}).items() if isinstance(v, dict)}
    if data is not None and len(rows) < len(data):
        notes.add(path, "entries that are not a dict of metrics were skipped")
    return rows


def read_figure_pngs(run_dir: Path, notes: Notes) -> list[tuple[str, bytes]]:
    """(name, PNG bytes) of every RUN_DIR/figures/*.png; a file that is not a PNG is skipped with a note."""
    found = []
    for png in sorted((run_dir / "figures").glob("*.png")):
        data = png.read_bytes()
        if not data.startswith(PNG_SIGNATURE):
            notes.add(png, "not a PNG image; skipped")
            continue
        found.append((png.stem, data))
    return found


def read_png(path: Path, notes: Notes) -> bytes | None:
    """One PNG file's bytes; None when it is absent, or (with a note) unreadable or not a PNG."""
    if not path.is_file():
        return None
    try:
        data = path.read_bytes()
    except OSError as exc:
        notes.add(path, f"unreadable ({exc}); skipped")
        return None
    if not data.startswith(PNG_SIGNATURE):
        notes.add(path, "not a PNG image; skipped")
        return None
    return data


# ---------------------------------------------------------------------------------------------- federated statistics


def read_stats(run_dir: Path, notes: Notes) -> dict | None:
    """A `cxrfl stats` run's stats.json ({"sites", "settings", "features"}); None when there is none (with a
    note when it is malformed)."""
    path = run_dir / STATS_FILE
    if not path.is_file():
        return None
    data = read_json(path, notes, dict)
    if data is None:
        return None
    if not isinstance(data.get("sites"), list) or not isinstance(data.get("features"), dict):
        notes.add(path, "needs \"sites\" (a list) and \"features\" (an object); skipped")
        return None
    usable = {name: f for name, f in data["features"].items() if _stats_feature_ok(f, data["sites"])}
    if len(usable) < len(data["features"]):
        notes.add(path, f"features without group, kind, value, global and an entry per site were skipped: "
                        f"{', '.join(sorted(set(data['features']) - set(usable)))}")
    return {**data, "features": usable}


def _stats_feature_ok(feature, sites: list) -> bool:
    return (isinstance(feature, dict) and all(isinstance(feature.get(k), str) for k in ("group", "kind", "value"))
            and isinstance(feature.get("global"), dict) and isinstance(feature.get("sites"), dict)
            and all(isinstance(feature["sites"].get(s), dict) for s in sites))
