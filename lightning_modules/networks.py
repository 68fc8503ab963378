"""Network factories. Each network is built from plain arguments so the same call rebuilds it
anywhere (checkpoint, NVFlare job config)."""

from __future__ import annotations

import torch
from monai.networks.nets import DenseNet121, FlexibleUNet, UNet
from torch import nn

CLASSIFIERS = ("densenet121", "cnn5")
# The last feature maps before global pooling: where Grad-CAM reads activations and gradients.
CAM_LAYERS = {"densenet121": "class_layers.relu", "cnn5": "features.20"}
SEGMENTERS = ("unet", "flexunet-b4")
# Input sides each network takes: (smallest, must be a multiple of). DenseNet121 and CNN5 pool
# down to one pixel before global pooling; the U-Nets' skip connections need sides that halve
# evenly at every level (4 strides of 2 for our U-Net, 5 for the EfficientNet encoder).
INPUT_SIDES = {"densenet121": (32, 1), "cnn5": (16, 1), "unet": (32, 16), "flexunet-b4": (32, 32)}
MAX_INPUT_SIDE = 2048


def input_size_problem(name: str, size: int) -> str | None:
    """Why `size` x `size` inputs do not fit network `name`, or None when they do."""
    smallest, multiple = INPUT_SIDES[name]
    if size < smallest or size > MAX_INPUT_SIDE or size % multiple:
        rule = f"a multiple of {multiple} from {smallest}" if multiple > 1 else f"from {smallest}"
        return f"--image-size {size} does not fit {name}: use {rule} to {MAX_INPUT_SIDE} px"
    return None


class CNN5(nn.Module):
    """The Sáinz-Pardo & López García pneumonia CNN: 5 conv blocks (32-64-64-128-256) with
    BatchNorm, MaxPool and Dropout 0.1/0.2, a 128-unit dense layer, designed for 150x150 input.
    Not in MONAI, so defined here; global pooling makes it accept any input size."""

    def __init__(self, in_channels: int = 1, num_classes: int = 2):
        super().__init__()
        blocks, channels = [], [in_channels, 32, 64, 64, 128, 256]
        dropouts = [0.0, 0.1, 0.0, 0.2, 0.2]
        for c_in, c_out, p in zip(channels[:-1], channels[1:], dropouts):
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True), nn.BatchNorm2d(c_out)]
            if p:
                blocks.append(nn.Dropout(p))
            blocks.append(nn.MaxPool2d(2, ceil_mode=True))
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 128), nn.ReLU(inplace=True),
                                  nn.Dropout(0.2), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_classifier(name: str, num_classes: int, dp_compatible: bool = False) -> nn.Module:
    """dp_compatible: group norm in place of batch norm, for DP-SGD (lightning_modules/privacy.py)."""
    if name == "densenet121":
        net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=num_classes)
    elif name == "cnn5":
        net = CNN5(in_channels=1, num_classes=num_classes)
    else:
        raise ValueError(f"unknown classifier {name!r}; choose one of {', '.join(CLASSIFIERS)}")
    return make_dp_compatible(net) if dp_compatible else net


def make_dp_compatible(net: nn.Module) -> nn.Module:
    """`net` with its batch-norm layers replaced by group norm (Opacus's own fix) and no in-place activation:
    a per-sample gradient needs layers that do not mix the samples of a batch. Deterministic, so every site
    and the server build the same layers."""
    from opacus.validators import ModuleValidator  # lazy: Opacus only for DP-SGD runs

    fixed = ModuleValidator.fix(net)
    for module in fixed.modules():  # Opacus's backward hooks forbid in-place activations after a hooked layer
        if getattr(module, "inplace", False):
            module.inplace = False
    problems = ModuleValidator.validate(fixed, strict=False)
    if problems:
        raise ValueError(f"network cannot be trained with DP-SGD: {problems}")
    return fixed


def build_segmenter(name: str) -> nn.Module:
    if name == "unet":
        return UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(16, 32, 64, 128, 256),
                    strides=(2, 2, 2, 2), num_res_units=2, norm="batch")
    if name == "flexunet-b4":
        # CXR-FL's encoder; weights start random because nothing can be downloaded at run time.
        return FlexibleUNet(in_channels=1, out_channels=1, backbone="efficientnet-b4", pretrained=False,
                            spatial_dims=2)
    raise ValueError(f"unknown segmenter {name!r}; choose one of {', '.join(SEGMENTERS)}")


# Normalisation layers: what FedBN keeps at each site (their affine weights and running statistics).
NORMALISATION_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def normalisation_state_keys(module: nn.Module) -> list[str]:
    """The state_dict keys of every normalisation layer in `module`, in state_dict order."""
    prefixes = [f"{name}." for name, m in module.named_modules() if isinstance(m, NORMALISATION_LAYERS)]
    return [key for key in module.state_dict() if any(key.startswith(p) and "." not in key[len(p):] for p in prefixes)]


@torch.no_grad()
def adapt_normalisation(module: nn.Module, images) -> None:
    """Batch-norm statistics re-estimated from `images` (an iterable of input batches; no label is used):
    how a FedBN model, whose server copy holds no site's statistics, meets data of a new site (AdaBN,
    Li et al. 2016). Affine weights are unchanged; the module is left in eval mode."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over every batch
    module.train()
    for batch in images:
        module(batch)
    module.eval()
