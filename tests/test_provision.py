"""provision/project.yml is a valid NVFlare project: the provisioner builds every startup kit."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parents[1] / "provision" / "project.yml"


def test_nvflare_provisions_a_kit_per_participant(tmp_path):
    project = yaml.safe_load(PROJECT.read_text())
    nvflare = shutil.which("nvflare") or str(Path(sys.executable).parent / "nvflare")
    out = subprocess.run([nvflare, "provision", "-p", str(PROJECT), "-w", str(tmp_path / "ws")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    kits = tmp_path / "ws" / project["name"] / "prod_00"
    sites = [p["name"] for p in project["participants"] if p["type"] == "client"]
    assert len(sites) == 3 and all(not s.startswith("site-") for s in sites)  # hospital names
    for participant in project["participants"]:
        startup = kits / participant["name"] / "startup"
        assert (startup / "rootCA.pem").is_file(), participant["name"]  # mutual TLS material
    for site in sites:
        assert (kits / site / "startup" / "client.crt").is_file()
    server = kits / project["participants"][0]["name"] / "startup"
    assert (server / "server.crt").is_file()
    # HE: every site holds the TenSEAL context with the secret key, the server one without it
    for site in sites:
        assert (kits / site / "startup" / "client_context.tenseal").is_file()
    assert (server / "server_context.tenseal").is_file() and not (server / "client_context.tenseal").exists()


def test_poc_project_is_the_production_file_on_one_machine():
    from cxrfl.fl.poc import poc_project

    plain = poc_project(2, 12345, he=False)
    server = plain["participants"][0]
    assert server["name"] == "localhost" and server["fed_learn_port"] == server["admin_port"] == 12345
    assert [p["name"] for p in plain["participants"] if p["type"] == "client"] == [
        "st-mary-hospital", "city-general-hospital"]
    assert not any(b["path"].endswith("HEBuilder") for b in plain["builders"])
    # only the admins of organisations that take part
    assert {p["org"] for p in plain["participants"] if p["type"] == "admin"} <= {"coordinator", "st_mary", "city_general"}
    he = poc_project(4, 12345, he=True)
    paths = [b["path"].rsplit(".", 1)[-1] for b in he["builders"]]
    assert paths.index("HEBuilder") < paths.index("CertBuilder")
    assert [p["name"] for p in he["participants"] if p["type"] == "client"][-1] == "hospital-4"
