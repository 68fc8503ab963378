"""The server's results of a federated run (simulator workspace or a downloaded POC job) collected
into the run folder, and the check that every round got the updates it needed."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from nvflare.app_opt.pt.decomposers import TensorDecomposer
from nvflare.fuel.utils import fobs

from lightning_modules.data.atomic import atomic_torch_save, atomic_write_text, read_json_object, write_json
from app_custom.availability import check_schedule
from app_custom.early_stopping import EARLY_STOP_FILE
from cxrfl.fl.config import FLConfig
from cxrfl.fl.outcome import round_ranges
from lightning_modules.data.imageio import one_line
from lightning_modules.weights import UnsafeFileError, load_checkpoint


class SimulationError(RuntimeError):
    """The simulated job did not produce its results; the message says where to look."""


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
            append_lines(f, models / "rounds" / f.name)
        else:
            shutil.copy2(f, models / "rounds" / f.name)
    done = len(list((models / "rounds").glob("global_round_*.pt")))
    stopped = early_stop(run_dir)
    expected = rounds_run(cfg, stopped)
    if done < expected:
        raise SimulationError(f"only {done} of {expected} rounds completed; a site probably crashed: see {logs}")
    if (server / "metrics").is_dir():
        for f in sorted((server / "metrics").glob("*.jsonl")) if append_logs else []:
            append_lines(f, run_dir / "metrics" / f.name)
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


def early_stop(run_dir: Path) -> dict | None:
    """The server's record of stopping early (app_custom/early_stopping.py), copied into the run
    folder: {"round": last round run, "patience", "best_round", ...}; None when the run did not stop early."""
    path = run_dir / "models" / "rounds" / EARLY_STOP_FILE
    if not path.is_file():
        return None
    try:
        record = read_json_object(path)
    except ValueError as exc:
        raise SimulationError(str(exc)) from None
    if not isinstance(record.get("round"), int):
        raise SimulationError(f"{path}: no round number in the early-stopping record")
    return record


def rounds_run(cfg: FLConfig, stopped: dict | None) -> int:
    """Rounds the job ran: all of them, or up to the one it stopped early after."""
    return min(cfg.rounds, stopped["round"] + 1) if stopped else cfg.rounds


# What each --dp mode guarantees, in the words metrics.json, the terminal and the report use (docs/privacy.md).
PRIVACY_GUARANTEES = {
    "dpsgd": "(epsilon, delta)-differential privacy of each site's training images (record level, RDP accountant)",
    "svt": "NVFlare's filter-level epsilon on the released update values (pure DP sum over rounds); not a bound on "
           "one patient's influence",
    "percentile": "none: truncation/sparsification of the update, not differential privacy",
}


class RunFailed(SimulationError):
    """Rounds ran without the contributions they need; metrics.json says which and why."""


@dataclass
class Contributions:
    """Who contributed an accepted update in which round, as the round log records it."""

    rounds: int  # rounds run (fewer than configured after an early stop)
    accepted: dict[int, set[str]]  # round -> sites whose update was accepted
    expected: dict[str, list[int]]  # site -> the rounds it was expected in (not scheduled away)
    stopped: dict | None  # the server's early-stopping record
    epsilon: dict[str, dict[int, float]] = field(default_factory=dict)  # DP-SGD: site -> round -> epsilon spent
    delta: float | None = None
    target_epsilon: float | None = None
    mechanism: str | None = None  # the run's --dp

    def privacy(self) -> dict:
        """metrics.json's privacy record: the mechanism, what it guarantees, and for DP-SGD and SVT each site's
        epsilon after each round it trained and at the end (docs/privacy.md)."""
        record = {"mechanism": self.mechanism, "guarantee": PRIVACY_GUARANTEES[self.mechanism]}
        if self.mechanism == "percentile":
            return record
        return {**record, "accountant": "rdp" if self.mechanism == "dpsgd" else "pure_dp_sum (NVFlare's SVTPrivacy)",
                "delta": self.delta, "target_epsilon": self.target_epsilon,
                "epsilon_by_round": {s: {str(r): e for r, e in sorted(by_round.items())}
                                     for s, by_round in self.epsilon.items()},
                "epsilon": {s: by_round[max(by_round)] for s, by_round in self.epsilon.items()}}

    def missing_rounds(self, site: str) -> list[int]:
        return [r for r in self.expected[site] if site not in self.accepted[r]]

    def never(self) -> list[str]:
        """Sites expected in some round that contributed in none."""
        return [s for s, rounds in self.expected.items() if rounds and len(self.missing_rounds(s)) == len(rounds)]

    def facts(self) -> dict:
        """metrics.json's record of it: rounds run, each site's count of contributed rounds, the rounds
        each site missed (sites that missed none left out), the sites that never contributed, and
        an early stop."""
        missing = {s: self.missing_rounds(s) for s in self.expected}
        return {"rounds_run": self.rounds,
                "rounds_contributed": {s: len(self.expected[s]) - len(missing[s]) for s in self.expected},
                "sites_missing_rounds": {s: rounds for s, rounds in missing.items() if rounds},
                "missing_sites": self.never()} | ({"stopped_early": self.stopped} if self.stopped else {}) \
            | ({"privacy": self.privacy()} if self.mechanism else {})


def round_contributions(cfg: FLConfig, run_dir: Path) -> Contributions:
    """The run folder's round log read against the rounds run and the availability schedule."""
    stopped = early_stop(run_dir)
    rounds = rounds_run(cfg, stopped)
    accepted: dict[int, set[str]] = {r: set() for r in range(rounds)}
    epsilon: dict[str, dict[int, float]] = {}
    delta = None
    log = run_dir / "models" / "rounds" / "round_log.jsonl"
    for line in log.read_text().splitlines() if log.is_file() else []:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if entry.get("accepted") and entry.get("round") in accepted:
            accepted[entry["round"]].add(entry.get("site"))
        if isinstance(entry.get("dp_epsilon"), (int, float)) and isinstance(entry.get("round"), int):
            epsilon.setdefault(entry.get("site"), {})[entry["round"]] = float(entry["dp_epsilon"])
            delta = entry.get("dp_delta")
    plan = check_schedule(cfg.schedule or {}, cfg.sites, cfg.rounds)
    return Contributions(rounds, accepted, {s: sorted(r for r in plan[s] if r < rounds) for s in cfg.sites}, stopped,
                         epsilon, delta, cfg.dp_target_epsilon, cfg.dp)


def check_contributions(cfg: FLConfig, run_dir: Path, site_logs: dict[str, list[Path]]) -> dict:
    """Every round needs --min-clients accepted updates (all sites by default; a site scheduled away
    is not expected), and every site an accepted update in some round (unless --allow-missing-sites),
    as the round log records them. NVFlare goes on to the next round, and ends the job 'successfully',
    when a round's updates were all refused, every site crashed, or a site never joined while
    --min-clients others did. Returns what the run's metrics.json must record of it: who contributed
    and an early stop (`Contributions.facts`). Otherwise writes metrics.json with the short rounds,
    the missing sites and each failing site's error, and raises RunFailed."""
    found = round_contributions(cfg, run_dir)
    short = {}
    for r, sites in found.accepted.items():
        present = [s for s in cfg.sites if r in found.expected[s]]
        needed = max(1, min(cfg.min_clients or len(cfg.sites), len(present)))
        if len(sites) < needed:
            short[r] = {"accepted": sorted(sites), "needed": needed, "missing": sorted(set(present) - sites)}
    never = [] if cfg.allow_missing_sites else found.never()
    if not short and not never:
        return found.facts()
    failing = sorted({s for entry in short.values() for s in entry["missing"]} | set(never))
    errors = {site: site_error(site_logs.get(site, [])) for site in failing}
    reasons = []
    if short:
        first = min(short)
        reasons.append(f"{len(short)} of {found.rounds} rounds lacked the updates they need (round(s) "
                       f"{round_ranges(list(short))}; round {first}: {len(short[first]['accepted'])} of "
                       f"{short[first]['needed']} accepted)")
    if never:
        reasons.append(", ".join(f"{s} (expected in round(s) {round_ranges(found.expected[s])})" for s in never)
                       + " never contributed an accepted update"
                       + ("" if short else " although every round had the updates it needs (--allow-missing-sites "
                          "completes such a run)"))
    message = ("; ".join(reasons) + "; " + "; ".join(f"{site}: {err}" for site, err in errors.items())
               + f"; see {run_dir / 'metrics.json'} and the site logs")
    write_json(run_dir / "metrics.json", {"status": "failed", "error": message, "short_rounds": short,
                                          "site_errors": errors, "task": cfg.task, "sites": cfg.sites,
                                          **found.facts()})
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


def append_lines(source: Path, target: Path, keep=lambda entry: True) -> None:
    """Append a JSON-lines file's entries that `keep` accepts to another, rewritten atomically."""
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


def _local_models(folder: Path, sites: list[str]) -> dict:
    """Each site's own model, as it submitted it for cross-site evaluation."""
    fobs.register(TensorDecomposer)
    found = {}
    for site in sites:
        path = folder / site
        if path.is_file():
            found[site] = {k: torch.as_tensor(v) for k, v in fobs.loads(path.read_bytes()).data.items()}
    return found


def load_state(path: Path) -> dict:
    """The tensors of a global or local model file of a run, read without running code from it."""
    return {k: torch.as_tensor(v) for k, v in load_checkpoint(path).state.items()}
