"""Test-only drill: every site reports the same validation metric every round, so the sites'
validation never improves after the first and early stopping must end the job. Only a test adds it
to a job (`run_simulation(..., extend_job=flat_validation(...))`); NVFlare copies this module into
that job's custom/ folder."""

from __future__ import annotations

from nvflare.apis.dxo import MetaKey, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.job_config.defs import FilterType


class FlatValidation(Filter):
    """A site's train result leaves with its validation of the received global model set to `value`."""

    def __init__(self, metric: str, value: float):
        super().__init__()
        self.metric = metric
        self.value = value

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        dxo = from_shareable(shareable)
        metrics = dxo.get_meta_prop(MetaKey.INITIAL_METRICS)
        if isinstance(metrics, dict):
            dxo.set_meta_prop(MetaKey.INITIAL_METRICS, {**metrics, self.metric: self.value})
        return dxo.update_shareable(shareable)


def flat_validation(metric: str, value: float):
    """A job extension (see cxrfl.fl.job.built_job) that adds the drill to every site."""
    def extend(job) -> None:
        job.to_clients(FlatValidation(metric, value), tasks=["train"], filter_type=FilterType.TASK_RESULT)
    return extend
