"""`cxrfl study`: the same data split into different numbers of sites, a small grid with an
intermittent site run to its table, and resuming without redoing finished runs."""

from __future__ import annotations

import csv
import json
import threading
import time

import yaml

from cxrfl.cli import main
from app_custom.simulated_site import machine_turn
from cxrfl.study import CONFIGS, grid_runs, pooled_data, split_for
from lightning_modules.data.manifest import load_split

TINY = {
    "name": "tiny", "task": "classify",
    "data": {"synthetic": {"sites": 4, "per_site": 14, "test_size": 10, "size": 32, "seed": 4}},
    "train": {"model": "cnn5", "image_size": 32, "batch_size": 4, "lr": 0.001, "seed": 0},
    "central": {"epochs": 2},
    "grid": {"sites": [3], "rounds": [2], "local_epochs": [1], "absent_weights": ["keep"],
             "schedules": {"intermittent": {"site-2": "0", "site-3": "1-"}}},
}


def test_the_same_training_data_is_split_into_any_number_of_sites(tmp_path):
    pool = pooled_data(TINY, tmp_path)
    pooled = sorted(r.image.rsplit("/", 1)[-1] for split in ("train", "val") for _, r in load_split(pool, split))
    for n in (2, 5):
        root = split_for(pool, n, tmp_path, seed=0)
        rows = [r for split in ("train", "val") for _, r in load_split(root, split)]
        assert sorted(r.image.rsplit("/", 1)[-1] for r in rows) == pooled  # every image once
        assert len({folder.name for split in ("train", "val") for folder, _ in load_split(root, split)}) == n
        assert [r.image for _, r in load_split(root, "test")] and \
            sorted(r.image.rsplit("/", 1)[-1] for _, r in load_split(root, "test")) == \
            sorted(r.image.rsplit("/", 1)[-1] for _, r in load_split(pool, "test"))  # one shared test set
        patients = {}
        for folder, r in ((f, r) for split in ("train", "val") for f, r in load_split(root, split)):
            patients.setdefault(r.patient_id, set()).add(folder.name)
        assert all(len(sites) == 1 for sites in patients.values())  # a patient stays at one site


def test_grid_skips_the_approach_where_it_cannot_matter():
    config = dict(TINY, grid=dict(TINY["grid"], absent_weights=["drop", "keep"],
                                  schedules={"all-rounds": None, "intermittent": {"site-2": "0"}}))
    ids = [r["id"] for r in grid_runs(config)]
    assert ids == ["fl-3sites-r2-e1-all-rounds", "fl-3sites-r2-e1-intermittent-drop",
                   "fl-3sites-r2-e1-intermittent-keep"]


def test_study_writes_its_table_and_resumes(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "study"
    assert main(["study", "--config", str(config), "--out", str(out)]) == 0
    with open(out / "study.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"central", "fl-3sites-r2-e1-intermittent-keep"}
    fl = rows["fl-3sites-r2-e1-intermittent-keep"]
    assert fl["sites"] == "3" and fl["approach"] == "keep" and fl["schedule"] == "intermittent"
    for column in ("test_loss", "test_acc", "test_auroc", "wall_s", "critical_path_s", "time_reduction_wall"):
        assert fl[column] not in ("", None), column
    assert 0 < float(fl["critical_path_s"]) < float(fl["wall_s"])  # sites in parallel beat them in turn
    # the decision threshold comes from the sites' validation of the global model, not a fixed 0.5
    point = json.loads((out / "fl-3sites-r2-e1-intermittent-keep" / "metrics.json").read_text())["operating_point"]
    assert point["sites"] == 3 and point["rule"] == "youden"
    assert float(fl["threshold"]) == point["threshold"] and fl["test_acc_at_threshold"] not in ("", None)
    assert rows["central"]["test_acc_at_threshold"] not in ("", None)
    # the schedule: site-2 leaves after round 0, site-3 joins in round 1; who counted, per round
    log = [json.loads(line) for line in
           (out / "fl-3sites-r2-e1-intermittent-keep" / "models" / "rounds" / "round_log.jsonl").read_text().splitlines()]
    accepted = {r: sorted(e["site"] for e in log if e.get("round") == r and e.get("accepted")) for r in (0, 1)}
    away = {r: sorted(e["site"] for e in log if e.get("round") == r and e.get("absent")) for r in (0, 1)}
    assert accepted == {0: ["site-1", "site-2"], 1: ["site-1", "site-3"]}
    assert away == {0: ["site-3"], 1: ["site-2"]}  # away sites did not train
    assert all(e["local_seconds"] > 0 for e in log if e.get("accepted"))
    kept = {e["round"]: e["kept"] for e in log if e.get("global_model")}
    assert kept == {0: [], 1: ["site-2"]}  # away in round 1, counted with its round-0 update (approach 2)
    assert "| central |" in (out / "study.md").read_text()
    first = (out / "fl-3sites-r2-e1-intermittent-keep" / "metrics.json").stat().st_mtime
    capsys.readouterr()
    assert main(["study", "--config", str(config), "--out", str(out)]) == 0  # resume: nothing left to run
    assert "done, skipped" in capsys.readouterr().out
    assert (out / "fl-3sites-r2-e1-intermittent-keep" / "metrics.json").stat().st_mtime == first
    assert main(["study", "--config", str(tmp_path / "missing.yaml")]) == 2


def test_sites_sharing_a_machine_take_turns(tmp_path):
    """The study's sites stay up as processes but work one at a time (flock), so each site's
    measured local time is its own; flock excludes separate opens in threads as across processes."""
    spans = []

    def site():
        with machine_turn(str(tmp_path / "turns.lock")):
            start = time.monotonic()
            time.sleep(0.15)
            spans.append((start, time.monotonic()))

    threads = [threading.Thread(target=site) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spans.sort()
    assert len(spans) == 4
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:]))  # no overlap


def test_the_shipped_study_configs_load():
    for name in ("default.yaml", "full.yaml"):
        config = yaml.safe_load((CONFIGS / name).read_text())
        runs = grid_runs(config)
        assert runs and {r["sites"] for r in runs} >= {3, 10}


def test_seeds_give_each_number_its_mean_and_spread(tmp_path):
    """`--seeds 2`: every run once per training seed, in seed-K/ folders; study.csv one row per run
    and seed, study.md the mean ± standard deviation over the seeds."""
    config = tmp_path / "central-only.yaml"
    config.write_text(yaml.safe_dump(dict(TINY, grid={"sites": []})))  # the central baseline alone: quick
    out = tmp_path / "study"
    assert main(["study", "--config", str(config), "--out", str(out), "--seeds", "2"]) == 0
    with open(out / "study.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], r["seed"]) for r in rows] == [("central", "0"), ("central", "1")]
    seeds = [json.loads((out / f"seed-{k}" / "central" / "config.json").read_text())["seed"] for k in (0, 1)]
    assert seeds == [0, 1]
    losses = [float(r["test_loss"]) for r in rows]
    assert losses[0] != losses[1]  # two draws, not one run twice
    import statistics

    line = next(line for line in (out / "study.md").read_text().splitlines() if line.startswith("| central"))
    assert f"{statistics.fmean(losses):.4f} ± {statistics.stdev(losses):.4f} (n=2)" in line
    assert "over 2 training seeds" in (out / "study.md").read_text()
