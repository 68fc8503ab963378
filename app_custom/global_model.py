"""The server's copy of the network.

A plain nn.Module holding the same `net` as the LightningModules, so its state_dict keys
(`net.*`) match what clients send. It keeps its constructor arguments as attributes because
NVFlare's job exporter serialises a component's arguments from them (a bare MONAI network or a
LightningModule would export with empty arguments).
"""

from __future__ import annotations

from torch import nn

from lightning_modules.networks import build_classifier, build_segmenter


class GlobalModel(nn.Module):
    def __init__(self, task: str = "classify", model: str = "densenet121", num_classes: int = 2):
        super().__init__()
        self.task, self.model, self.num_classes = task, model, num_classes
        self.net = build_segmenter(model) if task == "segment" else build_classifier(model, num_classes)

    def forward(self, x):
        return self.net(x)
