"""`cxrfl stats`: federated statistics of the sites' data before training (NVFlare's statistics job)."""

from __future__ import annotations

import sys
from pathlib import Path

from cxrfl.fl import admin, stats
from cxrfl.fl.admin import AdminError, AdminKit
from cxrfl.fl.poc import admin_kit, load_state
from cxrfl.options import non_negative_float, positive_float, positive_int
from cxrfl.report import ReportError, write_report
from cxrfl.runs import RunDirError, new_run_dir
from lightning_modules.data.manifest import ManifestError

DEFAULTS = stats.StatsPlan()


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "stats", help="federated statistics of the sites' data (counts, labels, image sizes, intensities, columns)",
        description="Run NVFlare's federated statistics job over the sites' data, before any training: per site and "
        "overall, the image count per split, each class's prevalence, the image width and height, the pixel "
        "intensity histogram of the whole image and inside the lung mask, and any manifest column named with "
        "--column. Each site computes its own statistics and NVFlare's privacy cleansers run at the site on what "
        "it returns: a feature counted on fewer than --min-count images returns only its count, min and max "
        "(which set the histogram ranges) get random noise, a histogram with too many bins for its count is "
        "dropped. No image or per-patient value leaves a site. Runs in the simulator over a data root (--data), "
        "or on a running deployment (--admin-kit KIT, or --poc WORKSPACE). Writes RUN/stats.json and the report "
        "with one figure per feature (RUN/report/report.html).")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--admin-kit", type=Path, default=None, metavar="KIT",
                       help="submit to a running deployment with this admin's startup kit (`cxrfl provision`)")
    where.add_argument("--poc", type=Path, default=None, metavar="WORKSPACE",
                       help="submit to the POC that `cxrfl poc up` started in WORKSPACE")
    p.add_argument("--data", type=Path, default=None, metavar="ROOT",
                   help="data root: the simulator's sites (one per site folder); with a deployment, the "
                   "coordinator's copy, which only names the classes and the columns' values (a POC: its own)")
    p.add_argument("--sites", dest="site_count", type=positive_int, default=None, metavar="N",
                   help="simulator: the first N site folders of the data root (default: all)")
    p.add_argument("--site-names", default=None, metavar="A,B,...",
                   help="the sites to include (simulator: site folders; deployment: connected sites; default: all)")
    p.add_argument("--column", action="append", default=[], metavar="NAME[=V1,V2,...]",
                   help="a manifest column to describe (repeatable): numeric (histogram, mean, standard deviation) "
                   "or categorical (count per value; with the coordinator's data the kind and values are found "
                   "there, else name the values: --column sex=F,M)")
    p.add_argument("--classes", default=None, metavar="A,B,...",
                   help="class names (default: the data root's dataset.json)")
    p.add_argument("--bins", type=positive_int, default=DEFAULTS.bins,
                   help=f"histogram bins per feature (default {DEFAULTS.bins})")
    p.add_argument("--min-count", type=positive_int, default=DEFAULTS.min_count,
                   help="a site returns a feature's statistics only when counted on at least this many images or "
                   f"rows (NVFlare's MinCountCleanser; default {DEFAULTS.min_count})")
    p.add_argument("--min-noise", type=non_negative_float, default=DEFAULTS.min_noise,
                   help="least relative noise on a site's min and max (AddNoiseToMinMax; default "
                   f"{DEFAULTS.min_noise})")
    p.add_argument("--max-noise", type=positive_float, default=DEFAULTS.max_noise,
                   help=f"most relative noise on a site's min and max (default {DEFAULTS.max_noise})")
    p.add_argument("--max-bins-percent", type=positive_float, default=DEFAULTS.max_bins_percent,
                   help="a site returns a histogram only with fewer bins than this percentage of its count "
                   f"(HistogramBinsCleanser; default {DEFAULTS.max_bins_percent:g})")
    p.add_argument("--out", type=Path, default=None, metavar="RUN_DIR", help="run folder (default: under runs/)")
    p.add_argument("--timeout", type=positive_float, default=3600, help="seconds the job may take (default 3600)")
    p.set_defaults(func=run)


def _names(text: str | None) -> list[str] | None:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


def run(args) -> int:
    try:
        summary, run_dir = _run(args)
        report = write_report(run_dir)
    except (stats.StatsError, ManifestError, AdminError, RunDirError, ReportError) as exc:
        print(f"cxrfl stats: {exc}", file=sys.stderr)
        return 2
    print_counts(summary)
    print(f"run folder: {run_dir}\nreport: {report}")
    return 0


def _run(args) -> tuple[dict, Path]:
    """Check every input, then run the job where asked; (stats.json's content, run folder)."""
    names = _names(args.site_names)
    if args.poc is None and args.admin_kit is None:
        if args.data is None:
            raise stats.StatsError("give --data ROOT (simulator), --poc WORKSPACE or --admin-kit KIT")
        sites = stats.data_sites(args.data, args.site_count, names)
        plan = _plan(args, args.data, sites)
        run_dir = new_run_dir(args.out, "stats")
        return stats.run_simulation(plan, args.data, sites, run_dir, timeout=args.timeout), run_dir
    if args.site_count is not None:
        raise stats.StatsError("--sites N chooses site folders for the simulator; name a deployment's sites "
                               "with --site-names")
    state = load_state(args.poc) if args.poc is not None else None
    kit = admin_kit(state) if state else AdminKit.open(args.admin_kit)
    data_root = args.data or (Path(state["data_root"]) if state else None)
    sites = admin.expected_sites(kit, names or (state["sites"] if state else None), allow_missing=False)
    plan = _plan(args, data_root, stats.data_sites(data_root, None, None) if data_root else [])
    run_dir = new_run_dir(args.out, "stats")
    job_id = stats.submit(kit, plan, sites)
    print(f"submitted statistics job {job_id} to {kit.server} for {', '.join(sites)}", flush=True)
    kits = Path(state["kits"]) if state else None
    site_logs = [kits / site / job_id / "log.txt" for site in sites] if kits else []
    where = {"mode": "poc" if state else "deployment", "server": kit.server,
             **({"data_root": str(Path(data_root).absolute())} if data_root else {})}
    return stats.wait(kit, job_id, plan, sites, run_dir, where, timeout=args.timeout, site_logs=site_logs), run_dir


def _plan(args, data_root: Path | None, data_sites: list[str]) -> stats.StatsPlan:
    """The job's plan; the coordinator's data (when there is one) names the classes and columns' values."""
    numeric, categories = stats.plan_columns(args.column, data_root, data_sites)
    return stats.StatsPlan(classes=stats.plan_classes(_names(args.classes), data_root, data_sites),
                           numeric_columns=numeric, categories=categories, bins=args.bins, min_count=args.min_count,
                           min_noise=args.min_noise, max_noise=args.max_noise, max_bins_percent=args.max_bins_percent)


def print_counts(summary: dict) -> None:
    """Images per split and each class's count per site, as the sites returned them."""
    features = summary["features"]
    rows = [name for name, f in features.items() if f["group"] in ("split", "label")]
    print("site".ljust(24) + "".join(name.ljust(18) for name in rows))
    for site in summary["sites"]:
        cells = [features[name]["sites"][site] for name in rows]
        print(site.ljust(24) + "".join(_cell(c).ljust(18) for c in cells))


def _cell(entry: dict) -> str:
    if "sum" in entry:
        return f"{entry['sum']:.0f} of {entry['count']}"
    return f"withheld (n={entry.get('count', 0)})"
