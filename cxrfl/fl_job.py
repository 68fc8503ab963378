"""Build the NVFlare job for one task: ScatterAndGather over the Lightning client script.

Server: PyTorch persistor (last + best global model), in-time weighted aggregator (weights =
each site's training-sample count), FedAvg or a FedOpt server optimizer, IntimeModelSelector on
the sites' validation metric, per-round recorder, TensorBoard (and optionally W&B) receivers,
then cross-site evaluation. Clients: a ScriptRunner running `app_custom/cxrfl_client.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from pathlib import Path

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
from cxrfl.fl.config import AGGREGATIONS, JOB_SEGMENTER, FLConfig
from cxrfl.options import add_config_options, fl_config
from cxrfl.runs import WANDB_PRIVATE_SETTINGS
from lightning_modules.data.manifest import write_json
from app_custom.contributions import UpdateValidator
from app_custom.global_model import GlobalModel
from app_custom.intermittent import SiteAwareFedAvg
from app_custom.round_recorder import RoundRecorder

SITE_CONFIG = Path("local") / "cxrfl_site.json"  # a site's own settings (app_custom/cxrfl_client.py)
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
    model_id = job.to_server(GlobalModel(task=cfg.task, model=cfg.network, num_classes=len(cfg.classes), seed=cfg.seed), id="model")
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

    if cfg.segmenter:  # travels as a file: no site needs the exporter's path
        from cxrfl.bundle import export_segmenter_file

        export_segmenter_file(cfg.segmenter, staging / JOB_SEGMENTER)
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
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_options(parser, FLConfig, "fl", task=task)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--export-dir", help="write the job folder here")
    target.add_argument("--simulate", metavar="WORKSPACE", help="run the job in the NVFlare simulator")
    args = parser.parse_args(argv)
    cfg = fl_config(args)
    export_dir = Path(args.export_dir).absolute() if args.export_dir else None
    workspace = Path(args.simulate).absolute() if args.simulate else None
    with built_job(cfg) as job:
        if export_dir:
            job.export_job(str(export_dir))
        else:
            write_simulator_site_config(workspace, cfg)
            job.simulator_run(str(workspace), clients=cfg.sites, threads=len(cfg.sites))
