"""`cxrfl report`: one self-contained HTML report (and PNG figures) of a run folder."""

from __future__ import annotations

import sys
from pathlib import Path

from cxrfl.report import ReportError, write_report


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="write an HTML report with figures of a run folder (sim, poc, central, demo or a study)",
        description="Write RUN_DIR/report/report.html: run parameters and wall times, each site's per-round "
        "validation of the global model, ROC curves with AUC and confusion matrices of the classification runs, "
        "cross-site evaluation heat maps, and the interpretability table and figures (interpretability.json, "
        "figures/*.png) when present. Every figure is embedded in the HTML, so the one file can be copied "
        "anywhere; each is also saved as a PNG in RUN_DIR/report/. Sub-runs (any sub-folder with config.json "
        "and metrics.json) are found automatically.",
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder, or a folder of run folders (demo)")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        path = write_report(args.run_dir)
    except (ReportError, OSError) as exc:
        print(f"cxrfl report: {exc}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0
