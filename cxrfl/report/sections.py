"""The report's sections, in the order they appear: each turns parsed run data into HTML (and figures).

A section returns "" when it has nothing to show, and the page leaves it out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from cxrfl.report import figures, html
from cxrfl.report.metrics import RELIABILITY_BINS, confusion_matrix, reliability, roc_of
from cxrfl.report.reading import CrossSite, Notes, Predictions, Run


@dataclass
class Report:
    """What gets rendered: HTML sections in order, the figures' PNG bytes, and notes on skipped input."""

    run_dir: Path
    notes: Notes
    sections: list[str] = field(default_factory=list)
    figures: dict[str, bytes] = field(default_factory=dict)

    def add_figure(self, fig: Figure, filename: str) -> str:
        """Render `fig` to PNG, keep it for report/, return an <img> embedding it."""
        png = figures.png_bytes(fig)
        self.figures[filename] = png
        return html.img(png, alt=Path(filename).stem)

    def render(self) -> str:
        return html.page(f"cxr-fl report: {self.run_dir.name}", str(self.run_dir), self.notes.items, self.sections)


def summary_section(summary: dict) -> str:
    rows = [r for r in summary.get("rows", []) if isinstance(r, dict)]
    body = html.table(["task", "setting", "held-out test metric", "value", "wall time (s)"],
                      [[r.get("task"), r.get("setting"), r.get("metric"), r.get("value"),
                        html.seconds(r.get("wall_seconds"))] for r in rows])
    facts = {"preset": summary.get("preset"), "data": summary.get("data"),
             "total wall time (s)": html.seconds(summary.get("total_seconds"))}
    if summary.get("seeds"):  # `cxrfl demo --seeds N`: the values are means; summary.md has the spread
        facts["training seeds"] = ", ".join(map(str, summary["seeds"])) + " (values: mean over the seeds)"
    return html.section("summary", "Summary", html.facts(facts) + body)


def overview_section(runs: list[Run]) -> str:
    rows = []
    for run in runs:
        test_key = "test_" + run.key_metric.removeprefix("val_")
        tested = "failed (see Run outcome)" if run.failed else f"{test_key} {html.fmt(run.test.get(test_key))}"
        rows.append([run.name, run.setting, run.task_label, run.model, run.image_size, run.sites,
                     run.training_length, tested, html.seconds(run.wall_seconds)])
    head = ["run", "setting", "task", "model", "image size", "sites", "training", "held-out test", "wall time (s)"]
    return html.section("runs", "Runs", html.table(head, rows))


def outcome_section(runs: list[Run]) -> str:
    """Runs that failed (with the reason), sites that never contributed or missed rounds, early stops."""
    rows = [[run.name, note] for run in runs for note in run.notes]
    if not rows:
        return ""
    text = "<p>A federated run fails when a round had fewer accepted updates than --min-clients, or when a site " \
           "never contributed one (unless --allow-missing-sites); metrics.json holds the details.</p>"
    return html.section("outcome", "Run outcome", text + html.table(["run", "what happened"], rows))


def test_metrics_section(runs: list[Run]) -> str:
    tested = [r for r in runs if r.test]
    if not tested:
        return ""
    names = sorted({k for r in tested for k in r.test})
    # a metric per row and a run per column: runs side by side, and many metrics stay readable
    rows = [[name] + [r.test.get(name) for r in tested] for name in names]
    text = "<p>Each run's selected model (FL: best global model by the sites' validation metric; central: best " \
           "epoch) on the held-out test set.</p>"
    return html.section("test-metrics", "Held-out test metrics",
                        text + html.table(["metric"] + [r.name for r in tested], rows))


def curves_section(round_metrics: list[tuple[Run, dict]], report: Report) -> str:
    parts = []
    for run, per_site in round_metrics:
        fig = figures.rounds_figure(f"{run.name}: {run.task_label}, each site's validation per round",
                                    run.key_metric, per_site)
        parts.append(html.figure(report.add_figure(fig, f"rounds-{_slug(run.name)}.png"),
                                 f"{run.name}: each site's validation of the global model it received, per round"))
    if not parts:
        return ""
    text = "<p>Every round each site validates the global model it receives on its own validation split; " \
           "the dashed line is the sample-weighted mean over sites.</p>"
    return html.section("rounds", "Per-round validation of the global model", text + "".join(parts))


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
                report.notes.add(run.predictions_file, "a class is missing from the labels; no ROC curve")
                continue
            curves.append((run.name, *roc))
            auc_rows.append([run.name, run.setting, run.task_label, " / ".join(classes), roc[2], len(pred.labels)])
        if not curves:
            continue
        what = (f"positive class {classes[-1]}" if len(classes) == 2
                else f"one-vs-rest macro average over {len(classes)} classes")
        img = report.add_figure(figures.roc_figure(curves, what), f"roc-{_slug('-'.join(classes))}.png")
        parts.append(html.figure(img, f"classes {', '.join(classes)}: {what}"))
    if not parts:
        return ""
    table = html.table(["run", "setting", "task", "classes", "AUC", "test images"], auc_rows)
    return html.section("roc", "ROC curves", "".join(parts) + table)


def confusion_section(classified: list[tuple[Run, Predictions]], report: Report) -> str:
    parts = []
    for run, pred in classified:
        counts = confusion_matrix(pred)
        fig = figures.confusion_figure(counts, pred.classes, run.name)
        accuracy = np.trace(counts) / counts.sum()
        parts.append(html.figure(report.add_figure(fig, f"confusion-{_slug(run.name)}.png"),
                                 f"{run.name}: {run.setting}, {run.task_label}, accuracy {accuracy:.3f} "
                                 f"on {counts.sum()} test images"))
    if not parts:
        return ""
    return html.section("confusion", "Confusion matrices", "".join(parts))


def calibration_section(classified: list[tuple[Run, Predictions]], report: Report) -> str:
    """One reliability diagram of every two-class run: a calibrated model's points lie on the diagonal."""
    binary = [(run, pred) for run, pred in classified if len(pred.classes) == 2]
    if not binary:
        return ""
    points, rows = [], []
    for run, pred in binary:
        predicted, observed, _, ece = reliability(pred.labels == 1, pred.probs[:, 1])
        points.append((run.name, predicted, observed, ece))
        rows.append([run.name, run.setting, run.task_label, ece, len(pred.labels)])
    fig = figures.reliability_figure(points, positive_class=binary[0][1].classes[1])
    caption = (f"mean predicted probability vs observed fraction of positives per bin ({RELIABILITY_BINS} "
               "equal-width bins, empty bins left out)")
    table = html.table(["run", "setting", "task", "test ECE", "test images"], rows)
    return html.section("calibration", "Calibration",
                        html.figure(report.add_figure(fig, "reliability.png"), caption) + table)


def cross_site_section(cross_site: list[tuple[Run, CrossSite]], report: Report) -> str:
    parts = []
    for run, table in cross_site:
        fig = figures.cross_site_figure(table.values, table.models, table.columns,
                                        f"{run.name}: {table.metric.removeprefix('val_')}")
        parts.append(html.figure(report.add_figure(fig, f"cross-site-{_slug(run.name)}.png"),
                                 f"{run.name}: each model (rows) on each site's validation split and the test set"))
    if not parts:
        return ""
    return html.section("cross-site", "Cross-site evaluation", "".join(parts))


def interpretability_section(scores: dict[str, dict], pngs: list[tuple[str, bytes]]) -> str:
    """interpretability.json's scores per model as a table, then the run's own figures."""
    parts = []
    if scores:
        names = list(dict.fromkeys(k for v in scores.values() for k in v))
        parts.append(html.table(["model"] + names, [[model] + [html.interval(v.get(k)) for k in names]
                                                    for model, v in scores.items()]))
    parts += [html.figure(html.img(png, alt=name), name) for name, png in pngs]
    if not parts:
        return ""
    return html.section("interpretability", "Interpretability", "".join(parts))


def parameters_section(runs: list[Run]) -> str:
    blocks = [html.details(f"{run.name} ({run.setting}, {run.task_label})",
                           html.table(["parameter", "value"], [list(p) for p in run.parameters]))
              for run in runs]
    return html.section("parameters", "Run parameters", "<p>Each run's config.json.</p>" + "".join(blocks))


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "run"


# ---- a `cxrfl stats` run: stats.json -------------------------------------------------------------
FEATURE_TITLES = {"image:width": "image width (pixels)", "image:height": "image height (pixels)",
                  "image:intensity": "pixel intensity, whole image",
                  "image:lung_intensity": "pixel intensity inside the lung mask"}


def stats_section(stats: dict, report: Report) -> str:
    """Federated statistics: what each site returned through its privacy cleansers, per feature; a
    figure per category (shares of rows) and per numeric feature (histogram), sites side by side."""
    sites, settings = stats["sites"], stats.get("settings", {})
    order = [n for n in stats.get("feature_order", []) if n in stats["features"]]
    features = {name: stats["features"][name] for name in order + sorted(set(stats["features"]) - set(order))}
    facts = html.facts({"sites": ", ".join(sites), "minimum count (MinCountCleanser)": settings.get("min_count"),
                        "noise on min/max (AddNoiseToMinMax)":
                            f"{settings.get('min_noise')}–{settings.get('max_noise')}",
                        "histogram bins": settings.get("bins"),
                        "bins below % of the count (HistogramBinsCleanser)": settings.get("max_bins_percent")})
    text = ("<p>Each site computed its statistics and NVFlare's cleansers ran at the site before anything left it: "
            "a feature counted on fewer rows than the minimum count returns only its count (\"withheld\"), and a "
            "histogram with too many bins for its count is dropped. \"all sites\" pools the sites that returned "
            "statistics. Intensity histograms count pixels (over [0, 1], as the models see them); their mean "
            "and standard deviation are over the images' mean intensities.</p>")
    categories: dict[str, list[dict]] = {}
    for feature in features.values():
        if feature["kind"] == "indicator":
            categories.setdefault(feature["group"], []).append(feature)
    rows = [[f"{f['group']}={f['value']}"] + [_count_cell(f["sites"][s]) for s in sites] + [_count_cell(f["global"])]
            for members in categories.values() for f in members]
    parts = [facts, text, html.table(["count (share)"] + sites + ["all sites"], rows)]
    for group, members in categories.items():
        shares = {s: [m["sites"][s].get("mean") for m in members] for s in sites}
        fig = figures.site_shares_figure(f"{group}: share of each site's rows", [m["value"] for m in members], shares)
        parts.append(html.figure(report.add_figure(fig, f"stats-{_slug(group)}.png"), f"{group} per site"))
    numeric = {name: f for name, f in features.items() if f["kind"] != "indicator"}
    parts.append(html.table(["feature (mean ± sd, n)"] + sites + ["all sites"],
                            [[FEATURE_TITLES.get(name, name)] + [_mean_cell(f["sites"][s]) for s in sites]
                             + [_mean_cell(f["global"])] for name, f in numeric.items()]))
    for name, f in numeric.items():
        histograms = {s: e["histogram"] for s, e in f["sites"].items() if e.get("histogram")}
        if histograms:
            title = FEATURE_TITLES.get(name, name)
            fig = figures.site_histograms_figure(title, title, histograms, f["global"].get("histogram"))
            parts.append(html.figure(report.add_figure(fig, f"stats-{_slug(name)}.png"),
                                     f"{title}: sites side by side" + _missing(f["sites"], histograms)))
    return html.section("statistics", "Federated statistics of the sites' data", "".join(parts))


def _count_cell(entry: dict) -> str:
    if "sum" in entry:
        return f"{entry['sum']:.0f} of {entry['count']} ({entry['mean']:.1%})"
    if entry.get("count_with_statistics"):  # the pooled global of a category
        n = entry["count_with_statistics"]
        return f"{entry['mean'] * n:.0f} of {n} ({entry['mean']:.1%})"
    return f"withheld (n={entry.get('count', 0)})"


def _mean_cell(entry: dict) -> str:
    if "mean" not in entry:
        return f"withheld (n={entry.get('count', 0)})"
    n = entry.get("count_with_statistics", entry.get("count"))
    return f"{entry['mean']:.4g} ± {entry.get('stddev', 0.0):.3g} (n={n})"


def _missing(per_site: dict, shown: dict) -> str:
    absent = [s for s in per_site if s not in shown]
    return f"; no histogram from {', '.join(absent)} (withheld or no data)" if absent else ""
