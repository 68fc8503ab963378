"""`cxrfl study --config cxrfl/studies/heterogeneity.yaml`: federated algorithms under IID data, label skew
and feature shift, against FLamby's baselines (pooled centralized, local-only per site, an ensemble of the
local models, FedAvg + local fine-tuning), over several training seeds; resumable like `cxrfl study`.

Each heterogeneity setting is one generated data root (every site with its own test split, plus the shared
test set), the same for every seed and method. Every model is evaluated here, at the coordinator (the
simulator holds all data): on the shared test set and on each site's own test split. Under each method
each site "uses" one model: the selected global model (fedavg, fedprox, scaffold, central), its personal
model (ditto, fedbn, local-only, fine-tuned) or the ensemble. The numbers and tables are
heterogeneity_summary.py's.

Study folder::

    OUT/data/<setting>/                 the setting's data root (<setting>-source/ when sites differ in size)
    OUT/views/<setting>/<site>/         one site's train/val rows + the shared test set (paths, no copies)
    OUT/<setting>/seed-<s>/<algorithm>/ simulator runs; central/, local-<site>/, finetune-<site>/ baselines
    OUT/study.csv|json|md, OUT/heterogeneity_study/figures/*.png
"""

from __future__ import annotations

import numbers
import time
from dataclasses import replace
from pathlib import Path

import pytorch_lightning as pl
import torch
from monai.metrics import DiceMetric
from pytorch_lightning.callbacks import ModelCheckpoint
from torchmetrics.functional.classification import binary_auroc, multiclass_auroc

from cxrfl.central import train_central
from cxrfl.fl.config import FLConfig
from cxrfl.fl.results import load_state
from cxrfl.fl.simulator import run_simulation
from cxrfl.heterogeneity_summary import LOCAL, site_rows, write_outputs
from cxrfl.run_folder import RunFolder
from cxrfl.runs import AtomicCheckpointIO, new_run_dir
from cxrfl.study import StudyError, finished_run, read_config, set_aside_unfinished
from lightning_modules.accelerate import device_callbacks, trainer_precision, training_data_device
from lightning_modules.config import ALGORITHMS, TrainConfig
from lightning_modules.data.atomic import atomic_torch_save, read_json_object, write_json
from lightning_modules.data.datamodule import CXRDataModule
from lightning_modules.data.manifest import (DATASET_JSON, MANIFEST_NAME, TEST_SITE, class_names, read_dataset_info,
                                             read_manifest, resolve, write_manifest)
from lightning_modules.data.phantom import LABEL_SIGNALS, check_dials, check_site_test, generate_dataset
from lightning_modules.factory import build_module

STUDY_KIND = "heterogeneity"  # `study: heterogeneity` in a configuration selects this study
BASELINES = ("central", "local", "ensemble", "fedavg-finetune")
PERSONAL = ("ditto", "fedbn")  # each site uses its own model of the run: models/local_<site>.pt
REQUIRED = ("name", "data", "settings", "algorithms")
SETTING_KEYS = {"site_shift", "label_alpha", "label_signal"}
DATA_KEYS = {"sites", "per_site", "site_test", "test_size", "size", "seed", "val_fraction", "follow_up_rate"}
SECTIONS = ("train", "federated", "central", "local", "finetune")
EVAL_CACHE = "study_eval.json"  # a unit's models' test scores, kept with the unit (redone with it)


def is_heterogeneity_config(path: Path) -> bool:
    """Whether the file is a heterogeneity study's configuration (unreadable: no; load_config says why)."""
    try:
        return read_config(path).get("study") == STUDY_KIND
    except StudyError:
        return False


def load_config(path: Path) -> dict:
    """The configuration with its defaults (seeds 3, every baseline); StudyError (one line, naming the file)
    for anything that would fail later."""
    config = read_config(path)
    try:
        _check(config)
    except (ValueError, TypeError) as exc:
        raise StudyError(f"{path}: {exc}") from None
    return {**config, "seeds": config.get("seeds", 3), "baselines": list(config.get("baselines", BASELINES))}


def _check(config: dict) -> None:
    missing = [k for k in REQUIRED if k not in config]
    if missing:
        raise ValueError(f"missing {', '.join(repr(k) for k in missing)}")
    algorithms, baselines = config["algorithms"], config.get("baselines", BASELINES)
    if not isinstance(algorithms, list) or not algorithms:
        raise ValueError(f"'algorithms' must be a non-empty list of {', '.join(ALGORITHMS)}")
    for name, known, given in (("algorithm", ALGORITHMS, algorithms), ("baseline", BASELINES, baselines)):
        unknown = [a for a in given if a not in known]
        if unknown:
            raise ValueError(f"unknown {name}(s) {', '.join(map(str, unknown))} (choose from {', '.join(known)})")
    seeds = config.get("seeds", 3)
    if not isinstance(seeds, numbers.Integral) or isinstance(seeds, bool) or seeds < 1:
        raise ValueError(f"'seeds' must be a whole number >= 1, got {seeds!r}")
    for section in SECTIONS:
        if not isinstance(config.get(section, {}), dict):
            raise ValueError(f"'{section}' must be a mapping")
    _check_data(config["data"])
    _check_settings(config["settings"])
    for algorithm in _fl_algorithms(config):  # TrainConfig/FLConfig check model, sizes, mu, lambda
        fl_config(config, Path("."), ["site-1"], algorithm, config.get("train", {}).get("seed", 0), ["a", "b"])
    train_config(config, Path("."), 1, 0)


def _check_data(data) -> None:
    if not isinstance(data, dict):
        raise ValueError("'data' must be a mapping of the phantom generator's settings")
    unknown = sorted(set(data) - DATA_KEYS)
    if unknown:
        raise ValueError(f"data: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(DATA_KEYS))})")
    sites = data.get("sites", 3)
    if not isinstance(sites, int) or sites < 2:
        raise ValueError(f"data.sites must be a whole number >= 2, got {sites!r}")
    sizes = data.get("per_site", 100)
    if isinstance(sizes, list) and (len(sizes) != sites or not all(isinstance(n, int) and n >= 2 for n in sizes)):
        raise ValueError(f"data.per_site: a list needs {sites} whole numbers >= 2 (one per site), got {sizes!r}")
    check_site_test(data.get("site_test"), "data.site_test")
    if not data["site_test"]:
        raise ValueError("data.site_test must be >= 1: every site needs its own test split")


def _check_settings(settings) -> None:
    if not isinstance(settings, dict) or not settings:
        raise ValueError("'settings' must map each heterogeneity setting's name to its phantom dials")
    for name, dials in settings.items():
        if not isinstance(dials, dict) or set(dials) - SETTING_KEYS:
            raise ValueError(f"settings.{name}: expected a mapping of {', '.join(sorted(SETTING_KEYS))}")
        check_dials(dials.get("site_shift", 1.0), dials.get("label_alpha"),
                    (f"settings.{name}.site_shift", f"settings.{name}.label_alpha"))
        if dials.get("label_signal", LABEL_SIGNALS[0]) not in LABEL_SIGNALS:
            raise ValueError(f"settings.{name}.label_signal must be one of {', '.join(LABEL_SIGNALS)}")
        if dials.get("label_signal") == "opacity" and dials.get("label_alpha") is not None:
            raise ValueError(f"settings.{name}: label_alpha needs label_signal opacity+site (opacity fixes "
                             "every site's prevalence at 0.5)")


def _fl_algorithms(config: dict) -> list[str]:
    """The simulator runs: the configured algorithms, and FedAvg when fine-tuning needs its model."""
    wanted = list(config["algorithms"])
    if "fedavg-finetune" in config.get("baselines", BASELINES) and "fedavg" not in wanted:
        wanted.insert(0, "fedavg")
    return wanted


def train_config(config: dict, root: Path, epochs: int, seed: int) -> TrainConfig:
    base = config.get("train", {})
    return TrainConfig(task=config.get("task", "classify"), data_root=str(root), epochs=epochs, seed=seed,
                       image_size=base.get("image_size", 48), batch_size=base.get("batch_size", 16),
                       lr=base.get("lr", 1e-3), model=base.get("model"))


def fl_config(config: dict, root: Path, sites: list[str], algorithm: str, seed: int,
              classes: list[str] | None = None) -> FLConfig:
    """One simulator run (classes: the data root's); cross-site evaluation only where the sites' own models
    are needed (it sends them)."""
    fed, personal = config.get("federated", {}), algorithm in PERSONAL
    site = train_config(config, root, fed.get("local_epochs", 1), seed)
    return FLConfig(**{k: getattr(site, k) for k in ("task", "data_root", "epochs", "seed", "image_size",
                                                     "batch_size", "lr", "model")},
                    sites=sites, rounds=fed.get("rounds", 10), classes=classes or class_names(root),
                    algorithm=algorithm, fedprox_mu=fed.get("fedprox_mu") if algorithm == "fedprox" else None,
                    ditto_lambda=fed.get("ditto_lambda") if algorithm == "ditto" else None,
                    cross_site_eval=personal, global_model_eval=not personal)


# ---------------------------------------------------------------------------------------------- data


def setting_root(config: dict, setting: str, out: Path) -> Path:
    """The setting's data root, generated once: the phantom with the setting's dials; sites of different
    sizes (data.per_site a list) keep the first patients of a larger generated site."""
    data = dict(config["data"])
    root = out / "data" / setting
    if (root / DATASET_JSON).is_file():  # written last by the generator
        return root
    dials = config["settings"][setting]
    sizes = data.pop("per_site", 100)
    if not isinstance(sizes, list):
        generate_dataset(root, per_site=sizes, **data, **dials)
        return root
    source = out / "data" / f"{setting}-source"
    if not (source / DATASET_JSON).is_file():
        generate_dataset(source, per_site=max(sizes), **data, **dials)
    for number, size in enumerate(sizes, start=1):
        folder = source / f"site-{number}"
        records = [_absolute(folder, r) for r in read_manifest(folder / MANIFEST_NAME)]
        write_manifest(root / folder.name / MANIFEST_NAME, _first_patients(records, size))
    _write_test_and_info(source, root, {**read_dataset_info(source), "per_site": sizes, "derived_from": str(source)})
    return root


def _first_patients(records: list, size: int) -> list:
    """A site's own test rows, and about `size` of its train/val images, train and val in the generated
    proportion (at least one of each): the first patients of each split (a patient's images stay together)."""
    kept = [r for r in records if r.split == TEST_SITE]
    pool = [r for r in records if r.split != TEST_SITE]
    for split in ("train", "val"):
        rows = [r for r in pool if r.split == split]
        quota, patients = max(1, round(size * len(rows) / max(len(pool), 1))), []
        for r in rows:
            if r.patient_id not in patients and sum(x.patient_id in patients for x in rows) >= quota:
                break
            patients += [] if r.patient_id in patients else [r.patient_id]
        kept += [r for r in rows if r.patient_id in patients]
    return kept


def _absolute(folder: Path, r):
    """The record with absolute paths: a derived data root points at the images, never copies them."""
    return replace(r, extra=dict(r.extra), image=str(resolve(folder, r.image)),
                   mask=str(resolve(folder, r.mask)) if r.mask else "",
                   opacity=str(resolve(folder, r.opacity)) if r.opacity else "")


def _write_test_and_info(source: Path, root: Path, info: dict) -> None:
    test = source / TEST_SITE
    write_manifest(root / TEST_SITE / MANIFEST_NAME, [_absolute(test, r) for r in read_manifest(test / MANIFEST_NAME)])
    write_json(root / DATASET_JSON, info)  # last: marks the root complete


def site_view(root: Path, site: str, view: Path) -> Path:
    """A data root holding only `site`'s train/val rows (and the shared test set): local-only training."""
    if (view / DATASET_JSON).is_file():
        return view
    folder = root / site
    rows = [_absolute(folder, r) for r in read_manifest(folder / MANIFEST_NAME) if r.split in ("train", "val")]
    write_manifest(view / site / MANIFEST_NAME, rows)
    _write_test_and_info(root, view, {"classes": class_names(root), "view_of": str(root), "site": site})
    return view


def site_facts(root: Path, sites: list[str], task: str) -> dict[str, dict]:
    """Each site's training-set size and, for two classes, the share of the second class among its training images."""
    classes = class_names(root)
    facts = {}
    for site in sites:
        train = [r for r in read_manifest(root / site / MANIFEST_NAME) if r.split == "train"]
        share = sum(r.label == classes[-1] for r in train) / len(train) if train and len(classes) == 2 else None
        facts[site] = {"train_images": len(train), "prevalence": share if task == "classify" else None}
    return facts


# ---------------------------------------------------------------------------------------------- evaluation


class TestSets:
    """One setting's test data at the coordinator: the shared test set ("shared") and each site's own test
    split, and how a model (a state_dict) scores on them: AUROC for classification, Dice for segmentation."""

    def __init__(self, config: dict, root: Path, sites: list[str]):
        base = train_config(config, root, 1, 0)
        self.task, self.network, self.lr = base.task, base.network, base.lr
        self.metric = base.key_metric.removeprefix("val_")
        self.classes = class_names(root)
        options = dict(task=base.task, image_size=base.image_size, batch_size=base.batch_size, augment=False)
        shared = CXRDataModule(root, sites=None, **options)
        shared.setup("test")
        self.loaders = {"shared": shared.test_dataloader()}
        for site in sites:
            own = CXRDataModule(root, sites=[site], **options).site_test_dataloader()
            if own is None:
                raise StudyError(f"{root / site / MANIFEST_NAME}: {site} has no test split of its own")
            self.loaders[site] = own

    def probabilities(self, state: dict) -> dict[str, torch.Tensor]:
        """{test set: class probabilities (classify) or foreground probabilities (segment)} of one model."""
        module = build_module(self.task, self.network, lr=self.lr, classes=self.classes)
        module.load_state_dict(state)
        module.eval()
        out = {}
        with torch.no_grad():
            for name, loader in self.loaders.items():
                logits = torch.cat([module(batch["image"]).float() for batch in loader])
                out[name] = torch.softmax(logits, dim=1) if self.task == "classify" else torch.sigmoid(logits)
        return out

    def scores(self, probabilities: dict[str, torch.Tensor]) -> dict[str, float | None]:
        return {name: self.score(probs, self._targets(name)) for name, probs in probabilities.items()}

    def _targets(self, name: str) -> torch.Tensor:
        key = "label" if self.task == "classify" else "mask"
        return torch.cat([batch[key] for batch in self.loaders[name]])

    def score(self, probs: torch.Tensor, targets: torch.Tensor) -> float | None:
        """AUROC (None with one class in the targets) or Dice at the segmenter's 0.5 threshold."""
        if self.task == "segment":
            dice = DiceMetric(include_background=True, reduction="mean")
            dice(y_pred=(probs > 0.5).float(), y=targets.float())
            return float(dice.aggregate())
        targets = targets.long()
        if targets.unique().numel() < 2:
            return None
        if probs.shape[1] == 2:
            return float(binary_auroc(probs[:, 1], targets))
        return float(multiclass_auroc(probs, targets, num_classes=probs.shape[1], average="macro"))


def cached_scores(cache_dir: Path, key: str, files: list[Path], tests: TestSets) -> dict[str, float | None]:
    """A model's scores on every test set (the mean of several models' probabilities: an ensemble), kept in
    cache_dir/study_eval.json while its model files are unchanged."""
    cache_file = cache_dir / EVAL_CACHE
    cache = read_json_object(cache_file) if cache_file.is_file() else {}
    fingerprint = [[str(f), f.stat().st_mtime_ns] for f in files]
    if cache.get(key, {}).get("files") == fingerprint:
        return cache[key]["scores"]
    outputs = [tests.probabilities(load_state(f)) for f in files]
    scores = tests.scores({name: torch.stack([o[name] for o in outputs]).mean(0) for name in outputs[0]})
    cache[key] = {"files": fingerprint, "scores": scores}
    write_json(cache_file, cache)
    return scores


def _used(out: Path, files: list[Path], scores: dict, sites: list[str]) -> dict:
    """What one site's model under one method scored: the shared test set and every site's own test split."""
    return {"model": " + ".join(f.relative_to(out).as_posix() for f in files), "shared": scores["shared"],
            "tests": {s: scores[s] for s in sites}}


# ---------------------------------------------------------------------------------------------- training


def ensure_run(run_dir: Path, train, out: Path, log) -> Path:
    """`train(run_dir)` unless a finished run is there; an unfinished one is set aside first (kept beside it)."""
    if finished_run(run_dir):
        log(f"[study] {run_dir.relative_to(out)}: done, skipped")
        return run_dir
    log(f"[study] {run_dir.relative_to(out)}")
    set_aside_unfinished(run_dir, log)
    train(run_dir)
    return run_dir


def fine_tune(cfg: TrainConfig, initial: Path, run_dir: Path) -> dict:
    """`initial` (a federated model) trained further on one site (cfg.data_root: its view) for cfg.epochs,
    keeping the epoch best on the site's validation split; the initial model itself when no epoch beats it."""
    pl.seed_everything(cfg.seed, workers=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    dm = CXRDataModule(cfg.data_root, task=cfg.task, image_size=cfg.image_size, batch_size=cfg.batch_size,
                       seed=cfg.seed)
    dm.setup("fit")
    dm.keep_training_images_on(training_data_device(cfg))
    RunFolder.create(run_dir, "central", replace(cfg, classes=dm.classes),
                     facts={"num_train": dm.num_train_samples, "initial_model": str(initial)})
    balanced = cfg.task == "classify" and cfg.class_weights == "balanced"
    module = build_module(cfg.task, cfg.model, lr=cfg.lr, classes=dm.classes,
                          class_counts=dm.class_counts("train") if balanced else None)
    state = load_state(initial)
    module.load_state_dict(state)
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor=cfg.key_metric, mode="max",
                                 auto_insert_metric_name=False)
    trainer = pl.Trainer(max_epochs=cfg.epochs, accelerator=cfg.accelerator, devices=1, logger=False,
                         callbacks=[checkpoint, *device_callbacks(cfg)], plugins=[AtomicCheckpointIO()],
                         enable_progress_bar=False, enable_model_summary=False, deterministic=cfg.deterministic,
                         precision=trainer_precision(cfg))
    start = time.time()
    initial_val = trainer.validate(module, datamodule=dm, verbose=False)[0].get(cfg.key_metric)
    trainer.fit(module, datamodule=dm)
    best = checkpoint.best_model_score
    improved = best is not None and (initial_val is None or float(best) > initial_val)
    atomic_torch_save({"model": load_state(checkpoint.best_model_path) if improved else state}, run_dir / "model.pt")
    metrics = {"task": cfg.task, "initial_model": str(initial), "initial_val": initial_val,
               "best_val": float(best) if best is not None else None, "monitor": cfg.key_metric,
               "selected": "fine-tuned" if improved else "initial (no epoch beat it on validation)",
               "train_seconds": round(time.time() - start, 2), "num_train": dm.num_train_samples}
    write_json(run_dir / "metrics.json", metrics)  # last: marks the run finished
    return metrics


def _selected_model(run_dir: Path) -> Path:
    """A simulator run's chosen global model, or a central run's tested checkpoint."""
    metrics = RunFolder.read(run_dir).metrics()
    if metrics.get("selected_model"):
        return run_dir / "models" / f"{metrics['selected_model']}.pt"
    return run_dir / metrics["best_checkpoint"]


# ---------------------------------------------------------------------------------------------- the study


def run_study(config: dict, out: Path, log=print, seeds: int | None = None) -> dict:
    """Train what is not done yet, evaluate every model, write study.csv/json/md and the figures.
    seeds: this many training seeds from train.seed up (default: the configuration's `seeds`)."""
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    seeds = seeds or config["seeds"]
    RunFolder.create(out, "study", settings=dict(config, seeds=seeds))
    first = config.get("train", {}).get("seed", 0)
    rows, facts, metric = [], {}, None
    for setting in config["settings"]:
        root = setting_root(config, setting, out)
        sites = [f"site-{i + 1}" for i in range(config["data"].get("sites", 3))]
        facts[setting] = site_facts(root, sites, config.get("task", "classify"))
        views = {s: site_view(root, s, out / "views" / setting / s) for s in sites}
        tests = TestSets(config, root, sites)
        metric = tests.metric
        for seed in range(first, first + seeds):
            evaluated = run_cell(config, out, out / setting / f"seed-{seed}", root, views, tests, seed, log)
            rows += site_rows(setting, seed, evaluated, facts[setting], metric)
    return write_outputs(out, rows, facts, metric, config["settings"])


def run_cell(config: dict, out: Path, folder: Path, root: Path, views: dict[str, Path], tests: TestSets, seed: int,
             log) -> dict:
    """Every method of one setting and seed: {method: {site: what the site's model scored}}."""
    sites, baselines = list(views), config["baselines"]
    evaluated = {}
    for algorithm in _fl_algorithms(config):
        run = ensure_run(folder / algorithm, lambda d, a=algorithm: run_simulation(
            fl_config(config, root, sites, a, seed), d, take_turns=True), out, log)
        files = ({s: run / "models" / f"local_{s}.pt" for s in sites} if algorithm in PERSONAL
                 else dict.fromkeys(sites, _selected_model(run)))
        evaluated[algorithm] = {s: _used(out, [f], cached_scores(run, f"{algorithm}:{s}" if algorithm in PERSONAL
                                                                 else algorithm, [f], tests), sites)
                                for s, f in files.items()}
    epochs = config.get("local", {}).get("epochs", config.get("federated", {}).get("rounds", 10))
    local_runs = {s: ensure_run(folder / f"local-{s}", lambda d, s=s: train_central(
        train_config(config, views[s], epochs, seed), new_run_dir(d, "central")), out, log) for s in sites}
    local = {s: _selected_model(run) for s, run in local_runs.items()}
    evaluated[LOCAL] = {s: _used(out, [f], cached_scores(local_runs[s], LOCAL, [f], tests), sites)
                        for s, f in local.items()}
    if "central" in baselines:
        run = ensure_run(folder / "central", lambda d: train_central(train_config(
            config, root, config.get("central", {}).get("epochs", epochs), seed), new_run_dir(d, "central")), out, log)
        scores = cached_scores(run, "central", [_selected_model(run)], tests)
        evaluated["central"] = {s: _used(out, [_selected_model(run)], scores, sites) for s in sites}
    if "ensemble" in baselines:
        scores = cached_scores(folder, "ensemble", list(local.values()), tests)
        evaluated["ensemble"] = {s: _used(out, list(local.values()), scores, sites) for s in sites}
    if "fedavg-finetune" in baselines:
        evaluated["fedavg-finetune"] = _fine_tuned(config, out, folder, views, tests, seed, log)
    return evaluated


def _fine_tuned(config: dict, out: Path, folder: Path, views: dict[str, Path], tests: TestSets, seed: int,
                log) -> dict:
    initial = _selected_model(folder / "fedavg")
    epochs = config.get("finetune", {}).get("epochs", 2)
    result = {}
    for site, view in views.items():
        run = ensure_run(folder / f"finetune-{site}", lambda d, v=view: fine_tune(
            train_config(config, v, epochs, seed), initial, d), out, log)
        model = run / "model.pt"
        result[site] = _used(out, [model], cached_scores(run, "finetune", [model], tests), list(views))
    return result
