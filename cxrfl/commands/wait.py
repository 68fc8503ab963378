"""`cxrfl wait`: follow a job on any running deployment, download and evaluate it into a run folder."""

from __future__ import annotations

import sys
from pathlib import Path

from cxrfl.commands.submit import add_admin_kit
from cxrfl.fl import admin
from cxrfl.fl.admin import AdminError, AdminKit
from cxrfl.fl.outcome import run_notes
from cxrfl.fl.results import SimulationError
from cxrfl.runs import RunDirError, print_test_metrics


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "wait", help="follow a submitted job, download its results and evaluate them into a run folder",
        description="Wait for JOB (submitted with `cxrfl submit` from the same admin kit), download its results "
        "and evaluate them into a run folder like `cxrfl sim`'s: cross-site matrix, the selected global model "
        "and, with --data, its held-out test metrics. A run in which a round lacked --min-clients updates, or an "
        "expected site never contributed, ends as failed naming them (exit 2).")
    p.add_argument("job_id", metavar="JOB")
    add_admin_kit(p)
    p.add_argument("--out", type=Path, default=None, metavar="RUN_DIR",
                   help="run folder (default: under runs/; for a resumed job, the run it continues)")
    p.add_argument("--data", type=Path, default=None, metavar="DATA_ROOT",
                   help="the coordinator's data root: its test split evaluates the models (default: no test metrics)")
    p.add_argument("--he-key", type=Path, default=None, metavar="CLIENT_CONTEXT",
                   help="an HE job's models are ciphertexts on the server: a site's client_context.tenseal decrypts "
                   "them for the test set (run this where that key may be)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds to wait (default 3600)")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        kit = AdminKit.open(args.admin_kit)
        run_dir = admin.wait_folder(kit, args.job_id, args.out, "deployment")
        summary = admin.wait(kit, args.job_id, run_dir, args.data, timeout=args.timeout, he_key=args.he_key)
    except (AdminError, SimulationError, RunDirError) as exc:
        print(f"cxrfl wait: {exc}", file=sys.stderr)
        return 2
    print_waited(args.job_id, run_dir, summary)
    return 0


def print_waited(job_id: str, run_dir: Path, summary: dict) -> None:
    """The terminal summary of a job waited for (also `cxrfl poc wait`'s)."""
    print(f"job {job_id}: {summary['status']}; run folder: {run_dir}")
    print_test_metrics(summary["test"], summary.get("undefined_reason", ""))
    for note in run_notes(summary):  # sites that missed rounds, an early stop
        print(note)
