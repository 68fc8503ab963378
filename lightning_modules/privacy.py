"""DP-SGD (Abadi et al. 2016) for the Lightning modules, with Opacus: every training step clips each
sample's gradient to norm C and adds Gaussian noise of std sigma*C to their sum; batches are Poisson
samples; Opacus's RDP accountant turns the steps into (epsilon, delta).

`DPSGD` is a Lightning callback, so a plain `Trainer` runs the modules unchanged, centrally and under
NVFlare's `flare.patch`: the caller adds the callback and fits on `dp.datamodule(dm)` (Poisson batches).
The network must be built `dp_compatible` (lightning_modules/networks.py: normalisation layers without batch statistics, the same at
every site and on the server). The noise and the batches come from the OS's random source, never from
the run's seed: a seed the server knows would let it subtract the noise.
"""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import GradSampleModule
from opacus.lightning import DPLightningDataModule
from opacus.optimizers import DPOptimizer

from lightning_modules.config import ConfigError, TrainConfig

log = logging.getLogger(__name__)

ACCOUNTANT = "rdp"  # Opacus's Renyi-DP accountant: the standard, conservative bound for the sampled Gaussian
EPSILON_SLACK = 1e-6  # float noise when comparing a planned epsilon with its target


class PrivacyBudgetError(ConfigError):
    """Training would spend more privacy than the configured target epsilon; the message says how much."""


@dataclass(frozen=True)
class PrivacyPlan:
    """The DP-SGD steps one data holder will take: Poisson batches with rate `sample_rate`, `steps_per_epoch`
    of them per epoch (Opacus's 1/rate), `epochs` per round for `rounds` rounds, noise multiplier sigma."""

    num_samples: int
    sample_rate: float
    steps_per_epoch: int
    epochs: int
    rounds: int
    noise_multiplier: float
    delta: float
    target_epsilon: float | None = None

    @property
    def steps_per_round(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def total_steps(self) -> int:
        return self.steps_per_round * self.rounds

    def epsilon(self, steps: int | None = None) -> float:
        """Epsilon after `steps` steps (default: the whole plan), by the same accountant training uses."""
        return epsilon_spent([(self.noise_multiplier, self.sample_rate, self.total_steps if steps is None else steps)],
                             self.delta)

    def as_dict(self) -> dict:
        return {"mechanism": "dpsgd", "accountant": ACCOUNTANT, "num_samples": self.num_samples,
                "sample_rate": self.sample_rate, "steps_per_round": self.steps_per_round, "rounds": self.rounds,
                "noise_multiplier": self.noise_multiplier, "delta": self.delta,
                "target_epsilon": self.target_epsilon, "planned_epsilon": self.epsilon()}


def epsilon_spent(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of a history of (noise multiplier, sample rate, steps) under the RDP accountant."""
    steps = [h for h in history if h[2] > 0]
    if not steps:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = list(steps)
    return float(accountant.get_epsilon(delta=delta))


def plan_privacy(num_samples: int, batch_size: int, epochs: int, rounds: int, delta: float,
                 noise_multiplier: float | None = None, target_epsilon: float | None = None,
                 who: str = "this site") -> PrivacyPlan:
    """The plan for `num_samples` training images. Without a noise multiplier, sigma is the smallest that
    keeps the whole plan within `target_epsilon`; with both, a plan that would exceed the target is refused
    (PrivacyBudgetError) before anything trains."""
    if num_samples < 1:
        raise ConfigError(f"{who}: no training images to plan DP-SGD for")
    if not 0 < delta < 1 / num_samples:
        raise ConfigError(f"{who}: --delta {delta:g} must be below 1/n = 1/{num_samples} (a delta of 1/n or more "
                         "allows releasing one patient's record outright)")
    sample_rate = min(1.0, batch_size / num_samples)
    steps_per_epoch = int(1 / sample_rate)  # what Opacus's Poisson sampler takes per epoch
    if noise_multiplier is None:
        if target_epsilon is None:
            raise ConfigError(f"{who}: DP-SGD needs --target-epsilon or --noise-multiplier")
        noise_multiplier = float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                                      sample_rate=sample_rate, steps=steps_per_epoch * epochs * rounds,
                                                      accountant=ACCOUNTANT))
    plan = PrivacyPlan(num_samples, sample_rate, steps_per_epoch, epochs, rounds, noise_multiplier, delta, target_epsilon)
    if target_epsilon is not None and plan.epsilon() > target_epsilon + EPSILON_SLACK:
        raise PrivacyBudgetError(
            f"{who}: the plan ({rounds} round(s) x {epochs} epoch(s) x {steps_per_epoch} steps, sample rate "
            f"{sample_rate:.3g}, noise multiplier {noise_multiplier:g}) would spend epsilon = {plan.epsilon():.3g} "
            f"at delta = {delta:g}, above --target-epsilon {target_epsilon:g}: raise the noise multiplier or leave it "
            "out (it is then calibrated to the target), or plan fewer rounds or epochs")
    return plan


def plan_for(cfg: TrainConfig, num_samples: int, who: str) -> PrivacyPlan:
    """A run's DP-SGD plan for one data holder of `num_samples` training images: its rounds (1 centrally) x
    local epochs at its batch size, with the run's delta, noise multiplier and target."""
    return plan_privacy(num_samples, cfg.batch_size, cfg.epochs, cfg.rounds, cfg.dp_delta, cfg.dp_noise_multiplier,
                        cfg.dp_target_epsilon, who=who)


def _secret_generator() -> torch.Generator:
    return torch.Generator().manual_seed(secrets.randbits(63))


class DPSGD(pl.Callback):
    """Trains the module's `net` with DP-SGD for the steps of `plan`, and accounts every step taken.

    One callback serves a whole federated job: its accountant keeps every round's steps. Before each
    fit it refuses (PrivacyBudgetError) a fit whose planned steps would take the spent epsilon above the
    target. `epsilon` is what was spent so far."""

    def __init__(self, plan: PrivacyPlan, max_grad_norm: float):
        if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
            raise ValueError(f"--max-grad-norm must be a finite number > 0, got {max_grad_norm}")
        self.plan, self.max_grad_norm = plan, max_grad_norm
        self.accountant = RDPAccountant()
        self._hooks: GradSampleModule | None = None

    @property
    def steps_taken(self) -> int:
        return sum(h[2] for h in self.accountant.history)

    @property
    def epsilon(self) -> float:
        return epsilon_spent(self.accountant.history, self.plan.delta)

    def account_earlier_rounds(self, rounds: int) -> None:
        """A site that starts at round `rounds` > 0 (a resumed job): count those rounds as trained, in full."""
        if rounds > 0 and not self.accountant.history:
            self.accountant.history.append((self.plan.noise_multiplier, self.plan.sample_rate,
                                            rounds * self.plan.steps_per_round))

    def datamodule(self, dm: pl.LightningDataModule) -> pl.LightningDataModule:
        """`dm` with Poisson-sampled training batches at the plan's rate (validation and test unchanged)."""
        return _PoissonBatches(dm, self.plan.sample_rate)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        planned = self.plan.steps_per_round  # one fit is one round (a federated site) or the whole run (central)
        after = epsilon_spent([*self.accountant.history, (self.plan.noise_multiplier, self.plan.sample_rate, planned)],
                              self.plan.delta)
        target = self.plan.target_epsilon
        if target is not None and after > target + EPSILON_SLACK:
            raise PrivacyBudgetError(f"training {planned} more DP-SGD steps would spend epsilon = {after:.3g} "
                                     f"(spent so far {self.epsilon:.3g}), above the target {target:g}")
        if len(trainer.strategy.optimizers) != 1:
            raise ValueError("DP-SGD needs a module with exactly one optimizer")
        # Opacus's hooks on the network's own layers: the module and its state_dict keys stay as they are
        self._hooks = GradSampleModule(pl_module.net, loss_reduction="mean")
        optimizer = DPOptimizer(trainer.strategy.optimizers[0], noise_multiplier=self.plan.noise_multiplier,
                                max_grad_norm=self.max_grad_norm, loss_reduction="mean",
                                expected_batch_size=max(1, round(self.plan.sample_rate * self.plan.num_samples)),
                                generator=_secret_generator())
        optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.plan.sample_rate))
        trainer.strategy.optimizers = [optimizer]

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.log("dp_epsilon", self.epsilon, on_epoch=True)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release(pl_module)  # a failed or interrupted fit leaves no hook behind either

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release(pl_module)
        log.info("DP-SGD: %d steps so far, epsilon = %.3f at delta = %g", self.steps_taken, self.epsilon,
                 self.plan.delta)

    def _release(self, pl_module: pl.LightningModule) -> None:
        if self._hooks is not None:  # validation and evaluation run without per-sample gradients
            self._hooks.to_standard_module()
            self._hooks = None
        for p in pl_module.net.parameters():  # the DP optimizer's per-step sum, kept on each parameter
            if hasattr(p, "summed_grad"):
                del p.summed_grad


class _PoissonBatches(DPLightningDataModule):
    """Opacus's Lightning wrapper, at the plan's sample rate (its own takes 1/len(loader), which depends on
    drop_last) and with a secret sampling generator."""

    def __init__(self, datamodule: pl.LightningDataModule, sample_rate: float):
        super().__init__(datamodule)
        self.sample_rate = sample_rate

    def train_dataloader(self):
        loader = self.datamodule.train_dataloader()
        poisson = DPDataLoader(loader.dataset, sample_rate=self.sample_rate, collate_fn=loader.collate_fn,
                               generator=_secret_generator())
        poisson.collate_fn = TensorFields(loader.collate_fn, loader.dataset)  # replaces Opacus's empty-batch collate
        return poisson


class TensorFields:
    """A Poisson-sampled training batch: the collate function's tensor fields only and, when the draw is empty
    (Poisson sampling can draw no image), those fields with no rows: a noise-only step. Opacus's own
    empty batch refuses any non-tensor field (the image paths) and cannot be made from dict samples when
    the first draw is the empty one."""

    def __init__(self, collate, dataset):
        self.collate, self.dataset, self.empty = collate, dataset, None

    def __call__(self, samples: list) -> dict:
        if samples:
            return {k: v for k, v in self.collate(samples).items() if torch.is_tensor(v)}
        if self.empty is None:  # shapes and types only: the rows of one image, cut to none
            self.empty = {k: v[:0] for k, v in self([self.dataset[0]]).items()}
        return dict(self.empty)
