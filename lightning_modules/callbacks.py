"""Lightning callbacks shared by the trainers."""

from __future__ import annotations

import time

import pytorch_lightning as pl


class RoundTimeBudget(pl.Callback):
    """Stop local training once `seconds` have passed since this fit() started.

    Written here because Lightning's Timer counts time across fit() calls, so after the first
    federated round it would stop every later round at once.
    """

    def __init__(self, seconds: float):
        if seconds <= 0:
            raise ValueError("the time budget must be > 0 seconds")
        self.seconds = seconds
        self._start = None
        self.stopped_early = False

    def on_train_start(self, trainer, pl_module):
        self._start = time.monotonic()
        self.stopped_early = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if time.monotonic() - self._start >= self.seconds:
            trainer.should_stop = True
            self.stopped_early = True



class ProximalPull(pl.Callback):
    """Adds the gradient of weight/2 * |w - reference|^2 to every trainable parameter before each optimizer
    step: Ditto's personal objective (Li et al. 2021), the personal model pulled toward the global one.
    Written here because NVFlare's Ditto helper runs its own PyTorch loop, not Lightning's."""

    def __init__(self, reference: dict, weight: float):
        if not weight > 0:
            raise ValueError("the proximal weight must be > 0")
        self.reference = {k: v.detach().clone() for k, v in reference.items()}
        self.weight = weight

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        for name, parameter in pl_module.named_parameters():
            if parameter.grad is not None and name in self.reference:
                target = self.reference[name].to(parameter.device, parameter.dtype)
                parameter.grad.add_(parameter.detach() - target, alpha=self.weight)
