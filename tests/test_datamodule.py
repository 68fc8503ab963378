"""CXRDataModule: caching, skipping bad files, ROI input, plain-tensor batches."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch

from lightning_modules.data.datamodule import CXRDataModule
from lightning_modules.data.imageio import write_png
from lightning_modules.data.manifest import ManifestError, read_manifest, resolve, write_manifest


def test_classification_batches_are_plain_normalised_tensors(synthetic_root):
    dm = CXRDataModule(synthetic_root, task="classify", image_size=32, batch_size=8)
    dm.setup("fit")
    assert dm.classes == ["normal", "pneumonia"]
    assert dm.num_train_samples == sum(1 for s in ("site-1", "site-2", "site-3")
                                       for r in read_manifest(synthetic_root / s / "manifest.csv") if r.split == "train")
    batch = next(iter(dm.val_dataloader()))
    assert type(batch["image"]) is torch.Tensor  # not a MONAI MetaTensor
    assert batch["image"].shape == (8, 1, 32, 32) and "mask" not in batch
    assert abs(float(batch["image"].mean())) < 0.2  # per-image standardisation
    assert set(batch["label"].tolist()) <= {0, 1}
    assert batch["image"].dtype == torch.float32 and dm.items["val"][0]["image"].dtype == torch.float16


def test_segmentation_batches_carry_aligned_masks(synthetic_root):
    dm = CXRDataModule(synthetic_root, task="segment", image_size=32, batch_size=4, augment=True)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["mask"].shape == (4, 1, 32, 32)
    assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0} and batch["mask"].sum() > 0


def test_one_site_only(synthetic_root):
    dm = CXRDataModule(synthetic_root, task="classify", sites=["site-2"], image_size=32)
    dm.setup("fit")
    assert all("site-2" in it["id"] for it in dm.items["train"])
    with pytest.raises(ManifestError, match="site-9"):
        CXRDataModule(synthetic_root, task="classify", sites=["site-9"], image_size=32).setup("fit")


def test_bad_files_are_skipped_and_logged(synthetic_root, tmp_path, caplog):
    root = tmp_path / "root"
    shutil.copytree(synthetic_root, root)
    site = root / "site-1"
    rows = read_manifest(site / "manifest.csv")
    train = [r for r in rows if r.split == "train"]
    resolve(site, train[0].image).write_bytes(b"")  # zero-byte
    resolve(site, train[1].image).write_text("not an image")  # text named .png
    write_png(resolve(site, train[2].mask), np.ones((10, 10)), mask=True)  # wrong mask size
    train[3].label = "martian"  # unknown label
    write_manifest(site / "manifest.csv", rows)
    n_train = sum(1 for s in ("site-1", "site-2", "site-3")
                  for r in read_manifest(root / s / "manifest.csv") if r.split == "train")

    with caplog.at_level(logging.WARNING, logger="cxrfl.data"):
        dm = CXRDataModule(root, task="classify", image_size=32)
        dm.setup("fit")
    assert dm.num_train_samples == n_train - 3  # the wrong-size mask does not matter for classification
    assert len(dm.skipped) == 3
    joined = "\n".join(dm.skipped)
    assert "zero-byte" in joined and "not an image" in joined and "unknown label 'martian'" in joined
    assert str(resolve(site, train[0].image)) in caplog.text

    seg = CXRDataModule(root, task="segment", image_size=32)
    seg.setup("fit")
    assert any("mask size" in s and str(resolve(site, train[2].mask)) in s for s in seg.skipped)


def test_roi_mask_zeroes_background_and_crop_fills_frame(synthetic_root):
    full = CXRDataModule(synthetic_root, task="classify", image_size=48, limit=6)
    masked = CXRDataModule(synthetic_root, task="classify", image_size=48, roi="mask", limit=6)
    crop = CXRDataModule(synthetic_root, task="classify", image_size=48, roi="crop", limit=6)
    seg = CXRDataModule(synthetic_root, task="segment", image_size=48, limit=6)
    for dm in (full, masked, crop, seg):
        dm.setup("validate")
    for f, m, c, s in zip(full.items["val"], masked.items["val"], crop.items["val"], seg.items["val"]):
        lung = s["mask"] > 0.5
        assert torch.all(m["image"][~lung] == 0)
        assert torch.equal(m["image"][lung], f["image"][lung])
        assert c["image"].shape == f["image"].shape and not torch.equal(c["image"], f["image"])
        assert "roi_mask" not in m and "mask" not in m


def test_roi_from_a_mask_predictor(synthetic_root):
    calls = []

    def left_half(images):
        calls.append(images.shape)
        masks = torch.zeros_like(images)
        masks[..., : images.shape[-1] // 2] = 1
        return masks

    dm = CXRDataModule(synthetic_root, task="classify", image_size=32, roi="mask", mask_predictor=left_half, limit=5)
    dm.setup("validate")
    assert calls and calls[0][1:] == (1, 32, 32)
    for it in dm.items["val"]:
        assert torch.all(it["image"][..., 16:] == 0)


def test_roi_is_classification_only(synthetic_root):
    with pytest.raises(ValueError, match="classification"):
        CXRDataModule(synthetic_root, task="segment", roi="mask")
