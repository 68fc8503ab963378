"""A careless or hostile user's command lines: used run folders, arguments the network cannot take,
undefined metrics, runs in which no site contributed, paths that must not leave the machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cxrfl.cli import main
from cxrfl.fl.config import FLConfig
from cxrfl.fl.results import RunFailed, check_contributions
from lightning_modules.data.manifest import read_manifest, write_manifest
from lightning_modules.data.phantom import generate_dataset
from lightning_modules.networks import INPUT_SIDES, build_classifier, build_segmenter, input_size_problem

TINY = ["--model", "cnn5", "--image-size", "32", "--batch-size", "8"]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    generate_dataset(root, sites=2, per_site=16, test_size=12, size=32, seed=2)
    return root


# ---- item 3: a run folder holds one run --------------------------------------------------------
@pytest.mark.parametrize("command", [["central", "--task", "classify"], ["sim", "--task", "classify", "--rounds", "1"]])
def test_a_used_run_folder_is_refused_and_left_as_it_was(command, tiny_root, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text('{"task": "classify", "image_size": 64}')
    (run / "checkpoints" / "best.ckpt").write_bytes(b"earlier run")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(command + ["--data", str(tiny_root), "--out", str(run)] + TINY) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds files" in err[0] and "--resume" in err[0]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_default_run_folders_never_collide(tmp_path, monkeypatch):
    from cxrfl import runs

    monkeypatch.setattr(runs, "RUNS_DIR", tmp_path / "runs")
    first = runs.new_run_dir(None, "central")
    (first / "config.json").write_text("{}")
    second = runs.new_run_dir(None, "central")  # same second, same kind
    assert second != first and not any(second.iterdir())


def test_runs_started_in_the_same_second_claim_folders_of_their_own_before_writing_anything(tmp_path, monkeypatch):
    """Two processes used to both see the timestamped folder free (nothing written yet) and share it."""
    import datetime as dt
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from cxrfl import runs

    class FrozenClock(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 12, 5, 9, 44, 46)

    monkeypatch.setattr(runs, "RUNS_DIR", tmp_path / "runs")
    monkeypatch.setattr(runs, "_dt", SimpleNamespace(datetime=FrozenClock))  # runs' clock only, not the process's
    with ThreadPoolExecutor(4) as pool:
        folders = list(pool.map(lambda _: runs.new_run_dir(None, "sim"), range(4)))
    assert len(set(folders)) == 4 and all(f.is_dir() and not any(f.iterdir()) for f in folders)
    assert sorted(f.name for f in folders) == ["20261205-094446-sim", *(f"20261205-094446-sim-{n}" for n in (2, 3, 4))]
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setattr(runs, "RUNS_DIR", tmp_path / "a-file" / "runs")
    with pytest.raises(runs.RunDirError, match="a-file/runs: cannot create a run folder here"):
        runs.new_run_dir(None, "sim")
    assert (tmp_path / "a-file").read_text() == "not a folder"


# ---- item 10: training refuses a leaky data root unless told --------------------------------------
@pytest.mark.parametrize("command", [["central", "--task", "classify", "--epochs", "1"],
                                     ["sim", "--task", "classify", "--rounds", "1", "--no-cross-site-eval"]])
def test_training_refuses_a_test_image_that_is_also_a_training_image(command, tiny_root, tmp_path, capsys):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(tiny_root, root)
    test_image = root / "test" / read_manifest(root / "test" / "manifest.csv")[0].image
    train = next(r for r in read_manifest(root / "site-1" / "manifest.csv") if r.split == "train")
    shutil.copyfile(test_image, root / "site-1" / train.image)  # the same file, under another patient id
    run = tmp_path / "run"
    assert main(command + ["--data", str(root), "--out", str(run)] + TINY) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "leakage" in err[0] and "--allow-leakage" in err[0] and not run.exists()
    if command[0] == "central":  # the user who knows can still train
        assert main(command + ["--data", str(root), "--out", str(run), "--allow-leakage"] + TINY) == 0


# ---- item 6: arguments checked against the model and task before anything starts -------------
@pytest.mark.parametrize("argv,option", [
    (["central", "--task", "classify", "--image-size", "7"], "image-size"),
    (["central", "--task", "segment", "--image-size", "50"], "image-size"),
    (["central", "--task", "classify", "--lr", "inf"], "--lr"),
    (["central", "--task", "classify", "--lr", "nan"], "--lr"),
    (["central", "--task", "classify", "--workers", "-1"], "--workers"),
    (["central", "--task", "classify", "--limit", "-1"], "--limit"),
    (["central", "--task", "classify", "--limit", "0"], "--limit"),
    (["central", "--task", "classify", "--seed", "-3"], "--seed"),
    (["central", "--task", "classify", "--patience", "-1"], "--patience"),
    (["sim", "--task", "segment", "--image-size", "50"], "image-size"),
    (["sim", "--task", "classify", "--image-size", "7"], "image-size"),
    (["sim", "--task", "roi", "--roi-threshold", "1.5"], "--roi-threshold"),
    (["sim", "--task", "classify", "--time-budget", "nan"], "--time-budget"),
    (["sim", "--task", "classify", "--wait-after-min-clients", "-2"], "--wait-after-min-clients"),
    (["sim", "--task", "classify", "--wait-after-min-clients", "inf"], "--wait-after-min-clients"),
    (["sim", "--task", "classify", "--server-lr", "inf", "--aggregation", "fedadam"], "--server-lr"),
    (["sim", "--task", "classify", "--limit", "-1"], "--limit"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_an_argument_the_run_cannot_take_stops_it_at_once(argv, option, tiny_root, tmp_path, capsys):
    """One line naming the option and what is allowed, exit 2, no run folder."""
    run = tmp_path / "run"
    model = [] if "--task" in argv and argv[argv.index("--task") + 1] == "segment" else ["--model", "densenet121"]
    try:
        code = main(argv + model + ["--data", str(tiny_root), "--out", str(run)])
    except SystemExit as exc:  # argparse's own refusal
        code = exc.code
    assert code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert option in err[-1] and ("must" in err[-1] or "use " in err[-1]), err
    assert not run.exists()


@pytest.mark.parametrize("name", list(INPUT_SIDES))
def test_the_declared_input_sizes_are_the_ones_the_network_takes(name):
    """The rule is checked against the network itself: the smallest allowed side trains, one that
    breaks the rule is refused, and (where the network cannot take it) really fails."""
    smallest, multiple = INPUT_SIDES[name]
    net = build_segmenter(name) if name in ("unet", "flexunet-b4") else build_classifier(name, 2)
    net.train()
    for side in (smallest, smallest + multiple):
        assert input_size_problem(name, side) is None
        out = net(torch.rand(2, 1, side, side))
        assert out.shape[0] == 2 and (out.ndim == 2 or out.shape[-1] == side)
    assert input_size_problem(name, smallest - 1) is not None
    if multiple > 1:
        odd = smallest + multiple // 2 + 1
        assert input_size_problem(name, odd) is not None
        with pytest.raises(Exception):
            out = net(torch.rand(2, 1, odd, odd))
            assert out.shape[-1] == odd  # a network that returns another size does not fit either


# ---- item 7: an undefined metric is n/a, not a crash ---------------------------------------------
def _one_class_test_set(root: Path) -> None:
    manifest = root / "test" / "manifest.csv"
    write_manifest(manifest, [r for r in read_manifest(manifest) if r.label == "normal"])


def test_a_finished_run_with_an_undefined_metric_prints_na_and_exits_0(tiny_root, tmp_path, capsys):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(tiny_root, root)
    _one_class_test_set(root)
    run = tmp_path / "run"
    assert main(["central", "--task", "classify", "--epochs", "1", "--data", str(root), "--out", str(run)] + TINY) == 0
    out = capsys.readouterr().out
    assert "test_auroc: n/a (the test set holds only class 'normal')" in out
    metrics = json.loads((run / "metrics.json").read_text())  # strict JSON: null, not NaN
    assert metrics["test"]["test_auroc"] is None and metrics["test"]["test_acc"] is not None


@pytest.mark.e2e
def test_a_simulation_with_an_undefined_test_metric_prints_na_and_exits_0(tiny_root, tmp_path, capsys):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(tiny_root, root)
    _one_class_test_set(root)
    run = tmp_path / "run"
    assert main(["sim", "--task", "classify", "--rounds", "1", "--no-cross-site-eval", "--data", str(root),
                 "--out", str(run)] + TINY) == 0
    assert "test_auroc: n/a (the test set holds only class 'normal')" in capsys.readouterr().out
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["test"]["test_auroc"] is None and summary["test"]["test_loss"] is not None


# ---- item 9: a round needs its accepted updates ----------------------------------------------
def _round_log(run: Path, entries: list[dict]) -> None:
    log = run / "models" / "rounds" / "round_log.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("".join(json.dumps(e) + "\n" for e in entries))


def test_rounds_short_of_min_clients_fail_the_run_naming_each_site_and_its_error(tmp_path):
    cfg = FLConfig(sites=["site-1", "site-2", "site-3"], rounds=2)
    _round_log(tmp_path, [{"round": 0, "site": s, "accepted": True} for s in cfg.sites]
               + [{"round": 1, "site": "site-1", "accepted": True}, {"round": 1, "site": "site-2", "accepted": False}])
    log = tmp_path / "site-3.log"
    log.write_text("2026 - ERROR - Traceback (most recent call last):\n  File x\n"
                   "RuntimeError: CUDA out of memory\n")
    with pytest.raises(RunFailed, match=r"1 of 2 rounds .*round 1: 1 of 3 accepted.*site-3: RuntimeError: CUDA out of memory"):
        check_contributions(cfg, tmp_path, {"site-3": [log]})
    failed = json.loads((tmp_path / "metrics.json").read_text())
    assert failed["status"] == "failed" and failed["short_rounds"]["1"]["missing"] == ["site-2", "site-3"]
    assert "no update accepted" in failed["site_errors"]["site-2"]  # no log: says so, never blank
    # with --min-clients 1 the same rounds are enough, and nothing is written
    (tmp_path / "metrics.json").unlink()
    check_contributions(FLConfig(sites=cfg.sites, rounds=2, min_clients=1), tmp_path, {})
    assert not (tmp_path / "metrics.json").exists()


def test_a_site_scheduled_away_is_not_expected(tmp_path):
    cfg = FLConfig(sites=["site-1", "site-2"], rounds=2, schedule={"site-2": "0"})
    _round_log(tmp_path, [{"round": 0, "site": "site-1", "accepted": True},
                          {"round": 0, "site": "site-2", "accepted": True},
                          {"round": 1, "site": "site-1", "accepted": True},
                          {"round": 1, "site": "site-2", "accepted": False, "absent": True}])
    check_contributions(cfg, tmp_path, {})
    _round_log(tmp_path, [{"round": 0, "site": "site-1", "accepted": True}])  # round 1: nobody
    with pytest.raises(RunFailed):
        check_contributions(cfg, tmp_path, {})


@pytest.mark.e2e
def test_a_simulation_in_which_every_site_crashed_fails(tiny_root, tmp_path, capsys):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(tiny_root, root)
    for site in ("site-1", "site-2"):  # no usable training image anywhere
        for record in read_manifest(root / site / "manifest.csv"):
            (root / site / record.image).write_bytes(b"")
    run = tmp_path / "run"
    assert main(["sim", "--task", "classify", "--rounds", "1", "--no-cross-site-eval", "--data", str(root),
                 "--out", str(run)] + TINY) == 2
    err = capsys.readouterr().err
    assert "0 of 2 accepted" in err and "site-1: " in err and "no usable train images" in err
    failed = json.loads((run / "metrics.json").read_text())
    assert failed["status"] == "failed" and "test" not in failed
    assert set(failed["site_errors"]) == {"site-1", "site-2"}


# ---- item 12: no local path leaves the machine ----------------------------------------------------
def test_an_exported_job_carries_no_local_path(tiny_root, tmp_path):
    """docs/security.md: 'No image, path, patient id or file name travels in a job'."""
    segment = tmp_path / "seg"
    assert main(["central", "--task", "segment", "--epochs", "1", "--image-size", "32", "--batch-size", "8",
                 "--limit", "4", "--data", str(tiny_root), "--out", str(segment)]) == 0
    out = tmp_path / "export"
    assert main(["export", "--task", "roi", "--segmenter", str(segment / "checkpoints" / "best.ckpt"), "--data", str(tiny_root),
                 "--out", str(out)] + TINY) == 0
    job = out / "cxrfl_roi"
    assert (job / "app" / "custom" / "segmenter.pt").is_file()  # the segmenter travels as a file
    local = [str(tmp_path), str(tmp_path.resolve()), str(Path.home()), str(Path(__file__).resolve().parents[1])]
    for f in job.rglob("*"):
        if f.is_file():
            blob = f.read_bytes()
            assert not [p for p in local if p.encode() in blob], f
    assert "No image, path, patient id or file name travels in a job" in (
        Path(__file__).resolve().parents[1] / "docs" / "security.md").read_text()


def test_tracking_gets_the_configuration_without_paths():
    cfg = FLConfig(task="roi", data_root="/hospital/data", segmenter="/models/seg.pt", initial_model="/runs/r/x.pt")
    tracked = json.dumps(cfg.without_paths())
    assert "/" not in tracked.replace("/ ", "")  # no path of any kind
    assert cfg.without_paths()["image_size"] == cfg.image_size
