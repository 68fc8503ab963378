"""Production provisioning: NVFlare's provisioner (not POC) on provision/project.yml, after a check that
refuses an obviously wrong project file, and the list of kits to hand over with what each operator does.

The check exists because NVFlare provisions whatever it is given: a server name with a port or a
scheme, or two sites with one name, only fail later, on the hospitals' side, as TLS errors.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from lightning_modules.data.atomic import write_json

PROJECT_FILE = Path(__file__).resolve().parents[2] / "provision" / "project.yml"
# RFC 1123 host name: dot-separated labels of letters, digits and inner hyphens, at most 253 characters
HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
# What NVFlare accepts as a site or admin name (and what becomes a folder of the kit)
PARTICIPANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]*")
BUILDER_ORDER = ("HEBuilder", "CertBuilder", "SignatureBuilder")  # HE contexts must be signed with the kit


class ProvisionError(ValueError):
    """The project file cannot give working kits, or provisioning failed; the message says why."""


@dataclass(frozen=True)
class Kit:
    participant: str
    role: str  # "server" | "client" | "admin"
    path: Path


def is_host_name(name: str) -> bool:
    return 0 < len(name) <= 253 and all(HOST_LABEL.fullmatch(label) for label in name.split("."))


def load_project(path: Path) -> dict:
    try:
        project = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ProvisionError(f"{path}: cannot read the project file ({exc})") from None
    if not isinstance(project, dict):
        raise ProvisionError(f"{path}: expected an NVFlare project (a YAML mapping)")
    return project


def project_problems(project: dict) -> list[str]:
    """What makes this project give kits that cannot work together (empty: none found)."""
    problems = []
    if project.get("api_version") != 3:
        problems.append(f"api_version must be 3 (NVFlare 2.9's project format), got {project.get('api_version')!r}")
    participants = project.get("participants") or []
    names = [p.get("name") for p in participants if isinstance(p, dict)]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(f"participant names used twice: {', '.join(map(str, duplicates))}")
    servers = [p for p in participants if isinstance(p, dict) and p.get("type") == "server"]
    if len(servers) != 1:
        problems.append(f"exactly one participant of type server is needed, found {len(servers)}")
    for server in servers:
        problems += _server_problems(server)
    clients = [p for p in participants if isinstance(p, dict) and p.get("type") == "client"]
    if not clients:
        problems.append("no participant of type client (a hospital site)")
    for p in participants:
        if isinstance(p, dict) and p.get("type") != "server" and not PARTICIPANT_NAME.fullmatch(str(p.get("name", ""))):
            problems.append(f"participant name {p.get('name')!r}: use letters, digits, '.', '_', '@' and '-'")
    return problems + _builder_problems(project.get("builders") or [])


def _server_problems(server: dict) -> list[str]:
    name = str(server.get("name", ""))
    problems = []
    if not is_host_name(name):
        problems.append(f"server name {name!r} is not a host name: the sites connect to it and its certificate "
                        "carries it, so give the name the sites resolve (no scheme, port or path)")
    for key in ("fed_learn_port", "admin_port"):
        port = server.get(key)
        if port is not None and not (isinstance(port, int) and 0 < port < 65536):
            problems.append(f"server {key} {port!r} is not a TCP port (1-65535)")
    return problems


def _builder_problems(builders: list) -> list[str]:
    paths = [str(b.get("path", "")) if isinstance(b, dict) else "" for b in builders]
    short = [p.rsplit(".", 1)[-1] for p in paths]
    problems = []
    present = [name for name in BUILDER_ORDER if name in short]
    if [name for name in short if name in BUILDER_ORDER] != present:
        problems.append(f"builders {', '.join(present)} must come in this order (the HE contexts are part of "
                        "the signed kit)")
    if "PrivateKeyModes" in short and short.index("PrivateKeyModes") != 0:
        problems.append("cxrfl.keyfiles.PrivateKeyModes must be the first builder (builders finish in reverse "
                        "order: it restricts the key files after every other builder wrote them)")
    for needed in ("WorkspaceBuilder", "CertBuilder"):
        if needed not in short:
            problems.append(f"the {needed} builder is missing")
    return problems


def provision(project_path: Path, out: Path, server_storage: Path | None = None,
              heartbeat_timeout: float | None = None, same_ca: bool = False) -> list[Kit]:
    """Check the project, run NVFlare's provisioner into `out` (new or empty), return the kits.
    same_ca: `out` holds an earlier provisioning of this project: provision again with its root CA
    (NVFlare keeps it in <project>/state/cert.json), into the next prod_NN folder; kits already
    handed out keep working. server_storage, heartbeat_timeout: see `configure_server`."""
    project = load_project(project_path)
    problems = project_problems(project)
    if problems:
        raise ProvisionError(f"{project_path}: " + "; ".join(problems))
    out = Path(out).absolute()
    state = out / str(project.get("name")) / "state" / "cert.json"
    if same_ca and not state.is_file():
        raise ProvisionError(f"{out}: holds no earlier provisioning of project {project.get('name')!r} ({state} "
                             "missing); --same-ca provisions again into the folder of the first provisioning")
    if not same_ca and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ProvisionError(f"{out}: exists and is not an empty folder; provisioning writes new kits (and a new "
                             "root CA) into a new folder (--same-ca: again into an earlier one, with its root CA)")
    out.mkdir(parents=True, exist_ok=True)
    nvflare = shutil.which("nvflare") or str(Path(sys.executable).parent / "nvflare")
    # --force: NVFlare asks before it writes into a workspace that holds an earlier provisioning
    done = subprocess.run([nvflare, "provision", "-p", str(Path(project_path).absolute()), "-w", str(out),
                           *(["--force"] if same_ca else [])], capture_output=True, text=True, cwd=out, timeout=600)
    kits_root = out / project["name"]
    prods = sorted(kits_root.glob("prod_*")) if kits_root.is_dir() else []
    if done.returncode != 0 or not prods:
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        raise ProvisionError(f"nvflare provision failed (exit {done.returncode}): {' | '.join(tail)}")
    kits = [Kit(p["name"], p["type"], prods[-1] / p["name"]) for p in project["participants"]]
    server_kit = next(k.path for k in kits if k.role == "server")
    configure_server(server_kit, server_storage, heartbeat_timeout)
    return kits


def configure_server(server_kit: Path, storage: Path | None = None, heartbeat_timeout: float | None = None) -> None:
    """The server kit's local/resources.json from NVFlare's default, with
    storage: the folder (on the server host) for its job store and snapshots; NVFlare's default is
      /tmp/nvflare, which a reboot or a tmp cleaner may wipe, and which every server on the host shares;
    heartbeat_timeout: seconds without a heartbeat after which the server writes a site off (sites
      send one every 10 s); NVFlare's default of 600 keeps a dead site's tasks waiting 10 minutes."""
    local = Path(server_kit) / "local"
    source = local / "resources.json" if (local / "resources.json").is_file() else local / "resources.json.default"
    resources = json.loads(source.read_text())
    if heartbeat_timeout is not None:
        for server in resources["servers"]:
            server["heart_beat_timeout"] = heartbeat_timeout
    if storage is not None:
        storage = Path(storage).absolute()
        resources["snapshot_persistor"]["args"]["storage"]["args"]["root_dir"] = str(storage / "snapshot-storage")
        for component in resources["components"]:
            if component.get("id") == "job_manager":
                component["args"]["uri_root"] = str(storage / "jobs-storage")
    write_json(local / "resources.json", resources)


def handover(kit: Kit, project: dict) -> str:
    """What the kit's operator does with it, one paragraph."""
    server = next(p for p in project["participants"] if p["type"] == "server")
    port = server.get("fed_learn_port", 8002)
    if kit.role == "server":
        return (f"{kit.participant} (server): copy {kit.path} to the host named {kit.participant}; open TCP port "
                f"{port} inbound (sites and admins connect to it); start it with startup/start.sh")
    if kit.role == "client":
        return (f"{kit.participant} (hospital site): hand {kit.path} to the hospital's IT over a secure channel; "
                f"the site connects out to {server['name']}:{port} only; it names its data folder in "
                "local/cxrfl_site.json ({\"data_dir\": ...}, never in a job) and starts with startup/start.sh")
    return (f"{kit.participant} (admin, {project_role(kit, project)}): hand {kit.path} to that person; "
            "startup/fl_admin.sh opens the admin console, `nvflare job submit -j JOB` submits with it")


def project_role(kit: Kit, project: dict) -> str:
    return next((p.get("role", "") for p in project["participants"] if p["name"] == kit.participant), "")
