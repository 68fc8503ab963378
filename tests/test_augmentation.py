"""The training augmentation moves and scales images by the amounts it claims, in both its forms: MONAI's
per-image dictionary transforms and the batched one the GPU path uses. Measured on the lung mask (nearest
neighbour, no photometric jitter), a centred disk: rotation leaves it alone, so its centre shows the shift
and its extent along each axis shows that axis's scale."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.data.gpu_batches import BatchAugment
from lightning_modules.data.transforms import AFFINE, TRANSLATE_FRACTION, train_augmentation

SIZE, DRAWS = 96, 300


def _disk() -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
    return (((rows - SIZE / 2) ** 2 + (cols - SIZE / 2) ** 2) <= (SIZE / 4) ** 2).float()[None]


def _monai_masks() -> torch.Tensor:
    augment = train_augmentation(with_mask=True, seed=0, image_size=SIZE)
    item = {"image": torch.rand(1, SIZE, SIZE), "mask": _disk()}
    return torch.stack([torch.as_tensor(augment(dict(item))["mask"]) for _ in range(DRAWS)])


def _batched_masks() -> torch.Tensor:
    masks = _disk()[None].expand(DRAWS, 1, SIZE, SIZE).contiguous()
    return BatchAugment(0, "cpu")(torch.rand(DRAWS, 1, SIZE, SIZE), masks)[1]


@pytest.mark.parametrize("augmented", [_monai_masks, _batched_masks], ids=["monai", "batched"])
def test_the_augmentation_shifts_by_a_fraction_of_the_side_and_scales_both_axes(augmented):
    masks = augmented()[:, 0]
    area = masks.sum(dim=(1, 2))
    assert bool((area > 0).all())
    coords = torch.arange(SIZE) + 0.5
    centre = torch.stack([(masks.sum(2) * coords).sum(1) / area, (masks.sum(1) * coords).sum(1) / area], 1)
    shift = centre - SIZE / 2
    extent = torch.stack([masks.amax(2).sum(1), masks.amax(1).sum(1)], 1)  # rows, columns covered
    warped = (shift.abs().amax(1) > 0.5) | (extent != SIZE / 2).any(1)
    assert 0.6 < warped.float().mean() < 0.8  # AFFINE's prob 0.7

    reach = TRANSLATE_FRACTION * SIZE  # 3.84 px
    for axis in (0, 1):
        assert shift[:, axis].abs().max() <= reach + 1  # + nearest-neighbour rounding
        assert shift[:, axis].abs().max() > 0.75 * reach  # a real shift, not a fraction of a pixel
        spread = extent[warped, axis].float()
        scale = AFFINE["scale_range"][axis]
        assert spread.min() < SIZE / 2 * (1 - scale / 2) and spread.max() > SIZE / 2 * (1 + scale / 2)
