"""Provisioned POC on free local ports: jobs submitted through the admin API and the admin console.

The POC (server + 2 hospital sites) starts once for the module and is stopped, and its workspace
removed, even when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import running_poc

from cxrfl.cli import main
from cxrfl.fl.poc import load_state, session, workspace_processes

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
        assert config["torch_threads"] == max(1, (os.cpu_count() or 1) // 2)  # two sites share this machine's cores
        assert (Path(state["kits"]) / site / "startup" / "client.crt").is_file()  # mutual TLS kit
    assert len(workspace_processes(poc["workspace"])) >= 3  # server + 2 sites running


def _type_into_console(state: dict, *commands: str) -> str:
    """Commands typed into the project admin's console (fl_admin.sh), as the README shows."""
    console = Path(state["admin_kit"]) / "startup" / "fl_admin.sh"
    out = subprocess.run(["bash", str(console)], input="\n".join(commands + ("bye",)) + "\n",
                         capture_output=True, text=True, timeout=300)
    return out.stdout + out.stderr


def test_job_through_the_admin_api_then_the_console(poc, capsys):
    """`cxrfl poc submit` / `poc wait` (admin API), then list_jobs and download_job typed into the
    admin console for the same job."""
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
    for site in poc["state"]["sites"]:  # each site trained with its share of the cores, from its own local config
        site_log = (Path(poc["state"]["kits"]) / site / job_id / "log.txt").read_text()
        assert f"{max(1, (os.cpu_count() or 1) // 2)} torch threads" in site_log
    import torch

    from lightning_modules.classification import CXRClassifier

    weights = torch.load(run / "models" / "global_best.pt", map_location="cpu", weights_only=False)["model"]
    CXRClassifier(model="cnn5", num_classes=2).load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()})
    matrix = json.loads((run / "cross_site.json").read_text())["matrix"]
    assert set(matrix["global_final"]) == {"st-mary-hospital", "city-general-hospital", "test"}
    rounds = (run / "metrics" / "round_metrics.jsonl").read_text().splitlines()
    assert len(rounds) == 2

    state = load_state(poc["workspace"])
    listing = _type_into_console(state, "list_jobs")
    assert job_id in listing and "FINISHED:COMPLETED" in listing
    _type_into_console(state, f"download_job {job_id}")
    downloaded = Path(state["admin_kit"]) / "transfer" / job_id
    assert (downloaded / "workspace").is_dir(), list((Path(state["admin_kit"]) / "transfer").iterdir())
    assert list(downloaded.rglob("FL_global_model.pt"))


def test_a_job_in_which_no_site_could_train_fails_naming_each_site(poc, capsys):
    """`poc wait` judges a job by its accepted updates, not NVFlare's FINISHED:COMPLETED: with
    every site's data folder gone, it fails with each site's own error from its log."""
    state = load_state(poc["workspace"])
    configs = [Path(state["kits"]) / site / "local" / "cxrfl_site.json" for site in state["sites"]]
    saved = [c.read_text() for c in configs]
    ws = str(poc["workspace"])
    try:
        for config in configs:
            config.write_text(json.dumps({"data_dir": str(poc["base"] / "gone")}))
        assert main(["poc", "submit", "--data", str(poc["data"]), "--workspace", ws, "--rounds", "1",
                     "--no-cross-site-eval"] + JOB[:4] + JOB[6:]) == 0
        job_id = capsys.readouterr().out.strip().splitlines()[-1]
        run = poc["base"] / "failed-run"
        assert main(["poc", "wait", job_id, "--workspace", ws, "--out", str(run), "--timeout", "600"]) == 2
    finally:
        for config, text in zip(configs, saved):
            config.write_text(text)
    err = capsys.readouterr().err
    assert "0 of 2 accepted" in err and "no data for this site" in err, err
    failed = json.loads((run / "metrics.json").read_text())
    assert failed["status"] == "failed" and set(failed["site_errors"]) == set(state["sites"])


def test_a_member_admin_may_look_but_not_submit_or_abort(poc):
    """NVFlare's authorization policy with the project file's roles: the auditor (role member) can
    list jobs but neither submit nor abort one; the project admin can do both (submitting with
    submit_job typed into the admin console, as the README shows)."""
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    state = load_state(poc["workspace"])
    job_dir = poc["base"] / "authz-job"
    assert main(["export", "--data", str(poc["data"]), "--out", str(job_dir), "--rounds", "50"] + JOB[:4] + JOB[6:]) == 0
    auditor = new_secure_session("auditor@cxr-fl.org", str(Path(state["kits"]) / "auditor@cxr-fl.org"), timeout=30)
    admin = session(state)
    try:
        auditor.list_jobs()  # looking is allowed
        with pytest.raises(Exception, match="(?i)not authorized|authoriz"):
            auditor.submit_job(str(job_dir / "cxrfl_classify"))
        out = _type_into_console(state, f"submit_job {job_dir / 'cxrfl_classify'}")
        assert "Submitted job" in out or "job id" in out.lower(), out
        job_id = next(j["job_id"] for j in admin.list_jobs() if j["job_name"] == "cxrfl_classify"
                      and "FINISHED" not in j["status"])
        with pytest.raises(Exception, match="(?i)not authorized|authoriz"):
            auditor.abort_job(job_id)
        admin.abort_job(job_id)
        # generous: a busy machine stops the job's processes slowly. An abort that reaches a job
        # still being dispatched to its sites can be overtaken by its start: ask again while it runs.
        deadline, ask_again = time.time() + 300, time.time() + 30
        while "FINISHED" not in admin.get_job_meta(job_id)["status"] and time.time() < deadline:
            if time.time() > ask_again:
                with contextlib.suppress(Exception):  # it may have ended since the status was read
                    admin.abort_job(job_id)
                ask_again = time.time() + 30
            time.sleep(2)
        assert admin.get_job_meta(job_id)["status"] == "FINISHED:ABORTED"
    finally:
        auditor.close()
        admin.close()


@pytest.mark.e2e
def test_federated_statistics_on_the_running_poc(poc, capsys):
    """`cxrfl stats --poc`: NVFlare's statistics job submitted through the admin API to the POC's hospitals,
    each reading its own data from its kit's local configuration; counts as their manifests hold them."""
    from collections import Counter

    from cxrfl.run_folder import RunFolder
    from lightning_modules.data.manifest import read_manifest

    state, run = poc["state"], poc["base"] / "stats-run"
    assert main(["stats", "--poc", str(poc["workspace"]), "--out", str(run), "--min-count", "5", "--bins", "4",
                 "--max-bins-percent", "50"]) == 0
    summary = json.loads((run / "stats.json").read_text())
    assert summary["sites"] == state["sites"]
    for i, site in enumerate(state["sites"]):
        labels = Counter(r.label for r in read_manifest(poc["data"] / f"site-{i + 1}" / "manifest.csv"))
        assert summary["features"]["label=pneumonia"]["sites"][site]["sum"] == labels["pneumonia"]
        assert len(summary["features"]["image:intensity"]["sites"][site]["histogram"]) == 4
    assert RunFolder.read(run).settings["mode"] == "poc" and (run / "report" / "report.html").is_file()
