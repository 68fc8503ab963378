"""A malformed site update (other tensor names, other shapes, NaN/Inf, not weights) is refused by
the server's UpdateValidator with the reason logged, so ScatterAndGather goes on with the others;
good updates, absent-site markers and HE ciphertexts pass untouched."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants

from app_custom.contributions import UpdateValidator, update_problem
from app_custom.wire import ABSENT

MODEL = {"conv.weight": torch.zeros(4, 1, 3, 3), "fc.bias": torch.zeros(2), "bn.num_batches_tracked": torch.tensor(3)}


def _result(data, kind=DataKind.WEIGHTS, meta=None):
    shareable = DXO(data_kind=kind, data=data, meta=meta or {MetaKey.NUM_STEPS_CURRENT_ROUND: 10}).to_shareable()
    shareable.set_peer_props({ReservedKey.IDENTITY_NAME: "site-2"})
    return shareable


def _context():
    ctx = FLContext()
    ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(dict(MODEL), {}), private=True, sticky=False)
    return ctx


def good():
    return {k: v.clone().float() if v.is_floating_point() else v.clone() for k, v in MODEL.items()}


@pytest.mark.parametrize("change, reason", [
    (lambda u: u.pop("fc.bias"), "missing ['fc.bias']"),
    (lambda u: u.update({"extra.weight": torch.zeros(1)}), "unexpected ['extra.weight']"),
    (lambda u: u.update({"fc.bias": torch.zeros(3)}), "fc.bias has shape [3], the model's has [2]"),
    (lambda u: u.update({"conv.weight": torch.full((4, 1, 3, 3), float("nan"))}), "conv.weight holds NaN or Inf"),
    (lambda u: u.update({"fc.bias": np.array([0.0, np.inf])}), "fc.bias holds NaN or Inf"),
    (lambda u: u.clear(), "holds no weights"),
])
def test_a_malformed_update_is_refused_with_its_reason(change, reason, caplog):
    update = good()
    change(update)
    assert reason in update_problem(update, MODEL)
    with caplog.at_level(logging.WARNING):
        reply = UpdateValidator().process(_result(update), _context())
    assert reply.get_return_code() == ReturnCode.BAD_TASK_DATA  # ScatterAndGather ignores it, the round goes on
    assert "rejected the update of site-2" in caplog.text and reason in caplog.text


def test_good_updates_and_markers_pass_untouched():
    validator = UpdateValidator()
    for result in (_result(good()), _result(good(), kind=DataKind.WEIGHT_DIFF),
                   _result({}, meta={ABSENT: True}),  # a site that is away this round
                   _result({"cxrfl.he.packed:[0,[]]": b"ciphertext"},
                           meta={MetaKey.PROCESSED_ALGORITHM: "CKKS", MetaKey.NUM_STEPS_CURRENT_ROUND: 1})):
        assert validator.process(result, _context()) is result
    metrics = _result({"val_auroc": 0.5}, kind=DataKind.METRICS)
    assert validator.process(metrics, _context()).get_return_code() == ReturnCode.BAD_TASK_DATA
