"""The multi-host rehearsal: production kits (not POC) for a server, three hospitals and an admin,
each in its own network namespace with its own address and hosts file (tests/netns.py), hospitals
linked to the server only. Everything goes through the commands an operator uses: `cxrfl provision`,
`cxrfl site check/start/stop` at each hospital, `cxrfl submit/wait --admin-kit` at the admin's host.

Needs root (network namespaces); CI runs as root and must never skip it. The figures (round time
and bytes per site per round, plain vs HE, at a 50 Mbit/s hospital link) are printed and written to
$CXRFL_REHEARSAL_REPORT when set.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

import netns
from cxrfl.fl.provision import PROJECT_FILE
from lightning_modules.data.phantom import generate_dataset

pytestmark = pytest.mark.e2e

SERVER = "fl-server.rehearsal.test"
STALE_SERVER = "fl-old.rehearsal.test"  # the name an outdated kit still uses for the same server
ADMIN = "admin@cxr-fl.org"
HOSPITALS = ("h1", "h2", "h3")
LINK_RATE = "50mbit"
JOB = ["--task", "classify", "--model", "cnn5", "--image-size", "32", "--batch-size", "8", "--limit", "16"]
CXRFL = str(Path(sys.executable).parent / "cxrfl")
REPO = Path(__file__).resolve().parents[1]


def _needs_root() -> None:
    if os.geteuid() == 0:
        return
    if os.environ.get("CI"):
        pytest.fail("the multi-host rehearsal needs root (network namespaces); CI runs as root")
    pytest.skip("needs root for network namespaces (CI runs it)")


def _project(path: Path, name: str, server: str, clients: list[str]) -> Path:
    project = yaml.safe_load(PROJECT_FILE.read_text())
    project["name"] = name
    kept = []
    for p in project["participants"]:
        if p["type"] == "server":
            kept.append(dict(p, name=server))
        elif p["type"] == "admin" and p.get("role") == "project_admin":
            kept.append(p)
    kept += [{"name": c, "type": "client", "org": c.replace("-", "_")} for c in clients]
    project["participants"] = kept
    path.write_text(yaml.safe_dump(project, sort_keys=False))
    return path


class Deployment:
    """Kits, data, the network and the processes of one rehearsal."""

    def __init__(self, base: Path):
        self.base = base
        self.sites = ["st-mary-hospital", "city-general-hospital", "university-clinic"]
        self.data = base / "data"
        generate_dataset(self.data, sites=3, per_site=16, test_size=8, size=32, seed=1)
        kits_dir = base / "kits"
        project = _project(base / "project.yml", "cxr_fl", SERVER, self.sites)
        # the consortium lead's commands; the server keeps its jobs in the rehearsal's folder
        _cxrfl("provision", "--project", str(project), "--out", str(kits_dir), "--server-storage",
               str(base / "server-storage"), "--heartbeat-timeout", "30")
        prod = kits_dir / "cxr_fl" / "prod_00"
        self.kits = {p.name: p for p in prod.iterdir() if p.is_dir()}
        # a kit of the same consortium (same root CA) provisioned for the server's old name, which the
        # hospital's DNS still resolves to the server
        stale = _project(base / "stale.yml", "cxr_fl", STALE_SERVER, ["stale-kit-hospital"])
        _cxrfl("provision", "--project", str(stale), "--out", str(kits_dir), "--same-ca")
        self.stale_kit = kits_dir / "cxr_fl" / "prod_01" / "stale-kit-hospital"
        # a kit of another consortium (its own root CA) pointed at this server
        foreign = _project(base / "foreign.yml", "other_fl", SERVER, ["foreign-hospital"])
        _cxrfl("provision", "--project", str(foreign), "--out", str(base / "foreign-kits"))
        self.foreign_kit = base / "foreign-kits" / "other_fl" / "prod_00" / "foreign-hospital"
        self.env = dict(os.environ, HOME=str(base / "home"), PYTHONWARNINGS="ignore",
                        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                        PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
        self.net = netns.Network(SERVER, [*HOSPITALS, "admin"])

    def start(self) -> None:
        self.net.open(aliases={"h3": [STALE_SERVER]})
        self.net.popen("server", ["bash", str(self.kits[SERVER] / "startup" / "start.sh")], self.base / "server.out",
                       self.env)
        deadline = time.time() + 120
        while not _can_connect(self, "h1", SERVER, 8002):  # the server is up before the hospitals start
            assert time.time() < deadline, f"the server did not listen; see {self.base / 'server.out'}"
            time.sleep(1)
        for host, site, folder in zip(HOSPITALS, self.sites, ("site-1", "site-2", "site-3")):
            started = self.site_command(host, "start", site, "--data", str(self.data / folder))
            assert started.returncode == 0, started.stdout + started.stderr
        for kit in (self.stale_kit, self.foreign_kit):  # refused: started as is, not with the checking `site start`
            self.net.popen("h3", ["bash", str(kit / "startup" / "sub_start.sh")], kit / "client.out", self.env)
        self.wait_for_sites(self.sites)

    def site_command(self, host: str, action: str, site: str, *options: str) -> subprocess.CompletedProcess:
        done = self.net.run(host, [CXRFL, "site", action, "--kit", str(self.kits.get(site, site)), *options],
                            env=self.env, timeout=300)
        return done

    def admin(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return self.net.run("admin", [CXRFL, *args, "--admin-kit", str(self.kits[ADMIN])], env=self.env,
                            timeout=timeout)

    def connected(self) -> list[str]:
        code = ("import json, sys; from cxrfl.fl.admin import AdminKit, connected_sites; "
                "print(json.dumps(connected_sites(AdminKit.open(sys.argv[1]))))")
        done = self.net.run("admin", [sys.executable, "-c", code, str(self.kits[ADMIN])], env=self.env, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    def wait_for_sites(self, sites: list[str], timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while set(sites) - set(self.connected()):
            assert time.time() < deadline, f"sites {sites} not connected; see {self.base}/*.out and the kits' log.txt"
            time.sleep(2)

    def submit(self, *options: str) -> str:
        done = self.admin("submit", *JOB, "--data", str(self.data), *options, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout.strip().splitlines()[-1]

    def submit_with_drill(self, drill: str, *options: str) -> str:
        """A job with a test-only fault drill (tests/fault_drill.py) in it, from the admin's host."""
        code = (
            "import sys; from dataclasses import replace; from cxrfl.cli import build_parser; "
            "from cxrfl.options import fl_config; from cxrfl.fl.admin import AdminKit, submit; import fault_drill; "
            "args = build_parser(('submit',)).parse_args(sys.argv[2:]); kit = AdminKit.open(args.admin_kit); "
            f"cfg = replace(fl_config(args), sites=tuple({self.sites!r}), data_root=None); "
            f"print(submit(kit, cfg, extend=fault_drill.{drill}))")
        done = self.net.run("admin", [sys.executable, "-c", code, "submit", "submit", *JOB, "--data", str(self.data),
                                      "--admin-kit", str(self.kits[ADMIN]), *options], env=self.env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout.strip().splitlines()[-1]

    def close(self) -> None:
        self.net.close()


def _cxrfl(*args: str) -> None:
    done = subprocess.run([CXRFL, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    _needs_root()
    dep = Deployment(tmp_path_factory.mktemp("rehearsal"))
    try:
        dep.start()
        yield dep
    finally:
        dep.close()
    assert not [ns for ns in netns.namespaces() if ns.startswith(f"{netns.PREFIX}{os.getpid()}-")]


FIGURES: dict = {}


def _can_connect(dep: Deployment, host: str, address: str, port: int) -> bool:
    code = ("import socket, sys\ntry:\n    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)\n"
            "except OSError:\n    sys.exit(1)")
    return dep.net.run(host, [sys.executable, "-c", code, address, str(port)], timeout=30).returncode == 0


def test_hospitals_reach_the_servers_port_and_nothing_else(deployment):
    dep = deployment
    listening = dep.net.run("server", ["cat", "/proc/net/tcp", "/proc/net/tcp6"]).stdout
    ports = sorted({int(line.split()[1].rsplit(":", 1)[1], 16) for line in listening.splitlines()[1:]
                    if len(line.split()) > 3 and line.split()[3] == "0A"})  # 0A: LISTEN
    assert 8002 in ports and len(ports) > 1, ports  # the server's job processes listen too
    for host in HOSPITALS:
        reachable = [p for p in ports if _can_connect(dep, host, dep.net.server_ips[host], p)]
        assert reachable == [8002], (host, reachable)
    assert not _can_connect(dep, "h1", dep.net.addresses["h2"], 8002)  # no hospital reaches another
    assert not _can_connect(dep, "h2", dep.net.addresses["h3"], 22)


def test_site_check_passes_at_a_hospital(deployment):
    dep = deployment
    done = dep.site_command("h2", "check", dep.sites[1], "--data", str(dep.data / "site-2"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FAIL" not in done.stdout and SERVER in done.stdout


def _log_of(kit: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(kit.glob("*.out")) + [kit / "log.txt"]
                   if p.is_file())


def test_a_foreign_kit_and_a_wrong_server_name_are_refused(deployment):
    """Started with the hospitals (Deployment.start), at h3: a kit of this consortium that still uses
    the server's old name, and a kit of another consortium."""
    dep = deployment
    deadline = time.time() + 60
    refused = {}
    while time.time() < deadline and len(refused) < 2:
        for name, kit in (("stale", dep.stale_kit), ("foreign", dep.foreign_kit)):
            hit = re.search(r".*(CERTIFICATE_VERIFY_FAILED|certificate verify failed|hostname|identity|"
                            r"not match|doesn't match).*", _log_of(kit), re.IGNORECASE)
            if hit:
                refused[name] = hit.group(0)
        time.sleep(2)
    assert set(refused) == {"stale", "foreign"}, (refused, _log_of(dep.stale_kit)[-2000:],
                                                  _log_of(dep.foreign_kit)[-2000:])
    FIGURES["refusals"] = refused
    assert not {"stale-kit-hospital", "foreign-hospital"} & set(dep.connected())
    for kit in (dep.stale_kit, dep.foreign_kit):
        assert dep.site_command("h3", "stop", str(kit)).returncode == 0


ROUND_LINE = re.compile(r"^(\S+ \S+) - ScatterAndGather - .* - Round (\d+) (started|finished)")


def _round_seconds(run: Path) -> list[float]:
    """Each round's duration from the server job's log in the downloaded result."""
    times: dict[int, dict[str, datetime]] = {}
    for log in run.glob("download/**/log.txt"):
        for line in log.read_text(errors="replace").splitlines():
            match = ROUND_LINE.match(line)
            if match:
                stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
                times.setdefault(int(match.group(2)), {})[match.group(3)] = stamp
    return [(t["finished"] - t["started"]).total_seconds() for _r, t in sorted(times.items())
            if {"started", "finished"} <= set(t)]


def test_plain_and_he_jobs_over_a_limited_hospital_link(deployment, tmp_path):
    dep = deployment
    dep.net.limit_uplink("h1", LINK_RATE)
    rounds = 2
    for name, options in (("plain", []), ("he", ["--he"])):
        before = dep.net.bytes_sent("h1")
        job = dep.submit("--rounds", str(rounds), "--no-cross-site-eval", *options)
        run = tmp_path / name
        key = ["--he-key", str(dep.kits[dep.sites[0]] / "startup" / "client_context.tenseal")] if options else []
        done = dep.admin("wait", job, "--out", str(run), "--data", str(dep.data), "--timeout", "600", *key)
        sent, received = (a - b for a, b in zip(dep.net.bytes_sent("h1"), before))
        assert done.returncode == 0, done.stderr[-3000:]
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["status"].replace(":", "_") == "FINISHED_COMPLETED" and "test_auroc" in metrics["test"]
        assert json.loads((run / "config.json").read_text())["kind"] == "deployment"
        per_round = _round_seconds(run)
        assert len(per_round) == rounds
        FIGURES[name] = {"round_seconds": per_round, "upload_bytes_per_round": sent // rounds,
                         "download_bytes_per_round": received // rounds, "link": LINK_RATE}
    assert FIGURES["he"]["upload_bytes_per_round"] > 2 * FIGURES["plain"]["upload_bytes_per_round"]  # ciphertexts
    _report()


def _kill_in_round(dep: Deployment, host: str, site: str, job: str, round_num: int) -> None:
    """Kill every process of the hospital's host (its machine dies) once its job received round_num's task."""
    log = dep.kits[site] / job / "log.txt"
    deadline = time.time() + 300
    while (log.read_text(errors="replace").count("got task assignment: name=train") if log.is_file() else 0) <= round_num:
        assert time.time() < deadline, f"{site} never got round {round_num} of job {job}"
        time.sleep(0.2)
    for pid in netns.pids_in(dep.net.ns(host)):
        os.kill(pid, 9)


def test_a_hospital_killed_mid_job(deployment, tmp_path):
    """A site's transient error in one round and a site killed in the next: with --min-clients 2 the
    job completes and names the killed site; with --min-clients 3 the run fails and says why."""
    dep = deployment
    killed, flaky = dep.sites[2], dep.sites[1]
    # a failed result counts as an answer to NVFlare: the round waits a while for the third site
    tolerant = dep.submit_with_drill(f"failing_round({flaky!r}, 0)", "--rounds", "3", "--min-clients", "2",
                                     "--wait-after-min-clients", "8", "--no-cross-site-eval")
    _kill_in_round(dep, "h3", killed, tolerant, 1)
    done = dep.admin("wait", tolerant, "--out", str(tmp_path / "tolerant"), "--data", str(dep.data), "--timeout", "600")
    assert done.returncode == 0, done.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "tolerant" / "models" / "rounds" / "round_log.jsonl")
           .read_text().splitlines()]
    accepted = {r: sorted(e["site"] for e in log if e.get("round") == r and e.get("accepted")) for r in range(3)}
    assert flaky not in accepted[0] and killed in accepted[0], accepted  # the transient error cost one round
    assert flaky in accepted[1] and killed not in accepted[2], accepted
    metrics = json.loads((tmp_path / "tolerant" / "metrics.json").read_text())
    assert 2 in metrics["sites_missing_rounds"][killed] and metrics["sites_missing_rounds"][flaky] == [0], metrics
    assert killed in done.stdout, done.stdout

    # the hospital's IT starts it again; the next job expects all three
    restarted = dep.site_command("h3", "start", killed, "--data", str(dep.data / "site-3"))
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    dep.wait_for_sites(dep.sites)
    strict = dep.submit("--rounds", "3", "--min-clients", "3", "--no-cross-site-eval")
    _kill_in_round(dep, "h3", killed, strict, 1)
    failed = dep.admin("wait", strict, "--out", str(tmp_path / "strict"), "--data", str(dep.data), "--timeout", "600")
    assert failed.returncode == 2, failed.stdout + failed.stderr[-3000:]
    reason = failed.stderr.strip().splitlines()[-1]
    assert f"Client {killed} is deemed disconnected" in reason and "after 1 of 3 rounds" in reason, reason
    assert json.loads((tmp_path / "strict" / "metrics.json").read_text())["status"] == "failed"
    FIGURES["killed"] = {"min_clients_2": done.stdout.strip().splitlines()[-1], "min_clients_3": reason}
    _report()


def _report() -> None:
    text = json.dumps(FIGURES, indent=1, default=str)
    print(text)
    if os.environ.get("CXRFL_REHEARSAL_REPORT"):
        Path(os.environ["CXRFL_REHEARSAL_REPORT"]).write_text(text)
