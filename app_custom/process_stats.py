"""What a site process holds, and since when: one log line at each stage of a site's life (imports done,
set up, first training step, each round), read from Linux's /proc. On another system the line says only
the stage. Standard library only: the site logs it before and after its heavy imports cost anything."""

from __future__ import annotations

import os
from pathlib import Path

# /proc/self/status fields, in KiB: resident now, peak resident (high-water mark), and resident split
# into anonymous memory (heap, tensors: this process's own) and file pages (shared libraries' code,
# shared with every other process that maps the same files).
FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def memory_mib(status: Path = Path("/proc/self/status")) -> dict[str, int]:
    """{field: MiB} for FIELDS from a /proc status file; {} where there is none (not Linux)."""
    try:
        text = status.read_text()
    except OSError:
        return {}
    found = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in FIELDS:
            found[key] = int(value.split()[0]) // 1024
    return found


def process_age() -> float | None:
    """Seconds since this process started (Linux), or None."""
    try:
        stat = Path("/proc/self/stat").read_text()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22 (starttime), after pid and (comm)
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def stage_line(stage: str) -> str:
    """E.g. `round 1: 12.3 s since process start, VmRSS 470 MiB, VmHWM 480 MiB (anon 350, file 120)`."""
    parts, age, mem = [], process_age(), memory_mib()
    if age is not None:
        parts.append(f"{age:.1f} s since process start")
    if mem:
        parts.append(f"VmRSS {mem.get('VmRSS')} MiB, VmHWM {mem.get('VmHWM')} MiB "
                     f"(anon {mem.get('RssAnon')}, file {mem.get('RssFile')})")
    return f"{stage}: " + ", ".join(parts) if parts else stage

