"""NVFlare client script: one site trains and evaluates the plain LightningModules from
`lightning_modules` under the Lightning Client API (`flare.patch(trainer)`).

Per task from the server:
- train: validate the received global model on the local validation split (these `val_*` metrics
  drive the server's best-model selection), train `--local-epochs`, send the weights with the
  number of local training samples as the aggregation weight.
- validate (cross-site evaluation): evaluate the received model on the local validation split;
  a classifier also sends histograms of its positive-class score per true class (bin counts).
- submit_model (cross-site evaluation): send this site's own last local model.

A site finds its data through its own local configuration, `local/cxrfl_site.json` in its
workspace: `{"data_dir": "/path/to/this/site"}` (the folder with its manifest.csv) in a kit, or
`{"data_root": "/path"}` (one folder per site name) in a simulator workspace, which copies its
local/ into every site. No local path travels in the job: a lung-ROI job carries its segmenter as
a file (`--segmenter NAME`, in the job's custom folder) unless the site's configuration names
its own (`"segmenter": "/path"`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import json
import os
import time
from pathlib import Path
from urllib.parse import unquote

import nvflare.client.lightning as flare
import pytorch_lightning as pl
import torch
from nvflare.app_common.abstract.fl_model import FLModel, MetaKey
from nvflare.client import is_evaluate, is_submit_model, send

from app_custom.availability import parse_rounds
from app_custom.wire import ABSENT, LOCAL_SECONDS
from lightning_modules.callbacks import RoundTimeBudget
from lightning_modules.data.datamodule import CXRDataModule
from lightning_modules.data.manifest import MANIFEST_NAME
from lightning_modules.factory import build_module
from lightning_modules.segmentation import LungSegmentation


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--task", choices=["segment", "classify"], required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--classes", type=lambda text: json.loads(unquote(text)), default=None,
                   help="the job's class names as a URL-quoted JSON list (NVFlare splits script arguments "
                   "on spaces): every site uses the same label indices")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--roi", choices=["mask", "crop"], default=None)
    p.add_argument("--roi-threshold", type=float, default=0.5)
    p.add_argument("--segmenter", default=None,
                   help="file name of the segmenter the job carries in its custom folder, for ROI masks (else "
                   "ground truth)")
    p.add_argument("--class-weights", choices=["none", "balanced"], default="balanced")
    p.add_argument("--time-budget", type=float, default=0.0, help="max seconds of local training per round (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--deterministic", action="store_true", help="torch's deterministic algorithms where they exist")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--schedule", type=lambda text: json.loads(unquote(text)), default=None,
                   help="URL-quoted JSON {site: round ranges}: the rounds each listed site takes part in")
    p.add_argument("--rounds", type=int, default=None,
                   help="the job's number of rounds, for open-ended schedule ranges (default: the server's count)")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="CPU threads for torch (0: torch's default); set when sites share one machine")
    return p.parse_args(argv)


SITE_CONFIG = Path("local") / "cxrfl_site.json"


class SiteConfigError(RuntimeError):
    """The site cannot find or read its data; an exception (not sys.exit), so NVFlare's task
    runner logs the message and the coordinator can name it (sys.exit ends its thread silently)."""

JOB_CUSTOM = Path(__file__).resolve().parents[1]  # the job's custom/ folder: files the job carries


def site_config(start: Path) -> tuple[Path | None, dict]:
    """The site's local/cxrfl_site.json, found in a folder above `start` (the site workspace)."""
    for folder in [start, *start.parents]:
        path = folder / SITE_CONFIG
        if path.is_file():
            try:
                return path, json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise SiteConfigError(f"cxrfl client: {path}: unreadable site configuration ({exc})")
    return None, {}


def site_data_dir(config_path: Path | None, config: dict, site: str) -> Path:
    if config.get("data_dir"):
        site_dir = Path(config["data_dir"])
        where = f"data_dir in {config_path}"
    elif config.get("data_root"):
        site_dir = Path(config["data_root"]) / site
        where = f"the data root in {config_path} must hold one folder per site name"
    else:
        raise SiteConfigError(f"cxrfl client {site}: no data configured: put {{\"data_dir\": ...}} in the site's {SITE_CONFIG}")
    if not (site_dir / MANIFEST_NAME).is_file():
        raise SiteConfigError(f"cxrfl client {site}: no data for this site: {site_dir / MANIFEST_NAME} does not exist ({where})")
    return site_dir


def site_data_module(args, site: str, config_path: Path | None, config: dict) -> CXRDataModule:
    site_dir = site_data_dir(config_path, config, site)
    mask_predictor = None
    segmenter_file = config.get("segmenter") or (JOB_CUSTOM / args.segmenter if args.segmenter else None)
    if args.roi and segmenter_file:
        segmenter = LungSegmentation.from_checkpoint(segmenter_file)
        mask_predictor = segmenter.mask_predictor(args.roi_threshold)
    dm = CXRDataModule(site_dir.parent, task=args.task, sites=[site_dir.name], image_size=args.image_size,
                       batch_size=args.batch_size, num_workers=args.workers, roi=args.roi,
                       roi_threshold=args.roi_threshold, mask_predictor=mask_predictor, seed=args.seed,
                       limit=args.limit)
    if args.classes:
        dm.classes = list(args.classes)  # a site missing a class must still agree on num_classes
    dm.setup("fit")
    return dm


@contextlib.contextmanager
def machine_turn(lock_path: str | None):
    """Hold the machine for one task (no-op without a lock file). Sites simulated on one machine
    stay alive as processes (no per-round start-up) yet never compete for its cores."""
    if not lock_path:
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ReportLocalSeconds(pl.Callback):
    """Put the site's time on this round's task (validation of the received model + training,
    from `task_received()`) into the update's meta (`local_seconds`): the server's round log keeps
    it, for the critical-path time of a deployment with one machine per site. Runs before
    NVFlare's FLCallback, which sends the update at the end of fit()."""

    def __init__(self):
        self._start = time.monotonic()

    def task_received(self) -> None:
        self._start = time.monotonic()

    def on_train_end(self, trainer, pl_module):
        pl_module.__fl_meta__[LOCAL_SECONDS] = round(time.monotonic() - self._start, 3)


FAULT_DRILL = "CXRFL_FAULT_DRILL"


class FaultDrill(pl.Callback):
    """Failure drill, off unless the environment asks for it: CXRFL_FAULT_DRILL="site-2:nan@1" makes
    site-2's update of round 1 carry NaN weights, to see the server refuse it and the round go on
    (docs/security.md, "Failure modes"). Runs before NVFlare's FLCallback sends the update."""

    def __init__(self, site: str):
        spec = os.environ.get(FAULT_DRILL, "")
        target, _, rest = spec.partition(":")
        kind, _, round_text = rest.partition("@")
        self.round = int(round_text) if target == site and kind == "nan" and round_text.isdigit() else None
        self.current_round = None

    def on_train_end(self, trainer, pl_module):
        if self.round is not None and self.current_round == self.round:
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))


def handle_task(args, site, input_model, trainer, module, dm, local_params):
    """One task from the server; returns this site's own latest model (for submit_model)."""
    if is_submit_model():
        if local_params is None:
            local_params = copy.deepcopy(module.cpu().state_dict())
        send(FLModel(params=local_params, meta={"site": site}))
        return local_params
    if is_evaluate():
        # a classifier adds per-class score histograms: the server's threshold, without any image or score leaving
        histogram = hasattr(module, "report_score_histogram")
        module.report_score_histogram = histogram
        try:
            trainer.validate(module, datamodule=dm)  # the patched trainer loads the model and sends metrics
        finally:
            if histogram:
                module.report_score_histogram = False
        return local_params
    if args.schedule and site in args.schedule and input_model.current_round not in parse_rounds(
            args.schedule[site], args.rounds or input_model.total_rounds):
        # away this round (simulated): no training, no validation; the server counts it as absent
        send(FLModel(params={}, meta={ABSENT: True}))
        return local_params
    trainer.validate(module, datamodule=dm)  # metrics of the received global model, for model selection
    trainer.fit(module, datamodule=dm)
    local_params = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return local_params


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)  # sites sharing cores: oversubscription stalls OpenMP
    flare.init()
    site = flare.get_site_name()
    pl.seed_everything(args.seed, workers=True)
    config_path, config = site_config(Path(__file__).resolve().parent)
    dm = site_data_module(args, site, config_path, config)
    counts = dm.class_counts("train") if args.task == "classify" and args.class_weights == "balanced" else None
    module = build_module(args.task, args.model, lr=args.lr, classes=dm.classes, class_counts=counts)
    # FedAvg weight: this site's number of training samples (not batches), read by the aggregator.
    module.__fl_meta__ = {MetaKey.NUM_STEPS_CURRENT_ROUND: dm.num_train_samples}

    local_seconds = ReportLocalSeconds()
    drill = FaultDrill(site)
    callbacks = [local_seconds, drill]
    if args.time_budget > 0:
        callbacks.append(RoundTimeBudget(args.time_budget))
    # check_val_every_n_epoch: fit() runs no validation loop of its own. Each round already
    # validates the received global model (the metrics NVFlare selects the best model by); a second
    # pass over the local model would cost a validation per round and feed nothing.
    trainer = pl.Trainer(max_epochs=args.local_epochs, accelerator=args.accelerator, devices=1,
                         logger=flare.logger(), callbacks=callbacks, enable_checkpointing=False,
                         log_every_n_steps=5, enable_model_summary=False, num_sanity_val_steps=0,
                         check_val_every_n_epoch=2**31 - 1, deterministic=args.deterministic)
    flare.patch(trainer)

    local_params = None  # this site's own model after its last training round
    while flare.is_running():
        input_model = flare.receive()
        if input_model is None:
            break
        drill.current_round = input_model.current_round
        with machine_turn(config.get("turn_lock")):
            local_seconds.task_received()
            local_params = handle_task(args, site, input_model, trainer, module, dm, local_params)


if __name__ == "__main__":
    main()
