"""The heterogeneity study's numbers: per-site rows from the evaluated models, mean and 95 % t-interval over
seeds per cell (setting x method), the EXAM-style per-site gain over the site's local model and
generalisability (a site's model on the other sites' test splits); the tables (study.md, the report) and
the figures.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats

from lightning_modules.data.atomic import atomic_write_text, write_json

LOCAL = "local"  # the local-only baseline every gain is measured against
CSV_COLUMNS = ["setting", "method", "seed", "site", "model", "metric", "shared_test", "own_test", "gain_vs_local",
               "generalisability", "train_images", "prevalence"]
# The figures' home inside the study folder: HOME/figures/*.png, the layout the report reads PNGs from
FIGURES_HOME = "heterogeneity_study"


def t_interval(values: list, confidence: float = 0.95) -> dict | None:
    """Mean and two-sided t-interval of the numbers among `values` (None entries are left out and
    counted): {"mean", "low", "high", "n", "missing"}; low/high None with a single number. None without any."""
    numbers = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not numbers:
        return None
    mean = statistics.fmean(numbers)
    low = high = None
    if len(numbers) > 1:
        half = stats.t.ppf(0.5 + confidence / 2, len(numbers) - 1) * statistics.stdev(numbers) / math.sqrt(len(numbers))
        low, high = mean - half, mean + half
    return {"mean": mean, "low": low, "high": high, "n": len(numbers), "missing": len(values) - len(numbers)}


def gain(own: float | None, local_own: float | None) -> float | None:
    """EXAM's per-site gain: the method's model for a site minus that site's local model, both on its own test split."""
    return None if own is None or local_own is None else own - local_own


def generalisability(own_tests: dict[str, float | None], site: str) -> float | None:
    """A site's model on the OTHER sites' test splits (mean; {test site: metric} of that model)."""
    others = [v for s, v in own_tests.items() if s != site and v is not None]
    return statistics.fmean(others) if others else None


def site_rows(setting: str, seed: int, evaluated: dict, site_facts: dict, metric: str) -> list[dict]:
    """study.csv rows of one setting and seed. evaluated: {method: {site: {"model", "shared", "tests":
    {test site: metric}}}} = the model each site uses under each method; site_facts: {site: {train_images,
    prevalence}}."""
    local = evaluated.get(LOCAL, {})
    rows = []
    for method, by_site in evaluated.items():
        for site, result in by_site.items():
            own = result["tests"].get(site)
            rows.append({"setting": setting, "method": method, "seed": seed, "site": site, "model": result["model"],
                         "metric": metric, "shared_test": result["shared"], "own_test": own,
                         "gain_vs_local": gain(own, local.get(site, {}).get("tests", {}).get(site)),
                         "generalisability": generalisability(result["tests"], site),
                         **site_facts.get(site, {})})
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """One entry per (setting, method): each measure's interval over seeds, per site and for the mean over
    sites (a seed's mean over its sites first, then the interval over seeds)."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r["setting"], r["method"]), []).append(r)
    summary = []
    for (setting, method), group in cells.items():
        seeds = sorted({r["seed"] for r in group})
        sites = list(dict.fromkeys(r["site"] for r in group))
        entry = {"setting": setting, "method": method, "seeds": seeds, "sites": sites}
        for measure in ("shared_test", "own_test", "gain_vs_local", "generalisability"):
            per_seed = [_mean([r[measure] for r in group if r["seed"] == seed]) for seed in seeds]
            entry[measure] = {"mean_over_sites": t_interval(per_seed),
                              "by_site": {site: t_interval([r[measure] for r in group if r["site"] == site])
                                          for site in sites}}
        summary.append(entry)
    return summary


def _mean(values: list) -> float | None:
    numbers = [v for v in values if v is not None]
    return statistics.fmean(numbers) if numbers else None


def interval_text(found: dict | None, signed: bool = False) -> str:
    """`0.8123 [0.7901, 0.8345]` (95 % t-interval over seeds); one seed: the number alone."""
    if found is None:
        return "n/a"
    sign = "+" if signed else ""
    text = f"{found['mean']:{sign}.4f}"
    if found["low"] is not None:
        text += f" [{found['low']:{sign}.4f}, {found['high']:{sign}.4f}]"
    return text


def tables(summary: list[dict], site_facts: dict[str, dict], metric: str) -> list[tuple[str, list[str], list[list]]]:
    """(title, header, rows) of every table, per setting: methods; which sites gain; own test per site;
    generalisability per site."""
    out = []
    for setting in dict.fromkeys(e["setting"] for e in summary):
        entries = [e for e in summary if e["setting"] == setting]
        sites = entries[0]["sites"]
        out.append((f"{setting}: {metric} per method (mean over sites, 95 % t-interval over seeds)",
                    ["method", "shared test", "own test", "gain vs local", "generalisability"],
                    [[e["method"], interval_text(e["shared_test"]["mean_over_sites"]),
                      interval_text(e["own_test"]["mean_over_sites"]),
                      interval_text(e["gain_vs_local"]["mean_over_sites"], signed=True),
                      interval_text(e["generalisability"]["mean_over_sites"])] for e in entries]))
        gaining = [e for e in entries if e["method"] != LOCAL]
        local = next((e for e in entries if e["method"] == LOCAL), None)
        facts = site_facts.get(setting, {})
        out.append((f"{setting}: which sites gain (own-test {metric} minus the site's local-only model)",
                    ["site", "train images", "prevalence", "local-only own test"] + [e["method"] for e in gaining],
                    [[site, facts.get(site, {}).get("train_images"), _rounded(facts.get(site, {}).get("prevalence")),
                      interval_text(local["own_test"]["by_site"][site]) if local else "n/a"]
                     + [interval_text(e["gain_vs_local"]["by_site"][site], signed=True) for e in gaining]
                     for site in sites]))
        for measure, title in (("own_test", f"own-test {metric} per site"),
                               ("generalisability", f"generalisability per site ({metric} on the other sites' tests)")):
            out.append((f"{setting}: {title}", ["method"] + sites,
                        [[e["method"]] + [interval_text(e[measure]["by_site"][s]) for s in sites] for e in entries]))
    return out


def _rounded(value):
    return round(value, 3) if isinstance(value, float) else value


def write_outputs(out: Path, rows: list[dict], site_facts: dict, metric: str, settings: dict) -> dict:
    """study.csv (one row per setting x method x seed x site), study.json, study.md, the figures."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "study.csv", buf.getvalue())
    summary = summarise(rows)
    study = {"study": "heterogeneity", "metric": metric, "settings": settings, "site_facts": site_facts,
             "cells": summary}
    write_json(out / "study.json", study)
    md = [f"Heterogeneity study: {metric}, mean and 95 % t-interval over training seeds "
          f"({', '.join(map(str, sorted({r['seed'] for r in rows})))}); one row per setting, method, seed and site "
          "in study.csv.\n"]
    for title, head, body in tables(summary, site_facts, metric):
        md += [f"### {title}\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        md += ["| " + " | ".join("n/a" if v is None else str(v) for v in row) + " |" for row in body]
        md.append("")
    atomic_write_text(out / "study.md", "\n".join(md))
    write_figures(out / FIGURES_HOME / "figures", summary, metric)
    return study


def write_figures(folder: Path, summary: list[dict], metric: str) -> None:
    """shared_test.png: each method's shared-test metric with its interval, per setting; site_gain.png:
    each site's gain over its local model per method, per setting."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = list(dict.fromkeys(e["setting"] for e in summary))
    fig, axes = _figure(len(settings))
    for ax, setting in zip(axes[0], settings):
        entries = [e for e in summary if e["setting"] == setting and e["shared_test"]["mean_over_sites"]]
        _errorbars(ax, range(len(entries)), [e["shared_test"]["mean_over_sites"] for e in entries], "o", None)
        ax.set_xticks(range(len(entries)), [e["method"] for e in entries], rotation=45, ha="right")
        ax.set_title(setting)
    axes[0][0].set_ylabel(f"shared-test {metric}")
    _save(fig, folder / "shared_test.png")
    fig, axes = _figure(len(settings))
    for ax, setting in zip(axes[0], settings):
        entries = [e for e in summary if e["setting"] == setting and e["method"] != LOCAL]
        sites = entries[0]["sites"] if entries else []
        width = 0.8 / max(len(entries), 1)
        for i, e in enumerate(entries):
            found = [e["gain_vs_local"]["by_site"][s] for s in sites]
            offset = (i - (len(entries) - 1) / 2) * width  # the methods side by side at each site
            _errorbars(ax, [k + offset for k in range(len(sites))], found, "s", e["method"])
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(sites)), sites)
        ax.set_title(setting)
    axes[0][0].set_ylabel(f"own-test {metric} gain vs local")
    axes[0][-1].legend(fontsize=7, loc="best")
    _save(fig, folder / "site_gain.png")


def _errorbars(ax, xs, found: list[dict | None], marker: str, label: str | None) -> None:
    points = [(x, f) for x, f in zip(xs, found) if f is not None]
    if not points:
        return
    means = [f["mean"] for _, f in points]
    below = [f["mean"] - f["low"] if f["low"] is not None else 0.0 for _, f in points]
    above = [f["high"] - f["mean"] if f["high"] is not None else 0.0 for _, f in points]
    ax.errorbar([x for x, _ in points], means, yerr=[below, above], fmt=marker, capsize=3, label=label)


def _figure(panels: int):
    fig = Figure(figsize=(4.5 * panels, 3.6))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, panels, squeeze=False, sharey=True)


def _save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
