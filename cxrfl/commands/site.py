"""`cxrfl site check|start|stop|status|unit`: a hospital's site, run from its client startup kit."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from app_custom.site_files import SITE_CONFIG
from cxrfl.fl.site import (DEFAULT_MIN_CERT_DAYS, DEFAULT_MIN_FREE_GB, DEFAULT_SERVER_TIMEOUT, SiteError,
                           refuse_if_running, require_client_kit, run_checks, site_status,
                           start_site, stop_site, systemd_unit, write_site_config)
from cxrfl.options import non_negative_float, non_negative_int, positive_float
from lightning_modules.data.manifest import MANIFEST_NAME

EXIT_NOT_RUNNING = 3


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "site", help="a hospital site from its startup kit: pre-flight check, start, stop, status, systemd unit",
        description="Run a hospital's site from the client startup kit `cxrfl provision` made for it. `check` is "
        "the pre-flight (one PASS/FAIL line per check, with the fix); `start` runs it, names the site's data "
        f"folder in the kit ({SITE_CONFIG}; jobs carry no data path) and starts the kit's client detached; "
        "`stop` ends the kit's processes; `status` says whether it runs and what it last logged about its "
        "connection; `unit` prints a systemd service for it.")
    sub = p.add_subparsers(dest="site_command", metavar="{check,start,stop,status,unit}", required=True)

    check = sub.add_parser("check", help="pre-flight: kit, certificates, server, data, disk, compute, HE",
                           description="One line per check: PASS|FAIL <check>: <detail>; fix: <what to do>. "
                           "Exit status 1 when any check fails, 0 otherwise.")
    _kit(check)
    check.add_argument("--data", type=Path, default=None, metavar="DIR",
                       help=f"this site's data folder (with its {MANIFEST_NAME}; default: the one in the kit's "
                       f"{SITE_CONFIG})")
    _check_options(check)
    check.set_defaults(func=run_check)

    start = sub.add_parser("start", help="check, configure the data folder and start the kit's client",
                           description="Run the checks (nothing starts when one fails), write the kit's "
                           f"{SITE_CONFIG}, and start startup/sub_start.sh in its own session: it starts "
                           "NVFlare's client and restarts it when it dies. Prints its PID and where it logs.")
    _kit(start)
    _data(start)
    _check_options(start)
    start.set_defaults(func=run_start)

    stop = sub.add_parser("stop", help="stop the kit's client and its job processes",
                          description="Stop the NVFlare processes of this kit only (found by what they run and "
                          "the kit's path): SIGTERM, then SIGKILL after 10 s.")
    _kit(stop)
    stop.set_defaults(func=run_stop)

    status = sub.add_parser("status", help="running or not, the data folder, the last connection line of its log",
                            description=f"Exit status 0 when the kit's client runs, {EXIT_NOT_RUNNING} when not.")
    _kit(status)
    status.set_defaults(func=run_status)

    unit = sub.add_parser("unit", help="print a systemd service for the site (and configure its data folder)",
                          description=f"Write the kit's {SITE_CONFIG} and print a systemd unit that runs the "
                          "pre-flight check, then the kit's startup/sub_start.sh (restarted on failure). Save it "
                          "as /etc/systemd/system/cxrfl-site.service, then `systemctl enable --now cxrfl-site`.")
    _kit(unit)
    _data(unit)
    unit.add_argument("--gpu", type=non_negative_int, default=None, metavar="N",
                      help="the GPU the client uses (CUDA_VISIBLE_DEVICES=N)")
    unit.add_argument("--user", default=None, metavar="U", help="run the service as U (who must own the kit)")
    unit.set_defaults(func=run_unit)


def _kit(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kit", type=Path, required=True, metavar="KIT",
                        help="this site's client startup kit (the folder with startup/ and local/)")


def _data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, metavar="DIR",
                        help=f"this site's data folder (the one with its {MANIFEST_NAME})")


def _check_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--min-cert-days", type=non_negative_int, default=DEFAULT_MIN_CERT_DAYS, metavar="N",
                        help=f"certificates must stay valid this many more days (default {DEFAULT_MIN_CERT_DAYS})")
    parser.add_argument("--min-free-gb", type=non_negative_float, default=DEFAULT_MIN_FREE_GB, metavar="G",
                        help=f"free disk needed where the kit is, in GB (default {DEFAULT_MIN_FREE_GB:g})")
    parser.add_argument("--gpu", type=non_negative_int, default=None, metavar="N",
                        help="the GPU the client uses (CUDA_VISIBLE_DEVICES=N; default: what the machine has)")
    parser.add_argument("--he", action="store_true",
                        help="require the HE secret context even if the kit's signature.json does not list it")
    parser.add_argument("--server-timeout", type=positive_float, default=DEFAULT_SERVER_TIMEOUT, metavar="S",
                        help="seconds to wait for the server's TCP and TLS answer "
                        f"(default {DEFAULT_SERVER_TIMEOUT:g})")


def _checks_pass(args) -> bool:
    checks = run_checks(args.kit, args.data, min_cert_days=args.min_cert_days, min_free_gb=args.min_free_gb,
                        gpu=args.gpu, he=args.he, server_timeout=args.server_timeout)
    for check in checks:
        print(check.line())
    return all(check.ok for check in checks)


def run_check(args) -> int:
    try:
        require_client_kit(args.kit)
        return 0 if _checks_pass(args) else 1
    except SiteError as exc:
        print(f"cxrfl site check: {exc}", file=sys.stderr)
        return 2


def run_start(args) -> int:
    try:
        kit = require_client_kit(args.kit)
        refuse_if_running(kit)
    except SiteError as exc:
        print(f"cxrfl site start: {exc}", file=sys.stderr)
        return 2
    if not _checks_pass(args):
        print(f"cxrfl site start: not started: a check failed (above); {kit} is unchanged", file=sys.stderr)
        return 1
    try:
        started = start_site(kit, args.data, args.gpu)
    except SiteError as exc:
        print(f"cxrfl site start: {exc}", file=sys.stderr)
        return 1
    print(f"started: PID {started.pid} (startup/sub_start.sh: it runs the client and restarts it when it dies)")
    print(f"log: {started.log} (NVFlare); console output: {started.console}")
    print(f"stop: cxrfl site stop --kit {shlex.quote(str(kit))}")
    return 0


def run_stop(args) -> int:
    try:
        found, left = stop_site(args.kit)
    except SiteError as exc:
        print(f"cxrfl site stop: {exc}", file=sys.stderr)
        return 2
    if not found:
        print(f"not running: no process of {Path(args.kit).absolute()}")
        return 0
    print(f"stopped {len(found) - len(left)} of {len(found)} processes of {Path(args.kit).absolute()}")
    if left:
        print(f"cxrfl site stop: still running: PIDs {', '.join(str(p.pid) for p in left)}", file=sys.stderr)
        return 1
    return 0


def run_status(args) -> int:
    try:
        status = site_status(args.kit)
    except SiteError as exc:
        print(f"cxrfl site status: {exc}", file=sys.stderr)
        return 2
    pids = ", ".join(str(p.pid) for p in status.processes)
    print(f"running: PIDs {pids}" if status.processes else "not running")
    data = status.data_dir or f"not configured ({SITE_CONFIG} has no data_dir; `cxrfl site start` writes it)"
    gpu = f"; GPU {status.gpu}" if status.gpu is not None else ""
    print(f"data folder: {data}{gpu}")
    if status.last_connection:
        print(f"last connection line of {status.log}: {status.last_connection}")
    else:
        print(f"no connection line in {status.log}" + ("" if status.log.exists() else " (no log yet)"))
    return 0 if status.processes else EXIT_NOT_RUNNING


def run_unit(args) -> int:
    try:
        kit = require_client_kit(args.kit)
        if not (args.data / MANIFEST_NAME).is_file():
            raise SiteError(f"{args.data.absolute()} has no {MANIFEST_NAME}: give this site's own data folder")
        unit = systemd_unit(kit, args.data, gpu=args.gpu, user=args.user)
        config = write_site_config(kit, args.data, args.gpu)
    except SiteError as exc:
        print(f"cxrfl site unit: {exc}", file=sys.stderr)
        return 2
    print(unit, end="")
    print(f"cxrfl site unit: wrote {config}", file=sys.stderr)
    return 0
