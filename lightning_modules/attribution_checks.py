"""Sanity checks a heat-map method must pass before any of its numbers is published.

- Model randomisation (Adebayo et al., 2018, "Sanity checks for saliency maps"): the maps of the
  trained model and of the same architecture with every layer re-initialised (full, not cascading,
  randomisation) must differ: their Spearman rank correlation, averaged over images, stays below
  RANDOMISATION_MAX_SPEARMAN. A method that fails it draws the input's structure, not what the model learned.
- Planted signal: on phantoms whose label depends only on the opacity (phantom.planted_signal_phantoms),
  a trained model's maps put clearly more mass in the opacities than a uniform map does: the share
  of mass inside the opacity divided by the opacity's area share (1 for a uniform map) exceeds
  PLANTED_MIN_RATIO, at the lower end of a bootstrap 95 % interval over images.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from scipy.stats import bootstrap, spearmanr

from lightning_modules.data.phantom import CLASSES, planted_signal_phantoms
from lightning_modules.data.transforms import normalize_image
from lightning_modules.interpret import mass_inside, network_heat_maps
from lightning_modules.networks import build_classifier

# rho < 0.5: the trained model's map explains under a quarter (rho^2) of the random model's ranks.
RANDOMISATION_MAX_SPEARMAN = 0.5
# Twice a uniform map's share inside the opacities: a map that ignores them scores about 1 (untrained
# cnn5 on this phantom: 0.8-1.2), so 2 is clearly more than chance, not a lucky draw.
PLANTED_MIN_RATIO = 2.0
POSITIVE = CLASSES.index("pneumonia")


def planted_signal_data(count: int, size: int = 64, seed: int = 0, opacity_gain: float = 3.0):
    """Images [N,1,H,W] standardised per image as the classifiers' inputs are, labels [N]
    (1 = pneumonia) and opacity masks [N,H,W] of the opacity-only phantom."""
    phantoms = planted_signal_phantoms(count, size, seed, opacity_gain)
    standardise = normalize_image()
    images = torch.stack([torch.as_tensor(standardise(p.image[None])) for p in phantoms]).float()
    labels = torch.tensor([CLASSES.index(p.label) for p in phantoms])
    opacity = torch.stack([torch.as_tensor(p.opacity_mask) for p in phantoms]).float()
    return images, labels, opacity


def fit_classifier(arch: str, images: torch.Tensor, labels: torch.Tensor, epochs: int = 8, seed: int = 0,
                   lr: float = 2e-3, batch: int = 16) -> torch.nn.Module:
    """A classifier trained on in-memory tensors with a plain loop (the checks need a trained
    network in seconds, without the Trainer's set-up or files on disk)."""
    torch.manual_seed(seed)
    net = build_classifier(arch, len(CLASSES))
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(images), generator=order).split(batch):
            optimiser.zero_grad()
            torch.nn.functional.cross_entropy(net(images[idx]), labels[idx]).backward()
            optimiser.step()
    return net.eval()


def randomised_copy(net: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """The same architecture with every layer re-initialised (weights and normalisation statistics)."""
    torch.manual_seed(seed)
    random = copy.deepcopy(net)
    for module in random.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return random.eval()


def mean_interval(values: np.ndarray) -> tuple[float, float, float]:
    """Mean and bootstrap 95 % interval over the finite values (NaN where there are too few)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        mean = float(values.mean()) if len(values) else float("nan")
        return mean, float("nan"), float("nan")
    ci = bootstrap((values,), np.mean, confidence_level=0.95, n_resamples=2000, method="percentile",
                   random_state=0).confidence_interval
    return float(values.mean()), float(ci.low), float(ci.high)


def rounded(value: float, digits: int) -> float | None:
    return round(float(value), digits) if np.isfinite(value) else None  # None: undefined (JSON has no NaN)


def rank_correlations(trained_maps: torch.Tensor, random_maps: torch.Tensor) -> np.ndarray:
    """Spearman's rho per image pair [N]: NaN where the trained model's map is constant (no map
    to test), 0 where only the randomised model's is (its ranking cannot agree)."""
    rhos = []
    for a, b in zip(trained_maps.flatten(1).numpy(), random_maps.flatten(1).numpy()):
        if np.ptp(a) == 0:
            rhos.append(float("nan"))
        else:
            rhos.append(0.0 if np.ptp(b) == 0 else float(spearmanr(a, b).statistic))
    return np.asarray(rhos)


def randomisation_check(trained: torch.nn.Module, randomised: torch.nn.Module, arch: str, images: torch.Tensor,
                        method: str = "gradcam", class_index: int = POSITIVE,
                        max_spearman: float = RANDOMISATION_MAX_SPEARMAN) -> dict:
    """Pass when the trained and randomised models' maps of the same images rank pixels
    differently: mean Spearman rho below max_spearman. All-constant trained maps (e.g. Grad-CAM
    whose ReLU zeroes everything) have nothing to compare and do not pass."""
    rhos = rank_correlations(network_heat_maps(trained, arch, images, class_index, method),
                             network_heat_maps(randomised, arch, images, class_index, method))
    mean, low, high = mean_interval(rhos)
    return {"check": "model randomisation", "method": method, "spearman": rounded(mean, 4),
            "ci95": [rounded(low, 4), rounded(high, 4)], "threshold": max_spearman, "images": len(rhos),
            "maps_with_mass": int(np.isfinite(rhos).sum()), "pass": bool(np.isfinite(mean) and mean < max_spearman)}


def planted_signal_check(net: torch.nn.Module, arch: str, images: torch.Tensor, opacity: torch.Tensor,
                         method: str = "gradcam", class_index: int = POSITIVE,
                         min_ratio: float = PLANTED_MIN_RATIO) -> dict:
    """Pass when the maps' mass share inside the opacities, over the opacities' area share, is
    above min_ratio at the lower end of its 95 % interval over images (images with an opacity only)."""
    has_opacity = opacity.flatten(1).sum(1) > 0
    images, opacity = images[has_opacity], opacity[has_opacity]
    maps = network_heat_maps(net, arch, images, class_index, method)
    share = mass_inside(maps, opacity)  # NaN for an all-zero map: it has no share, and is left out
    ratio = (share / opacity.flatten(1).mean(1)).numpy()
    mean, low, high = mean_interval(ratio)
    finite = np.isfinite(ratio)
    return {"check": "planted signal", "method": method,
            "in_opacity_share": rounded(share.numpy()[finite].mean(), 4) if finite.any() else None,
            "opacity_area_share": round(float(opacity.mean()), 4), "ratio_to_uniform": rounded(mean, 3),
            "ci95": [rounded(low, 3), rounded(high, 3)], "threshold": min_ratio, "images": int(len(ratio)),
            "maps_with_mass": int(finite.sum()), "pass": bool(np.isfinite(low) and low > min_ratio)}
