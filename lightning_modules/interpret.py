"""Grad-CAM / Grad-CAM++ heat maps for the classifiers (MONAI's `monai.visualize`) and a
radiologist-free interpretability score: the share of the heat map's mass inside a region
(the lungs; on synthetic data also the known opacities)."""

from __future__ import annotations

import numpy as np
import torch
from monai.visualize import GradCAM, GradCAMpp

from lightning_modules.networks import CAM_LAYERS

CAM_METHODS = {"gradcam": GradCAM, "gradcam++": GradCAMpp}


def heat_maps(module, images: torch.Tensor, class_index: int | None = None, method: str = "gradcam") -> torch.Tensor:
    """Heat maps [N,H,W] in [0,1] (image size) of `module` (a CXRClassifier) for standardised
    images [N,1,H,W]; class_index None: each image's predicted class."""
    if method not in CAM_METHODS:
        raise ValueError(f"method must be one of {', '.join(CAM_METHODS)}")
    arch = module.hparams.get("model")
    if arch not in CAM_LAYERS:
        raise ValueError(f"no Grad-CAM layer known for model {arch!r}")
    net = module.net.eval()
    cam = CAM_METHODS[method](nn_module=net, target_layers=CAM_LAYERS[arch])
    x = images.to(next(net.parameters()).device).float()
    # Gradients are needed from the output down to the target layer only: freeze the weights and
    # let the graph start at the target layer's input (no backward through the rest: ~3x faster).
    params = list(net.parameters())
    trainable = [p.requires_grad for p in params]
    layer = dict(net.named_modules())[CAM_LAYERS[arch]]
    start_graph = layer.register_forward_pre_hook(
        lambda _m, inputs: (inputs[0].detach().requires_grad_(True).clone(), *inputs[1:]))
    try:
        for p in params:
            p.requires_grad_(False)
        with torch.enable_grad():
            if method == "gradcam":
                maps = cam(x, class_idx=class_index)  # [N,1,H,W], min-max normalised per image
            else:  # MONAI's GradCAMpp broadcasts its score wrongly for batches > 1: one image at a time
                maps = torch.cat([cam(x[i:i + 1], class_idx=class_index) for i in range(len(x))])
    finally:
        start_graph.remove()
        for p, flag in zip(params, trainable):
            p.requires_grad_(flag)
    return maps[:, 0].detach().cpu().clamp(0, 1)


def mass_inside(maps: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """Share of each heat map's (non-negative) mass inside its region mask: [N] in [0,1]
    (NaN for an all-zero map)."""
    maps = torch.as_tensor(maps).float().clamp(min=0)
    regions = (torch.as_tensor(regions).float() > 0.5).float().reshape(maps.shape)
    total = maps.flatten(1).sum(1)
    inside = (maps * regions).flatten(1).sum(1)
    return torch.where(total > 0, inside / total.clamp(min=1e-12), torch.full_like(total, float("nan")))


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB uint8 of a grayscale image [H,W] (any range) with a jet-coloured heat map [H,W] in [0,1]."""
    from matplotlib import colormaps

    img = np.asarray(image, dtype=np.float32)
    span = float(img.max() - img.min())
    img = (img - img.min()) / span if span > 0 else np.zeros_like(img)
    heat_rgb = colormaps["jet"](np.clip(heat, 0, 1))[..., :3]
    rgb = (1 - alpha) * np.repeat(img[..., None], 3, axis=2) + alpha * heat_rgb
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)
