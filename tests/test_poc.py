"""Provisioned POC on free local ports: jobs submitted through the admin API and the admin console.

The POC (server + 2 hospital sites) starts once for the module and is stopped, and its workspace
removed, even when a test fails.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from conftest import running_poc

from cxrfl.cli import main
from cxrfl.poc import load_state, session, workspace_processes

JOB = ["--task", "classify", "--model", "cnn5", "--rounds", "2", "--image-size", "32", "--batch-size", "8"]


@pytest.fixture(scope="module")
def poc(tmp_path_factory):
    base = tmp_path_factory.mktemp("poc")
    with running_poc(base) as (state, data):
        yield {"state": state, "data": data, "workspace": Path(state["workspace"]), "base": base}


def test_sites_are_hospitals_with_their_own_data_config(poc):
    state = poc["state"]
    assert state["sites"] == ["st-mary-hospital", "city-general-hospital"]
    for i, site in enumerate(state["sites"]):
        config = json.loads((Path(state["kits"]) / site / "local" / "cxrfl_site.json").read_text())
        assert config["data_dir"] == str(poc["data"] / f"site-{i + 1}")
        assert (Path(state["kits"]) / site / "startup" / "client.crt").is_file()  # mutual TLS kit
    assert len(workspace_processes(poc["workspace"])) >= 3  # server + 2 sites running


def test_job_through_the_admin_api(poc, capsys):
    ws = str(poc["workspace"])
    assert main(["poc", "submit", "--data", str(poc["data"]), "--workspace", ws] + JOB) == 0
    job_id = capsys.readouterr().out.strip().splitlines()[-1]
    run = poc["base"] / "run"
    assert main(["poc", "wait", job_id, "--workspace", ws, "--out", str(run), "--timeout", "600"]) == 0
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["status"] == "FINISHED:COMPLETED" and 0 <= summary["test"]["test_auroc"] <= 1
    # no data path travelled in the job: the sites used their local configuration
    client = next((run / "download").rglob("config_fed_client.json")).read_text()
    assert "--data-root" not in client
    import torch

    from lightning_modules.classification import CXRClassifier

    state = torch.load(run / "models" / "global_best.pt", map_location="cpu", weights_only=False)["model"]
    CXRClassifier(model="cnn5", num_classes=2).load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
    matrix = json.loads((run / "cross_site.json").read_text())["matrix"]
    assert set(matrix["global_final"]) == {"st-mary-hospital", "city-general-hospital", "test"}
    rounds = (run / "metrics" / "round_metrics.jsonl").read_text().splitlines()
    assert len(rounds) == 2


def test_admin_console_commands_from_the_readme(poc):
    """submit_job, list_jobs and download_job typed into the admin console (fl_admin.sh)."""
    state = load_state(poc["workspace"])
    job_dir = poc["base"] / "console-job"
    assert main(["export", "--data", str(poc["data"]), "--out", str(job_dir)] + JOB) == 0
    console = Path(state["admin_kit"]) / "startup" / "fl_admin.sh"

    def type_into_console(*commands: str) -> str:
        out = subprocess.run(["bash", str(console)], input="\n".join(commands + ("bye",)) + "\n",
                             capture_output=True, text=True, timeout=120)
        return out.stdout + out.stderr

    out = type_into_console(f"submit_job {job_dir / 'cxrfl_classify'}")
    assert "Submitted job" in out or "job id" in out.lower(), out
    sess = session(state)
    try:
        job_id = next(j["job_id"] for j in sess.list_jobs() if j["job_name"] == "cxrfl_classify"
                      and "FINISHED" not in j["status"])
        deadline = time.time() + 600
        while "FINISHED" not in sess.get_job_meta(job_id)["status"] and time.time() < deadline:
            time.sleep(3)
    finally:
        sess.close()
    listing = type_into_console("list_jobs")
    assert job_id in listing and "FINISHED:COMPLETED" in listing
    type_into_console(f"download_job {job_id}")
    downloaded = Path(state["admin_kit"]) / "transfer" / job_id
    assert (downloaded / "workspace").is_dir(), list((Path(state["admin_kit"]) / "transfer").iterdir())
    assert list(downloaded.rglob("FL_global_model.pt"))
