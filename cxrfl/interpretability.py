"""Where do the classifiers look? Grad-CAM and occlusion sensitivity on the held-out test set,
scored without a radiologist: the share of each positive image's heat-map mass inside the
ground-truth lungs (and, where the data has them, e.g. the synthetic phantom, inside the opacities). Also the figures the report shows:
a Grad-CAM grid of the models side by side and segmentation overlays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure  # no pyplot: no global backend, nothing to close

from cxrfl.models import Classifier, load_classifier, load_segmenter
from cxrfl.run_folder import RunFolder
from lightning_modules.attribution_checks import mean_interval, rounded
from lightning_modules.data.imageio import read_image, read_mask
from lightning_modules.data.atomic import write_json
from lightning_modules.data.manifest import load_split, resolve
from lightning_modules.data.transforms import deterministic_transforms, lung_roi, model_inputs
from lightning_modules.interpret import heat_maps, mass_inside, occlusion_maps, overlay

FIGURES = "figures"


def _test_set(data_root: Path, limit: int | None, split: str = "test") -> list[dict]:
    """Images of a split with their lung (and opacity) masks; rows without a lung mask are left out."""
    items = []
    for folder, record in load_split(data_root, split, None):
        if not record.mask:
            continue
        item = {"id": str(resolve(folder, record.image)), "label": record.label,
                "image": read_image(resolve(folder, record.image)), "lung": read_mask(resolve(folder, record.mask))}
        if record.opacity:
            item["opacity"] = read_mask(resolve(folder, record.opacity))
        items.append(item)
        if limit and len(items) >= limit:
            break
    if not items:
        raise ValueError(f"{data_root}: no {split} images with lung masks")
    return items


def _resized(regions: list[np.ndarray], size: int) -> torch.Tensor:
    prepare = deterministic_transforms(size, with_mask=False)
    return torch.stack([prepare({"image": r.astype(np.float32)[None]})["image"] for r in regions]).as_subclass(
        torch.Tensor)


def _in_model_frame(clf: Classifier, regions: list[np.ndarray], masks: torch.Tensor | None) -> torch.Tensor:
    """Ground-truth regions resized to the model input and, for a cropping ROI model, cropped the
    way its input was, so they line up with its heat maps."""
    frame = _resized(regions, clf.image_size)
    if clf.roi == "crop":
        frame = lung_roi(frame, masks, "crop", clf.roi_threshold)
    return (frame > 0.5).float()[:, 0]


def _nanmean(values: torch.Tensor) -> float | None:
    values = values[~torch.isnan(values)]
    return round(float(values.mean()), 4) if len(values) else None


def lung_ratio(in_lung: torch.Tensor, lung: torch.Tensor) -> dict:
    """The maps' in-lung mass share over the lungs' area share (1 = a uniform map), mean and
    bootstrap 95 % interval over images: is a model looking at the lungs more than chance?"""
    mean, low, high = mean_interval((in_lung / lung.flatten(1).mean(1).clamp(min=1e-6)).numpy())
    return {"ratio": rounded(mean, 3), "ci95": [rounded(low, 3), rounded(high, 3)]}


def score_models(models: dict[str, Path], data_root: Path, out: Path, cam: str = "gradcam", limit: int | None = 200,
                 show: int = 4, occlusion_limit: int = 16) -> dict:
    """interpretability.json and figures/gradcam_grid.png + gradient_grid.png for `models` (name ->
    run folder): Grad-CAM and gradient-saliency scores on every positive test image.
    Each row also scores MONAI's occlusion sensitivity, the second method, on the first
    occlusion_limit positive images (it runs the model once per patch: ~64 times per image)."""
    items = _test_set(Path(data_root), limit)
    results, grid, gradient_grid = {}, {}, {}
    for name, run in models.items():
        clf = load_classifier(run)
        positive = clf.classes[-1]  # binary: the disease; multi-class: the last class
        chosen = [it for it in items if it["label"] == positive]
        if not chosen:
            raise ValueError(f"{data_root}/test: no {positive!r} images with lung masks")
        x, _, masks = model_inputs([it["image"] for it in chosen], clf.image_size, clf.roi, clf.roi_threshold,
                                   clf.mask_predictor())

        def maps_of(method: str) -> torch.Tensor:
            return torch.cat([heat_maps(clf.module, x[i:i + 32], class_index=len(clf.classes) - 1, method=method)
                              for i in range(0, len(x), 32)])

        lung = _in_model_frame(clf, [it["lung"] for it in chosen], masks)
        with_opacity = [i for i, it in enumerate(chosen) if "opacity" in it]
        opacity = _in_model_frame(clf, [chosen[i]["opacity"] for i in with_opacity],
                                  masks[with_opacity] if masks is not None else None) if with_opacity else None
        maps = maps_of(cam)
        cam_scores, in_lung = _region_scores("", maps, lung, with_opacity, opacity)
        row = {"roi": clf.roi, "roi_threshold": clf.roi_threshold if clf.roi else None, "cam": cam,
               "images": len(chosen),
               "maps_with_mass": int((~torch.isnan(in_lung)).sum()),  # an all-zero map has no share: skipped
               **cam_scores,
               "lung_area_share": round(float(lung.mean()), 4)}  # what a uniform map would score
        # gradient saliency: the method that passes the attribution sanity checks (docs/results.md)
        saliency = maps_of("gradient")
        row.update(_region_scores("gradient_", saliency, lung, with_opacity, opacity)[0])
        if occlusion_limit > 0:  # on the first images only: it runs the model once per patch
            first = [k for k, i in enumerate(with_opacity) if i < occlusion_limit]
            occluded = occlusion_maps(clf.module.net, x[:occlusion_limit], class_index=len(clf.classes) - 1)
            row["occlusion_images"] = len(occluded)
            row.update(_region_scores("occlusion_", occluded, lung[:occlusion_limit], [with_opacity[k] for k in first],
                                      opacity[first] if first else None)[0])
        metrics = RunFolder.read(run).metrics() if RunFolder.is_run(run) else None
        if metrics:
            row["test_auroc"] = metrics.get("test", {}).get("test_auroc")
        results[name] = row
        grid[name] = [(x[i, 0].numpy(), maps[i].numpy()) for i in range(min(show, len(x)))]
        gradient_grid[name] = [(x[i, 0].numpy(), saliency[i].numpy()) for i in range(min(show, len(x)))]
    out = Path(out)
    write_json(out / "interpretability.json", results)
    _grid_figure(grid, out / FIGURES / "gradcam_grid.png", cam)
    _grid_figure(gradient_grid, out / FIGURES / "gradient_grid.png", "gradient")
    return results


def _region_scores(prefix: str, maps: torch.Tensor, lung: torch.Tensor, with_opacity: list[int],
                   opacity: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
    """One method's scores (keys prefixed): the maps' in-lung mass share, that share over a uniform
    map's, and the in-opacity share of the images in `with_opacity`; and the per-image in-lung shares."""
    in_lung = mass_inside(maps, lung)
    scores = {f"{prefix}in_lung_share": _nanmean(in_lung), f"{prefix}in_lung_ratio": lung_ratio(in_lung, lung)}
    if with_opacity:
        scores[f"{prefix}in_opacity_share"] = _nanmean(mass_inside(maps[with_opacity], opacity))
    return scores, in_lung


def _grid_figure(grid: dict, path: Path, cam: str) -> None:
    names = list(grid)
    rows = max(len(v) for v in grid.values())
    fig = Figure(figsize=(2.4 * len(names), 2.4 * rows))
    axes = fig.subplots(rows, len(names), squeeze=False)
    for c, name in enumerate(names):
        for r in range(rows):
            ax = axes[r][c]
            ax.axis("off")
            if r < len(grid[name]):
                image, heat = grid[name][r]
                ax.imshow(overlay(image, heat))
            if r == 0:
                ax.set_title(name, fontsize=8)
    fig.suptitle(f"{cam} on positive test images (each model's own input)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def segmentation_overlays(segmenter_run: Path, data_root: Path, out: Path, show: int = 6) -> Path:
    """figures/segmentation_overlays.png: predicted lung contour (red) and ground truth (green) on
    the sites' validation images."""
    seg = load_segmenter(segmenter_run)
    items = _test_set(Path(data_root), show, split="val")
    _, resized, _ = model_inputs([it["image"] for it in items], seg.image_size)
    predicted = seg.module.predict_masks(resized)[:, 0].numpy()
    truth = _resized([it["lung"] for it in items], seg.image_size)[:, 0].numpy()
    fig = Figure(figsize=(2.4 * len(items), 2.6))
    axes = fig.subplots(1, len(items), squeeze=False)
    for ax, image, pred, gt in zip(axes[0], resized[:, 0].numpy(), predicted, truth):
        ax.imshow(image, cmap="gray")
        ax.contour(gt, levels=[0.5], colors="lime", linewidths=0.8)
        ax.contour(pred, levels=[0.5], colors="red", linewidths=0.8)
        ax.axis("off")
    fig.suptitle("lung segmentation on validation images: prediction (red), ground truth (green)", fontsize=10)
    fig.tight_layout()
    path = Path(out) / FIGURES / "segmentation_overlays.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path
