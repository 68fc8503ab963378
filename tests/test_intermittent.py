"""Sites that come and go: both aggregation approaches against hand-computed averages, and
schedules. (A simulator run where one site leaves and another joins is in test_study.py; the POC
outage in test_poc_intermittent.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants

from app_custom.availability import check_schedule, parse_rounds
from app_custom.intermittent import SiteAwareFedAvg, weighted_mean
from app_custom.wire import ABSENT, FRESH, KEPT


def _update(site: str, round_num: int, value: float | None, weight: float = 1.0):
    meta = {ABSENT: True} if value is None else {MetaKey.NUM_STEPS_CURRENT_ROUND: weight}
    data = {} if value is None else {"w": torch.full((2,), value)}
    shareable = DXO(data_kind=DataKind.WEIGHTS, data=data, meta=meta).to_shareable()
    shareable.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    shareable.add_cookie(AppConstants.CONTRIBUTION_ROUND, round_num)
    return shareable


def _round(aggregator, round_num: int, updates: dict) -> tuple[float, dict]:
    """Run one round: {site: (value or None when away, weight)} -> (global value, meta)."""
    ctx = FLContext()
    ctx.set_prop(AppConstants.CURRENT_ROUND, round_num, private=True, sticky=False)
    for site, (value, weight) in updates.items():
        accepted = aggregator.accept(_update(site, round_num, value, weight), ctx)
        assert accepted == (value is not None)
    dxo = from_shareable(aggregator.aggregate(ctx))
    return float(dxo.data["w"][0]), dxo.meta


def test_weighted_mean_by_hand():
    mean = weighted_mean({"a": ({"w": torch.tensor([1.0, 3.0])}, 1.0), "b": ({"w": torch.tensor([4.0, 0.0])}, 3.0)})
    torch.testing.assert_close(mean["w"], torch.tensor([3.25, 0.75]))  # (1*1 + 3*4)/4, (1*3 + 3*0)/4
    arrays = weighted_mean({"a": ({"w": np.array([2.0])}, 2.0), "b": ({"w": np.array([5.0])}, 1.0)})
    np.testing.assert_allclose(arrays["w"], [3.0])


# rounds: a (weight 1) always; b (weight 3) leaves after round 0 and comes back in round 2;
# c (weight 2) joins in round 1
ROUNDS = [
    {"a": (1.0, 1), "b": (5.0, 3), "c": (None, 2)},
    {"a": (2.0, 1), "b": (None, 3), "c": (8.0, 2)},
    {"a": (3.0, 1), "b": (7.0, 3), "c": (9.0, 2)},
]


def test_approach_1_averages_only_this_rounds_updates():
    aggregator = SiteAwareFedAvg(keep_absent=False)
    results = [_round(aggregator, r, updates) for r, updates in enumerate(ROUNDS)]
    assert [v for v, _ in results] == pytest.approx([(1 + 15) / 4, (2 + 16) / 3, (3 + 21 + 18) / 6])
    assert results[1][1][FRESH] == ["a", "c"] and results[1][1][KEPT] == []


def test_approach_2_keeps_the_last_update_of_a_site_that_is_away():
    aggregator = SiteAwareFedAvg(keep_absent=True)
    results = [_round(aggregator, r, updates) for r, updates in enumerate(ROUNDS)]
    # round 0: c has not joined yet, so nothing of it is kept; round 1: b counts with its round-0
    # update 5.0 (weight 3); round 2: b is back with a fresh update that replaces the old one
    assert [v for v, _ in results] == pytest.approx([(1 + 15) / 4, (2 + 15 + 16) / 6, (3 + 21 + 18) / 6])
    assert results[0][1][KEPT] == [] and results[1][1][KEPT] == ["b"] and results[2][1][KEPT] == []
    assert results[1][1][FRESH] == ["a", "c"]


def test_updates_that_cannot_count_are_refused():
    aggregator = SiteAwareFedAvg()
    ctx = FLContext()
    ctx.set_prop(AppConstants.CURRENT_ROUND, 3, private=True, sticky=False)
    assert not aggregator.accept(_update("a", 2, 1.0), ctx)  # a late update of an earlier round
    assert aggregator.accept(_update("a", 3, 1.0), ctx)
    assert not aggregator.accept(_update("a", 3, 2.0), ctx)  # a second update in one round
    assert not aggregator.accept(_update("b", 3, 1.0, weight=0), ctx)


def test_schedules_parse_and_refuse_mistakes():
    assert parse_rounds("0-1,3,5-", 7) == {0, 1, 3, 5, 6}
    assert check_schedule({"s2": "1-"}, ["s1", "s2"], 3) == {"s1": {0, 1, 2}, "s2": {1, 2}}
    with pytest.raises(ValueError, match="outside"):
        parse_rounds("2-4", 3)
    with pytest.raises(ValueError, match="not in the job"):
        check_schedule({"s9": "0"}, ["s1"], 2)
    with pytest.raises(ValueError, match="no site is available in round"):
        check_schedule({"s1": "0", "s2": "0"}, ["s1", "s2"], 2)
    with pytest.raises(ValueError, match="numbers"):
        parse_rounds("one", 2)
