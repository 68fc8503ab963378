"""What a job carries: production jobs (`cxrfl export`, POC submit, jobs/*/job.py --export-dir) hold the
client and its settings as data, never the simulator's site script or a test's fault drill; the
simulator's job holds those (no simulator run here: the jobs are only exported)."""

from __future__ import annotations

import json

import pytest

from app_custom.site_files import SIMULATION_CONFIG, SITE_CONFIG
from cxrfl.fl import settings
from cxrfl.fl.config import FLConfig
from cxrfl.fl.job import write_simulator_site_config
from cxrfl.fl.simulator import export_job
from fault_drill import nan_update
from lightning_modules.config import TRAIN_CONFIG_FILE, ConfigError, TrainConfig

CFG = FLConfig(task="classify", data_root="/hospital/data", sites=("site-1", "site-2"), rounds=2, model="cnn5",
               classes=("normal", "pneumonia"), image_size=32)


def _custom_files(job) -> set[str]:
    custom = job / "app" / "custom"
    return {str(p.relative_to(custom)) for p in custom.rglob("*") if p.is_file()}


def _client_config(job) -> str:
    return (job / "app" / "config" / "config_fed_client.json").read_text()


def test_a_production_job_holds_the_client_and_its_settings_but_no_simulation_or_drill(tmp_path):
    job = export_job(CFG, tmp_path)
    files = _custom_files(job)
    assert {"app_custom/cxrfl_client.py", TRAIN_CONFIG_FILE, "lightning_modules/config.py"} <= files
    assert "app_custom/simulated_site.py" not in files and "fault_drill.py" not in files
    client = _client_config(job)
    assert "simulated_site" not in client and "NaNUpdate" not in client and "fault_drill" not in client
    executor = json.loads(client)["executors"][0]["executor"]["args"]
    assert executor["task_script_path"] == "app_custom/cxrfl_client.py"
    assert TrainConfig.read_json(job / "app" / "custom" / TRAIN_CONFIG_FILE) == CFG.site_config()


def test_the_simulator_job_runs_the_simulated_site_and_a_test_can_add_its_drill(tmp_path):
    job = export_job(CFG, tmp_path, simulated=True, extend=nan_update("site-2", 1))
    files = _custom_files(job)
    assert {"app_custom/simulated_site.py", "app_custom/cxrfl_client.py", "app_custom/availability.py",
            "fault_drill.py"} <= files
    client = json.loads(_client_config(job))
    assert client["executors"][0]["executor"]["args"]["task_script_path"] == "app_custom/simulated_site.py"
    drills = [f for group in client["task_result_filters"] for f in group["filters"]
              if f["path"] == "fault_drill.NaNUpdate"]
    assert drills == [{"path": "fault_drill.NaNUpdate", "args": {"site": "site-2", "round_num": 1}}]


def test_a_schedule_is_refused_outside_the_simulator(tmp_path):
    scheduled = FLConfig(**{**CFG.as_dict(), "schedule": {"site-2": "0"}})
    with pytest.raises(ConfigError, match="simulator"):
        export_job(scheduled, tmp_path / "prod")
    export_job(scheduled, tmp_path / "sim", simulated=True)


def test_simulator_settings_travel_as_site_local_data(tmp_path):
    scheduled = FLConfig(**{**CFG.as_dict(), "schedule": {"site-2": "0"}})
    write_simulator_site_config(tmp_path, scheduled, turn_lock=tmp_path / "turns.lock", torch_threads=3)
    # the threads where a production site keeps them, read and checked by the same code
    assert json.loads((tmp_path / SITE_CONFIG).read_text()) == {"data_root": "/hospital/data", "torch_threads": 3}
    assert json.loads((tmp_path / SIMULATION_CONFIG).read_text()) == {
        "turn_lock": str(tmp_path / "turns.lock"), "schedule": {"site-2": "0"}, "rounds": 2}
    write_simulator_site_config(tmp_path, CFG)  # 0 threads: torch's default, so no setting at all
    assert json.loads((tmp_path / SITE_CONFIG).read_text()) == {"data_root": "/hospital/data"}


def test_nvflare_timings_come_from_the_named_settings(tmp_path):
    job = export_job(CFG, tmp_path)
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    assert server["server"]["task_request_interval"] == settings.TASK_REQUEST_INTERVAL
    assert server["dead_client_grace_period"] == settings.DEAD_CLIENT_GRACE_PERIOD
    assert server["dead_client_check_lead_time"] == settings.DEAD_CLIENT_CHECK_LEAD_TIME


def test_a_simulated_site_sits_out_the_rounds_its_schedule_leaves_out():
    from types import SimpleNamespace

    from app_custom.simulated_site import simulated_hooks

    hooks = simulated_hooks({"schedule": {"site-2": "0,2-"}, "rounds": 4})
    # a resumed job's server counts only the rounds left: the open range runs to the job's last round
    received = [SimpleNamespace(current_round=r, total_rounds=2) for r in range(4)]
    assert [hooks.away("site-2", m) for m in received] == [False, True, False, False]
    assert not any(hooks.away("site-1", m) for m in received)


def test_a_sites_torch_threads_setting_is_checked_and_named_with_its_file(tmp_path):
    from app_custom.site_files import SiteConfigError, site_torch_threads

    path = tmp_path / SITE_CONFIG
    assert site_torch_threads(path, {"data_dir": "/d"}) is None  # not set: torch's default, every core
    assert site_torch_threads(path, {"data_dir": "/d", "torch_threads": 3}) == 3
    for wrong in (0, -2, 1.5, "4", True):
        with pytest.raises(SiteConfigError, match=rf"{path}: torch_threads must be a whole number >= 1, got {wrong!r}"):
            site_torch_threads(path, {"torch_threads": wrong})
