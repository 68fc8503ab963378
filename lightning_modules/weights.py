"""Reading model files without running code from them, and loading a state_dict into a module
with errors that name the file and what does not fit: one place for segmenters and classifiers,
sites, resume, HE decryption and `cxrfl predict`.

Every model file is read with `torch.load(weights_only=True)`: tensors, numbers, strings, bytes,
lists and dicts, plus numeric numpy arrays and scalars (NVFlare's numpy exchange). Anything else
in the pickle (a class or function to call) is refused before it is created.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

# Loss weighting and loss modules: training-only state, not needed to predict.
TRAINING_ONLY = ("class_weights", "loss_fn.")
EXPORT_FORMAT = "cxrfl-model/1"  # `cxrfl export-model` files
KINDS = "a Lightning checkpoint, an NVFlare model file or a `cxrfl export-model` file"

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
    """What a model file holds, whichever tool wrote it."""

    path: Path
    kind: str  # "lightning" | "export" | "nvflare"
    state: dict  # tensor name -> tensor or array (bytes: HE ciphertexts)
    # lightning: its hyper_parameters; export: the file's fields but state_dict; nvflare: its meta
    info: dict = field(default_factory=dict)


def read_model_file(path, map_location="cpu") -> ModelFile:
    """A Lightning checkpoint, an NVFlare persistor/round file (`{"model": ..., "meta_props"/"meta": ...}`)
    or a `cxrfl export-model` file, read safely; ValueError (one line, naming the file) otherwise."""
    path = Path(path)
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
    raise ValueError(f"{path}: holds no model weights (expected {KINDS})")


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
