"""Grad-CAM / Grad-CAM++, gradient saliency and occlusion-sensitivity heat maps for the
classifiers (MONAI's `monai.visualize`) and a radiologist-free interpretability score: the share of the heat map's
mass inside a region (the lungs; on synthetic data also the known opacities)."""

from __future__ import annotations

import numpy as np
import torch
from matplotlib import colormaps
from monai.visualize import GradCAM, GradCAMpp, OcclusionSensitivity

from lightning_modules.networks import CAM_LAYERS

# Occlusion patch side as a share of the image side: about an opacity's radius on the phantom.
OCCLUSION_MASK_FRACTION = 0.125

CAM_METHODS = {"gradcam": GradCAM, "gradcam++": GradCAMpp}
# "gradient": |d class score / d pixel| (Simonyan et al. 2014), the one method that passes both
# attribution sanity checks on our data (docs/results.md)
METHODS = (*CAM_METHODS, "gradient", "occlusion")


def heat_maps(module, images: torch.Tensor, class_index: int | None = None, method: str = "gradcam") -> torch.Tensor:
    """Heat maps [N,H,W] in [0,1] (image size) of `module` (a CXRClassifier) for standardised
    images [N,1,H,W]; class_index None: each image's predicted class."""
    return network_heat_maps(module.net, module.hparams.get("model"), images, class_index, method)


def network_heat_maps(net: torch.nn.Module, arch: str, images: torch.Tensor, class_index: int | None = None,
                      method: str = "gradcam") -> torch.Tensor:
    """heat_maps for a bare network `net` built as `arch` (see networks.CAM_LAYERS)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}")
    if method == "occlusion":
        return occlusion_maps(net, images, class_index)
    if method == "gradient":
        return gradient_maps(net, images, class_index)
    if arch not in CAM_LAYERS:
        raise ValueError(f"no Grad-CAM layer known for model {arch!r}")
    net = net.eval()
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


def gradient_maps(net: torch.nn.Module, images: torch.Tensor, class_index: int | None = None) -> torch.Tensor:
    """Gradient saliency (Simonyan et al. 2014, MONAI's VanillaGrad) as heat maps [N,H,W] in [0,1]:
    the absolute gradient of the class score with respect to each pixel, scaled by each image's
    largest (all zero where the score does not depend on the image). Written with autograd, not
    VanillaGrad: that takes one image at a time and crashes on a score that ignores the image."""
    net = net.eval()
    x = images.to(next(net.parameters()).device).float().detach().requires_grad_(True)
    params = list(net.parameters())
    trainable = [p.requires_grad for p in params]
    try:
        for p in params:  # no gradient left on the weights
            p.requires_grad_(False)
        with torch.enable_grad():
            scores = net(x)
            target = scores.argmax(1) if class_index is None else torch.full((len(x),), class_index)
            # eval mode: each image's score depends on that image only, so one backward gives all
            (grad,) = (torch.autograd.grad(scores.gather(1, target[:, None].to(scores.device)).sum(), x,
                                           allow_unused=True) if scores.requires_grad else (None,))
    finally:
        for p, flag in zip(params, trainable):
            p.requires_grad_(flag)
    if grad is None:
        return torch.zeros(len(x), *x.shape[2:])
    maps = grad.detach().abs().sum(1).cpu()
    peak = maps.flatten(1).amax(1).clamp(min=1e-30)[:, None, None]
    return torch.where(peak > 1e-30, maps / peak, torch.zeros_like(maps))


def occlusion_maps(net: torch.nn.Module, images: torch.Tensor, class_index: int | None = None,
                   mask_fraction: float = OCCLUSION_MASK_FRACTION, overlap: float = 0.0) -> torch.Tensor:
    """Occlusion sensitivity (MONAI) as heat maps [N,H,W] in [0,1]: how much the class
    probability drops when a patch (mask_fraction of the side, tiled without overlap) is set to
    the image mean, scaled by each image's largest drop (all zero where no patch matters).
    overlap > 0 slides the patch in smaller steps: finer maps, 1/(1-overlap)^2 times the work."""
    net = net.eval()
    x = images.to(next(net.parameters()).device).float()
    side = max(3, round(mask_fraction * x.shape[-1]))
    occlusion = OcclusionSensitivity(nn_module=net, mask_size=side, n_batch=64, verbose=False, mode="mean_img",
                                     overlap=overlap)
    maps = []
    with torch.no_grad():
        predicted = net(x).argmax(dim=1)
        for i in range(len(x)):
            target = int(predicted[i]) if class_index is None else class_index
            occluded = occlusion(x[i:i + 1])[0][0, target].as_tensor()  # the probability with each patch occluded
            # Measured from the least harmful patch, not the unoccluded probability: MONAI's merged
            # map carries a small constant offset that would otherwise become uniform mass.
            drop = occluded.max() - occluded
            maps.append(drop / drop.max() if drop.max() > 0 else drop)
    return torch.stack(maps).cpu()


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
    img = np.asarray(image, dtype=np.float32)
    span = float(img.max() - img.min())
    img = (img - img.min()) / span if span > 0 else np.zeros_like(img)
    heat_rgb = colormaps["jet"](np.clip(heat, 0, 1))[..., :3]
    rgb = (1 - alpha) * np.repeat(img[..., None], 3, axis=2) + alpha * heat_rgb
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)
