"""Trained models with the preprocessing they were trained with, from any run folder or an
exported bundle, so a checkpoint is never used with the wrong input size, normalisation, class
names or lung-ROI setting.

Sources: a run folder of `cxrfl central`, `cxrfl sim` or `cxrfl poc wait` (its config.json names
the task, model, input size, classes and ROI; weights: checkpoints/best.ckpt, or the best/final
federated global model, decrypted under HE), a weights file inside such a folder, or a bundle
folder written by `cxrfl export-model` (cxrfl/bundle.py), which describes all of it in
configs/metadata.json and carries a lung-ROI classifier's segmenter too; a single-file export
of an earlier release (`cxrfl-model/1`) still loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cxrfl.run_folder import RunFolder, RunFolderError
from lightning_modules.classification import CXRClassifier
from lightning_modules.data.transforms import ROI_MODES
from lightning_modules.operating_point import DEFAULT_THRESHOLD
from lightning_modules.segmentation import LungSegmentation
from lightning_modules.weights import ModelFile, is_bundle, load_checkpoint, load_weights


class ModelLoadError(ValueError):
    """A model could not be loaded; the message names the file and the problem."""


@dataclass
class Segmenter:
    module: LungSegmentation
    image_size: int
    source: str


@dataclass
class Classifier:
    module: CXRClassifier
    classes: list[str]
    image_size: int
    roi: str | None = None  # None: full image; "mask" or "crop": lung region from `segmenter`
    roi_threshold: float = 0.5
    segmenter: Segmenter | None = None
    source: str = ""
    extra: dict = field(default_factory=dict)
    # Two classes: the second class is predicted where its probability >= threshold, chosen on
    # validation when the run stored one (metrics.json "operating_point"), else 0.5 (argmax).
    threshold: float = DEFAULT_THRESHOLD
    temperature: float = 1.0  # fitted on validation; `predict --calibrated` divides the logits by it

    def mask_predictor(self):
        return self.segmenter.module.mask_predictor(self.roi_threshold) if self.segmenter else None


def _run_of(path: Path) -> RunFolder:
    """The training run holding `path` (itself or up to three folders up), read by RunFolder."""
    try:
        run = RunFolder.holding(path)
    except RunFolderError as exc:
        raise ModelLoadError(str(exc)) from None
    if run.config is None:
        raise ModelLoadError(f"{run.path}: a {run.kind} folder; pass one of its runs")
    return run


def _weights_file(run: RunFolder) -> Path:
    if (run.path / "checkpoints" / "best.ckpt").is_file():
        return run.path / "checkpoints" / "best.ckpt"
    he = run.federated and run.config.he
    models = run.path / "models" / ("decrypted" if he else "")
    selected = []
    metrics = _metrics(run)
    if metrics.get("selected_model"):  # the model the run selected and tested
        selected = [f"{metrics['selected_model']}.pt"]
    for name in selected + ["global_best.pt", "global_final.pt"]:
        if (models / name).is_file():
            return models / name
    hint = " (an HE run: decrypt it with a site's key first)" if he else ""
    raise ModelLoadError(f"{run.path}: no trained weights found (checkpoints/best.ckpt or models/global_*.pt){hint}")


def _metrics(run: RunFolder) -> dict:
    """metrics.json, or {} when the run has none or it is unreadable (a model without its chosen threshold)."""
    try:
        return run.metrics() or {}
    except RunFolderError:
        return {}


def _read(path: Path) -> ModelFile:
    """The model file at `path`, read without running code from it (lightning_modules/weights.py)."""
    try:
        return load_checkpoint(path)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None


def _load_into(module, state: dict, path: Path):
    try:
        return load_weights(module, state, path)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None


def load_segmenter(path: str | Path) -> Segmenter:
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or folder")
    exported = _exported(path)
    if exported is not None:
        return _segmenter_from_bundle(_description(exported), path)
    run = _run_of(path)
    if run.config.task != "segment":
        raise ModelLoadError(f"{run.path}: a {run.config.task!r} run, not a segmentation run")
    weights = path if path.is_file() else _weights_file(run)
    return Segmenter(_segmentation_module(weights, run.config.network), run.config.image_size, str(weights))


def _segmentation_module(weights: Path, arch: str | None = None) -> LungSegmentation:
    try:
        return LungSegmentation.from_checkpoint(weights, arch=arch)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None


def load_classifier(path: str | Path, segmenter: str | Path | None = None) -> Classifier:
    """The classifier at `path`; `segmenter` overrides the one a lung-ROI run was trained with."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or folder")
    given = _read(path) if path.is_file() or is_bundle(path) else None
    if given is not None and given.kind in EXPORTED:
        clf = _classifier_from_bundle(_description(given), path)
    else:
        run = _run_of(path)
        cfg = run.config
        if cfg.task != "classify":
            raise ModelLoadError(f"{run.path}: a {cfg.task!r} run, not a classification run")
        weights = path if path.is_file() else _weights_file(run)
        if cfg.algorithm == "fedbn" and not weights.stem.startswith("local_"):
            raise ModelLoadError(f"{weights}: a FedBN run's global model holds no site's normalisation statistics; "
                                 "predict with a site's own model, RUN/models/local_<site>.pt (with --he none "
                                 "reaches the server: predict at the site)")
        classes = list(cfg.classes)
        module = _load_into(_classifier_module(cfg.network, classes, weights, cfg.dp_sgd), (given or _read(weights)).state, weights)
        clf = Classifier(module, classes, cfg.image_size, cfg.roi, cfg.roi_threshold, source=str(weights))
        clf.threshold, clf.temperature = _stored_operating_point(run, weights)
        if cfg.roi and cfg.segmenter and segmenter is None:
            clf.segmenter = load_segmenter(cfg.segmenter)
    if segmenter is not None:
        clf.segmenter = load_segmenter(segmenter)
    if clf.roi and clf.segmenter is None:
        raise ModelLoadError(f"{path}: a lung-ROI classifier trained on ground-truth masks; pass --segmenter "
                             "to predict lung masks for new images")
    return clf


def _stored_operating_point(run: RunFolder, weights: Path) -> tuple[float, float]:
    """(threshold, temperature) a run chose on validation for its tested model; (0.5, 1.0) for a
    run without them (older runs, federated runs) or when `weights` is not the model it tested."""
    metrics = _metrics(run)
    if not isinstance(metrics.get("operating_point"), dict):
        return DEFAULT_THRESHOLD, 1.0
    point = metrics["operating_point"]
    checkpoint, selected = metrics.get("best_checkpoint"), metrics.get("selected_model")
    if checkpoint and (run.path / checkpoint).resolve() != weights.resolve():  # central: another checkpoint
        return DEFAULT_THRESHOLD, 1.0
    if selected and weights.stem != selected:  # federated: another of the run's models
        return DEFAULT_THRESHOLD, 1.0
    return _valid_threshold(point.get("threshold")), _valid_temperature(point.get("temperature"))


def _valid_threshold(value) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1
    return float(value) if ok else DEFAULT_THRESHOLD


def _valid_temperature(value) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")
    return float(value) if ok else 1.0


# ---- exported models (cxrfl/bundle.py writes them) --------------------------------------------
EXPORTED = ("bundle", "export")  # ModelFile kinds that describe their own preprocessing


def _classifier_module(model, classes: list, source: Path, dp_compatible: bool = False) -> CXRClassifier:
    try:
        return CXRClassifier(model=model, num_classes=len(classes), class_names=classes, dp_compatible=dp_compatible)
    except ValueError as exc:  # an unknown network name
        raise ModelLoadError(f"{source}: {exc}") from None


def _exported(path: Path) -> ModelFile | None:
    """An exported model (a bundle folder or an earlier single file); None for a run folder or a
    model file of another kind. A file that is not a model file at all, or would run code, is
    refused here (ModelLoadError)."""
    if not (path.is_file() or is_bundle(path)):
        return None
    model = _read(path)
    return model if model.kind in EXPORTED else None


def _description(model: ModelFile) -> dict:
    """An exported model's fields with its weights ("state_dict") and its segmenter's, in one dict
    for the checks below, whichever form it came in (an earlier single file embeds the segmenter)."""
    segmenter = model.segmenter
    return {**model.info, "state_dict": model.state} | (
        {"segmenter": {**segmenter.info, "state_dict": segmenter.state}} if segmenter else {})


# Fields of an exported model and what each must be: a wrong file is refused in one line
# instead of failing somewhere in the network or preprocessing.
_BUNDLE_FIELDS = {"task": str, "model": str, "image_size": int, "state_dict": dict}


def _check_bundle(bundle, path: Path, task: str, where: str = "") -> dict:
    if not isinstance(bundle, dict):
        raise ModelLoadError(f"{path}: its {where or 'contents'} is not an exported model")
    for key, kind in _BUNDLE_FIELDS.items():
        value = bundle.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ModelLoadError(f"{path}: an exported model without a valid {where}{key!r} "
                                 f"(expected {kind.__name__}, found {type(value).__name__})")
    if bundle["task"] != task:
        wanted = "segmenter" if task == "segment" else "classifier"
        raise ModelLoadError(f"{path}: an exported {bundle['task']!r} model, not a {wanted}")
    if bundle["image_size"] < 1:
        raise ModelLoadError(f"{path}: an exported model with image_size {bundle['image_size']}")
    if task == "classify":
        classes = bundle.get("classes")
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise ModelLoadError(f"{path}: an exported classifier without its class names ('classes': a list of "
                                 "strings)")
        if bundle.get("roi") not in (None, *ROI_MODES):
            raise ModelLoadError(f"{path}: an exported classifier with an unknown lung-ROI mode {bundle['roi']!r}")
    threshold = bundle.get("roi_threshold" if task == "classify" else "threshold", 0.5)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        raise ModelLoadError(f"{path}: an exported model whose threshold {threshold!r} is not between 0 and 1")
    if task == "classify":  # older exports lack both: 0.5 and 1.0
        decision = bundle.get("decision_threshold", DEFAULT_THRESHOLD)
        if _valid_threshold(decision) != decision:
            raise ModelLoadError(f"{path}: an exported classifier whose decision_threshold {decision!r} is not "
                                 "between 0 and 1")
        temperature = bundle.get("temperature", 1.0)
        if _valid_temperature(temperature) != temperature:
            raise ModelLoadError(f"{path}: an exported classifier whose temperature {temperature!r} is not positive")
    return bundle


def _segmenter_from_bundle(bundle: dict, path: Path, where: str = "") -> Segmenter:
    bundle = _check_bundle(bundle, path, "segment", where)
    try:
        module = LungSegmentation.from_state_dict(bundle["state_dict"], bundle["model"],
                                                  threshold=float(bundle.get("threshold", 0.5)), source=path)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None
    return Segmenter(module, bundle["image_size"], str(path))


def _classifier_from_bundle(bundle: dict, path: Path) -> Classifier:
    bundle = _check_bundle(bundle, path, "classify")
    classes = list(bundle["classes"])
    module = _load_into(_classifier_module(bundle["model"], classes, path,
                                                   bundle.get("dp_compatible") is True), bundle["state_dict"], path)
    seg = _segmenter_from_bundle(bundle["segmenter"], path, "segmenter's ") if bundle.get("segmenter") else None
    return Classifier(module, classes, bundle["image_size"], bundle.get("roi"),
                      float(bundle.get("roi_threshold", 0.5)), seg, str(path),
                      threshold=float(bundle.get("decision_threshold", DEFAULT_THRESHOLD)),
                      temperature=float(bundle.get("temperature", 1.0)))


def model_task(source: str | Path) -> str | None:
    """The task ("segment", "classify", "roi") of a model source: an exported model's, else its run's."""
    source = Path(source)
    if not source.exists():
        raise ModelLoadError(f"{source}: no such file or folder")
    exported = _exported(source)
    if exported:
        return exported.info.get("task")
    cfg = _run_of(source).config
    return "roi" if cfg.roi else cfg.task
