"""The processes of one NVFlare workspace (a POC, a site's kit, a simulator run) and stopping them.

A process belongs to the workspace when it is one NVFlare starts and one of its path arguments
lies inside the workspace (as a path, component by component: /x/poc is not /x/poc-2):
- python running a module of `nvflare.private.fed.app` (server, client, job and simulator
  worker processes) or the `nvflare simulator` command;
- a shell running a kit's startup script (`startup/start.sh`, `startup/sub_start.sh`);
- any descendant of those (the kit scripts' `sleep`s, data loader workers).
A process that only mentions the path (`tail -f ws/log.txt`), the caller and the caller's
ancestors (a `timeout` or `bash -c` wrapper) never are. A PID is signalled only while it still
names the same process (same start time), so a reused PID is never hit.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

NVFLARE_PROCESS_MODULES = "nvflare.private.fed.app."
KIT_SCRIPTS = {"start.sh", "sub_start.sh"}
SHELLS = {"bash", "sh", "dash"}
PYTHON_OPTIONS_WITH_VALUE = "cmWX"  # -c CMD, -m MOD, -W ARG, -X OPT (the value may be attached)


@dataclass(frozen=True)
class Process:
    pid: int
    ppid: int
    started: int  # clock ticks after boot: tells a reused PID from the process that had it
    argv: tuple[str, ...]
    exe: str
    cwd: str | None


def read_process(pid: int) -> Process | None:
    """The process with this PID, or None if it has ended (zombies included) or cannot be read."""
    proc = Path(f"/proc/{pid}")
    try:
        stat = (proc / "stat").read_text()
        argv = (proc / "cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": comm may hold spaces
    if fields[0] in ("Z", "X"):
        return None
    try:
        exe = os.readlink(proc / "exe")
    except OSError:
        exe = ""
    try:
        cwd = os.readlink(proc / "cwd")
    except OSError:
        cwd = None
    args = tuple(a.decode(errors="replace") for a in argv.split(b"\0")[:-1]) if argv else ()
    return Process(pid, int(fields[1]), int(fields[19]), args, exe, cwd)


def all_processes() -> dict[int, Process]:
    found = {}
    for entry in Path("/proc").glob("[0-9]*"):
        process = read_process(int(entry.name))
        if process is not None:
            found[process.pid] = process
    return found


def caller_and_ancestors(processes: dict[int, Process]) -> set[int]:
    chain, pid = set(), os.getpid()
    while pid > 0 and pid not in chain:
        chain.add(pid)
        parent = processes.get(pid) or read_process(pid)
        pid = parent.ppid if parent else 0
    return chain


def python_program(argv: tuple[str, ...]) -> tuple[str, str, tuple[str, ...]] | None:
    """("module", name, args) or ("script", path, args) of a python command line; None for -c/stdin."""
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--" or not arg.startswith("-") or arg == "-":
            if arg == "--":
                i += 1
            return ("script", argv[i], argv[i + 1:]) if i < len(argv) and argv[i] != "-" else None
        if arg.startswith("--"):  # --check-hash-based-pycs MODE is the only long option with a value
            i += 2 if arg == "--check-hash-based-pycs" else 1
            continue
        for at, flag in enumerate(arg[1:], start=2):
            if flag in PYTHON_OPTIONS_WITH_VALUE:
                value, i = (arg[at:], i + 1) if arg[at:] else (argv[i + 1] if i + 1 < len(argv) else "", i + 2)
                if flag == "c":
                    return None
                if flag == "m":
                    return "module", value, argv[i:]
                break
        else:
            i += 1
    return None


def shell_script(argv: tuple[str, ...]) -> tuple[str, tuple[str, ...]] | None:
    """(script, args) of `bash [options] SCRIPT ARGS`; None for `bash -c` or an interactive shell."""
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if arg.startswith("-") and not arg.startswith("--") and "c" in arg[1:]:  # -c, -ec: a command string
            return None
        if arg in ("-o", "+o", "-O", "+O", "--rcfile", "--init-file"):
            i += 2
            continue
        if not arg.startswith(("-", "+")):
            break
        i += 1
    return (argv[i], argv[i + 1:]) if i < len(argv) else None


def inside(folder: Path, path_text: str, cwd: str | None) -> bool:
    """`path_text` (relative to the process's cwd) names `folder` or something under it."""
    if not path_text or "\n" in path_text:
        return False
    path = Path(path_text)
    if not path.is_absolute():
        if cwd is None:
            return False
        path = Path(cwd) / path
    for candidate, root in ((Path(os.path.normpath(path)), Path(os.path.normpath(folder))),
                            (Path(os.path.realpath(path)), Path(os.path.realpath(folder)))):
        if candidate == root or root in candidate.parents:
            return True
    return False


def started_by_nvflare_in(process: Process, folder: Path) -> bool:
    """A server/client/job/simulator process or a kit startup script of the workspace `folder`."""
    if not process.argv:
        return False
    exe = Path(process.exe or process.argv[0]).name
    if exe.startswith("python"):
        program = python_program(process.argv)
        if program is None:
            return False
        kind, name, args = program
        if kind == "module" and name.startswith(NVFLARE_PROCESS_MODULES):
            return any(inside(folder, a, process.cwd) for a in args)
        if kind == "script" and Path(name).name == "nvflare" and args[:1] == ("simulator",):
            return any(inside(folder, a, process.cwd) for a in args[1:])
        return False
    if exe in SHELLS:
        script = shell_script(process.argv)
        if script is None:
            return False
        path = Path(script[0])
        return path.name in KIT_SCRIPTS and path.parent.name == "startup" and inside(folder, script[0], process.cwd)
    return False


def workspace_process_list(folder: Path) -> list[Process]:
    """The processes NVFlare started for the workspace `folder`, their descendants included;
    never the caller or its ancestors."""
    folder = Path(folder).absolute()
    processes = all_processes()
    children: dict[int, list[int]] = {}
    for process in processes.values():
        children.setdefault(process.ppid, []).append(process.pid)
    found: set[int] = set()
    todo = [p.pid for p in processes.values() if started_by_nvflare_in(p, folder)]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    found -= caller_and_ancestors(processes)
    return [processes[pid] for pid in sorted(found)]


def still_running(process: Process) -> bool:
    now = read_process(process.pid)
    return now is not None and now.started == process.started


def signal_processes(processes: list[Process], sig: int) -> None:
    for process in processes:
        if still_running(process):
            try:
                os.kill(process.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def wait_until_ended(processes: list[Process], timeout: float) -> list[Process]:
    """Those of `processes` still running after up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        running = [p for p in processes if still_running(p)]
        if not running or time.monotonic() >= deadline:
            return running
        time.sleep(0.2)


def stop_processes(processes: list[Process], grace: float = 10) -> list[Process]:
    """SIGTERM, then SIGKILL to whatever still runs after `grace` seconds; returns the processes
    still there 10 s after SIGKILL (none, unless one hangs in the kernel)."""
    signal_processes(processes, signal.SIGTERM)
    running = wait_until_ended(processes, grace)
    signal_processes(running, signal.SIGKILL)
    return wait_until_ended(running, 10)
