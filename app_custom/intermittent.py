"""FedAvg for sites that come and go (Sáinz-Pardo & López García's two approaches), as an NVFlare
aggregator for ScatterAndGather.

- approach 1 (`keep_absent=False`): a round's global model is the sample-weighted mean of the
  updates that arrived this round; a site that is away simply does not count.
- approach 2 (`keep_absent=True`): each site's last update is remembered, and a site that is away
  this round still counts with its last update and its sample weight. A site counts from the first
  round it contributes in; when it comes back its fresh update replaces the remembered one.

Written here because NVFlare's InTimeAccumulateWeightedAggregator only sees this round's results.
A site that is scheduled away (simulator schedules) sends an update marked ABSENT with no weights;
a site whose process is down sends nothing; both are "away" for the aggregator.
"""

from __future__ import annotations

import numpy as np
import torch

from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.aggregator import Aggregator
from nvflare.app_common.app_constant import AppConstants

from app_custom.contributions import read_contribution
from app_custom.wire import ABSENT, FRESH, KEPT


def weighted_mean(contributions: dict[str, tuple[dict, float]]) -> dict:
    """Sample-weighted mean of {site: (params, weight)}, key by key (tensors or arrays)."""
    if not contributions:
        raise ValueError("no contributions to average")
    total = float(sum(w for _, w in contributions.values()))
    if total <= 0:
        raise ValueError("the contributions' weights sum to zero")
    keys = next(iter(contributions.values()))[0].keys()
    in_site_order = [contributions[site] for site in sorted(contributions)]  # not arrival order: reproducible sums
    mean = {}
    for key in keys:
        acc = None
        for params, weight in in_site_order:
            value = params[key]
            value = value.double() if isinstance(value, torch.Tensor) else np.asarray(value, dtype=np.float64)
            acc = value * (weight / total) if acc is None else acc + value * (weight / total)
        original = next(iter(contributions.values()))[0][key]
        mean[key] = acc.to(original.dtype) if isinstance(original, torch.Tensor) else acc.astype(np.asarray(original).dtype)
    return mean


class SiteAwareFedAvg(Aggregator):
    def __init__(self, keep_absent: bool = False):
        super().__init__()
        self.keep_absent = keep_absent
        self._this_round: dict[str, tuple[dict, float]] = {}
        self._last: dict[str, tuple[dict, float]] = {}  # approach 2: every site's last update

    def reset(self, fl_ctx: FLContext) -> None:
        self._this_round = {}

    def accept(self, shareable: Shareable, fl_ctx: FLContext) -> bool:
        update = read_contribution(shareable, fl_ctx, self._this_round)
        if update.dxo is not None and update.dxo.get_meta_prop(ABSENT):
            self.log_info(fl_ctx, f"{update.site} is away in round {fl_ctx.get_prop(AppConstants.CURRENT_ROUND)}")
            return False
        refusal = update.refusal
        if refusal is None and (update.dxo.data_kind != DataKind.WEIGHTS or not update.dxo.data):
            refusal = "it holds no weights"
        if refusal:
            self.log_warning(fl_ctx, f"rejected the update of {update.site}: {refusal}")
            return False
        self._this_round[update.site] = (update.dxo.data, update.weight)
        return True

    def aggregate(self, fl_ctx: FLContext) -> Shareable:
        fresh = dict(self._this_round)
        counted = dict(fresh)
        kept = []
        if self.keep_absent:
            for site, update in self._last.items():
                if site not in counted:
                    counted[site] = update
                    kept.append(site)
            self._last.update(fresh)
        if not counted:  # every site failed or was refused: the global model stays as it was, and the
            # round log's empty `fresh` lets the coordinator fail the run, naming each site's error
            self.log_warning(fl_ctx, "no site contributed this round: the global model is unchanged")
            self.reset(fl_ctx)
            return DXO(data_kind=DataKind.WEIGHTS, data={}, meta={FRESH: [], KEPT: []}).to_shareable()
        mean = weighted_mean(counted)
        self.log_info(fl_ctx, f"averaged fresh updates of {sorted(fresh)}"
                              + (f" and the last updates of {sorted(kept)}" if kept else ""))
        self.reset(fl_ctx)
        dxo = DXO(data_kind=DataKind.WEIGHTS, data=mean, meta={FRESH: sorted(fresh), KEPT: sorted(kept)})
        return dxo.to_shareable()


