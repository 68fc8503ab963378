"""`cxrfl export`: write a job folder for `nvflare job submit` or the admin console."""

from __future__ import annotations

import sys
from pathlib import Path

from cxrfl.fl.config import FLConfig
from cxrfl.options import add_config_options, fl_config
from cxrfl.fl.simulator import export_job
from lightning_modules.data.manifest import ManifestError

JOB_CONFIG = "job_config.json"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a federated job folder for `nvflare job submit` / the admin console",
        description="Write the NVFlare job of a task (the same one `cxrfl sim` runs) to --out/<job name>/ "
        "(meta.json, app/config, app/custom), ready for `nvflare job submit -j OUT/<job name>` or the admin "
        "console's `submit_job`. Site names are the data root's site folders; --data is the path each site "
        "reads its data from.",
    )
    add_config_options(p, FLConfig, "fl")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.out is None:
        print("cxrfl export: --out DIR is required", file=sys.stderr)
        return 2
    try:
        cfg = fl_config(args)
        job_dir = export_job(cfg, Path(args.out))
        cfg.write_json(Path(args.out) / JOB_CONFIG)  # a record of the exported job, not a run folder
    except (ValueError, ManifestError) as exc:
        print(f"cxrfl export: {exc}", file=sys.stderr)
        return 2
    print(f"job folder: {job_dir}\nsubmit with: nvflare job submit -j {job_dir}")
    return 0
