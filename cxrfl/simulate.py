"""Run a federated job in the NVFlare simulator and turn its workspace into a run folder.

Run folder::

    RUN/config.json                 the FLConfig
    RUN/job/<job name>/             the exported job (what `nvflare job submit -j` takes)
    RUN/workspace/                  the simulator workspace (server and site logs)
    RUN/simulator.log
    RUN/models/global_final.pt      last global model   } NVFlare persistor format:
    RUN/models/global_best.pt       best by val metric  } {"model": state_dict, ...}
    RUN/models/rounds/global_round_NNN.pt, round_log.jsonl
    RUN/models/local_<site>.pt      each site's last local model (from cross-site evaluation)
    RUN/metrics/round_metrics.jsonl per round, per site validation metrics of the global model
    RUN/tb/<site>/                  streamed training/validation curves (TensorBoard)
    RUN/cross_site.json|csv         model x (each site's val split + held-out test) matrix
    RUN/metrics.json                summary: test metrics of the best and final global model, wall time

The simulator exits 0 even when a client crashes, so success is judged from the files.
A run killed mid-way continues with `resume_simulation` (`cxrfl sim --resume RUN`): from the
last round whose global model was written (atomically), with the same configuration.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytorch_lightning as pl
import torch

from lightning_modules.data.atomic import atomic_torch_save
from app_custom.availability import check_schedule
from cxrfl.fl.config import FLConfig
from cxrfl.fl_job import built_job, write_simulator_site_config
from cxrfl.run_folder import RunFolder, RunFolderError
from cxrfl.keyfiles import restrict_private_files
from cxrfl.he_keys import CLIENT_CONTEXT, decrypt_checkpoint, write_he_contexts
from cxrfl.runs import finite_or_none, test_at_operating_point, undefined_reason, write_test_predictions
from lightning_modules.data.datamodule import CXRDataModule
from lightning_modules.data.imageio import one_line
from lightning_modules.data.manifest import atomic_write_text, write_json
from lightning_modules.factory import build_module
from lightning_modules.segmentation import LungSegmentation


class SimulationError(RuntimeError):
    """The simulated job did not produce its results; the message says where to look."""


def export_job(cfg: FLConfig, out_dir: Path) -> Path:
    """Write the job folder for `nvflare job submit -j` / `submit_job`; returns its path."""
    out_dir = Path(out_dir).absolute()
    with built_job(cfg) as job:
        job.export_job(str(out_dir))
    return out_dir / cfg.job_name


def run_simulation(cfg: FLConfig, run_dir: Path, threads: int | None = None, take_turns: bool = False,
                   resuming: bool = False) -> dict:
    """Run the job with `threads` sites in parallel (default: all), sharing this machine's cores.

    take_turns: every site's process stays up, but sites work one at a time, each with all cores
    (a lock file): per-site times are uncontended, as with one machine per hospital, and no site
    process is restarted per round (the simulator restarts them when threads < sites)."""
    run_dir = Path(run_dir).absolute()
    threads = threads or len(cfg.sites)
    if take_turns:
        if threads != len(cfg.sites):
            raise ValueError("taking turns keeps one process per site: leave --threads at the number of sites")
        cfg.turn_lock = str(run_dir / "site_turns.lock")
        cfg.torch_threads = cfg.torch_threads or (os.cpu_count() or 1)
    if not cfg.torch_threads:
        cfg.torch_threads = max(1, (os.cpu_count() or 1) // threads)
    if not resuming:
        RunFolder.create(run_dir, "sim", cfg)  # a resumed run keeps the original
    job_dir = export_job(cfg, run_dir / "job")
    workspace = run_dir / "workspace"
    if workspace.exists():
        shutil.rmtree(workspace)
    he_key = None
    write_simulator_site_config(workspace, cfg)  # where each site finds its data: not in the job
    if cfg.he:  # no kits here: the project's HE contexts, made for this run (the simulator copies startup/)
        write_he_contexts(workspace / "startup")
        he_key = workspace / "startup" / CLIENT_CONTEXT
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if cfg.wandb:
        env.setdefault("WANDB_MODE", "offline" if not env.get("WANDB_API_KEY") else "online")
        env["WANDB_DIR"] = str(run_dir)
    nvflare = Path(sys.executable).parent / "nvflare"
    command = [str(nvflare) if nvflare.exists() else "nvflare", "simulator", str(job_dir), "-w", str(workspace),
               "-n", str(len(cfg.sites)), "-t", str(threads), "-c", ",".join(cfg.sites)]
    start = time.time()
    returncode = _run_logged(command, run_dir / "simulator.log", env, cwd=run_dir)
    if cfg.he:  # the simulator copied the secret context into every site's startup/
        restrict_private_files(workspace)
    wall = time.time() - start
    collected = collect_server_results(cfg, workspace / "server" / "simulate_job", run_dir, append_logs=resuming)
    if returncode != 0:
        raise SimulationError(f"nvflare simulator exited with {returncode}; see {run_dir / 'simulator.log'}")
    check_contributions(cfg, run_dir, {site: [workspace / site / "log.txt"] for site in cfg.sites})
    summary = evaluate_run(cfg, run_dir, collected, he_key=he_key)
    summary.update(wall_seconds=round(wall, 2), rounds=cfg.rounds, sites=cfg.sites)
    write_json(run_dir / "metrics.json", summary)
    return summary


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


def collect_server_results(cfg: FLConfig, server: Path, run_dir: Path, append_logs: bool = False) -> dict:
    """Copy a finished job's server-side results (the folder holding app_server/) into the run folder
    (append_logs: a resumed run adds its round log and metrics lines to the earlier attempts')."""
    app = server / "app_server"
    logs = f"{run_dir / 'simulator.log'} and the site logs" if (run_dir / "simulator.log").exists() else "the site logs"
    models = run_dir / "models"
    (models / "rounds").mkdir(parents=True, exist_ok=True)
    final = app / "FL_global_model.pt"
    if not final.is_file():
        raise SimulationError(f"the job wrote no global model ({final} missing); a site probably crashed: see {logs}")
    shutil.copy2(final, models / "global_final.pt")
    best = app / "best_FL_global_model.pt"
    if best.is_file():  # NVFlare's model selector skips round 0: a 1-round job has no best model
        shutil.copy2(best, models / "global_best.pt")
    for f in sorted((app / "rounds").glob("*")):
        if append_logs and f.suffix == ".jsonl":
            _append_lines(f, models / "rounds" / f.name)
        else:
            shutil.copy2(f, models / "rounds" / f.name)
    done = len(list((models / "rounds").glob("global_round_*.pt")))
    if done < cfg.rounds:
        raise SimulationError(f"only {done} of {cfg.rounds} rounds completed; a site probably crashed: see {logs}")
    if (server / "metrics").is_dir():
        for f in sorted((server / "metrics").glob("*.jsonl")) if append_logs else []:
            _append_lines(f, run_dir / "metrics" / f.name)
        shutil.copytree(server / "metrics", run_dir / "metrics", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.jsonl") if append_logs else None)
    if (server / "tb_events").is_dir():
        shutil.copytree(server / "tb_events", run_dir / "tb", dirs_exist_ok=True)
    # under HE the server holds the sites' models only as ciphertexts
    local = {} if cfg.he else _local_models(server / "cross_site_val" / "model_shareables", cfg.sites)
    for site, params in local.items():
        atomic_torch_save({"model": params}, models / f"local_{site}.pt")
    cse = server / "cross_site_val" / "cross_val_results.json"
    return {"local_sites": sorted(local), "cse": cse if cse.is_file() else None}


class RunFailed(SimulationError):
    """Rounds ran without the contributions they need; metrics.json says which and why."""


def check_contributions(cfg: FLConfig, run_dir: Path, site_logs: dict[str, list[Path]]) -> None:
    """Every round needs --min-clients accepted updates (all sites by default; a site scheduled away
    is not expected), as the round log records them. NVFlare goes on to the next round, and ends
    the job 'successfully', when a round's updates were all refused or every site crashed.
    Otherwise writes metrics.json with the short rounds and each failing site's error, and raises."""
    import json

    accepted: dict[int, set[str]] = {r: set() for r in range(cfg.rounds)}
    log = run_dir / "models" / "rounds" / "round_log.jsonl"
    for line in log.read_text().splitlines() if log.is_file() else []:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if entry.get("accepted") and entry.get("round") in accepted:
            accepted[entry["round"]].add(entry.get("site"))
    plan = check_schedule(cfg.schedule or {}, cfg.sites, cfg.rounds)
    short = {}
    for r, sites in accepted.items():
        present = [s for s in cfg.sites if r in plan[s]]
        needed = max(1, min(cfg.min_clients or len(cfg.sites), len(present)))
        if len(sites) < needed:
            short[r] = {"accepted": sorted(sites), "needed": needed, "missing": sorted(set(present) - sites)}
    if not short:
        return
    failing = sorted({s for entry in short.values() for s in entry["missing"]})
    errors = {site: site_error(site_logs.get(site, [])) for site in failing}
    first = min(short)
    message = (f"{len(short)} of {cfg.rounds} rounds lacked the updates they need (round {first}: "
               f"{len(short[first]['accepted'])} of {short[first]['needed']} accepted); "
               + "; ".join(f"{site}: {err}" for site, err in errors.items())
               + f"; see {run_dir / 'metrics.json'} and the site logs")
    write_json(run_dir / "metrics.json", {"status": "failed", "error": message, "short_rounds": short,
                                          "site_errors": errors, "task": cfg.task, "sites": cfg.sites})
    raise RunFailed(message)


# The last line of a Python traceback or a client's own exit message.
ERROR_LINE = re.compile(r"^(?:[\w.]+(?:Error|Exception|Exit)|cxrfl client[^:]*): .+")


def site_error(logs: list[Path]) -> str:
    """The first error a site's logs name, in one line (else where to look)."""
    for log in logs:
        if not log.is_file():
            continue
        for line in log.read_text(errors="replace").splitlines():
            if ERROR_LINE.match(line.strip()):
                return one_line(line)
    where = ", ".join(str(p) for p in logs) or "its log"
    return f"no update accepted and no error in {where} (rejected by the server? see its log)"


def _append_lines(source: Path, target: Path, keep=lambda entry: True) -> None:
    """Append a JSON-lines file's entries that `keep` accepts to another, rewritten atomically."""
    import json

    kept = []
    for line in source.read_text().splitlines():
        try:
            if keep(json.loads(line)):
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    target.parent.mkdir(parents=True, exist_ok=True)
    earlier = target.read_text() if target.is_file() else ""
    atomic_write_text(target, earlier + "".join(line + "\n" for line in kept))


ROUND_FILE = re.compile(r"global_round_(\d+)\.pt$")


def last_complete_round(folder: Path) -> tuple[int, dict] | tuple[None, None]:
    """The last round whose global model file is readable, with its contents (a copy into the run
    folder cut by a kill is not). A round file that would run code when loaded stops the resume
    (SimulationError naming it): it is not ours, so the folder is not to be trusted."""
    from lightning_modules.weights import UnsafeFileError, load_checkpoint

    rounds = sorted((int(m.group(1)), f) for f in folder.glob("global_round_*.pt") if (m := ROUND_FILE.search(f.name)))
    for number, path in reversed(rounds):
        try:
            saved = load_checkpoint(path)
        except UnsafeFileError as exc:
            raise SimulationError(str(exc)) from None
        except ValueError:  # an unreadable file is simply not a complete round
            continue
        if saved.kind == "nvflare":
            return number, {"model": saved.state, "meta": saved.info}
    return None, None


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
    if run.finished:
        ended = "failed" if '"failed"' in run.metrics_file.read_text() else "finished"
        raise SimulationError(f"{run_dir}: this run {ended} (see its metrics.json); nothing to resume: start a new run")
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
            _append_lines(earlier / "round_log.jsonl", rounds_dir / "round_log.jsonl",
                          keep=lambda e: e.get("round", done + 1) <= done)
        metrics = interrupted / "metrics"
        for f in metrics.glob("*.jsonl") if metrics.is_dir() else []:
            _append_lines(f, run_dir / "metrics" / f.name,
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


def resume_simulation(run_dir: Path, threads: int | None = None, take_turns: bool = False) -> dict:
    """Continue a killed `cxrfl sim` run (see prepare_resume)."""
    run_dir = Path(run_dir).absolute()
    cfg = prepare_resume(run_dir, run_dir / "workspace" / "server" / "simulate_job")
    print(f"resuming {run_dir.name} at round {cfg.start_round} of {cfg.rounds}", flush=True)
    return run_simulation(cfg, run_dir, threads=threads, take_turns=take_turns, resuming=True)


def _local_models(folder: Path, sites: list[str]) -> dict:
    """Each site's own model, as it submitted it for cross-site evaluation."""
    from nvflare.app_opt.pt.decomposers import TensorDecomposer
    from nvflare.fuel.utils import fobs

    fobs.register(TensorDecomposer)
    found = {}
    for site in sites:
        path = folder / site
        if path.is_file():
            found[site] = {k: torch.as_tensor(v) for k, v in fobs.loads(path.read_bytes()).data.items()}
    return found


def load_state(path: Path) -> dict:
    """The tensors of a global or local model file of a run, read without running code from it."""
    from lightning_modules.weights import load_checkpoint

    return {k: torch.as_tensor(v) for k, v in load_checkpoint(path).state.items()}


def evaluate_run(cfg: FLConfig, run_dir: Path, collected: dict, he_key: Path | None = None) -> dict:
    """Test-set metrics of every model of the run, and the cross-site matrix. Under HE the server's
    models are ciphertexts: with a site's key (`he_key`, a client context) they are decrypted into
    models/decrypted/ and evaluated; without one there is no test evaluation."""
    import json

    models = run_dir / "models"
    candidates = {"global_final": models / "global_final.pt", "global_best": models / "global_best.pt"}
    candidates.update({f"local_{s}": models / f"local_{s}.pt" for s in collected["local_sites"]})
    candidates = {k: v for k, v in candidates.items() if v.is_file()}
    # cross-site evaluation: NVFlare's names -> ours
    cse = json.loads(collected["cse"].read_text()) if collected["cse"] else {}
    rename = {"SRV_FL_global_model.pt": "global_final", "SRV_best_FL_global_model.pt": "global_best"}
    matrix: dict[str, dict[str, dict]] = {name: {} for name in candidates}
    for data_site, by_model in cse.items():
        for model_name, metrics in by_model.items():
            name = rename.get(model_name, f"local_{model_name}")
            matrix.setdefault(name, {})[data_site] = metrics
    main = select_global_model(cfg, candidates, matrix)
    point = federated_operating_point(cfg, matrix.get(main, {}))
    if cfg.he:
        test_metrics = {}
        if he_key is not None:
            (models / "decrypted").mkdir(exist_ok=True)
            dm = test_data_module(cfg)
            for name, path in candidates.items():
                state = decrypt_checkpoint(path, he_key)
                atomic_torch_save({"model": state}, models / "decrypted" / f"{name}.pt")
                test_metrics[name] = evaluate_on_test(cfg, dm, state, run_dir if name == main else None,
                                                      point if name == main else None)
    else:
        dm = test_data_module(cfg)
        test_metrics, tested = {}, []  # (state, metrics) already computed: the best model is often the final one
        for name in sorted(candidates, key=lambda n: n != main):  # the selected model first: it writes predictions
            state = load_state(candidates[name])
            same = next((m for s, m in tested if s.keys() == state.keys() and all(torch.equal(s[k], state[k]) for k in s)),
                        None)
            if same is not None:  # at-threshold metrics belong to the selected model only
                test_metrics[name] = {k: v for k, v in same.items() if not k.endswith("_at_threshold")}
                continue
            test_metrics[name] = evaluate_on_test(cfg, dm, state, run_dir if name == main else None,
                                                  point if name == main else None)
            tested.append((state, test_metrics[name]))

    for name, metrics in test_metrics.items():
        matrix.setdefault(name, {})["test"] = metrics
    write_json(run_dir / "cross_site.json", {"key_metric": cfg.key_metric, "matrix": matrix})
    _write_matrix_csv(run_dir / "cross_site.csv", matrix, cfg)
    summary = {"task": cfg.task, "key_metric": cfg.key_metric, "selected_model": main,
               "test": test_metrics.get(main, {}), "test_by_model": test_metrics}
    if point:
        summary["operating_point"] = point
    if None in summary["test"].values():  # e.g. AUROC on a test set of one class
        summary["undefined_reason"] = undefined_reason(cfg.classes, dm.class_counts("test") if cfg.classes else None)
    return summary


def select_global_model(cfg: FLConfig, candidates: dict, matrix: dict) -> str:
    """The run's model: NVFlare's best (by the sites' validation of each received global model)
    or the final one, whichever the sites' validation in cross-site evaluation ranks higher.
    NVFlare's selector never sees the last round's aggregate; the cross-site evaluation does, on
    the sites' validation splits (never the test set). Without it: the best, else the final."""
    def site_mean(name: str) -> float | None:
        values = [m.get(cfg.key_metric) for site, m in matrix.get(name, {}).items() if site in cfg.sites]
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    if "global_best" not in candidates:
        return "global_final"
    best, final = site_mean("global_best"), site_mean("global_final")
    return "global_final" if best is not None and final is not None and final > best else "global_best"


def _write_matrix_csv(path: Path, matrix: dict, cfg: FLConfig) -> None:
    metric = cfg.key_metric.removeprefix("val_")
    columns = list(cfg.sites) + ["test"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model"] + [f"{c} {metric}" for c in columns])
    for name, row in matrix.items():
        cells = []
        for c in columns:
            m = row.get(c, {})
            value = m.get(f"val_{metric}", m.get(f"test_{metric}"))
            cells.append("" if value is None else f"{value:.4f}")
        w.writerow([name] + cells)
    atomic_write_text(path, buf.getvalue())


def test_data_module(cfg: FLConfig) -> CXRDataModule:
    """The held-out test set, prepared the way the run's clients prepare their data."""
    mask_predictor = None
    if cfg.segmenter:
        segmenter = LungSegmentation.from_checkpoint(cfg.segmenter)
        mask_predictor = segmenter.mask_predictor(cfg.roi_threshold)
    dm = CXRDataModule(cfg.data_root, task=cfg.task, sites=None, image_size=cfg.image_size,
                       batch_size=cfg.batch_size, roi=cfg.roi,
                       roi_threshold=cfg.roi_threshold, mask_predictor=mask_predictor, limit=cfg.limit)
    dm.classes = list(cfg.classes)  # the job's classes; the test set lives at the coordinator, not a site
    dm.setup("test")
    return dm


def federated_operating_point(cfg: FLConfig, by_site: dict) -> dict | None:
    """A two-class classifier's decision threshold from the sites' validation in cross-site
    evaluation: their per-class score histograms pooled (no image or score leaves a site), Youden's
    J (or the configured target sensitivity); 0.5 when no site sent one (no cross-site evaluation). None for other tasks."""
    from lightning_modules.operating_point import DEFAULT_THRESHOLD, histogram_counts, threshold_from_histograms

    if cfg.task != "classify" or len(cfg.classes) != 2:
        return None
    histograms = [h for site, m in by_site.items() if site in cfg.sites for h in [histogram_counts(m)] if h]
    if not histograms:
        return {"threshold": DEFAULT_THRESHOLD, "rule": "default 0.5 (no site sent validation histograms)"}
    return {**threshold_from_histograms(histograms, cfg.target_sensitivity), "sites": len(histograms)}


def evaluate_on_test(cfg: FLConfig, dm: CXRDataModule, state: dict, predictions_dir: Path | None = None,
                     point: dict | None = None) -> dict:
    """Load a state_dict into the task's module and run it on the held-out test set (a classifier
    writes test_predictions.csv into predictions_dir when given); with an operating `point`, also
    the test metrics at its threshold and the test ECE."""
    module = build_module(cfg.task, cfg.model, lr=cfg.lr, classes=cfg.classes)
    module.load_state_dict(state)
    trainer = pl.Trainer(accelerator=cfg.accelerator, devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    results = {k: finite_or_none(v) for k, v in trainer.test(module, datamodule=dm, verbose=False)[0].items()}
    if point is not None:
        results.update(test_at_operating_point(module, point))
    if predictions_dir is not None and cfg.task == "classify":
        write_test_predictions(predictions_dir / "test_predictions.csv", module, cfg.classes,
                               point.get("threshold") if point else None)
    return results
