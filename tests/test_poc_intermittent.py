"""Real outages on a provisioned POC of three hospitals.

1. One site's processes are stopped (SIGSTOP, as a machine that sleeps or loses its network) and
   continued rounds later; another site's processes are killed mid-round. The job goes on with the
   others (min_clients) and finishes; the round log shows who counted in each round.
2. The killed site is started again and takes part in the next job (NVFlare 2.9 does not re-admit
   a restarted client into a running job: its job process is gone). In that job the server's job
   process is killed mid-run; `cxrfl poc submit --resume` continues it from the last completed round.
"""

from __future__ import annotations

import io
import json
import signal
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest
from conftest import running_poc, send_signal, sha256_of

from cxrfl.cli import main
from cxrfl.fl.poc import workspace_processes
from cxrfl.fl.poc_processes import read_process

JOB = ["--task", "classify", "--model", "cnn5", "--image-size", "32", "--batch-size", "8"]


@pytest.fixture(scope="module")
def poc3(tmp_path_factory):
    # a killed site is written off after 30 s without a heartbeat (sites send one every 10 s)
    with running_poc(tmp_path_factory.mktemp("poc3"), sites=3, heartbeat_timeout=30) as (state, data):
        yield state, data


def _server_log(state: dict, job_id: str) -> str:
    path = Path(state["kits"]) / "localhost" / job_id / "log.txt"
    return path.read_text(errors="replace") if path.is_file() else ""


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _submit(state: dict, data: Path, *options: str) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["poc", "submit", *JOB, "--data", str(data), "--workspace", state["workspace"], *options]) == 0
    return out.getvalue().strip().splitlines()[-1]


def _round_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "models" / "rounds" / "round_log.jsonl").read_text().splitlines()]


def test_a_site_that_drops_out_comes_back_and_one_that_dies_mid_round(poc3, tmp_path):
    state, data = poc3
    ws, kits = state["workspace"], Path(state["kits"])
    first, dead, away = state["sites"]
    job_id = _submit(state, data, "--rounds", "7", "--min-clients", "2", "--wait-after-min-clients", "4",
                     "--absent-weights", "keep")
    _wait_for(lambda: "Round 1 started." in _server_log(state, job_id), 300, "round 1")
    stopped = workspace_processes(kits / away)
    assert stopped, "the site's processes"
    send_signal(stopped, signal.SIGSTOP)
    try:
        _wait_for(lambda: "Round 3 started." in _server_log(state, job_id), 300, "round 3 without the site")
    finally:
        send_signal(stopped, signal.SIGCONT)
    _wait_for(lambda: "Round 4 started." in _server_log(state, job_id), 300, "round 4")
    send_signal(workspace_processes(kits / dead), signal.SIGKILL)  # its client and its job process
    run = tmp_path / "run"
    started = time.time()
    assert main(["poc", "wait", job_id, "--workspace", ws, "--out", str(run), "--timeout", "600"]) == 0
    assert time.time() - started < 480  # not NVFlare's default 10-minute wait for the dead site (busy machine: slack)
    assert f"Client {dead} is deemed disconnected" in (run / "download" / "workspace" / "log.txt").read_text()
    log = _round_log(run)
    fresh = {e["round"]: e["fresh"] for e in log if e.get("global_model")}
    kept = {e["round"]: e["kept"] for e in log if e.get("global_model")}
    assert sorted(fresh) == list(range(7))
    assert away in fresh[0] and dead in fresh[0] and first in fresh[0]  # all there at the start
    assert away not in fresh[2] and away in kept[2]  # away: counted with its last update (approach 2)
    assert any(away in fresh[r] for r in range(4, 7))  # back: fresh updates again
    assert dead not in fresh[5] and dead not in fresh[6]  # killed: the job went on without it
    assert all(len(fresh[r]) >= 2 for r in fresh)


def test_a_killed_site_rejoins_the_next_job_and_a_killed_server_job_resumes(poc3, tmp_path, capsys):
    state, data = poc3
    ws, kits = state["workspace"], Path(state["kits"])
    site = state["sites"][1]
    send_signal(workspace_processes(kits / site), signal.SIGKILL)  # dead, whether or not the test above ran
    _wait_for(lambda: workspace_processes(kits / site) == [], 120, "the site's processes to end")
    assert main(["poc", "restart", site, "--workspace", ws]) == 0

    job_id = _submit(state, data, "--rounds", "4", "--no-cross-site-eval")  # every site must take part
    _wait_for(lambda: "Round 2 started." in _server_log(state, job_id), 300, "round 2")
    server_job = [p for p in workspace_processes(kits / "localhost")
                  if (process := read_process(p)) and any(job_id in arg for arg in process.argv)]  # None: ended
    assert server_job, "the server's job process"
    send_signal(server_job, signal.SIGKILL)
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["poc", "wait", job_id, "--workspace", ws, "--out", str(run), "--timeout", "600"]) == 2
    assert f"cxrfl poc submit --resume {run}" in capsys.readouterr().err
    earlier = run / "download" / "workspace" / "app_server" / "rounds"
    done_before = {f.name: sha256_of(f) for f in earlier.glob("global_round_*.pt")}
    assert "global_round_001.pt" in done_before and "global_round_003.pt" not in done_before

    assert main(["poc", "submit", "--resume", str(run), "--workspace", ws]) == 0
    resumed = capsys.readouterr().out.strip().splitlines()[-1]
    assert resumed != job_id
    assert main(["poc", "wait", resumed, "--workspace", ws, "--timeout", "600"]) == 0  # --out: the run it continues
    models = run / "models" / "rounds"
    assert sorted(f.name for f in models.glob("global_round_*.pt")) == [f"global_round_00{i}.pt" for i in range(4)]
    for name, digest in done_before.items():  # completed before the kill: kept, not redone
        assert sha256_of(models / name) == digest
    accepted = sorted((e["round"], e["site"]) for e in _round_log(run) if e.get("accepted"))
    assert accepted == sorted((r, s) for r in range(4) for s in state["sites"])  # each once; the restarted site too
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["job_id"] == resumed and 0 <= summary["test"]["test_auroc"] <= 1
    assert json.loads((run / "config.json").read_text())["start_round"] == 0  # the run's own configuration
    assert (run / f"download-{job_id}").is_dir()  # the failed attempt's results are kept
