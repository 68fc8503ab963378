"""The `cxrfl` command: every (sub)command explains itself; the data commands chain end to end."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from cxrfl.cli import build_parser, main
from lightning_modules.data.manifest import load_split, read_manifest, resolve, site_dirs, write_manifest

SUBCOMMANDS = [[], ["data"], ["data", "synth"], ["data", "import"], ["data", "split"], ["data", "check"], ["central"]]


@pytest.mark.parametrize("words", SUBCOMMANDS, ids=lambda w: " ".join(w) or "cxrfl")
def test_every_command_has_help(words, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(words + ["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: cxrfl" in out and len(out) > 300


def test_training_options_share_names(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["central", "--help"])
    out = capsys.readouterr().out
    for option in ("--data", "--image-size", "--batch-size", "--lr", "--seed", "--out"):
        assert option in out


def test_every_training_option_is_one_config_field_shared_by_central_and_federated_commands():
    """Options come from TrainConfig/FLConfig fields only: the same flag parses to the same config
    field in `central`, `sim`, `export` and `poc submit`, and `--roi` means the same everywhere."""
    import dataclasses

    from cxrfl.options import config_from_args
    from cxrfl.fl.config import FLConfig
    from lightning_modules.config import TrainConfig

    shared = ["--task", "classify", "--roi", "crop", "--model", "cnn5", "--image-size", "48", "--batch-size", "4",
              "--lr", "0.01", "--seed", "7", "--roi-threshold", "0.3", "--class-weights", "none", "--limit", "5"]
    parser = build_parser()
    central = config_from_args(TrainConfig, parser.parse_args(["central", *shared, "--epochs", "3"]))
    for argv in (["sim", *shared], ["export", *shared], ["poc", "submit", *shared]):
        fl = config_from_args(FLConfig, parser.parse_args(argv + ["--local-epochs", "3"]))
        common = {f.name for f in dataclasses.fields(TrainConfig)} - {"rounds"}  # a central run is one round
        assert {k: getattr(fl, k) for k in common} == {k: getattr(central, k) for k in common}, argv
    shorthand = config_from_args(FLConfig, parser.parse_args(["sim", "--task", "roi", "--roi-mode", "crop"]))
    assert (shorthand.task, shorthand.roi) == ("classify", "crop")


def test_console_script_and_module_entry_point():
    exe = shutil.which("cxrfl") or str(__import__("pathlib").Path(sys.executable).parent / "cxrfl")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("cxrfl ")
    out = subprocess.run([sys.executable, "-m", "cxrfl", "--help"], capture_output=True, text=True, check=True)
    assert "central" in out.stdout and "data" in out.stdout


@pytest.mark.parametrize("argv", [
    ["central", "--task", "classify", "--epochs", "0"],
    ["central", "--task", "classify", "--lr", "-1"],
    ["central", "--task", "classify", "--image-size", "0"],
    ["central", "--task", "detect"],
])
def test_out_of_range_arguments_fail_fast(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_missing_data_root_says_how_to_fix(tmp_path):
    with pytest.raises(SystemExit, match="cxrfl data synth"):
        main(["central", "--task", "classify", "--data", str(tmp_path / "nowhere")])


def test_synth_then_pool_then_split_then_check(tmp_path, capsys):
    synth = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(synth), "--sites", "2", "--per-site", "12", "--size", "40",
                 "--test-size", "6", "--seed", "1"]) == 0
    assert [p.name for p in site_dirs(synth)] == ["site-1", "site-2"]
    assert main(["data", "check", str(synth)]) == 0

    # pool every image into one manifest with absolute paths, as an importer would, then re-split
    pooled = []
    for folder in site_dirs(synth) + [synth / "test"]:
        for r in read_manifest(folder / "manifest.csv"):
            r.image, r.mask = str(resolve(folder, r.image)), str(resolve(folder, r.mask))
            r.opacity = str(resolve(folder, r.opacity)) if r.opacity else ""
            r.split = ""
            pooled.append(r)
    write_manifest(tmp_path / "pooled.csv", pooled)
    out = tmp_path / "split"
    assert main(["data", "split", "--manifest", str(tmp_path / "pooled.csv"), "--out", str(out), "--sites", "3",
                 "--mode", "dirichlet", "--alpha", "0.5", "--seed", "2"]) == 0
    assert len(site_dirs(out)) == 3
    total = sum(len(load_split(out, s)) for s in ("train", "val", "test"))
    assert total == len(pooled)
    capsys.readouterr()
    assert main(["data", "check", str(out)]) == 0
    assert "0 errors" in capsys.readouterr().out
