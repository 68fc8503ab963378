"""Build the NVFlare job for one task: ScatterAndGather over the Lightning client script.

Server: PyTorch persistor (last + best global model), in-time weighted aggregator (weights =
each site's training-sample count), FedAvg or a FedOpt server optimizer, IntimeModelSelector on
the sites' validation metric, per-round recorder, TensorBoard (and optionally W&B) receivers,
then cross-site evaluation. Clients: a ScriptRunner running `app_custom/cxrfl_client.py`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote

from nvflare.apis.dxo import DataKind
from nvflare.app_common.aggregators import InTimeAccumulateWeightedAggregator
from nvflare.app_common.filters.percentile_privacy import PercentilePrivacy
from nvflare.app_common.filters.svt_privacy import SVTPrivacy
from nvflare.app_common.shareablegenerators import FullModelShareableGenerator
from nvflare.app_common.workflows.cross_site_model_eval import CrossSiteModelEval
from nvflare.app_common.workflows.global_model_eval import GlobalModelEval
from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather
from nvflare.app_opt.pt.fedopt import PTFedOptModelShareableGenerator
from nvflare.app_opt.pt.file_model_locator import PTFileModelLocator
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
from nvflare.app_opt.tracking.tb.tb_receiver import TBAnalyticsReceiver
from nvflare.client.config import ExchangeFormat, TransferType
from nvflare.job_config.base_fed_job import BaseFedJob
from nvflare.job_config.defs import FilterType
from nvflare.job_config.script_runner import FrameworkType, ScriptRunner

import app_custom
from cxrfl.runs import WANDB_PRIVATE_SETTINGS
from lightning_modules.data.manifest import write_json
from lightning_modules.factory import DEFAULT_MODEL
from lightning_modules.networks import CLASSIFIERS, SEGMENTERS, input_size_problem
from app_custom.contributions import UpdateValidator
from app_custom.global_model import GlobalModel
from app_custom.intermittent import SiteAwareFedAvg, check_schedule
from app_custom.round_recorder import RoundRecorder

TASKS = ("segment", "classify", "roi")
# FLConfig fields that name files on this machine: they never travel in a job or to tracking.
LOCAL_PATHS = ("data_root", "segmenter", "turn_lock", "initial_model")
JOB_SEGMENTER = "segmenter.pt"  # a lung-ROI job's segmenter, in the job's custom/ folder
SITE_CONFIG = Path("local") / "cxrfl_site.json"  # a site's own settings (app_custom/cxrfl_client.py)
# Server-side aggregation: FedAvg, or FedOpt with a server optimizer (Reddi et al. 2021).
AGGREGATIONS = {
    "fedavg": None,
    "fedadam": "torch.optim.Adam",
    "fedadagrad": "torch.optim.Adagrad",
    "fedyogi": "app_custom.yogi.Yogi",
}
DP_FILTERS = {"percentile": PercentilePrivacy, "svt": SVTPrivacy}  # NVFlare's, on weight differences

# Relative to the folder holding the app_custom package: the exported job then finds the script in
# its own custom/ folder on any machine (see `from_package_root`).
CLIENT_SCRIPT = "app_custom/cxrfl_client.py"
PACKAGE_ROOT = Path(app_custom.__file__).resolve().parent.parent


@contextlib.contextmanager
def from_package_root():
    """Build and export jobs from the package root, where CLIENT_SCRIPT resolves."""
    cwd = os.getcwd()
    os.chdir(PACKAGE_ROOT)
    try:
        yield
    finally:
        os.chdir(cwd)


@dataclass
class FLConfig:
    """Everything a federated run depends on; recorded in the run folder."""

    task: str = "classify"
    data_root: str | None = "data/synthetic"  # None: each site reads its local/cxrfl_site.json
    sites: list[str] = field(default_factory=lambda: ["site-1", "site-2", "site-3"])
    rounds: int = 5
    local_epochs: int = 1
    batch_size: int = 16
    lr: float = 1e-3
    image_size: int = 128
    model: str | None = None
    classes: list[str] = field(default_factory=lambda: ["normal", "pneumonia"])
    roi: str = "mask"  # roi task: "mask" or "crop"
    roi_threshold: float = 0.5
    segmenter: str | None = None  # roi task: segmentation checkpoint (None: ground-truth masks)
    min_clients: int | None = None  # None: all sites
    wait_after_min_clients: float = 0.0  # seconds a round still waits for the others once min_clients answered
    time_budget: float = 0.0  # seconds of local training per round, 0: no limit
    aggregation: str = "fedavg"
    server_lr: float = 1.0
    seed: int = 0
    deterministic: bool = False  # torch's deterministic algorithms at every site (slower where they differ)
    class_weights: str = "balanced"
    target_sensitivity: float | None = None  # two-class classify: threshold reaching this validation sensitivity
    accelerator: str = "auto"
    limit: int | None = None
    cross_site_eval: bool = True
    # without cross-site evaluation: still each site's validation of the global models (NVFlare's
    # GlobalModelEval, no local models sent), which the operating point and model selection need
    global_model_eval: bool = False
    wandb: bool = False
    wandb_project: str = "cxr-fl"
    record_contributions: bool = False
    torch_threads: int = 0  # per-site CPU threads; 0: torch's default (one site per machine)
    turn_lock: str | None = None  # simulated sites sharing a machine take turns on this lock file
    he: bool = False  # homomorphic encryption of the weight exchange (needs HE contexts in the kits)
    he_encrypt_layers: str | None = None  # regex of tensor names to encrypt; None: every float tensor
    schedule: dict[str, str] | None = None  # site -> rounds it takes part in ("0-2,5"); others: all rounds
    absent_weights: str = "drop"  # a site that is away: "drop" its weights (approach 1) or "keep" its last
    dp: str | None = None  # differential privacy filter on each site's update: "percentile" or "svt"
    dp_args: dict | None = None  # the NVFlare privacy filter's arguments
    start_round: int = 0  # a resumed run: the first round still to run
    initial_model: str | None = None  # a resumed run: the global model (persistor format) it continues from

    @property
    def kind(self) -> str:
        return "segment" if self.task == "segment" else "classify"

    @property
    def key_metric(self) -> str:
        return "val_dice" if self.kind == "segment" else "val_auroc"

    @property
    def job_name(self) -> str:
        return f"cxrfl_{self.task}"

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}")
        if not self.sites:
            raise ValueError("need at least one site")
        if self.rounds < 1 or self.local_epochs < 1:
            raise ValueError("rounds and local epochs must be >= 1")
        model = self.model or DEFAULT_MODEL[self.kind]
        valid = SEGMENTERS if self.kind == "segment" else CLASSIFIERS
        if model not in valid:
            raise ValueError(f"--model {model!r} does not fit --task {self.task}; choose one of {', '.join(valid)}")
        size_problem = input_size_problem(model, self.image_size)
        if size_problem:
            raise ValueError(size_problem)
        for name, value in [("--lr", self.lr), ("--server-lr", self.server_lr)]:
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        for name, value in [("--time-budget", self.time_budget), ("--wait-after-min-clients", self.wait_after_min_clients)]:
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value}")
        if not 0 < self.roi_threshold < 1:
            raise ValueError(f"--roi-threshold must be between 0 and 1 (exclusive), got {self.roi_threshold}")
        if self.batch_size < 1 or (self.limit is not None and self.limit < 1):
            raise ValueError("--batch-size and --limit must be >= 1")
        if self.he and self.aggregation != "fedavg":
            raise ValueError("homomorphic encryption works with FedAvg only (the server cannot run an optimizer on ciphertexts)")
        if self.absent_weights not in ("drop", "keep"):
            raise ValueError("absent_weights must be 'drop' or 'keep'")
        if self.schedule:
            check_schedule(self.schedule, self.sites, self.rounds)
        if self.he and (self.schedule or self.absent_weights == "keep"):
            raise ValueError("availability schedules and --absent-weights keep are not available with HE")
        if self.aggregation != "fedavg" and (self.schedule or self.absent_weights == "keep"):
            raise ValueError("availability schedules and --absent-weights keep work with FedAvg only")
        if self.he_encrypt_layers and not self.he:
            raise ValueError("--he-encrypt-layers needs --he")
        if self.he_encrypt_layers:
            try:
                re.compile(self.he_encrypt_layers)
            except re.error as exc:
                raise ValueError(f"--he-encrypt-layers {self.he_encrypt_layers!r} is not a valid regular expression: {exc}") from None
        if self.he and self.global_model_eval:
            raise ValueError("global-model evaluation is not available with HE (NVFlare cannot broadcast "
                             "ciphertext models)")
        if self.he and self.cross_site_eval:
            raise ValueError("cross-site evaluation is not available with HE (NVFlare cannot broadcast ciphertext "
                             "models); pass --no-cross-site-eval")
        if self.dp is not None:
            if self.dp not in DP_FILTERS:
                raise ValueError(f"--dp must be one of {', '.join(DP_FILTERS)}")
            if self.he or self.aggregation != "fedavg" or self.schedule or self.absent_weights == "keep":
                raise ValueError("--dp works with plain FedAvg (no --he, --aggregation fedopt, schedules or "
                                 "--absent-weights keep)")
        if not 0 <= self.start_round < self.rounds:
            raise ValueError(f"start_round {self.start_round} is outside the job's rounds 0..{self.rounds - 1}")
        if self.min_clients is not None and not 1 <= self.min_clients <= len(self.sites):
            raise ValueError(f"min_clients must be between 1 and the number of sites ({len(self.sites)})")

    def as_dict(self) -> dict:
        return asdict(self)

    def without_paths(self) -> dict:
        """The configuration for experiment tracking and anything else that leaves this machine."""
        return {k: v for k, v in self.as_dict().items() if k not in LOCAL_PATHS}

    def client_args(self) -> str:
        args = ["--task", self.kind, "--image-size", self.image_size, "--batch-size", self.batch_size, "--lr", self.lr,
                "--local-epochs", self.local_epochs, "--class-weights", self.class_weights, "--seed", self.seed,
                "--accelerator", self.accelerator, "--time-budget", self.time_budget]
        if self.model:
            args += ["--model", self.model]
        if self.kind == "classify":
            args += ["--classes", quote(json.dumps(self.classes))]  # NVFlare splits script args on spaces
        if self.task == "roi":
            args += ["--roi", self.roi, "--roi-threshold", self.roi_threshold]
            if self.segmenter:  # the job carries it (see build_job)
                args += ["--segmenter", JOB_SEGMENTER]
        if self.limit:
            args += ["--limit", self.limit]
        if self.deterministic:
            args += ["--deterministic"]
        if self.torch_threads:
            args += ["--torch-threads", self.torch_threads]
        if self.schedule:  # with the job's round count: a resumed job's server counts only the rounds left
            args += ["--schedule", quote(json.dumps(self.schedule)), "--rounds", self.rounds]
        for a in args:
            if " " in str(a):
                raise ValueError(f"{a!r}: NVFlare passes client arguments split on spaces; use a path without spaces")
        return " ".join(str(a) for a in args)


@contextlib.contextmanager
def built_job(cfg: FLConfig):
    """The job, built from the package root, with the files it carries staged until it is exported."""
    with tempfile.TemporaryDirectory(prefix="cxrfl-job-") as staging, from_package_root():
        yield build_job(cfg, Path(staging))


def write_simulator_site_config(workspace: Path, cfg: FLConfig) -> None:
    """The simulated sites' local configuration: the simulator copies <workspace>/local/ into
    every site, which reads <data_root>/<its name>/ (and takes turns on the lock, if any)."""
    settings = {"data_root": str(Path(cfg.data_root).absolute())}
    if cfg.turn_lock:
        settings["turn_lock"] = str(Path(cfg.turn_lock).absolute())
    write_json(Path(workspace) / SITE_CONFIG, settings)


def build_job(cfg: FLConfig, staging: Path) -> BaseFedJob:
    """staging: a folder for the files the job carries (a lung-ROI job's segmenter) until export."""
    cfg.validate()
    min_clients = cfg.min_clients or len(cfg.sites)
    job = BaseFedJob(name=cfg.job_name, min_clients=min_clients, key_metric=cfg.key_metric,
                     analytics_receiver=TBAnalyticsReceiver(tb_folder="tb_events"))
    if cfg.wandb:
        from nvflare.app_opt.tracking.wandb.wandb_receiver import WandBReceiver

        # Offline (files under the run folder) unless the user has set a W&B key; metrics only.
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        job.to_server(WandBReceiver(wandb_args={"project": cfg.wandb_project, "name": cfg.job_name,
                                                "job_type": "federated", "config": cfg.without_paths(),
                                                "settings": WANDB_PRIVATE_SETTINGS},
                                    mode=mode), id="wandb_receiver")

    # One model component shared by the persistor and the FedOpt optimizer, so the server
    # optimizer steps from the current global weights.
    model_name = cfg.model or DEFAULT_MODEL[cfg.kind]
    model_id = job.to_server(GlobalModel(task=cfg.kind, model=model_name, num_classes=len(cfg.classes), seed=cfg.seed), id="model")
    initial_model = None
    if cfg.initial_model:  # a resumed job carries its starting model; the persistor reads it from custom/
        job.add_file_to_server(cfg.initial_model)
        initial_model = Path(cfg.initial_model).name
    if cfg.he:
        persistor, generator, aggregator, exchange, transfer = _he_server_components(job, model_id, initial_model)
    elif cfg.dp:
        # NVFlare's privacy filters work on numpy weight differences, so the sites send those
        persistor = PTFileModelPersistor(model=model_id, source_ckpt_file_full_name=initial_model)
        exchange, generator, transfer = ExchangeFormat.NUMPY, FullModelShareableGenerator(), TransferType.DIFF
        aggregator = InTimeAccumulateWeightedAggregator(expected_data_kind=DataKind.WEIGHT_DIFF)
    else:
        persistor = PTFileModelPersistor(model=model_id, allow_numpy_conversion=False,  # tensors end to end
                                         source_ckpt_file_full_name=initial_model)
        exchange = ExchangeFormat.PYTORCH
        optimizer = AGGREGATIONS[cfg.aggregation]
        if optimizer is None:
            generator, data_kind, transfer = FullModelShareableGenerator(), DataKind.WEIGHTS, TransferType.FULL
        else:
            # config_type "dict": NVFlare's config loader must pass these arguments on, not build them
            generator = PTFedOptModelShareableGenerator(
                optimizer_args={"path": optimizer, "args": {"lr": cfg.server_lr}, "config_type": "dict"},
                source_model=model_id, device="cpu")
            data_kind, transfer = DataKind.WEIGHT_DIFF, TransferType.DIFF
        if optimizer is None:  # FedAvg sums the sites' weights in site order, not arrival order: reproducible
            aggregator = SiteAwareFedAvg(keep_absent=cfg.absent_weights == "keep")
        else:
            aggregator = InTimeAccumulateWeightedAggregator(expected_data_kind=data_kind)
    persistor_id = job.to_server(persistor, id="persistor")
    generator_id = job.to_server(generator, id="shareable_generator")
    aggregator_id = job.to_server(aggregator, id="aggregator")
    job.to_server(RoundRecorder(save_contributions=cfg.record_contributions), id="round_recorder")
    if not cfg.he:  # a malformed update is refused with its reason before it reaches the aggregator
        job.to_server(UpdateValidator(), id="update_validator", filter_type=FilterType.TASK_RESULT, tasks=["train"])
    # A site that dies is written off as soon as the server hears of it (NVFlare waits 60 s more by
    # default), and a task waiting only on dead sites gives up 10 s after it was sent (default 30 s).
    job.to_server({"dead_client_grace_period": 0, "dead_client_check_lead_time": 10})
    # Sites ask for their next task every 0.5 s, not NVFlare's 2 s: each round and each cross-site
    # validation starts up to 1.5 s sooner, for polling a handful of sites cannot notice.
    job.to_server({"server": {"task_request_interval": 0.5}})
    # ignore_result_error: a refused update or a crashed site never stops the other sites' round
    job.to_server(ScatterAndGather(min_clients=min_clients, num_rounds=cfg.rounds - cfg.start_round,
                                   start_round=cfg.start_round,
                                   wait_time_after_min_received=int(cfg.wait_after_min_clients),
                                   ignore_result_error=True,
                                   aggregator_id=aggregator_id,
                                   persistor_id=persistor_id, shareable_generator_id=generator_id,
                                   train_task_name="train", train_timeout=0))
    if cfg.cross_site_eval:  # never with HE (FLConfig.validate): ciphertext models cannot be broadcast
        locator_id = job.to_server(PTFileModelLocator(pt_persistor_id=persistor_id), id="locator")
        job.to_server(CrossSiteModelEval(model_locator_id=locator_id, submit_model_timeout=600,
                                         validation_timeout=6000))
    elif cfg.global_model_eval:
        locator_id = job.to_server(PTFileModelLocator(pt_persistor_id=persistor_id), id="locator")
        job.to_server(GlobalModelEval(model_locator_id=locator_id, validation_timeout=6000))

    if cfg.task == "roi" and cfg.segmenter:  # travels as a file: no site needs the exporter's path
        from cxrfl.models import export_model

        export_model(cfg.segmenter, staging / JOB_SEGMENTER)
        job.add_file_to_clients(str(staging / JOB_SEGMENTER))
    job.to_clients(ScriptRunner(script=CLIENT_SCRIPT, script_args=cfg.client_args(), framework=FrameworkType.PYTORCH,
                                server_expected_format=exchange, params_transfer_type=transfer))
    if cfg.he:
        _add_he_client_filters(job, cfg.he_encrypt_layers)
    if cfg.dp:  # applied at the site, to what leaves it
        job.to_clients(DP_FILTERS[cfg.dp](**(cfg.dp_args or {})), tasks=["train"], filter_type=FilterType.TASK_RESULT)
    return job


def _he_server_components(job: BaseFedJob, model_id: str, initial_model: str | None):
    """HE server side: add ciphertexts, persist them serialised; never plaintext weights.
    Returns (persistor, shareable generator, aggregator, exchange format, transfer type)."""
    from app_custom.he_packing import HESumAggregator, PackedHEModelPersistor, PackedHEShareableGenerator

    # sites weight their update before encrypting it; the server only adds, and keeps ciphertexts
    # as bytes except while adding (see app_custom/he_packing.py)
    return (PackedHEModelPersistor(model=model_id, source_ckpt_file_full_name=initial_model),
            PackedHEShareableGenerator(),
            HESumAggregator(), ExchangeFormat.NUMPY, TransferType.FULL)


def _add_he_client_filters(job: BaseFedJob, encrypt_layers: str | None) -> None:
    """Sites decrypt what they receive and encrypt what they send, weighted by their sample count,
    packed into few CKKS vectors (see app_custom/he_packing.py for why not NVFlare's per-tensor filters)."""
    from app_custom.he_packing import PackedHEDecryptor, PackedHEEncryptor

    job.to_clients(PackedHEDecryptor(), tasks=["train", "validate"], filter_type=FilterType.TASK_DATA)
    job.to_clients(PackedHEEncryptor(encrypt_layers=encrypt_layers), tasks=["train"],
                   filter_type=FilterType.TASK_RESULT)


def job_main(task: str, description: str, argv: list[str] | None = None) -> None:
    """The command line of a `jobs/<task>/job.py`: build the task's job, export it or simulate it."""
    import argparse

    from cxrfl.commands.fl_options import add_fl_options, config_from_args

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fl_options(parser, task=task)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--export-dir", help="write the job folder here")
    target.add_argument("--simulate", metavar="WORKSPACE", help="run the job in the NVFlare simulator")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    export_dir = Path(args.export_dir).absolute() if args.export_dir else None
    workspace = Path(args.simulate).absolute() if args.simulate else None
    with built_job(cfg) as job:
        if export_dir:
            job.export_job(str(export_dir))
        else:
            write_simulator_site_config(workspace, cfg)
            job.simulator_run(str(workspace), clients=cfg.sites, threads=len(cfg.sites))
