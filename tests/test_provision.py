"""provision/project.yml is a valid NVFlare project: the provisioner builds every startup kit."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

PROJECT = Path(__file__).resolve().parents[1] / "provision" / "project.yml"


def test_cxrfl_provision_builds_a_kit_per_participant_and_says_who_gets_which(tmp_path, capsys):
    """`cxrfl provision` = the project check + NVFlare's provisioner (production, not POC)."""
    from cxrfl.cli import main

    project = yaml.safe_load(PROJECT.read_text())
    assert main(["provision", "--out", str(tmp_path / "ws")]) == 0
    printed = capsys.readouterr().out
    for participant in project["participants"]:
        assert f"- {participant['name']} (" in printed, participant["name"]
    assert "open TCP port 8002 inbound" in printed and "connects out to server.cxr-fl.local:8002 only" in printed
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


def test_provision_refuses_a_used_output_folder_and_keeps_it(tmp_path, capsys):
    from cxrfl.cli import main

    out = tmp_path / "kits"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["provision", "--out", str(out)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def _mutated(change) -> dict:
    project = yaml.safe_load(PROJECT.read_text())
    change(project)
    return project


def _builders(project, order):
    by_name = {b["path"].rsplit(".", 1)[-1]: b for b in project["builders"]}
    project["builders"] = [by_name[name] for name in order]


@pytest.mark.parametrize("change,message", [
    (lambda p: p["participants"][0].update(name="https://server.cxr-fl.local:8002"), "is not a host name"),
    (lambda p: p["participants"][0].update(name="server_1"), "is not a host name"),
    (lambda p: p["participants"][2].update(name="st-mary-hospital"), "used twice: st-mary-hospital"),
    (lambda p: p["participants"][0].update(fed_learn_port=70000), "is not a TCP port"),
    (lambda p: p.update(participants=[q for q in p["participants"] if q["type"] != "client"]), "no participant of type client"),
    (lambda p: p.update(participants=[q for q in p["participants"] if q["type"] != "server"]), "exactly one participant of type server"),
    (lambda p: _builders(p, ["PrivateKeyModes", "WorkspaceBuilder", "StaticFileBuilder", "CertBuilder", "HEBuilder",
                             "SignatureBuilder"]), "must come in this order"),
    (lambda p: _builders(p, ["WorkspaceBuilder", "PrivateKeyModes", "StaticFileBuilder", "HEBuilder", "CertBuilder",
                             "SignatureBuilder"]), "PrivateKeyModes must be the first builder"),
    (lambda p: p.update(api_version=2), "api_version must be 3"),
])
def test_an_obviously_wrong_project_is_refused_before_nvflare_runs(change, message, tmp_path, capsys):
    from cxrfl.cli import main
    from cxrfl.fl.provision import project_problems

    assert project_problems(yaml.safe_load(PROJECT.read_text())) == []  # the shipped file passes
    bad = tmp_path / "project.yml"
    bad.write_text(yaml.safe_dump(_mutated(change)))
    assert main(["provision", "--project", str(bad), "--out", str(tmp_path / "kits")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(bad) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "kits").exists()  # refused before anything was written


def test_provisioning_again_with_the_same_ca_adds_a_hospital_without_new_kits_for_the_others(tmp_path, capsys):
    from cxrfl.cli import main

    out = tmp_path / "kits"
    assert main(["provision", "--out", str(out)]) == 0
    project = yaml.safe_load(PROJECT.read_text())
    project["participants"].append({"name": "new-hospital", "type": "client", "org": "new_hospital"})
    grown = tmp_path / "project.yml"
    grown.write_text(yaml.safe_dump(project, sort_keys=False))
    assert main(["provision", "--project", str(grown), "--out", str(out)]) == 2  # a used folder, no --same-ca
    assert "--same-ca" in capsys.readouterr().err and not (out / "cxr_fl" / "prod_01").exists()
    assert main(["provision", "--project", str(grown), "--out", str(out), "--same-ca"]) == 0
    first, second = out / "cxr_fl" / "prod_00", out / "cxr_fl" / "prod_01"
    assert (second / "new-hospital" / "startup" / "client.crt").is_file()
    root = (first / "st-mary-hospital" / "startup" / "rootCA.pem").read_bytes()
    assert (second / "new-hospital" / "startup" / "rootCA.pem").read_bytes() == root  # the kits handed out still fit
    assert main(["provision", "--out", str(tmp_path / "fresh"), "--same-ca"]) == 2
    assert "holds no earlier provisioning" in capsys.readouterr().err


def test_server_storage_and_heartbeat_go_into_the_server_kit(tmp_path):
    import json

    from cxrfl.fl.provision import provision

    kits = provision(PROJECT, tmp_path / "kits", server_storage=tmp_path / "store", heartbeat_timeout=45)
    server = next(k for k in kits if k.role == "server")
    resources = json.loads((server.path / "local" / "resources.json").read_text())
    assert resources["servers"][0]["heart_beat_timeout"] == 45
    assert resources["snapshot_persistor"]["args"]["storage"]["args"]["root_dir"] == str(tmp_path / "store" / "snapshot-storage")
    assert [c["args"]["uri_root"] for c in resources["components"] if c["id"] == "job_manager"] == [
        str(tmp_path / "store" / "jobs-storage")]
