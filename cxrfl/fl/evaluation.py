"""A federated run's models evaluated: cross-site matrix, the selected global model (by the sites'
validation metric, never the test set), its operating point and held-out test metrics."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytorch_lightning as pl
import torch

from lightning_modules.accelerate import device_callbacks, trainer_precision
from lightning_modules.data.atomic import atomic_torch_save, atomic_write_text, write_json
from cxrfl.fl.config import FLConfig
from cxrfl.fl.results import load_state
from cxrfl.fl.he_keys import decrypt_checkpoint
from cxrfl.runs import finite_or_none, test_at_operating_point, undefined_reason, write_test_predictions
from lightning_modules.data.datamodule import CXRDataModule
from lightning_modules.factory import build_module
from lightning_modules.networks import adapt_normalisation
from lightning_modules.operating_point import DEFAULT_THRESHOLD, histogram_counts, threshold_from_histograms
from lightning_modules.segmentation import LungSegmentation


def evaluate_run(cfg: FLConfig, run_dir: Path, collected: dict, he_key: Path | None = None) -> dict:
    """Test-set metrics of every model of the run, and the cross-site matrix. Under HE the server's
    models are ciphertexts: with a site's key (`he_key`, a client context) they are decrypted into
    models/decrypted/ and evaluated; without one there is no test evaluation."""
    models = run_dir / "models"
    candidates = {"global_final": models / "global_final.pt", "global_best": models / "global_best.pt"}
    candidates.update({f"local_{s}": models / f"local_{s}.pt" for s in collected["local_sites"]})
    candidates = {k: v for k, v in candidates.items() if v.is_file()}
    # cross-site evaluation: NVFlare's names -> ours
    cse = json.loads(collected["cse"].read_text()) if collected["cse"] else {}
    rename = {"SRV_FL_global_model.pt": "global_final", "SRV_best_FL_global_model.pt": "global_best"}
    matrix: dict[str, dict[str, dict]] = {name: {} for name in candidates}
    for data_site, by_model in cse.items():
        for model_name, metrics in by_model.items():
            name = rename.get(model_name, f"local_{model_name}")
            matrix.setdefault(name, {})[data_site] = metrics
    main = select_global_model(cfg, candidates, matrix)
    point = federated_operating_point(cfg, matrix.get(main, {}))
    if cfg.he:
        test_metrics = {}
        if he_key is not None:
            (models / "decrypted").mkdir(exist_ok=True)
            dm = test_data_module(cfg)
            for name, path in candidates.items():
                state = decrypt_checkpoint(path, he_key)
                atomic_torch_save({"model": state}, models / "decrypted" / f"{name}.pt")
                test_metrics[name] = evaluate_on_test(cfg, dm, state, run_dir if name == main else None,
                                                      point if name == main else None, adapt=_without_site_norm(cfg, name))
    else:
        dm = test_data_module(cfg)
        test_metrics, tested = {}, []  # (state, metrics) already computed: the best model is often the final one
        for name in sorted(candidates, key=lambda n: n != main):  # the selected model first: it writes predictions
            state = load_state(candidates[name])
            same = next((m for s, m in tested if s.keys() == state.keys() and all(torch.equal(s[k], state[k]) for k in s)),
                        None)
            if same is not None:  # at-threshold metrics belong to the selected model only
                test_metrics[name] = {k: v for k, v in same.items() if not k.endswith("_at_threshold")}
                continue
            test_metrics[name] = evaluate_on_test(cfg, dm, state, run_dir if name == main else None,
                                                  point if name == main else None, adapt=_without_site_norm(cfg, name))
            tested.append((state, test_metrics[name]))

    for name, metrics in test_metrics.items():
        matrix.setdefault(name, {})["test"] = metrics
    write_json(run_dir / "cross_site.json", {"key_metric": cfg.key_metric, "matrix": matrix})
    _write_matrix_csv(run_dir / "cross_site.csv", matrix, cfg)
    summary = {"task": cfg.task, "key_metric": cfg.key_metric, "algorithm": cfg.algorithm, "selected_model": main,
               "test": test_metrics.get(main, {}), "test_by_model": test_metrics}
    site_test = site_test_table(matrix, cfg)
    if site_test:
        summary["site_test"] = site_test
    if cfg.algorithm == "fedbn":
        summary["normalisation"] = ("FedBN: the global model's shared-test numbers use normalisation statistics "
                                    "estimated on the test images (the server holds no site's); local_<site> models "
                                    "are each site's own")
    if point:
        summary["operating_point"] = point
    if None in summary["test"].values():  # e.g. AUROC on a test set of one class
        summary["undefined_reason"] = undefined_reason(cfg.classes, dm.class_counts("test") if cfg.classes else None)
    return summary


def _without_site_norm(cfg: FLConfig, model_name: str) -> bool:
    """A FedBN global model: the server holds no site's normalisation statistics."""
    return cfg.algorithm == "fedbn" and model_name.startswith("global")


def site_test_table(matrix: dict, cfg: FLConfig) -> dict[str, dict[str, float | None]]:
    """{model: {site: its key metric on that site's own test split}} from the cross-site matrix (sites
    report `site_test_*` when they hold a test split of their own); empty when no site has one."""
    metric = "site_test_" + cfg.key_metric.removeprefix("val_")
    table = {model: {site: row[site].get(metric) for site in cfg.sites if metric in row.get(site, {})}
             for model, row in matrix.items()}
    return {model: by_site for model, by_site in table.items() if by_site}


def select_global_model(cfg: FLConfig, candidates: dict, matrix: dict) -> str:
    """The run's model: NVFlare's best (by the sites' validation of each received global model)
    or the final one, whichever the sites' validation in cross-site evaluation ranks higher.
    NVFlare's selector never sees the last round's aggregate; the cross-site evaluation does, on
    the sites' validation splits (never the test set). Without it: the best, else the final."""
    if "global_best" not in candidates:
        return "global_final"
    best = sites_mean(matrix.get("global_best", {}), cfg.key_metric, cfg.sites)
    final = sites_mean(matrix.get("global_final", {}), cfg.key_metric, cfg.sites)
    return "global_final" if best is not None and final is not None and final > best else "global_best"


def sites_mean(by_site: dict[str, dict], metric: str, sites) -> float | None:
    """The mean of `metric` over `sites` in one model's row of the cross-site matrix (data site ->
    metrics); sites without it do not count; None when none has it."""
    values = [m.get(metric) for site, m in by_site.items() if site in sites]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _write_matrix_csv(path: Path, matrix: dict, cfg: FLConfig) -> None:
    metric = cfg.key_metric.removeprefix("val_")
    columns = list(cfg.sites) + ["test"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model"] + [f"{c} {metric}" for c in columns])
    for name, row in matrix.items():
        cells = []
        for c in columns:
            m = row.get(c, {})
            value = m.get(f"val_{metric}", m.get(f"test_{metric}"))
            cells.append("" if value is None else f"{value:.4f}")
        w.writerow([name] + cells)
    atomic_write_text(path, buf.getvalue())


def test_data_module(cfg: FLConfig) -> CXRDataModule:
    """The held-out test set, prepared the way the run's clients prepare their data."""
    mask_predictor = None
    if cfg.segmenter:
        segmenter = LungSegmentation.from_checkpoint(cfg.segmenter)
        mask_predictor = segmenter.mask_predictor(cfg.roi_threshold)
    dm = CXRDataModule(cfg.data_root, task=cfg.task, sites=None, image_size=cfg.image_size,
                       batch_size=cfg.batch_size, roi=cfg.roi,
                       roi_threshold=cfg.roi_threshold, mask_predictor=mask_predictor, limit=cfg.limit)
    dm.classes = list(cfg.classes)  # the job's classes; the test set lives at the coordinator, not a site
    dm.setup("test")
    return dm


def federated_operating_point(cfg: FLConfig, by_site: dict) -> dict | None:
    """A two-class classifier's decision threshold from the sites' validation in cross-site
    evaluation: their per-class score histograms pooled (no image or score leaves a site), Youden's
    J (or the configured target sensitivity); 0.5 when no site sent one (no cross-site evaluation). None for other tasks."""
    if cfg.task != "classify" or len(cfg.classes) != 2:
        return None
    histograms = [h for site, m in by_site.items() if site in cfg.sites for h in [histogram_counts(m)] if h]
    if not histograms:
        return {"threshold": DEFAULT_THRESHOLD, "rule": "default 0.5 (no site sent validation histograms)"}
    return {**threshold_from_histograms(histograms, cfg.target_sensitivity), "sites": len(histograms)}


def evaluate_on_test(cfg: FLConfig, dm: CXRDataModule, state: dict, predictions_dir: Path | None = None,
                     point: dict | None = None, adapt: bool = False) -> dict:
    """Load a state_dict into the task's module and run it on the held-out test set (a classifier
    writes test_predictions.csv into predictions_dir when given); with an operating `point`, also
    the test metrics at its threshold and the test ECE. adapt: a FedBN global model, whose
    normalisation statistics no site sent, takes them from the test images first (no label used)."""
    module = build_module(cfg.task, cfg.model, lr=cfg.lr, classes=cfg.classes, dp_compatible=cfg.dp_sgd)
    module.load_state_dict(state, strict=not adapt)  # FedBN under HE: the server never held normalisation tensors
    if adapt:
        adapt_normalisation(module, (batch["image"] for batch in dm.test_dataloader()))
    trainer = pl.Trainer(accelerator=cfg.accelerator, devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, precision=trainer_precision(cfg), callbacks=device_callbacks(cfg))
    results = {k: finite_or_none(v) for k, v in trainer.test(module, datamodule=dm, verbose=False)[0].items()}
    if point is not None:
        results.update(test_at_operating_point(module, point))
    if predictions_dir is not None and cfg.task == "classify":
        write_test_predictions(predictions_dir / "test_predictions.csv", module, cfg.classes,
                               point.get("threshold") if point else None)
    return results
