"""Training batches made where the model trains (`CXRDataModule.keep_training_images_on`): every cached
training image in one tensor on the device, a batch at a time cut out, augmented and standardised there.

Written here instead of running MONAI's dictionary transforms on CUDA tensors: those work one image at a time
(a RandAffined call per image, each with its own grid, host-side random draws and a per-image noise array made
with numpy), so a GPU would wait on Python; measured on CPU at 224 px, the per-image pipeline gives ~70
images/s per core. `BatchAugment` applies the same random transforms with the same settings
(`transforms.affine_settings`, `CONTRAST`, `NOISE`, then `normalize`), each drawn per image, to the whole batch in a
few tensor operations; `tests/test_gpu_path.py` checks them against MONAI's for the same parameters. The
draws differ from the per-image pipeline's for a seed, so a run with --gpu-data is its own random stream.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from lightning_modules.data.transforms import AFFINE, CONTRAST, NOISE, affine_settings

CONTRAST_EPSILON = 1e-7  # MONAI's AdjustContrast's


def _per_axis(value, axes: int = 2) -> tuple[float, ...]:
    """A MONAI range setting per spatial axis: a number covers the first axis only, missing axes get 0."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    return tuple(float(v) for v in values[:axes]) + (0.0,) * (axes - len(values))


def affine_theta(rotate: torch.Tensor, scale: torch.Tensor, translate: torch.Tensor, height: int,
                 width: int) -> torch.Tensor:
    """`F.affine_grid`'s theta [N,2,3] for MONAI's affine R(rotate) @ T(translate) @ S(scale) in centred pixel
    coordinates (axis 0 = rows): scale [N,2] factors, translate [N,2] pixels, both per image axis."""
    cos, sin = torch.cos(rotate), torch.sin(rotate)
    # MONAI's matrix A (sampled point = A @ output point), rows/columns in (row, column) order
    a00, a01 = cos * scale[:, 0], -sin * scale[:, 1]
    a10, a11 = sin * scale[:, 0], cos * scale[:, 1]
    t0 = cos * translate[:, 0] - sin * translate[:, 1]
    t1 = sin * translate[:, 0] + cos * translate[:, 1]
    # affine_grid works in (x = column, y = row), each in [-1, 1]: a pixel offset of d is 2d/side
    row_x = torch.stack([a11, a10 * height / width, 2 * t1 / width], dim=1)
    row_y = torch.stack([a01 * width / height, a00, 2 * t0 / height], dim=1)
    return torch.stack([row_x, row_y], dim=1)


def warp(images: torch.Tensor, theta: torch.Tensor, mode: str) -> torch.Tensor:
    """Resample [N,C,H,W] by theta with zero padding, as MONAI's Resample (align_corners False)."""
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)


def adjust_contrast(images: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """MONAI's AdjustContrast per image: ((x - min) / range) ** gamma * range + min."""
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    spread = images.amax(dim=(1, 2, 3), keepdim=True) - low
    return ((images - low) / (spread + CONTRAST_EPSILON)) ** gamma.view(-1, 1, 1, 1) * spread + low


def standardise(images: torch.Tensor, lung_only: bool = False) -> torch.Tensor:
    """MONAI's NormalizeIntensity per image (population std; a flat image divides by 1); lung_only: statistics of
    the non-zero pixels, zeros left at 0 (`transforms.normalize`)."""
    flat = images.flatten(1)
    keep = flat != 0 if lung_only else torch.ones_like(flat, dtype=torch.bool)
    count = keep.sum(dim=1, keepdim=True).clamp(min=1)
    mean = torch.where(keep, flat, 0).sum(dim=1, keepdim=True) / count
    std = (torch.where(keep, flat - mean, 0).square().sum(dim=1, keepdim=True) / count).sqrt()
    std = torch.where(std == 0, torch.ones_like(std), std)
    out = torch.where(keep, (flat - mean) / std, flat)
    return out.view_as(images)


class BatchAugment:
    """`transforms.train_augmentation` + `transforms.normalize` for a batch [N,1,H,W] (and its masks, warped
    alike with nearest neighbours) on the batch's device. Per-image parameters are drawn on the CPU (a few
    numbers per image), the noise on the device."""

    def __init__(self, seed: int, device: torch.device | str, lung_only: bool = False, augment: bool = True):
        self.lung_only, self.augment = lung_only, augment
        self.draws = torch.Generator().manual_seed(seed)
        self.noise = torch.Generator(device=device).manual_seed(seed)
        self.rotate = _per_axis(AFFINE["rotate_range"], axes=1)[0]
        self.scale = _per_axis(AFFINE["scale_range"])

    def _uniform(self, n: int, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=self.draws, dtype=torch.float64)

    def _chosen(self, n: int, prob: float) -> torch.Tensor:
        return torch.rand(n, generator=self.draws, dtype=torch.float64) < prob

    def __call__(self, images: torch.Tensor, masks: torch.Tensor | None = None):
        if self.augment:
            images, masks = self._geometry(images, masks)
            images = self._photometry(images)
        return standardise(images, self.lung_only), masks

    def _geometry(self, images, masks):
        n, _, height, width = images.shape
        chosen = self._chosen(n, AFFINE["prob"])
        rotate = self._uniform(n, -self.rotate, self.rotate)
        scale = torch.stack([1 + self._uniform(n, -r, r) for r in self.scale], dim=1)
        shift = affine_settings(height, width)["translate_range"]  # pixels per axis
        translate = torch.stack([self._uniform(n, -r, r) for r in shift], dim=1)
        picked = chosen.nonzero().flatten()
        if not len(picked):
            return images, masks
        theta = affine_theta(rotate[picked], scale[picked], translate[picked], height, width).to(images.device)
        index = picked.to(images.device)
        images = images.index_copy(0, index, warp(images[index], theta, "bilinear"))
        if masks is not None:
            masks = masks.index_copy(0, index, warp(masks[index], theta, "nearest"))
        return images, masks

    def _photometry(self, images):
        n = images.shape[0]
        device = images.device
        contrast = self._chosen(n, CONTRAST["prob"]).to(device)
        gamma = self._uniform(n, *CONTRAST["gamma"]).to(device, images.dtype)
        images = torch.where(contrast.view(-1, 1, 1, 1), adjust_contrast(images, gamma), images)
        noisy = self._chosen(n, NOISE["prob"]).to(device)
        std = self._uniform(n, 0.0, NOISE["std"]).to(device, images.dtype)  # MONAI samples each image's std
        noise = torch.randn(images.shape, generator=self.noise, device=device, dtype=images.dtype)
        return torch.where(noisy.view(-1, 1, 1, 1), images + noise * std.view(-1, 1, 1, 1), images)


class DeviceBatches:
    """One epoch's shuffled training batches, dicts like the DataLoader's ({"image", "label"?, "mask"?, "id"}),
    cut from tensors already on the device. Re-iterable: each pass shuffles anew."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, masks: torch.Tensor | None,
                 ids: Sequence[str], batch_size: int, augment: BatchAugment, seed: int, drop_last: bool):
        self.images, self.labels, self.masks, self.ids = images, labels, masks, list(ids)
        self.batch_size, self.augment, self.drop_last = batch_size, augment, drop_last
        self.order = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.ids)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.ids), generator=self.order)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            picked = order[start:start + self.batch_size]
            index = picked.to(self.images.device)
            masks = self.masks[index].float() if self.masks is not None else None
            image, masks = self.augment(self.images[index].float(), masks)
            batch = {"image": image, "id": [self.ids[i] for i in picked.tolist()]}
            if self.labels is not None:
                batch["label"] = self.labels[index]
            if masks is not None:
                batch["mask"] = masks
            yield batch
