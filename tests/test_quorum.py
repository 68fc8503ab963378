"""Issue 17, items 4 and 5: no silent quorum (a site that never contributed fails the run unless
--allow-missing-sites; sites that missed rounds are named) and server-side early stopping (--patience).

Round logs are written by hand and checked directly; one simulator run proves the early stop end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather

from app_custom.early_stopping import EARLY_STOP_FILE, EarlyStopping, Patience
from cxrfl.cli import build_parser
from cxrfl.fl.config import FLConfig
from cxrfl.fl.outcome import round_ranges, run_notes
from cxrfl.fl.results import RunFailed, check_contributions
from cxrfl.options import config_from_args
from cxrfl.report import write_report
from cxrfl.run_folder import RunFolder
from lightning_modules.data.phantom import generate_dataset

SITES = ("site-1", "site-2", "site-3")


def _round_log(run: Path, accepted: dict[str, list[int]], refused: dict[str, list[int]] | None = None) -> None:
    """round_log.jsonl as the server's RoundRecorder writes it: one line per site and round it sent in."""
    entries = [{"round": r, "site": s, "accepted": True} for s, rounds in accepted.items() for r in rounds]
    entries += [{"round": r, "site": s, "accepted": False} for s, rounds in (refused or {}).items() for r in rounds]
    log = run / "models" / "rounds" / "round_log.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("".join(json.dumps(e) + "\n" for e in sorted(entries, key=lambda e: e["round"])))


# ---- item 4: no silent quorum ---------------------------------------------------------------------
def test_a_site_that_never_contributed_fails_the_run_although_every_round_had_min_clients(tmp_path):
    cfg = FLConfig(sites=SITES, rounds=3, min_clients=2)
    _round_log(tmp_path, {"site-1": [0, 1, 2], "site-2": [0, 1, 2]})
    log = tmp_path / "site-3.log"
    log.write_text("2026 - ERROR - could not connect\nConnectionError: server localhost:8002 refused the connection\n")
    with pytest.raises(RunFailed, match=r"site-3 \(expected in round\(s\) 0-2\) never contributed an accepted update "
                                        r".*--allow-missing-sites.*site-3: ConnectionError: server localhost:8002"):
        check_contributions(cfg, tmp_path, {"site-3": [log]})
    failed = json.loads((tmp_path / "metrics.json").read_text())
    assert failed["status"] == "failed" and failed["short_rounds"] == {}
    assert failed["missing_sites"] == ["site-3"] and failed["sites_missing_rounds"] == {"site-3": [0, 1, 2]}
    assert failed["rounds_contributed"] == {"site-1": 3, "site-2": 3, "site-3": 0}
    assert run_notes(failed) == [f"FAILED: {failed['error']}"]

    # the opt-out completes the run, writes nothing itself and names the site
    (tmp_path / "metrics.json").unlink()
    facts = check_contributions(FLConfig(sites=SITES, rounds=3, min_clients=2, allow_missing_sites=True), tmp_path, {})
    assert not (tmp_path / "metrics.json").exists()
    assert facts["missing_sites"] == ["site-3"] and facts["rounds_run"] == 3
    assert run_notes(facts) == ["never contributed an accepted update (completed with --allow-missing-sites): site-3"]


def test_short_rounds_and_a_missing_site_are_named_together_and_the_opt_out_does_not_excuse_short_rounds(tmp_path):
    _round_log(tmp_path, {"site-1": [0, 1], "site-2": [0]}, refused={"site-3": [0, 1]})
    for allow in (False, True):
        with pytest.raises(RunFailed) as exc:
            check_contributions(FLConfig(sites=SITES, rounds=2, min_clients=2, allow_missing_sites=allow), tmp_path, {})
        message = str(exc.value)
        assert "1 of 2 rounds lacked the updates they need (round(s) 1; round 1: 1 of 2 accepted)" in message
        assert ("site-3 (expected in round(s) 0-1) never contributed" in message) != allow
        assert "site-2: no update accepted" in message and "site-3: no update accepted" in message


def test_a_site_that_dropped_out_completes_named_with_the_rounds_it_missed(tmp_path):
    cfg = FLConfig(sites=SITES, rounds=6, min_clients=2)
    _round_log(tmp_path, {"site-1": list(range(6)), "site-2": list(range(6)), "site-3": [0, 1, 3]},
               refused={"site-3": [2]})
    facts = check_contributions(cfg, tmp_path, {})
    assert not (tmp_path / "metrics.json").exists()
    assert facts == {"rounds_run": 6, "rounds_contributed": {"site-1": 6, "site-2": 6, "site-3": 3},
                     "sites_missing_rounds": {"site-3": [2, 4, 5]}, "missing_sites": []}
    assert run_notes(facts) == ["site-3 missed round(s) 2, 4-5 (3 of 6 contributed)"]


def test_rounds_a_site_is_scheduled_away_are_not_missing(tmp_path):
    cfg = FLConfig(sites=SITES, rounds=4, schedule={"site-3": "2-"})
    _round_log(tmp_path, {"site-1": [0, 1, 2, 3], "site-2": [0, 1, 2, 3], "site-3": [2, 3]})
    assert check_contributions(cfg, tmp_path, {})["sites_missing_rounds"] == {}
    _round_log(tmp_path, {"site-1": [0, 1, 2, 3], "site-2": [0, 1, 2, 3]})
    with pytest.raises(RunFailed, match=r"site-3 \(expected in round\(s\) 2-3\) never contributed"):
        check_contributions(FLConfig(sites=SITES, rounds=4, min_clients=2, schedule={"site-3": "2-"}), tmp_path, {})


def test_rounds_after_an_early_stop_are_not_short(tmp_path):
    cfg = FLConfig(sites=SITES[:2], rounds=5, patience=1)
    _round_log(tmp_path, {"site-1": [0, 1, 2], "site-2": [0, 1, 2]})
    (tmp_path / "models" / "rounds" / EARLY_STOP_FILE).write_text(json.dumps({"round": 2, "patience": 1, "best_round": 1}))
    facts = check_contributions(cfg, tmp_path, {})  # what metrics.json gets
    assert facts["rounds_run"] == 3 and facts["sites_missing_rounds"] == {} and facts["stopped_early"]["round"] == 2
    (tmp_path / "models" / "rounds" / EARLY_STOP_FILE).unlink()  # without the stop, rounds 3-4 had nobody
    with pytest.raises(RunFailed, match=r"2 of 5 rounds lacked the updates they need \(round\(s\) 3-4; round 3: 0 of 2"):
        check_contributions(cfg, tmp_path, {})


def test_round_ranges():
    assert round_ranges([5, 0, 1, 2, 7, 8]) == "0-2, 5, 7-8" and round_ranges([3]) == "3" and round_ranges([]) == ""


# ---- item 5: early stopping -------------------------------------------------------------------------
def test_patience_counts_rounds_since_the_best_validation():
    p = Patience(2)
    assert not p.should_stop(0) and not p.should_stop(7)  # no validation yet (round 0 carries none): never
    p.improved(1, 0.6)
    assert not p.should_stop(1) and not p.should_stop(2)
    p.improved(3, 0.7)  # an improvement resets the count
    assert not p.should_stop(4) and p.should_stop(5) and (p.best_round, p.best_metric) == (3, 0.7)
    with pytest.raises(ValueError):
        Patience(0)


class _Engine:
    def __init__(self, components: dict):
        self.components = components

    def get_component(self, name: str):
        return self.components.get(name)


def _event(component, event: str, ctx: FLContext, round_num: int | None = None, **props) -> None:
    if round_num is not None:
        ctx.set_prop(AppConstants.CURRENT_ROUND, round_num, private=True, sticky=True)
    for key, value in props.items():
        ctx.set_prop(key, value, private=True, sticky=False)
    component.handle_event(event, ctx)


def test_early_stopping_makes_scatter_and_gather_end_after_the_round_and_records_it(tmp_path):
    """The component as NVFlare drives it (events, the engine's components), without running NVFlare:
    the controller's round loop (`while current < start + num_rounds`) ends after the stopping round."""
    controller = ScatterAndGather(min_clients=2, num_rounds=6, start_round=1)
    stopper = EarlyStopping(patience=2, controller_id="sag", key_metric="val_auroc")
    ctx = FLContext()
    ctx.set_prop(ReservedKey.ENGINE, _Engine({"sag": controller}), private=True, sticky=True)
    ctx.set_prop(FLContextKey.APP_ROOT, str(tmp_path), private=True, sticky=True)
    (tmp_path / "rounds").mkdir()
    _event(stopper, EventType.START_RUN, ctx)
    _event(stopper, AppEventType.ROUND_DONE, ctx, 1)
    _event(stopper, AppEventType.GLOBAL_BEST_MODEL_AVAILABLE, ctx, 2, **{AppConstants.VALIDATION_RESULT: 0.8})
    for r in (2, 3):
        _event(stopper, AppEventType.ROUND_DONE, ctx, r)
        assert controller._start_round + controller._num_rounds == 7 and not (tmp_path / "rounds" / EARLY_STOP_FILE).exists()
    _event(stopper, AppEventType.ROUND_DONE, ctx, 4)
    assert controller._start_round + controller._num_rounds == 5  # round 4 is the loop's last
    record = json.loads((tmp_path / "rounds" / EARLY_STOP_FILE).read_text())
    assert record == {"round": 4, "patience": 2, "best_round": 2, "best_metric": 0.8, "key_metric": "val_auroc",
                      "rounds": 7}
    assert run_notes({"stopped_early": record}) == [
        "stopped early after round 4 of rounds 0-6: the sites' val_auroc had not improved for 2 round(s) "
        "(best: their validation in round 2, of round 1's global model)"]


def test_no_early_stop_in_the_last_round():
    controller = ScatterAndGather(min_clients=2, num_rounds=3)
    stopper = EarlyStopping(patience=1, controller_id="sag")
    ctx = FLContext()
    ctx.set_prop(ReservedKey.ENGINE, _Engine({"sag": controller}), private=True, sticky=True)
    _event(stopper, AppEventType.GLOBAL_BEST_MODEL_AVAILABLE, ctx, 1, **{AppConstants.VALIDATION_RESULT: 0.5})
    _event(stopper, AppEventType.ROUND_DONE, ctx, 2)  # the last round anyway: nothing recorded (no APP_ROOT needed)
    assert controller._num_rounds == 3


def test_options_reach_the_config_and_the_sites_do_not_stop_early(tmp_path):
    args = build_parser().parse_args(["sim", "--task", "classify", "--patience", "3", "--allow-missing-sites"])
    cfg = config_from_args(FLConfig, args)
    assert (cfg.patience, cfg.allow_missing_sites) == (3, True)
    assert cfg.site_config().patience == 0  # the server's, in rounds; never the sites' epochs
    defaults = config_from_args(FLConfig, build_parser().parse_args(["sim", "--task", "classify"]))
    assert (defaults.patience, defaults.allow_missing_sites) == (0, False)


def test_the_report_shows_a_failed_run_and_how_a_completed_one_went(tmp_path):
    cfg = FLConfig(task="classify", sites=SITES, rounds=4, model="cnn5", image_size=64, classes=("normal", "pneumonia"))
    failed, stopped = tmp_path / "failed", tmp_path / "stopped"
    for run in (failed, stopped):
        RunFolder.create(run, "sim", cfg)
    error = "site-3 (expected in round(s) 0-3) never contributed an accepted update; site-3: ConnectionError: refused"
    (failed / "metrics.json").write_text(json.dumps({"status": "failed", "error": error, "task": "classify"}))
    (stopped / "metrics.json").write_text(json.dumps({
        "task": "classify", "key_metric": "val_auroc", "test": {"test_auroc": 0.7}, "rounds": 4,
        "sites_missing_rounds": {"site-2": [2]}, "rounds_contributed": {"site-1": 3, "site-2": 2, "site-3": 3},
        "missing_sites": [], "stopped_early": {"round": 2, "patience": 1, "best_round": 1, "rounds": 4}}))
    html = write_report(tmp_path).read_text()
    assert "<section id='outcome'>" in html and "failed (see Run outcome)" in html
    assert "FAILED: site-3 (expected in round(s) 0-3) never contributed" in html
    assert "site-2 missed round(s) 2 (2 of 3 contributed)" in html and "stopped early after round 2" in html
    assert "3 of 4 rounds (stopped early) x 1 epochs" in html


# ---- end to end -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    generate_dataset(root, sites=2, per_site=16, test_size=12, size=32, seed=2)
    return root


@pytest.mark.e2e
def test_the_server_stops_a_simulated_job_whose_validation_does_not_improve(tiny_root, tmp_path, capsys):
    from flat_validation import flat_validation

    from cxrfl.fl.simulator import run_simulation
    from cxrfl.options import ready

    run = tmp_path / "run"
    run.mkdir()
    cfg = ready(FLConfig(task="classify", data_root=str(tiny_root), sites=("site-1", "site-2"), rounds=4, patience=1,
                         model="cnn5", image_size=32, batch_size=8))
    # every site reports the same validation metric: round 1's is the best, round 2 brings no improvement
    summary = run_simulation(cfg, run, extend_job=flat_validation("val_auroc", 0.5))
    assert summary["stopped_early"] == json.loads((run / "metrics.json").read_text())["stopped_early"]
    assert {k: summary["stopped_early"][k] for k in ("round", "patience", "best_round", "rounds")} == {
        "round": 2, "patience": 1, "best_round": 1, "rounds": 4}
    rounds = sorted(f.name for f in (run / "models" / "rounds").glob("global_round_*.pt"))
    assert rounds == ["global_round_000.pt", "global_round_001.pt", "global_round_002.pt"]
    assert summary["rounds_run"] == 3 and summary["sites_missing_rounds"] == {} and summary["missing_sites"] == []
    # the job went on to its cross-site evaluation (completed, not aborted) and the run was evaluated
    assert "global_final" in json.loads((run / "cross_site.json").read_text())["matrix"]
    assert (run / "models" / "global_best.pt").is_file() and "test_auroc" in summary["test"]
    assert "early stopping after round 2" in (run / "simulator.log").read_text()
    assert "stopped early after round 2 of rounds 0-3" in capsys.readouterr().out
