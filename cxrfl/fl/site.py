"""A hospital's side of a production deployment, from its client startup kit (`cxrfl provision`):
the pre-flight check, starting the kit's client detached, stopping it, its status, a systemd unit.

The kit is used as NVFlare made it: its own startup/sub_start.sh runs the client (and restarts it
when it dies, as the admin console's restart command expects); NVFlare writes its log and job
folders into the kit. The site's data folder is named in the kit's local/cxrfl_site.json, never
in a job.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import torch
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from nvflare.fuel.sec.security_content_service import LoadResult, SecurityContentManager
from nvflare.lighter.utils import verify_folder_signature

from app_custom.site_files import SITE_CONFIG
from cxrfl.fl.poc_processes import Process, stop_processes, workspace_process_list
from cxrfl.keyfiles import SECRET_CONTEXT
from lightning_modules.data.atomic import read_json_object, write_json
from lightning_modules.data.check import check_data
from lightning_modules.data.imageio import one_line
from lightning_modules.data.manifest import MANIFEST_NAME

CLIENT_CONFIG = "fed_client.json"
SIGNATURE_FILE = "signature.json"
KIT_FILES = ("client.crt", "client.key", "rootCA.pem", CLIENT_CONFIG, "start.sh", "sub_start.sh")
NVFLARE_LOG = "log.txt"  # the client's log (local/log_config.json), in the kit's root
CONSOLE_LOG = "cxrfl_site_console.txt"  # what sub_start.sh prints, and anything before NVFlare's logging
# sub_start.sh's control files; stale once nothing runs (a stale shutdown.fl stops the next start)
CONTROL_FILES = ("pid.fl", "daemon_pid.fl", "shutdown.fl", "restart.fl")
# What NVFlare's client logs about its connection (private/fed/client/*, private/fed/authenticator.py)
CONNECTION_MARKERS = ("Successfully registered client", "verified server identity",
                      "registration rejected", "re-challenge after", "failed to challenge server",
                      "cannot connect to server", "cannot authenticate to server", "expected server identity",
                      "Client token has been removed", "Failed to send heartbeat", "no connection to server",
                      "Cannot connect to host")
LOG_TAIL_BYTES = 4 * 2**20
# OpenSSL verify codes meaning "not issued by a CA we trust": no issuer found, or one of the same name
# whose signature does not match (a second provisioning of a project with the same name)
OTHER_CA_CODES = {2, 7, 18, 19, 20, 21}
DEFAULT_MIN_CERT_DAYS = 30
DEFAULT_MIN_FREE_GB = 2.0
DEFAULT_SERVER_TIMEOUT = 5.0
REPROVISION = "ask the consortium lead for this site's kit again (`cxrfl provision`); never edit startup/"


class SiteError(ValueError):
    """The folder is not a usable client kit, or the site cannot be started or stopped; one line."""


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{'PASS' if self.ok else 'FAIL'} {self.name}: {self.detail}"
        return text if self.ok or not self.fix else f"{text}; fix: {self.fix}"


@dataclass(frozen=True)
class ServerAddress:
    host: str
    port: int
    identity: str  # the name the server's certificate must carry (NVFlare compares it with the CN)


def require_client_kit(kit: Path) -> Path:
    """The kit's absolute path; SiteError unless it is a client startup kit."""
    kit = Path(kit).absolute()
    if not (kit / "startup" / CLIENT_CONFIG).is_file():
        raise SiteError(f"{kit}: not a client startup kit (no startup/{CLIENT_CONFIG}); give the folder "
                        "`cxrfl provision` made for this site")
    return kit


def server_address(kit: Path) -> ServerAddress:
    """Where the client connects, from startup/fed_client.json ("servers"[0]: service.target, identity)."""
    path = Path(kit) / "startup" / CLIENT_CONFIG
    try:
        config = read_json_object(path)
    except ValueError as exc:
        raise SiteError(str(exc)) from None
    try:
        server = config["servers"][0]
        host, colon, port = server["service"]["target"].rpartition(":")
        host = host.strip("[]")
        if not colon or not host:
            raise ValueError(host)
        return ServerAddress(host, int(port), server.get("identity") or host)
    except (KeyError, IndexError, TypeError, AttributeError, ValueError):
        raise SiteError(f"{path}: expected the server as servers[0].service.target HOST:PORT") from None


# --------------------------------------------------------------------------- the checks


def check_kit(kit: Path) -> Check:
    """Complete and, when signed, every startup file as signed by the kit's root CA (NVFlare's own
    verification). NVFlare 2.9 signs only HE (and confidential-computing) kits: a plain kit has no
    signature.json, its trust anchor is mutual TLS with the root CA (the certificates check)."""
    startup = Path(kit) / "startup"
    missing = [name for name in KIT_FILES if not (startup / name).is_file()]
    if missing:
        return Check("kit", False, f"{startup} lacks {', '.join(missing)}",
                     "copy the complete kit folder `cxrfl provision` made for this site")
    if not (startup / SIGNATURE_FILE).is_file():
        if (startup / SECRET_CONTEXT).exists():  # NVFlare loads an HE context only from a signed kit
            return Check("kit", False, f"{startup} holds {SECRET_CONTEXT} but no {SIGNATURE_FILE} (NVFlare "
                         "refuses an unsigned HE context)", REPROVISION)
        return Check("kit", True, f"{startup}: complete; not signed (NVFlare signs HE kits only)")
    if verify_folder_signature(str(startup), str(startup / "rootCA.pem"), single_signer=True,
                               signature_file=SIGNATURE_FILE):
        return Check("kit", True, f"{startup}: complete, every file signed by the kit's root CA")
    bad = _unsigned_files(startup)
    return Check("kit", False, f"{startup}: {', '.join(bad) if bad else 'a folder or link'} "
                 "not as provisioned (signature.json)", REPROVISION)


def _unsigned_files(startup: Path) -> list[str]:
    """Startup files that fail the check NVFlare's client makes at start (SecurityContentManager)."""
    manager = SecurityContentManager(str(startup), signature_filename=SIGNATURE_FILE)
    words = {LoadResult.INVALID_SIGNATURE: "changed", LoadResult.NOT_SIGNED: "not signed"}
    bad = []
    for path in sorted(startup.iterdir()):
        if path.name != SIGNATURE_FILE and path.is_file() and not path.is_symlink():
            _, result = manager.load_content(path.name)
            if result != LoadResult.OK:
                bad.append(f"{path.name} ({words.get(result, 'empty')})")
    return bad


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()


def _day(when: datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M UTC")


def _validity_problem(cert: x509.Certificate, now: datetime, min_days: int) -> str | None:
    if cert.not_valid_before_utc > now:
        return f"is not valid before {_day(cert.not_valid_before_utc)} (is this machine's clock right?)"
    if cert.not_valid_after_utc <= now:
        return f"expired on {_day(cert.not_valid_after_utc)}"
    left = cert.not_valid_after_utc - now
    if left < timedelta(days=min_days):
        return f"expires on {_day(cert.not_valid_after_utc)}, in {left.days} days (fewer than {min_days})"
    return None


def check_certificates(kit: Path, min_days: int = DEFAULT_MIN_CERT_DAYS, now: datetime | None = None) -> Check:
    """client.crt (and the root CA) valid for `min_days` more days, issued by the kit's rootCA.pem,
    and client.key its key."""
    startup = Path(kit) / "startup"
    now = now or datetime.now(timezone.utc)
    try:
        cert = x509.load_pem_x509_certificate((startup / "client.crt").read_bytes())
        root = x509.load_pem_x509_certificate((startup / "rootCA.pem").read_bytes())
        key = serialization.load_pem_private_key((startup / "client.key").read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        return Check("certificates", False, f"cannot read client.crt, client.key or rootCA.pem in {startup} "
                     f"({one_line(exc)})", REPROVISION)
    try:
        cert.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        return Check("certificates", False, f"{startup / 'client.crt'} ({common_name(cert)}) was not issued by "
                     f"this kit's root CA ({startup / 'rootCA.pem'}, {common_name(root)}): the two come from "
                     "different provisionings", REPROVISION)
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key.public_key().public_bytes(serialization.Encoding.DER, public)
            != cert.public_key().public_bytes(serialization.Encoding.DER, public)):
        return Check("certificates", False, f"{startup / 'client.key'} is not the key of client.crt", REPROVISION)
    for name, which in (("client.crt", cert), ("rootCA.pem", root)):
        problem = _validity_problem(which, now, min_days)
        if problem:
            return Check("certificates", False, f"{startup / name} ({common_name(which)}) {problem}",
                         f"ask the consortium lead for a new kit for {common_name(cert)} (re-provision)")
    return Check("certificates", True, f"client.crt ({common_name(cert)}) issued by the kit's root CA "
                 f"({common_name(root)}), valid until {_day(cert.not_valid_after_utc)} "
                 f"({(cert.not_valid_after_utc - now).days} days)")


def check_server(kit: Path, timeout: float = DEFAULT_SERVER_TIMEOUT) -> Check:
    """The server's name resolves, its port accepts TCP and answers a mutual-TLS handshake with a
    certificate of the kit's root CA for the name the kit expects."""
    try:
        address = server_address(kit)
    except SiteError as exc:
        return Check("server", False, str(exc), REPROVISION)
    where = f"{address.host}:{address.port}"
    try:
        socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        return Check("server", False, f"{address.host} (startup/{CLIENT_CONFIG}) is unresolvable "
                     f"({getattr(exc, 'strerror', None) or exc})", "make the name resolve here (DNS or "
                     "/etc/hosts) to the server's address; keep the name: the server's certificate carries it")
    try:
        connection = socket.create_connection((address.host, address.port), timeout=timeout)
    except ConnectionRefusedError:
        return Check("server", False, f"{where} refused the connection (nothing listens on that port)",
                     f"start the server, or check that {address.port} is its fed_learn_port")
    except TimeoutError:
        return Check("server", False, f"{where} timed out after {timeout:g} s (no answer)",
                     f"a firewall drops it: allow TCP out to {where} here and in on the server")
    except OSError as exc:
        return Check("server", False, f"{where} is unreachable ({exc.strerror or exc})",
                     "check this machine's route to the server")
    with connection:
        return _tls_check(Path(kit) / "startup", connection, address, timeout)


def _tls_check(startup: Path, connection: socket.socket, address: ServerAddress, timeout: float) -> Check:
    where = f"{address.host}:{address.port}"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # as NVFlare: the certificate's CN is compared with the identity below
    try:
        context.load_verify_locations(str(startup / "rootCA.pem"))
        context.load_cert_chain(str(startup / "client.crt"), str(startup / "client.key"))
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        return Check("server", False, f"cannot try {where}: the kit's rootCA.pem, client.crt and client.key do not "
                     f"load ({one_line(exc)})", REPROVISION)
    connection.settimeout(timeout)
    try:
        with context.wrap_socket(connection, server_hostname=address.host) as tls:
            der = tls.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError as exc:
        if exc.verify_code in OTHER_CA_CODES:
            return Check("server", False, f"{where} presents a certificate of another CA, not of this kit's "
                         f"root CA ({exc.verify_message})", "this kit and that server come from different "
                         "provisionings: the server must run the server kit of this site's provisioning")
        return Check("server", False, f"{where}: the server's certificate is refused ({exc.verify_message})",
                     "the server needs a new kit (re-provision)")
    except (ssl.SSLError, OSError) as exc:  # timeouts included
        return Check("server", False, f"{where} accepts TCP but no TLS handshake ({one_line(exc) or 'timed out'})",
                     f"check that port {address.port} is the NVFlare server's fed_learn_port")
    name = common_name(x509.load_der_x509_certificate(der))
    if name != address.identity:
        return Check("server", False, f"name mismatch: {where} presents a certificate for '{name}', this kit "
                     f"expects '{address.identity}'", "the server must run the server kit provisioned with "
                     "the name the sites use (re-provision if that name changed)")
    return Check("server", True, f"{address.host} resolves, {where} answers TLS with a certificate for "
                 f"'{name}' from the kit's root CA")


def check_data_folder(data: Path | None) -> Check:
    """One site's data folder (its manifest.csv) that `cxrfl data check` finds usable."""
    if data is None:
        return Check("data", False, f"no data folder given and none configured in the kit's {SITE_CONFIG}",
                     "give --data DIR (this site's folder with its manifest.csv)")
    data = Path(data).absolute()
    if not (data / MANIFEST_NAME).is_file():
        return Check("data", False, f"{data} has no {MANIFEST_NAME}: not one site's data folder",
                     f"give this site's own folder (the one holding its {MANIFEST_NAME}), not a data root")
    report = check_data(data)
    if not report.usable:
        more = f" (and {len(report.errors) - 1} more)" if len(report.errors) > 1 else ""
        return Check("data", False, f"{report.errors[0]}{more}", f"run `cxrfl data check {data}` and fix what "
                     "it reports")
    usable = sum(u for splits in report.counts.values() for u, _ in splits.values())
    total = sum(n for splits in report.counts.values() for _, n in splits.values())
    skipped = f", {len(report.warnings)} warnings (files skipped)" if report.warnings else ""
    return Check("data", True, f"{data}: {usable}/{total} images usable{skipped}")


def check_disk(kit: Path, min_free_gb: float = DEFAULT_MIN_FREE_GB) -> Check:
    free = shutil.disk_usage(kit).free / 1e9
    if free < min_free_gb:
        return Check("disk", False, f"{free:.1f} GB free where the kit is ({kit}), fewer than {min_free_gb:g} GB",
                     "free space there or move the kit to a larger disk: NVFlare writes jobs, models and logs into it")
    return Check("disk", True, f"{free:.1f} GB free in {kit}")


def check_compute(gpu: int | None = None) -> Check:
    """Informational (a CPU-only machine passes), unless `gpu` names a GPU that is not there."""
    cpus = len(os.sched_getaffinity(0))
    count = torch.cuda.device_count()
    gpus = ", ".join(f"{i}: {torch.cuda.get_device_name(i)}" for i in range(count)) or "none"
    detail = f"CPU: {cpus} cores; GPU: {gpus}"
    # Under the unit's Environment=CUDA_VISIBLE_DEVICES=N, GPU N is the only one, as index 0
    index = 0 if gpu is not None and os.environ.get("CUDA_VISIBLE_DEVICES") == str(gpu) else gpu
    if index is not None and index >= count:
        return Check("compute", False, f"{detail}; GPU {gpu} asked for (--gpu) is not there",
                     "give the index of a GPU listed here, or leave --gpu out")
    return Check("compute", True, detail)


def signed_names(startup: Path) -> set[str]:
    try:
        return set(read_json_object(Path(startup) / SIGNATURE_FILE))
    except ValueError:
        return set()


def check_he(kit: Path, required: bool = False) -> Check:
    """The HE secret context, when the project uses HE: NVFlare signs a kit only when it holds an HE
    context (HEBuilder runs before SignatureBuilder), so the kit's signature.json lists it; or
    `required` (--he: a kit that lost both cannot tell)."""
    startup = Path(kit) / "startup"
    context = startup / SECRET_CONTEXT
    listed = SECRET_CONTEXT in signed_names(startup)
    if not context.is_file():
        if not (listed or required):
            return Check("HE", True, "this kit was provisioned without HE (no secret context)")
        why = "the kit's signature.json lists it: the project uses HE" if listed else "--he asks for HE"
        return Check("HE", False, f"{context} is missing ({why})", f"copy startup/{SECRET_CONTEXT} from the "
                     "kit as provisioned (it holds the HE secret key: keep it mode 0600)")
    mode = context.stat().st_mode & 0o777
    if mode & 0o077:
        return Check("HE", False, f"{context} is mode {mode:o}: others may read the HE secret key",
                     f"chmod 600 {context}")
    if not os.access(context, os.R_OK):
        return Check("HE", False, f"{context} is not readable by this user (uid {os.getuid()})",
                     "run the site as the kit's owner")
    return Check("HE", True, f"{context} present, readable by its owner only ({mode:o})")


def run_checks(kit: Path, data: Path | None, *, min_cert_days: int = DEFAULT_MIN_CERT_DAYS,
               min_free_gb: float = DEFAULT_MIN_FREE_GB, gpu: int | None = None, he: bool = False,
               server_timeout: float = DEFAULT_SERVER_TIMEOUT) -> list[Check]:
    """Every pre-flight check of a site, in order; `data` None: the one the kit has configured."""
    kit = Path(kit).absolute()
    if data is None:
        data = configured_data(kit)
    return [check_kit(kit), check_certificates(kit, min_cert_days), check_server(kit, server_timeout),
            check_data_folder(data), check_disk(kit, min_free_gb), check_compute(gpu), check_he(kit, he)]


# --------------------------------------------------------------------------- configuration, start, stop, status


def site_config(kit: Path) -> dict:
    path = Path(kit) / SITE_CONFIG
    if not path.is_file():
        return {}
    try:
        return read_json_object(path)
    except ValueError as exc:
        raise SiteError(str(exc)) from None


def configured_data(kit: Path) -> Path | None:
    data_dir = site_config(kit).get("data_dir")
    return Path(data_dir) if data_dir else None


def write_site_config(kit: Path, data: Path, gpu: int | None = None) -> Path:
    """The kit's local/cxrfl_site.json: the data folder the site's jobs read, and the GPU it runs on; a
    "torch_threads" the site set by hand is kept."""
    try:
        kept = {k: v for k, v in site_config(kit).items() if k == "torch_threads"}
    except SiteError:  # an unreadable earlier file is replaced, as before
        kept = {}
    config = {"data_dir": str(Path(data).absolute()), **kept}
    if gpu is not None:
        config["cuda_visible_devices"] = str(gpu)
    path = Path(kit) / SITE_CONFIG
    try:
        write_json(path, config)
    except OSError as exc:
        raise SiteError(f"{path}: cannot write the site's configuration ({exc.strerror or exc})") from None
    return path


def client_environment(gpu: int | None) -> dict:
    env = dict(os.environ)
    env.pop("NVFL_WORKSPACE", None)  # sub_start.sh would run the client in that folder, not in the kit
    # sub_start.sh runs `python3`: this environment's, the one with NVFlare and cxr-fl
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return env


def remove_control_files(kit: Path) -> None:
    for name in CONTROL_FILES:
        (Path(kit) / name).unlink(missing_ok=True)


@dataclass(frozen=True)
class StartedSite:
    pid: int  # startup/sub_start.sh: it starts the client and restarts it when it dies
    log: Path
    console: Path


def refuse_if_running(kit: Path) -> None:
    running = workspace_process_list(kit)
    if running:
        raise SiteError(f"{kit} is already running (PIDs {', '.join(str(p.pid) for p in running)}); "
                        f"stop it first: cxrfl site stop --kit {shlex.quote(str(kit))}")


def start_site(kit: Path, data: Path, gpu: int | None = None) -> StartedSite:
    """Write the site's configuration and start the kit's client in its own session (it outlives
    this command). The caller has run the checks; SiteError if the kit's processes already run."""
    kit = require_client_kit(kit)
    refuse_if_running(kit)
    write_site_config(kit, data, gpu)
    remove_control_files(kit)
    console = kit / CONSOLE_LOG
    with open(console, "ab") as out:
        process = subprocess.Popen(["bash", str(kit / "startup" / "sub_start.sh")], cwd=kit,
                                   env=client_environment(gpu), stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = process.wait(timeout=1)
    except subprocess.TimeoutExpired:
        return StartedSite(process.pid, kit / NVFLARE_LOG, console)
    last = console.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
    raise SiteError(f"startup/sub_start.sh ended at once (exit {code}): {one_line(last[0])}; see {console}")


def stop_site(kit: Path) -> tuple[list[Process], list[Process]]:
    """Stop the kit's NVFlare processes (and only those); (the ones found, the ones still running)."""
    kit = require_client_kit(kit)
    found = workspace_process_list(kit)
    left = stop_processes(found) if found else []
    if not left:
        remove_control_files(kit)
    return found, left


@dataclass(frozen=True)
class SiteStatus:
    processes: list[Process]
    data_dir: str | None
    gpu: str | None
    log: Path
    last_connection: str | None


def last_connection_line(log: Path) -> str | None:
    """The last line of NVFlare's client log about its connection to the server."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    return next((line.strip() for line in reversed(lines) if any(m in line for m in CONNECTION_MARKERS)), None)


def site_status(kit: Path) -> SiteStatus:
    kit = require_client_kit(kit)
    config = site_config(kit)
    log = kit / NVFLARE_LOG
    return SiteStatus(workspace_process_list(kit), config.get("data_dir"), config.get("cuda_visible_devices"), log,
                      last_connection_line(log))


# --------------------------------------------------------------------------- systemd


def _unit_word(word: str) -> str:
    """One argument of a systemd command line (systemd.service(5): quoting and % specifiers)."""
    word = word.replace("%", "%%")
    if word and not any(c in word for c in ' \t"\\\''):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _unit_command(argv: list[str]) -> str:
    return " ".join(_unit_word(a) for a in argv)


def systemd_unit(kit: Path, data: Path, gpu: int | None = None, user: str | None = None) -> str:
    """A systemd service running the kit's startup/sub_start.sh in the foreground (Type=simple:
    it stays, starts the client and restarts it when it dies; an admin console `shutdown` ends it
    with status 0, which Restart=on-failure leaves down), after the site's pre-flight check."""
    kit = require_client_kit(kit)
    check = [sys.executable, "-m", "cxrfl.cli", "site", "check", "--kit", str(kit),
             "--data", str(Path(data).absolute())]
    start = [shutil.which("bash") or "/bin/bash", str(kit / "startup" / "sub_start.sh")]
    env = [f"PATH={Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    if gpu is not None:
        check += ["--gpu", str(gpu)]
        env.append(f"CUDA_VISIBLE_DEVICES={gpu}")
    owner = [f"# {user} must own {kit}: NVFlare writes its log and job folders into the kit", f"User={user}"]
    return "\n".join([
        "[Unit]", f"Description=cxr-fl hospital site {site_name(kit)} (NVFlare client)",
        "Wants=network-online.target", "After=network-online.target", "",
        "[Service]", "Type=simple", *(owner if user else []),
        f"WorkingDirectory={str(kit).replace('%', '%%')}", f"Environment={_unit_command(env)}",
        "UnsetEnvironment=NVFL_WORKSPACE", f"ExecStartPre={_unit_command(check)}", f"ExecStart={_unit_command(start)}",
        "Restart=on-failure", "RestartSec=30", "KillMode=control-group", "TimeoutStopSec=30", "",
        "[Install]", "WantedBy=multi-user.target", ""])


def site_name(kit: Path) -> str:
    """The site's name, as its kit's client config names it (client.fqsn) or the kit folder."""
    try:
        return str(read_json_object(Path(kit) / "startup" / CLIENT_CONFIG)["client"]["fqsn"])
    except (ValueError, KeyError, TypeError):
        return Path(kit).name
