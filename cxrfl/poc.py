"""Provisioned POC deployment on one machine: a server and N hospital sites from
provision/project.yml, each with its own startup kit (mutual TLS), jobs submitted through the
admin API as the project admin.

The POC workspace holds `cxrfl_poc.json` (what `submit`, `wait` and `down` need) and `jobs/`
(exported jobs and their configs). Each site reads its data folder from its own
`local/cxrfl_site.json`; no data path travels in a job.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from cxrfl.fl_job import FLConfig
from cxrfl.he_keys import CLIENT_CONTEXT, PROJECT_FILE
from cxrfl.simulate import SimulationError, collect_server_results, evaluate_run, export_job, prepare_resume
from lightning_modules.data.manifest import atomic_write_text, site_dirs, write_json

STATE_FILE = "cxrfl_poc.json"


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
    return json.loads(path.read_text())


def poc_up(workspace: Path, n_sites: int, data_root: Path, he: bool = False, port: int | None = None,
           connect_timeout: float = 180, heartbeat_timeout: float = 60) -> dict:
    """heartbeat_timeout: seconds without a heartbeat after which the server writes a site off
    (sites send one every 10 s)."""
    workspace = Path(workspace).absolute()
    data_sites = site_dirs(data_root)
    if n_sites > len(data_sites):
        raise PocError(f"--sites {n_sites}: {data_root} has only {len(data_sites)} site folders")
    port = port or free_port()
    project = poc_project(n_sites, port, he)
    # the project file must not sit inside the POC workspace (nvflare poc prepare refuses it)
    project_file = workspace.parent / f"{workspace.name}-project.yml"
    project_file.parent.mkdir(parents=True, exist_ok=True)
    project_file.write_text(yaml.safe_dump(project, sort_keys=False))
    _nvflare(["poc", "prepare", "-i", str(project_file), "--force"], workspace, timeout=300)

    kits = workspace / project["name"] / "prod_00"
    sites = [p["name"] for p in project["participants"] if p["type"] == "client"]
    for site, data_dir in zip(sites, data_sites):  # each hospital's own data, in its own local config
        write_json(kits / site / "local" / "cxrfl_site.json", {"data_dir": str(data_dir.absolute())})
    set_heartbeat_timeout(kits / "localhost", heartbeat_timeout)
    admin = next(p["name"] for p in project["participants"] if p.get("role") == "project_admin")
    state = {"workspace": str(workspace), "project": project["name"], "project_file": str(project_file),
             "kits": str(kits), "admin": admin, "admin_kit": str(kits / admin), "sites": sites, "port": port,
             "he": he, "data_root": str(Path(data_root).absolute())}
    write_json(workspace / STATE_FILE, state)
    _nvflare(["poc", "start"], workspace, timeout=300)
    wait_for_sites(state, connect_timeout)
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
    from nvflare.fuel.flare_api.flare_api import new_secure_session

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
    write_json(jobs / f"{job_id}.json", cfg.as_dict())
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
    cfg.data_root = None  # sites read their data from their local config
    job_id = poc_submit(state, cfg)
    atomic_write_text(Path(state["workspace"]) / "jobs" / f"{job_id}.resumes", str(run_dir))
    return job_id


def poc_wait(state: dict, job_id: str, run_dir: Path, timeout: float = 3600) -> dict:
    """Follow a job to its end, download its results and evaluate them like a simulator run.
    A job that continues an earlier one (`poc_resume`) adds its rounds to that run folder."""
    workspace = Path(state["workspace"])
    cfg_path = workspace / "jobs" / f"{job_id}.json"
    if not cfg_path.is_file():
        raise PocError(f"job {job_id} was not submitted with `cxrfl poc submit` here ({cfg_path} missing)")
    cfg = FLConfig(**json.loads(cfg_path.read_text()))
    cfg.data_root = state["data_root"]  # the coordinator's copy, for the held-out test set
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
        write_json(run_dir / "config.json", cfg.as_dict())
    write_json(run_dir / "job_meta.json", meta)
    if "FINISHED_COMPLETED" not in status.replace(":", "_"):
        raise PocError(f"job {job_id} ended as {status}; results in {download}. To continue it from its last "
                       f"completed round: cxrfl poc submit --resume {run_dir}")
    server = _server_job_folder(download)
    collected = collect_server_results(cfg, server, run_dir, append_logs=continues is not None)
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
    """PIDs of processes whose command line mentions the POC workspace (server, sites, job processes)."""
    needle = str(Path(workspace).absolute()).encode()
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (proc / "cmdline").read_bytes() and int(proc.name) != os.getpid():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def poc_down(workspace: Path, clean: bool = False) -> None:
    """Stop the POC with `nvflare poc stop`; then kill whatever of it is still running."""
    workspace = Path(workspace).absolute()
    if not workspace.exists():
        return
    try:
        if (workspace / STATE_FILE).is_file():
            _nvflare(["poc", "stop"], workspace, timeout=180)
    finally:
        _kill(workspace_processes(workspace))
        if clean:
            shutil.rmtree(workspace, ignore_errors=True)
            state_project = workspace.parent / f"{workspace.name}-project.yml"
            state_project.unlink(missing_ok=True)


def _kill(pids: list[int], grace: float = 10) -> None:
    import signal

    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.5)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
