"""A heterogeneity study folder in `cxrfl report`: study.json's tables and the study's figures
(cxrfl/heterogeneity_summary.py writes both)."""

from __future__ import annotations

from pathlib import Path

from cxrfl.heterogeneity_summary import FIGURES_HOME, tables
from cxrfl.report import html
from cxrfl.report.reading import Notes, read_figure_pngs, read_json

STUDY_FILE = "study.json"


def read_study(run_dir: Path, notes: Notes) -> dict | None:
    """A heterogeneity study's study.json; None when the folder holds none (with a note when it is malformed)."""
    path = run_dir / STUDY_FILE
    if not path.is_file():
        return None
    data = read_json(path, notes, dict)
    if data is None or data.get("study") != "heterogeneity":
        return None
    if not isinstance(data.get("cells"), list) or not isinstance(data.get("site_facts"), dict):
        notes.add(path, "needs \"cells\" (a list) and \"site_facts\" (an object); skipped")
        return None
    return data


def study_section(study: dict, run_dir: Path, notes: Notes, figures: dict[str, bytes]) -> str:
    """The study's tables (as study.md has them), then its figures (also kept in report/)."""
    metric = study.get("metric", "metric")
    try:
        parts = [f"<h3>{html.esc(title)}</h3>" + html.table(head, rows)
                 for title, head, rows in tables(study["cells"], study["site_facts"], metric)]
    except (KeyError, TypeError, IndexError) as exc:
        notes.add(run_dir / STUDY_FILE, f"cells not as cxrfl writes them ({exc!r}); tables skipped")
        parts = []
    for name, png in read_figure_pngs(run_dir / FIGURES_HOME, notes):
        figures[f"study_{name}.png"] = png
        parts.append(html.figure(html.img(png, alt=name), name.replace("_", " ")))
    intro = (f"<p>{html.esc(metric)}: mean and 95 % t-interval over the training seeds; gain = the method's model "
             "for a site minus that site's local-only model, both on the site's own test split; generalisability = "
             "a site's model on the other sites' test splits.</p>")
    return html.section("heterogeneity-study", "Heterogeneity study", intro + "".join(parts))
