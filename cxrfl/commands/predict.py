"""`cxrfl predict` and `cxrfl export-model`: trained models on new images."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cxrfl.bundle import export_model
from cxrfl.models import ModelLoadError, load_classifier
from cxrfl.options import positive_int
from cxrfl.predict import predict


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "predict", help="classify image files with a trained model: probabilities, lung masks, Grad-CAM",
        description="Run a classifier on image files or folders (PNG/JPEG 8/16-bit, grayscale/RGB/RGBA, any size, "
        "DICOM incl. MONOCHROME1), preprocessed exactly as its training data (input size, standardisation, lung "
        "ROI). Writes per image a lung mask PNG (with a segmenter) and a Grad-CAM overlay PNG, and one "
        "predictions.csv with a row per file; an unreadable file gets an error row and the rest still run. "
        "For two classes `predicted` uses the decision threshold the run chose on validation (0.5 for "
        "models without one).")
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="image files or folders (searched recursively)")
    p.add_argument("--classifier", type=Path, required=True,
                   help="a run folder (central, sim, POC), a weights file inside one, or a `cxrfl export-model` bundle "
                   "folder (or single file of an earlier release)")
    p.add_argument("--segmenter", type=Path, default=None,
                   help="segmentation run folder, weights file or exported bundle: lung masks (default: a lung-ROI "
                   "classifier's own segmenter)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--cam", choices=("gradcam", "gradcam++"), default="gradcam", help="heat-map method")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--calibrated", action="store_true",
                   help="p_<class> columns: probabilities after the temperature scaling fitted on validation "
                   "(1.0 for models without one); the predicted class is the same either way")
    p.set_defaults(func=run_predict)

    e = subparsers.add_parser(
        "export-model", help="write a trained model with its preprocessing as a bundle folder (MONAI's layout)",
        description="Package a run's model into a folder in MONAI's bundle layout that `cxrfl predict` takes: "
        "models/model.pt (the network's weights, a plain state_dict), configs/metadata.json (MONAI's metadata plus, "
        "under \"cxrfl\", task, network, input size, normalisation, class names, lung-ROI setting, decision "
        "threshold and temperature) and for a lung-ROI classifier its segmenter (models/segmenter.pt). Also "
        "converts a single-file export of an earlier release.")
    e.add_argument("source", type=Path, help="run folder, weights file inside one, or an exported model")
    e.add_argument("--out", type=Path, required=True,
                   help="bundle folder to write (new, empty, or an earlier bundle, which is replaced)")
    e.set_defaults(func=run_export_model)


def run_predict(args) -> int:
    try:
        clf = load_classifier(args.classifier, segmenter=args.segmenter)
        summary = predict(clf, args.inputs, args.out, cam=args.cam, batch_size=args.batch_size,
                          calibrated=args.calibrated)
    except (ModelLoadError, ValueError) as exc:
        print(f"cxrfl predict: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0 if summary["images"] else 1


def run_export_model(args) -> int:
    try:
        info = export_model(args.source, args.out)
    except (ModelLoadError, OSError) as exc:  # OSError: --out not writable
        print(f"cxrfl export-model: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(info))
    return 0
