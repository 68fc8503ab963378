"""`write_report`: read a run folder, assemble the sections, write report.html and the figures' PNGs."""

from __future__ import annotations

from pathlib import Path

from cxrfl.report import heterogeneity, privacy, reading, sections
from cxrfl.report.sections import Report
from lightning_modules.data.atomic import atomic_write_text

REPORT_HTML = "report.html"


class ReportError(ValueError):
    """RUN_DIR cannot be reported on; the message names the folder."""


def write_report(run_dir: Path) -> Path:
    """Write RUN_DIR/report/report.html (and the figures as PNGs beside it); returns the HTML path.

    Raises ReportError when RUN_DIR is missing or holds no run (config.json + metrics.json in it or in a
    sub-folder), no demo summary.json and no federated statistics (stats.json).
    """
    run_dir = Path(run_dir).absolute()
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run folder")
    report = Report(run_dir, reading.Notes(run_dir))
    runs = reading.discover_runs(run_dir, report.notes)
    summary = reading.read_summary(run_dir, report.notes)
    stats = reading.read_stats(run_dir, report.notes)
    study = heterogeneity.read_study(run_dir, report.notes)  # a heterogeneity study: its runs lie deeper
    audit = privacy.read_audit(run_dir, report.notes)  # a privacy audit: its federated runs lie in runs/
    if not runs and summary is None and stats is None and study is None and audit is None:
        raise ReportError(f"{run_dir}: not a run folder (no config.json + metrics.json in it or in a sub-folder, "
                          "no summary.json, no stats.json, no heterogeneity study.json and no audit.json)")
    if audit is not None:
        report.sections.append(privacy.audit_section(audit, run_dir, report.notes, report.figures))
    if study is not None:
        report.sections.append(heterogeneity.study_section(study, run_dir, report.notes, report.figures))
    if stats is not None:
        report.sections.append(sections.stats_section(stats, report))
    _assemble(report, runs, summary)
    return _save(report)


def _assemble(report: Report, runs: list[reading.Run], summary: dict | None) -> None:
    """Every section with something to show, in page order (files are read in that order too, so the
    notes on skipped input follow the page)."""
    notes = report.notes
    parts = [sections.summary_section(summary) if summary else ""]
    if runs:
        parts += [sections.overview_section(runs), sections.outcome_section(runs),
                  sections.test_metrics_section(runs)]
    classified = reading.load_predictions(runs, notes)
    parts += [sections.curves_section(reading.fl_round_metrics(runs, notes), report),
              sections.roc_section(classified, report),
              sections.confusion_section(classified, report),
              sections.calibration_section(classified, report)]
    cross_site = [(run, table) for run in runs if (table := reading.read_cross_site(run, notes)) is not None]
    parts.append(sections.cross_site_section(cross_site, report))
    parts.append(sections.interpretability_section(reading.read_interpretability(report.run_dir, notes),
                                                   reading.read_figure_pngs(report.run_dir, notes)))
    if runs:
        parts.append(sections.parameters_section(runs))
    report.sections += [p for p in parts if p]


def _save(report: Report) -> Path:
    """The figures as PNGs (stale ones of an earlier report removed), then the HTML, atomically."""
    out = report.run_dir / reading.REPORT_DIR
    out.mkdir(exist_ok=True)
    for filename, png in report.figures.items():
        (out / filename).write_bytes(png)
    for stale in out.glob("*.png"):  # figures of an earlier report whose data is gone
        if stale.name not in report.figures:
            stale.unlink()
    html_path = out / REPORT_HTML
    atomic_write_text(html_path, report.render())
    return html_path
