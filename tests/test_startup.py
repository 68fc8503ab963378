"""A site process's start-up and memory (docs/performance.md ("Site start-up and memory")): a plain site loads no optional heavy
package, it logs its age and memory at each stage, and the simulator caps glibc's malloc arenas."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

from app_custom.process_stats import memory_mib, process_age, stage_line

ROOT = Path(__file__).resolve().parents[1]
LINUX_PROC = Path("/proc/self/status").is_file()

# Loaded only by the jobs that use them: DP-SGD (Opacus, through lightning_modules.privacy), HE (TenSEAL,
# through app_custom.he_packing), --wandb (on the server). A plain site must not pay for them.
OPTIONAL = ("opacus", "tenseal", "wandb", "lightning_modules.privacy", "app_custom.he_packing")


def test_a_plain_site_process_loads_no_optional_heavy_package():
    probe = ("import sys\nimport app_custom.simulated_site\n"
             f"print(sorted(m for m in {OPTIONAL!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_memory_is_read_from_a_proc_status_file(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmHWM:\t  524288 kB\nVmRSS:\t  262144 kB\nRssAnon:\t  204800 kB\n"
                      "RssFile:\t   57344 kB\nThreads:\t4\n")
    assert memory_mib(status) == {"VmHWM": 512, "VmRSS": 256, "RssAnon": 200, "RssFile": 56}
    assert memory_mib(tmp_path / "absent") == {}  # not Linux: nothing, no error


@pytest.mark.skipif(not LINUX_PROC, reason="reads Linux's /proc")
def test_a_stage_line_gives_the_process_age_and_its_memory():
    line = stage_line("site process: set up")
    assert re.fullmatch(r"site process: set up: \d+\.\d s since process start, VmRSS \d+ MiB, VmHWM \d+ MiB "
                        r"\(anon \d+, file \d+\)", line), line
    mem = memory_mib()
    assert 0 < mem["VmRSS"] <= mem["VmHWM"] and mem["RssAnon"] + mem["RssFile"] <= mem["VmRSS"] + 1
    # a fresh process is seconds old, not the machine's uptime nor negative
    probe = "from app_custom.process_stats import process_age; print(process_age())"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert 0 <= float(result.stdout) < 30, result.stdout + result.stderr
    assert process_age() >= float(result.stdout)  # this test's process is older


def test_the_first_training_step_is_logged_once(caplog):
    from app_custom.cxrfl_client import LogFirstStep

    callback = LogFirstStep()
    with caplog.at_level(logging.INFO, logger="cxrfl_client"):
        for step in range(3):
            callback.on_train_batch_start(None, None, None, step)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["site process"]
    assert "first training step" in caplog.records[0].getMessage()


def test_the_simulator_caps_malloc_arenas_unless_the_user_set_them(synthetic_root, tmp_path, monkeypatch):
    from cxrfl.fl import simulator
    from cxrfl.fl.config import FLConfig
    from cxrfl.options import ready

    class Launched(Exception):
        pass

    def launch(command, log_path, env, cwd):
        raise Launched(env)

    monkeypatch.setattr(simulator, "_run_logged", launch)
    cfg = ready(FLConfig(task="classify", data_root=str(synthetic_root), sites=("site-1", "site-2"), rounds=1,
                         model="cnn5", image_size=32))
    for preset, expected in ((None, "2"), ("4", "4")):
        if preset is None:
            monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
        else:
            monkeypatch.setenv("MALLOC_ARENA_MAX", preset)
        run = tmp_path / f"run-{expected}"
        run.mkdir()
        with pytest.raises(Launched) as launched:
            simulator.run_simulation(cfg, run)
        assert launched.value.args[0]["MALLOC_ARENA_MAX"] == expected
