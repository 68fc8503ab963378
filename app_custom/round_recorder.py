"""Server-side record of every round: the global model at each round's end and who contributed.

Written here because NVFlare's persistor keeps only the last and the best global model, and no
stock widget logs per-round contributors. Files go to `<server app dir>/rounds/`:
- `global_round_NNN.pt`: `{"model": state_dict, "round": N}`, written atomically;
- `round_log.jsonl`: one JSON line per contribution (round, site, weight, accepted, absent, local_seconds,
  with DP-SGD or NVFlare's SVT filter the epsilon the site has spent so far) and,
  with the site-aware aggregator, one per global model (round, fresh: sites whose update of this
  round counted, kept: sites counted with an earlier update); the sites' metrics per round are in
  NVFlare's own `metrics/round_metrics.jsonl`;
- with `save_contributions=True` also `SITE_round_NNN.pt`, what each site sent: its weights, the
  DXO meta and the shareable's headers (an audit aid: what the server learns from a site; off by
  default since it stores every site's plaintext update).
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from nvflare.apis.dxo import from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.abstract.fl_model import MetaKey

from app_custom.wire import (ABSENT, DP_DELTA, DP_EPSILON, FRESH, KEPT, LOCAL_SECONDS, SVT_ACCOUNTANT,
                             SVT_ROUND_BUDGET)
from lightning_modules.data.atomic import atomic_torch_save

ROUNDS_DIR = "rounds"
ROUND_LOG = "round_log.jsonl"


def _to_tensors(weights: dict) -> dict:
    """Tensors for plaintext arrays; anything else (serialised HE ciphertexts) is kept as it is."""
    out = {}
    for k, v in weights.items():
        if isinstance(v, (bytes, bytearray)):  # a serialised HE ciphertext
            out[k] = v
        elif isinstance(v, torch.Tensor):
            out[k] = v.detach().cpu()
        elif isinstance(v, np.ndarray) or np.isscalar(v):
            out[k] = torch.as_tensor(np.asarray(v))
        else:
            out[k] = v.serialize() if hasattr(v, "serialize") else v
    return out


def _plain(props) -> dict:
    """JSON-like values of a shareable's headers (what travelled with the update besides its DXO)."""
    return {k: v for k, v in (props or {}).items() if isinstance(v, (str, int, float, bool, list, dict, type(None)))}


class RoundRecorder(FLComponent):
    def __init__(self, save_contributions: bool = False):
        super().__init__()
        self.save_contributions = save_contributions
        self._dir = None

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            self._dir = os.path.join(fl_ctx.get_prop(FLContextKey.APP_ROOT), ROUNDS_DIR)
            os.makedirs(self._dir, exist_ok=True)
        elif event_type == AppEventType.AFTER_CONTRIBUTION_ACCEPT:
            self._record_contribution(fl_ctx)
        elif event_type == AppEventType.ROUND_DONE:
            self._save_global(fl_ctx)

    def _record_contribution(self, fl_ctx: FLContext) -> None:
        result = fl_ctx.get_prop(AppConstants.TRAINING_RESULT)
        round_num = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name() if peer else "?"
        entry = {"round": round_num, "site": site, "accepted": bool(fl_ctx.get_prop(AppConstants.AGGREGATION_ACCEPTED))}
        try:
            dxo = from_shareable(result)
            entry["weight"] = dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND)
            entry["absent"] = bool(dxo.get_meta_prop(ABSENT))
            entry["local_seconds"] = dxo.get_meta_prop(LOCAL_SECONDS)  # the site's own validation + training time
            if dxo.get_meta_prop(DP_EPSILON) is not None:  # DP-SGD: what the site has spent up to this update
                entry["dp_epsilon"], entry["dp_delta"] = dxo.get_meta_prop(DP_EPSILON), dxo.get_meta_prop(DP_DELTA)
            svt = dxo.get_meta_prop(SVT_ACCOUNTANT)
            if isinstance(svt, dict):  # NVFlare's SVT filter: its running pure-DP sum at this site, and this round's
                entry["dp_epsilon"], entry["dp_delta"] = svt.get("epsilon_total"), 0.0
                entry["svt_round_epsilon"] = (dxo.get_meta_prop(SVT_ROUND_BUDGET) or {}).get("epsilon_total")
            entry["data_kind"] = dxo.data_kind
            if self.save_contributions and isinstance(dxo.data, dict):
                atomic_torch_save({"model": _to_tensors(dxo.data), "round": round_num, "site": site,
                                   "weight": entry["weight"], "data_kind": dxo.data_kind,
                                   "meta": dict(dxo.meta or {}),
                                   "headers": _plain(result.get(ReservedHeaderKey.HEADERS))},
                                  os.path.join(self._dir, f"{site}_round_{round_num:03d}.pt"))
        except Exception as exc:  # a malformed result is the aggregator's to reject; log it here too
            entry["error"] = str(exc)
        self._log(entry)

    def _log(self, entry: dict) -> None:
        with open(os.path.join(self._dir, ROUND_LOG), "a") as f:
            f.write(json.dumps(entry) + "\n")

    def _save_global(self, fl_ctx: FLContext) -> None:
        model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        round_num = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        if not model or round_num is None:
            return
        weights = model[ModelLearnableKey.WEIGHTS]
        meta = dict(model.get(ModelLearnableKey.META) or {})  # under HE: the sum of weights to divide by
        if FRESH in meta:  # a site-aware aggregator says whose updates made this global model
            self._log({"round": round_num, "global_model": True, "fresh": meta[FRESH], "kept": meta.get(KEPT, [])})
        atomic_torch_save({"model": _to_tensors(weights), "round": round_num, "meta": meta},
                          os.path.join(self._dir, f"global_round_{round_num:03d}.pt"))
