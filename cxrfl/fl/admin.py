"""The admin side of any running deployment (a provisioned production one or the POC): submit a job
with an admin's startup kit, follow it, download its results and evaluate them into a run folder.

Built on NVFlare's FLARE API (`new_secure_session`: submit_job, get_job_meta, download_job_result,
get_system_info) rather than the recipe environments (`ProdEnv`/`PocEnv`): those run recipes, while
our jobs are FedJobs exported by cxrfl/fl/job.py, and `PocEnv.deploy()` stops and cleans a running POC.

The configuration of every submitted job is kept beside the admin's kit (`<kit>/cxrfl_jobs/ID.json`,
with the exported job) so that `wait` evaluates it with the same settings; no data path travels.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from nvflare.fuel.flare_api.flare_api import new_secure_session

from cxrfl.fl.config import FLConfig
from cxrfl.fl.evaluation import evaluate_run
from cxrfl.fl.results import SimulationError, check_contributions, collect_server_results
from cxrfl.fl.resume import prepare_resume
from cxrfl.fl.simulator import export_job
from cxrfl.run_folder import RunFolder
from cxrfl.runs import new_run_dir, run_dir_ready
from lightning_modules.data.atomic import atomic_write_text, write_json

ADMIN_CONFIG = Path("startup") / "fed_admin.json"
JOBS_FOLDER = "cxrfl_jobs"  # beside an admin kit's startup/: the jobs this admin submitted with cxrfl


# NVFlare ends a job whose workflow finished as FINISHED:ABNORMAL when a site's job process did not
# answer the end of the run (e.g. its machine died mid-job): its results are judged like any other
# (every round written, --min-clients met), not by this status.
ABNORMAL = "FINISHED_ABNORMAL"

# The summary of a run waited for without the coordinator's data root
UNTESTED = {"test": {}, "undefined_reason": "no test set here (give --data: the coordinator's data root)"}


class AdminError(RuntimeError):
    """The deployment could not be reached or a job could not be submitted or followed; one line."""


@dataclass(frozen=True)
class AdminKit:
    """An admin's startup kit, and where the configurations of the jobs submitted with it are kept."""
    path: Path
    user: str
    server: str  # host:port the kit connects to
    jobs_dir: Path

    @classmethod
    def open(cls, path: Path, jobs_dir: Path | None = None) -> "AdminKit":
        path = Path(path).absolute()
        config_file = path / ADMIN_CONFIG
        if not config_file.is_file():
            raise AdminError(f"{path}: not an admin startup kit ({ADMIN_CONFIG} missing); give the folder "
                             "`cxrfl provision` made for an admin (e.g. .../prod_00/admin@cxr-fl.org)")
        try:
            admin = json.loads(config_file.read_text())["admin"]
            user, server = admin["username"], f"{admin['host']}:{admin['port']}"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AdminError(f"{config_file}: not a readable admin configuration ({exc!r})") from None
        return cls(path, user, server, Path(jobs_dir) if jobs_dir else path / JOBS_FOLDER)


def session(kit: AdminKit, timeout: float = 30):
    return new_secure_session(kit.user, str(kit.path), timeout=timeout)


def with_admin(kit: AdminKit, action: Callable, deadline: float):
    """Run action(session), retrying while the server does not answer: a server busy relaying large
    updates (HE) can miss an admin request's deadline without anything being wrong."""
    last = None
    while True:
        try:
            sess = session(kit)
            try:
                return action(sess)
            finally:
                sess.close()
        except AdminError:
            raise
        except Exception as exc:  # NoConnection, timeouts, a server still starting
            last = exc
        if time.time() > deadline:
            raise AdminError(f"the server {kit.server} did not answer {kit.user}'s admin session: {last}")
        time.sleep(2)


def connected_sites(kit: AdminKit, timeout: float = 60) -> list[str]:
    info = with_admin(kit, lambda sess: sess.get_system_info(), deadline=time.time() + timeout)
    return sorted(c.name for c in info.client_info)


def wait_for_sites(kit: AdminKit, sites: list[str], timeout: float) -> None:
    deadline = time.time() + timeout
    connected: list[str] = []
    while time.time() < deadline:
        try:
            connected = connected_sites(kit, timeout=5)
        except AdminError:
            pass
        if set(sites) <= set(connected):
            return
        time.sleep(2)
    raise AdminError(f"only {connected} of {sorted(sites)} connected to {kit.server} within {timeout:.0f} s")


def expected_sites(kit: AdminKit, named: list[str] | None, allow_missing: bool) -> list[str]:
    """The sites a job is for: those named (each must be connected, unless allow_missing), or every
    site connected now."""
    connected = connected_sites(kit)
    if not named:
        if not connected:
            raise AdminError(f"no site is connected to {kit.server}; start the hospitals' clients first")
        return connected
    absent = [s for s in named if s not in connected]
    if absent and not allow_missing:
        raise AdminError(f"sites {', '.join(absent)} are not connected to {kit.server} (connected: "
                         f"{', '.join(connected) or 'none'}); start them, or submit with --allow-missing-sites")
    return list(named)


def new_job_folder(kit: AdminKit, name: str) -> Path:
    """Where a job to submit is exported: beside the admin kit's other jobs, in a folder created here
    under a fresh name (mkdtemp: two submitters in the same millisecond got one folder)."""
    kit.jobs_dir.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{name}-{int(time.time() * 1000)}-", dir=kit.jobs_dir))


def submit_folder(kit: AdminKit, job_dir: Path) -> str:
    """Submit an exported job folder; returns the job id."""
    return with_admin(kit, lambda sess: sess.submit_job(str(job_dir)), deadline=time.time() + 60)


def download_result(kit: AdminKit, job_id: str, download: Path) -> None:
    """The ended job's result (server and sites' workspaces), copied into `download`."""
    result = with_admin(kit, lambda sess: Path(sess.download_job_result(job_id)), deadline=time.time() + 600)
    shutil.copytree(result, download, dirs_exist_ok=True)


def submit(kit: AdminKit, cfg: FLConfig, extend=None) -> str:
    """Export the job for cfg (no local paths travel; extend: see `built_job`) and submit it; keep
    its configuration."""
    job_id = submit_folder(kit, export_job(cfg, new_job_folder(kit, cfg.job_name), extend=extend))
    cfg.write_json(kit.jobs_dir / f"{job_id}.json")
    return job_id


def submitted_config(kit: AdminKit, job_id: str) -> FLConfig:
    path = kit.jobs_dir / f"{job_id}.json"
    if not path.is_file():
        raise AdminError(f"job {job_id} was not submitted with cxrfl from this admin kit ({path} missing)")
    return FLConfig.read_json(path)


def follow_job(kit: AdminKit, job_id: str, timeout: float) -> dict:
    """The job's meta once it has ended (FINISHED:* or FAILED*)."""
    deadline = time.time() + timeout
    while True:
        meta = with_admin(kit, lambda sess: sess.get_job_meta(job_id), deadline=deadline)
        status = str(meta.get("status", ""))
        if status.startswith("FINISHED") or status.startswith("FAILED"):
            return meta
        if time.time() > deadline:
            raise AdminError(f"job {job_id} did not finish within {timeout:.0f} s (status {status})")
        time.sleep(2)


def server_job_folder(download: Path) -> Path:
    """The folder of a downloaded job result that holds app_server/ (its layout varies by version)."""
    hits = sorted(p.parent for p in download.rglob("app_server") if p.is_dir())
    if not hits:
        raise SimulationError(f"{download}: the downloaded job result has no app_server folder")
    return hits[0]


def wait(kit: AdminKit, job_id: str, run_dir: Path, data_root: Path | None, timeout: float = 3600,
         he_key: Path | None = None, site_logs: dict[str, list[Path]] | None = None,
         kind: str = "deployment", resume_command: str | None = None) -> dict:
    """Follow a job to its end, download its results and evaluate them like a simulator run.
    data_root: the coordinator's copy of the data (its test split; None: no test evaluation).
    he_key: a site's client context, to decrypt an HE job's models for the test set.
    site_logs: where each site's logs can be read (a POC: all on this machine), to name their errors.
    A job submitted by `submit_resumed` adds its rounds to the run it continues (run_dir must be that).
    resume_command: how the user continues a failed job (named in the error)."""
    cfg = submitted_config(kit, job_id)
    cfg = replace(cfg, data_root=str(Path(data_root).absolute()) if data_root else None)
    run_dir = Path(run_dir).absolute()
    earlier = resumed_run(kit, job_id)
    if earlier is not None and earlier != run_dir:
        raise AdminError(f"job {job_id} continues the run in {earlier}; wait for it with --out {earlier}")
    continues = earlier is not None
    start = time.time()
    meta = follow_job(kit, job_id, timeout)
    wall = time.time() - start
    download = run_dir / "download"
    download_result(kit, job_id, download)
    status = str(meta.get("status", ""))
    if not continues:
        RunFolder.create(run_dir, kind, cfg)
    write_json(run_dir / "job_meta.json", meta)
    resume_hint = (f"results in {download}. To continue it from its last completed round: "
                   f"{resume_command or f'cxrfl submit --admin-kit {kit.path} --resume'} {run_dir}")
    ended = status.replace(":", "_")
    if ended not in ("FINISHED_COMPLETED", ABNORMAL):
        raise job_failed(cfg, f"job {job_id} ended as {status}", download, run_dir, resume_hint)
    try:
        collected = collect_server_results(cfg, server_job_folder(download), run_dir, append_logs=continues)
    except SimulationError as exc:
        if ended != ABNORMAL:
            raise
        raise AdminError(f"job {job_id} ended as {status}: {exc}; {resume_hint}") from None
    contributions = check_contributions(cfg, run_dir, site_logs or {})
    summary = evaluate_run(cfg, run_dir, collected, he_key=he_key) if cfg.data_root else dict(UNTESTED)
    summary.update(contributions, job_id=job_id, status=status, wall_seconds=round(wall, 2), rounds=cfg.rounds, sites=cfg.sites)
    write_json(run_dir / "metrics.json", summary)
    return summary


# What the server job logs when it gives up (e.g. "Client X is deemed disconnected!", "Alive clients 2
# < required min 3", "Aborting current RUN due to ..."): its ERROR lines name the reason.
SERVER_ERROR = re.compile(r" - (?:ERROR|CRITICAL) - (?:\[[^\]]*\] )?(?:- )?(.+)$")


def job_failed(cfg: FLConfig, what: str, download: Path, run_dir: Path, hint: str) -> AdminError:
    """A job that did not complete: the rounds it ran and the server's own reasons, in metrics.json
    (status failed, resumable) and in the returned error."""
    rounds_run, reasons = 0, []
    try:
        server = server_job_folder(download)
    except SimulationError:
        server = None
    if server is not None:
        rounds_run = len(list((server / "app_server" / "rounds").glob("global_round_*.pt")))
        log = server / "log.txt"
        lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
        reasons = list(dict.fromkeys(m.group(1).strip() for m in map(SERVER_ERROR.search, lines) if m))[:4]
    because = "; ".join(reasons) if reasons else "the server's log names no error"
    message = f"{what} after {rounds_run} of {cfg.rounds} rounds: {because}; {hint}"
    # resumable: `submit --resume` may continue it from its last completed round
    write_json(run_dir / "metrics.json", {"status": "failed", "error": message, "rounds_run": rounds_run,
                                          "resumable": True, "task": cfg.task, "sites": list(cfg.sites)})
    return AdminError(message)


def wait_folder(kit: AdminKit, job_id: str, out: Path | None, kind: str) -> Path:
    """Where `wait` puts a job's results: the run a resumed job continues (`out` must be it or
    None), else a new run folder (`out`, or one under runs/)."""
    continues = resumed_run(kit, job_id)
    if continues is None:
        return new_run_dir(out, kind)
    if out is not None and Path(out).absolute() != continues:
        raise AdminError(f"job {job_id} continues the run in {continues}; wait for it with --out {continues}")
    return run_dir_ready(continues)


def resumed_run(kit: AdminKit, job_id: str) -> Path | None:
    """The run folder a job submitted by `resume` continues, else None."""
    marker = kit.jobs_dir / f"{job_id}.resumes"
    return Path(marker.read_text().strip()) if marker.is_file() else None


def resume_config(run_dir: Path, available_sites: list[str], where: str = "this deployment") -> FLConfig:
    """The configuration of the rest of a job that ended early (its server job killed or crashed): its
    own, starting from the global model of its last completed round. run_dir: where `wait` put the
    failed job's results; they move to download-JOB beside the ones to come."""
    run_dir = Path(run_dir).absolute()
    download = run_dir / "download"
    interrupted = server_job_folder(download) if download.is_dir() else None
    cfg = prepare_resume(run_dir, interrupted)
    missing = sorted(set(cfg.sites) - set(available_sites))
    if missing:
        raise AdminError(f"{run_dir}: the run's sites {missing} are not in {where} ({available_sites})")
    if download.is_dir():
        meta_file = run_dir / "job_meta.json"
        failed = json.loads(meta_file.read_text()).get("job_id", "earlier") if meta_file.is_file() else "earlier"
        download.rename(run_dir / f"download-{failed}")
        if (run_dir / "metrics.json").is_file():  # the failed attempt's verdict, kept beside its results
            (run_dir / "metrics.json").rename(run_dir / f"metrics-{failed}.json")
    return replace(cfg, data_root=None)  # sites read their data from their local config


def submit_resumed(kit: AdminKit, cfg: FLConfig, run_dir: Path) -> str:
    """Submit a `resume_config`; `wait NEW_JOB` adds its rounds to run_dir."""
    job_id = submit(kit, cfg)
    atomic_write_text(kit.jobs_dir / f"{job_id}.resumes", str(Path(run_dir).absolute()))
    return job_id
