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

