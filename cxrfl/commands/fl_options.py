"""Options of every federated command (`sim`, `export`), turned into one FLConfig."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cxrfl.commands.options import (add_training_options, non_negative_float, positive_float, positive_int,
                                    probability, resolve_data_root)
from cxrfl.fl_job import AGGREGATIONS, TASKS, FLConfig
from lightning_modules.data.check import refuse_leakage
from lightning_modules.data.manifest import ManifestError, class_names, load_split, site_dirs
from lightning_modules.data.transforms import ROI_MODES
from lightning_modules.networks import CLASSIFIERS, SEGMENTERS


def add_fl_options(p: argparse.ArgumentParser, task: str | None = None, task_required: bool = True) -> None:
    """All federated options; `task` fixes the task (a job.py of one task) instead of asking for it."""
    p.add_argument("--task", choices=TASKS, required=task is None and task_required, default=task,
                   help="segment: lung U-Net; classify: full-image classifier; roi: classifier on the lung region")
    g = p.add_argument_group("federation")
    g.add_argument("--sites", type=positive_int, default=None,
                   help="number of sites: the first N site folders of the data root (default: all)")
    g.add_argument("--rounds", type=positive_int, default=5, help="federated rounds (default 5)")
    g.add_argument("--local-epochs", type=positive_int, default=1, help="local epochs per round (default 1)")
    g.add_argument("--min-clients", type=positive_int, default=None,
                   help="sites that must answer before a round is aggregated (default: all)")
    g.add_argument("--wait-after-min-clients", type=non_negative_float, default=0.0, metavar="SECONDS",
                   help="once --min-clients sites answered, how long a round still waits for the others (default 0); "
                   "with sites that may drop out, set --min-clients below the number of sites and this above the "
                   "spread of the sites' training times")
    g.add_argument("--time-budget", type=non_negative_float, default=0.0, metavar="SECONDS",
                   help="stop a site's local training after this many seconds in a round (0: no limit)")
    g.add_argument("--aggregation", choices=list(AGGREGATIONS), default="fedavg",
                   help="server-side aggregation: FedAvg (sample-weighted mean) or FedOpt with Adam/Yogi/Adagrad")
    g.add_argument("--server-lr", type=positive_float, default=None,
                   help="server learning rate for fedadam/fedyogi/fedadagrad (default 0.01; FedAvg ignores it)")
    g.add_argument("--no-cross-site-eval", action="store_true", help="skip the final cross-site evaluation")
    g.add_argument("--he", action="store_true",
                   help="homomorphic encryption of the weight exchange (FedAvg only; needs HE contexts: `cxrfl poc up --he`)")
    g.add_argument("--he-encrypt-layers", metavar="REGEX",
                   help="with --he: encrypt only the tensors whose name matches (default: all floating-point "
                   "tensors). The others travel and are averaged in plaintext: a privacy trade-off, see docs/he.md")
    g.add_argument("--schedule", metavar="JSON|FILE",
                   help='sites that come and go: {"site-2": "0-2", "site-3": "2-"} (inline or a JSON file) gives '
                   "the rounds each listed site takes part in; the others take part in every round. Away, a "
                   "site does not train")
    g.add_argument("--absent-weights", choices=["drop", "keep"], default="drop",
                   help="a site that is away: drop its weights (approach 1, default) or keep averaging its last "
                   "update with its sample weight (approach 2)")
    g.add_argument("--wandb-project", default="cxr-fl", help="W&B project for --wandb (default cxr-fl)")
    g.add_argument("--dp", choices=["percentile", "svt"], default=None,
                   help="differential privacy on each site's update (NVFlare privacy filters, applied at the site): "
                   "percentile: share only the largest weight changes, clipped (Shokri & Shmatikov); svt: sparse "
                   "vector technique with Laplace noise")
    g.add_argument("--dp-percentile", type=non_negative_float, default=10.0,
                   help="--dp percentile: changes smaller than this percentile are not shared (default 10)")
    g.add_argument("--dp-gamma", type=positive_float, default=None,
                   help="--dp percentile: clip changes to +-gamma (default 0.01); svt: gamma (default 1e-5)")
    g.add_argument("--dp-fraction", type=positive_float, default=0.1,
                   help="--dp svt: fraction of the model's values uploaded per round (default 0.1)")
    g.add_argument("--dp-epsilon", type=positive_float, default=0.1,
                   help="--dp svt: privacy budget of the selection per round (default 0.1)")
    g.add_argument("--dp-noise-var", type=positive_float, default=0.1,
                   help="--dp svt: release noise (default 0.1)")
    g.add_argument("--record-contributions", action="store_true",
                   help="keep every site's update of every round on the server (audit; off by default)")
    m = p.add_argument_group("model")
    m.add_argument("--model", default=None,
                   help=f"network: classify/roi {'|'.join(CLASSIFIERS)} (default densenet121), "
                   f"segment {'|'.join(SEGMENTERS)} (default unet)")
    m.add_argument("--roi-mode", choices=ROI_MODES, default="mask",
                   help="roi task: 'mask' zeroes the background, 'crop' crops to the lungs (default mask)")
    m.add_argument("--segmenter", type=Path, default=None, metavar="CKPT",
                   help="roi task: lung masks from this segmentation model (a federated run's "
                   "models/global_best.pt or a central best.ckpt); default: ground-truth masks")
    m.add_argument("--roi-threshold", type=probability, default=0.5, help="roi task: lung probability threshold")
    m.add_argument("--class-weights", choices=["none", "balanced"], default="balanced",
                   help="class-weighted cross-entropy from each site's own label counts (default balanced)")
    m.add_argument("--target-sensitivity", type=probability, default=None, metavar="S",
                   help="two-class classification: the decision threshold is the highest one whose sensitivity on "
                        "the sites' pooled validation histograms reaches S (default: Youden's J)")
    m.add_argument("--limit", type=positive_int, default=None, help="use at most this many images per site and split")
    add_training_options(p, image_size=128, batch_size=16, lr=1e-3)


def config_from_args(args) -> FLConfig:
    """Validate the options against the data root and build the FLConfig (ValueError on bad input)."""
    data_root = resolve_data_root(args.data)
    try:
        available = [p.name for p in site_dirs(data_root)]
    except ManifestError as exc:
        raise ValueError(str(exc)) from None
    n = args.sites or len(available)
    if n > len(available):
        raise ValueError(f"--sites {n}: the data root {data_root} has only {len(available)} site folders "
                         f"({', '.join(available)}); lower --sites or split the data into more sites")
    sites = available[:n]
    if not args.allow_leakage:  # a contaminated test set or split: refused before anything is written
        try:
            refuse_leakage(data_root, sites)
        except ManifestError as exc:
            raise ValueError(str(exc)) from None
    if args.min_clients and args.min_clients > n:
        raise ValueError(f"--min-clients {args.min_clients} is more than the {n} sites")
    kind = "segment" if args.task == "segment" else "classify"
    if args.target_sensitivity is not None and kind != "classify":
        raise ValueError("--target-sensitivity applies to --task classify and roi only")
    if args.segmenter and args.task != "roi":
        raise ValueError("--segmenter applies to --task roi only")
    if args.segmenter and not args.segmenter.is_file():
        raise ValueError(f"--segmenter {args.segmenter}: file not found")
    if args.segmenter:
        from lightning_modules.segmentation import LungSegmentation

        try:  # read (safely) and fitted to its network now: a wrong file stops before anything is written
            LungSegmentation.from_checkpoint(args.segmenter)
        except ValueError as exc:
            raise ValueError(f"--segmenter {exc}") from None
    classes = class_names(data_root, (r for _, r in load_split(data_root, "train", sites))) if kind == "classify" else []
    cfg = FLConfig(
        task=args.task, data_root=str(data_root.absolute()), sites=sites, rounds=args.rounds,
        local_epochs=args.local_epochs, batch_size=args.batch_size, lr=args.lr, image_size=args.image_size,
        model=args.model, classes=classes, roi=args.roi_mode, roi_threshold=args.roi_threshold,
        segmenter=str(args.segmenter.absolute()) if args.segmenter else None, min_clients=args.min_clients,
        time_budget=args.time_budget, aggregation=args.aggregation,
        server_lr=args.server_lr if args.server_lr is not None else (1.0 if args.aggregation == "fedavg" else 0.01),
        seed=args.seed, deterministic=args.deterministic, class_weights=args.class_weights,
        target_sensitivity=args.target_sensitivity, accelerator=args.accelerator, limit=args.limit,
        cross_site_eval=not (args.no_cross_site_eval or args.he), wandb=args.wandb, wandb_project=args.wandb_project,
        record_contributions=args.record_contributions, he=args.he, he_encrypt_layers=args.he_encrypt_layers,
        schedule=_schedule(args.schedule), absent_weights=args.absent_weights,
        wait_after_min_clients=args.wait_after_min_clients, dp=args.dp, dp_args=_dp_args(args),
    )
    cfg.validate()  # before any run folder is made
    return cfg


def _dp_args(args) -> dict | None:
    if args.dp == "percentile":
        if not 0 <= args.dp_percentile <= 100:
            raise ValueError("--dp-percentile must be between 0 and 100")
        return {"percentile": args.dp_percentile, "gamma": args.dp_gamma or 0.01}
    if args.dp == "svt":
        return {"fraction": args.dp_fraction, "epsilon": args.dp_epsilon, "noise_var": args.dp_noise_var,
                "gamma": args.dp_gamma or 1e-5}
    return None


def _schedule(text: str | None) -> dict[str, str] | None:
    """--schedule: inline JSON or a JSON file; {site: round ranges}."""
    if not text:
        return None
    source = Path(text)
    raw = source.read_text() if not text.lstrip().startswith("{") and source.is_file() else text
    try:
        schedule = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--schedule {text}: not JSON (nor a JSON file): {exc}") from None
    if not isinstance(schedule, dict) or not all(isinstance(v, (str, int)) for v in schedule.values()):
        raise ValueError('--schedule: expected {"site name": "round ranges like 0-2,5,7-"}')
    return {str(k): str(v) for k, v in schedule.items()}
