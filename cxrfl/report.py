"""One self-contained HTML report of a run folder (a single run, a demo, or a study of several runs).

Writes ``RUN_DIR/report/report.html`` with every figure embedded as a base64 ``data:`` URI (the file
works when copied elsewhere), and each figure also as a PNG next to it:

- run overview, held-out test metrics, run parameters and wall times (and the demo's summary table);
- per FL run: the sites' per-round validation of the global model (key metric and loss);
- ROC curves of every classification run with ``test_predictions.csv``, overlaid per class set;
- a confusion matrix per classification run;
- reliability diagrams (calibration) of the two-class runs, with their expected calibration error;
- per FL run: the cross-site evaluation heat map (models x sites' validation splits + test);
- ``interpretability.json`` as a table and every ``figures/*.png`` of the run folder.

A section without data is left out; a malformed file becomes a note at the top of the report.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lightning_modules.data.manifest import atomic_write_text

REPORT_DIR = "report"
REPORT_HTML = "report.html"
# Sub-runs are found this many folder levels below RUN_DIR (demo: 1; a study of demos: 2).
MAX_DEPTH = 2
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ReportError(ValueError):
    """RUN_DIR cannot be reported on; the message names the folder."""


@dataclass
class Run:
    """One training run folder: config.json + metrics.json (+ the optional files read on demand)."""

    name: str
    path: Path
    config: dict
    metrics: dict

    @property
    def federated(self) -> bool:
        return "rounds" in self.config and "sites" in self.config

    @property
    def setting(self) -> str:
        return "FL" if self.federated else "central"

    @property
    def kind(self) -> str:
        return "segment" if self.config.get("task") == "segment" else "classify"

    @property
    def roi(self) -> bool:
        # FLConfig always carries roi="mask"; only its "roi" task uses it. Central runs set roi only with --roi.
        if self.federated:
            return self.config.get("task") == "roi"
        return bool(self.config.get("roi"))

    @property
    def task_label(self) -> str:
        if self.kind == "segment":
            return "lung segmentation"
        return "classification (lung ROI)" if self.roi else "classification (full image)"

    @property
    def key_metric(self) -> str:
        return self.metrics.get("key_metric") or ("val_dice" if self.kind == "segment" else "val_auroc")

    @property
    def test(self) -> dict:
        """Held-out test metrics of the run's selected model ({} when it was not tested)."""
        test = self.metrics.get("test")
        return test if isinstance(test, dict) else {}

    @property
    def wall_seconds(self) -> float | None:
        return self.metrics.get("wall_seconds", self.metrics.get("train_seconds"))


@dataclass
class Report:
    """What gets rendered: HTML sections in order, the figures' PNG bytes, and notes on skipped input."""

    run_dir: Path
    sections: list[str] = field(default_factory=list)
    figures: dict[str, bytes] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def note(self, path: Path, problem: str) -> None:
        self.notes.append(f"{_relative(path, self.run_dir)}: {problem}")

    def add_figure(self, fig: Figure, filename: str) -> str:
        """Render `fig` to PNG, keep it for report/, return an <img> embedding it."""
        buf = io.BytesIO()
        FigureCanvasAgg(fig)
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        self.figures[filename] = buf.getvalue()
        return _img(buf.getvalue(), alt=Path(filename).stem)


# ---------------------------------------------------------------------------------------------- entry point


def write_report(run_dir: Path) -> Path:
    """Write RUN_DIR/report/report.html (and the figures as PNGs beside it); returns the HTML path.

    Raises ReportError when RUN_DIR is missing or holds no run (config.json + metrics.json in it or in a
    sub-folder) and no demo summary.json.
    """
    run_dir = Path(run_dir).absolute()
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run folder")
    report = Report(run_dir)
    runs = discover_runs(run_dir, report)
    summary = _read_json(run_dir / "summary.json", report, dict) if (run_dir / "summary.json").exists() else None
    if not runs and summary is None:
        raise ReportError(f"{run_dir}: not a run folder (no config.json + metrics.json in it or in a sub-folder, "
                          "and no summary.json)")

    if summary:
        report.sections.append(summary_section(summary))
    if runs:
        report.sections.append(overview_section(runs))
        report.sections.append(test_metrics_section(runs))
    classified = load_predictions(runs, report)
    sections = (curves_section(runs, report), roc_section(classified, report),
                confusion_section(classified, report), calibration_section(classified, report),
                cross_site_section(runs, report))
    report.sections += [s for s in sections if s]
    interpretability = interpretability_section(run_dir, report)
    if interpretability:
        report.sections.append(interpretability)
    if runs:
        report.sections.append(parameters_section(runs))

    out = run_dir / REPORT_DIR
    out.mkdir(exist_ok=True)
    for filename, png in report.figures.items():
        (out / filename).write_bytes(png)
    for stale in out.glob("*.png"):  # figures of an earlier report whose data is gone
        if stale.name not in report.figures:
            stale.unlink()
    html_path = out / REPORT_HTML
    atomic_write_text(html_path, render_html(report))
    return html_path


# ---------------------------------------------------------------------------------------------- reading


def discover_runs(run_dir: Path, report: Report) -> list[Run]:
    """RUN_DIR itself when it is a run, else every sub-folder (up to MAX_DEPTH deep) that is one."""
    if _is_run(run_dir):
        found = [run_dir]
    else:
        found = []
        level = [run_dir]
        for _ in range(MAX_DEPTH):
            below = [d for parent in level for d in sorted(parent.iterdir())
                     if d.is_dir() and not d.name.startswith(".") and d.name != REPORT_DIR]
            found += [d for d in below if _is_run(d)]
            level = [d for d in below if not _is_run(d)]  # runs do not nest
    runs = []
    for path in sorted(found):
        config = _read_json(path / "config.json", report, dict)
        metrics = _read_json(path / "metrics.json", report, dict)
        if config is None or metrics is None:
            continue
        name = path.name if path == run_dir else path.relative_to(run_dir).as_posix()
        runs.append(Run(name, path, config, metrics))
    return runs


def _is_run(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "metrics.json").is_file()


def _read_json(path: Path, report: Report, expected: type):
    """The parsed file, or None with a note when it is unreadable or not the expected JSON type."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        report.note(path, f"unreadable ({exc}); skipped")
        return None
    if not isinstance(value, expected):
        report.note(path, f"expected a JSON {'object' if expected is dict else expected.__name__}; skipped")
        return None
    return value


def read_round_metrics(path: Path, report: Report) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """round_metrics.jsonl as {site: {metric: [(round, value), ...]}} plus the sample-weighted mean of all
    sites as site "weighted mean"; malformed lines are skipped with a note."""
    per_site: dict[str, dict[str, list[tuple[int, float]]]] = {}
    weighted: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            points = _round_points(json.loads(line))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            report.note(path, f"line {number} is malformed ({type(exc).__name__}: {exc}); skipped")
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
        per_site["weighted mean"] = mean
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


@dataclass
class Predictions:
    classes: list[str]
    labels: np.ndarray  # class index per image
    predicted: np.ndarray  # class index per image
    probs: np.ndarray  # images x classes


def read_predictions(path: Path, report: Report) -> Predictions | None:
    """test_predictions.csv (image,label,predicted,p_<class>...), or None with a note when malformed."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = [c for c in (reader.fieldnames or []) if c.startswith("p_")]
            classes = [c[2:] for c in columns]
            if not {"label", "predicted"} <= set(reader.fieldnames or []) or len(classes) < 2:
                report.note(path, "needs columns label, predicted and p_<class> for at least two classes; skipped")
                return None
            index = {c: i for i, c in enumerate(classes)}
            labels, predicted, probs = [], [], []
            for row in reader:
                labels.append(index[row["label"]])
                predicted.append(index[row["predicted"]])
                probs.append([float(row[c]) for c in columns])
    except KeyError as exc:
        report.note(path, f"line {reader.line_num}: class {exc} has no p_ column; skipped")
        return None
    except (OSError, UnicodeDecodeError, ValueError, TypeError, csv.Error) as exc:
        report.note(path, f"unreadable ({exc}); skipped")
        return None
    if not labels:
        report.note(path, "no predictions; skipped")
        return None
    return Predictions(classes, np.array(labels), np.array(predicted), np.array(probs, dtype=float))


# ---------------------------------------------------------------------------------------------- metrics


def roc_curve(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct score threshold, from (0, 0) to (1, 1)."""
    order = np.argsort(-scores, kind="mergesort")
    scores, positive = scores[order], positive[order].astype(bool)
    # the last index of each run of equal scores: tied images cross the threshold together
    cut = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tp = np.cumsum(positive)[cut]
    fp = (cut + 1) - tp
    return np.r_[0.0, fp / fp[-1]], np.r_[0.0, tp / tp[-1]]


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    return float(np.trapezoid(tpr, fpr))


def roc_of(pred: Predictions) -> tuple[np.ndarray, np.ndarray, float] | None:
    """Binary: ROC of the last class. Multi-class: macro average of the one-vs-rest curves (and AUCs).
    None when a class needed for the curve is missing from the labels."""
    n = len(pred.classes)
    if n == 2:
        positive = pred.labels == 1
        if positive.all() or not positive.any():
            return None
        fpr, tpr = roc_curve(positive, pred.probs[:, 1])
        return fpr, tpr, auc(fpr, tpr)
    curves = []
    for k in range(n):
        positive = pred.labels == k
        if positive.all() or not positive.any():
            return None
        curves.append(roc_curve(positive, pred.probs[:, k]))
    grid = np.unique(np.concatenate([fpr for fpr, _ in curves]))
    mean_tpr = np.mean([np.interp(grid, fpr, tpr) for fpr, tpr in curves], axis=0)
    # interp takes the top of each vertical step at fpr 0: start the drawn curve at (0, 0) again
    return np.r_[0.0, grid], np.r_[0.0, mean_tpr], float(np.mean([auc(fpr, tpr) for fpr, tpr in curves]))


RELIABILITY_BINS = 15  # as the test ECE in metrics.json (lightning_modules.operating_point.ECE_BINS)


def reliability(positive: np.ndarray, scores: np.ndarray, bins: int = RELIABILITY_BINS):
    """Per equal-width bin of the positive-class probability: mean predicted probability, observed
    fraction of positives and image count (empty bins left out), and the expected calibration error
    (count-weighted mean |observed - predicted|, as torchmetrics' binary calibration error).
    Written here because the report reads CSVs with numpy only."""
    index = np.floor(scores * bins).astype(int)  # left-closed bins; a probability of exactly 1 in its own, as torchmetrics
    counts = np.bincount(index, minlength=bins + 1)
    keep = counts > 0
    predicted = np.bincount(index, weights=scores, minlength=bins + 1)[keep] / counts[keep]
    observed = np.bincount(index, weights=positive.astype(float), minlength=bins + 1)[keep] / counts[keep]
    ece = float(np.sum(np.abs(observed - predicted) * counts[keep]) / len(scores))
    return predicted, observed, counts[keep], ece


def confusion_matrix(pred: Predictions) -> np.ndarray:
    """Counts: rows are the true class, columns the predicted class."""
    n = len(pred.classes)
    return np.bincount(pred.labels * n + pred.predicted, minlength=n * n).reshape(n, n)


# ---------------------------------------------------------------------------------------------- sections


def summary_section(summary: dict) -> str:
    rows = [r for r in summary.get("rows", []) if isinstance(r, dict)]
    body = _table(["task", "setting", "held-out test metric", "value", "wall time (s)"],
                  [[r.get("task"), r.get("setting"), r.get("metric"), r.get("value"), _seconds(r.get("wall_seconds"))]
                   for r in rows])
    facts = {"preset": summary.get("preset"), "data": summary.get("data"),
             "total wall time (s)": _seconds(summary.get("total_seconds"))}
    if summary.get("seeds"):  # `cxrfl demo --seeds N`: the values are means; summary.md has the spread
        facts["training seeds"] = ", ".join(map(str, summary["seeds"])) + " (values: mean over the seeds)"
    return _section("summary", "Summary", _facts(facts) + body)


def overview_section(runs: list[Run]) -> str:
    rows = []
    for run in runs:
        test_key = "test_" + run.key_metric.removeprefix("val_")
        sites = run.config.get("sites") if run.federated else "pooled"
        if run.federated:
            length = f"{run.config.get('rounds')} rounds x {run.config.get('local_epochs', 1)} epochs"
        else:
            length = f"{run.config.get('epochs')} epochs"
        model = run.config.get("model") or run.metrics.get("model") or "default"
        rows.append([run.name, run.setting, run.task_label, model, run.config.get("image_size"), sites, length,
                     f"{test_key} {_fmt(run.test.get(test_key))}", _seconds(run.wall_seconds)])
    head = ["run", "setting", "task", "model", "image size", "sites", "training", "held-out test", "wall time (s)"]
    return _section("runs", "Runs", _table(head, rows))


def test_metrics_section(runs: list[Run]) -> str:
    tested = [r for r in runs if r.test]
    if not tested:
        return ""
    names = sorted({k for r in tested for k in r.test})
    # a metric per row and a run per column: runs side by side, and many metrics stay readable
    rows = [[name] + [r.test.get(name) for r in tested] for name in names]
    text = "<p>Each run's selected model (FL: best global model by the sites' validation metric; central: best " \
           "epoch) on the held-out test set.</p>"
    return _section("test-metrics", "Held-out test metrics", text + _table(["metric"] + [r.name for r in tested], rows))


def curves_section(runs: list[Run], report: Report) -> str:
    parts = []
    for run in runs:
        path = run.path / "metrics" / "round_metrics.jsonl"
        if not run.federated or not path.is_file():
            continue
        per_site = read_round_metrics(path, report)
        if not per_site:
            continue
        fig = Figure(figsize=(10, 3.8), layout="constrained")
        for ax, metric in zip(fig.subplots(1, 2), (run.key_metric, "val_loss")):
            for site, metrics in per_site.items():
                points = sorted(metrics.get(metric, []))
                if points:
                    style = {"color": "black", "linestyle": "--"} if site == "weighted mean" else {}
                    ax.plot(*zip(*points), marker="o", label=site, **style)
            ax.set(xlabel="round", ylabel=metric, title=f"{metric} of the global model")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(alpha=0.3)
            if ax.has_data():
                ax.legend(fontsize=8)
        fig.suptitle(f"{run.name}: {run.task_label}, each site's validation per round")
        parts.append(_figure(report.add_figure(fig, f"rounds-{_slug(run.name)}.png"),
                             f"{run.name}: each site's validation of the global model it received, per round"))
    if not parts:
        return ""
    text = "<p>Every round each site validates the global model it receives on its own validation split; " \
           "the dashed line is the sample-weighted mean over sites.</p>"
    return _section("rounds", "Per-round validation of the global model", text + "".join(parts))


def load_predictions(runs: list[Run], report: Report) -> list[tuple[Run, Predictions]]:
    """The classification runs that have readable test predictions, with them."""
    found = []
    for run in runs:
        path = run.path / "test_predictions.csv"
        if run.kind == "classify" and path.is_file():
            pred = read_predictions(path, report)
            if pred is not None:
                found.append((run, pred))
    return found


def roc_section(classified: list[tuple[Run, Predictions]], report: Report) -> str:
    """One figure per class set (runs with the same classes are comparable), every run's curve in it."""
    by_classes: dict[tuple[str, ...], list[tuple[Run, Predictions]]] = {}
    for run, pred in classified:
        by_classes.setdefault(tuple(pred.classes), []).append((run, pred))
    parts, auc_rows = [], []
    for classes, members in by_classes.items():
        curves = []
        for run, pred in members:
            roc = roc_of(pred)
            if roc is None:
                report.note(run.path / "test_predictions.csv", "a class is missing from the labels; no ROC curve")
            else:
                curves.append((run, roc))
                auc_rows.append([run.name, run.setting, run.task_label, " / ".join(classes), roc[2], len(pred.labels)])
        if not curves:
            continue
        binary = len(classes) == 2
        fig = Figure(figsize=(5.5, 5))
        ax = fig.subplots()
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
        for run, (fpr, tpr, area) in curves:
            ax.plot(fpr, tpr, label=f"{run.name} (AUC {area:.3f})")
        what = f"positive class {classes[-1]}" if binary else f"one-vs-rest macro average over {len(classes)} classes"
        ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01),
               title=f"ROC on the held-out test set\n({what})")
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        caption = f"classes {', '.join(classes)}: {what}"
        parts.append(_figure(report.add_figure(fig, f"roc-{_slug('-'.join(classes))}.png"), caption))
    if not parts:
        return ""
    table = _table(["run", "setting", "task", "classes", "AUC", "test images"], auc_rows)
    return _section("roc", "ROC curves", "".join(parts) + table)


def confusion_section(classified: list[tuple[Run, Predictions]], report: Report) -> str:
    parts = []
    for run, pred in classified:
        counts = confusion_matrix(pred)
        n = len(pred.classes)
        fig = Figure(figsize=(1.6 + 1.1 * n, 1.2 + 1.1 * n))
        ax = fig.subplots()
        ax.imshow(counts, cmap="Blues", vmin=0)
        for (i, j), c in np.ndenumerate(counts):
            ax.text(j, i, str(c), ha="center", va="center",
                    color="white" if c > counts.max() / 2 else "black")
        ax.set(xticks=range(n), yticks=range(n), xticklabels=pred.classes, yticklabels=pred.classes,
               xlabel="predicted", ylabel="true", title=run.name)
        accuracy = np.trace(counts) / counts.sum()
        parts.append(_figure(report.add_figure(fig, f"confusion-{_slug(run.name)}.png"),
                             f"{run.name}: {run.setting}, {run.task_label}, accuracy {accuracy:.3f} "
                             f"on {counts.sum()} test images"))
    if not parts:
        return ""
    return _section("confusion", "Confusion matrices", "".join(parts))


def calibration_section(classified: list[tuple[Run, Predictions]], report: Report) -> str:
    """One reliability diagram of every two-class run: a calibrated model's points lie on the diagonal."""
    binary = [(run, pred) for run, pred in classified if len(pred.classes) == 2]
    if not binary:
        return ""
    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="calibrated")
    rows = []
    for run, pred in binary:
        predicted, observed, counts, ece = reliability(pred.labels == 1, pred.probs[:, 1])
        ax.plot(predicted, observed, marker="o", markersize=3, label=f"{run.name} (ECE {ece:.3f})")
        rows.append([run.name, run.setting, run.task_label, ece, len(pred.labels)])
    ax.set(xlabel=f"predicted probability of {binary[0][1].classes[1]}", ylabel="observed fraction",
           xlim=(0, 1), ylim=(0, 1.01), title="Reliability on the held-out test set")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    caption = (f"mean predicted probability vs observed fraction of positives per bin ({RELIABILITY_BINS} "
               "equal-width bins, empty bins left out)")
    table = _table(["run", "setting", "task", "test ECE", "test images"], rows)
    return _section("calibration", "Calibration",
                    _figure(report.add_figure(fig, "reliability.png"), caption) + table)


def cross_site_section(runs: list[Run], report: Report) -> str:
    parts = []
    for run in runs:
        path = run.path / "cross_site.json"
        if not run.federated or not path.is_file():
            continue
        data = _read_json(path, report, dict)
        matrix = data.get("matrix") if data else None
        if not isinstance(matrix, dict) or not matrix:
            if data is not None:
                report.note(path, "no cross-site matrix; skipped")
            continue
        metric = data.get("key_metric") or run.key_metric
        models = list(matrix)
        data_sites = sorted({s for row in matrix.values() if isinstance(row, dict) for s in row} - {"test"})
        columns = data_sites + ["test"]
        values = np.array([[_cell(matrix[m], c, metric) for c in columns] for m in models], dtype=float)
        fig = Figure(figsize=(1.8 + 1.2 * len(columns), 1.4 + 0.55 * len(models)))
        ax = fig.subplots()
        image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0, vmax=1, aspect="auto")
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, "–" if math.isnan(v) else f"{v:.3f}", ha="center", va="center",
                    color="black" if not math.isnan(v) and v > 0.6 else "white")
        ax.set(xticks=range(len(columns)), yticks=range(len(models)), xlabel="evaluated on", ylabel="model",
               title=f"{run.name}: {metric.removeprefix('val_')}")
        ax.set_xticklabels([c if c == "test" else f"{c} val" for c in columns])
        ax.set_yticklabels(models)
        ax.set_facecolor("lightgrey")
        fig.colorbar(image, ax=ax, fraction=0.05)
        parts.append(_figure(report.add_figure(fig, f"cross-site-{_slug(run.name)}.png"),
                             f"{run.name}: each model (rows) on each site's validation split and the test set"))
    if not parts:
        return ""
    return _section("cross-site", "Cross-site evaluation", "".join(parts))


def _cell(row: dict, column: str, metric: str) -> float:
    """The key metric of one model on one column: val_<m> on a site's split, test_<m> on the test set."""
    metrics = row.get(column) if isinstance(row, dict) else None
    if not isinstance(metrics, dict):
        return math.nan
    value = metrics.get(metric, metrics.get("test_" + metric.removeprefix("val_")))
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def interpretability_section(run_dir: Path, report: Report) -> str:
    parts = []
    path = run_dir / "interpretability.json"
    if path.is_file():
        data = _read_json(path, report, dict)
        rows = {k: v for k, v in (data or {}).items() if isinstance(v, dict)}
        if data is not None and len(rows) < len(data):
            report.note(path, "entries that are not a dict of metrics were skipped")
        if rows:
            names = list(dict.fromkeys(k for v in rows.values() for k in v))
            parts.append(_table(["model"] + names, [[model] + [_interval_cell(v.get(k)) for k in names]
                                                    for model, v in rows.items()]))
    for png in sorted((run_dir / "figures").glob("*.png")):
        data = png.read_bytes()
        if not data.startswith(PNG_SIGNATURE):
            report.note(png, "not a PNG image; skipped")
            continue
        parts.append(_figure(_img(data, alt=png.stem), png.stem))
    if not parts:
        return ""
    return _section("interpretability", "Interpretability", "".join(parts))


def _interval_cell(value):
    """A {"ratio": r, "ci95": [low, high]} score as 'r [low, high]'; anything else as it is."""
    if isinstance(value, dict) and "ratio" in value:
        low, high = (value.get("ci95") or [None, None])[:2]
        return f"{_fmt(value['ratio'])} [{_fmt(low)}, {_fmt(high)}]"
    return value


def parameters_section(runs: list[Run]) -> str:
    blocks = []
    for run in runs:
        rows = [[key, value] for key, value in sorted(run.config.items())]
        blocks.append(f"<details><summary>{_esc(run.name)} ({run.setting}, {_esc(run.task_label)})</summary>"
                      f"{_table(['parameter', 'value'], rows)}</details>")
    return _section("parameters", "Run parameters", "<p>Each run's config.json.</p>" + "".join(blocks))


# ---------------------------------------------------------------------------------------------- HTML

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; padding: 0 1rem; color: #222; }
h1 { font-size: 1.6rem; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2rem; margin-top: 2.2rem; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .9rem; }
th, td { border: 1px solid #ddd; padding: .25rem .6rem; text-align: left; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
/* a table with its caption below: the caption wraps at the image's width */
figure { display: inline-table; margin: .6rem 1rem .6rem 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { display: table-caption; caption-side: bottom; font-size: .85rem; color: #555; }
.wide { overflow-x: auto; }
.notes { background: #fff6e0; border: 1px solid #e8c66a; padding: .5rem 1rem; }
.meta { color: #666; font-size: .9rem; } details { margin: .4rem 0; } summary { cursor: pointer; }
"""


def render_html(report: Report) -> str:
    title = f"cxr-fl report: {report.run_dir.name}"
    notes = ""
    if report.notes:
        items = "".join(f"<li>{_esc(n)}</li>" for n in report.notes)
        notes = f"<section id='notes' class='notes'><h2>Notes</h2><ul>{items}</ul></section>"
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{_esc(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{_esc(title)}</h1>"
            f"<p class='meta'>{_esc(str(report.run_dir))} · generated {stamp}</p>"
            f"{notes}{''.join(report.sections)}</body></html>\n")


def _section(anchor: str, title: str, body: str) -> str:
    return f"<section id='{anchor}'><h2>{_esc(title)}</h2>{body}</section>"


def _figure(img: str, caption: str) -> str:
    return f"<figure>{img}<figcaption>{_esc(caption)}</figcaption></figure>"


def _img(png: bytes, alt: str) -> str:
    return f"<img alt='{_esc(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode('ascii')}'>"


def _table(head: list[str], rows: list[list]) -> str:
    header = "".join(f"<th>{_esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(_td(v) for v in row) + "</tr>" for row in rows)
    return f"<div class='wide'><table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table></div>"


def _td(value) -> str:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f"<td class='num'>{_esc(_fmt(value))}</td>" if numeric else f"<td>{_esc(_fmt(value))}</td>"


def _facts(facts: dict) -> str:
    items = "".join(f"<li>{_esc(k)}: {_esc(_fmt(v))}</li>" for k, v in facts.items() if v is not None)
    return f"<ul>{items}</ul>" if items else ""


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _seconds(value) -> str:
    return "n/a" if not isinstance(value, (int, float)) else f"{value:.0f}"


def _esc(text: str) -> str:
    return html.escape(str(text), quote=True)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "run"


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix() or "."
    except ValueError:
        return str(path)
