"""The audit's figure: true images beside what the gradient-inversion attack made of them."""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure  # no pyplot: no global backend, nothing to close

from lightning_modules.data.atomic import atomic_path

MAX_SHOWN = 8  # images per row; a batch of 32 would be unreadable


def reconstruction_grid(rows: list[tuple[str, torch.Tensor, torch.Tensor, list[float]]], path: str | Path) -> Path:
    """A PNG at `path`: per row (label, true images [B, 1, H, W], reconstructions in matched order,
    their SSIMs) the first MAX_SHOWN true images above their reconstructions, SSIM under each.
    Each image is shown with its own min-max grey scale (the attack recovers intensity only up to
    an affine map). Written atomically."""
    if not rows:
        raise ValueError("reconstruction_grid needs at least one row")
    for label, truth, recon, ssim in rows:
        if len(truth) != len(recon) or len(ssim) < min(len(truth), MAX_SHOWN):
            raise ValueError(f"row {label!r}: {len(truth)} true images, {len(recon)} reconstructions, "
                             f"{len(ssim)} SSIMs; need one reconstruction and one SSIM per true image")
    columns = max(min(len(truth), MAX_SHOWN) for _, truth, _, _ in rows)
    fig = Figure(figsize=(1.3 * columns + 1.2, 2.8 * len(rows)), layout="constrained")
    panels = fig.subfigures(len(rows), 1, squeeze=False)[:, 0]
    for panel, (label, truth, recon, ssim) in zip(panels, rows):
        shown = min(len(truth), MAX_SHOWN)
        axes = panel.subplots(2, columns, squeeze=False)
        for i, (images, name) in enumerate(((truth, "true"), (recon, "attack"))):
            for j in range(columns):
                ax = axes[i, j]
                ax.set_axis_off()
                if j < shown:
                    ax.imshow(images[j].detach().float().squeeze(0).cpu().numpy(), cmap="gray")
                    if i == 1:
                        ax.set_title(f"SSIM {ssim[j]:.2f}", fontsize=8, y=-0.22)
            axes[i, 0].text(-0.1, 0.5, name, transform=axes[i, 0].transAxes, ha="right", va="center", fontsize=8)
        more = f" (first {shown} of {len(truth)})" if len(truth) > shown else ""
        panel.suptitle(f"{label}{more}", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    return path
