"""`cxrfl export-model`: a trained model as a folder in MONAI's bundle layout: the weights plus a
JSON description of their preprocessing and classes, nothing in it that runs code when read.

    <out>/configs/metadata.json  MONAI's metadata fields (versions, task, network_data_format, ...)
                                 and, under "cxrfl", what `cxrfl predict` needs: task, model,
                                 image_size, normalisation, classes, roi, roi_threshold,
                                 decision_threshold, temperature, and a lung-ROI classifier's
                                 segmenter (task, model, image_size, normalisation, threshold)
    <out>/models/model.pt        the network's plain state_dict (read back with weights_only=True)
    <out>/models/segmenter.pt    a lung-ROI classifier's segmenter network, likewise

lightning_modules/weights.py reads it back (load_checkpoint), cxrfl/models.py checks it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import monai
import numpy as np
import pytorch_lightning as pl
import torch

import cxrfl
from cxrfl.models import Classifier, ModelLoadError, Segmenter, load_classifier, load_segmenter, model_task
from lightning_modules.data.atomic import atomic_torch_save, current_umask, write_json
from lightning_modules.weights import (
    BUNDLE_FORMAT,
    BUNDLE_METADATA,
    BUNDLE_SEGMENTER,
    BUNDLE_WEIGHTS,
    EXPORT_FORMAT,
    is_bundle,
    load_checkpoint,
)

# Every model here standardises each image (zero mean, unit variance) after scaling to [0,1] and
# resizing (area) to image_size: lightning_modules/data/transforms.py.
NORMALISATION = "per-image standardisation of [0,1] intensities after area resize to image_size"
# The schema MONAI's model zoo bundles name: `python -m monai.bundle verify_metadata` downloads it.
MONAI_METADATA_SCHEMA = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                         "meta_schema_20240725.json")
BUNDLE_VERSION = "1.0.0"  # MONAI's "version": of the exported model, one per export


def export_model(source: str | Path, out: str | Path) -> dict:
    """Write the model of `source` (a run folder, a weights file inside one, or an exported model)
    as a bundle folder `out` for `cxrfl predict`; returns its description (weights left out)."""
    source, out = Path(source), Path(out)
    _check_export_target(out)
    if model_task(source) == "segment":
        seg = load_segmenter(source)
        description, weights = _segmenter_description(seg), {BUNDLE_WEIGHTS: seg.module.net.state_dict()}
    else:
        clf = load_classifier(source)
        description, weights = _classifier_description(clf), {BUNDLE_WEIGHTS: clf.module.net.state_dict()}
        if clf.segmenter is not None:
            description["segmenter"] = _segmenter_description(clf.segmenter)
            weights[BUNDLE_SEGMENTER] = clf.segmenter.module.net.state_dict()
    # an exported model travels; the exporter's paths do not
    description = {"format": BUNDLE_FORMAT, **description, "source": source.absolute().name}
    _write_bundle(out, {**monai_metadata(description), "cxrfl": description}, weights)
    summary = {k: v for k, v in description.items() if k != "segmenter"}
    return summary | ({"segmenter": "embedded"} if "segmenter" in description else {})


def export_segmenter_file(source: str | Path, out: str | Path) -> None:
    """A segmenter as one file (the single-file export, `cxrfl-model/1`): what a federated job
    carries to its sites, since NVFlare copies a job's files by name into custom/ but spreads a
    folder's contents there."""
    seg = load_segmenter(source)
    atomic_torch_save({"format": EXPORT_FORMAT, **_segmenter_description(seg), "source": Path(source).absolute().name,
                       "state_dict": seg.module.state_dict()}, out)


def _segmenter_description(seg: Segmenter) -> dict:
    return {"task": "segment", "model": seg.module.hparams.arch, "image_size": seg.image_size,
            "normalisation": NORMALISATION, "threshold": float(seg.module.hparams.threshold)}


def _classifier_description(clf: Classifier) -> dict:
    return {"task": "classify", "model": clf.module.hparams.model, "classes": list(clf.classes),
            "dp_compatible": bool(clf.module.hparams.get("dp_compatible", False)),  # DP-SGD's group-norm layers
            "image_size": clf.image_size, "normalisation": NORMALISATION, "roi": clf.roi,
            "roi_threshold": clf.roi_threshold, "decision_threshold": clf.threshold,
            "temperature": clf.temperature}


def monai_metadata(description: dict) -> dict:
    """MONAI's mandatory metadata.json fields (its bundle specification), filled from `description`."""
    size, model = [description["image_size"]] * 2, description["model"]
    image = {"type": "image", "format": "magnitude", "modality": "XR", "num_channels": 1, "spatial_shape": size,
             "dtype": "float32", "value_range": [], "is_patch_data": False, "channel_def": {"0": "image"}}
    if description["task"] == "segment":
        task = "Lung segmentation of chest X-rays"
        pred = {"type": "image", "format": "segmentation", "num_channels": 1, "spatial_shape": size,
                "dtype": "float32", "value_range": [], "is_patch_data": False, "channel_def": {"0": "lung"}}
        outputs = "one channel of lung logits (sigmoid, then the 'threshold' in 'cxrfl')"
    else:
        classes = description["classes"]
        task = f"Chest X-ray classification: {', '.join(classes)}"
        pred = {"type": "probabilities", "format": "classes", "num_channels": len(classes), "spatial_shape": [],
                "dtype": "float32", "value_range": [], "is_patch_data": False,
                "channel_def": {str(i): name for i, name in enumerate(classes)}}
        outputs = "one logit per class (softmax; the 'cxrfl' entry has the decision threshold and temperature)"
        if description.get("roi"):
            outputs += f". The input is the lung region ({description['roi']}) the segmenter in models/segmenter.pt finds"
    return {
        "schema": MONAI_METADATA_SCHEMA, "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by cxrfl export-model from {description['source']}"},
        "monai_version": monai.__version__, "pytorch_version": torch.__version__, "numpy_version": np.__version__,
        "optional_packages_version": {"pytorch-lightning": pl.__version__, "cxr-fl": cxrfl.__version__},
        "name": f"cxr-fl {model} ({description['source']})", "task": task,
        "description": f"A {model!r} network of cxr-fl (lightning_modules/networks.py) whose plain state_dict is "
                       f"models/model.pt. Input: a {size[0]}x{size[1]} single-channel chest X-ray, "
                       f"{description['normalisation']}. Output: {outputs}.",
        "authors": "cxr-fl", "copyright": "", "intended_use": "Research; not for diagnostic use.",
        "network_data_format": {"inputs": {"image": image}, "outputs": {"pred": pred}},
    }


def _check_export_target(out: Path) -> None:
    """Only an earlier bundle (or an empty folder) is replaced: --out naming a checkpoint or any
    other file or folder would lose it."""
    if not out.parent.is_dir():
        raise ModelLoadError(f"{out.parent}: no such folder to write {out.name} into")
    if out.is_dir() and (not any(out.iterdir()) or _earlier_bundle(out)):
        return
    if out.exists():
        raise ModelLoadError(f"{out}: exists and is not an exported model bundle; not overwritten "
                             "(choose another --out)")


def _earlier_bundle(folder: Path) -> bool:
    try:
        return is_bundle(folder) and load_checkpoint(folder).kind == "bundle"
    except ValueError:  # a damaged or foreign bundle: not ours to replace
        return False


def _write_bundle(out: Path, metadata: dict, weights: dict) -> None:
    """Written into a folder beside `out`, then renamed into place: an export stopped half-way
    leaves an earlier bundle whole (at worst renamed to .<name>.*.old, between the two renames)."""
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        staging.chmod(0o777 & ~current_umask())  # mkdtemp's folder is private; an export is shared
        (staging / BUNDLE_METADATA).parent.mkdir()
        (staging / BUNDLE_WEIGHTS).parent.mkdir()
        write_json(staging / BUNDLE_METADATA, metadata)
        for name, state in weights.items():
            atomic_torch_save(state, staging / name)
        if out.exists():  # an earlier bundle or an empty folder (_check_export_target)
            earlier = out.with_name(f"{staging.name}.old")
            out.rename(earlier)
            staging.rename(out)
            shutil.rmtree(earlier)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
