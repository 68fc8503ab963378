"""`cxrfl poc down` stops exactly the POC's processes and removes only what `poc up` created.

No POC runs here: the workspaces are real NVFlare kits (`poc_prepare`, nothing started) and the
"POC processes" are stand-ins with NVFlare's own command lines (a stand-in `nvflare` package on
PYTHONPATH whose server/client/job modules only sleep, and the kit's startup script replaced by a
sleep loop), beside decoys that merely mention the workspace. Every process started here is
killed at the end of its test, pass or fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cxrfl.cli import main
from cxrfl.fl.poc import PocError, poc_down, poc_prepare, workspace_processes
from cxrfl.fl.poc_processes import read_process
from lightning_modules.data.phantom import generate_dataset

REPO = Path(__file__).resolve().parents[1]
NVFLARE_STOP_FAILURE = ("`nvflare poc stop` failed (1): server did not stop within 30.0 seconds; "
                        "last error: Communication Error")

STAND_IN = """\
import json, os, signal, sys, time
if os.environ.get("STAND_IN_IGNORES_SIGTERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
report = os.environ.get("STAND_IN_REPORT")
if report:  # list the workspace's processes from inside it, as a POC process calling `poc down` would
    from cxrfl.fl.poc_processes import workspace_process_list
    listed = [p.pid for p in workspace_process_list(os.environ["STAND_IN_WORKSPACE"])]
    with open(report + ".tmp", "w") as f:
        json.dump({"me": os.getpid(), "parent": os.getppid(), "listed": listed}, f)
    os.replace(report + ".tmp", report)
time.sleep(600)
"""
MODULES = ["server.server_train", "server.runner_process", "client.client_train", "client.worker_process"]


@pytest.fixture(scope="module")
def stand_in_path(tmp_path_factory) -> str:
    """PYTHONPATH under which `python -m nvflare.private.fed.app.…` runs a sleeping stand-in, and
    `python -m userwatch` a tool of the user's that is no part of NVFlare."""
    root = tmp_path_factory.mktemp("stand-in")
    app = root / "nvflare" / "private" / "fed" / "app"
    for package in [root / "nvflare", root / "nvflare" / "private", app.parent, app, app / "server", app / "client"]:
        package.mkdir(parents=True, exist_ok=True)
        (package / "__init__.py").write_text("")
    for module in MODULES:
        (app / f"{module.replace('.', '/')}.py").write_text(STAND_IN)
    (root / "userwatch.py").write_text(STAND_IN)
    return os.pathsep.join([str(root), str(REPO)])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    generate_dataset(root, sites=2, per_site=4, test_size=2, size=32, seed=3)
    return root


@pytest.fixture
def prepared(tmp_path, data, monkeypatch):
    """A provisioned, never started POC workspace (real kits and state file)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # nvflare registers admin kits under ~/.nvflare
    return poc_prepare(tmp_path / "ws", 2, data)


class Spawned:
    """Processes started by a test, each in a session of its own; all killed by close()."""

    def __init__(self, stand_in_path: str):
        self.env = dict(os.environ, PYTHONPATH=stand_in_path)
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list, cwd: Path | None = None, **env: str) -> subprocess.Popen:
        proc = subprocess.Popen([str(a) for a in argv], cwd=cwd, env={**self.env, **env}, start_new_session=True,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def nvflare(self, module: str, kit: Path, *args, **env: str) -> subprocess.Popen:
        """A stand-in with the command line NVFlare starts `module` with for the kit `kit`."""
        return self.start([sys.executable, "-u", "-m", f"nvflare.private.fed.app.{module}", "-m", kit, *args],
                          cwd=kit, **env)

    def kit_script(self, kit: Path, body: str = "while true; do sleep 1; done\n", **env: str) -> subprocess.Popen:
        """The kit's startup/sub_start.sh, run as `nvflare poc start` runs it, doing `body`."""
        script = kit / "startup" / "sub_start.sh"
        script.write_text(body)
        return self.start(["bash", script], cwd=kit, **env)

    def close(self) -> None:
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait(timeout=60)


@pytest.fixture
def spawned(stand_in_path):
    procs = Spawned(stand_in_path)
    try:
        yield procs
    finally:
        procs.close()


def _ended(proc: subprocess.Popen, timeout: float = 60) -> int:
    """The exit status of a process that must end within `timeout` seconds."""
    return proc.wait(timeout=timeout)


def _stand_ins(spawned: Spawned, state: dict) -> list[subprocess.Popen]:
    kits, site = Path(state["kits"]), state["sites"][0]
    return [spawned.kit_script(kits / "localhost"),
            spawned.nvflare("server.server_train", kits / "localhost", "-s", "fed_server.json", "--set",
                            "secure_train=true", "org=coordinator", "config_folder=config"),
            spawned.nvflare("client.client_train", kits / site, "-s", "fed_client.json", "--set",
                            "secure_train=true", f"uid={site}", "config_folder=config"),
            # a job process that ignores SIGTERM: stopped with SIGKILL after the grace period
            spawned.nvflare("client.worker_process", kits / site, "-n", "job-1", "-c", site, "-w",
                            kits / site / "startup", STAND_IN_IGNORES_SIGTERM="1")]


def _decoys(spawned: Spawned, workspace: Path) -> list[subprocess.Popen]:
    """Processes that mention the workspace (or a sibling whose name starts with its name) without
    being NVFlare processes of it."""
    log = workspace / "cxr_fl" / "prod_00" / "localhost" / "log.txt"
    log.touch()
    sibling = workspace.parent / f"{workspace.name}-2" / "cxr_fl" / "prod_00" / "localhost"
    sibling.mkdir(parents=True)
    return [spawned.start(["tail", "-f", log]),  # a user following the server's log
            spawned.start(["bash", "-c", "sleep 600; true", "wrapper", workspace]),
            spawned.start([sys.executable, "-c", "import time; time.sleep(600)", workspace / "jobs"]),
            spawned.start([sys.executable, "-m", "userwatch", "--folder", workspace]),
            spawned.nvflare("server.server_train", sibling, "-s", "fed_server.json")]  # another POC's server


def _wait_until_it_ignores_sigterm(proc: subprocess.Popen, timeout: float = 120) -> None:
    """A stand-in's interpreter starts slowly on a busy machine: signal it only once its SIGTERM
    handler is in place (the kernel's ignored-signal mask says so)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        ignored = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:")), 16)
        if ignored & (1 << (signal.SIGTERM - 1)):
            return
        time.sleep(0.1)
    raise AssertionError(f"stand-in {proc.pid} never ignored SIGTERM")


def _descends_from(pid: int, ancestors: set[int]) -> bool:
    while pid > 1:
        if pid in ancestors:
            return True
        process = read_process(pid)
        if process is None:
            return False
        pid = process.ppid
    return False


def test_down_stops_exactly_the_poc_processes_even_when_nvflares_stop_fails(prepared, spawned, monkeypatch):
    workspace = Path(prepared["workspace"])
    stand_ins = _stand_ins(spawned, prepared)
    decoys = _decoys(spawned, workspace)
    _wait_until_it_ignores_sigterm(stand_ins[-1])
    listed = workspace_processes(workspace)
    ours = {p.pid for p in stand_ins}
    assert ours <= set(listed)
    assert not {p.pid for p in decoys} & set(listed)
    assert all(_descends_from(pid, ours) for pid in listed if read_process(pid))  # the kit script's `sleep`s

    calls = []

    def nvflare_stop_fails(args, workspace, timeout):
        calls.append(args)
        if args[:2] == ["poc", "stop"]:
            raise PocError(NVFLARE_STOP_FAILURE)
        raise AssertionError(f"unexpected nvflare call {args}")

    monkeypatch.setattr("cxrfl.fl.poc._nvflare", nvflare_stop_fails)
    started = time.monotonic()
    notes = poc_down(workspace)  # never raises for a slow or failed shutdown
    assert calls == [["poc", "stop"]]
    assert len(notes) == 1 and "\n" not in notes[0]
    assert "Communication Error" in notes[0] and re.search(r"stopped the POC's \d+ processes directly", notes[0])
    assert [_ended(p) for p in stand_ins][-1] == -signal.SIGKILL  # the one that ignored SIGTERM
    assert workspace_processes(workspace) == []
    assert all(p.poll() is None for p in decoys)  # not one decoy touched
    assert time.monotonic() - started < 60


def test_a_wrapper_around_down_survives_it(prepared, tmp_path):
    """`timeout … bash -c "cxrfl poc down …"`: the wrappers name the workspace too, and stay up."""
    workspace = Path(prepared["workspace"])
    cxrfl = Path(sys.executable).parent / "cxrfl"
    command = f"'{cxrfl}' poc down --workspace '{workspace}'; echo wrapper still here"
    out = subprocess.run(["timeout", "300", "bash", "-c", command], capture_output=True, text=True, timeout=360,
                         env=dict(os.environ, HOME=str(tmp_path / "home")))
    assert out.returncode == 0, out.stderr
    assert "POC stopped" in out.stdout and "wrapper still here" in out.stdout


def test_a_poc_process_never_lists_itself_or_its_parent(prepared, spawned, tmp_path):
    """A process of the POC that asks for the POC's processes (as `poc down` run from a kit script
    would) is told about the others, never about itself or the script that started it."""
    kits, workspace = Path(prepared["kits"]), prepared["workspace"]
    server = spawned.nvflare("server.server_train", kits / "localhost", "-s", "fed_server.json")
    report = tmp_path / "listed.json"
    site = kits / prepared["sites"][0]
    script = spawned.kit_script(site, f'"{sys.executable}" -m nvflare.private.fed.app.client.client_train -m "{site}"\n'
                                "wait\n", STAND_IN_REPORT=str(report), STAND_IN_WORKSPACE=workspace)
    deadline = time.monotonic() + 120
    while not report.is_file():
        assert script.poll() is None and time.monotonic() < deadline, "the kit script's process did not report"
        time.sleep(0.2)
    seen = json.loads(report.read_text())
    assert seen["parent"] == script.pid
    assert server.pid in seen["listed"]
    assert seen["me"] not in seen["listed"] and script.pid not in seen["listed"]


def test_down_on_a_folder_that_is_not_a_poc_removes_and_stops_nothing(tmp_path, spawned, capsys):
    victim = tmp_path / "victim"
    kit = victim / "cxr_fl" / "prod_00" / "site-1"
    kit.mkdir(parents=True)
    (victim / "precious.txt").write_text("x")
    lookalike = spawned.nvflare("client.client_train", kit, "-s", "fed_client.json")  # no POC state: not ours
    follower = spawned.start(["tail", "-f", victim / "precious.txt"])
    for clean in (["--clean"], []):
        capsys.readouterr()
        assert main(["poc", "down", *clean, "--workspace", str(victim)]) == 2
        err = capsys.readouterr().err
        assert "no POC here" in err and err.count("\n") == 1
    assert (victim / "precious.txt").read_text() == "x"
    assert lookalike.poll() is None and follower.poll() is None


def test_clean_removes_only_what_poc_up_created(prepared, data, tmp_path, capsys, monkeypatch):
    workspace = Path(prepared["workspace"])
    (workspace / "notes.txt").write_text("mine")  # a user's file inside the workspace
    beside = tmp_path / "ws-project.yml"  # where earlier versions wrote the project file
    beside.write_text("a user's file")
    assert main(["poc", "down", "--clean", "--workspace", str(workspace)]) == 0
    err = capsys.readouterr().err
    assert "kept" in err and "notes.txt" in err and err.count("\n") == 1
    assert sorted(os.listdir(workspace)) == ["notes.txt"] and beside.read_text() == "a user's file"

    (workspace / "notes.txt").unlink()  # an empty folder is taken
    poc_prepare(workspace, 2, data)
    assert main(["poc", "down", "--clean", "--workspace", str(workspace)]) == 0
    assert not workspace.exists()
    assert "and removed" in capsys.readouterr().out


def test_clean_refuses_what_poc_up_cannot_be_shown_to_have_made(prepared, tmp_path, capsys, monkeypatch):
    workspace = Path(prepared["workspace"])
    before = sorted(os.listdir(workspace))

    def refused(where: str, why: str) -> None:
        capsys.readouterr()
        assert main(["poc", "down", "--clean", "--workspace", where]) == 2
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1, err

    monkeypatch.chdir(workspace)
    refused(".", "not removing the folder this command runs in")
    monkeypatch.chdir(tmp_path)
    assert sorted(os.listdir(workspace)) == before

    elsewhere = tmp_path / "elsewhere"  # the state file copied into another folder
    elsewhere.mkdir()
    shutil.copy(workspace / "cxrfl_poc.json", elsewhere)
    (elsewhere / "cxr_fl").mkdir()
    refused(str(elsewhere), "written for the workspace")
    assert (elsewhere / "cxr_fl").is_dir()

    state = json.loads((workspace / "cxrfl_poc.json").read_text())
    for change, why in [({"created_by": None}, "not written by `cxrfl poc up`"),
                        ({"created": ["../data"] + state["created"]}, "list of created entries"),
                        ({"created": "everything"}, "list of created entries")]:
        (workspace / "cxrfl_poc.json").write_text(json.dumps({**state, **change}))
        refused(str(workspace), why)
        assert sorted(os.listdir(workspace)) == before
    (workspace / "cxrfl_poc.json").write_text("{not json")
    refused(str(workspace), "not a readable POC state file")


def test_up_refuses_a_folder_it_would_wipe_and_replaces_an_earlier_poc(prepared, data, tmp_path, capsys):
    """`nvflare poc prepare --force` deletes its workspace: `poc up` gives it only a new or empty
    folder, or one holding nothing but an earlier POC of this project."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("x")
    try:
        assert main(["poc", "up", "--sites", "1", "--data", str(data), "--workspace", str(victim)]) == 2
    finally:  # on a version that wipes the folder, the POC it started must not outlive the test
        if (victim / "cxrfl_poc.json").is_file():
            poc_down(victim)
    err = capsys.readouterr().err
    assert "did not create (precious.txt)" in err and err.count("\n") == 1
    assert sorted(os.listdir(victim)) == ["precious.txt"]

    workspace = Path(prepared["workspace"])
    first = json.loads((workspace / "cxrfl_poc.json").read_text())
    again = poc_prepare(workspace, 1, data)  # the earlier POC (stopped) is replaced
    assert again["sites"] == first["sites"][:1] and len(first["sites"]) == 2
    (workspace / "notes.txt").write_text("mine")
    with pytest.raises(PocError, match="did not create \\(notes.txt\\)"):
        poc_prepare(workspace, 2, data)
    assert (workspace / "notes.txt").read_text() == "mine" and (workspace / "cxrfl_poc.json").is_file()
