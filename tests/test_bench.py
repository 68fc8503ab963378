"""`cxrfl bench --quick`: every case runs at toy sizes and the table is written (the numbers at
these sizes mean nothing: the targets are for `cxrfl bench`, see docs/performance.md)."""

from __future__ import annotations

import json

import pytest

from bench.cases import QUICK, run_case
from cxrfl.cli import main

# Left out to keep the suite short (each is several simulator or POC runs; `cxrfl bench` runs them):
# he (its machinery is test_poc_he.py's), federation (`cxrfl central` vs `cxrfl sim --take-turns`,
# both run elsewhere in the suite) and scaling (its memory probe is tested below).
CASES = "loop,inference"


def test_quick_bench_writes_its_table(tmp_path):
    assert main(["bench", "--quick", "--reps", "1", "--cases", CASES, "--out", str(tmp_path)]) == 0
    results = json.loads(next(tmp_path.glob("*-quick.json")).read_text())
    table = next(tmp_path.glob("*-quick.md")).read_text()
    rows = results["rows"]
    assert len(rows) == 3 and results["quick"] and results["machine"]["cpus"] >= 1
    for r in rows:
        assert "error" not in r["detail"], r
        assert isinstance(r["measured"], float) and r["measured"] > 0, r
        assert isinstance(r["pass"], bool) and r["target"]
        assert f"| {r['case']} |" in table
    # a later run of some cases updates the day's table: the other cases' rows stay
    assert main(["bench", "--quick", "--reps", "1", "--cases", "inference", "--out", str(tmp_path)]) == 0
    again = json.loads(next(tmp_path.glob("*-quick.json")).read_text())["rows"]
    assert [r["group"] for r in again] == ["loop", "loop", "inference"]
    assert again[:2] == rows[:2] and again[2]["case"] == rows[2]["case"]


def test_tree_rss_sees_memory_of_child_processes():
    """The site-scaling case's probe: the peak of the summed RSS of a process and its children."""
    import subprocess
    import sys

    from bench.cases import TreeRss

    child = "import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.5)"
    parent = subprocess.Popen([sys.executable, "-c",
                               f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"])
    probe = TreeRss(parent.pid)
    probe.start()
    parent.wait()
    probe.stop()
    assert probe.peak_kib / 1024 > 300  # the grandchild's 300 MiB counted


def test_a_broken_case_is_a_row_not_a_crash(tmp_path, monkeypatch):
    import bench.cases as cases

    def broken(scale, work):
        raise RuntimeError("no such thing")

    monkeypatch.setitem(cases.CASES, "broken", broken)
    rows = run_case("broken", QUICK, tmp_path)
    assert rows[0]["pass"] is False and "no such thing" in rows[0]["detail"]["error"]


def test_unknown_case_is_refused():
    with pytest.raises(SystemExit):
        main(["bench", "--cases", "nope"])
