"""What the server sees of one site's round: the weight update this project's own training makes from a
batch of images, under each defence (plain FedAvg, more local epochs, NVFlare's percentile filter, DP-SGD),
and the gradient direction an attacker reads off it.

The update comes from the real thing: the classifier LightningModule, its own optimizer (AdamW), a plain
`Trainer`, and for DP-SGD the project's `DPSGD` callback. The site's batch is exactly the images attacked
(the attacker's best case: one step per local epoch on one batch) and has no augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytorch_lightning as pl
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.filters.percentile_privacy import PercentilePrivacy

from torch import nn

from lightning_modules.privacy import DPSGD, PrivacyPlan

PERCENTILE_DEFAULTS = {"percentile": 10.0, "gamma": 0.01}  # `--dp percentile`'s defaults (cxrfl/fl/config.py)


@dataclass(frozen=True)
class Defence:
    """One setting of the audit. noise_multiplier: DP-SGD's sigma (epsilon: what the audited training plan
    spends with it); percentile: NVFlare's PercentilePrivacy on the update, with `--dp percentile`'s defaults."""

    name: str
    local_epochs: int = 1
    percentile: bool = False
    noise_multiplier: float | None = None
    epsilon: float | None = None
    max_grad_norm: float = 1.0

    @property
    def dp_sgd(self) -> bool:
        return self.noise_multiplier is not None


class _Batch(pl.LightningDataModule):
    """The one batch a site trains on, every epoch, in a fixed order."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        super().__init__()
        self.items = [{"image": i, "label": l, "id": str(k)} for k, (i, l) in enumerate(zip(images, labels))]

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.items, batch_size=len(self.items), shuffle=False)


PROBE = "probe"  # the audit's positive control (probe_net)


def probe_net(image_size: int, num_classes: int = 2) -> nn.Module:
    """The audit's positive control: three conv layers and a dense head, no pooling to one pixel and no batch
    statistics, the textbook case where gradient inversion works (Geiping et al.): a table row that shows the
    attack succeeding where there is something to find, so a failed attack on CNN5 or DenseNet121 is not read
    as proof of privacy."""
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32 * ((image_size + 3) // 4) ** 2, num_classes))


def site_update(module: pl.LightningModule, images: torch.Tensor, labels: torch.Tensor, defence: Defence) -> dict:
    """New minus old trainable weights (`net.*` names) after the site trains `module` (a LightningModule whose
    network is `net`, with its own optimizer) on the batch with the defence; `module` is left trained. Percentile: the update after NVFlare's filter, as the server gets it."""
    before = {k: v.detach().clone() for k, v in module.named_parameters()}
    batch = _Batch(images, labels)
    callbacks, data = [], batch
    if defence.dp_sgd:  # one Poisson batch of rate 1 per epoch: exactly these images, clipped and noised
        plan = PrivacyPlan(num_samples=len(labels), sample_rate=1.0, steps_per_epoch=1, epochs=defence.local_epochs,
                           rounds=1, noise_multiplier=defence.noise_multiplier, delta=1e-5)
        dp = DPSGD(plan, defence.max_grad_norm)
        callbacks, data = [dp], dp.datamodule(batch)
    trainer = pl.Trainer(max_epochs=defence.local_epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=callbacks)
    trainer.fit(module, datamodule=data)
    update = {k: (p.detach() - before[k]) for k, p in module.named_parameters()}
    if defence.percentile:
        update = percentile_filtered(update, weight=len(labels))
    return update


def percentile_filtered(update: dict, weight: int) -> dict:
    """NVFlare's PercentilePrivacy applied to `update` as a site's filter applies it (numpy weight
    differences, per training sample)."""
    dxo = DXO(data_kind=DataKind.WEIGHT_DIFF, data={k: v.cpu().numpy().astype(np.float64) for k, v in update.items()},
              meta={MetaKey.NUM_STEPS_CURRENT_ROUND: weight})
    filtered = PercentilePrivacy(**PERCENTILE_DEFAULTS).process_dxo(dxo, Shareable(), FLContext())
    return {k: torch.as_tensor(v, dtype=torch.float32) for k, v in filtered.data.items()}


def attack_direction(module_before: pl.LightningModule, update: dict) -> list[torch.Tensor]:
    """What the attacker takes for the gradient of the site's loss, per trainable parameter (the model's
    order): the update with AdamW's weight decay (known from the job: lr, weight decay and the global
    weights) taken out, negated. After one step Adam's update is about -lr*sign(gradient), after several
    the sum of such steps: a direction the cosine attack can still follow."""
    lr, decay = module_before.hparams.lr, module_before.hparams.get("weight_decay", 0.0)
    params = dict(module_before.named_parameters())
    return [-(update[k] + lr * decay * params[k].detach()) for k, p in params.items() if p.requires_grad]
