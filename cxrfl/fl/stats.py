"""Federated statistics before training (`cxrfl stats`): NVFlare's statistics job over the sites' data,
run in the simulator over a data root or submitted to a running deployment (POC or production).

The job is NVFlare's `StatsJob`: the `StatisticsController` and JSON writer on the server; at each site
`app_custom/cxr_statistics.py` (the `Statistics` spec) behind NVFlare's privacy filter with its three
cleansers, applied at the site to every result before it leaves: `MinCountCleanser` (a feature counted
on fewer rows than --min-count returns only its count), `AddNoiseToMinMax` (min and max, which set the
histogram ranges, move outward by a random --min-noise to --max-noise share), `HistogramBinsCleanser` (a
histogram with at least --max-bins-percent % of its count in bins is dropped).

Run folder::

    RUN/config.json               {"kind": "stats", the job's settings, where it ran}
    RUN/stats.json                per feature: each site's statistics and the pooled global (stats_summary.py)
    RUN/nvflare_statistics.json   the JSON NVFlare's writer produced, as it is
    RUN/job/cxrfl_stats/          the exported job
    RUN/workspace/, simulator.log (simulator) or RUN/download/ (a deployment's job result)
    RUN/report/                   report.html and one figure per feature (`cxrfl report RUN`)
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nvflare.job_config.stats_job import StatsJob

import app_custom
from app_custom.cxr_statistics import (REFUSED_COLUMNS, CXRStatistics, StatFeature, cell, histogram_config,
                                       numeric_cell, stat_features)
from app_custom.site_files import SITE_CONFIG
from cxrfl.fl import admin
from cxrfl.fl.admin import AdminKit
from cxrfl.fl.stats_summary import summarise
from cxrfl.run_folder import RunFolder
from lightning_modules.data.atomic import read_json_object, write_json
from lightning_modules.data.manifest import COLUMNS, MANIFEST_NAME, class_names, read_manifest, site_dirs

JOB_NAME = "cxrfl_stats"
RESULT_PATH = "statistics/cxrfl_statistics.json"  # NVFlare's writer: relative to the server's job folder
STATS_FILE = "stats.json"
NVFLARE_RESULT_FILE = "nvflare_statistics.json"
MAX_CATEGORIES = 20  # an inferred categorical column with more distinct values must name the ones to count
STATISTIC_CONFIGS = {"count": {}, "sum": {}, "mean": {}, "stddev": {}}
# NVFlare's exporter copies a component's module and the modules it imports, not their packages' __init__
# files: added so that the job's copy holds the same regular packages as the training job's.
PACKAGE_ROOT = Path(app_custom.__file__).resolve().parent.parent
PACKAGE_INITS = ("app_custom/__init__.py", "lightning_modules/__init__.py", "lightning_modules/data/__init__.py")
SITE_ERROR = re.compile(r"(?:SiteConfigError|ManifestError|ImageReadError): (.+)$")  # a site's own data problem


class StatsError(ValueError):
    """The statistics cannot be computed as asked; one line naming the option, file or site."""


@dataclass(frozen=True)
class StatsPlan:
    """What the job computes and how the sites' cleansers treat it."""

    classes: tuple[str, ...] = ()
    numeric_columns: tuple[str, ...] = ()
    categories: dict[str, tuple[str, ...]] = field(default_factory=dict)
    bins: int = 10
    min_count: int = 10
    min_noise: float = 0.1
    max_noise: float = 0.3
    max_bins_percent: float = 10.0

    def __post_init__(self):
        if self.bins < 1 or self.min_count < 1:
            raise StatsError(f"--bins and --min-count must be >= 1 (got {self.bins}, {self.min_count})")
        if not 0 <= self.min_noise <= self.max_noise <= 1 or self.max_noise <= 0:
            raise StatsError(f"noise levels must satisfy 0 <= --min-noise <= --max-noise <= 1 with --max-noise > 0 "
                             f"(got {self.min_noise}, {self.max_noise})")
        if not 0 < self.max_bins_percent <= 100:
            raise StatsError(f"--max-bins-percent must be in (0, 100], got {self.max_bins_percent}")

    @property
    def features(self) -> list[StatFeature]:
        return stat_features(self.classes, self.numeric_columns, self.categories)

    def settings(self) -> dict:
        return {**asdict(self), "classes": list(self.classes), "numeric_columns": list(self.numeric_columns),
                "categories": {k: list(v) for k, v in self.categories.items()}}


# ---- the plan from the command line ---------------------------------------------------------------
def parse_column(text: str) -> tuple[str, tuple[str, ...] | None]:
    """`NAME` (numeric, or categorical when the coordinator's data says so) or `NAME=V1,V2` (these values)."""
    name, has_values, values = text.partition("=")
    name = name.strip()
    if not name or name.startswith("image:"):
        raise StatsError(f"--column {text!r}: expected NAME or NAME=VALUE1,VALUE2 (a manifest column)")
    if name in REFUSED_COLUMNS:
        raise StatsError(f"--column {name}: not allowed (paths, patient identifiers, and label/split, which the "
                         f"statistics already count)")
    if not has_values:
        return name, None
    named = tuple(v.strip() for v in values.split(","))
    if not all(named) or len(set(named)) != len(named):
        raise StatsError(f"--column {text!r}: the values must be distinct and non-empty")
    return name, named


def plan_columns(columns: list[str], data_root: Path | None, sites: list[str]) -> tuple[tuple, dict]:
    """(numeric columns, {categorical column: values}) for the --column options; with the coordinator's
    data root each named column must have values there, and one without listed values is numeric when
    every value is a number, else categorical over its values (at most MAX_CATEGORIES)."""
    rows = [r for site in sites for r in read_manifest(Path(data_root) / site / MANIFEST_NAME)] if data_root else None
    numeric, categories = [], {}
    for name, values in map(parse_column, columns):
        if name in numeric or name in categories:
            raise StatsError(f"--column {name}: given twice")
        found = sorted({cell(r, name) for r in rows} - {""}) if rows is not None else None
        if found == []:
            raise StatsError(f"--column {name}: no manifest of the sites ({', '.join(sites)}) in {data_root} has a "
                             f"value in this column (columns: {', '.join(_columns(rows))})")
        if values is not None:
            categories[name] = values
        elif found is None or not any(math.isnan(numeric_cell(v)) for v in found):
            numeric.append(name)
        elif len(found) > MAX_CATEGORIES:
            raise StatsError(f"--column {name}: {len(found)} distinct values, not a category to count per value; "
                             f"name the values to count: --column {name}=A,B,...")
        else:
            categories[name] = tuple(found)
    return tuple(numeric), categories


def _columns(rows) -> list[str]:
    named = {c for c in COLUMNS if any(getattr(r, c) for r in rows)} | {k for r in rows for k in r.extra}
    return sorted(named - set(REFUSED_COLUMNS)) or ["none usable"]


def plan_classes(given: list[str] | None, data_root: Path | None, sites: list[str]) -> tuple[str, ...]:
    if given:
        return tuple(given)
    if data_root is None:
        raise StatsError("name the classes with --classes A,B (or give --data ROOT: its dataset.json names them)")
    rows = (r for site in sites for r in read_manifest(Path(data_root) / site / MANIFEST_NAME))
    return tuple(class_names(data_root, rows))


def data_sites(data_root: Path, count: int | None, names: list[str] | None) -> list[str]:
    """The data root's site folders: those named, or the first `count` (all by default)."""
    if not Path(data_root).is_dir():
        raise StatsError(f"--data {data_root}: folder does not exist")
    available = [p.name for p in site_dirs(data_root)]
    if names:
        missing = [n for n in names if n not in available]
        if missing:
            raise StatsError(f"--site-names: no site folder {', '.join(missing)} in {data_root} "
                             f"(found: {', '.join(available)})")
        return list(names)
    if count is not None and count > len(available):
        raise StatsError(f"--sites {count}: {data_root} has only {len(available)} site folders")
    return available[:count] if count else available


# ---- the job --------------------------------------------------------------------------------------
def build_job(plan: StatsPlan, sites: list[str]) -> StatsJob:
    features = plan.features
    configs = {**STATISTIC_CONFIGS, "histogram": histogram_config(features, plan.bins)}
    generator = CXRStatistics(classes=list(plan.classes), numeric_columns=list(plan.numeric_columns),
                              categories={k: list(v) for k, v in plan.categories.items()}, bins=plan.bins)
    job = StatsJob(name=JOB_NAME, statistic_configs=configs, stats_generator=generator, output_path=RESULT_PATH,
                   min_count=plan.min_count, min_noise_level=plan.min_noise, max_noise_level=plan.max_noise,
                   max_bins_percent=plan.max_bins_percent)
    job.setup_clients(sites)
    for site in sites:
        for init in PACKAGE_INITS:
            job.add_file_to(str(PACKAGE_ROOT / init), site, dest_dir=str(Path(init).parent))
    return job


def export_job(plan: StatsPlan, sites: list[str], out_dir: Path) -> Path:
    out_dir = Path(out_dir).absolute()
    build_job(plan, sites).export_job(str(out_dir))
    return out_dir / JOB_NAME


def record_run(run_dir: Path, plan: StatsPlan, sites: list[str], raw_file: Path, where: dict) -> dict:
    """config.json, NVFlare's result as it is, and stats.json; returns stats.json's content."""
    settings = plan.settings()
    RunFolder.create(run_dir, "stats", settings={**settings, "sites": list(sites), **where})
    try:
        raw = read_json_object(raw_file)
    except ValueError as exc:
        raise StatsError(str(exc)) from None
    write_json(run_dir / NVFLARE_RESULT_FILE, raw)
    summary = summarise(raw, plan.features, sites, settings)
    write_json(run_dir / STATS_FILE, summary)
    return summary


# ---- in the simulator -----------------------------------------------------------------------------
def run_simulation(plan: StatsPlan, data_root: Path, sites: list[str], run_dir: Path, timeout: float = 3600) -> dict:
    """Run the job in the NVFlare simulator, one client per site folder of data_root."""
    run_dir = Path(run_dir).absolute()
    job_dir = export_job(plan, sites, run_dir / "job")
    workspace = run_dir / "workspace"
    write_json(workspace / SITE_CONFIG, {"data_root": str(Path(data_root).absolute())})  # copied into every site
    exe = Path(sys.executable).parent / "nvflare"
    command = [str(exe) if exe.exists() else "nvflare", "simulator", str(job_dir), "-w", str(workspace),
               "-n", str(len(sites)), "-t", str(len(sites)), "-c", ",".join(sites)]
    log = run_dir / "simulator.log"
    start = time.time()
    with open(log, "w") as out:
        try:
            subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=run_dir, timeout=timeout,
                           env=dict(os.environ, PYTHONWARNINGS="ignore"))
        except subprocess.TimeoutExpired:
            raise StatsError(f"the statistics job did not end within {timeout:.0f} s; see {log}") from None
    raw = workspace / "server" / "simulate_job" / RESULT_PATH
    if not raw.is_file():  # the simulator exits 0 whatever happened: judged by the result file
        site_logs = [workspace / site / "log.txt" for site in sites]
        raise StatsError(f"the statistics job wrote no result: {_reasons(site_logs, [log])}; see {log}")
    where = {"mode": "simulator", "data_root": str(Path(data_root).absolute()),
             "wall_seconds": round(time.time() - start, 1)}
    return record_run(run_dir, plan, sites, raw, where)


def _reasons(site_logs: list[Path], server_logs: list[Path]) -> str:
    """The sites' own errors (e.g. a missing data folder) from their logs, else the server's."""
    def found(logs: list[Path], pattern: re.Pattern) -> list[str]:
        lines = [line for path in logs if path.is_file() for line in path.read_text(errors="replace").splitlines()]
        return list(dict.fromkeys(m.group(1).strip() for m in map(pattern.search, lines) if m))[:3]
    reasons = found(site_logs, SITE_ERROR) or found(server_logs, admin.SERVER_ERROR)
    return "; ".join(reasons) if reasons else "no site or server error was logged"


# ---- on a running deployment ----------------------------------------------------------------------
def submit(kit: AdminKit, plan: StatsPlan, sites: list[str]) -> str:
    """Export the job for `sites` beside the admin kit's other jobs and submit it; returns the job id."""
    return admin.submit_folder(kit, export_job(plan, sites, admin.new_job_folder(kit, JOB_NAME)))


def wait(kit: AdminKit, job_id: str, plan: StatsPlan, sites: list[str], run_dir: Path, where: dict,
         timeout: float = 3600, site_logs: list[Path] = ()) -> dict:
    """Follow the job to its end, download its result into RUN/download and record the run."""
    run_dir = Path(run_dir).absolute()
    start = time.time()
    meta = admin.follow_job(kit, job_id, timeout)
    download = run_dir / "download"
    admin.download_result(kit, job_id, download)
    found = sorted(download.rglob(Path(RESULT_PATH).name))
    if not found:
        server_logs = sorted(download.rglob("log.txt"))
        raise StatsError(f"statistics job {job_id} ended as {meta.get('status')} without a result: "
                         f"{_reasons(list(site_logs), server_logs)}; see {download}")
    where = {**where, "job_id": job_id, "status": str(meta.get("status")),
             "wall_seconds": round(time.time() - start, 1)}
    return record_run(run_dir, plan, sites, found[0], where)

