"""The server and site components that make FedAvg's ScatterAndGather run FedProx, SCAFFOLD and FedBN.

The sites' optimisation is NVFlare's: `flare.patch(trainer)` adds FedProx's proximal gradient and
SCAFFOLD's control-variate correction when the model it receives carries their metadata
(`fedprox_mu`, `scaffold_c_global`). These components put that metadata on the train task and, for
SCAFFOLD, keep the global control variates on the server. Written here because NVFlare 2.9's
server side of SCAFFOLD for FLModel clients is its `Scaffold` ModelController, and its
ScatterAndGatherScaffold sends a DXO collection the Client API does not turn into model metadata:
these keep the one ScatterAndGather workflow (model selection, round log, early stopping, cross-site
evaluation) for every algorithm.
"""

from __future__ import annotations

import torch
from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey
from nvflare.app_common.app_constant import AlgorithmConstants
from nvflare.app_common.shareablegenerators.full_model_shareable_generator import FullModelShareableGenerator

from app_custom.intermittent import SiteAwareFedAvg, weighted_mean


class TrainTaskMeta(Filter):
    """Server side, on every train task: adds `meta` to the model's metadata (FedProx: {"fedprox_mu": mu},
    which the sites' patched trainer reads). After the shareable generator, so it works under HE too."""

    def __init__(self, meta: dict):
        super().__init__()
        self.meta = dict(meta)

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        dxo = from_shareable(shareable)
        for key, value in self.meta.items():
            dxo.set_meta_prop(key, value)
        return dxo.update_shareable(shareable)


class ScaffoldControls(FullModelShareableGenerator):
    """SCAFFOLD's global control variates c on the server (Karimireddy et al. 2020): sent with every
    train task as `scaffold_c_global`, then c += the sites' sample-weighted mean control change, which
    ScaffoldFedAvg puts on the aggregate (as NVFlare's Scaffold controller does). c starts at zero,
    also when a run resumes."""

    def __init__(self):
        super().__init__()
        self.controls: dict[str, torch.Tensor] | None = None

    def learnable_to_shareable(self, model_learnable: ModelLearnable, fl_ctx: FLContext) -> Shareable:
        shareable = super().learnable_to_shareable(model_learnable, fl_ctx)
        if self.controls is None:
            self.controls = {k: torch.zeros_like(torch.as_tensor(v), dtype=torch.float32)
                             for k, v in model_learnable["weights"].items()}
        dxo = from_shareable(shareable)
        dxo.set_meta_prop(AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL, self.controls)
        return dxo.update_shareable(shareable)

    def shareable_to_learnable(self, shareable: Shareable, fl_ctx: FLContext) -> ModelLearnable:
        change = from_shareable(shareable).get_meta_prop(AlgorithmConstants.SCAFFOLD_CTRL_DIFF)
        if change and self.controls is not None:
            for name, value in change.items():
                if name in self.controls:
                    self.controls[name] += torch.as_tensor(value, dtype=torch.float32).reshape(self.controls[name].shape)
        learnable = super().shareable_to_learnable(shareable, fl_ctx)
        (learnable.get(ModelLearnableKey.META) or {}).pop(AlgorithmConstants.SCAFFOLD_CTRL_DIFF, None)  # not a model file's
        return learnable


class ScaffoldFedAvg(SiteAwareFedAvg):
    """FedAvg of the weights (in site order) and of the sites' control changes, with the same sample
    weights; an update without a control change is refused (a site not running SCAFFOLD)."""

    def __init__(self):
        super().__init__(keep_absent=False)
        self._changes: dict[str, tuple[dict, float]] = {}

    def reset(self, fl_ctx: FLContext) -> None:
        super().reset(fl_ctx)
        self._changes = {}

    def accept(self, shareable: Shareable, fl_ctx: FLContext) -> bool:
        site = shareable.get_peer_prop(key=ReservedKey.IDENTITY_NAME, default="?")
        change = from_shareable(shareable).get_meta_prop(AlgorithmConstants.SCAFFOLD_CTRL_DIFF)
        if not change:
            self.log_warning(fl_ctx, f"rejected the update of {site}: it carries no SCAFFOLD control change")
            return False
        accepted = super().accept(shareable, fl_ctx)
        if accepted:
            self._changes[site] = (change, self._this_round[site][1])
        return accepted

    def aggregate(self, fl_ctx: FLContext) -> Shareable:
        changes = dict(self._changes)
        aggregate = super().aggregate(fl_ctx)
        if changes:
            dxo = from_shareable(aggregate)
            dxo.set_meta_prop(AlgorithmConstants.SCAFFOLD_CTRL_DIFF, weighted_mean(changes))
            aggregate = dxo.update_shareable(aggregate)
        return aggregate


class KeepAtSite(Filter):
    """Site side, on what a train task sends: drops the named tensors (FedBN: every normalisation layer's
    weights and statistics), so they never leave the site."""

    def __init__(self, keys: list[str]):
        super().__init__()
        self.keys = list(keys)

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        dxo = from_shareable(shareable)
        if isinstance(dxo.data, dict):
            kept_here = set(self.keys)
            dxo.data = {k: v for k, v in dxo.data.items() if k not in kept_here}
        return dxo.update_shareable(shareable)
