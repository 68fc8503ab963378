"""`cxrfl sim`: run a federated job in the NVFlare simulator."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cxrfl.fl.config import FLConfig
from cxrfl.options import add_config_options, fl_config
from cxrfl.runs import RunDirError, new_run_dir, print_test_metrics
from cxrfl.fl.results import SimulationError
from cxrfl.fl.resume import resume_simulation
from cxrfl.fl.simulator import check_simulator_gpus, run_simulation
from lightning_modules.accelerate import parse_gpu_ids
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
    p.add_argument("--gpus", type=_gpu_ids, default=(), metavar="IDS",
                   help="CUDA device ids for the sites as nvidia-smi numbers them, comma-separated (e.g. 0,1): NVFlare "
                   "assigns the sites to them round-robin, one site per GPU at a time when there are several "
                   "(default: every site sees every GPU and uses the first); recorded in the run folder's facts")
    p.set_defaults(func=run)


def _gpu_ids(text: str) -> tuple[int, ...]:
    try:
        return parse_gpu_ids(text)
    except ValueError as exc:  # argparse names the option itself
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--gpus: ")) from None


def run(args) -> int:
    try:
        if args.resume is not None:
            run_dir = args.resume.absolute()
            summary = resume_simulation(run_dir, threads=args.threads, take_turns=args.take_turns, gpus=args.gpus)
        else:
            if not args.task:
                raise ValueError("--task is required (or --resume RUN_DIR)")
            cfg = fl_config(args)
            check_simulator_gpus(cfg, args.gpus, args.take_turns)  # before a run folder is made
            run_dir = new_run_dir(args.out, f"sim-{args.task}")
            summary = run_simulation(cfg, run_dir, threads=args.threads, take_turns=args.take_turns, gpus=args.gpus)
    except (ValueError, ManifestError, RunDirError, SimulationError) as exc:
        print(f"cxrfl sim: {exc}", file=sys.stderr)
        return 2
    print(f"\nrun folder: {run_dir}  ({summary['wall_seconds']:.0f} s)")
    print(f"test metrics of the {summary['selected_model']} model:")
    print_test_metrics(summary["test"], summary.get("undefined_reason", ""))
    return 0
