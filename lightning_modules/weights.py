"""Loading a state_dict into a module with errors that name the file and what does not fit: one
place for segmenters and classifiers, sites and `cxrfl predict`."""

from __future__ import annotations

import torch

# Loss weighting and loss modules: training-only state, not needed to predict.
TRAINING_ONLY = ("class_weights", "loss_fn.")


def load_weights(module: torch.nn.Module, state: dict, source, network: str = "the configured network"):
    """`module` in eval mode with `state` loaded (arrays or tensors); ValueError naming `source`
    for HE ciphertexts, other shapes, or tensors missing or unexpected (training-only ones aside)."""
    if any(isinstance(v, (bytes, bytearray)) for v in state.values()):
        raise ValueError(f"{source}: encrypted (HE) weights; decrypt them with a site's key first")
    try:
        missing, unexpected = module.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"{source}: weights do not fit {network} ({exc})") from None
    missing = [k for k in missing if not k.startswith(TRAINING_ONLY)]
    unexpected = [k for k in unexpected if not k.startswith(TRAINING_ONLY)]
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not fit {network} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return module.eval()
