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
    assert (kits / project["participants"][0]["name"] / "startup" / "server.crt").is_file()
