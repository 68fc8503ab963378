"""The checks a site's update passes before it may count, in one place.

NVFlare's ScatterAndGather already drops late results. `UpdateValidator` (a server result filter,
every plaintext job) refuses updates that do not fit the model; `read_contribution` is what every
cxr-fl aggregator checks on top: an update tagged for another round, a second update from the same
site in one round, a missing or non-positive sample weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants

from app_custom.wire import ABSENT

@dataclass
class Contribution:
    site: str
    dxo: DXO | None
    weight: float | None
    refusal: str | None  # why it may not count; None: it may


def read_contribution(shareable: Shareable, fl_ctx: FLContext, already_counted) -> Contribution:
    """The site, its DXO and sample weight, and the reason the update is refused if it is."""
    site = shareable.get_peer_prop(key=ReservedKey.IDENTITY_NAME, default="?")
    contribution_round = shareable.get_cookie(AppConstants.CONTRIBUTION_ROUND)
    current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
    try:
        dxo = from_shareable(shareable)
    except Exception as exc:
        return Contribution(site, None, None, f"not a DXO ({exc})")
    weight = dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND)
    refusal = None
    if contribution_round != current_round:
        refusal = f"it is for round {contribution_round}, this is round {current_round}"
    elif site in already_counted:
        refusal = "it already contributed to this round"
    elif isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
        refusal = f"its sample weight {weight!r} is not positive"
    return Contribution(site, dxo, float(weight) if refusal is None else None, refusal)


def update_problem(update: dict, model: dict, site_keys=()) -> str | None:
    """Why a site's plaintext weights (or weight differences) cannot be averaged into `model`:
    other tensor names, other shapes, or NaN/Inf values; None when they can. site_keys: the model's
    tensors that stay at the sites (FedBN's normalisation layers): an update must not hold them."""
    if not update:
        return "it holds no weights"
    expected = set(model) - set(site_keys)
    missing, unexpected = sorted(expected - set(update)), sorted(set(update) - expected)
    if missing or unexpected:
        return (f"its tensors are not the model's (missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})")
    for name, value in update.items():
        shape, expected = tuple(np.shape(value)), tuple(np.shape(model[name]))
        if shape != expected:
            return f"{name} has shape {list(shape)}, the model's has {list(expected)}"
        if not _all_finite(value):
            return f"{name} holds NaN or Inf values"
    return None


def _all_finite(value) -> bool:
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    array = np.asarray(value)
    return array.dtype.kind not in "fc" or bool(np.isfinite(array).all())


class UpdateValidator(Filter):
    """Server side, on every train result before the workflow sees it: an update whose tensors are
    not the global model's (names, shapes) or hold NaN/Inf is refused with the reason logged, and
    ScatterAndGather (ignore_result_error) goes on with the other sites. Written here because no
    stock NVFlare filter checks a result against the model. HE updates are checked by their site
    before encryption (the server cannot see inside them); absent-site markers pass. site_keys: the
    model's tensors that stay at the sites (FedBN): an update holding one is refused."""

    def __init__(self, site_keys: list[str] | None = None):
        super().__init__()
        self.site_keys = list(site_keys or [])

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable
        site = shareable.get_peer_prop(key=ReservedKey.IDENTITY_NAME, default="?")
        try:
            dxo = from_shareable(shareable)
        except Exception as exc:  # noqa: BLE001 - any unreadable result is refused, not raised
            return self._refuse(fl_ctx, site, f"not a DXO ({exc})")
        if dxo.get_meta_prop(ABSENT) or dxo.get_meta_prop(MetaKey.PROCESSED_ALGORITHM):
            return shareable
        if dxo.data_kind not in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF):
            return self._refuse(fl_ctx, site, f"it holds {dxo.data_kind}, not weights")
        model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        weights = model.get(ModelLearnableKey.WEIGHTS) if model else None
        if weights:
            problem = update_problem(dxo.data, weights, self.site_keys)
            if problem:
                return self._refuse(fl_ctx, site, problem)
        return shareable

    def _refuse(self, fl_ctx: FLContext, site: str, reason: str) -> Shareable:
        self.log_warning(fl_ctx, f"rejected the update of {site}: {reason}")
        return make_reply(ReturnCode.BAD_TASK_DATA)
