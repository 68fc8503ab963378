"""The simulator killed mid-run (every process, at once) and `cxrfl sim --resume RUN`: the job
continues from the last completed round with its own configuration; the completed rounds' models
are kept byte for byte, at most the interrupted round is redone, and no contribution is counted
twice in the round log."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import send_signal, sha256_of

from cxrfl.cli import main
from cxrfl.fl.poc import workspace_processes
from lightning_modules.data.phantom import generate_dataset


def test_a_killed_simulation_resumes_from_its_last_completed_round(tmp_path, capsys):
    data = tmp_path / "data"
    generate_dataset(data, sites=2, per_site=16, test_size=8, size=32, seed=5)
    run = tmp_path / "run"
    rounds = run / "workspace" / "server" / "simulate_job" / "app_server" / "rounds"
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cxrfl", "sim", "--task", "classify", "--data", str(data),
                                 "--rounds", "4", "--model", "cnn5", "--image-size", "32", "--batch-size", "8",
                                 "--no-cross-site-eval", "--out", str(run)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (rounds / "global_round_001.pt").is_file():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.2)
    finally:
        # every process at once: `cxrfl sim` and its group, and the simulator's processes, whose site
        # workers run in sessions of their own (a process group kill alone would miss them)
        simulator = workspace_processes(run)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        send_signal(simulator, signal.SIGKILL)
        proc.wait(timeout=60)
    config = (run / "config.json").read_text()
    done_before = {f.name: sha256_of(f) for f in rounds.glob("global_round_*.pt")}
    assert "global_round_003.pt" not in done_before and not (run / "metrics.json").exists()

    capsys.readouterr()
    assert main(["sim", "--resume", str(run)]) == 0
    assert "resuming run at round" in capsys.readouterr().out
    models = run / "models" / "rounds"
    assert sorted(f.name for f in models.glob("global_round_*.pt")) == [f"global_round_00{i}.pt" for i in range(4)]
    for name, digest in done_before.items():
        assert sha256_of(models / name) == digest  # completed rounds are not redone
    log = [json.loads(line) for line in (models / "round_log.jsonl").read_text().splitlines()]
    accepted = [(e["round"], e["site"]) for e in log if e.get("accepted")]
    assert sorted(accepted) == [(r, s) for r in range(4) for s in ("site-1", "site-2")]  # each once
    assert (run / "config.json").read_text() == config  # the run's own configuration
    summary = json.loads((run / "metrics.json").read_text())
    assert 0 <= summary["test"]["test_auroc"] <= 1
    assert main(["sim", "--resume", str(run)]) == 2  # finished: nothing to resume


def _run_folder(tmp_path: Path, **changes) -> Path:
    from cxrfl.fl.config import FLConfig
    from lightning_modules.data.atomic import write_json

    run = tmp_path / "run"
    cfg = FLConfig(task="classify", model="cnn5", sites=["site-1", "site-2"], rounds=3, data_root=str(tmp_path))
    write_json(run / "config.json", {**cfg.as_dict(), **changes})
    return run


def test_resume_refuses_what_it_cannot_continue_and_says_why(tmp_path, capsys):
    assert main(["sim", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "no config.json" in capsys.readouterr().err
    run = _run_folder(tmp_path, he=True, cross_site_eval=False)
    assert main(["sim", "--resume", str(run)]) == 2
    assert "HE run cannot be resumed" in capsys.readouterr().err


def test_poc_resume_names_the_missing_pieces(tmp_path, capsys):
    from cxrfl.fl.poc import STATE_FILE
    from lightning_modules.data.atomic import write_json

    workspace = tmp_path / "ws"
    assert main(["poc", "submit", "--resume", str(tmp_path / "run"), "--workspace", str(workspace)]) == 2
    assert "no POC here" in capsys.readouterr().err
    write_json(workspace / STATE_FILE, {"workspace": str(workspace), "sites": ["st-mary-hospital"], "kits": "",
                                        "data_root": str(tmp_path)})
    run = _run_folder(tmp_path)
    assert main(["poc", "submit", "--resume", str(run), "--workspace", str(workspace)]) == 2
    assert "['site-1', 'site-2'] are not in this POC" in capsys.readouterr().err
