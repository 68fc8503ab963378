"""Continue a killed federated run from the global model of its last completed round."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from lightning_modules.data.atomic import atomic_torch_save
from cxrfl.fl.config import FLConfig
from cxrfl.fl.results import ROUND_FILE, SimulationError, append_lines, last_complete_round
from cxrfl.fl.simulator import run_simulation
from cxrfl.run_folder import RunFolder, RunFolderError


def prepare_resume(run_dir: Path, interrupted: Path | None) -> FLConfig:
    """The run's own configuration, set to continue from the global model of its last completed
    round (the interrupted round is redone; nothing earlier is lost or rerun).

    interrupted: the killed attempt's server folder (the one holding app_server/); its complete
    rounds, round log and metrics lines join the run folder's own. Not carried over: with
    --absent-weights keep, the sites' remembered updates (a site counts again from its next
    update); NVFlare's best-model choice restarts with the resumed rounds."""
    try:
        run = RunFolder.read(run_dir)
    except RunFolderError as exc:
        raise SimulationError(f"{exc}; not a run folder to resume") from None
    if not run.federated:
        raise SimulationError(f"{run_dir}: a {run.kind} run, not a federated run to resume")
    ended = run.metrics() or {}
    if run.finished and not ended.get("resumable"):  # a job cut short (its server job died) is resumable
        outcome = "failed" if ended.get("status") == "failed" else "finished"
        raise SimulationError(f"{run_dir}: this run {outcome} (see its metrics.json); nothing to resume: start a new run")
    cfg = run.config
    if cfg.he:
        raise SimulationError(f"{run_dir}: an HE run cannot be resumed (its round models are ciphertexts the "
                              "persistor cannot start from); start it again")
    rounds_dir = run_dir / "models" / "rounds"
    rounds_dir.mkdir(parents=True, exist_ok=True)
    earlier = interrupted / "app_server" / "rounds" if interrupted is not None else None
    if earlier is not None and earlier.is_dir():  # its round files are complete: they are written atomically
        files = {int(m.group(1)): f for f in earlier.glob("global_round_*.pt") if (m := ROUND_FILE.search(f.name))}
        done = max(files, default=-1)  # the interrupted round's log lines and metrics are dropped
        for f in files.values():
            shutil.copy2(f, rounds_dir / f.name)
        if (earlier / "round_log.jsonl").is_file():
            append_lines(earlier / "round_log.jsonl", rounds_dir / "round_log.jsonl",
                          keep=lambda e: e.get("round", done + 1) <= done)
        metrics = interrupted / "metrics"
        for f in metrics.glob("*.jsonl") if metrics.is_dir() else []:
            append_lines(f, run_dir / "metrics" / f.name,
                          keep=lambda e: e.get("round", e.get("current_round", done + 1)) <= done)
    last, saved = last_complete_round(rounds_dir)
    if last is not None and last >= cfg.rounds - 1:
        raise SimulationError(f"{run_dir}: every round finished before the stop; the models are in "
                              f"{rounds_dir}")
    if last is not None:
        start = run_dir / "models" / f"resume_from_round_{last:03d}.pt"
        atomic_torch_save({"model": saved["model"], "meta_props": saved.get("meta") or {}}, start)
        cfg = replace(cfg, start_round=last + 1, initial_model=str(start))
    return cfg


def resume_simulation(run_dir: Path, threads: int | None = None, take_turns: bool = False,
                      gpus: tuple[int, ...] = ()) -> dict:
    """Continue a killed `cxrfl sim` run (see prepare_resume), on `gpus` when given."""
    run_dir = Path(run_dir).absolute()
    cfg = prepare_resume(run_dir, run_dir / "workspace" / "server" / "simulate_job")
    print(f"resuming {run_dir.name} at round {cfg.start_round} of {cfg.rounds}", flush=True)
    return run_simulation(cfg, run_dir, threads=threads, take_turns=take_turns, resuming=True, gpus=gpus)
