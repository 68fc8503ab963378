"""Trained models on new images: the same lung-ROI input in training and `cxrfl predict`, Grad-CAM
maps and the in-lung share, model loading from run folders and exported files, and `predict` on a
folder mixing every supported kind of image with broken files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from conftest import write_dicom
from PIL import Image

from cxrfl.cli import main
from cxrfl.models import ModelLoadError, load_classifier, load_segmenter
from lightning_modules.data.datamodule import CXRDataModule
from lightning_modules.data.imageio import read_image
from lightning_modules.data.transforms import model_inputs
from lightning_modules.interpret import heat_maps, mass_inside, overlay


@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory):
    """A central segmentation run and a lung-ROI (mask) classifier trained on its predicted masks."""
    base = tmp_path_factory.mktemp("predict-runs")
    common = ["--data", str(synthetic_root), "--image-size", "48", "--batch-size", "16"]
    assert main(["central", "--task", "segment", "--epochs", "5", "--lr", "3e-3", "--out", str(base / "seg")]
                + common) == 0
    assert main(["central", "--task", "classify", "--model", "cnn5", "--epochs", "1", "--roi", "mask",
                 "--roi-threshold", "0.5", "--segmenter", str(base / "seg" / "checkpoints" / "best.ckpt"),
                 "--out", str(base / "roi")] + common) == 0
    return base


@pytest.mark.parametrize("mode", ["mask", "crop"])
def test_roi_input_is_identical_in_training_and_predict(trained, synthetic_root, mode):
    segmenter = load_segmenter(trained / "seg").module
    predictor = segmenter.mask_predictor(0.5)
    dm = CXRDataModule(synthetic_root, task="classify", sites=["site-1"], image_size=48, batch_size=4,
                       roi=mode, roi_threshold=0.5, mask_predictor=predictor)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    x, _, masks = model_inputs([read_image(f) for f in batch["id"]], 48, mode, 0.5, predictor)
    assert masks is not None and masks.shape == (len(batch["id"]), 1, 48, 48)
    assert 0.05 < float(masks.mean()) < 0.8  # real lung masks, not all or nothing
    torch.testing.assert_close(x, batch["image"], atol=1e-5, rtol=0)
    if mode == "mask":  # the background really is gone: one value outside the lungs in each image
        for image, mask in zip(x, masks):
            outside = image[mask < 0.5]
            assert outside.numel() > 0 and float(outside.max() - outside.min()) < 1e-5


def test_heat_maps_have_image_size_for_both_methods(trained):
    clf = load_classifier(trained / "roi")
    x = torch.randn(3, 1, 48, 48)
    for method in ("gradcam", "gradcam++"):
        maps = heat_maps(clf.module, x, class_index=1, method=method)
        assert maps.shape == (3, 48, 48) and float(maps.min()) >= 0 and float(maps.max()) <= 1
    assert all(p.requires_grad for p in clf.module.parameters())  # left trainable as it was
    with pytest.raises(ValueError, match="method"):
        heat_maps(clf.module, x, method="saliency")


def test_in_lung_share_on_a_constructed_case():
    maps = torch.zeros(3, 4, 4)
    maps[0, :, :2] = 1.0  # all mass in the left half
    maps[1] = 1.0  # uniform: the share is the region's area
    maps[2, 0, 0], maps[2, 3, 3] = 3.0, 1.0  # 3 parts inside, 1 outside
    regions = torch.zeros(3, 4, 4)
    regions[0, :, :2] = 1
    regions[1, :2, :] = 1  # a quarter... of 16 pixels: 8 = half
    regions[2, 0, 0] = 1
    np.testing.assert_allclose(mass_inside(maps, regions).numpy(), [1.0, 0.5, 0.75])
    assert torch.isnan(mass_inside(torch.zeros(1, 4, 4), regions[:1]))[0]
    rgb = overlay(np.random.rand(4, 4), maps[0].numpy())
    assert rgb.shape == (4, 4, 3) and rgb.dtype == np.uint8


def test_lung_ratio_is_one_for_uniform_maps_and_carries_an_interval():
    from cxrfl.interpretability import lung_ratio

    lungs = torch.zeros(6, 8, 8)
    lungs[:, 2:6, 1:7] = 1  # a quarter... 24 of 64 pixels
    uniform = lung_ratio(mass_inside(torch.ones(6, 8, 8), lungs), lungs)
    assert uniform["ratio"] == pytest.approx(1.0) and uniform["ci95"] == [pytest.approx(1.0)] * 2
    inside = lung_ratio(mass_inside(lungs + 0.1 * torch.rand(6, 8, 8), lungs), lungs)
    assert inside["ratio"] > 2 and inside["ci95"][0] <= inside["ratio"] <= inside["ci95"][1]


def test_models_load_from_run_folder_weights_file_and_exported_file(trained, tmp_path, capsys):
    from_run = load_classifier(trained / "roi")
    assert from_run.roi == "mask" and from_run.roi_threshold == 0.5 and from_run.image_size == 48
    assert from_run.segmenter is not None and from_run.classes == ["normal", "pneumonia"]
    bundle = tmp_path / "roi-model.pt"
    assert main(["export-model", str(trained / "roi"), "--out", str(bundle)]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["roi"] == "mask" and info["segmenter"] == "embedded" and info["image_size"] == 48
    from_file = load_classifier(bundle)
    from_ckpt = load_classifier(trained / "roi" / "checkpoints" / "best.ckpt")
    image = [np.random.default_rng(0).random((60, 50)).astype(np.float32)]
    outputs = []
    for clf in (from_run, from_file, from_ckpt):
        x, _, _ = model_inputs(image, clf.image_size, clf.roi, clf.roi_threshold, clf.mask_predictor())
        with torch.no_grad():
            outputs.append(clf.module(x))
    torch.testing.assert_close(outputs[0], outputs[1])
    torch.testing.assert_close(outputs[0], outputs[2])
    # a bare weights file knows nothing of its preprocessing: refused, not guessed
    bare = tmp_path / "bare" / "weights.pt"
    bare.parent.mkdir()
    torch.save({"model": from_run.module.state_dict()}, bare)
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_classifier(bare)
    with pytest.raises(ModelLoadError, match="not a classification run"):
        load_classifier(trained / "seg")
    seg_file = tmp_path / "seg-model.pt"
    assert main(["export-model", str(trained / "seg"), "--out", str(seg_file)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["task"] == "segment"
    exported, original = load_segmenter(seg_file), load_segmenter(trained / "seg")
    probe = torch.rand(2, 1, 48, 48)
    torch.testing.assert_close(exported.module.predict_masks(probe), original.module.predict_masks(probe))
    with pytest.raises(ModelLoadError, match="not a segmenter"):
        load_segmenter(bundle)


def test_an_exported_bundle_predicts_as_its_run_folder_and_monai_reads_it(trained, tmp_path):
    """export-model -> predict through the bundle gives the run folder's predictions, masks and
    heat maps; MONAI's bundle tools read its metadata (ConfigParser) and load its weights into the
    bare networks (monai.bundle.load, weights_only=True)."""
    from monai.bundle import ConfigParser
    from monai.bundle import load as monai_load

    from lightning_modules.networks import build_classifier, build_segmenter

    bundle = tmp_path / "roi-bundle"
    assert main(["export-model", str(trained / "roi"), "--out", str(bundle)]) == 0
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(3)
    for i in range(3):
        Image.fromarray((rng.random((70, 60)) * 255).astype(np.uint8)).save(images / f"{i}.png")
    rows = {}
    for name, model in [("run", trained / "roi"), ("bundle", bundle)]:
        assert main(["predict", str(images), "--classifier", str(model), "--out", str(tmp_path / name)]) == 0
        with open(tmp_path / name / "predictions.csv") as f:
            rows[name] = list(csv.DictReader(f))
    assert len(rows["run"]) == 3 and rows["run"] == rows["bundle"]
    for row in rows["run"]:
        for png in (row["mask_png"], row["gradcam_png"]):
            assert (tmp_path / "run" / png).read_bytes() == (tmp_path / "bundle" / png).read_bytes()

    clf = load_classifier(trained / "roi")
    parser = ConfigParser()
    parser.read_meta(bundle / "configs" / "metadata.json")
    assert parser["_meta_#cxrfl#classes"] == clf.classes == ["normal", "pneumonia"]
    assert parser["_meta_#network_data_format#outputs#pred#channel_def"] == {"0": "normal", "1": "pneumonia"}
    assert parser["_meta_#network_data_format#inputs#image#spatial_shape"] == [48, 48]
    net = monai_load(bundle.name, bundle_dir=tmp_path, model=build_classifier(clf.module.hparams.model, 2),
                     device="cpu").eval()
    seg_net = monai_load(bundle.name, bundle_dir=tmp_path, model_file="models/segmenter.pt", device="cpu",
                         model=build_segmenter(clf.segmenter.module.hparams.arch)).eval()
    x = torch.randn(2, 1, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(net(x), clf.module.net(x))
        torch.testing.assert_close(seg_net(x), clf.segmenter.module.net(x))


def _corpus(folder):
    """Valid images of every supported kind, and broken files."""
    rng = np.random.default_rng(1)
    base = (rng.random((90, 110)) * 200 + 30).astype(np.uint8)
    Image.fromarray(base).save(folder / "gray8.png")
    Image.fromarray(base.astype(np.uint16) * 250).save(folder / "gray16.png")
    Image.fromarray(np.stack([base] * 3, -1)).save(folder / "rgb.jpg", quality=90)
    Image.fromarray(np.dstack([base] * 3 + [np.full_like(base, 255)])).save(folder / "rgba.png")
    Image.fromarray(np.asarray(Image.fromarray(base).resize((1400, 1200)))).save(folder / "large.png")
    nested = folder / "dicom"
    nested.mkdir()
    write_dicom(nested / "mono2.dcm", base.astype(np.uint16) * 16)
    write_dicom(nested / "mono1.dcm", (4095 - base.astype(np.uint16) * 16), photometric="MONOCHROME1")
    valid = {"gray8.png", "gray16.png", "rgb.jpg", "rgba.png", "large.png", "mono2.dcm", "mono1.dcm"}
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    good = (folder / "gray8.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    write_dicom(nested / "nopixels.dcm", base.astype(np.uint16))
    import pydicom

    ds = pydicom.dcmread(nested / "nopixels.dcm")
    del ds.PixelData
    ds.save_as(nested / "nopixels.dcm")
    broken = {"empty.png", "text.png", "truncated.png", "nopixels.dcm"}
    return valid, broken


def test_predict_writes_a_row_per_file_and_keeps_going_past_broken_ones(trained, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    valid, broken = _corpus(inputs)
    out = tmp_path / "out"
    rc = main(["predict", str(inputs), "--classifier", str(trained / "roi"), "--out", str(out), "--batch-size", "3",
               "--cam", "gradcam++"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["images"] == len(valid) and summary["errors"] == len(broken)
    with open(out / "predictions.csv") as f:
        rows = {r["file"].rsplit("/", 1)[-1]: r for r in csv.DictReader(f)}
    assert set(rows) == valid | broken
    for name in valid:
        row = rows[name]
        assert row["status"] == "ok" and row["predicted"] in ("normal", "pneumonia")
        assert float(row["p_normal"]) + float(row["p_pneumonia"]) == pytest.approx(1.0, abs=1e-4)
        assert row["cam_in_lung"] == "" or 0.0 <= float(row["cam_in_lung"]) <= 1.0  # empty: all-zero map
        source = read_image(next(inputs.rglob(name)))
        for png in (row["mask_png"], row["gradcam_png"]):
            with Image.open(out / png) as img:
                assert img.size == (source.shape[1], source.shape[0])  # full resolution
    for name in broken:
        assert rows[name]["status"] == "error" and rows[name]["error"], name
        assert "\n" not in rows[name]["error"]


def test_predict_refuses_a_missing_model_or_no_images(trained, tmp_path, capsys):
    assert main(["predict", str(tmp_path), "--classifier", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(tmp_path / "empty"), "--classifier", str(trained / "roi"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "no image files" in capsys.readouterr().err


def test_heat_map_scores_compare_regions_in_each_models_own_frame(trained, synthetic_root, tmp_path):
    """A cropping ROI model sees the lungs fill its frame: the ground truth is cropped the same way
    before its heat maps are scored; interpretability.json and the grid figure are written."""
    import dataclasses

    from cxrfl.interpretability import _in_model_frame, score_models

    masked = load_classifier(trained / "roi")
    cropped = dataclasses.replace(masked, roi="crop")
    from lightning_modules.data.manifest import load_split, resolve

    rows = [(f, r) for f, r in load_split(synthetic_root, "test", None)][:6]
    images = [read_image(resolve(f, r.image)) for f, r in rows]
    lungs = [read_image(resolve(f, r.mask)) > 0 for f, r in rows]
    _, _, masks = model_inputs(images, 48, "crop", 0.5, cropped.mask_predictor())
    in_mask_frame = _in_model_frame(masked, lungs, masks)
    in_crop_frame = _in_model_frame(cropped, lungs, masks)
    assert in_crop_frame.mean() > 1.3 * in_mask_frame.mean()
    results = score_models({"roi": trained / "roi"}, synthetic_root, tmp_path, limit=20, show=2)
    row = results["roi"]
    assert row["roi"] == "mask" and 0 <= row["in_lung_share"] <= 1 and row["images"] > 0
    assert json.loads((tmp_path / "interpretability.json").read_text()) == results
    assert (tmp_path / "figures" / "gradcam_grid.png").stat().st_size > 0
