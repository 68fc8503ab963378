"""Federated jobs in the NVFlare simulator, end to end on tiny synthetic data (2 sites, 1-2 rounds).

The simulator exits 0 even when a client crashes, so every test checks the files it produced.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import pytest
import torch

from app_custom.global_model import GlobalModel
from app_custom.yogi import Yogi
from cxrfl.cli import main
from lightning_modules.classification import CXRClassifier
from lightning_modules.config import TRAIN_CONFIG_FILE, TrainConfig
from lightning_modules.data.manifest import read_manifest, write_manifest
from lightning_modules.data.phantom import generate_dataset
from lightning_modules.networks import normalisation_state_keys
from lightning_modules.segmentation import LungSegmentation

COMMON = ["--sites", "2", "--image-size", "32", "--batch-size", "8"]


@pytest.fixture(scope="module")
def fl_root(tmp_path_factory):
    """Two sites of different sizes (so sample weighting matters), each with its own test split, plus
    the shared test set."""
    root = tmp_path_factory.mktemp("fl-data")
    generate_dataset(root, sites=2, per_site=30, test_size=16, size=48, seed=3, site_test=6)
    manifest = root / "site-2" / "manifest.csv"
    rows = read_manifest(manifest)
    keep = [r for r in rows if r.split != "train"] + [r for r in rows if r.split == "train"][:10]
    write_manifest(manifest, keep)
    return root


def _train_count(root, site):
    return sum(1 for r in read_manifest(root / site / "manifest.csv") if r.split == "train")


def _load(path):
    return {k: torch.as_tensor(v) for k, v in torch.load(path, map_location="cpu", weights_only=False)["model"].items()}


@pytest.fixture(scope="module")
def classify_run(fl_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("fl") / "classify"
    rc = main(["sim", "--task", "classify", "--data", str(fl_root), "--rounds", "2", "--model", "cnn5",
               "--record-contributions", "--wandb", "--out", str(run)] + COMMON)
    assert rc == 0
    return run


def test_classification_job_writes_models_metrics_and_logs(classify_run):
    run = classify_run
    for name in ("global_final.pt", "global_best.pt", "rounds/global_round_000.pt", "rounds/global_round_001.pt"):
        module = CXRClassifier(model="cnn5", num_classes=2)
        module.load_state_dict(_load(run / "models" / name))  # strict: every key fits the LightningModule
    summary = json.loads((run / "metrics.json").read_text())
    assert 0 <= summary["test"]["test_auroc"] <= 1
    # the selected model is the one the sites' cross-site validation ranks higher (never the test set)
    matrix = json.loads((run / "cross_site.json").read_text())["matrix"]
    site_mean = {m: sum(matrix[m][s]["val_auroc"] for s in ("site-1", "site-2")) / 2 for m in ("global_best", "global_final")}
    expected = "global_final" if site_mean["global_final"] > site_mean["global_best"] else "global_best"
    assert summary["selected_model"] == expected
    assert summary["test"] == summary["test_by_model"][expected]
    # every model also on each site's own test split, reported by the site (its test images stay there)
    for model in ("global_best", "global_final", "local_site-1", "local_site-2"):
        for site in ("site-1", "site-2"):
            assert 0 <= matrix[model][site]["site_test_auroc"] <= 1 and matrix[model][site]["site_test_loss"] > 0
            assert summary["site_test"][model][site] == matrix[model][site]["site_test_auroc"]
    config = json.loads((run / "config.json").read_text())
    assert config["rounds"] == 2 and config["sites"] == ["site-1", "site-2"] and config["aggregation"] == "fedavg"
    rounds = [json.loads(line) for line in (run / "metrics" / "round_metrics.jsonl").read_text().splitlines()]
    assert {(r["round"], s["name"]) for r in rounds for s in r["sites"]} == {
        (0, "site-1"), (0, "site-2"), (1, "site-1"), (1, "site-2")}
    assert all("val_auroc" in {m["name"] for m in s["metrics"]} for r in rounds for s in r["sites"])
    assert list((run / "tb" / "site-1").glob("events.out.tfevents*"))
    assert (run / "job" / "cxrfl_classify" / "meta.json").is_file()
    log = (run / "simulator.log").read_text()
    # each of the 2 sites trains with its share of the cores, set from its local/cxrfl_site.json
    assert log.count(f"; {max(1, (os.cpu_count() or 1) // 2)} torch threads") == 2


def test_federated_threshold_comes_from_the_sites_validation_histograms(classify_run, fl_root):
    """The selected model's threshold is the one the sites' validation scores give when pooled
    (recomputed here from each site's own validation split), and `predict` uses it."""
    from cxrfl.models import load_classifier
    from lightning_modules.data.datamodule import CXRDataModule
    from lightning_modules.operating_point import histogram_counts, score_histogram, threshold_from_histograms

    summary = json.loads((classify_run / "metrics.json").read_text())
    point = summary["operating_point"]
    assert point["rule"] == "youden" and point["sites"] == 2
    clf = load_classifier(classify_run)
    histograms = []
    for site in ("site-1", "site-2"):
        dm = CXRDataModule(fl_root, task="classify", image_size=32, batch_size=8, sites=[site], seed=0)
        dm.classes = clf.classes
        dm.setup("validate")
        logits, labels = clf.module.logits_and_labels(dm.val_dataloader())
        histograms.append(histogram_counts(score_histogram(torch.softmax(logits, 1)[:, 1], labels)))
    assert point["threshold"] == pytest.approx(threshold_from_histograms(histograms)["threshold"])
    assert clf.threshold == pytest.approx(point["threshold"])
    assert {"test_acc_at_threshold", "test_sensitivity_at_threshold", "test_ece"} <= set(summary["test"])
    with open(classify_run / "test_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["predicted"] == ("pneumonia" if float(r["p_pneumonia"]) >= point["threshold"] else "normal")
                        for r in rows)


def test_global_model_is_the_sample_weighted_mean_of_the_sites(classify_run, fl_root):
    rounds = classify_run / "models" / "rounds"
    log = [json.loads(line) for line in (rounds / "round_log.jsonl").read_text().splitlines()]
    weights = {(e["round"], e["site"]): e["weight"] for e in log if "site" in e}  # contributions, not global models
    assert [e["fresh"] for e in log if e.get("global_model")] == [["site-1", "site-2"]] * 2  # who made each
    # aggregation weight = the site's number of training samples, not its number of batches
    for site in ("site-1", "site-2"):
        assert weights[(1, site)] == _train_count(fl_root, site)
    assert weights[(1, "site-1")] != weights[(1, "site-2")]

    sent = {site: _load(rounds / f"{site}_round_001.pt") for site in ("site-1", "site-2")}
    expected_total = sum(weights[(1, s)] for s in sent)
    global_1 = _load(rounds / "global_round_001.pt")
    global_0 = _load(rounds / "global_round_000.pt")
    for key, value in global_1.items():
        if not value.is_floating_point():
            continue
        mean = sum(weights[(1, s)] * sent[s][key].double() for s in sent) / expected_total
        torch.testing.assert_close(value.double(), mean, rtol=1e-5, atol=1e-6)
    changed = [k for k in global_1 if global_1[k].is_floating_point() and not torch.equal(global_1[k], global_0[k])]
    assert len(changed) > len(global_1) // 2  # the global model moved between rounds


def test_what_reaches_the_server_is_the_models_tensors_and_a_few_numbers(classify_run):
    """The server-side record of each received update: the network's own parameter tensors (names and
    shapes of the model, nothing image-shaped), and meta/headers of counts, metrics and routing ids."""
    expected = CXRClassifier(model="cnn5", num_classes=2).state_dict()
    received = sorted((classify_run / "models" / "rounds").glob("site-*_round_*.pt"))
    assert len(received) == 4  # 2 sites x 2 rounds
    for path in received:
        update = torch.load(path, map_location="cpu", weights_only=False)
        tensors = {k: torch.as_tensor(v) for k, v in update["model"].items()}
        assert set(tensors) == set(expected) - {k for k in expected if k.startswith("class_weights")}, path.name
        for name, value in tensors.items():
            assert value.shape == expected[name].shape, name
            assert not (value.dim() >= 2 and tuple(value.shape[-2:]) == (32, 32)), name  # no 32x32 image planes
        extras = {**update["meta"], **update["headers"]}
        assert len(json.dumps(extras, default=str)) < 4096  # a few numbers and ids, not data
        flat = json.dumps(extras, default=str).lower()
        for leak in (".png", ".dcm", "patient", "image_path", "/site-"):
            assert leak not in flat, (leak, extras)
        assert update["meta"]["NUM_STEPS_CURRENT_ROUND"] == update["weight"]


def test_tracking_gets_metrics_but_no_image_file_or_patient_id(classify_run, fl_root):
    """TensorBoard and the offline W&B run of a job hold scalars only: no image summaries, and no
    file name or patient id of any site's images anywhere in their files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted((classify_run / "tb").rglob("events.out.tfevents.*"))
    assert events
    for event_file in events:
        acc = EventAccumulator(str(event_file))
        acc.Reload()
        tags = acc.Tags()
        assert not tags.get("images") and not tags.get("audio") and not tags.get("histograms")
    identifiers = set()
    for site in ("site-1", "site-2"):
        for record in read_manifest(fl_root / site / "manifest.csv"):
            identifiers |= {Path(record.image).name, record.patient_id}
    identifiers = {i for i in identifiers if len(i) >= 6} | {str(fl_root)}  # nor the data root's path
    tracked = [f for folder in ("tb", "wandb") for f in (classify_run / folder).rglob("*") if f.is_file()]
    assert any("wandb" in str(f) for f in tracked)
    for f in tracked:
        blob = f.read_bytes()
        leaked = [i for i in identifiers if i.encode() in blob]
        assert not leaked, (f, leaked[:3])


def test_cross_site_matrix_has_every_cell(classify_run):
    data = json.loads((classify_run / "cross_site.json").read_text())
    matrix = data["matrix"]
    assert set(matrix) == {"global_final", "global_best", "local_site-1", "local_site-2"}
    for model, row in matrix.items():
        assert set(row) == {"site-1", "site-2", "test"}, model
        assert "val_auroc" in row["site-1"] and "test_auroc" in row["test"]
    lines = (classify_run / "cross_site.csv").read_text().splitlines()
    assert lines[0] == "model,site-1 auroc,site-2 auroc,test auroc" and len(lines) == 5
    assert all("" not in line.split(",") for line in lines)


def test_wandb_offline_run_holds_the_streamed_metrics(classify_run):
    runs = list((classify_run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2  # one W&B run per site
    for run in runs:
        [history] = list(run.glob("*.wandb"))
        data = history.read_bytes()
        assert b"val_auroc" in data and b"train_loss" in data


@pytest.fixture(scope="module")
def segment_run(fl_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("fl") / "segment"
    assert main(["sim", "--task", "segment", "--data", str(fl_root), "--rounds", "2", "--lr", "3e-3",
                 "--out", str(run)] + COMMON) == 0
    return run


def test_segmentation_job_end_to_end(segment_run):
    segmenter = LungSegmentation.from_checkpoint(segment_run / "models" / "global_best.pt")
    masks = segmenter.predict_masks(torch.rand(2, 1, 32, 32))
    assert masks.shape == (2, 1, 32, 32)
    matrix = json.loads((segment_run / "cross_site.json").read_text())["matrix"]
    assert "val_dice" in matrix["global_best"]["site-2"] and "test_dice" in matrix["local_site-1"]["test"]
    assert json.loads((segment_run / "metrics.json").read_text())["key_metric"] == "val_dice"


def test_roi_job_uses_the_federated_segmenter(segment_run, fl_root, tmp_path):
    """Also Ditto (one simulator run for both): each site's personal model is saved and evaluated."""
    run = tmp_path / "roi"
    segmenter = segment_run / "models" / "global_best.pt"
    assert main(["sim", "--task", "roi", "--data", str(fl_root), "--rounds", "1", "--model", "cnn5",
                 "--segmenter", str(segmenter), "--roi-mode", "crop", "--algorithm", "ditto", "--ditto-lambda", "0.5",
                 "--out", str(run)] + COMMON) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["segmenter"] == str(segmenter) and config["roi"] == "crop"
    client_config = (run / "job" / "cxrfl_roi" / "app" / "config" / "config_fed_client.json").read_text()
    site_settings = TrainConfig.read_json(run / "job" / "cxrfl_roi" / "app" / "custom" / TRAIN_CONFIG_FILE)
    assert site_settings.segmenter == "segmenter.pt" and site_settings.roi == "crop"
    for text in (client_config, json.dumps(site_settings.as_dict())):
        assert str(segmenter) not in text  # the segmenter travels as a file in the job
    assert (run / "job" / "cxrfl_roi" / "app" / "custom" / "segmenter.pt").is_file()
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["selected_model"] == "global_final"  # one round: NVFlare selects no best model
    assert 0 <= summary["test"]["test_auroc"] <= 1
    assert not (run / "cross_site.csv").read_text().splitlines()[1].endswith(",,")  # test column filled
    _check_ditto_personal_models(run)


def test_fedyogi_updates_the_global_model_with_a_server_optimizer(fl_root, classify_run, tmp_path):
    """Also a failure drill: site-2 sends NaN weights in round 1; the server refuses that update with
    its reason logged and, with --min-clients 1, the round goes on with site-1 (FedOpt's weight differences, too).
    And FedProx on the sites (it combines with FedOpt): from the same start and data as the FedAvg run,
    each site's round-0 update differs and stays closer to the global model it received."""
    from cxrfl.fl.config import FLConfig
    from cxrfl.options import ready
    from cxrfl.fl.simulator import run_simulation
    from fault_drill import nan_update

    run = tmp_path / "yogi"
    run.mkdir()
    cfg = ready(FLConfig(task="classify", data_root=str(fl_root), sites=("site-1", "site-2"), rounds=2, model="cnn5",
                         min_clients=1, wait_after_min_clients=120, aggregation="fedyogi", server_lr=0.01,
                         cross_site_eval=False, image_size=32, batch_size=8, algorithm="fedprox", fedprox_mu=10.0,
                         record_contributions=True))
    run_simulation(cfg, run, extend_job=nan_update("site-2", 1))  # the drill: only a test adds it to a job
    server = (run / "job" / "cxrfl_classify" / "app" / "config" / "config_fed_server.json").read_text()
    client = (run / "job" / "cxrfl_classify" / "app" / "config" / "config_fed_client.json").read_text()
    assert "app_custom.yogi.Yogi" in server and '"params_transfer_type": "DIFF"' in client
    log = [json.loads(line) for line in (run / "models" / "rounds" / "round_log.jsonl").read_text().splitlines()]
    assert {e["data_kind"] for e in log} == {"WEIGHT_DIFF"} and all(e["accepted"] for e in log)
    assert sorted((e["round"], e["site"]) for e in log) == [(0, "site-1"), (0, "site-2"), (1, "site-1")]
    assert re.search(r"rejected the update of site-2: \S+ holds NaN or Inf", (run / "simulator.log").read_text())
    g0, g1 = (_load(run / "models" / "rounds" / f"global_round_00{i}.pt") for i in (0, 1))
    assert all(torch.isfinite(v.float()).all() for v in g1.values())
    assert any(not torch.equal(g0[k], g1[k]) for k in g0)
    start = _initial_model()
    for site in ("site-1",):  # site-2 takes one step per round: the proximal term is zero at the start
        prox_step = _load(run / "models" / "rounds" / f"{site}_round_000.pt")  # a weight difference
        fedavg_step = _step(_load(classify_run / "models" / "rounds" / f"{site}_round_000.pt"), start)
        # pulled toward the start (Adam normalises the step, so by a few per cent): not FedAvg's step
        assert _norm(prox_step) < _norm(fedavg_step), site
        assert _norm({k: prox_step[k] - fedavg_step[k] for k in fedavg_step}) > 0.01 * _norm(fedavg_step), site


def _initial_model(model="cnn5"):
    """Every run's round-0 global model: the seed's (app_custom/global_model.py)."""
    return GlobalModel(model=model, num_classes=2, seed=0).state_dict()


def _step(weights, start):
    return {k: weights[k].double() - start[k].double() for k in weights if weights[k].is_floating_point()}


def _norm(step):
    return float(sum((v.double() ** 2).sum() for k, v in step.items() if v.is_floating_point()) ** 0.5)


def test_yogi_step_matches_hand_computation():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = Yogi([p], lr=0.1, betas=(0.9, 0.99), eps=1e-3, initial_accumulator=1e-6)
    p.grad = torch.tensor([0.5, -1.0])
    opt.step()
    g = torch.tensor([0.5, -1.0])
    m = 0.1 * g
    v = 1e-6 - 0.01 * torch.sign(1e-6 - g * g) * g * g
    torch.testing.assert_close(p.detach(), torch.tensor([1.0, -2.0]) - 0.1 * m / (v.sqrt() + 1e-3))


def test_exported_job_passes_nvflare_validation(fl_root, tmp_path):
    from nvflare.fuel.utils.zip_utils import zip_directory_to_bytes
    from nvflare.private.fed.server.job_meta_validator import JobMetaValidator

    out = tmp_path / "export"
    assert main(["export", "--task", "segment", "--data", str(fl_root), "--rounds", "3", "--out", str(out)]) == 0
    job = out / "cxrfl_segment"
    valid, error, meta = JobMetaValidator().validate("cxrfl_segment", zip_directory_to_bytes(str(out), "cxrfl_segment"))
    assert valid, error
    assert meta["min_clients"] == 2
    client = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())
    executor = client["executors"][0]["executor"]["args"]
    assert executor["task_script_path"] == "app_custom/cxrfl_client.py"  # relative: portable to any site
    assert (job / "app" / "custom" / "app_custom" / "cxrfl_client.py").is_file()
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    assert server["workflows"][0]["path"].endswith("ScatterAndGather")
    assert server["workflows"][0]["args"]["num_rounds"] == 3


def test_federated_arguments_fail_fast(fl_root, capsys):
    assert main(["sim", "--task", "classify", "--data", str(fl_root), "--sites", "5"]) == 2
    assert "only 2 site folders" in capsys.readouterr().err
    assert main(["sim", "--task", "segment", "--data", str(fl_root), "--model", "cnn5"]) == 2
    assert "is not a segment network" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sim", "--task", "classify", "--rounds", "0"])


def test_client_without_site_data_names_the_missing_path(fl_root):
    from app_custom.cxrfl_client import site_data_module
    from app_custom.site_files import SiteConfigError

    args = TrainConfig(task="classify")
    with pytest.raises(SiteConfigError, match=r"site-7.*manifest\.csv does not exist"):
        site_data_module(args, "site-7", Path("local/cxrfl_site.json"), {"data_root": str(fl_root)})
    with pytest.raises(SiteConfigError, match=r"no data configured"):
        site_data_module(args, "site-1", None, {})


@pytest.mark.parametrize("task", ["segment", "classify", "roi"])
def test_each_job_py_exports_its_job(task, fl_root, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    job_py = Path(__file__).resolve().parents[1] / "jobs" / task / "job.py"
    out = subprocess.run([sys.executable, str(job_py), "--data", str(fl_root), "--rounds", "2",
                          "--export-dir", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    server = json.loads((tmp_path / f"cxrfl_{task}" / "app" / "config" / "config_fed_server.json").read_text())
    assert server["workflows"][0]["path"].endswith("ScatterAndGather")
    site_settings = TrainConfig.read_json(tmp_path / f"cxrfl_{task}" / "app" / "custom" / TRAIN_CONFIG_FILE)
    assert (site_settings.roi == "mask") == (task == "roi")


def test_client_uses_the_job_classes_even_when_its_site_lacks_one(fl_root, tmp_path):
    import shutil

    from app_custom.cxrfl_client import site_data_module

    root = tmp_path / "root"
    shutil.copytree(fl_root, root)
    (root / "dataset.json").unlink()  # no class list at the site: its labels alone would decide
    rows = [r for r in read_manifest(root / "site-1" / "manifest.csv") if r.label == "pneumonia"]
    write_manifest(root / "site-1" / "manifest.csv", rows)
    args = TrainConfig(task="classify", classes=("normal", "pneumonia"))
    dm = site_data_module(args, "site-1", root / "local.json", {"data_dir": str(root / "site-1")})
    assert dm.classes == ["normal", "pneumonia"] and dm.class_counts("train")[0] == 0


def test_site_settings_travel_in_the_job_as_data(tmp_path):
    """Class names with spaces reach the sites intact: the settings travel as a JSON file, not as
    script arguments (which NVFlare splits on spaces)."""
    from cxrfl.fl.config import FLConfig
    from cxrfl.fl.simulator import export_job

    cfg = FLConfig(classes=["Normal", "No Lung Opacity / Not Normal", "Lung Opacity"], data_root="/data/x")
    job = export_job(cfg, tmp_path)
    site_file = job / "app" / "custom" / TRAIN_CONFIG_FILE
    args = TrainConfig.read_json(site_file)  # what the client script reads
    assert args.classes == cfg.classes and args.task == "classify"
    assert "/data/x" not in site_file.read_text()  # sites read their data folder from their own configuration
    client = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())
    assert client["executors"][0]["executor"]["args"].get("task_script_args", "") == ""


def test_he_job_wires_nvflare_he_components(fl_root, tmp_path, capsys):
    out = tmp_path / "he"
    assert main(["export", "--task", "classify", "--he", "--data", str(fl_root), "--out", str(out)]) == 0
    server = (out / "cxrfl_classify" / "app" / "config" / "config_fed_server.json").read_text()
    client = (out / "cxrfl_classify" / "app" / "config" / "config_fed_client.json").read_text()
    for component in ("PackedHEShareableGenerator", "HESumAggregator", "PackedHEModelPersistor"):
        assert component in server
    assert "CrossSiteModelEval" not in server  # ciphertext models cannot be broadcast for evaluation
    assert "PackedHEEncryptor" in client and "PackedHEDecryptor" in client
    assert main(["export", "--task", "classify", "--he", "--he-encrypt-layers", "classifier", "--data", str(fl_root),
                 "--out", str(tmp_path / "partial")]) == 0
    client = json.loads((tmp_path / "partial" / "cxrfl_classify" / "app" / "config" / "config_fed_client.json")
                        .read_text())
    encryptors = [f for flt in client["task_result_filters"] for f in flt["filters"] if "Encryptor" in f["path"]]
    assert encryptors[0]["args"]["encrypt_layers"] == "classifier"
    assert main(["export", "--task", "classify", "--he-encrypt-layers", "(", "--he", "--data", str(fl_root),
                 "--out", str(tmp_path / "bad")]) == 2
    assert "not a valid regular expression" in capsys.readouterr().err
    assert main(["export", "--task", "classify", "--he", "--aggregation", "fedyogi", "--data", str(fl_root),
                 "--out", str(tmp_path / "x")]) == 2
    assert "FedAvg only" in capsys.readouterr().err


def test_he_job_runs_in_the_simulator_and_a_site_key_decrypts_the_result(fl_root, tmp_path):
    """`cxrfl sim --he`, with FedBN: the simulator gets the project's HE contexts; the server keeps
    ciphertexts only, of the shared tensors only (the normalisation layers never leave the sites, not
    even encrypted), and the model decrypted with a site's key is the one evaluated on the test set.
    (Plain FedAvg under HE runs in tests/test_rehearsal.py's production jobs.)"""
    from app_custom.ckks_packing import is_packed

    run = tmp_path / "he-run"
    assert main(["sim", "--task", "classify", "--he", "--algorithm", "fedbn", "--data", str(fl_root), "--rounds",
                 "1", "--model", "cnn5", "--out", str(run)] + COMMON) == 0
    final = torch.load(run / "models" / "global_final.pt", map_location="cpu", weights_only=False)
    assert any(is_packed(k) for k in final["model"])
    assert all(isinstance(v, bytes) for k, v in final["model"].items() if is_packed(k))
    decrypted = torch.load(run / "models" / "decrypted" / "global_final.pt", map_location="cpu", weights_only=False)
    net = CXRClassifier(model="cnn5").net
    loaded = net.load_state_dict({k.removeprefix("net."): v for k, v in decrypted["model"].items()}, strict=False)
    assert not loaded.unexpected_keys
    norm_keys, start = set(normalisation_state_keys(GlobalModel(model="cnn5"))), _initial_model()
    assert {f"net.{k}" for k in loaded.missing_keys} <= norm_keys and loaded.missing_keys
    # what the server has of a normalisation layer is its own starting copy (HE keeps plaintext integers)
    assert all(torch.equal(torch.as_tensor(v), start[k]) for k, v in decrypted["model"].items() if k in norm_keys)
    summary = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= summary["test"]["test_auroc"] <= 1.0 and "FedBN" in summary["normalisation"]
    from cxrfl.models import ModelLoadError, load_classifier

    with pytest.raises(ModelLoadError, match="global_final.pt: a FedBN run's global model holds no site's"):
        load_classifier(run)  # predict takes the decrypted model, and says why it cannot use it
    from conftest import readable_private_keys

    assert readable_private_keys(run) == []  # the secret-key context, in every site's copy: 0600 in 0700


def _sent(run, site, round_num):
    return torch.load(run / "models" / "rounds" / f"{site}_round_{round_num:03d}.pt", map_location="cpu",
                      weights_only=False)


def _differ(a, b):
    return any(not torch.allclose(a[k].double(), b[k].double(), atol=1e-7) for k in a if a[k].is_floating_point())


def test_scaffold_control_variates_change_the_updates_from_the_second_round(classify_run, fl_root, tmp_path):
    """From the same start and data as the FedAvg run: round 0 (controls all zero) gives FedAvg's
    updates, byte for byte (also the proof that two simulations with the same seed write the same models
    and validation metrics); from round 1 the controls, which change round to round, change every site's update."""
    run = tmp_path / "scaffold"
    assert main(["sim", "--task", "classify", "--algorithm", "scaffold", "--data", str(fl_root), "--rounds", "2",
                 "--model", "cnn5", "--record-contributions", "--no-cross-site-eval", "--out", str(run)] + COMMON) == 0
    fedavg = classify_run / "models" / "rounds"
    for site in ("site-1", "site-2"):
        first, second = _sent(run, site, 0), _sent(run, site, 1)
        changes = [{k: torch.as_tensor(v) for k, v in sent["meta"]["scaffold_c_diff"].items()} for sent in (first, second)]
        assert all(_norm(c) > 0 for c in changes) and _differ(changes[0], changes[1])
        fedavg_first = _load(fedavg / f"{site}_round_000.pt")
        assert first["model"].keys() == fedavg_first.keys()
        assert all(torch.equal(torch.as_tensor(v), fedavg_first[k]) for k, v in first["model"].items())
        assert _differ({k: torch.as_tensor(v) for k, v in second["model"].items()}, _load(fedavg / f"{site}_round_001.pt"))
    start_of_round_1 = _load(fedavg / "global_round_000.pt")
    assert all(torch.equal(v, start_of_round_1[k]) for k, v in _load(run / "models" / "rounds" / "global_round_000.pt").items())
    validation = [{site["name"]: site["metrics"] for entry in map(json.loads, (r / "metrics" / "round_metrics.jsonl")
                                                                  .read_text().splitlines())
                   if entry["round"] == 0 for site in entry["sites"]} for r in (run, classify_run)]
    assert set(validation[0]) == {"site-1", "site-2"} and validation[0] == validation[1]  # of the same initial model
    assert json.loads((run / "metrics.json").read_text())["algorithm"] == "scaffold"


def test_fedbn_keeps_normalisation_at_each_site(fl_root, tmp_path):
    """The server never receives a normalisation tensor; each site ends with its own statistics; every
    model is evaluated with them at each site, and on the shared test set."""
    run = tmp_path / "fedbn"
    assert main(["sim", "--task", "classify", "--algorithm", "fedbn", "--data", str(fl_root), "--rounds", "2",
                 "--model", "cnn5", "--record-contributions", "--out", str(run)] + COMMON) == 0
    norm_keys = set(normalisation_state_keys(GlobalModel(model="cnn5")))
    shared = set(_initial_model()) - norm_keys
    for site in ("site-1", "site-2"):
        for round_num in (0, 1):
            assert set(_sent(run, site, round_num)["model"]) == shared
    server = _load(run / "models" / "global_final.pt")
    start = _initial_model()
    assert all(torch.equal(server[k], start[k]) for k in norm_keys)  # the server's copy never moved
    local = {site: _load(run / "models" / f"local_{site}.pt") for site in ("site-1", "site-2")}
    key = "net.features.2.running_mean"
    assert not torch.allclose(local["site-1"][key], local["site-2"][key])
    assert all(not torch.equal(local[s][key], start[key]) for s in local)
    summary = json.loads((run / "metrics.json").read_text())
    assert set(summary["site_test"]) == {"global_best", "global_final", "local_site-1", "local_site-2"}
    assert all(0 <= summary["test_by_model"][m]["test_auroc"] <= 1 for m in summary["test_by_model"])


def _check_ditto_personal_models(run):
    """Ditto: every site's personal model (what it submits) differs from the global model and from the
    other site's, and is evaluated on every site's validation and own test split and on the shared test set."""
    server = _load(run / "models" / "global_final.pt")
    matrix = json.loads((run / "cross_site.json").read_text())["matrix"]
    summary = json.loads((run / "metrics.json").read_text())
    for site in ("site-1", "site-2"):
        personal = _load(run / "models" / f"local_{site}.pt")  # what the site submits: its personal model
        assert set(personal) == set(server) and _differ(personal, server)
        for data_site in ("site-1", "site-2"):  # on every site's validation and own test split
            assert {"val_auroc", "site_test_auroc"} <= set(matrix[f"local_{site}"][data_site])
        assert 0 <= summary["test_by_model"][f"local_{site}"]["test_auroc"] <= 1  # and the shared test set
    assert _differ(_load(run / "models" / "local_site-1.pt"), _load(run / "models" / "local_site-2.pt"))
    assert json.loads((run / "config.json").read_text())["algorithm"] == "ditto"


def test_federated_runs_load_for_predict_like_central_ones(classify_run, fl_root, tmp_path):
    """A simulator run folder is a model source for `cxrfl predict`, with its test predictions."""
    from cxrfl.models import load_classifier

    clf = load_classifier(classify_run)
    selected = json.loads((classify_run / "metrics.json").read_text())["selected_model"]
    assert clf.source.endswith(f"{selected}.pt") and clf.image_size == 32 and clf.roi is None
    with open(classify_run / "test_predictions.csv") as f:
        header = f.readline().strip().split(",")
    assert header == ["image", "label", "predicted", "p_normal", "p_pneumonia"]
    image = next((fl_root / "test" / "images").glob("*.png"))
    assert main(["predict", str(image), "--classifier", str(classify_run), "--out", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "predictions.csv").read_text().count("\n") == 2


def test_selection_takes_the_final_model_only_when_the_sites_validation_ranks_it_higher():
    from cxrfl.fl.config import FLConfig
    from cxrfl.fl.evaluation import select_global_model

    cfg = FLConfig(sites=["a", "b"])
    both = {"global_best": "x", "global_final": "y"}
    matrix = {"global_best": {"a": {"val_auroc": 0.8}, "b": {"val_auroc": 0.6}, "test": {"val_auroc": 0.1}},
              "global_final": {"a": {"val_auroc": 0.75}, "b": {"val_auroc": 0.75}, "test": {"val_auroc": 0.0}}}
    assert select_global_model(cfg, both, matrix) == "global_final"  # 0.75 > 0.70; the test column is ignored
    matrix["global_final"]["b"]["val_auroc"] = 0.6
    assert select_global_model(cfg, both, matrix) == "global_best"
    assert select_global_model(cfg, both, {}) == "global_best"  # no cross-site evaluation (e.g. HE)
    assert select_global_model(cfg, {"global_final": "y"}, {}) == "global_final"  # a 1-round job has no best


def test_differential_privacy_filters_what_leaves_each_site(fl_root, tmp_path):
    """--dp percentile (NVFlare's PercentilePrivacy at the site): the server receives weight changes
    of which the smallest are zeroed and the rest clipped to +-gamma (per training sample)."""
    run = tmp_path / "dp"
    assert main(["sim", "--task", "classify", "--data", str(fl_root), "--rounds", "2", "--model", "cnn5",
                 "--dp", "percentile", "--dp-percentile", "50", "--dp-gamma", "0.001", "--no-cross-site-eval",
                 "--record-contributions", "--out", str(run)] + COMMON) == 0
    client = (run / "job" / "cxrfl_classify" / "app" / "config" / "config_fed_client.json").read_text()
    assert "PercentilePrivacy" in client
    for path in sorted((run / "models" / "rounds").glob("site-*_round_*.pt")):
        update = torch.load(path, map_location="cpu", weights_only=False)
        assert update["data_kind"] == "WEIGHT_DIFF"
        values = torch.cat([torch.as_tensor(v).double().ravel() for v in update["model"].values()
                            if torch.as_tensor(v).dim() > 0])
        # the smaller half of the changes is not shared (changes tied at the cutoff are, hence < 0.5)
        assert (values == 0).double().mean() >= 0.3
        assert values.abs().max() <= 0.001 * update["weight"] * (1 + 1e-6)  # clipped per training sample
    summary = json.loads((run / "metrics.json").read_text())
    assert 0 <= summary["test"]["test_auroc"] <= 1
    assert summary["privacy"]["mechanism"] == "percentile" and "epsilon" not in summary["privacy"]
    assert summary["privacy"]["guarantee"].startswith("none: truncation")  # never called differential privacy
    assert main(["sim", "--task", "classify", "--data", str(fl_root), "--dp", "svt", "--he",
                 "--out", str(tmp_path / "bad")] + COMMON) == 2  # DP with HE: refused up front


def test_audit_membership_reads_a_simulator_run(classify_run):
    """The audit's membership inference on a run's final global model: a label-stratified AUC."""
    from cxrfl.audit.run import _membership
    from cxrfl.run_folder import RunFolder

    auc = _membership(RunFolder.read(classify_run).config, classify_run)
    assert 0.0 <= auc <= 1.0


def test_svt_filter_shows_its_epsilon_per_round_and_the_total(fl_root, tmp_path, capsys):
    """NVFlare's SVT filter at its defaults: the epsilon it spends on each site's update every round, summed
    over rounds (pure composition), reaches metrics.json and the terminal; it is enormous at these defaults."""
    run = tmp_path / "svt"
    assert main(["sim", "--task", "classify", "--data", str(fl_root), "--rounds", "2", "--model", "cnn5", "--dp",
                 "svt", "--no-cross-site-eval", "--out", str(run)] + COMMON) == 0
    privacy = json.loads((run / "metrics.json").read_text())["privacy"]
    assert privacy["mechanism"] == "svt" and privacy["delta"] == 0.0 and "not a bound" in privacy["guarantee"]
    log = [json.loads(line) for line in (run / "models" / "rounds" / "round_log.jsonl").read_text().splitlines()]
    for site in ("site-1", "site-2"):
        per_round = [e["svt_round_epsilon"] for e in log if e.get("site") == site]
        assert len(per_round) == 2 and per_round[0] > 0
        assert privacy["epsilon"][site] == pytest.approx(sum(per_round))  # the rounds add up
        assert privacy["epsilon"][site] > 100  # n_upload x noise_var: thousands for CNN5's 10 % of weights
    assert "SVT filter" in capsys.readouterr().out


def test_dp_sgd_job_under_he_accounts_every_site_round_by_round(fl_root, tmp_path, capsys):
    """DP-SGD at the sites under the patched trainer, with HE on the wire: each site's update carries the
    epsilon it has spent, which grows round by round up to its plan and stays within the target; the
    model has DP-SGD's group-norm layers everywhere, and predict loads the decrypted result."""
    run = tmp_path / "dp-he"
    assert main(["sim", "--task", "classify", "--he", "--no-cross-site-eval", "--dp", "dpsgd", "--target-epsilon",
                 "10", "--data", str(fl_root), "--rounds", "2", "--model", "cnn5", "--out", str(run)] + COMMON) == 0
    printed = capsys.readouterr().out
    privacy = json.loads((run / "metrics.json").read_text())["privacy"]
    plans = json.loads((run / "config.json").read_text())["facts"]["privacy_plan"]
    assert set(privacy["epsilon"]) == {"site-1", "site-2"}
    for site, by_round in privacy["epsilon_by_round"].items():
        assert list(by_round) == ["0", "1"] and 0 < by_round["0"] < by_round["1"] <= 10
        assert by_round["1"] == pytest.approx(plans[site]["planned_epsilon"], rel=1e-4)  # every planned step
        assert f"{site}: epsilon {by_round['1']:.3f}" in printed
    # the two sites differ in size, so in sample rate and in the noise that meets the same target
    assert plans["site-1"]["noise_multiplier"] != plans["site-2"]["noise_multiplier"]
    decrypted = torch.load(run / "models" / "decrypted" / "global_final.pt", map_location="cpu", weights_only=False)
    assert not [k for k in decrypted["model"] if "running_mean" in k]
    from cxrfl.models import load_classifier
    from cxrfl.report import write_report

    assert load_classifier(run).module.hparams.dp_compatible
    report = write_report(run).read_text()
    assert all(f"{site}: epsilon {privacy['epsilon'][site]:.3f}" in report for site in privacy["epsilon"])


def test_quantized_updates_are_the_sites_changes_within_the_8bit_error(classify_run, fl_root, tmp_path):
    """--quantize 8bit, from the same start and data as the FedAvg run: what the server receives (after its
    dequantizer) is each site's round-0 change, start -> the weights the FedAvg run's site sent, within the
    documented error of every 4096-value block."""
    from app_custom.quantization import BLOCKSIZE, BLOCKWISE8_ERROR

    run = tmp_path / "quantized"
    assert main(["sim", "--task", "classify", "--data", str(fl_root), "--rounds", "2", "--model", "cnn5",
                 "--quantize", "8bit", "--record-contributions", "--no-cross-site-eval", "--out", str(run)] + COMMON) == 0
    client = (run / "job" / "cxrfl_classify" / "app" / "config" / "config_fed_client.json").read_text()
    assert "UpdateQuantizer" in client
    start = _initial_model()
    for site in ("site-1", "site-2"):
        sent = _sent(run, site, 0)
        assert sent["data_kind"] == "WEIGHT_DIFF"
        change = {k: torch.as_tensor(v) for k, v in sent["model"].items()}
        exact = _step(_load(classify_run / "models" / "rounds" / f"{site}_round_000.pt"), start)
        assert set(exact) <= set(change)
        quantized_somewhere = False
        for name, value in exact.items():
            error, flat = (change[name].double() - value).abs().ravel(), value.ravel()
            for at in range(0, flat.numel(), BLOCKSIZE):
                block = slice(at, at + BLOCKSIZE)
                assert error[block].max() <= BLOCKWISE8_ERROR * flat[block].abs().max() + 1e-7, name
            quantized_somewhere |= bool(error.max() > 1e-7)
        assert quantized_somewhere
    summary = json.loads((run / "metrics.json").read_text())
    assert 0 <= summary["test"]["test_auroc"] <= 1
