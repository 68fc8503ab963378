"""The admin side of any deployment (cxrfl/fl/admin.py, `cxrfl submit` / `cxrfl wait`): wrong kits,
unknown jobs, sites that are not there and jobs NVFlare ended early, without a running server (the
rehearsal, tests/test_rehearsal.py, runs the whole path)."""

from __future__ import annotations

import json

import pytest

from cxrfl.cli import main
from cxrfl.fl import admin
from cxrfl.fl.admin import AdminError, AdminKit
from cxrfl.fl.config import FLConfig


def _kit(tmp_path, body=None):
    kit = tmp_path / "admin@x.org"
    (kit / "startup").mkdir(parents=True)
    (kit / "startup" / "fed_admin.json").write_text(json.dumps(body if body is not None else {
        "admin": {"username": "admin@x.org", "host": "fl.example.org", "port": 8002}}))
    return kit


def test_a_folder_that_is_not_an_admin_kit_is_refused_in_one_line(tmp_path, capsys):
    site_kit = tmp_path / "hospital"
    (site_kit / "startup").mkdir(parents=True)
    for command in (["wait", "job-1"], ["submit", "--task", "classify"]):
        assert main([*command, "--admin-kit", str(site_kit)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "not an admin startup kit" in err and str(site_kit) in err
    broken = _kit(tmp_path, body={"admin": {"username": "a"}})
    with pytest.raises(AdminError, match="fed_admin.json: not a readable admin configuration"):
        AdminKit.open(broken)


def test_the_kit_names_user_server_and_where_jobs_are_kept(tmp_path):
    kit = AdminKit.open(_kit(tmp_path))
    assert (kit.user, kit.server, kit.jobs_dir) == ("admin@x.org", "fl.example.org:8002",
                                                    tmp_path / "admin@x.org" / "cxrfl_jobs")


def test_waiting_for_a_job_not_submitted_from_this_kit_is_refused_and_writes_nothing(tmp_path, capsys):
    kit = _kit(tmp_path)
    run = tmp_path / "run"
    assert main(["wait", "job-1", "--admin-kit", str(kit), "--out", str(run)]) == 2
    assert "job job-1 was not submitted with cxrfl from this admin kit" in capsys.readouterr().err
    assert not any(run.iterdir()) if run.exists() else True


def test_named_sites_must_be_connected_unless_missing_sites_are_allowed(tmp_path, monkeypatch):
    kit = AdminKit.open(_kit(tmp_path))
    monkeypatch.setattr(admin, "connected_sites", lambda kit, timeout=60: ["a", "b"])
    assert admin.expected_sites(kit, None, False) == ["a", "b"]  # default: every connected site
    assert admin.expected_sites(kit, ["a", "b"], False) == ["a", "b"]
    with pytest.raises(AdminError, match="sites c are not connected to fl.example.org:8002 .*--allow-missing-sites"):
        admin.expected_sites(kit, ["a", "c"], False)
    assert admin.expected_sites(kit, ["a", "c"], True) == ["a", "c"]
    monkeypatch.setattr(admin, "connected_sites", lambda kit, timeout=60: [])
    with pytest.raises(AdminError, match="no site is connected"):
        admin.expected_sites(kit, None, False)


def test_a_job_nvflare_ended_early_fails_with_its_rounds_and_the_servers_reasons(tmp_path):
    server = tmp_path / "download" / "job" / "workspace"
    (server / "app_server" / "rounds").mkdir(parents=True)
    (server / "app_server" / "rounds" / "global_round_000.pt").write_bytes(b"")
    (server / "log.txt").write_text(
        "2026-11-30 02:36:21,737 - ScatterAndGather - INFO - [identity=x] - Round 0 started.\n"
        "2026-11-30 02:36:56,964 - WFCommServer - ERROR - Client university-clinic is deemed disconnected!\n"
        "2026-11-30 02:36:56,965 - WFCommServer - ERROR - [identity=x, run=y] - Alive clients 2 < required min 3\n"
        "2026-11-30 02:36:56,965 - WFCommServer - ERROR - [identity=x, run=y] - Alive clients 2 < required min 3\n")
    cfg = FLConfig(task="classify", rounds=3, sites=("a", "b", "university-clinic"))
    error = admin.job_failed(cfg, "job J ended as FINISHED:EXECUTION_EXCEPTION", tmp_path / "download", tmp_path,
                             "resume with ...")
    assert str(error) == ("job J ended as FINISHED:EXECUTION_EXCEPTION after 1 of 3 rounds: Client university-clinic "
                          "is deemed disconnected!; Alive clients 2 < required min 3; resume with ...")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["rounds_run"] == 1 and metrics["error"] == str(error)
    assert metrics["resumable"] is True  # unlike a run whose rounds lacked updates
    nothing = admin.job_failed(cfg, "job K ended as FINISHED:ABORTED", tmp_path / "empty", tmp_path, "hint")
    assert "after 0 of 3 rounds: the server's log names no error; hint" in str(nothing)


def test_two_submitters_in_the_same_millisecond_export_into_folders_of_their_own(tmp_path, monkeypatch):
    """Two `cxrfl submit` from one admin kit at once (the rehearsal's two drills) once shared a
    folder named by the millisecond, and NVFlare's export failed with 'Directory not empty'."""
    from concurrent.futures import ThreadPoolExecutor

    from cxrfl.fl.simulator import export_job

    kit = AdminKit.open(_kit(tmp_path))
    monkeypatch.setattr(admin.time, "time", lambda: 1796463846.437)
    cfg = FLConfig(task="classify", data_root=None, sites=("site-1", "site-2"), rounds=1, model="cnn5",
                   image_size=32)
    with ThreadPoolExecutor(2) as pool:
        jobs = list(pool.map(lambda _: export_job(cfg, admin.new_job_folder(kit, cfg.job_name)), range(2)))
    assert jobs[0] != jobs[1] and all(job.parent.parent == kit.jobs_dir for job in jobs)
    for job in jobs:
        assert (job / "meta.json").is_file() and [p.name for p in job.parent.iterdir()] == [cfg.job_name]
