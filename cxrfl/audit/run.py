"""`cxrfl audit`: attack this project's own updates and models, per defence, and write the privacy-utility
table (audit.json, audit.md, reconstructions.png; `cxrfl report` shows them).

Two parts, each per defence:
- inversion: one site's update of one round, as the server sees it without HE (cxrfl/audit/updates.py),
  inverted (cxrfl/audit/inversion.py) for each model and local batch size; SSIM and NCC against the
  true images;
- utility and membership: a federated run in the simulator on the data root; test AUROC of its selected
  model, and the loss-threshold membership-inference AUC of its final global model, the sites' training
  images against their validation images (never trained on, same hospitals: the attack sees membership,
  not a shift between hospitals), within each class and averaged (the splits' class mix differs).
HE is a row without attacks: the server holds ciphertexts only (what a curious site can still do is in
docs/privacy.md).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pytorch_lightning as pl

from cxrfl.audit.figures import reconstruction_grid
from cxrfl.audit.inversion import identification_rate, invert_gradients, match_and_score
from cxrfl.audit.membership import label_stratified_auc
from cxrfl.audit.table import AUDIT_JSON, AUDIT_MD, GRID_PNG, privacy_table
from cxrfl.audit.updates import PROBE, Defence, attack_direction, probe_net, site_update
from cxrfl.fl.config import FLConfig
from cxrfl.fl.results import load_state
from cxrfl.fl.simulator import run_simulation
from cxrfl.options import site_names
from cxrfl.run_folder import RunFolder
from lightning_modules.config import ConfigError
from lightning_modules.data.atomic import atomic_write_text, write_json
from lightning_modules.data.datamodule import CXRDataModule
from lightning_modules.factory import build_module
from lightning_modules.privacy import PrivacyPlan, plan_privacy

SHOWN_PER_ROW = 4  # reconstructions shown per (model, batch, defence) in the grid
# DenseNet121's batch-32 inversion costs ~2 s an iteration on 2 CPU cores (measured): left out by default
LARGEST_BATCH = {"densenet121": 8}


@dataclass(frozen=True)
class AuditSettings:
    """What the audit attacks and trains. Epsilons: DP-SGD targets of the federated plan (rounds x local
    epochs x the site's sample rate at `batch_size`); noise_multipliers: extra DP-SGD rows of the inversion
    with the epsilon such noise spends over the same plan."""

    data_root: str
    models: tuple[str, ...] = (PROBE, "cnn5", "densenet121")
    # attacked under every defence; the others only undefended (where the attack already finds nothing
    # within the iterations, a defence has nothing left to hide)
    defended_models: tuple[str, ...] = (PROBE,)
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    image_size: int = 64
    iterations: int = 600  # the positive control at 64 px needs them (SSIM 0.44 at 600 vs 0.20 at 300, measured)
    # the models attacked undefended only: 1000 iterations found no more than 300 (SSIM 0.02-0.05, measured)
    undefended_iterations: int = 300
    epsilons: tuple[float, ...] = (1.0, 8.0, 64.0)
    noise_multipliers: tuple[float, ...] = (0.01, 0.1)
    more_local_epochs: int = 5
    utility: bool = True
    utility_model: str = "cnn5"
    rounds: int = 5
    local_epochs: int = 1
    batch_size: int = 16
    delta: float = 1e-5
    seed: int = 0

    def __post_init__(self):
        for name in ("models", "defended_models", "batch_sizes", "epsilons", "noise_multipliers"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.models or not self.batch_sizes:
            raise ConfigError("the audit needs at least one model and one batch size")
        if any(b < 1 for b in self.batch_sizes) or min(self.iterations, self.undefended_iterations) < 1 \
                or self.more_local_epochs < 2:
            raise ConfigError("batch sizes and --iterations must be >= 1, --more-local-epochs >= 2")
        for value in (*self.epsilons, *self.noise_multipliers):
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"epsilons and noise multipliers must be finite numbers > 0, got {value}")


def _plan(settings: AuditSettings, n: int, **noise) -> PrivacyPlan:
    return plan_privacy(n, settings.batch_size, settings.local_epochs, settings.rounds, settings.delta, **noise)


def defences(settings: AuditSettings, site_train: int) -> list[Defence]:
    """The inversion's rows: FedAvg, more local epochs, the percentile filter, DP-SGD at each extra noise
    multiplier and at each target epsilon (sigma calibrated for a site of `site_train` training images)."""
    rows = [Defence("FedAvg"), Defence(f"FedAvg, {settings.more_local_epochs} local epochs",
                                       local_epochs=settings.more_local_epochs),
            Defence("percentile filter", percentile=True)]
    for sigma in settings.noise_multipliers:
        rows.append(Defence(f"DP-SGD sigma {sigma:g}", noise_multiplier=sigma,
                            epsilon=_plan(settings, site_train, noise_multiplier=sigma).epsilon()))
    for eps in settings.epsilons:
        plan = _plan(settings, site_train, target_epsilon=eps)
        rows.append(Defence(f"DP-SGD eps {eps:g}", noise_multiplier=plan.noise_multiplier, epsilon=plan.epsilon()))
    return rows


LINE_UP = 31  # other patients in the identification line-up (1 in 32 by chance)


def _batches(data_root: str, site: str, image_size: int, size: int):
    """The first `size` training images of `site` as the model sees them (no augmentation), their labels, and
    the next LINE_UP images: other patients of the hospital, the baseline a reconstruction must beat (their
    first `size` scored as if they were reconstructions) and the identification line-up."""
    dm = CXRDataModule(data_root, sites=[site], image_size=image_size, batch_size=size + LINE_UP)
    dm.setup("fit")
    if dm.num_train_samples < 2 * size:
        raise ConfigError(f"{data_root}/{site}: {dm.num_train_samples} training images, the audit needs at least "
                          f"{2 * size} for batch size {size}")
    batch = next(iter(dm.evaluation_loader("train")))  # a smaller site gets a shorter line-up
    return batch["image"][:size], batch["label"][:size].long(), batch["image"][size:size + LINE_UP]


def _module(model: str, classes: list[str], image_size: int, dp_compatible: bool):
    if model == PROBE:  # the project's classifier module (loss, AdamW) around the positive-control network
        module = build_module("classify", "cnn5", lr=1e-3, classes=classes)
        module.net = probe_net(image_size, len(classes))
        return module
    return build_module("classify", model, lr=1e-3, classes=classes, dp_compatible=dp_compatible)


def run_inversion(settings: AuditSettings, site: str, classes: list[str], rows: list[Defence], progress=print):
    """Each model x batch size x defence: the site's update, its inversion and the scores."""
    results, grid = [], []
    for model in settings.models:
        for size in [b for b in settings.batch_sizes if b <= LARGEST_BATCH.get(model, b)]:
            images, labels, others = _batches(settings.data_root, site, settings.image_size, size)
            baseline = match_and_score(others[:size], images)  # other patients, best matched: not a reconstruction
            for defence in rows if model in settings.defended_models else rows[:1]:
                pl.seed_everything(settings.seed, verbose=False)  # the same global model for every defence
                module = _module(model, classes, settings.image_size, defence.dp_sgd)
                received = copy.deepcopy(module).train()  # the global model the server sent (and attacks with)
                start = time.monotonic()
                target = attack_direction(received, site_update(module, images, labels, defence))
                iterations = settings.iterations if model in settings.defended_models else settings.undefended_iterations
                recon = invert_gradients(received, target, labels, images.shape[1:], iterations=iterations,
                                         seed=settings.seed, objective="sign")  # the sites' AdamW: signs
                scores = match_and_score(recon, images)
                identified = identification_rate(recon[scores["order"]], images, others)
                results.append({"identified": identified, "model": model, "batch_size": size, "defence": defence.name,
                                "epsilon": defence.epsilon, "noise_multiplier": defence.noise_multiplier,
                                "ssim": scores["ssim_mean"], "ncc": scores["ncc_mean"],
                                "other_patients_ssim": baseline["ssim_mean"], "other_patients_ncc": baseline["ncc_mean"],
                                "seconds": round(time.monotonic() - start, 1)})
                progress(f"inversion {model} batch {size} {defence.name}: SSIM {scores['ssim_mean']:.3f} "
                         f"NCC {scores['ncc_mean']:.3f}, identified {identified:.0%} ({results[-1]['seconds']} s)")
                if size == 1 or (size <= 8 and defence is rows[0]):  # the grid: batch 1, and undefended batches
                    order = scores["order"][:SHOWN_PER_ROW]
                    grid.append((f"{model}, batch {size}, {defence.name}", images[:len(order)],
                                 recon[order], scores["ssim"][:len(order)]))
    return results, grid


def _utility_configs(settings: AuditSettings, sites: list[str], classes: list[str]) -> dict[str, FLConfig]:
    base = FLConfig(task="classify", model=settings.utility_model, data_root=settings.data_root, sites=tuple(sites),
                    classes=tuple(classes),
                    image_size=settings.image_size, rounds=settings.rounds, epochs=settings.local_epochs,
                    batch_size=settings.batch_size, seed=settings.seed, cross_site_eval=False, global_model_eval=True)
    configs = {"FedAvg": base,
               f"FedAvg, {settings.more_local_epochs} local epochs": replace(base, epochs=settings.more_local_epochs),
               "percentile filter": replace(base, dp="percentile")}
    for eps in settings.epsilons:
        configs[f"DP-SGD eps {eps:g}"] = replace(base, dp="dpsgd", dp_target_epsilon=eps, dp_delta=settings.delta)
    return configs


def _membership(cfg: FLConfig, run: Path) -> float:
    dm = CXRDataModule(cfg.data_root, sites=list(cfg.sites), image_size=cfg.image_size, batch_size=64)
    dm.setup("fit")
    module = build_module("classify", cfg.model, lr=cfg.lr, classes=dm.classes, dp_compatible=cfg.dp_sgd)
    module.load_state_dict(load_state(run / "models" / "global_final.pt"))
    pairs = lambda split: ((b["image"], b["label"].long()) for b in dm.evaluation_loader(split))  # noqa: E731
    return label_stratified_auc(module.eval(), pairs("train"), pairs("val"))


def run_utility(settings: AuditSettings, sites: list[str], classes: list[str], out: Path, progress=print) -> list[dict]:
    """Each defence as a federated run: test AUROC, membership-inference AUC, epsilon per site."""
    results = []
    for name, cfg in _utility_configs(settings, sites, classes).items():
        run = out / "runs" / name.replace(" ", "-").replace(",", "")
        summary = run_simulation(cfg, run)
        privacy = summary.get("privacy") or {}
        epsilon = max(privacy["epsilon"].values()) if isinstance(privacy.get("epsilon"), dict) else None
        results.append({"defence": name, "epsilon": epsilon, "test_auroc": summary["test"].get("test_auroc"),
                        "membership_auc": _membership(cfg, run), "run": str(run.relative_to(out)),
                        "wall_seconds": summary.get("wall_seconds")})
        progress(f"utility {name}: test AUROC {results[-1]['test_auroc']}, membership AUC "
                 f"{results[-1]['membership_auc']:.3f}, epsilon {epsilon}")
    return results


def run_audit(settings: AuditSettings, out: Path, progress=print) -> dict:
    """The whole audit into the folder `out`; returns audit.json's content."""
    out = Path(out).absolute()
    sites = site_names(Path(settings.data_root), None)
    probe = CXRDataModule(settings.data_root, sites=[sites[0]], image_size=settings.image_size)
    probe.setup("fit")
    rows = defences(settings, probe.num_train_samples)  # a plan that cannot work is refused before anything runs
    RunFolder.create(out, "audit", settings={**asdict(settings), "sites": sites})
    start = time.monotonic()
    inversion, grid = run_inversion(settings, sites[0], probe.classes, rows, progress)
    if grid:
        reconstruction_grid(grid, out / GRID_PNG)
    utility = run_utility(settings, sites, probe.classes, out, progress) if settings.utility else []
    audit = {"settings": {**asdict(settings), "sites": sites, "attacked_site": sites[0]},
             "inversion": inversion, "utility": utility, "wall_seconds": round(time.monotonic() - start, 1)}
    write_json(out / AUDIT_JSON, audit)
    atomic_write_text(out / AUDIT_MD, privacy_table(audit))
    return audit
