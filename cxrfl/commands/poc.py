"""`cxrfl poc up|submit|wait|restart|down`: a provisioned deployment (server + hospital sites) on this machine."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from cxrfl.commands.wait import print_waited
from cxrfl.fl.admin import AdminError, wait_folder
from cxrfl.fl.config import FLConfig
from cxrfl.options import add_config_options, fl_config, positive_int, resolve_data_root
from cxrfl.fl.poc import admin_kit, load_state, poc_down, poc_restart_site, poc_resume, poc_submit, poc_up, poc_wait
from cxrfl.runs import RunDirError
from cxrfl.fl.results import SimulationError
from lightning_modules.data.manifest import ManifestError

DEFAULT_WORKSPACE = Path("poc-workspace")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "poc",
        help="provisioned POC: start server and hospital sites, submit jobs through the admin API",
        description="Run the federation as a provisioned deployment on this machine: `up` provisions a "
        "server, N hospital sites and admins from provision/project.yml (mutual TLS startup kits), starts them "
        "and waits until every site is connected; `submit` exports a job and submits it as the project admin; "
        "`wait` follows it, downloads its results and evaluates them into a run folder like `cxrfl sim`'s; "
        "`down` stops the POC's processes (`--clean` also removes what `up` created). `up` takes a new or empty "
        "folder, or one holding only an earlier POC (stopped and replaced).",
    )
    sub = p.add_subparsers(dest="poc_command", metavar="{up,submit,wait,restart,down}", required=True)

    _add_up(sub)
    _add_submit(sub)

    wait = sub.add_parser("wait", help="follow a job to its end and download its results into a run folder",
                          description="Wait for JOB, download its results and evaluate them (cross-site matrix, "
                          "held-out test metrics) into --out.")
    wait.add_argument("job_id", metavar="JOB")
    wait.add_argument("--out", type=Path, default=None, metavar="RUN_DIR",
                      help="run folder (default: under runs/; for a resumed job, the run it continues)")
    wait.add_argument("--timeout", type=float, default=3600, help="seconds to wait (default 3600)")
    _workspace(wait)
    wait.set_defaults(func=run_wait)

    restart = sub.add_parser("restart", help="start a site again after its processes died",
                             description="Start SITE's client again after a crash or kill and wait until it is "
                             "connected. A running job goes on without it (NVFlare does not re-admit a restarted "
                             "client into a running job); it takes part from the next job.")
    restart.add_argument("site", metavar="SITE")
    _workspace(restart)
    restart.set_defaults(func=run_restart)

    down = sub.add_parser("down", help="stop every POC process",
                          description="Stop server, sites and their job processes: NVFlare's own stop, then the "
                          "POC's processes that still run (recognised by what they run and their workspace path; "
                          "nothing else is touched). A folder without the state file `poc up` writes is refused.")
    down.add_argument("--clean", action="store_true",
                      help="also remove what `poc up` created in the workspace (the folder too, unless it holds "
                      "other files); refused for a folder `poc up` did not create")
    _workspace(down)
    down.set_defaults(func=run_down)


def _add_up(sub) -> None:
    up = sub.add_parser("up", help="provision and start server + sites", description="Provision and start the POC.")
    up.add_argument("--sites", type=positive_int, default=3, help="number of hospital sites (default 3)")
    up.add_argument("--he", action="store_true", help="provision TenSEAL HE contexts into the kits (HEBuilder)")
    up.add_argument("--port", type=int, default=None, help="server port (default: a free port)")
    up.add_argument("--heartbeat-timeout", type=positive_int, default=60, metavar="SECONDS",
                    help="the server writes off a site it has not heard from for this long (sites send a heartbeat "
                    "every 10 s; default 60; NVFlare's own default of 600 keeps a dead site's tasks waiting)")
    up.add_argument("--data", type=Path, default=None,
                    help="data root; site i reads folder i of it (written into each site's local/cxrfl_site.json)")
    _workspace(up)
    up.set_defaults(func=run_up)


def _add_submit(sub) -> None:
    submit = sub.add_parser("submit", help="export a job and submit it through the admin API",
                            description="Export the task's job (as `cxrfl export`) for the POC's sites and submit it.")
    add_config_options(submit, FLConfig, "fl", task_required=False)  # --resume takes everything from the run folder
    submit.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                        help="a job whose server job was killed or crashed (`poc wait` says so and keeps its results "
                        "in RUN_DIR): submit its remaining rounds as a new job that starts from the global model of "
                        "its last completed round, with the run's own configuration (other options are ignored); "
                        "`poc wait JOB` adds its rounds to RUN_DIR")
    _workspace(submit)
    submit.set_defaults(func=run_submit)


def _workspace(p) -> None:
    p.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE,
                   help=f"POC workspace (default {DEFAULT_WORKSPACE})")


def _fail(exc: Exception) -> int:
    print(f"cxrfl poc: {exc}", file=sys.stderr)
    return 2


def run_up(args) -> int:
    try:
        state = poc_up(args.workspace, args.sites, resolve_data_root(args.data), he=args.he, port=args.port,
                       heartbeat_timeout=args.heartbeat_timeout)
    except (AdminError, ManifestError) as exc:
        return _fail(exc)
    print(f"POC up on localhost:{state['port']} with sites {', '.join(state['sites'])}")
    print(f"admin kit: {state['admin_kit']}")
    print(f"admin console: {state['admin_kit']}/startup/fl_admin.sh")
    return 0


def run_submit(args) -> int:
    try:
        state = load_state(args.workspace)
        if args.resume is not None:
            job_id = poc_resume(state, args.resume)
        else:
            if not args.task:
                raise ValueError("--task is required (or --resume RUN_DIR)")
            cfg = replace(fl_config(args), sites=state["sites"], data_root=None)  # sites read their own data
            job_id = poc_submit(state, cfg)
    except (AdminError, ValueError, ManifestError, SimulationError) as exc:
        return _fail(exc)
    print(job_id)
    return 0


def run_wait(args) -> int:
    try:
        state = load_state(args.workspace)
        run_dir = wait_folder(admin_kit(state), args.job_id, args.out, "poc")
        summary = poc_wait(state, args.job_id, run_dir, timeout=args.timeout)
    except (AdminError, SimulationError, RunDirError) as exc:
        return _fail(exc)
    print_waited(args.job_id, run_dir, summary)
    return 0


def run_restart(args) -> int:
    try:
        poc_restart_site(load_state(args.workspace), args.site)
    except AdminError as exc:
        return _fail(exc)
    print(f"{args.site} connected again; it takes part from the next job")
    return 0


def run_down(args) -> int:
    if not args.workspace.exists():
        print(f"nothing to stop: {args.workspace} does not exist")
        return 0
    try:
        notes = poc_down(args.workspace, clean=args.clean)
    except AdminError as exc:
        return _fail(exc)
    for note in notes:  # NVFlare's stop failed and the processes were stopped directly; files kept
        print(f"cxrfl poc: {note}", file=sys.stderr)
    print("POC stopped" + (" and removed" if args.clean and not args.workspace.exists() else ""))
    return 0
