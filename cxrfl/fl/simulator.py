"""Run a federated job in the NVFlare simulator and turn its workspace into a run folder (results.py
collects it, evaluation.py evaluates it, resume.py continues a killed run).

Run folder::

    RUN/config.json                 the FLConfig
    RUN/job/<job name>/             the exported job (what `nvflare job submit -j` takes)
    RUN/workspace/                  the simulator workspace (server and site logs)
    RUN/simulator.log
    RUN/models/global_final.pt      last global model   } NVFlare persistor format:
    RUN/models/global_best.pt       best by val metric  } {"model": state_dict, ...}
    RUN/models/rounds/global_round_NNN.pt, round_log.jsonl, early_stop.json (when --patience stopped the job)
    RUN/models/local_<site>.pt      each site's last local model (from cross-site evaluation)
    RUN/metrics/round_metrics.jsonl per round, per site validation metrics of the global model
    RUN/tb/<site>/                  streamed training/validation curves (TensorBoard)
    RUN/cross_site.json|csv         model x (each site's val split + held-out test) matrix
    RUN/metrics.json                summary: test metrics of the best and final global model, wall time,
                                    who contributed in which round, an early stop (cxrfl/fl/outcome.py)

The simulator exits 0 even when a client crashes, so success is judged from the files.
A run killed mid-way continues with `resume_simulation` (`cxrfl sim --resume RUN`): from the
last round whose global model was written (atomically), with the same configuration.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from cxrfl.fl.config import FLConfig
from cxrfl.fl.evaluation import evaluate_run
from cxrfl.fl.privacy_plan import site_privacy_plans
from cxrfl.fl.outcome import run_notes
from cxrfl.fl.results import SimulationError, check_contributions, collect_server_results
from cxrfl.fl.job import built_job, write_simulator_site_config
from cxrfl.run_folder import RunFolder
from cxrfl.keyfiles import restrict_private_files
from cxrfl.fl.he_keys import CLIENT_CONTEXT, write_he_contexts
from lightning_modules.accelerate import check_gpu_ids
from lightning_modules.config import ConfigError
from lightning_modules.data.atomic import write_json


def export_job(cfg: FLConfig, out_dir: Path, simulated: bool = False, extend=None) -> Path:
    """Write the job folder for `nvflare job submit -j` / `submit_job` (simulated, extend: see
    `built_job`); returns its path."""
    out_dir = Path(out_dir).absolute()
    with built_job(cfg, simulated=simulated, extend=extend) as job:
        job.export_job(str(out_dir))
    return out_dir / cfg.job_name


def run_simulation(cfg: FLConfig, run_dir: Path, threads: int | None = None, take_turns: bool = False,
                   resuming: bool = False, extend_job=None, gpus: tuple[int, ...] = ()) -> dict:
    """Run the job with `threads` sites in parallel (default: all), sharing this machine's cores.

    take_turns: every site's process stays up, but sites work one at a time, each with all cores
    (a lock file): per-site times are uncontended, as with one machine per hospital, and no site
    process is restarted per round (the simulator restarts them when threads < sites).
    gpus: CUDA device ids the sites run on, assigned round-robin by NVFlare (`-gpu`); recorded in the
    run's facts. With more than one, NVFlare runs one site per GPU at a time.
    extend_job: adds more components to the simulator's job (a test's fault drill; see `built_job`)."""
    run_dir = Path(run_dir).absolute()
    threads = threads or len(cfg.sites)
    if take_turns and threads != len(cfg.sites):
        raise ValueError("taking turns keeps one process per site: leave --threads at the number of sites")
    check_simulator_gpus(cfg, gpus, take_turns)
    # sites sharing the cores split them; a site whose turn it is has them all
    turn_lock = run_dir / "site_turns.lock" if take_turns else None
    running = len(gpus) if len(gpus) > 1 else threads  # NVFlare runs one site per GPU when given several
    torch_threads = (os.cpu_count() or 1) if take_turns else max(1, (os.cpu_count() or 1) // running)
    plans = site_privacy_plans(cfg)  # a DP-SGD plan above its target is refused before anything is written
    if not resuming:  # a resumed run keeps the original facts
        facts = {**({"privacy_plan": plans} if plans else {}), **({"gpus": list(gpus)} if gpus else {})}
        RunFolder.create(run_dir, "sim", cfg, facts=facts or None)
    job_dir = export_job(cfg, run_dir / "job", simulated=True, extend=extend_job)
    workspace = run_dir / "workspace"
    if workspace.exists():
        shutil.rmtree(workspace)
    he_key = None
    write_simulator_site_config(workspace, cfg, turn_lock, torch_threads)  # site-local settings: not in the job
    if cfg.he:  # no kits here: the project's HE contexts, made for this run (the simulator copies startup/)
        write_he_contexts(workspace / "startup")
        he_key = workspace / "startup" / CLIENT_CONTEXT
    # glibc malloc: 2 arenas per process, not up to 8 per core (NVFlare's advice for clients): less RSS per site
    env = {"MALLOC_ARENA_MAX": "2", **os.environ, "PYTHONWARNINGS": "ignore"}
    if cfg.wandb:
        env.setdefault("WANDB_MODE", "offline" if not env.get("WANDB_API_KEY") else "online")
        env["WANDB_DIR"] = str(run_dir)
    nvflare = Path(sys.executable).parent / "nvflare"
    command = [str(nvflare) if nvflare.exists() else "nvflare", "simulator", str(job_dir), "-w", str(workspace),
               "-n", str(len(cfg.sites)), "-t", str(threads), "-c", ",".join(cfg.sites)]
    if gpus:  # each site's process gets CUDA_VISIBLE_DEVICES=<its GPU>
        command += ["-gpu", ",".join(map(str, gpus))]
    start = time.time()
    returncode = _run_logged(command, run_dir / "simulator.log", env, cwd=run_dir)
    if cfg.he:  # the simulator copied the secret context into every site's startup/
        restrict_private_files(workspace)
    wall = time.time() - start
    collected = collect_server_results(cfg, workspace / "server" / "simulate_job", run_dir, append_logs=resuming)
    if returncode != 0:
        raise SimulationError(f"nvflare simulator exited with {returncode}; see {run_dir / 'simulator.log'}")
    contributions = check_contributions(cfg, run_dir, {site: [workspace / site / "log.txt"] for site in cfg.sites})
    summary = evaluate_run(cfg, run_dir, collected, he_key=he_key)
    summary.update(contributions, wall_seconds=round(wall, 2), rounds=cfg.rounds, sites=cfg.sites)
    write_json(run_dir / "metrics.json", summary)
    for note in run_notes(summary):  # missing sites and rounds, an early stop: never only in a file
        print(note, flush=True)
    return summary


def check_simulator_gpus(cfg: FLConfig, gpus: tuple[int, ...], take_turns: bool = False) -> None:
    """ConfigError (one line, naming --gpus) for GPU ids this run or this machine cannot use."""
    if not gpus:
        return
    if cfg.accelerator == "cpu":
        raise ConfigError("--gpus cannot be combined with --accelerator cpu")
    if len(gpus) > len(cfg.sites):
        raise ConfigError(f"--gpus: {len(gpus)} GPUs for {len(cfg.sites)} sites; NVFlare needs at least one site "
                          "per GPU")
    if take_turns and len(gpus) > 1:
        raise ConfigError("--take-turns runs one site at a time, so sites on other GPUs would wait: give --gpus "
                          "one id, or leave --take-turns off")
    check_gpu_ids(gpus)


# Simulator lines worth showing on the terminal while the job runs.
PROGRESS = re.compile(r"Round \d+ (started|finished)|Finished ScatterAndGather|Start cross site|ERROR - .*(Error|rror:)")


def _run_logged(command: list[str], log_path: Path, env: dict, cwd: Path) -> int:
    """Run the simulator, keeping its whole output in the log and echoing progress lines."""
    with open(log_path, "w") as log, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      env=env, cwd=cwd, text=True, errors="replace") as proc:
        for line in proc.stdout:
            log.write(line)
            if PROGRESS.search(line):
                print("  " + line.strip()[:200], flush=True)
        return proc.wait()
