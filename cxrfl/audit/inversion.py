"""Gradient inversion in the style of Geiping et al. 2020, "Inverting Gradients - How easy is it to
break privacy in federated learning?": recover a site's training images from the gradient (or the
weight update) it shares, and score how recognisable the recovered images are.

The attack optimises candidate images so that their gradient points the same way as the shared one:
cosine distance over all trainable parameters taken together, plus a total-variation prior, Adam on
the *signed* image gradient, learning rate cut tenfold at 3/8, 5/8 and 7/8 of the iterations, the
best of `restarts` random starts kept. These are the paper's choices.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn import functional as F
from torchmetrics.functional.image import structural_similarity_index_measure

DEFAULT_ITERATIONS = 1000
# Geiping used 1e-4 on ImageNet; on z-scored 32 px phantoms 3e-2 recovered best and fastest of
# 1e-4..1e-1 (SSIM 0.91 v 0.55 for 1e-4 at 300 iterations, tiny conv net; measured for the audit).
DEFAULT_TV_WEIGHT = 3e-2
LR_DECAY_AT = (3 / 8, 5 / 8, 7 / 8)  # fractions of the iterations, each step x0.1 (the paper's schedule)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters a site trains and shares, in the order target gradients are listed."""
    return [p for p in model.parameters() if p.requires_grad]


@contextlib.contextmanager
def buffers_kept(model: nn.Module) -> Iterator[None]:
    """Run forward passes without leaving a trace: train-mode BatchNorm updates its running
    statistics on every pass, so every buffer is put back as it was afterwards."""
    saved = [b.detach().clone() for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(model.buffers(), saved):
                buffer.copy_(value)


def _batch_gradient(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    create_graph: bool) -> tuple[torch.Tensor, ...]:
    """Gradient of the mean cross-entropy over the batch, as the site's training step computes it."""
    params = trainable_parameters(model)
    loss = F.cross_entropy(model(images), labels)
    grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    return tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads))  # unused: no gradient


def gradient_of(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """The true gradient a site would share for this batch (model in the mode it is given; its
    weights and buffers are left as they were)."""
    with buffers_kept(model), torch.enable_grad():
        return [g.detach() for g in _batch_gradient(model, images, labels, create_graph=False)]


def _cosine_distance(trial: Sequence[torch.Tensor], target: Sequence[torch.Tensor], target_norm: torch.Tensor
                     ) -> torch.Tensor:
    """1 - cosine similarity of the two gradients, each seen as one vector over all parameters."""
    dot = sum((g * t).sum() for g, t in zip(trial, target))
    trial_norm = torch.sqrt(sum(g.pow(2).sum() for g in trial))
    return 1 - dot / (trial_norm * target_norm + 1e-12)


def _sign_disagreement(trial: Sequence[torch.Tensor], target: Sequence[torch.Tensor], target_norm: torch.Tensor
                       ) -> torch.Tensor:
    """1 - how far the trial gradient points along the target's signs, per unit of its L1 norm (0 when every
    coordinate agrees in sign). For Adam's updates: one Adam step is about -lr * sign(gradient), so the signs are
    what a site's update reveals and their magnitudes are not worth matching. Own code: no attack library has it."""
    dot = sum((g * torch.sign(t)).sum() for g, t in zip(trial, target))
    return 1 - dot / (sum(g.abs().sum() for g in trial) + 1e-12)


OBJECTIVES = {"cosine": _cosine_distance, "sign": _sign_disagreement}


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels, across and down (Geiping's prior)."""
    across = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    down = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    return across + down


def _check_targets(params: list[nn.Parameter], target_grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if len(target_grads) != len(params):
        raise ValueError(f"target_grads has {len(target_grads)} tensors but the model has {len(params)} trainable "
                         "parameters (one gradient per parameter, in model.parameters() order)")
    targets = []
    for i, (p, t) in enumerate(zip(params, target_grads)):
        t = torch.as_tensor(t)
        if t.shape != p.shape:
            raise ValueError(f"target_grads[{i}] has shape {tuple(t.shape)}, its parameter {tuple(p.shape)}")
        targets.append(t.detach().to(device=p.device, dtype=p.dtype))
    if not any(bool(t.any()) for t in targets):
        raise ValueError("target_grads are all zero: no direction to match")
    return targets


def _batch_shape(image_shape: Sequence[int], batch: int) -> tuple[int, ...]:
    shape = tuple(int(s) for s in image_shape)
    if len(shape) == 4 and shape[0] == batch:
        return shape
    if len(shape) == 3:
        return (batch, *shape)
    raise ValueError(f"image_shape must be one image's (channels, height, width) or (batch, channels, height, "
                     f"width) with batch = len(labels) = {batch}; got {shape}")


def invert_gradients(model: nn.Module, target_grads: Sequence[torch.Tensor], labels: torch.Tensor,
                     image_shape: Sequence[int], *, iterations: int = DEFAULT_ITERATIONS, lr: float = 0.1,
                     tv_weight: float = DEFAULT_TV_WEIGHT, restarts: int = 1, seed: int = 0,
                     objective: str = "cosine") -> torch.Tensor:
    """Images [B, C, H, W] whose gradient matches `target_grads`: the reconstruction an honest-but-
    curious server (or anyone who sees a site's update) can make of the site's batch.

    target_grads: one tensor per trainable parameter (`[p for p in model.parameters() if
    p.requires_grad]` order), the gradient of the mean cross-entropy over the batch or anything
    proportional to it by a POSITIVE factor: the cosine distance ignores the scale, not the sign.
    A weight update of one SGD step is -lr * grad: pass it negated (old - new weights), else the
    attack chases the opposite direction, which no image produces.
    labels: [B] class indices. The attacker is given the true labels, a stronger attacker than one
    who must infer them (they can often be read off the last layer's gradient at batch 1 anyway).
    image_shape: one image's (C, H, W); B is len(labels).

    The model is used in the mode it is given (train mode for BatchNorm nets, as the site trained:
    batch statistics of the candidate batch; dropout then draws its masks from the seeded stream).
    objective: "cosine" (Geiping's, for gradients and SGD updates) or "sign" (for Adam's updates, which
    reveal the gradient's signs: `_sign_disagreement`).
    Its weights and buffers are left unchanged. Deterministic for a seed; the caller's random
    state is not touched. No box constraint (Geiping clamps to the data range; z-scored images
    have none fixed). Of `restarts` random starts, the one whose gradient matches best is kept.
    """
    if iterations < 1 or restarts < 1:
        raise ValueError("iterations and restarts must be >= 1")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    distance = OBJECTIVES[objective]
    params = trainable_parameters(model)
    targets = _check_targets(params, target_grads)
    labels = torch.as_tensor(labels, dtype=torch.long, device=targets[0].device).flatten()
    shape = _batch_shape(image_shape, len(labels))
    target_norm = torch.sqrt(sum(t.pow(2).sum() for t in targets))

    def matching_loss(images: torch.Tensor, create_graph: bool) -> torch.Tensor:
        return distance(_batch_gradient(model, images, labels, create_graph), targets, target_norm)

    best, best_loss = None, float("inf")
    with buffers_kept(model), torch.random.fork_rng(), torch.enable_grad():
        torch.manual_seed(seed)  # dropout masks, when the model is in train mode
        starts = torch.Generator().manual_seed(seed)
        for _ in range(restarts):
            images = torch.randn(shape, generator=starts).to(targets[0].device).requires_grad_(True)
            optimiser = torch.optim.Adam([images], lr=lr)
            milestones = sorted({max(1, int(iterations * f)) for f in LR_DECAY_AT})
            schedule = torch.optim.lr_scheduler.MultiStepLR(optimiser, milestones=milestones, gamma=0.1)
            for _ in range(iterations):
                loss = matching_loss(images, create_graph=True) + tv_weight * total_variation(images)
                (grad,) = torch.autograd.grad(loss, images)
                images.grad = grad.sign()  # signed gradients, as in the paper: every pixel moves at lr
                optimiser.step()
                schedule.step()
            final = float(matching_loss(images, create_graph=False))
            if final < best_loss or best is None:
                best, best_loss = images.detach().clone(), final
    return best


def _unit_range(images: torch.Tensor) -> torch.Tensor:
    """Each image min-max rescaled to [0, 1] (a constant image becomes 0)."""
    flat = images.flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(1e-12)).view_as(images)


def pairwise_ssim(reconstructed: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """[len(truth), len(reconstructed)] SSIM of every pair, both min-max rescaled to [0, 1]: inputs are
    z-scored and the attack recovers intensities only up to an affine map."""
    recon, true = _unit_range(reconstructed.detach().float()), _unit_range(truth.detach().float())
    n, m = len(true), len(recon)
    pairs_true = true.repeat_interleave(m, dim=0)
    pairs_recon = recon.repeat(n, 1, 1, 1)
    scores = structural_similarity_index_measure(pairs_recon, pairs_true, data_range=1.0, reduction="none")
    return scores.view(n, m)


def normalised_cross_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image pair, Pearson correlation of the pixels: unchanged by x -> s*x + c for any s > 0
    (a negative s flips its sign); 0 where an image is constant."""
    a = a.detach().double().flatten(1)
    b = b.detach().double().flatten(1)
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)


def match_and_score(reconstructed: torch.Tensor, truth: torch.Tensor) -> dict:
    """Pair each true image with one reconstruction (the batch order is not recovered) by maximum
    total SSIM (Hungarian assignment), then score each pair.

    Returns plain numbers, per true image in its order: "ssim" and "ncc" lists, their means, and
    "order", where order[i] is the index of the reconstruction matched to truth[i]."""
    if reconstructed.shape != truth.shape or reconstructed.dim() != 4 or len(truth) == 0:
        raise ValueError(f"need two batches [B, C, H, W] of the same shape, got {tuple(reconstructed.shape)} "
                         f"and {tuple(truth.shape)}")
    ssim = pairwise_ssim(reconstructed, truth)
    rows, order = linear_sum_assignment(ssim.numpy(), maximize=True)
    order = order[np.argsort(rows)]
    matched = reconstructed[torch.as_tensor(order)]
    per_ssim = [float(ssim[i, j]) for i, j in enumerate(order)]
    per_ncc = [float(v) for v in normalised_cross_correlation(matched, truth)]
    return {"ssim": per_ssim, "ncc": per_ncc, "ssim_mean": float(np.mean(per_ssim)),
            "ncc_mean": float(np.mean(per_ncc)), "order": [int(j) for j in order]}


def identification_rate(matched: torch.Tensor, truth: torch.Tensor, others: torch.Tensor) -> float:
    """Share of the true images an attacker picks out of a line-up (the true image and `others`, other patients
    of the same hospital) as the one most like its reconstruction, by NCC. `matched[i]` is truth[i]'s
    reconstruction. Where every chest looks alike (SSIM of any two patients is high), this says whether the
    reconstruction shows *this* patient, which SSIM alone cannot."""
    if len(matched) != len(truth) or len(others) == 0:
        raise ValueError("need one reconstruction per true image and at least one other patient")
    hits = 0
    for recon, true in zip(matched, truth):
        own = normalised_cross_correlation(recon[None], true[None])
        rest = normalised_cross_correlation(recon[None].expand_as(others), others)
        hits += int(own.item() > rest.max().item())
    return hits / len(truth)
