"""The run-folder contract: config.json {"kind", "version": 1, ...} written and read by RunFolder only;
first-release folders (two schemas, no kind) still load; anything else is a one-line error."""

from __future__ import annotations

import json

import pytest

from cxrfl.fl.config import FLConfig
from cxrfl.run_folder import RunFolder, RunFolderError
from lightning_modules.config import TrainConfig

# config.json files as the first release wrote them (copied from its run folders)
FIRST_CENTRAL = {
    "accelerator": "auto", "allow_leakage": False, "batch_size": 16, "class_weights": "balanced",
    "classes": ["normal", "pneumonia"], "command": "central", "data": "/data/pool", "deterministic": False,
    "epochs": 20, "image_size": 64, "limit": None, "lr": 0.001, "model": "cnn5", "num_train": 307, "num_val": 93,
    "out": "/runs/central", "patience": 0, "roi": "crop", "roi_threshold": 0.5, "seed": 0, "segmenter": "/m/best.ckpt",
    "skipped": [], "target_sensitivity": None, "task": "classify", "torch": "2.13.0+cpu", "verbose": False,
    "wandb": False, "workers": 0}
FIRST_FL = {
    "absent_weights": "keep", "accelerator": "auto", "aggregation": "fedavg", "batch_size": 16,
    "class_weights": "balanced", "classes": ["normal", "pneumonia"], "cross_site_eval": False,
    "data_root": "/data/3-sites", "deterministic": False, "dp": None, "dp_args": None, "global_model_eval": True,
    "he": False, "he_encrypt_layers": None, "image_size": 64, "initial_model": None, "limit": None,
    "local_epochs": 2, "lr": 0.001, "min_clients": None, "model": "cnn5", "record_contributions": False,
    "roi": "mask", "roi_threshold": 0.5, "rounds": 20, "schedule": {"site-2": "0-4,15-", "site-3": "8-"},
    "seed": 0, "segmenter": None, "server_lr": 1.0, "sites": ["site-1", "site-2", "site-3"], "start_round": 0,
    "target_sensitivity": None, "task": "classify", "time_budget": 0.0, "torch_threads": 2,
    "turn_lock": "/runs/x/site_turns.lock", "wait_after_min_clients": 0.0, "wandb": False, "wandb_project": "cxr-fl"}


def _folder(tmp_path, config: dict):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_every_kind_round_trips(tmp_path):
    central = TrainConfig(task="classify", roi="mask", model="cnn5", image_size=64, classes=["a", "b"])
    fl = FLConfig(task="roi", sites=["site-1", "site-2"], rounds=3, epochs=2, dp="percentile")
    for kind, cfg in [("central", central), ("sim", fl), ("poc", fl)]:
        RunFolder.create(tmp_path / kind, kind, cfg, facts={"num_train": 5})
        run = RunFolder.read(tmp_path / kind)
        assert (run.kind, run.config, run.facts) == (kind, cfg, {"num_train": 5})
        assert run.federated == (kind != "central") and not run.finished
        stored = json.loads((tmp_path / kind / "config.json").read_text())
        assert (stored["kind"], stored["version"]) == (kind, 1)
    RunFolder.create(tmp_path / "demo", "demo", settings={"preset": "quick", "seeds": [0]})
    demo = RunFolder.read(tmp_path / "demo")
    assert demo.config is None and demo.settings == {"preset": "quick", "seeds": [0]}


def test_first_release_central_and_federated_folders_still_load(tmp_path):
    central = RunFolder.read(_folder(tmp_path / "c", FIRST_CENTRAL))
    assert central.kind == "central" and not central.federated
    cfg = central.config
    assert (cfg.task, cfg.roi, cfg.data_root, cfg.epochs, cfg.segmenter) == ("classify", "crop", "/data/pool", 20,
                                                                           "/m/best.ckpt")
    assert central.facts == {"num_train": 307, "num_val": 93, "skipped": [], "torch": "2.13.0+cpu"}

    fl = RunFolder.read(_folder(tmp_path / "f", FIRST_FL))
    assert fl.kind == "sim" and fl.federated
    # the first release's FLConfig always said roi "mask"; only its task "roi" used it
    assert (fl.config.task, fl.config.roi, fl.config.epochs) == ("classify", None, 2)
    assert fl.config.schedule == {"site-2": "0-4,15-", "site-3": "8-"} and fl.config.sites == ("site-1", "site-2", "site-3")

    roi = RunFolder.read(_folder(tmp_path / "r", dict(FIRST_FL, task="roi", roi="crop", schedule=None, absent_weights="drop",
                                                      dp="svt", dp_args={"fraction": 0.2, "epsilon": 0.3,
                                                                         "noise_var": 0.1, "gamma": 1e-5})))
    assert (roi.config.task, roi.config.roi, roi.config.job_name) == ("classify", "crop", "cxrfl_roi")
    assert roi.config.dp_args == {"fraction": 0.2, "epsilon": 0.3, "noise_var": 0.1, "gamma": 1e-5}


@pytest.mark.parametrize("content,message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"rounds": 3}), "does not know"),
    (json.dumps(dict(FIRST_FL, mystery=1)), "unknown setting(s) mystery"),
    (json.dumps({"kind": "sim", "version": 2}), "version 2"),
    (json.dumps({"kind": "party", "version": 1}), "unknown run kind 'party'"),
    (json.dumps({"kind": "central", "version": 1, "task": "classify", "model": "unet"}), "not a classify network"),
])
def test_a_bad_config_json_is_a_one_line_error_naming_the_file(tmp_path, content, message):
    tmp_path.joinpath("config.json").write_text(content)
    with pytest.raises(RunFolderError) as error:
        RunFolder.read(tmp_path)
    assert message in str(error.value) and "config.json" in str(error.value)
    assert "\n" not in str(error.value)


def test_holding_finds_the_run_of_a_weights_file_and_refuses_a_stray_file(tmp_path):
    RunFolder.create(tmp_path / "run", "central", TrainConfig(task="segment"))
    weights = tmp_path / "run" / "checkpoints" / "best.ckpt"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"")
    assert RunFolder.holding(weights).path == tmp_path / "run"
    stray = tmp_path / "elsewhere" / "model.pt"
    stray.parent.mkdir()
    stray.write_bytes(b"")
    with pytest.raises(RunFolderError, match="no config.json next to it"):
        RunFolder.holding(stray)


def test_configs_are_frozen_and_validated_once():
    cfg = FLConfig(sites=["a", "b"])
    with pytest.raises(AttributeError):
        cfg.rounds = 9
    with pytest.raises(ValueError, match="--min-clients 3 is more than the 2 sites"):
        FLConfig(sites=["a", "b"], min_clients=3)
    assert FLConfig(task="roi").site_config() == TrainConfig(task="classify", roi="mask", epochs=1, rounds=5)
