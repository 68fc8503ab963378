"""`cxrfl provision`: production startup kits (NVFlare's provisioner, not POC) and who gets which."""

from __future__ import annotations

import sys
from pathlib import Path

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
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        kits = provision(args.project, args.out)
    except ProvisionError as exc:
        print(f"cxrfl provision: {exc}", file=sys.stderr)
        return 2
    project = load_project(args.project)
    print(f"{len(kits)} startup kits in {kits[0].path.parent}:")
    for kit in kits:
        print(f"- {handover(kit, project)}")
    return 0
