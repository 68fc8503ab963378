"""`cxrfl site`: the hospital side, from a client kit of a real provisioning (NVFlare's provisioner on the
project file, server on localhost). The server is a TLS stand-in on 127.0.0.1 holding the server kit's
certificate (mutual TLS, as NVFlare's server); every broken precondition fails one named check."""

from __future__ import annotations

import configparser
import contextlib
import json
import shlex
import shutil
import socket
import ssl
import subprocess
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from nvflare.lighter.utils import sign_content

from app_custom.site_files import SITE_CONFIG
from cxrfl.cli import main
from cxrfl.fl.poc import free_port, poc_project
from cxrfl.fl.poc_processes import stop_processes, workspace_process_list
from cxrfl.fl.provision import provision
from cxrfl.fl.site import CONSOLE_LOG, check_compute, check_disk, check_he, check_kit, last_connection_line
from cxrfl.keyfiles import SECRET_CONTEXT
from lightning_modules.data.manifest import site_dirs

CHECKS = ["kit", "certificates", "server", "data", "disk", "compute", "HE"]


@dataclass(frozen=True)
class Provisioning:
    site_kit: Path
    server_kit: Path
    root_cert: x509.Certificate
    root_key: object


def _provision(base: Path, port: int, he: bool) -> Provisioning:
    """The production project file on one machine (server localhost:port, one hospital), provisioned."""
    base.mkdir(parents=True)
    (base / "project.yml").write_text(yaml.safe_dump(poc_project(1, port, he=he), sort_keys=False))
    kits = {kit.role: kit.path for kit in provision(base / "project.yml", base / "kits")}
    state = json.loads((kits["server"].parents[1] / "state" / "cert.json").read_text())
    return Provisioning(kits["client"], kits["server"], x509.load_pem_x509_certificate(state["root_cert"].encode()),
                        serialization.load_pem_private_key(state["root_pri_key"].encode(), password=None))


@pytest.fixture(scope="module")
def port():
    return free_port()


@pytest.fixture(scope="module")
def ours(tmp_path_factory, port) -> Provisioning:
    """This consortium's kits, with HE (the project's HEBuilder)."""
    return _provision(tmp_path_factory.mktemp("site") / "ours", port, he=True)


@pytest.fixture(scope="module")
def theirs(tmp_path_factory, port) -> Provisioning:
    """A second provisioning of the same project (another root CA), without HE."""
    return _provision(tmp_path_factory.mktemp("site") / "theirs", port, he=False)


@pytest.fixture
def kit(tmp_path, ours) -> Path:
    """A copy of our hospital's kit this test may break (modes kept)."""
    copy = tmp_path / "kit"
    shutil.copytree(ours.site_kit, copy)
    return copy


@pytest.fixture(scope="module")
def site_data(synthetic_root) -> Path:
    return site_dirs(synthetic_root)[0]


@contextlib.contextmanager
def tls_server(port: int, cert: Path, key: Path, root_ca: Path):
    """A mutual-TLS listener on 127.0.0.1:port answering handshakes, as NVFlare's server port does."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    context.load_verify_locations(str(root_ca))
    context.verify_mode = ssl.CERT_REQUIRED
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen()
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            with contextlib.suppress(ssl.SSLError, OSError), connection:
                connection.settimeout(5)
                context.wrap_socket(connection, server_side=True).close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)
        listener.close()


@pytest.fixture
def server(ours, port):
    startup = ours.server_kit / "startup"
    with tls_server(port, startup / "server.crt", startup / "server.key", startup / "rootCA.pem"):
        yield


def _check(capsys, kit: Path, data: Path, *options: str) -> tuple[int, dict[str, str]]:
    """`cxrfl site check`: (exit status, check name -> its line)."""
    code = main(["site", "check", "--kit", str(kit), "--data", str(data), *options])
    lines = capsys.readouterr().out.strip().splitlines()
    by_name = {line.split(" ", 1)[1].split(":", 1)[0]: line for line in lines}
    assert list(by_name) == CHECKS and len(lines) == len(CHECKS), lines
    return code, by_name


def _failed(lines: dict[str, str]) -> list[str]:
    return [name for name, line in lines.items() if line.startswith("FAIL ")]


def _resign(kit: Path, root_key, name: str) -> None:
    """Sign a replaced startup file as the provisioner would (its root CA key, signature.json)."""
    signatures_path = kit / "startup" / "signature.json"
    signatures = json.loads(signatures_path.read_text())
    signatures[name] = sign_content((kit / "startup" / name).read_bytes(), root_key)
    signatures_path.write_text(json.dumps(signatures))


def _issue(provisioning: Provisioning, subject: x509.Name, public_key, not_after: datetime) -> bytes:
    certificate = (x509.CertificateBuilder().subject_name(subject).issuer_name(provisioning.root_cert.subject)
                   .public_key(public_key).serial_number(x509.random_serial_number())
                   .not_valid_before(not_after - timedelta(days=360)).not_valid_after(not_after)
                   .sign(provisioning.root_key, hashes.SHA256()))
    return certificate.public_bytes(serialization.Encoding.PEM)


def test_a_good_kit_with_its_data_and_server_passes_every_check(kit, site_data, server, capsys):
    code, lines = _check(capsys, kit, site_data)
    assert code == 0 and _failed(lines) == [], lines
    assert "issued by the kit's root CA" in lines["certificates"] and "for 'localhost'" in lines["server"]
    assert f"{site_data}:" in lines["data"] and "CPU:" in lines["compute"]
    assert SECRET_CONTEXT in lines["HE"] and "(600)" in lines["HE"]


@pytest.mark.parametrize("where", ["data root", "missing"])
def test_a_wrong_data_folder_fails_the_data_check(where, kit, site_data, server, capsys):
    data = site_data.parent if where == "data root" else site_data.parent / "site-99"
    code, lines = _check(capsys, kit, data)
    assert code == 1 and _failed(lines) == ["data"], lines
    assert lines["data"].startswith(f"FAIL data: {data} has no manifest.csv") and "; fix: " in lines["data"]


def test_unusable_site_data_fails_with_what_data_check_reports(kit, site_data, server, capsys, tmp_path):
    broken = tmp_path / "site-1"
    shutil.copytree(site_data, broken)
    (broken / "manifest.csv").write_text("no,such,columns\n")
    code, lines = _check(capsys, kit, broken)
    assert code == 1 and _failed(lines) == ["data"], lines
    assert "manifest.csv" in lines["data"] and f"cxrfl data check {broken}" in lines["data"]


@pytest.mark.parametrize("days_left", [-1, 10])
def test_an_expired_or_expiring_certificate_names_its_expiry(days_left, kit, site_data, server, ours, capsys):
    startup = kit / "startup"
    old = x509.load_pem_x509_certificate((startup / "client.crt").read_bytes())
    not_after = (datetime.now(timezone.utc) + timedelta(days=days_left, hours=1)).replace(microsecond=0)
    (startup / "client.crt").write_bytes(_issue(ours, old.subject, old.public_key(), not_after))
    _resign(kit, ours.root_key, "client.crt")  # a kit as provisioned, only with that certificate
    code, lines = _check(capsys, kit, site_data)
    assert code == 1 and _failed(lines) == ["certificates"], lines
    when = f"{not_after:%Y-%m-%d %H:%M} UTC"
    expected = f"expired on {when}" if days_left < 0 else f"expires on {when}, in {days_left} days (fewer than 30)"
    assert expected in lines["certificates"]
    if days_left > 0:  # --min-cert-days sets the margin
        assert _check(capsys, kit, site_data, "--min-cert-days", "5")[0] == 0


def test_a_certificate_from_another_provisioning_is_named(kit, site_data, server, theirs, capsys):
    for name in ("client.crt", "client.key"):
        shutil.copy2(theirs.site_kit / "startup" / name, kit / "startup" / name)
    code, lines = _check(capsys, kit, site_data)
    assert code == 1 and _failed(lines) == ["kit", "certificates"], lines
    assert "was not issued by this kit's root CA" in lines["certificates"]
    assert "client.crt (changed), client.key (changed)" in lines["kit"]


def test_a_kit_of_another_provisioning_is_refused_by_the_server_check(site_data, server, theirs, capsys, tmp_path):
    kit = tmp_path / "their-kit"
    shutil.copytree(theirs.site_kit, kit)
    code, lines = _check(capsys, kit, site_data)
    assert code == 1 and _failed(lines) == ["server"], lines
    assert "presents a certificate of another CA" in lines["server"]
    assert "provisioned without HE" in lines["HE"]


def test_an_unresolvable_server_name_is_named(kit, site_data, ours, port, capsys):
    config_path = kit / "startup" / "fed_client.json"
    config = json.loads(config_path.read_text())
    config["servers"][0].update(service={"target": f"fl-server.cxrfl-test.invalid:{port}", "scheme": "http"},
                                identity="fl-server.cxrfl-test.invalid")
    config_path.write_text(json.dumps(config))
    _resign(kit, ours.root_key, "fed_client.json")
    code, lines = _check(capsys, kit, site_data)
    assert code == 1 and _failed(lines) == ["server"], lines
    assert "FAIL server: fl-server.cxrfl-test.invalid (startup/fed_client.json) is unresolvable" in lines["server"]


def test_a_closed_server_port_is_named(kit, site_data, port, capsys):
    code, lines = _check(capsys, kit, site_data)  # no server fixture: nothing listens
    assert code == 1 and _failed(lines) == ["server"], lines
    assert f"localhost:{port} refused the connection" in lines["server"]


def test_a_port_that_takes_tcp_but_never_answers_tls_times_out(kit, site_data, port, capsys):
    with socket.socket() as silent:  # the kernel completes the TCP handshake; nobody speaks TLS
        silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        silent.bind(("127.0.0.1", port))
        silent.listen()
        code, lines = _check(capsys, kit, site_data, "--server-timeout", "0.5")
    assert code == 1 and _failed(lines) == ["server"], lines
    assert f"localhost:{port} accepts TCP but no TLS handshake (" in lines["server"] and "timed out" in lines["server"]


def test_a_server_certificate_for_another_name_is_a_name_mismatch(kit, site_data, ours, port, capsys, tmp_path):
    startup = ours.server_kit / "startup"
    key = serialization.load_pem_private_key((startup / "server.key").read_bytes(), password=None)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "elsewhere.example")])
    cert = tmp_path / "elsewhere.crt"
    cert.write_bytes(_issue(ours, subject, key.public_key(), datetime.now(timezone.utc) + timedelta(days=300)))
    with tls_server(port, cert, startup / "server.key", startup / "rootCA.pem"):
        code, lines = _check(capsys, kit, site_data)
    assert code == 1 and _failed(lines) == ["server"], lines
    assert "name mismatch" in lines["server"] and "'elsewhere.example', this kit expects 'localhost'" in lines["server"]


@pytest.mark.parametrize("problem", ["missing", "readable by others"])
def test_the_he_secret_context_must_be_there_and_private(problem, kit, site_data, server, capsys):
    context = kit / "startup" / SECRET_CONTEXT
    if problem == "missing":
        context.unlink()
    else:
        context.chmod(0o644)
    code, lines = _check(capsys, kit, site_data)
    assert code == 1 and _failed(lines) == ["HE"], lines
    expected = "is missing (the kit's signature.json lists it" if problem == "missing" else f"fix: chmod 600 {context}"
    assert expected in lines["HE"]


def test_an_incomplete_kit_is_named_and_the_other_checks_do_not_crash(kit, site_data, server, capsys):
    (kit / "startup" / "client.key").unlink()
    code, lines = _check(capsys, kit, site_data)
    assert code == 1 and _failed(lines) == ["kit", "certificates", "server"], lines
    assert lines["kit"].startswith(f"FAIL kit: {kit / 'startup'} lacks client.key; fix: ")
    assert main(["site", "check", "--kit", str(kit / "startup"), "--data", str(site_data)]) == 2  # not a kit
    assert "not a client startup kit" in capsys.readouterr().err


def test_he_is_expected_from_the_signed_kit_or_from_the_he_flag(theirs):
    assert check_he(theirs.site_kit).ok  # provisioned without HE: nothing to find
    required = check_he(theirs.site_kit, required=True)
    assert not required.ok and "--he asks for HE" in required.detail


def test_the_kit_check_names_missing_changed_and_unsigned_files(kit, theirs):
    plain = check_kit(theirs.site_kit)  # NVFlare 2.9 signs HE kits only
    assert plain.ok and "not signed" in plain.detail and not (theirs.site_kit / "startup" / "signature.json").exists()
    (kit / "startup" / "signature.json").rename(kit / "signature.json")
    unsigned = check_kit(kit)
    assert not unsigned.ok and f"holds {SECRET_CONTEXT} but no signature.json" in unsigned.detail
    (kit / "signature.json").rename(kit / "startup" / "signature.json")
    (kit / "startup" / "start.sh").write_text("#!/bin/sh\necho changed\n")
    changed = check_kit(kit)
    assert not changed.ok and "start.sh (changed)" in changed.detail
    (kit / "startup" / "client.key").unlink()
    missing = check_kit(kit)
    assert not missing.ok and missing.detail.endswith("lacks client.key")


def test_disk_and_compute_checks(kit):
    assert not check_disk(kit, min_free_gb=1e9).ok
    assert check_disk(kit, min_free_gb=0).ok
    assert check_compute().ok  # informational: a CPU-only machine passes
    absent = check_compute(gpu=torch.cuda.device_count())
    assert not absent.ok and "is not there" in absent.detail


def test_site_start_refuses_on_a_failing_check_and_starts_nothing(kit, site_data, capsys):
    assert main(["site", "start", "--kit", str(kit), "--data", str(site_data)]) == 1  # no server: refused
    captured = capsys.readouterr()
    assert "FAIL server:" in captured.out and "not started" in captured.err
    assert workspace_process_list(kit) == []
    assert not (kit / SITE_CONFIG).exists() and not (kit / CONSOLE_LOG).exists()


def test_stop_and_status_refuse_a_folder_that_is_not_a_client_kit(ours, capsys):
    for command in ("stop", "status"):
        assert main(["site", command, "--kit", str(ours.server_kit)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "not a client startup kit" in err and str(ours.server_kit) in err


def test_status_of_a_stopped_kit_names_its_data_and_last_connection(kit, site_data, capsys):
    assert main(["site", "status", "--kit", str(kit)]) == 3
    out = capsys.readouterr().out
    assert out.startswith("not running\n") and "data folder: not configured" in out and "(no log yet)" in out
    (kit / SITE_CONFIG).write_text(json.dumps({"data_dir": str(site_data)}))
    (kit / "log.txt").write_text(  # lines as NVFlare 2.9's client logs them
        "2026-01-01 10:00:00,1 - Authenticator - INFO - verified server identity 'localhost'\n"
        "2026-01-01 10:00:00,2 - FederatedClient - INFO - Successfully registered client:st-mary-hospital "
        "for project cxr_fl.\n2026-01-01 10:00:01,0 - Cell - INFO - Register blob CB for channel='x'\n")
    assert main(["site", "status", "--kit", str(kit)]) == 3
    out = capsys.readouterr().out
    assert f"data folder: {site_data}\n" in out and "Successfully registered client:st-mary-hospital" in out
    assert last_connection_line(kit / "missing.txt") is None


def test_start_status_stop_of_a_kit(kit, site_data, server, capsys):
    try:
        assert main(["site", "start", "--kit", str(kit), "--data", str(site_data)]) == 0
        out = capsys.readouterr().out
        assert "started: PID" in out and f"log: {kit / 'log.txt'}" in out
        pid = int(out.split("started: PID ")[1].split()[0])
        assert pid in [p.pid for p in workspace_process_list(kit)]
        assert json.loads((kit / SITE_CONFIG).read_text())["data_dir"] == str(site_data)
        assert main(["site", "start", "--kit", str(kit), "--data", str(site_data)]) == 2  # already running
        assert "already running" in capsys.readouterr().err
        assert main(["site", "status", "--kit", str(kit)]) == 0
        running = capsys.readouterr().out.splitlines()[0]
        assert running.startswith("running: PIDs ") and str(pid) in running.split("PIDs ")[1].split(", ")
        assert main(["site", "stop", "--kit", str(kit)]) == 0
        assert "stopped" in capsys.readouterr().out
        assert workspace_process_list(kit) == []
        assert main(["site", "status", "--kit", str(kit)]) == 3
    finally:
        stop_processes(workspace_process_list(kit))


def test_the_systemd_unit_runs_the_check_then_the_kits_start_script(kit, site_data, capsys, tmp_path):
    assert main(["site", "unit", "--kit", str(kit), "--data", str(site_data), "--gpu", "1", "--user", "hospital"]) == 0
    text = capsys.readouterr().out
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str
    unit.read_string(text)
    service = unit["Service"]
    assert service["Type"] == "simple" and service["Restart"] == "on-failure" and service["User"] == "hospital"
    assert service["WorkingDirectory"] == str(kit)
    assert "CUDA_VISIBLE_DEVICES=1" in shlex.split(service["Environment"])
    start, pre = shlex.split(service["ExecStart"]), shlex.split(service["ExecStartPre"])
    assert start[1] == str(kit / "startup" / "sub_start.sh")
    for program in (start[0], start[1], pre[0]):
        assert Path(program).is_absolute() and Path(program).is_file(), program
    assert pre[1:6] == ["-m", "cxrfl.cli", "site", "check", "--kit"]
    assert pre[-4:] == ["--data", str(site_data), "--gpu", "1"]
    assert json.loads((kit / SITE_CONFIG).read_text()) == {"data_dir": str(site_data), "cuda_visible_devices": "1"}
    if shutil.which("systemd-analyze"):
        path = tmp_path / "cxrfl-site.service"
        path.write_text(text)
        verified = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
        assert verified.returncode == 0 and "Failed to parse" not in verified.stderr, verified.stderr
    assert main(["site", "unit", "--kit", str(kit), "--data", str(site_data.parent)]) == 2  # a data root
    assert "has no manifest.csv" in capsys.readouterr().err


def test_site_start_keeps_the_torch_threads_a_hospital_set_by_hand(tmp_path):
    from cxrfl.fl.site import write_site_config

    kit = tmp_path / "kit"
    (kit / "local").mkdir(parents=True)
    (kit / SITE_CONFIG).write_text(json.dumps({"data_dir": "/old", "torch_threads": 4, "stale": 1}))
    write_site_config(kit, tmp_path / "data", gpu=0)
    assert json.loads((kit / SITE_CONFIG).read_text()) == {
        "data_dir": str(tmp_path / "data"), "torch_threads": 4, "cuda_visible_devices": "0"}
    (kit / SITE_CONFIG).write_text("{not json")  # an unreadable earlier file is replaced, as before
    write_site_config(kit, tmp_path / "data")
    assert json.loads((kit / SITE_CONFIG).read_text()) == {"data_dir": str(tmp_path / "data")}
