"""`cxrfl submit`: submit a job to any running deployment with an admin's startup kit."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from cxrfl.fl import admin
from cxrfl.fl.admin import AdminError, AdminKit
from cxrfl.fl.config import FLConfig
from cxrfl.fl.results import SimulationError
from cxrfl.options import add_config_options, fl_config
from lightning_modules.data.manifest import ManifestError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "submit", help="submit a job to a running deployment (production or POC) with an admin kit",
        description="Export the task's job (as `cxrfl export`) and submit it through the FLARE API with an admin's "
        "startup kit: to a provisioned deployment across hosts or to a POC alike. The job names the sites it "
        "expects (--site-names, else every site connected now); no data path travels, each site reads its "
        "own from its kit. Prints the job id; `cxrfl wait JOB --admin-kit KIT` follows it.")
    add_admin_kit(p)
    add_config_options(p, FLConfig, "fl", task_required=False)  # --resume takes everything from the run folder
    p.add_argument("--site-names", default=None, metavar="A,B,...",
                   help="the sites the job is for, each of which must be connected (default: every connected site)")
    p.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                   help="submit the remaining rounds of a job whose server job was killed or crashed (`cxrfl wait` "
                   "says so and keeps its results in RUN_DIR), from its last completed round's global model")
    p.set_defaults(func=run)


def add_admin_kit(p) -> None:
    p.add_argument("--admin-kit", type=Path, required=True, metavar="KIT",
                   help="an admin's startup kit from `cxrfl provision` (a role that may submit jobs: project_admin "
                   "or lead)")


def run(args) -> int:
    try:
        kit = AdminKit.open(args.admin_kit)
        if args.resume is not None:
            cfg = admin.resume_config(args.resume, admin.connected_sites(kit))
            job_id = admin.submit_resumed(kit, cfg, args.resume)
        else:
            if not args.task:
                raise ValueError("--task is required (or --resume RUN_DIR)")
            named = [s.strip() for s in args.site_names.split(",") if s.strip()] if args.site_names else None
            cfg = fl_config(args)
            sites = admin.expected_sites(kit, named, cfg.allow_missing_sites)
            # the data root here only gives the class names; the sites read their own data
            job_id = admin.submit(kit, replace(cfg, sites=tuple(sites), data_root=None))
    except (AdminError, ValueError, ManifestError, SimulationError) as exc:
        print(f"cxrfl submit: {exc}", file=sys.stderr)
        return 2
    print(job_id)
    return 0
