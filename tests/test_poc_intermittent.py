"""A real outage on a provisioned POC: one hospital's client processes are stopped (SIGSTOP, as a
machine that sleeps or loses its network) during a run and continued (SIGCONT) rounds later. The
job goes on with the others (min_clients), finishes, and the returning site takes part again;
the round log shows who counted in each round.

(NVFlare 2.9 does not re-admit a client that was killed and restarted into a job that is already
running: its job process is gone. An outage the site recovers from is what can come back.)"""

from __future__ import annotations

import io
import json
import os
import signal
import time
from contextlib import redirect_stdout
from pathlib import Path

from conftest import running_poc

from cxrfl.cli import main
from cxrfl.poc import workspace_processes


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


def test_a_site_that_drops_out_and_comes_back(tmp_path):
    with running_poc(tmp_path, sites=3) as (state, data):
        ws = state["workspace"]
        away = state["sites"][2]
        out = io.StringIO()
        with redirect_stdout(out):
            assert main(["poc", "submit", "--task", "classify", "--model", "cnn5", "--rounds", "7", "--image-size", "32",
                         "--batch-size", "8", "--data", str(data), "--workspace", ws, "--min-clients", "2",
                         "--wait-after-min-clients", "4", "--absent-weights", "keep"]) == 0
        job_id = out.getvalue().strip().splitlines()[-1]
        _wait_for(lambda: "Round 1 started." in _server_log(state, job_id), 300, "round 1")
        site_pids = workspace_processes(Path(state["kits"]) / away)
        assert site_pids, "the site's processes"
        for pid in site_pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            _wait_for(lambda: "Round 3 started." in _server_log(state, job_id), 300, "round 3 without the site")
        finally:
            for pid in site_pids:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        run = tmp_path / "run"
        assert main(["poc", "wait", job_id, "--workspace", ws, "--out", str(run), "--timeout", "600"]) == 0
    log = [json.loads(line) for line in (run / "models" / "rounds" / "round_log.jsonl").read_text().splitlines()]
    fresh = {e["round"]: e["fresh"] for e in log if e.get("global_model")}
    kept = {e["round"]: e["kept"] for e in log if e.get("global_model")}
    assert sorted(fresh) == list(range(7))
    assert away in fresh[0]  # there at the start
    assert away not in fresh[2] and away in kept[2]  # away: counted with its last update (approach 2)
    assert any(away in fresh[r] for r in range(4, 7))  # back: fresh updates again
    assert all(len(fresh[r]) >= 2 for r in fresh)
