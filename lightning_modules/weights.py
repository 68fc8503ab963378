"""Reading model files without running code from them, and loading a state_dict into a module
with errors that name the file and what does not fit: `load_checkpoint` is the one place that
tells the formats apart, for segmenters and classifiers, sites, resume, HE decryption and
`cxrfl predict`.

Every model file is read with `torch.load(weights_only=True)`: tensors, numbers, strings, bytes,
lists and dicts, plus numeric numpy arrays and scalars (NVFlare's numpy exchange). Anything else
in the pickle (a class or function to call) is refused before it is created.

Formats: a Lightning checkpoint, an NVFlare persistor/round file, a model bundle written by
`cxrfl export-model` (MONAI's bundle layout: `configs/metadata.json` + `models/model.pt`, the
network's plain state_dict, and for a lung-ROI classifier `models/segmenter.pt`) and the
single-file export of earlier releases (`cxrfl-model/1`, which federated jobs still carry).
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

# Loss weighting and loss modules: training-only state, not needed to predict.
TRAINING_ONLY = ("class_weights", "loss_fn.")
EXPORT_FORMAT = "cxrfl-model/1"  # single-file exports (earlier releases; a federated job's segmenter)
BUNDLE_FORMAT = "cxrfl-bundle/1"  # metadata.json["cxrfl"]["format"] of an exported bundle
BUNDLE_METADATA = Path("configs") / "metadata.json"
BUNDLE_WEIGHTS = Path("models") / "model.pt"
BUNDLE_SEGMENTER = Path("models") / "segmenter.pt"  # a lung-ROI classifier's segmenter
# The modules keep their network as `.net`; a bundle stores the bare network's state_dict (what
# MONAI's bundle tools and plain PyTorch load into the network), read here under the module's keys.
NETWORK_PREFIX = "net."
KINDS = "a Lightning checkpoint, an NVFlare model file or a `cxrfl export-model` bundle"

_NUMERIC = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
            np.float16, np.float32, np.float64, np.complex64, np.complex128)
_multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
# What numpy arrays and scalars unpickle through, under numpy 2's and 1's module names; object
# arrays stay refused: their dtype class is not listed.
NUMPY_GLOBALS = [*((getattr(_multiarray, name), f"numpy.{core}.multiarray.{name}")
                   for name in ("_reconstruct", "scalar") for core in ("_core", "core")),
                 np.ndarray, np.dtype, *(type(np.dtype(t)) for t in _NUMERIC)]
# torch's messages for a pickle global or type outside the allowlist, and what a Python name looks
# like (random bytes can parse as a GLOBAL opcode naming garbage: that is a broken file, not code)
_UNSAFE = re.compile(r"GLOBAL (.+?) (?:was not|whose module)|but got <class '([^']+)'>")
_PYTHON_NAME = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")


class UnsafeFileError(ValueError):
    """A file whose loading would run code from it (it needs pickle beyond tensors and plain data)."""


def safe_torch_load(path, map_location="cpu"):
    """The contents of a torch.save'd file, read with weights_only=True (numeric numpy allowed).
    UnsafeFileError for a file that needs anything more, ValueError for an unreadable one; both
    one line naming the file."""
    # Added for the whole process, not in a `safe_globals` block: that block restores the previous
    # list on exit, which races with a load in another thread; numeric arrays are safe everywhere.
    torch.serialization.add_safe_globals(NUMPY_GLOBALS)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _UNSAFE.search(str(exc))
        wanted = next((g for g in found.groups() if g), "") if found else ""
        if _PYTHON_NAME.fullmatch(wanted):
            raise UnsafeFileError(
                f"{path}: refused: loading it would run code from the file (it needs Python pickle objects beyond "
                f"tensors and plain data: {wanted}); give {KINDS} as cxrfl writes them") from None
        raise ValueError(f"{path}: not a PyTorch model file (its pickle data is malformed)") from None
    except Exception as exc:  # noqa: BLE001 - zip, EOF, OS errors: all mean "cannot read it"
        reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ValueError(f"{path}: not a readable PyTorch model file ({reason})") from None


@dataclass
class ModelFile:
    """What a model file (or bundle folder) holds, whichever tool wrote it."""

    path: Path
    kind: str  # "lightning" | "nvflare" | "bundle" (a folder) | "export" (an earlier single-file export)
    state: dict  # module state_dict: tensor name -> tensor or array (bytes: HE ciphertexts)
    # lightning: its hyper_parameters; nvflare: its meta; bundle: metadata.json's "cxrfl" description
    # (but "segmenter"); export: the file's fields but state_dict
    info: dict = field(default_factory=dict)
    segmenter: ModelFile | None = None  # a bundled lung-ROI classifier's segmenter


def is_bundle(path) -> bool:
    """A folder in the bundle layout (whether or not its contents are valid)."""
    return (Path(path) / BUNDLE_METADATA).is_file()


def load_checkpoint(path, map_location="cpu") -> ModelFile:
    """A Lightning checkpoint, an NVFlare persistor/round file (`{"model": ..., "meta_props"/"meta": ...}`),
    a `cxrfl export-model` bundle folder or an earlier single-file export, read safely; ValueError
    (one line, naming the file) otherwise."""
    path = Path(path)
    if path.is_dir():
        return _load_bundle(path, map_location)
    obj = safe_torch_load(path, map_location)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        info = {k: v for k, v in obj.items() if k != "state_dict"}
        if obj.get("format") == EXPORT_FORMAT:
            return ModelFile(path, "export", obj["state_dict"], info)
        hparams = obj.get("hyper_parameters")
        return ModelFile(path, "lightning", obj["state_dict"], dict(hparams) if isinstance(hparams, dict) else {})
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        meta = obj.get("meta_props") or obj.get("meta") or {}
        return ModelFile(path, "nvflare", obj["model"], dict(meta) if isinstance(meta, dict) else {})
    if is_bundle(path.parent.parent):  # a bundle's bare weights: its description is beside them
        raise ValueError(f"{path}: part of a model bundle; give the bundle's folder ({path.parent.parent})")
    raise ValueError(f"{path}: holds no model weights (expected {KINDS})")


def _load_bundle(folder: Path, map_location) -> ModelFile:
    """metadata.json read as plain JSON (never through MONAI's ConfigParser, whose `$` expressions
    and `_target_` components would run code from the bundle), its weights with weights_only=True."""
    meta_file = folder / BUNDLE_METADATA
    if not meta_file.is_file():
        raise ValueError(f"{folder}: a folder, but not a model bundle (no {BUNDLE_METADATA.as_posix()})")
    try:
        metadata = json.loads(meta_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{meta_file}: not readable JSON ({exc})") from None
    description = metadata.get("cxrfl") if isinstance(metadata, dict) else None
    if not isinstance(description, dict) or description.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{meta_file}: no \"cxrfl\" description of format {BUNDLE_FORMAT!r}: not a bundle "
                         "written by `cxrfl export-model`")
    segmenter = description.get("segmenter")
    if segmenter is not None and not isinstance(segmenter, dict):
        raise ValueError(f"{meta_file}: its \"segmenter\" is not a description (a JSON object)")
    info = {k: v for k, v in description.items() if k != "segmenter"}
    model = ModelFile(folder, "bundle", _network_state(folder / BUNDLE_WEIGHTS, map_location), info)
    if segmenter is not None:
        model.segmenter = ModelFile(folder / BUNDLE_SEGMENTER, "bundle",
                                    _network_state(folder / BUNDLE_SEGMENTER, map_location), segmenter)
    return model


def _network_state(path: Path, map_location) -> dict:
    """A bundle's weights file: a network's plain state_dict, returned under the module's keys."""
    if not path.is_file():
        raise ValueError(f"{path}: missing from the bundle")
    state = safe_torch_load(path, map_location)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{path}: not a state_dict (a dict of tensor names to tensors)")
    return {NETWORK_PREFIX + k: v for k, v in state.items()}


def _first_line(exc: Exception) -> str:
    """torch's shape-mismatch report is one line per tensor: the first one says enough."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = next((line for line in lines if line.startswith("size mismatch")), lines[-1] if lines else "")
    more = sum(line.startswith("size mismatch") for line in lines) - 1
    return detail.rstrip(".") + (f"; {more} more" if more > 0 else "")


def load_weights(module: torch.nn.Module, state: dict, source, network: str = "the configured network"):
    """`module` in eval mode with `state` loaded (arrays or tensors); ValueError naming `source`
    for HE ciphertexts, other shapes, or tensors missing or unexpected (training-only ones aside)."""
    if any(isinstance(v, (bytes, bytearray)) for v in state.values()):
        raise ValueError(f"{source}: encrypted (HE) weights; decrypt them with a site's key first")
    try:
        tensors = {k: torch.as_tensor(v) for k, v in state.items()}
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{source}: holds values that are not weights ({_first_line(exc)})") from None
    try:
        missing, unexpected = module.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"{source}: weights do not fit {network} ({_first_line(exc)})") from None
    missing = [k for k in missing if not k.startswith(TRAINING_ONLY)]
    unexpected = [k for k in unexpected if not k.startswith(TRAINING_ONLY)]
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not fit {network} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return module.eval()
