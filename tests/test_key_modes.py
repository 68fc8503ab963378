"""Private and secret keys are readable by their owner only (0600 in a 0700 folder): after
`nvflare provision` of provision/project.yml, in a POC workspace, in a simulator's HE startup
folder, wherever NVFlare's provisioner or HEBuilder left them to the umask (0644)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import readable_private_keys

from cxrfl.keyfiles import restrict_private_files

PROJECT = Path(__file__).resolve().parents[1] / "provision" / "project.yml"


@pytest.fixture(autouse=True)
def usual_umask():
    """Files made with the common umask 022 (0644), as on the machine where the issue was found."""
    before = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(before)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_provisioning_leaves_every_private_key_to_its_owner(tmp_path):
    nvflare = Path(sys.executable).parent / "nvflare"
    out = subprocess.run([str(nvflare), "provision", "-p", str(PROJECT), "-w", str(tmp_path / "ws")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    project = tmp_path / "ws" / "cxr_fl"
    assert (project / "state" / "cert.json").is_file()  # the root CA's key and every participant's
    assert len(list(project.rglob("client_context.tenseal"))) == 3
    assert readable_private_keys(project) == []


def test_a_poc_workspace_keeps_its_keys_private(tmp_path, monkeypatch):
    from cxrfl.fl.poc import poc_down, poc_prepare
    from lightning_modules.data.phantom import generate_dataset

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    generate_dataset(tmp_path / "data", sites=2, per_site=4, test_size=2, size=32, seed=2)
    state = poc_prepare(tmp_path / "ws", 2, tmp_path / "data", he=True)
    try:
        assert list(Path(state["workspace"]).rglob("cert.json")) and list(Path(state["kits"]).rglob("*.key"))
        assert readable_private_keys(tmp_path / "ws") == []
    finally:
        poc_down(tmp_path / "ws", clean=True)


def test_the_simulators_he_contexts_keep_the_secret_key_private(tmp_path):
    from cxrfl.fl.he_keys import CLIENT_CONTEXT, SERVER_CONTEXT, write_he_contexts

    startup = tmp_path / "workspace" / "startup"
    startup.mkdir(parents=True)
    (startup / CLIENT_CONTEXT).write_bytes(b"an earlier run's context, 0644")
    write_he_contexts(startup)
    assert readable_private_keys(tmp_path) == []
    assert _mode(startup / CLIENT_CONTEXT) == 0o600 and _mode(startup) == 0o700
    assert (startup / SERVER_CONTEXT).stat().st_size > 0 and not list(startup.glob(".*.tmp"))


def test_key_files_are_found_by_name_and_content_and_only_they_change(tmp_path):
    from cxrfl.fl.he_keys import CLIENT_CONTEXT, SERVER_CONTEXT, write_he_contexts

    write_he_contexts(tmp_path / "he")
    secret, public = ((tmp_path / "he" / name).read_bytes() for name in (CLIENT_CONTEXT, SERVER_CONTEXT))
    files = {
        "kit/startup/client.key": b"by name",
        "kit/state/cert.json": b'{"root_pri_key": "-----BEGIN PRIVATE KEY-----\\nMIIE..."}',
        "kit/notes/backup.pem": b"-----BEGIN EC PRIVATE KEY-----\nMHcC...\n-----END EC PRIVATE KEY-----\n",
        "kit/renamed/site.tenseal": secret,  # a secret context under another name
        "kit/public/rootCA.pem": b"-----BEGIN CERTIFICATE-----\nMIID...\n",
        "kit/public/server.tenseal": public,
        "kit/public/readme.txt": b"nothing secret",
    }
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
        os.chmod(tmp_path / name, 0o644)
    kit = tmp_path / "kit"
    assert len(readable_private_keys(kit)) == 4  # the test's own walker sees them first
    assert sorted(p.relative_to(tmp_path).as_posix() for p in restrict_private_files(kit)) == sorted(
        ["kit/startup/client.key", "kit/state/cert.json", "kit/notes/backup.pem", "kit/renamed/site.tenseal"])
    assert readable_private_keys(kit) == []
    for name in ["rootCA.pem", "server.tenseal", "readme.txt"]:  # public material keeps its mode
        assert _mode(kit / "public" / name) == 0o644
    assert _mode(kit / "public") == 0o755
