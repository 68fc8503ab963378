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
import time
from dataclasses import replace
from pathlib import Path

import yaml
from nvflare.fuel.flare_api.flare_api import new_secure_session

from cxrfl.fl.config import FLConfig
from cxrfl.fl.job import SITE_CONFIG
from cxrfl.run_folder import RunFolder
from cxrfl.fl.he_keys import CLIENT_CONTEXT
from cxrfl.fl.provision import PROJECT_FILE
from cxrfl.keyfiles import restrict_private_files
from cxrfl.fl.poc_processes import read_process, stop_processes, wait_until_ended, workspace_process_list
from cxrfl.fl.evaluation import evaluate_run
from cxrfl.fl.results import SimulationError, check_contributions, collect_server_results
from cxrfl.fl.resume import prepare_resume
from cxrfl.fl.simulator import export_job
from lightning_modules.data.imageio import one_line
from lightning_modules.data.atomic import atomic_write_text, write_json
from lightning_modules.data.manifest import site_dirs

STATE_FILE = "cxrfl_poc.json"
CREATED_BY = "cxrfl poc up"  # in the state file: this project made the workspace
NVFLARE_STOP_TIMEOUT = 120  # NVFlare gives its server 30 s, then reports a communication error
SETTLE_AFTER_STOP = 30  # seconds job processes get to end by themselves after NVFlare's stop


class PocError(RuntimeError):
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
    for site, data_dir in zip(sites, data_sites):  # each hospital's own data, in its own local config
        write_json(kits / site / SITE_CONFIG, {"data_dir": str(data_dir.absolute())})
    set_heartbeat_timeout(kits / "localhost", heartbeat_timeout)
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


def set_heartbeat_timeout(server_kit: Path, seconds: float) -> None:
    """NVFlare's default (600 s) keeps a killed site's tasks, cross-site evaluation and the job's
    end waiting for 10 minutes before the server writes the site off."""
    local = Path(server_kit) / "local"
    source = local / "resources.json" if (local / "resources.json").is_file() else local / "resources.json.default"
    resources = json.loads(source.read_text())
    for server in resources["servers"]:
        server["heart_beat_timeout"] = seconds
    write_json(local / "resources.json", resources)


def session(state: dict):
    return new_secure_session(state["admin"], state["admin_kit"], timeout=30)


def wait_for_sites(state: dict, timeout: float) -> None:
    deadline = time.time() + timeout
    connected: list[str] = []
    while time.time() < deadline:
        try:
            sess = session(state)
            try:
                connected = [c.name for c in sess.get_system_info().client_info]
            finally:
                sess.close()
            if set(state["sites"]) <= set(connected):
                return
        except Exception:  # the server may not accept admin sessions yet
            pass
        time.sleep(2)
    raise PocError(f"only {sorted(connected)} of {state['sites']} connected within {timeout:.0f} s; "
                   f"see {state['kits']}/*/poc_console.log")


def poc_submit(state: dict, cfg: FLConfig) -> str:
    workspace = Path(state["workspace"])
    jobs = workspace / "jobs"
    job_dir = export_job(cfg, jobs / f"{cfg.job_name}-{int(time.time())}")
    sess = session(state)
    try:
        job_id = sess.submit_job(str(job_dir))
    finally:
        sess.close()
    cfg.write_json(jobs / f"{job_id}.json")
    return job_id


def resumed_run(state: dict, job_id: str) -> Path | None:
    """The run folder a job submitted by `poc_resume` continues, else None."""
    marker = Path(state["workspace"]) / "jobs" / f"{job_id}.resumes"
    return Path(marker.read_text().strip()) if marker.is_file() else None


def poc_resume(state: dict, run_dir: Path) -> str:
    """Submit the rest of a job that ended early (its server job killed or crashed) as a new job that
    starts from the global model of its last completed round, with the run's own configuration.
    run_dir: where `poc wait` put the failed job's results. Returns the new job's id; its results
    join the same run folder (`poc wait NEW_JOB`)."""
    run_dir = Path(run_dir).absolute()
    download = run_dir / "download"
    interrupted = _server_job_folder(download) if download.is_dir() else None
    cfg = prepare_resume(run_dir, interrupted)
    missing = sorted(set(cfg.sites) - set(state["sites"]))
    if missing:
        raise PocError(f"{run_dir}: the run's sites {missing} are not in this POC ({state['sites']})")
    if download.is_dir():  # the failed attempt's results stay, beside the ones to come
        meta_file = run_dir / "job_meta.json"
        failed = json.loads(meta_file.read_text()).get("job_id", "earlier") if meta_file.is_file() else "earlier"
        download.rename(run_dir / f"download-{failed}")
    job_id = poc_submit(state, replace(cfg, data_root=None))  # sites read their data from their local config
    atomic_write_text(Path(state["workspace"]) / "jobs" / f"{job_id}.resumes", str(run_dir))
    return job_id


def poc_wait(state: dict, job_id: str, run_dir: Path, timeout: float = 3600) -> dict:
    """Follow a job to its end, download its results and evaluate them like a simulator run.
    A job that continues an earlier one (`poc_resume`) adds its rounds to that run folder."""
    workspace = Path(state["workspace"])
    cfg_path = workspace / "jobs" / f"{job_id}.json"
    if not cfg_path.is_file():
        raise PocError(f"job {job_id} was not submitted with `cxrfl poc submit` here ({cfg_path} missing)")
    # the coordinator's copy of the data root, for the held-out test set
    cfg = replace(FLConfig.read_json(cfg_path), data_root=state["data_root"])
    run_dir = Path(run_dir).absolute()
    continues = resumed_run(state, job_id)
    if continues is not None and continues != run_dir:
        raise PocError(f"job {job_id} continues the run in {continues}; wait for it with --out {continues}")
    start = time.time()
    meta = _follow_job(state, job_id, timeout)
    wall = time.time() - start
    download = run_dir / "download"
    download.mkdir(parents=True, exist_ok=True)
    result = _with_admin(state, lambda sess: Path(sess.download_job_result(job_id)), deadline=time.time() + 600)
    status = str(meta.get("status", ""))
    shutil.copytree(result, download, dirs_exist_ok=True)
    if continues is None:  # a resumed job keeps the run's own configuration
        RunFolder.create(run_dir, "poc", cfg)
    write_json(run_dir / "job_meta.json", meta)
    if "FINISHED_COMPLETED" not in status.replace(":", "_"):
        raise PocError(f"job {job_id} ended as {status}; results in {download}. To continue it from its last "
                       f"completed round: cxrfl poc submit --resume {run_dir}")
    server = _server_job_folder(download)
    collected = collect_server_results(cfg, server, run_dir, append_logs=continues is not None)
    kits = Path(state["kits"])  # every site's kit is on this machine: their logs name their errors
    check_contributions(cfg, run_dir, {site: [kits / site / job_id / "log.txt", kits / site / "log.txt"]
                                       for site in cfg.sites})
    # all kits live on this machine: the first site's key decrypts an HE model for the test set
    he_key = Path(state["kits"]) / state["sites"][0] / "startup" / CLIENT_CONTEXT if cfg.he else None
    summary = evaluate_run(cfg, run_dir, collected, he_key=he_key)
    summary.update(job_id=job_id, status=status, wall_seconds=round(wall, 2), rounds=cfg.rounds, sites=cfg.sites)
    write_json(run_dir / "metrics.json", summary)
    return summary


def _with_admin(state: dict, action, deadline: float):
    """Run action(session), retrying while the server does not answer: a server busy relaying
    large updates (HE) can miss an admin request's deadline without anything being wrong."""
    last = None
    while True:
        try:
            sess = session(state)
            try:
                return action(sess)
            finally:
                sess.close()
        except PocError:
            raise
        except Exception as exc:  # NoConnection, timeouts
            last = exc
        if time.time() > deadline:
            raise PocError(f"the POC server did not answer the admin API: {last}")
        time.sleep(5)


def _follow_job(state: dict, job_id: str, timeout: float) -> dict:
    """The job's meta once it has ended (FINISHED:* or FAILED*)."""
    deadline = time.time() + timeout
    while True:
        meta = _with_admin(state, lambda sess: sess.get_job_meta(job_id), deadline=deadline)
        status = str(meta.get("status", ""))
        if status.startswith("FINISHED") or status.startswith("FAILED"):
            return meta
        if time.time() > deadline:
            raise PocError(f"job {job_id} did not finish within {timeout:.0f} s (status {status})")
        time.sleep(3)


def _server_job_folder(download: Path) -> Path:
    """The folder of a downloaded job result that holds app_server/ (its layout varies by version)."""
    hits = sorted(p.parent for p in download.rglob("app_server") if p.is_dir())
    if not hits:
        raise SimulationError(f"{download}: the downloaded job result has no app_server folder")
    return hits[0]


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
