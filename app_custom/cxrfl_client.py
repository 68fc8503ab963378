"""NVFlare client script: one site trains and evaluates the plain LightningModules from
`lightning_modules` under the Lightning Client API, in the shape of NVFlare's hello-lightning client.

Settings: the job's `custom/cxrfl_train.json` (a `TrainConfig`, the same at every site) and the site's
own `local/cxrfl_site.json` (where its data is: `{"data_dir": ...}` in a kit, `{"data_root": ...}` in a
simulator workspace). No local path travels in the job: a lung-ROI job carries its segmenter as a file
in custom/ unless the site's configuration names its own (`"segmenter": "/path"`).

Per task from the server:
- train: validate the received global model on the local validation split (these `val_*` metrics
  drive the server's best-model selection), train, send the weights with the number of local training
  samples as the FedAvg weight and the site's time on the task (`wire.LOCAL_SECONDS`).
- validate (cross-site evaluation): evaluate the received model on the local validation split and, when
  the site has one, its own test split (`site_test_*` metrics); a classifier also sends histograms of
  its positive-class score per true class (bin counts).
- submit_model (cross-site evaluation): send this site's own model: its last local model, Ditto's
  personal model.

Algorithms (`TrainConfig.algorithm`, docs/algorithms.md): FedProx and SCAFFOLD are applied by the patched
trainer from the server's metadata; FedBN keeps this site's normalisation tensors in every model it
loads (the job's KeepAtSite filter keeps them from leaving); Ditto also trains a personal model,
pulled toward each global model it receives. With DP-SGD (`--dp dpsgd`) every local step is clipped and
noised and accounted (lightning_modules/privacy.py); each update carries the epsilon spent so far.

The site's log gets the process's age and memory at each stage (imports done, set up, first training step,
each round trained; app_custom/process_stats.py): start-up and memory per site, docs/performance.md ("Site start-up and memory").
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nvflare.client.lightning as flare
import pytorch_lightning as pl
import torch
from nvflare.app_common.abstract.fl_model import FLModel, MetaKey
from nvflare.client import is_evaluate, is_submit_model, send

from app_custom.process_stats import stage_line
from app_custom.site_files import SITE_CONFIG, local_settings, site_data_dir, site_torch_threads
from app_custom.wire import ABSENT, DP_DELTA, DP_EPSILON, LOCAL_SECONDS
from lightning_modules.accelerate import device_callbacks, trainer_precision, training_data_device
from lightning_modules.callbacks import ProximalPull, RoundTimeBudget
from lightning_modules.config import TRAIN_CONFIG_FILE, TrainConfig
from lightning_modules.data.datamodule import CXRDataModule
from lightning_modules.factory import build_module
from lightning_modules.networks import normalisation_state_keys
from lightning_modules.segmentation import LungSegmentation

JOB_CUSTOM = Path(__file__).resolve().parents[1]  # the job's custom/ folder: files the job carries
# fit() runs no validation loop of its own: each round validates the received global model first (what
# NVFlare selects the best model by), a second pass would feed nothing.
NO_VALIDATION_IN_FIT = 2**31 - 1
log = logging.getLogger("cxrfl_client")


def cpu_state(module: pl.LightningModule) -> dict:
    """A copy of the module's weights on the CPU, detached from training."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def site_data_module(cfg: TrainConfig, site: str, config_path: Path | None, config: dict) -> CXRDataModule:
    site_dir = site_data_dir(config_path, config, site)
    segmenter = config.get("segmenter") or (JOB_CUSTOM / cfg.segmenter if cfg.segmenter else None)
    masks = None  # ROI from the ground-truth masks unless the job or the site has a segmenter
    if cfg.roi and segmenter:
        masks = LungSegmentation.from_checkpoint(segmenter).mask_predictor(cfg.roi_threshold)
    dm = CXRDataModule(site_dir.parent, task=cfg.task, sites=[site_dir.name], image_size=cfg.image_size,
                       batch_size=cfg.batch_size, num_workers=cfg.workers, roi=cfg.roi, roi_threshold=cfg.roi_threshold,
                       mask_predictor=masks, seed=cfg.seed, limit=cfg.limit)
    if cfg.classes:
        dm.classes = list(cfg.classes)  # a site missing a class must still agree on num_classes
    dm.setup("fit")
    dm.keep_training_images_on(training_data_device(cfg))
    return dm


class ReportLocalSeconds(pl.Callback):
    """The site's time on this round's task (validation of the received model + training) in the update's
    meta, for the critical-path time of a deployment with one machine per site. Runs before NVFlare's
    FLCallback, which sends the update at the end of fit()."""

    def __init__(self):
        self._start = time.monotonic()

    def task_received(self) -> None:
        self._start = time.monotonic()

    def on_train_end(self, trainer, pl_module):
        pl_module.__fl_meta__[LOCAL_SECONDS] = round(time.monotonic() - self._start, 3)


class LogFirstStep(pl.Callback):
    """One log line at this process's first training step: its start-up cost (age, memory) in the site's log."""

    def __init__(self):
        self.done = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.done:
            self.done = True
            log.info(stage_line("site process: first training step"))


class ReportPrivacySpent(pl.Callback):
    """DP-SGD: the epsilon this site has spent so far, in the update's meta (before FLCallback sends it)."""

    def __init__(self, privacy):
        self.privacy = privacy

    def on_train_end(self, trainer, pl_module):
        pl_module.__fl_meta__[DP_EPSILON] = round(self.privacy.epsilon, 6)
        pl_module.__fl_meta__[DP_DELTA] = self.privacy.plan.delta


def site_privacy(cfg: TrainConfig, dm: CXRDataModule, site: str):
    """DP-SGD's callback with this site's plan (its own sample rate, over the job's rounds), or None. A plan
    above --target-epsilon is refused here, before the site trains."""
    if not cfg.dp_sgd:
        return None
    from lightning_modules.privacy import DPSGD, plan_for  # lazy: Opacus only for DP-SGD jobs

    return DPSGD(plan_for(cfg, dm.num_train_samples, who=f"site {site}"), cfg.dp_max_grad_norm)


def plain_trainer(cfg: TrainConfig, **kwargs) -> pl.Trainer:
    """A trainer outside NVFlare's patch (evaluation, Ditto's personal model): it sends nothing."""
    callbacks = [*kwargs.pop("callbacks", []), *device_callbacks(cfg)]
    return pl.Trainer(accelerator=cfg.accelerator, devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      deterministic=cfg.deterministic, precision=trainer_precision(cfg), callbacks=callbacks, **kwargs)


def evaluate_here(module: pl.LightningModule, dm: CXRDataModule, cfg: TrainConfig) -> dict:
    """The loaded model on this site's validation split and, when it has one, its own test split
    (`site_test_*`); a classifier adds its validation score histograms (counts only)."""
    evaluator = plain_trainer(cfg)
    module.report_score_histogram = hasattr(module, "report_score_histogram")
    evaluator.validate(module, datamodule=dm, verbose=False)
    module.report_score_histogram = False
    metrics = {k: float(v) for k, v in evaluator.callback_metrics.items()}
    site_test = dm.site_test_dataloader()
    if site_test is not None:
        evaluator.test(module, dataloaders=site_test, verbose=False)
        metrics.update({f"site_{k}": float(v) for k, v in evaluator.callback_metrics.items() if k.startswith("test_")})
    return metrics


class PersonalModel:
    """Ditto: this site's personal model, started from the first global model it receives, trained each
    round for the same local epochs with a pull of strength lambda toward the global model received."""

    def __init__(self, module: pl.LightningModule, cfg: TrainConfig):
        self.module, self.cfg, self.started = module, cfg, False

    def train(self, global_params: dict, dm: CXRDataModule) -> None:
        if not self.started:
            self.module.load_state_dict(global_params)
            self.started = True
        pull = ProximalPull(global_params, self.cfg.proximal_weight)
        plain_trainer(self.cfg, max_epochs=self.cfg.epochs, callbacks=[pull],
                      check_val_every_n_epoch=NO_VALIDATION_IN_FIT).fit(self.module, datamodule=dm)


def keep_site_tensors(input_model: FLModel, module: pl.LightningModule, keys: list[str]) -> None:
    """FedBN: the received model takes this site's own tensors for `keys` (its normalisation layers), so
    the patched trainer loads them with the shared weights (and the update's difference is taken from them)."""
    if keys and input_model.params:
        own = module.state_dict()
        input_model.params.update({k: own[k].detach().cpu().clone() for k in keys})


@dataclass(frozen=True)
class SiteHooks:
    """What only simulated sites add around the loop (app_custom/simulated_site.py): a context each task
    runs in (taking turns on one machine) and the rounds a site sits out. Production sites use none."""

    task_turn: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    away: Callable[[str, FLModel], bool] = lambda site, input_model: False


def main(hooks: SiteHooks = SiteHooks()) -> None:
    log.info(stage_line("site process: imports done"))
    flare.init()
    site = flare.get_site_name()
    cfg = TrainConfig.read_json(JOB_CUSTOM / TRAIN_CONFIG_FILE)
    pl.seed_everything(cfg.seed, workers=True)
    config_path, config = local_settings(SITE_CONFIG, JOB_CUSTOM)
    threads = site_torch_threads(config_path, config)
    if threads:  # before any tensor work: the site's share of a machine's cores
        torch.set_num_threads(threads)
    dm = site_data_module(cfg, site, config_path, config)
    counts = dm.class_counts("train") if cfg.task == "classify" and cfg.class_weights == "balanced" else None
    module = build_module(cfg.task, cfg.model, lr=cfg.lr, classes=dm.classes, class_counts=counts,
                          dp_compatible=cfg.dp_sgd)
    module.__fl_meta__ = {MetaKey.NUM_STEPS_CURRENT_ROUND: dm.num_train_samples}  # FedAvg weight: samples
    site_keys = normalisation_state_keys(module) if cfg.algorithm == "fedbn" else []
    personal = None
    if cfg.algorithm == "ditto":
        personal = PersonalModel(build_module(cfg.task, cfg.model, lr=cfg.lr, classes=dm.classes, class_counts=counts), cfg)
    local_seconds = ReportLocalSeconds()
    budget = [RoundTimeBudget(cfg.time_budget)] if cfg.time_budget > 0 else []
    privacy = site_privacy(cfg, dm, site)
    dp_callbacks = [privacy, ReportPrivacySpent(privacy)] if privacy else []
    # device callbacks before NVFlare's FLCallback (flare.patch appends it): weights leave in the usual memory order
    trainer = pl.Trainer(max_epochs=cfg.epochs, accelerator=cfg.accelerator, devices=1, logger=flare.logger(),
                         callbacks=[local_seconds, *budget, *dp_callbacks, *device_callbacks(cfg)],
                         enable_checkpointing=False, log_every_n_steps=5, enable_model_summary=False,
                         num_sanity_val_steps=0, check_val_every_n_epoch=NO_VALIDATION_IN_FIT,
                         deterministic=cfg.deterministic, precision=trainer_precision(cfg))
    trainer.callbacks.append(LogFirstStep())  # before flare.patch: NVFlare's FLCallback stays last
    flare.patch(trainer)
    log.info(stage_line("site process: set up") + f"; {torch.get_num_threads()} torch threads")

    # This site's own model for cross-site evaluation: `module` holds it from the end of a training round until
    # another model is loaded over it; a copy is made only then (no copy per round kept through the next).
    local_params, holds_local = None, False
    while flare.is_running():
        input_model = flare.receive()
        if input_model is None:
            break
        with hooks.task_turn():
            local_seconds.task_received()
            keep_site_tensors(input_model, module, site_keys)
            if is_submit_model():
                if local_params is None:
                    local_params = cpu_state(module)
                send(FLModel(params=cpu_state(personal.module) if personal else local_params, meta={"site": site}))
            elif is_evaluate():  # metrics and score histograms only: no image's score leaves
                if holds_local and local_params is None:
                    local_params = cpu_state(module)
                module.load_state_dict(input_model.params)
                holds_local = False
                send(FLModel(metrics=evaluate_here(module, dm, cfg)))
            elif hooks.away(site, input_model):  # the server counts an empty update as a site that is away
                send(FLModel(params={}, meta={ABSENT: True}))
            else:
                trainer.validate(module, datamodule=dm)  # the received global model's metrics: model selection
                if privacy is not None:  # a resumed job: its earlier rounds count as spent
                    privacy.account_earlier_rounds(input_model.current_round or 0)
                trainer.fit(module, datamodule=privacy.datamodule(dm) if privacy else dm)
                local_params, holds_local = None, True
                if personal is not None:
                    personal.train(input_model.params, dm)
                log.info(stage_line(f"site process: round {input_model.current_round} trained"))
        input_model = None  # the received weights are not kept while the next task's arrive


if __name__ == "__main__":
    main()
