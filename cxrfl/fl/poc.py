"""Provisioned POC deployment on one machine: a server and N hospital sites from
provision/project.yml, each with its own startup kit (mutual TLS), jobs submitted through the
admin API as the project admin.

The POC workspace holds `cxrfl_poc.json` (what `submit`, `wait` and `down` need, and the list of
what `poc up` created there: all that `down --clean` may remove) and `jobs/` (exported jobs and
their configs). Each site reads its data folder from its own `local/cxrfl_site.json`; no data path
travels in a job. Key files are 0600 in 0700 folders (NVFlare's provisioner leaves them to the umask).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from cxrfl.fl import admin
from cxrfl.fl.admin import AdminError, AdminKit
from cxrfl.fl.config import FLConfig
from cxrfl.fl.job import SITE_CONFIG
from cxrfl.fl.he_keys import CLIENT_CONTEXT
from cxrfl.fl.provision import PROJECT_FILE, configure_server
from cxrfl.keyfiles import restrict_private_files
from cxrfl.fl.poc_processes import read_process, stop_processes, wait_until_ended, workspace_process_list
from lightning_modules.data.imageio import one_line
from lightning_modules.data.atomic import write_json
from lightning_modules.data.manifest import site_dirs

STATE_FILE = "cxrfl_poc.json"
CREATED_BY = "cxrfl poc up"  # in the state file: this project made the workspace
NVFLARE_STOP_TIMEOUT = 120  # NVFlare gives its server 30 s, then reports a communication error
SETTLE_AFTER_STOP = 30  # seconds job processes get to end by themselves after NVFlare's stop


class PocError(AdminError):
    """The POC could not be brought up, used or brought down; the message says why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poc_project(n_sites: int, port: int, he: bool, base: Path = PROJECT_FILE) -> dict:
    """The production project file adapted to one machine: server on localhost:port, N sites."""
    project = yaml.safe_load(Path(base).read_text())
    server = next(p for p in project["participants"] if p["type"] == "server")
    server.update(name="localhost", fed_learn_port=port, admin_port=port)
    clients = [p for p in project["participants"] if p["type"] == "client"]
    for i in range(len(clients), n_sites):  # more sites than the project names: numbered hospitals
        clients.append({"name": f"hospital-{i + 1}", "type": "client", "org": f"hospital_{i + 1}"})
    clients = clients[:n_sites]
    orgs = {c["org"] for c in clients} | {server["org"]}
    admins = [p for p in project["participants"] if p["type"] == "admin" and p["org"] in orgs]
    project["participants"] = [server] + clients + admins
    if not he:  # the project's HEBuilder (with its CKKS parameters) only when HE is asked for
        project["builders"] = [b for b in project["builders"] if not b["path"].endswith("HEBuilder")]
    return project


def _env(workspace: Path) -> dict:
    return dict(os.environ, NVFLARE_POC_WORKSPACE=str(workspace), PYTHONWARNINGS="ignore")


def _nvflare(args: list[str], workspace: Path, timeout: float) -> str:
    exe = Path(sys.executable).parent / "nvflare"
    command = [str(exe) if exe.exists() else "nvflare"] + args
    try:
        out = subprocess.run(command, env=_env(workspace), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise PocError(f"`nvflare {' '.join(args)}` did not finish in {timeout:.0f} s") from None
    if out.returncode != 0:
        raise PocError(f"`nvflare {' '.join(args)}` failed ({out.returncode}): {(out.stderr or out.stdout)[-2000:]}")
    return out.stdout


def load_state(workspace: Path) -> dict:
    path = Path(workspace) / STATE_FILE
    if not path.is_file():
        raise PocError(f"{workspace}: no POC here ({STATE_FILE} missing); start one with `cxrfl poc up`")
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PocError(f"{path}: not a readable POC state file ({' '.join(str(exc).split())})") from None
    if not isinstance(state, dict):
        raise PocError(f"{path}: not a POC state file (expected a JSON object)")
    return state


def created_entries(workspace: Path) -> tuple[dict, list[str]]:
    """The state of a POC workspace that `cxrfl poc up` provably created, and the names of the
    entries it created in it; PocError (one line) for any other folder."""
    workspace = Path(workspace).absolute()
    state = load_state(workspace)
    path = workspace / STATE_FILE
    if state.get("created_by") != CREATED_BY:
        raise PocError(f"{path}: not written by `{CREATED_BY}` (no marker); remove this workspace by hand")
    recorded = Path(str(state.get("workspace", "")))
    if not recorded.is_absolute() or recorded.resolve() != workspace.resolve():
        raise PocError(f"{path}: written for the workspace {recorded}, not this folder")
    names = state.get("created")
    if not isinstance(names, list) or not all(isinstance(n, str) and n not in ("", ".", "..") and "/" not in n
                                               and "\\" not in n for n in names) or STATE_FILE not in names:
        raise PocError(f"{path}: its list of created entries is missing or invalid")
    return state, names


def _storage_entries(server_kit: Path, workspace: Path) -> set[str]:
    """Top-level entries of the workspace the server keeps jobs and snapshots in (its resources.json)."""
    resources = json.loads((server_kit / "local" / "resources.json").read_text())
    snapshots = resources.get("snapshot_persistor", {}).get("args", {}).get("storage", {}).get("args", {})
    places = [snapshots.get("root_dir")]
    places += [c.get("args", {}).get("uri_root") for c in resources.get("components", [])
               if c.get("id") == "job_manager"]
    names = set()
    for place in places:
        if place and workspace in Path(place).parents:
            names.add(Path(place).relative_to(workspace).parts[0])
    return names


def _make_room_for_poc(workspace: Path) -> None:
    """`nvflare poc prepare --force` wipes its workspace: only a new or empty folder, or one that
    holds nothing but an earlier POC of this project (stopped and removed here), is given to it."""
    if not workspace.exists():
        return
    if not workspace.is_dir():
        raise PocError(f"--workspace {workspace}: not a folder")
    entries = set(os.listdir(workspace))
    if STATE_FILE in entries:
        _state, created = created_entries(workspace)
        foreign = sorted(entries - set(created))
        if not foreign:
            poc_down(workspace, clean=True)
            workspace.mkdir(exist_ok=True)
            return
    else:
        foreign = sorted(entries)
    if foreign:
        raise PocError(f"--workspace {workspace} holds files that `{CREATED_BY}` did not create "
                       f"({_names(foreign)}); give a new or empty folder")


def _names(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def poc_up(workspace: Path, n_sites: int, data_root: Path, he: bool = False, port: int | None = None,
           connect_timeout: float = 180, heartbeat_timeout: float = 60) -> dict:
    """Provision (`poc_prepare`) and start the POC; return its state once every site is connected."""
    state = poc_prepare(workspace, n_sites, data_root, he=he, port=port, heartbeat_timeout=heartbeat_timeout)
    _nvflare(["poc", "start"], Path(state["workspace"]), timeout=300)
    wait_for_sites(state, connect_timeout)
    return state


def poc_prepare(workspace: Path, n_sites: int, data_root: Path, he: bool = False, port: int | None = None,
                heartbeat_timeout: float = 60) -> dict:
    """Provision the POC's kits into `workspace` (new, empty, or an earlier POC of this project)
    with private keys readable by their owner only, and write its state file; start nothing.
    heartbeat_timeout: seconds without a heartbeat after which the server writes a site off
    (sites send one every 10 s)."""
    workspace = Path(workspace).absolute()
    data_sites = site_dirs(data_root)
    if n_sites > len(data_sites):
        raise PocError(f"--sites {n_sites}: {data_root} has only {len(data_sites)} site folders")
    _make_room_for_poc(workspace)
    existed = workspace.exists()
    port = port or free_port()
    project = poc_project(n_sites, port, he)
    # the project file must not sit inside the POC workspace (nvflare poc prepare refuses it);
    # prepare keeps its own copy (project.yml in the workspace), so a temporary folder will do
    with tempfile.TemporaryDirectory(prefix="cxrfl-poc-") as tmp:
        project_file = Path(tmp) / "project.yml"
        project_file.write_text(yaml.safe_dump(project, sort_keys=False))
        try:
            _nvflare(["poc", "prepare", "-i", str(project_file), "--force"], workspace, timeout=300)
        except PocError:  # the folder was new or empty: whatever is in it now, prepare made
            _remove_entries(workspace, os.listdir(workspace) if workspace.is_dir() else [])
            if not existed and workspace.is_dir():
                workspace.rmdir()
            raise

    kits = workspace / project["name"] / "prod_00"
    admin = next(p["name"] for p in project["participants"] if p.get("role") == "project_admin")
    sites = [p["name"] for p in project["participants"] if p["type"] == "client"]
    created = set(os.listdir(workspace)) | _storage_entries(kits / "localhost", workspace) | {"jobs", STATE_FILE}
    state = {"created_by": CREATED_BY, "created": sorted(created), "workspace": str(workspace),
             "project": project["name"], "kits": str(kits), "admin": admin, "admin_kit": str(kits / admin),
             "sites": sites, "port": port, "he": he, "data_root": str(Path(data_root).absolute())}
    write_json(workspace / STATE_FILE, state)
    restrict_private_files(workspace)  # cert.json (every private key) and HE secret contexts
    # each hospital's own data, in its own local config; the POC's sites share this machine's cores
    threads = max(1, (os.cpu_count() or 1) // len(sites))
    for site, data_dir in zip(sites, data_sites):
        write_json(kits / site / SITE_CONFIG, {"data_dir": str(data_dir.absolute()), "torch_threads": threads})
    configure_server(kits / "localhost", heartbeat_timeout=heartbeat_timeout)
    return state


def poc_restart_site(state: dict, site: str, connect_timeout: float = 180) -> None:
    """Start a site again after its processes died (crash, kill, reboot) and wait until it is
    connected. It takes part from the next job: NVFlare does not re-admit it into a running one."""
    if site not in state["sites"]:
        raise PocError(f"{site}: not a site of this POC ({', '.join(state['sites'])})")
    site_kit = Path(state["kits"]) / site
    if workspace_processes(site_kit):
        raise PocError(f"{site} is still running (processes under {site_kit}); stop it first")
    _nvflare(["poc", "start", "-p", site], Path(state["workspace"]), timeout=300)
    wait_for_sites(state, connect_timeout)


def admin_kit(state: dict) -> AdminKit:
    """The POC's project admin; its jobs' configurations live in the workspace's jobs/."""
    return AdminKit.open(state["admin_kit"], jobs_dir=Path(state["workspace"]) / "jobs")


def session(state: dict):
    return admin.session(admin_kit(state))


def wait_for_sites(state: dict, timeout: float) -> None:
    try:
        admin.wait_for_sites(admin_kit(state), state["sites"], timeout)
    except AdminError as exc:
        raise PocError(f"{exc}; see {state['kits']}/*/poc_console.log") from None


def poc_submit(state: dict, cfg: FLConfig) -> str:
    return admin.submit(admin_kit(state), cfg)


def poc_resume(state: dict, run_dir: Path) -> str:
    """Submit the rest of a job that ended early as a new job (see admin.resume_config)."""
    cfg = admin.resume_config(run_dir, state["sites"], "this POC")
    return admin.submit_resumed(admin_kit(state), cfg, run_dir)


def poc_wait(state: dict, job_id: str, run_dir: Path, timeout: float = 3600) -> dict:
    """admin.wait with what only a POC has: the coordinator's data root (for the held-out test set),
    every site's logs (to name their errors) and, under HE, a site's key on this machine."""
    kits = Path(state["kits"])
    site_logs = {site: [kits / site / job_id / "log.txt", kits / site / "log.txt"] for site in state["sites"]}
    he_key = kits / state["sites"][0] / "startup" / CLIENT_CONTEXT if state.get("he") else None
    return admin.wait(admin_kit(state), job_id, run_dir, state["data_root"], timeout=timeout, he_key=he_key,
                      site_logs=site_logs, kind="poc", resume_command="cxrfl poc submit --resume")


def workspace_processes(workspace: Path) -> list[int]:
    """PIDs of the processes NVFlare started for this workspace (server, sites, job processes and
    their children), recognised by what they run and their workspace path; see cxrfl/fl/poc_processes.py."""
    return [p.pid for p in workspace_process_list(workspace)]


def poc_down(workspace: Path, clean: bool = False) -> list[str]:
    """Stop the POC in `workspace`: NVFlare's own stop, then its processes that still run (SIGTERM,
    SIGKILL after a grace), so that none is left even when NVFlare's stop fails or times out.
    clean: also remove what `poc up` created there, and the folder if nothing else is in it.

    Returns one-line notes (NVFlare's stop failed, files kept); PocError for a folder that is not a
    POC workspace (or, with clean, not one `poc up` made), before anything is stopped or removed."""
    workspace = Path(workspace).absolute()
    if not workspace.exists():
        return [f"{workspace} does not exist: no POC to stop"]
    if clean:
        _state, created = created_entries(workspace)
        here = Path.cwd().resolve()
        if here == workspace.resolve() or workspace.resolve() in here.parents:
            raise PocError(f"{workspace}: not removing the folder this command runs in; cd elsewhere first")
    else:
        load_state(workspace)
    notes = [_stop_poc(workspace)]
    if clean:
        notes.append(_remove_poc(workspace, created))
    return [n for n in notes if n]


def _stop_poc(workspace: Path) -> str | None:
    if not workspace_process_list(workspace):
        return None
    failure = None
    try:
        _nvflare(["poc", "stop"], workspace, timeout=NVFLARE_STOP_TIMEOUT)
    except PocError as exc:  # e.g. "server did not stop within 30.0 seconds; Communication Error"
        failure = one_line(str(exc))
    else:
        wait_until_ended(workspace_process_list(workspace), SETTLE_AFTER_STOP)
    stopped = 0
    for _attempt in range(3):  # a kit script may have started a process while the others stopped
        running = workspace_process_list(workspace)
        if not running:
            break
        left = stop_processes(running)
        stopped += len(running) - len(left)
        if left:
            raise PocError(f"POC processes {[p.pid for p in left]} did not end even after SIGKILL")
    else:
        raise PocError(f"POC processes under {workspace} keep starting again; stop them by hand")
    if failure:
        return f"NVFlare's stop failed ({failure}); stopped the POC's {stopped} processes directly"
    if stopped:
        return f"stopped {stopped} POC processes still running {SETTLE_AFTER_STOP} s after NVFlare's stop"
    return None


def _remove_poc(workspace: Path, created: list[str]) -> str | None:
    """Remove the entries `poc up` created (the state file last); the folder only if that empties it."""
    try:
        _remove_entries(workspace, [n for n in created if n != STATE_FILE] + [STATE_FILE])
        kept = sorted(os.listdir(workspace))
        if not kept:
            workspace.rmdir()
            return None
    except OSError as exc:
        raise PocError(f"{workspace}: could not remove the POC ({exc})") from None
    return f"kept {workspace}: it holds files `{CREATED_BY}` did not create ({_names(kept)})"


def _remove_entries(folder: Path, names: list[str]) -> None:
    for name in names:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _kill(pids: list[int], grace: float = 10) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds, to these processes (while they are the same)."""
    stop_processes([p for p in map(read_process, pids) if p is not None], grace=grace)
