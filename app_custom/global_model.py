"""The server's copy of the network.

A plain nn.Module holding the same `net` as the LightningModules, so its state_dict keys
(`net.*`) match what clients send. It keeps its constructor arguments as attributes because
NVFlare's job exporter serialises a component's arguments from them (a bare MONAI network or a
LightningModule would export with empty arguments).
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_modules.networks import build_classifier, build_segmenter


class GlobalModel(nn.Module):
    """seed: the initial weights are a function of the run's seed (the same seed, the same starting
    model, byte for byte), drawn from a forked RNG so the server process's own stream is untouched."""

    def __init__(self, task: str = "classify", model: str = "densenet121", num_classes: int = 2, seed: int = 0,
                 dp_compatible: bool = False):
        super().__init__()
        self.task, self.model, self.num_classes, self.seed = task, model, num_classes, seed
        self.dp_compatible = dp_compatible  # DP-SGD: the sites' layers (lightning_modules/privacy.py)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = build_segmenter(model) if task == "segment" else build_classifier(model, num_classes, dp_compatible)

    def forward(self, x):
        return self.net(x)
