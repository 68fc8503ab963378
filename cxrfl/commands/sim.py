"""`cxrfl sim`: run a federated job in the NVFlare simulator."""

from __future__ import annotations

import sys
from pathlib import Path

from cxrfl.fl.config import FLConfig
from cxrfl.options import add_config_options, fl_config
from cxrfl.runs import RunDirError, new_run_dir, print_test_metrics
from cxrfl.fl.results import SimulationError
from cxrfl.fl.resume import resume_simulation
from cxrfl.fl.simulator import run_simulation
from lightning_modules.data.manifest import ManifestError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "sim",
        help="run a federated job (ScatterAndGather) in the NVFlare simulator",
        description="Export the task's NVFlare job (ScatterAndGather, sample-weighted FedAvg or FedOpt, best "
        "global model by the sites' validation metric) and run it in the NVFlare simulator, one client per "
        "site folder of the data root. Then evaluate the final, best and each site's local model on every "
        "site's validation split (cross-site evaluation) and on the held-out test set. The run folder holds "
        "the job, the models of every round, per-round per-site metrics, TensorBoard curves, the cross-site "
        "matrix (cross_site.json/.csv) and the logs.",
    )
    add_config_options(p, FLConfig, "fl", task_required=False)  # --resume takes everything from the run folder
    p.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                   help="continue a run that was killed, with its own configuration, from the last round whose "
                   "global model was written (the interrupted round is redone); other options are ignored")
    p.add_argument("--threads", type=int, default=None, help="clients run in parallel (default: one per site)")
    p.add_argument("--take-turns", action="store_true",
                   help="sites work one at a time, each with all cores (their processes stay up): per-site times "
                   "are uncontended, as with one machine per hospital; for timing studies and benchmarks")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        if args.resume is not None:
            run_dir = args.resume.absolute()
            summary = resume_simulation(run_dir, threads=args.threads, take_turns=args.take_turns)
        else:
            if not args.task:
                raise ValueError("--task is required (or --resume RUN_DIR)")
            cfg = fl_config(args)
            run_dir = new_run_dir(args.out, f"sim-{args.task}")
            summary = run_simulation(cfg, run_dir, threads=args.threads, take_turns=args.take_turns)
    except (ValueError, ManifestError, RunDirError, SimulationError) as exc:
        print(f"cxrfl sim: {exc}", file=sys.stderr)
        return 2
    print(f"\nrun folder: {run_dir}  ({summary['wall_seconds']:.0f} s)")
    print(f"test metrics of the {summary['selected_model']} model:")
    print_test_metrics(summary["test"], summary.get("undefined_reason", ""))
    return 0
