"""Test-only failure drills: a site-side result filter that turns one site's update of one round into
NaN weights, to see the server refuse it with its reason and the round go on (docs/security.md,
"Failure modes"), and a task filter that makes one site's round fail (a transient error). Only a test adds it to a job (`run_simulation(..., extend_job=nan_update(...))`);
NVFlare copies this module into that job's custom/ folder."""

from __future__ import annotations

import os
import time

from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants
from nvflare.job_config.defs import FilterType


class NaNUpdate(Filter):
    """At `site`, the train result of round `round_num` leaves with its first tensor all NaN."""

    def __init__(self, site: str, round_num: int):
        super().__init__()
        self.site = site
        self.round_num = round_num

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        this_round = shareable.get_header(AppConstants.CURRENT_ROUND)
        if fl_ctx.get_identity_name() != self.site or this_round != self.round_num:
            return shareable
        dxo = from_shareable(shareable)
        first = next(iter(dxo.data))
        dxo.data[first] = dxo.data[first] * float("nan")
        self.log_warning(fl_ctx, f"fault drill: {first} of round {self.round_num} sent as NaN")
        return dxo.update_shareable(shareable)


class FailRound(Filter):
    """At `site`, the train task of round `round_num` fails before training (a transient site error:
    a disk hiccup, an out-of-memory); the site answers the next rounds as usual."""

    def __init__(self, site: str, round_num: int):
        super().__init__()
        self.site = site
        self.round_num = round_num

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if fl_ctx.get_identity_name() == self.site and shareable.get_header(AppConstants.CURRENT_ROUND) == self.round_num:
            raise RuntimeError(f"fault drill: {self.site} fails round {self.round_num}")
        return shareable


def failing_round(site: str, round_num: int):
    """A job extension that makes one site's train task of one round fail."""
    def extend(job) -> None:
        job.to_clients(FailRound(site, round_num), tasks=["train"], filter_type=FilterType.TASK_DATA)
    return extend


class HoldRound(Filter):
    """At `site`, the train task of round `round_num` waits until the file `release` exists (at most
    `timeout` s): a test kills the site while it is held, at a known point of every job it runs."""

    def __init__(self, site: str, round_num: int, release: str, timeout: float = 300):
        super().__init__()
        self.site, self.round_num, self.release, self.timeout = site, round_num, release, timeout

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if fl_ctx.get_identity_name() == self.site and shareable.get_header(AppConstants.CURRENT_ROUND) == self.round_num:
            self.log_warning(fl_ctx, f"fault drill: holding round {self.round_num} until {self.release} exists")
            deadline = time.time() + self.timeout
            while not os.path.exists(self.release) and time.time() < deadline:
                time.sleep(0.2)
        return shareable


def held_round(site: str, round_num: int, release: str):
    """A job extension that holds one site's train task of one round (see HoldRound)."""
    def extend(job) -> None:
        job.to_clients(HoldRound(site, round_num, release), tasks=["train"], filter_type=FilterType.TASK_DATA)
    return extend


def both(*extensions):
    """Several job extensions as one."""
    def extend(job) -> None:
        for extension in extensions:
            extension(job)
    return extend


def nan_update(site: str, round_num: int):
    """A job extension (see cxrfl.fl.job.built_job) that adds the drill to every site."""
    def extend(job) -> None:
        job.to_clients(NaNUpdate(site, round_num), tasks=["train"], filter_type=FilterType.TASK_RESULT)
    return extend
