"""Separate network hosts on one Linux machine, for the multi-host rehearsal (tests/test_rehearsal.py).

Each host is a network namespace with its own address. Every other host has one point-to-point veth
link to the server's namespace and nothing else: the server does not forward, so hospitals and the
admin reach the server and nobody else, as behind hospital firewalls that only allow outbound
connections to the federation server. Names resolve through a per-namespace hosts file
(/etc/netns/NS/hosts, bind-mounted over /etc/hosts by `ip netns exec`), as DNS would.

Everything made here carries this process's prefix and is removed by `close()` (processes in the
namespaces killed, links and namespaces deleted, hosts files removed), also after a failure;
leftovers of an earlier run that died (its pid gone) are removed on start.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

NETNS_ETC = Path("/etc/netns")
PREFIX = "cxrfl"  # every namespace made here is named cxrfl<pid>-<host>


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def namespaces() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line.strip()]


def pids_in(ns: str) -> list[int]:
    out = ip("netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split()]


def remove_namespace(ns: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids_in(ns):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        while pids_in(ns) and time.time() < deadline:
            time.sleep(0.2)
        if not pids_in(ns):
            break
    ip("netns", "del", ns, check=False)
    shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)


def remove_leftovers() -> None:
    """Namespaces of earlier rehearsals whose process is gone (killed before its cleanup ran)."""
    for ns in namespaces():
        match = re.fullmatch(rf"{PREFIX}(\d+)-\S+", ns)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            remove_namespace(ns)


@dataclass
class Network:
    """A server namespace and point-to-point links to the other hosts' namespaces."""
    server_name: str
    hosts: list[str]
    subnet: int = field(default_factory=lambda: 16 + os.getpid() % 200)  # 10.<subnet>.<i>.0/30
    made: list[str] = field(default_factory=list)
    server_ips: dict[str, str] = field(default_factory=dict)  # host -> the server's address on its link
    addresses: dict[str, str] = field(default_factory=dict)  # host -> its own address

    def ns(self, host: str) -> str:
        return f"{PREFIX}{os.getpid()}-{host}"

    def open(self, aliases: dict[str, list[str]] | None = None) -> "Network":
        """Create the namespaces and links. aliases: host -> extra names that resolve to the server there."""
        remove_leftovers()
        self._namespace("server")
        for i, host in enumerate(self.hosts, start=1):
            self._namespace(host)
            server_end, host_end = f"cx{os.getpid() % 100000}s{i}", f"cx{os.getpid() % 100000}h{i}"
            ip("link", "add", server_end, "type", "veth", "peer", "name", host_end)
            ip("link", "set", server_end, "netns", self.ns("server"))
            ip("link", "set", host_end, "netns", self.ns(host))
            self.server_ips[host] = f"10.{self.subnet}.{i}.1"
            self.addresses[host] = f"10.{self.subnet}.{i}.2"
            ip("-n", self.ns("server"), "addr", "add", f"{self.server_ips[host]}/30", "dev", server_end)
            ip("-n", self.ns(host), "addr", "add", f"{self.addresses[host]}/30", "dev", host_end)
            ip("-n", self.ns("server"), "link", "set", server_end, "up")
            ip("-n", self.ns(host), "link", "set", host_end, "up")
            names = [self.server_name, *(aliases or {}).get(host, [])]
            self._hosts_file(host, f"{self.server_ips[host]} {' '.join(names)}\n")
        self._hosts_file("server", "".join(f"{a} {h}\n" for h, a in self.addresses.items()))
        return self

    def _namespace(self, host: str) -> None:
        ns = self.ns(host)
        ip("netns", "add", ns)
        self.made.append(ns)
        ip("-n", ns, "link", "set", "lo", "up")

    def _hosts_file(self, host: str, lines: str) -> None:
        folder = NETNS_ETC / self.ns(host)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "hosts").write_text(f"127.0.0.1 localhost\n::1 localhost\n{lines}")

    def device(self, host: str) -> str:
        """The host's end of its link to the server."""
        return f"cx{os.getpid() % 100000}h{self.hosts.index(host) + 1}"

    def limit_uplink(self, host: str, rate: str) -> None:
        """Token-bucket rate limit on the host's link, both directions (a hospital-like connection)."""
        server_end = f"cx{os.getpid() % 100000}s{self.hosts.index(host) + 1}"
        for ns, dev in ((self.ns(host), self.device(host)), (self.ns("server"), server_end)):
            subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                            "burst", "256kb", "latency", "400ms"], check=True, capture_output=True, text=True)

    def bytes_sent(self, host: str) -> tuple[int, int]:
        """(transmitted, received) bytes on the host's link, from its own end."""
        stats = Path(f"/sys/class/net/{self.device(host)}/statistics")
        out = subprocess.run(["ip", "netns", "exec", self.ns(host), "cat", str(stats / "tx_bytes"),
                              str(stats / "rx_bytes")], capture_output=True, text=True, check=True).stdout
        tx, rx = out.split()
        return int(tx), int(rx)

    def popen(self, host: str, command: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        """A process in the host's namespace, its output to `log`; killed with the namespace."""
        with open(log, "ab") as out:
            return subprocess.Popen(["ip", "netns", "exec", self.ns(host), *command], stdout=out,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def run(self, host: str, command: list[str], env: dict | None = None, timeout: float = 600):
        return subprocess.run(["ip", "netns", "exec", self.ns(host), *command], capture_output=True, text=True,
                              env=env, timeout=timeout)

    def close(self) -> None:
        for ns in reversed(self.made):
            remove_namespace(ns)
        self.made.clear()
