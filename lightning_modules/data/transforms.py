"""MONAI dictionary transforms: a deterministic part (cached once) and a random part (every epoch)."""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    NormalizeIntensity,
    NormalizeIntensityd,
    RandAdjustContrastd,
    RandAffined,
    RandGaussianNoised,
    Resized,
)

ROI_MODES = ("mask", "crop")


class ApplyLungROId(MapTransform):
    """Restrict the image to the lung region: zero the background ('mask', as CXR-FL did) or
    crop to the lungs' bounding box and resize back ('crop'). Written here because MONAI's
    CropForegroundd would change the output size and MaskIntensityd has no threshold."""

    def __init__(self, image_key="image", mask_key="roi_mask", mode="mask", threshold=0.5, margin=0.05):
        super().__init__([image_key])
        if mode not in ROI_MODES:
            raise ValueError(f"roi mode must be one of {ROI_MODES}, got {mode!r}")
        self.image_key, self.mask_key, self.mode = image_key, mask_key, mode
        self.threshold, self.margin = threshold, margin

    def __call__(self, data):
        d = dict(data)
        image = torch.as_tensor(d[self.image_key])
        lung = torch.as_tensor(d[self.mask_key]) > self.threshold
        if not bool(lung.any()):
            return d  # no lungs found: leave the image whole rather than feed a blank
        if self.mode == "mask":
            d[self.image_key] = image * lung.to(image.dtype)
            return d
        _, h, w = image.shape
        rows = torch.where(lung.any(dim=-1)[0])[0]
        cols = torch.where(lung.any(dim=-2)[0])[0]
        mr, mc = int(self.margin * h), int(self.margin * w)
        r0, r1 = max(int(rows[0]) - mr, 0), min(int(rows[-1]) + mr + 1, h)
        c0, c1 = max(int(cols[0]) - mc, 0), min(int(cols[-1]) + mc + 1, w)
        crop = image[:, r0:r1, c0:c1]
        d[self.image_key] = torch.nn.functional.interpolate(crop[None], size=(h, w), mode="bilinear",
                                                            align_corners=False)[0]
        return d


def lung_roi(images: torch.Tensor, masks: torch.Tensor, mode: str, threshold: float) -> torch.Tensor:
    """ApplyLungROId over a batch [N,1,H,W] with lung masks or probabilities [N,1,H,W]: the one
    ROI step that training, validation, testing and `cxrfl predict` share."""
    apply = ApplyLungROId(mode=mode, threshold=threshold)
    return torch.stack([apply({"image": im, "roi_mask": m})["image"] for im, m in zip(images, masks)])


def deterministic_transforms(image_size: int, with_mask: bool) -> Compose:
    """Resize image (area) and lung mask (nearest) to a square; run once per item and cached."""
    keys = ["image", "mask"] if with_mask else ["image"]
    modes = ["area", "nearest"] if with_mask else ["area"]
    return Compose([
        EnsureTyped(keys=keys, data_type="tensor", dtype=torch.float32, track_meta=False),
        Resized(keys=keys, spatial_size=(image_size, image_size), mode=modes),
    ])


# The training augmentation's settings; lightning_modules/data/gpu_batches.py applies the same ones a batch at a
# time on the GPU. MONAI reads a single-number scale range as the first image axis only and its translation
# range in pixels, so scale is given per axis and translation as a fraction of each side (`affine_settings`).
AFFINE = {"prob": 0.7, "rotate_range": float(np.deg2rad(8)), "scale_range": (0.08, 0.08)}
TRANSLATE_FRACTION = 0.04
CONTRAST = {"prob": 0.3, "gamma": (0.8, 1.25)}
NOISE = {"prob": 0.2, "std": 0.015}


def affine_settings(height: int, width: int) -> dict:
    """RandAffine's settings for an image of this size: up to ±8° rotation, ±8 % scale per axis and
    a shift of up to 4 % of each side."""
    return {**AFFINE, "translate_range": (TRANSLATE_FRACTION * height, TRANSLATE_FRACTION * width)}


def train_augmentation(with_mask: bool, seed: int, image_size: int) -> Compose:
    """Mild geometric and photometric jitter, the variation real sites show."""
    keys = ["image", "mask"] if with_mask else ["image"]
    modes = ["bilinear", "nearest"] if with_mask else ["bilinear"]
    t = Compose([
        RandAffined(keys=keys, **affine_settings(image_size, image_size), mode=modes, padding_mode="zeros"),
        RandAdjustContrastd(keys="image", **CONTRAST),
        RandGaussianNoised(keys="image", **NOISE),
    ])
    t.set_random_state(seed=seed)
    return t


def normalize(lung_only: bool = False) -> NormalizeIntensityd:
    """Per-image standardisation: removes most site exposure/contrast offsets. `lung_only` (ROI
    'mask' input): statistics of the non-zero (lung) pixels only and the background left at 0;
    standardising the whole masked frame would write the lungs' mean brightness into the constant
    background, a shortcut that lets a model classify from outside the lungs."""
    return NormalizeIntensityd(keys="image", nonzero=lung_only)


def normalize_image(lung_only: bool = False) -> NormalizeIntensity:
    """The same standardisation on a bare [C,H,W] image (inference paths)."""
    return NormalizeIntensity(nonzero=lung_only)


def model_inputs(images: list, image_size: int, roi: str | None = None, roi_threshold: float = 0.5,
                 mask_predictor=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """New images (2-D arrays in [0,1], any size) prepared exactly as CXRDataModule prepares its
    validation and test images: resize, lung ROI from the predicted masks, float16 cache
    rounding, per-image standardisation. Returns (model input, resized image, lung masks or None),
    each [N,1,S,S]."""
    prepare = deterministic_transforms(image_size, with_mask=False)
    resized = torch.stack([prepare({"image": np.asarray(im, dtype=np.float32)[None]})["image"] for im in images])
    masks = None
    if mask_predictor is not None:
        with torch.no_grad():
            masks = mask_predictor(resized)
    roi_input = lung_roi(resized, masks, roi, roi_threshold) if roi else resized
    cached = roi_input.half().float()  # the data module caches images in float16
    standardise = normalize_image(lung_only=roi == "mask")
    x = torch.stack([torch.as_tensor(standardise(im)) for im in cached])
    return x.as_subclass(torch.Tensor), resized.as_subclass(torch.Tensor), masks
