"""Build the NVFlare job for one task: ScatterAndGather over the Lightning client script.

Server: PyTorch persistor (last + best global model), in-time weighted aggregator (weights =
each site's training-sample count), FedAvg or a FedOpt server optimizer, IntimeModelSelector on
the sites' validation metric (with --patience, early stopping on it too), per-round recorder,
TensorBoard (and optionally W&B) receivers, then cross-site evaluation. Clients: NVFlare's Client
API executor running `app_custom/cxrfl_client.py`
(the simulator's sites: `app_custom/simulated_site.py`) with the site settings as data, `custom/cxrfl_train.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from modulefinder import ModuleFinder
from pathlib import Path
from typing import Callable

from nvflare.apis.dxo import DataKind
from nvflare.app_common.aggregators import InTimeAccumulateWeightedAggregator
from nvflare.app_common.app_constant import AlgorithmConstants
from nvflare.app_common.executors.client_api_executor import ClientAPIExecutor, ExecutionMode
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

import app_custom
from cxrfl.bundle import export_segmenter_file
from cxrfl.fl import settings
from cxrfl.fl.config import AGGREGATIONS, JOB_SEGMENTER, FLConfig
from cxrfl.options import add_config_options, fl_config
from cxrfl.runs import WANDB_PRIVATE_SETTINGS
from lightning_modules.config import TRAIN_CONFIG_FILE, UPDATE_FILTERS, ConfigError
from lightning_modules.data.atomic import write_json
from lightning_modules.networks import normalisation_state_keys
from app_custom.algorithms import KeepAtSite, ScaffoldControls, ScaffoldFedAvg, TrainTaskMeta
from app_custom.contributions import UpdateValidator
from app_custom.early_stopping import EarlyStopping
from app_custom.global_model import GlobalModel
from app_custom.he_packing import (HESumAggregator, PackedHEDecryptor, PackedHEEncryptor, PackedHEModelPersistor,
                                   PackedHEShareableGenerator)
from app_custom.intermittent import SiteAwareFedAvg
from app_custom.round_recorder import RoundRecorder
from app_custom.site_files import SIMULATION_CONFIG, SITE_CONFIG

DP_FILTERS = {"percentile": PercentilePrivacy, "svt": SVTPrivacy}  # NVFlare's, on weight differences

# The site scripts, by their path inside the package root: the job carries them (and the package's
# modules they import) at the same path under custom/, where every site finds them on any machine.
PACKAGE_ROOT = Path(app_custom.__file__).resolve().parent.parent
CLIENT_SCRIPT = "app_custom/cxrfl_client.py"
SIMULATED_SITE_SCRIPT = "app_custom/simulated_site.py"  # the simulator's sites: the client + simulation hooks
CONTROLLER_ID = "scatter_and_gather"  # the training workflow, by the id early stopping finds it


@contextlib.contextmanager
def built_job(cfg: FLConfig, simulated: bool = False, extend: Callable[[BaseFedJob], None] | None = None):
    """The job, with the files it carries staged until it is exported. simulated: the simulator's job
    (see build_job); extend: adds more components to the job (a test's fault drill)."""
    with tempfile.TemporaryDirectory(prefix="cxrfl-job-") as staging:
        job = build_job(cfg, Path(staging), simulated=simulated)
        if extend is not None:
            extend(job)
        yield job


def write_simulator_site_config(workspace: Path, cfg: FLConfig, turn_lock: Path | None = None,
                                torch_threads: int = 0) -> None:
    """The simulated sites' local settings, as data: the simulator copies <workspace>/local/ into every
    site, which reads <data_root>/<its name>/ and its torch threads (0: torch's default) from SITE_CONFIG,
    as a production site does, and, in app_custom/simulated_site.py, the turn lock and the availability
    schedule (SIMULATION_CONFIG)."""
    site_config = {"data_root": str(Path(cfg.data_root).absolute())}
    if torch_threads:
        site_config["torch_threads"] = torch_threads
    write_json(Path(workspace) / SITE_CONFIG, site_config)
    write_json(Path(workspace) / SIMULATION_CONFIG, {
        "turn_lock": str(Path(turn_lock).absolute()) if turn_lock else None,
        "schedule": cfg.schedule, "rounds": cfg.rounds})


def build_job(cfg: FLConfig, staging: Path, simulated: bool = False) -> BaseFedJob:
    """staging: a folder for the files the job carries (site settings, a lung-ROI job's segmenter) until
    export. simulated: the simulator's job, whose sites run SIMULATED_SITE_SCRIPT (turn taking, thread
    counts, away rounds); any other job is a production job, which never contains it."""
    if cfg.schedule and not simulated:
        raise ConfigError("--schedule simulates sites that come and go: it applies to simulator runs only")
    min_clients = cfg.min_clients or len(cfg.sites)
    job = BaseFedJob(name=cfg.job_name, min_clients=min_clients, key_metric=cfg.key_metric,
                     analytics_receiver=TBAnalyticsReceiver(tb_folder="tb_events"))
    if cfg.wandb:
        # lazy: it imports wandb, +0.3 s on every sim/poc/demo/export start (measured); only --wandb needs it
        from nvflare.app_opt.tracking.wandb.wandb_receiver import WandBReceiver

        # Offline (files under the run folder) unless the user has set a W&B key; metrics only.
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        job.to_server(WandBReceiver(wandb_args={"project": cfg.wandb_project, "name": cfg.job_name,
                                                "job_type": "federated", "config": cfg.without_paths(),
                                                "settings": WANDB_PRIVATE_SETTINGS},
                                    mode=mode), id="wandb_receiver")
    # One model component shared by the persistor and the FedOpt optimizer, so the server
    # optimizer steps from the current global weights.
    model_id = job.to_server(GlobalModel(task=cfg.task, model=cfg.network, num_classes=len(cfg.classes), seed=cfg.seed,
                                            dp_compatible=cfg.dp_sgd), id="model")
    initial_model = None
    if cfg.initial_model:  # a resumed job carries its starting model; the persistor reads it from custom/
        job.add_file_to_server(cfg.initial_model)
        initial_model = Path(cfg.initial_model).name
    persistor, generator, aggregator, exchange, transfer = _aggregation_components(cfg, model_id, initial_model)
    site_keys = site_kept_keys(cfg)  # FedBN: checked by the server, dropped by the sites
    persistor_id = job.to_server(persistor, id="persistor")
    generator_id = job.to_server(generator, id="shareable_generator")
    aggregator_id = job.to_server(aggregator, id="aggregator")
    job.to_server(RoundRecorder(save_contributions=cfg.record_contributions), id="round_recorder")
    if cfg.quantize:  # float32 again before anything checks or sums the update (lazy: bitsandbytes loads slowly)
        from app_custom.quantization import UpdateDequantizer

        job.to_server(UpdateDequantizer(), id="update_dequantizer", filter_type=FilterType.TASK_RESULT, tasks=["train"])
    if not cfg.he:  # a malformed update is refused with its reason before it reaches the aggregator
        job.to_server(UpdateValidator(site_keys=site_keys), id="update_validator",
                      filter_type=FilterType.TASK_RESULT, tasks=["train"])
    if cfg.algorithm == "fedprox":  # the sites' patched trainer adds the proximal term when it reads mu
        job.to_server(TrainTaskMeta({AlgorithmConstants.FEDPROX_MU: cfg.proximal_weight}), id="fedprox_mu",
                      filter_type=FilterType.TASK_DATA, tasks=["train"])
    job.to_server(settings.server_params())  # named, with their reasons, in cxrfl/fl/settings.py
    # ignore_result_error: a refused update or a crashed site never stops the other sites' round
    job.to_server(ScatterAndGather(min_clients=min_clients, num_rounds=cfg.rounds - cfg.start_round,
                                   start_round=cfg.start_round,
                                   wait_time_after_min_received=int(cfg.wait_after_min_clients),
                                   ignore_result_error=True, aggregator_id=aggregator_id,
                                   persistor_id=persistor_id, shareable_generator_id=generator_id,
                                   train_task_name="train", train_timeout=0), id=CONTROLLER_ID)
    if cfg.patience:  # follows the model selector's best rounds (BaseFedJob adds it for the key metric)
        job.to_server(EarlyStopping(patience=cfg.patience, controller_id=CONTROLLER_ID, key_metric=cfg.key_metric),
                      id="early_stopping")
    _add_evaluation(job, cfg, persistor_id)
    _add_site_side(job, cfg, staging, SIMULATED_SITE_SCRIPT if simulated else CLIENT_SCRIPT, exchange, transfer,
                   site_keys)
    return job


def _aggregation_components(cfg: FLConfig, model_id: str, initial_model: str | None):
    """(persistor, shareable generator, aggregator, exchange format, transfer type) for HE, DP or plain
    FedAvg/FedOpt."""
    if cfg.he:
        return _he_server_components(model_id, initial_model)
    persistor = PTFileModelPersistor(model=model_id, allow_numpy_conversion=False,  # tensors end to end
                                     source_ckpt_file_full_name=initial_model)
    if cfg.algorithm == "scaffold":  # FedAvg of weights and of control changes; the controls live in the generator
        return persistor, ScaffoldControls(), ScaffoldFedAvg(), ExchangeFormat.PYTORCH, TransferType.FULL
    if cfg.algorithm == "fedbn":  # differences of the shared tensors: the server's normalisation tensors stay as they are
        return (persistor, FullModelShareableGenerator(),
                InTimeAccumulateWeightedAggregator(expected_data_kind=DataKind.WEIGHT_DIFF),
                ExchangeFormat.PYTORCH, TransferType.DIFF)
    if cfg.quantize and AGGREGATIONS[cfg.aggregation] is None:
        # a quantizing site sends differences: the 8-bit error is then a fraction of a round's change, not of the weights
        return (persistor, FullModelShareableGenerator(),
                InTimeAccumulateWeightedAggregator(expected_data_kind=DataKind.WEIGHT_DIFF),
                ExchangeFormat.PYTORCH, TransferType.DIFF)
    if cfg.dp in UPDATE_FILTERS:  # NVFlare's privacy filters work on numpy weight differences, so the sites send those
        return (PTFileModelPersistor(model=model_id, source_ckpt_file_full_name=initial_model),
                FullModelShareableGenerator(),
                InTimeAccumulateWeightedAggregator(expected_data_kind=DataKind.WEIGHT_DIFF),
                ExchangeFormat.NUMPY, TransferType.DIFF)
    optimizer = AGGREGATIONS[cfg.aggregation]
    if optimizer is None:  # FedAvg sums the sites' weights in site order, not arrival order: reproducible
        return (persistor, FullModelShareableGenerator(), SiteAwareFedAvg(keep_absent=cfg.absent_weights == "keep"),
                ExchangeFormat.PYTORCH, TransferType.FULL)
    # config_type "dict": NVFlare's config loader must pass these arguments on, not build them
    generator = PTFedOptModelShareableGenerator(
        optimizer_args={"path": optimizer, "args": {"lr": cfg.server_lr}, "config_type": "dict"},
        source_model=model_id, device="cpu")
    return (persistor, generator, InTimeAccumulateWeightedAggregator(expected_data_kind=DataKind.WEIGHT_DIFF),
            ExchangeFormat.PYTORCH, TransferType.DIFF)


def _add_evaluation(job: BaseFedJob, cfg: FLConfig, persistor_id: str) -> None:
    """Cross-site evaluation, or without it each site's validation of the global models. Never with HE
    (FLConfig refuses it): ciphertext models cannot be broadcast."""
    if not (cfg.cross_site_eval or cfg.global_model_eval):
        return
    locator_id = job.to_server(PTFileModelLocator(pt_persistor_id=persistor_id), id="locator")
    if cfg.cross_site_eval:
        job.to_server(CrossSiteModelEval(model_locator_id=locator_id,
                                         submit_model_timeout=settings.SUBMIT_MODEL_TIMEOUT,
                                         validation_timeout=settings.VALIDATION_TIMEOUT))
    else:
        job.to_server(GlobalModelEval(model_locator_id=locator_id, validation_timeout=settings.VALIDATION_TIMEOUT))


def _add_site_side(job: BaseFedJob, cfg: FLConfig, staging: Path, script: str, exchange, transfer,
                   site_keys: list[str]) -> None:
    """What every site gets: its training settings as data (custom/cxrfl_train.json), a lung-ROI job's
    segmenter, the site script with the package modules it imports, and the filters on what it sends."""
    # What NVFlare's ScriptRunner builds (in process), with the script's path inside custom/: ScriptRunner
    # itself would add the script by a path relative to the working directory, the one the sites run.
    # First: BaseFedJob sets the sites up (metrics to the server) on the first object, not on a file.
    job.to_clients(ClientAPIExecutor(execution_mode=ExecutionMode.IN_PROCESS, task_script_path=script,
                                     params_exchange_format=ExchangeFormat.PYTORCH, server_expected_format=exchange,
                                     params_transfer_type=transfer, memory_gc_rounds=1, cuda_empty_cache=True),
                   tasks=["*"])
    cfg.site_config().write_json(staging / TRAIN_CONFIG_FILE)
    job.add_file_to_clients(str(staging / TRAIN_CONFIG_FILE))
    if cfg.segmenter:  # travels as a file: no site needs the exporter's path
        export_segmenter_file(cfg.segmenter, staging / JOB_SEGMENTER)
        job.add_file_to_clients(str(staging / JOB_SEGMENTER))
    _add_package_files(job, script)
    if cfg.algorithm == "fedbn":  # before encryption: the normalisation tensors never leave the site
        job.to_clients(KeepAtSite(site_keys), tasks=["train"], filter_type=FilterType.TASK_RESULT)
    if cfg.he:
        _add_he_client_filters(job, cfg.he_encrypt_layers)
    if cfg.dp in UPDATE_FILTERS:  # applied at the site, to what leaves it
        job.to_clients(DP_FILTERS[cfg.dp](**(cfg.dp_args or {})), tasks=["train"], filter_type=FilterType.TASK_RESULT)
    if cfg.quantize:  # the last filter: it compresses what actually leaves the site
        from app_custom.quantization import UpdateQuantizer

        job.to_clients(UpdateQuantizer(cfg.quantize), tasks=["train"], filter_type=FilterType.TASK_RESULT)


def site_kept_keys(cfg: FLConfig) -> list[str]:
    """The model's tensors that stay at the sites: FedBN's normalisation layers; none otherwise."""
    if cfg.algorithm != "fedbn":
        return []
    return normalisation_state_keys(GlobalModel(task=cfg.task, model=cfg.network, num_classes=len(cfg.classes),
                                                dp_compatible=cfg.dp_sgd))


def _add_package_files(job: BaseFedJob, script: str) -> None:
    """The site script and every module of this package it imports, each by its explicit path, to the
    same place under the job's custom/ folder. Own code because NVFlare finds a script's imports only
    from the working directory or sys.path; the standard library's ModuleFinder, confined to the
    package root, lists them without importing or scanning any third-party package."""
    finder = ModuleFinder(path=[str(PACKAGE_ROOT)])
    finder.run_script(str(PACKAGE_ROOT / script))
    files = {Path(m.__file__) for m in finder.modules.values() if m.__file__}
    for file in sorted(f for f in files if f.is_relative_to(PACKAGE_ROOT)):
        job.add_file_to_clients(str(file), dest_dir=str(file.parent.relative_to(PACKAGE_ROOT)))


def _he_server_components(model_id: str, initial_model: str | None):
    """HE server side: add ciphertexts, persist them serialised; never plaintext weights.
    Returns (persistor, shareable generator, aggregator, exchange format, transfer type)."""
    # sites weight their update before encrypting it; the server only adds, and keeps ciphertexts
    # as bytes except while adding (see app_custom/he_packing.py)
    return (PackedHEModelPersistor(model=model_id, source_ckpt_file_full_name=initial_model),
            PackedHEShareableGenerator(),
            HESumAggregator(), ExchangeFormat.NUMPY, TransferType.FULL)


def _add_he_client_filters(job: BaseFedJob, encrypt_layers: str | None) -> None:
    """Sites decrypt what they receive and encrypt what they send, weighted by their sample count,
    packed into few CKKS vectors (see app_custom/he_packing.py for why not NVFlare's per-tensor filters)."""
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
    with built_job(cfg, simulated=workspace is not None) as job:
        if export_dir:
            job.export_job(str(export_dir))
        else:
            write_simulator_site_config(workspace, cfg)
            job.simulator_run(str(workspace), clients=cfg.sites, threads=len(cfg.sites))
