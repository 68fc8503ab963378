"""`cxrfl study`: the scaling and intermittent-clients study of Sáinz-Pardo & López García, as a
grid of simulator runs plus a centralized baseline, resumable, summarised in one table.

The same pooled training data is split IID into each number of sites (the held-out test set is
shared), so 3 vs 10 sites differ only in how the data is spread. Sites run one after another in
the simulator, so each site's measured training time is its own (not slowed by the others): the
critical-path time is, per round, the slowest site's training plus the server's aggregation, what
a deployment with one machine per hospital would wait; the wall time is what it took here.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import itertools
import json
import re
from pathlib import Path

import yaml

from cxrfl.central import train_central
from cxrfl.fl.config import FLConfig
from cxrfl.run_folder import RunFolder
from cxrfl.runs import new_run_dir
from cxrfl.tables import mean_sd_cell
from cxrfl.fl.simulator import run_simulation
from lightning_modules.config import TrainConfig
from lightning_modules.data.atomic import atomic_write_text
from lightning_modules.data.manifest import DATASET_JSON, Record, load_split, read_dataset_info, resolve
from lightning_modules.data.phantom import generate_dataset
from lightning_modules.data.split import split_into_sites, write_data_root

CONFIGS = Path(__file__).resolve().parent / "studies"  # package data: ships with the wheel
COLUMNS = ["run", "sites", "rounds", "local_epochs", "schedule", "approach", "test_loss", "test_acc", "test_auroc",
           "threshold", "test_acc_at_threshold", "test_sensitivity_at_threshold", "test_specificity_at_threshold",
           "wall_s", "critical_path_s", "time_reduction_wall", "time_reduction_critical_path"]


class StudyError(ValueError):
    """The study's configuration or data is unusable; the message says why."""


def read_config(path: Path) -> dict:
    """A study configuration file's mapping (any study); StudyError in one line naming the file."""
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise StudyError(f"{path}: cannot read the study configuration ({' '.join(str(exc).split())})") from None
    if not isinstance(config, dict):
        raise StudyError(f"{path}: expected a mapping of settings")
    return config


def load_config(path: Path) -> dict:
    config = read_config(path)
    for key in ("name", "data", "grid"):
        if key not in config:
            raise StudyError(f"{path}: missing '{key}'")
    return config


def pooled_data(config: dict, out: Path) -> Path:
    """The study's source data root: a synthetic one generated into the study folder, or a path."""
    data = config["data"]
    if "root" in data:
        return Path(data["root"])
    root = out / "data" / "pool"
    if not (root / DATASET_JSON).is_file():
        generate_dataset(root, **data["synthetic"])
    return root


def split_for(pool: Path, n_sites: int, out: Path, seed: int) -> Path:
    """`pool`'s train/val records re-split IID into n sites (patients kept together); same test set."""
    root = out / "data" / f"{n_sites}-sites"
    if (root / DATASET_JSON).is_file():
        return root
    records, test = [], []
    for folder, r in load_split(pool, "train") + load_split(pool, "val"):
        records.append(_absolute(folder, r))
    for folder, r in load_split(pool, "test"):
        test.append(_absolute(folder, r))
    result = split_into_sites(records, n_sites, mode="iid", test_fraction=0.0, seed=seed)
    result.test = test
    write_data_root(result, root, read_dataset_info(pool).get("classes"), pool)
    return root


def _absolute(folder: Path, r: Record) -> Record:
    return Record(image=str(resolve(folder, r.image)), mask=str(resolve(folder, r.mask)) if r.mask else "",
                  label=r.label, patient_id=r.patient_id, split=r.split, site=r.site,
                  opacity=str(resolve(folder, r.opacity)) if r.opacity else "")


def grid_runs(config: dict) -> list[dict]:
    grid = config["grid"]
    schedules = grid.get("schedules") or {"none": None}
    runs = []
    for sites, rounds, epochs, (schedule_name, schedule), approach in itertools.product(
            grid.get("sites", [3]), grid.get("rounds", [5]), grid.get("local_epochs", [1]), schedules.items(),
            grid.get("absent_weights", ["drop"])):
        if schedule is None and approach != "drop":
            continue  # with every site in every round both approaches are the same FedAvg
        runs.append({"id": f"fl-{sites}sites-r{rounds}-e{epochs}-{schedule_name}" + (f"-{approach}" if schedule else ""),
                     "sites": sites, "rounds": rounds, "local_epochs": epochs, "schedule_name": schedule_name,
                     "schedule": schedule, "approach": approach if schedule else ""})
    return runs


def run_study(config: dict, out: Path, log=print, seeds: int = 1) -> list[dict]:
    """Run what is not done yet (a run with metrics.json is done), then write the table.
    seeds: every run (the central baseline too) with training seeds seed, seed+1, ... (in seed-K/
    folders when more than one), the table reporting each number's mean and spread over them."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    RunFolder.create(out, "study", settings=dict(config, seeds=seeds))
    pool = pooled_data(config, out)
    first = config.get("train", {}).get("seed", 0)
    rows = []
    for seed in range(first, first + seeds):
        folder = out if seeds == 1 else out / f"seed-{seed}"
        rows += [dict(row, seed=seed) for row in _run_grid(config, pool, out, folder, seed, log)]
    write_table(rows, out)
    return rows


def _run_grid(config: dict, pool: Path, out: Path, folder: Path, seed: int, log) -> list[dict]:
    """The central baseline and every grid run with one training seed, into `folder`; the sites'
    data splits (from the data's own seed) are the same for every training seed."""
    base = config.get("train", {})
    rows = []
    central_dir = folder / "central"
    if not finished_run(central_dir):
        log(f"[study] central baseline -> {central_dir}")
        set_aside_unfinished(central_dir, log)
        _central(config, pool, central_dir, seed)  # the union of the same training data
    else:
        log(f"[study] {central_dir.relative_to(out)}: done, skipped")
    central = RunFolder.read(central_dir).metrics()
    rows.append(_row("central", central, central["train_seconds"], central["train_seconds"], {}, central))
    for spec in grid_runs(config):
        run_dir = folder / spec["id"]
        if not finished_run(run_dir):
            log(f"[study] {run_dir.relative_to(out)}")
            set_aside_unfinished(run_dir, log)
            data = split_for(pool, spec["sites"], out, base.get("seed", 0))
            cfg = FLConfig(task=config.get("task", "classify"), data_root=str(data.absolute()),
                           sites=[f"site-{i + 1}" for i in range(spec["sites"])], rounds=spec["rounds"],
                           epochs=spec["local_epochs"], batch_size=base.get("batch_size", 16),
                           lr=base.get("lr", 1e-3), image_size=base.get("image_size", 64), model=base.get("model"),
                           classes=read_dataset_info(data).get("classes") or ["normal", "pneumonia"],
                           seed=seed, cross_site_eval=False, global_model_eval=True, schedule=spec["schedule"],
                           absent_weights=spec["approach"] or "drop")
            run_simulation(cfg, run_dir, take_turns=True)  # each site's local time is its own
        else:
            log(f"[study] {run_dir.relative_to(out)}: done, skipped")
        summary = RunFolder.read(run_dir).metrics()
        critical = critical_path_seconds(run_dir)
        rows.append(_row(spec["id"], summary, summary["wall_seconds"], critical, spec, central))
    return rows


def finished_run(run_dir: Path) -> bool:
    return RunFolder.is_run(run_dir) and RunFolder.read(run_dir).finished


def set_aside_unfinished(run_dir: Path, log) -> None:
    """An interrupted run is redone in a fresh folder; what it wrote is kept beside it."""
    if run_dir.is_dir() and any(run_dir.iterdir()):
        n = 1
        while (aside := run_dir.with_name(f"{run_dir.name}.unfinished-{n}")).exists():
            n += 1
        run_dir.rename(aside)
        log(f"[study] {run_dir.name}: unfinished earlier attempt kept in {aside.name}")


def _central(config: dict, data: Path, run_dir: Path, seed: int) -> None:
    base = config.get("train", {})
    cfg = TrainConfig(task=config.get("task", "classify"), data_root=str(data),
                      epochs=config.get("central", {}).get("epochs", 5), image_size=base.get("image_size", 64),
                      batch_size=base.get("batch_size", 16), lr=base.get("lr", 1e-3), seed=seed,
                      model=base.get("model"))
    train_central(cfg, new_run_dir(run_dir, "central"))


LOG_LINE = re.compile(r"^(\S+ \S+) .*(Start aggregation|End aggregation)")


def critical_path_seconds(run_dir: Path) -> float | None:
    """Σ over rounds of (the slowest accepted site's local seconds, validating the received model
    and training, + the server's aggregation seconds): sites' times from the round log,
    aggregation from the simulator log. Communication and process start-up are not included."""
    log = Path(run_dir) / "models" / "rounds" / "round_log.jsonl"
    sim_log = Path(run_dir) / "simulator.log"
    if not log.is_file() or not sim_log.is_file():
        return None
    slowest: dict[int, float] = {}
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("accepted") and entry.get("local_seconds") is not None:
            slowest[entry["round"]] = max(slowest.get(entry["round"], 0.0), float(entry["local_seconds"]))
    aggregation, start = 0.0, None
    for line in sim_log.read_text(errors="replace").splitlines():
        m = LOG_LINE.search(line)
        if not m:
            continue
        when = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if m.group(2) == "Start aggregation":
            start = when
        elif m.group(2) == "End aggregation" and start is not None:
            aggregation += when - start
            start = None
    return round(sum(slowest.values()) + aggregation, 2) if slowest else None


def _row(run: str, metrics: dict, wall: float, critical: float | None, spec: dict, central: dict) -> dict:
    """One table row from a run's metrics.json: test metrics at argmax (0.5) and at the decision
    threshold chosen on the run's validation data (the sites' pooled histograms in FL runs)."""
    central_time = central["train_seconds"]
    test = metrics.get("test", {})
    return {"run": run, "sites": spec.get("sites", 1), "rounds": spec.get("rounds", ""),
            "local_epochs": spec.get("local_epochs", ""), "schedule": spec.get("schedule_name", ""),
            "approach": spec.get("approach", ""), "test_loss": test.get("test_loss"),
            "test_acc": test.get("test_acc"), "test_auroc": test.get("test_auroc"),
            "threshold": (metrics.get("operating_point") or {}).get("threshold"),
            **{k: test.get(k) for k in ("test_acc_at_threshold", "test_sensitivity_at_threshold",
                                        "test_specificity_at_threshold")},
            "wall_s": round(wall, 1),
            "critical_path_s": critical,
            "time_reduction_wall": round(1 - wall / central_time, 3) if central_time else None,
            "time_reduction_critical_path": round(1 - critical / central_time, 3) if critical and central_time else None}


# Numbers averaged over seeds in the table; the others describe the run.
MEASURED = ["test_loss", "test_acc", "test_auroc", "threshold", "test_acc_at_threshold",
            "test_sensitivity_at_threshold", "test_specificity_at_threshold", "wall_s", "critical_path_s", "time_reduction_wall",
            "time_reduction_critical_path"]


def write_table(rows: list[dict], out: Path) -> None:
    """study.csv: one row per run and seed; study.md: one row per run, each number as its mean
    ± sample standard deviation over the seeds (and the number of seeds) when there are several."""
    columns = ["seed"] + COLUMNS
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "study.csv", buf.getvalue())
    seeds = sorted({r.get("seed", 0) for r in rows})
    by_run: dict[str, list[dict]] = {}
    for r in rows:
        by_run.setdefault(r["run"], []).append(r)
    md = []
    if len(seeds) > 1:
        md.append(f"Mean ± standard deviation over {len(seeds)} training seeds ({', '.join(map(str, seeds))}); "
                  "one row per seed in study.csv.\n")
    else:
        md.append(f"One training seed ({seeds[0]}): a single draw; `cxrfl study --seeds 3` gives mean ± spread.\n")
    md += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for run, group in by_run.items():
        cells = [_summary_cell([r[c] for r in group]) if c in MEASURED else _cell(group[0][c]) for c in COLUMNS]
        md.append("| " + " | ".join(cells) + " |")
    atomic_write_text(out / "study.md", "\n".join(md) + "\n")


def _summary_cell(values: list) -> str:
    """One seed: the number itself; several: mean ± sd over the seeds."""
    return _cell(values[0]) if len(values) == 1 else mean_sd_cell(values, digits=None, count_missing=True)


def _cell(value) -> str:
    if value is None or value == "":
        return "" if value == "" else "n/a"
    return f"{value:.4f}" if isinstance(value, float) and abs(value) < 10 else str(value)
