"""`cxrfl provision`: production startup kits (NVFlare's provisioner, not POC) and who gets which."""

from __future__ import annotations

import sys
from pathlib import Path

from cxrfl.options import positive_int
from cxrfl.fl.provision import PROJECT_FILE, ProvisionError, handover, load_project, provision


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "provision", help="build the production startup kits (server, hospital sites, admins) from project.yml",
        description="Check provision/project.yml (server host name, unique names, builder order) and run "
        "NVFlare's provisioner on it: one startup kit per participant, mutual TLS from a new root CA, TenSEAL "
        "contexts when the project has the HE builder (the secret key only in the sites' kits). Prints, per "
        "participant, the kit to hand over and what its operator does next (docs/security.md: who sees what).")
    p.add_argument("--project", type=Path, default=PROJECT_FILE, help=f"NVFlare project file (default {PROJECT_FILE})")
    p.add_argument("--out", type=Path, default=Path("provisioned"),
                   help="a new or empty folder for the kits (default ./provisioned)")
    p.add_argument("--same-ca", action="store_true",
                   help="provision again into the --out folder of an earlier provisioning, with its root CA: add a "
                   "hospital (hand out only the new kit; the others keep working). To revoke one, provision into a new "
                   "folder without --same-ca (a new root CA) and hand every remaining participant its new kit")
    p.add_argument("--server-storage", type=Path, default=None, metavar="DIR",
                   help="where the server keeps its job store and snapshots, a folder on the server host (default: "
                   "NVFlare's /tmp/nvflare, which a reboot may wipe and every server on that host shares)")
    p.add_argument("--heartbeat-timeout", type=positive_int, default=60, metavar="SECONDS",
                   help="the server writes off a site it has not heard from for this long (sites send a heartbeat "
                   "every 10 s; default 60; NVFlare's own 600 keeps a dead site's tasks waiting 10 minutes)")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        kits = provision(args.project, args.out, server_storage=args.server_storage,
                         heartbeat_timeout=args.heartbeat_timeout, same_ca=args.same_ca)
    except ProvisionError as exc:
        print(f"cxrfl provision: {exc}", file=sys.stderr)
        return 2
    project = load_project(args.project)
    print(f"{len(kits)} startup kits in {kits[0].path.parent}:")
    for kit in kits:
        print(f"- {handover(kit, project)}")
    return 0
