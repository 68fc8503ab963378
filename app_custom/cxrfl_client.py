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
- validate (cross-site evaluation): evaluate the received model on the local validation split; a
  classifier also sends histograms of its positive-class score per true class (bin counts).
- submit_model (cross-site evaluation): send this site's own last local model.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nvflare.client.lightning as flare
import pytorch_lightning as pl
from nvflare.app_common.abstract.fl_model import FLModel, MetaKey
from nvflare.client import is_evaluate, is_submit_model, send

from app_custom.site_files import SITE_CONFIG, local_settings, site_data_dir
from app_custom.wire import ABSENT, LOCAL_SECONDS
from lightning_modules.callbacks import RoundTimeBudget
from lightning_modules.config import TRAIN_CONFIG_FILE, TrainConfig
from lightning_modules.data.datamodule import CXRDataModule
from lightning_modules.factory import build_module
from lightning_modules.segmentation import LungSegmentation

JOB_CUSTOM = Path(__file__).resolve().parents[1]  # the job's custom/ folder: files the job carries


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


@dataclass(frozen=True)
class SiteHooks:
    """What only simulated sites add around the loop (app_custom/simulated_site.py): a context each task
    runs in (taking turns on one machine) and the rounds a site sits out. Production sites use none."""

    task_turn: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    away: Callable[[str, FLModel], bool] = lambda site, input_model: False


def main(hooks: SiteHooks = SiteHooks()) -> None:
    flare.init()
    site = flare.get_site_name()
    cfg = TrainConfig.read_json(JOB_CUSTOM / TRAIN_CONFIG_FILE)
    pl.seed_everything(cfg.seed, workers=True)
    dm = site_data_module(cfg, site, *local_settings(SITE_CONFIG, JOB_CUSTOM))
    counts = dm.class_counts("train") if cfg.task == "classify" and cfg.class_weights == "balanced" else None
    module = build_module(cfg.task, cfg.model, lr=cfg.lr, classes=dm.classes, class_counts=counts)
    module.__fl_meta__ = {MetaKey.NUM_STEPS_CURRENT_ROUND: dm.num_train_samples}  # FedAvg weight: samples
    local_seconds = ReportLocalSeconds()
    budget = [RoundTimeBudget(cfg.time_budget)] if cfg.time_budget > 0 else []
    # check_val_every_n_epoch: fit() runs no validation loop of its own; each round validates the
    # received global model first (what NVFlare selects the best model by), a second pass feeds nothing.
    trainer = pl.Trainer(max_epochs=cfg.epochs, accelerator=cfg.accelerator, devices=1, logger=flare.logger(),
                         callbacks=[local_seconds, *budget], enable_checkpointing=False, log_every_n_steps=5,
                         enable_model_summary=False, num_sanity_val_steps=0, check_val_every_n_epoch=2**31 - 1,
                         deterministic=cfg.deterministic)
    flare.patch(trainer)

    local_params = None  # this site's own model after its last training round
    while flare.is_running():
        input_model = flare.receive()
        if input_model is None:
            break
        with hooks.task_turn():
            local_seconds.task_received()
            if is_submit_model():
                local_params = local_params or {k: v.cpu().clone() for k, v in module.state_dict().items()}
                send(FLModel(params=local_params, meta={"site": site}))
            elif is_evaluate():  # a classifier adds its score histograms: the operating point, no score leaves
                module.report_score_histogram = hasattr(module, "report_score_histogram")
                trainer.validate(module, datamodule=dm)  # the patched trainer loads the model, sends metrics
                module.report_score_histogram = False
            elif hooks.away(site, input_model):  # the server counts an empty update as a site that is away
                send(FLModel(params={}, meta={ABSENT: True}))
            else:
                trainer.validate(module, datamodule=dm)  # the received global model's metrics: model selection
                trainer.fit(module, datamodule=dm)
                local_params = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


if __name__ == "__main__":
    main()
