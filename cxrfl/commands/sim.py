"""`cxrfl sim`: run a federated job in the NVFlare simulator."""

from __future__ import annotations

import sys

from cxrfl.commands.fl_options import add_fl_options, config_from_args
from cxrfl.runs import RunDirError, new_run_dir
from cxrfl.simulate import SimulationError, run_simulation
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
    add_fl_options(p)
    p.add_argument("--threads", type=int, default=None, help="clients run in parallel (default: one per site)")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        cfg = config_from_args(args)
        run_dir = new_run_dir(args.out, f"sim-{args.task}")
        summary = run_simulation(cfg, run_dir, threads=args.threads)
    except (ValueError, ManifestError, RunDirError, SimulationError) as exc:
        print(f"cxrfl sim: {exc}", file=sys.stderr)
        return 2
    print(f"\nrun folder: {run_dir}  ({summary['wall_seconds']:.0f} s)")
    print(f"test metrics of the {summary['selected_model']} model:")
    for key, value in sorted(summary["test"].items()):
        print(f"  {key:>24}: {value:.4f}")
    return 0
