"""Membership inference by loss threshold (Yeom et al. 2018, "Privacy Risk in Machine Learning"):
a model tends to fit the images it was trained on better than unseen ones, so a low loss says
"member". The attack's power is the AUC of -loss at telling members from non-members: 0.5 means
the loss gives nothing away."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics.functional.classification import binary_auroc

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def per_sample_losses(model: nn.Module, batches: Batches) -> torch.Tensor:
    """Cross-entropy of every image, in float64 (an overfit model's losses of 1e-9 stay distinct
    instead of rounding to 0), with the model in eval mode; its mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        losses = [F.cross_entropy(model(images).double(), torch.as_tensor(labels).long().flatten(), reduction="none")
                  for images, labels in batches]
    finally:
        model.train(was_training)
    return torch.cat(losses) if losses else torch.zeros(0, dtype=torch.float64)


def membership_scores(model: nn.Module, members: Batches, non_members: Batches) -> dict[str, torch.Tensor]:
    """The per-image losses of both groups: {"members": [...], "non_members": [...]}."""
    scores = {"members": per_sample_losses(model, members), "non_members": per_sample_losses(model, non_members)}
    for group, losses in scores.items():
        if len(losses) == 0:
            raise ValueError(f"no {group.replace('_', '-')} images: the attack needs at least one of each group")
    return scores


def loss_auc(member_losses: torch.Tensor, non_member_losses: torch.Tensor) -> float:
    """AUC of the score -loss at telling members (positives) from non-members."""
    losses = torch.cat([member_losses, non_member_losses]).double()
    is_member = torch.cat([torch.ones(len(member_losses)), torch.zeros(len(non_member_losses))]).long()
    # exp(-loss), the probability given to the true class, is -loss made monotonically into [0, 1]:
    # torchmetrics would otherwise squash scores outside [0, 1] with a sigmoid (no AUC change).
    return float(binary_auroc(torch.exp(-losses), is_member))


def membership_auc(model: nn.Module, members: Batches, non_members: Batches) -> float:
    """How well the loss-threshold attack tells `members` (images the model trained on) from
    `non_members` (images from the same population it never saw): AUC in [0, 1], 0.5 = no leak.
    Each argument is an iterable of (images [B, C, H, W], labels [B]) batches; ValueError if
    either holds no image."""
    scores = membership_scores(model, members, non_members)
    return loss_auc(scores["members"], scores["non_members"])


def label_stratified_auc(model: nn.Module, members: Batches, non_members: Batches) -> float:
    """`membership_auc` within each class, averaged over the classes both groups hold: a loss that differs by
    class would otherwise make a model that memorised nothing look leaky wherever the groups' class mix
    differs (a site's training and validation splits do)."""
    members, non_members = list(members), list(non_members)
    labels = {g: torch.cat([torch.as_tensor(y).long().flatten() for _, y in batches])
              for g, batches in (("members", members), ("non_members", non_members))}
    scores = membership_scores(model, members, non_members)
    classes = sorted(set(labels["members"].tolist()) & set(labels["non_members"].tolist()))
    if not classes:
        raise ValueError("members and non-members share no class: a label-stratified AUC needs one")
    return float(sum(loss_auc(scores["members"][labels["members"] == c], scores["non_members"][labels["non_members"] == c])
                     for c in classes) / len(classes))
