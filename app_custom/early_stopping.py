"""Server-side early stopping: ScatterAndGather ends after the round in which the sites' validation
metric has gone `patience` rounds without improving; the job still ends FINISHED_COMPLETED and runs
its cross-site evaluation.

The metric is the one the best model is chosen by: NVFlare's IntimeModelSelector averages the key
metric of the sites' validation of the global model they received, and fires
GLOBAL_BEST_MODEL_AVAILABLE in every round whose average beats all earlier ones. Round r's updates
carry the validation of round r-1's global model, so round 0 has none and the first improvement is
seen in round 1. The stop is recorded in `<server app dir>/rounds/early_stop.json`
({"round", "patience", "best_round", "best_metric", "key_metric", "rounds"}).
"""

from __future__ import annotations

import os

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType

from app_custom.round_recorder import ROUNDS_DIR
from lightning_modules.data.atomic import write_json

EARLY_STOP_FILE = "early_stop.json"


class Patience:
    """Rounds without improvement of the validation metric; no NVFlare in here."""

    def __init__(self, patience: int):
        if patience < 1:
            raise ValueError(f"patience must be >= 1 round, got {patience}")
        self.patience = patience
        self.best_round: int | None = None
        self.best_metric: float | None = None

    def improved(self, round_num: int, metric: float | None) -> None:
        """The sites' validation that arrived in `round_num` beat every earlier round's."""
        self.best_round, self.best_metric = round_num, metric

    def should_stop(self, round_num: int) -> bool:
        """After `round_num`: has the metric not improved for `patience` rounds? Never before a first
        validation arrived (round 0 carries none)."""
        return self.best_round is not None and round_num - self.best_round >= self.patience


class EarlyStopping(FLComponent):
    """Stops the ScatterAndGather workflow `controller_id` after `patience` rounds without improvement."""

    def __init__(self, patience: int, controller_id: str, key_metric: str = ""):
        super().__init__()
        self.patience = patience
        self.controller_id = controller_id
        self.key_metric = key_metric
        self._tracker = Patience(patience)
        self._dir = None

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            self._tracker = Patience(self.patience)
            self._dir = os.path.join(fl_ctx.get_prop(FLContextKey.APP_ROOT), ROUNDS_DIR)
        elif event_type == AppEventType.GLOBAL_BEST_MODEL_AVAILABLE:
            metric = fl_ctx.get_prop(AppConstants.VALIDATION_RESULT)
            self._tracker.improved(fl_ctx.get_prop(AppConstants.CURRENT_ROUND),
                                   float(metric) if metric is not None else None)
        elif event_type == AppEventType.ROUND_DONE:
            round_num = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
            if round_num is not None and self._tracker.should_stop(round_num):
                self._stop_after(round_num, fl_ctx)

    def _stop_after(self, round_num: int, fl_ctx: FLContext) -> None:
        controller = fl_ctx.get_engine().get_component(self.controller_id)
        if controller is None or not hasattr(controller, "_num_rounds"):
            self.log_error(fl_ctx, f"early stopping: no ScatterAndGather {self.controller_id!r} to stop")
            return
        configured = controller._start_round + controller._num_rounds
        if round_num >= configured - 1:
            return  # the last round anyway: not an early stop
        # ScatterAndGather has no stop call, and an abort would end the job ABORTED without cross-site
        # evaluation; its loop re-reads _num_rounds before each round, so this round becomes its last.
        controller._num_rounds = round_num + 1 - controller._start_round
        record = {"round": round_num, "patience": self.patience, "best_round": self._tracker.best_round,
                  "best_metric": self._tracker.best_metric, "key_metric": self.key_metric, "rounds": configured}
        write_json(os.path.join(self._dir, EARLY_STOP_FILE), record)
        self.log_info(fl_ctx, f"early stopping after round {round_num}: the sites' {self.key_metric or 'metric'} "
                              f"has not improved for {self.patience} round(s), since round {self._tracker.best_round}")
