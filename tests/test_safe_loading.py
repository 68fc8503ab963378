"""Model files never run code, and a model file of the wrong kind is refused in one line before
anything is written: every command that takes a model file, tried with a pickle payload (a file a
hostile party could hand a user), with random bytes and with real model files of another kind;
and every kind of file cxrfl, Lightning and NVFlare write (numpy arrays under DP, ciphertext
bytes under HE included) still loads."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from cxrfl.cli import main
from lightning_modules.classification import CXRClassifier
from lightning_modules.segmentation import LungSegmentation
from lightning_modules.weights import EXPORT_FORMAT, UnsafeFileError, load_checkpoint, safe_torch_load

REFUSED = "refused: loading it would run code from the file"


class Payload:
    """Unpickling this creates `marker`: what a hostile model file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _segmenter_bundle() -> dict:
    module = LungSegmentation(arch="unet")
    return {"format": EXPORT_FORMAT, "task": "segment", "model": "unet", "image_size": 64, "threshold": 0.5,
            "normalisation": "per-image", "state_dict": module.state_dict()}


def _classifier_bundle(**changes) -> dict:
    module = CXRClassifier(model="cnn5", num_classes=2, class_names=["normal", "pneumonia"])
    bundle = {"format": EXPORT_FORMAT, "task": "classify", "model": "cnn5", "classes": ["normal", "pneumonia"],
              "image_size": 64, "normalisation": "per-image", "roi": None, "roi_threshold": 0.5,
              "state_dict": module.state_dict(), "segmenter": None}
    return {**bundle, **changes}


def _lightning_classifier_checkpoint() -> dict:
    """What Lightning writes for a classifier: its weights, hyper-parameters and loop state."""
    module = CXRClassifier(model="cnn5", num_classes=2, class_names=["normal", "pneumonia"])
    return {"epoch": 0, "global_step": 4, "pytorch-lightning_version": "2.6.0", "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams), "callbacks": {}, "optimizer_states": [], "lr_schedulers": []}


@pytest.fixture
def hostile(tmp_path):
    """(payload file, marker): a segmenter/classifier-looking model file whose unpickling creates the marker."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({**_segmenter_bundle(), "state_dict": {"net.w": Payload(marker)}}, path)
    return path, marker


@pytest.fixture
def images(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.full((40, 40), 120, np.uint8)).save(folder / "a.png")
    return folder


def _one_line_error(capsys, path) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert str(path) in err, err
    return err


def test_payload_runs_under_plain_torch_load(hostile):
    """The fixture is a real attack: torch.load(weights_only=False) runs it."""
    path, marker = hostile
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_the_loader_tells_code_from_broken_files(tmp_path):
    """A payload in either torch format, or in a bare pickle, is refused naming what it would call; a
    cut or random file (whose bytes may parse as a pickle opcode) is only unreadable."""
    import pickle

    marker = tmp_path / "pwned"
    torch.save({"model": {"w": Payload(marker)}}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "bare.pkl").write_bytes(pickle.dumps(Payload(marker), protocol=0))
    torch.save({"o": np.array([1, "a"], dtype=object)}, tmp_path / "objects.pt")
    for name, called in [("legacy.pt", "system"), ("bare.pkl", "system"), ("objects.pt", "ObjectDType")]:
        with pytest.raises(UnsafeFileError, match=f"{REFUSED}.*{called}"):
            safe_torch_load(tmp_path / name)
    assert not marker.exists()
    (tmp_path / "cut.pt").write_bytes(b"cut by a kill")  # 'c' is pickle's GLOBAL opcode
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.ones(3)}}, good)
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[:200])
    for name in ("cut.pt", "truncated.pt"):
        with pytest.raises(ValueError, match="not a (readable )?PyTorch model file") as caught:
            safe_torch_load(tmp_path / name)
        assert not isinstance(caught.value, UnsafeFileError) and "\n" not in str(caught.value)


@pytest.mark.parametrize("command", ["predict-classifier", "predict-segmenter", "central", "sim", "export",
                                     "export-model"])
def test_a_payload_model_file_is_refused_by_every_command_without_running(command, hostile, images,
                                                                         synthetic_root, tmp_path, capsys):
    path, marker = hostile
    out = tmp_path / "out"
    good = tmp_path / "good-classifier.pt"
    torch.save(_classifier_bundle(), good)
    argv = {
        "predict-classifier": ["predict", str(images), "--classifier", str(path), "--out", str(out)],
        "predict-segmenter": ["predict", str(images), "--classifier", str(good), "--segmenter", str(path),
                              "--out", str(out)],
        "central": ["central", "--task", "classify", "--roi", "--segmenter", str(path), "--data", str(synthetic_root),
                    "--image-size", "64", "--limit", "4", "--epochs", "1", "--out", str(out)],
        "sim": ["sim", "--task", "roi", "--segmenter", str(path), "--data", str(synthetic_root), "--image-size", "64",
                "--limit", "4", "--rounds", "1", "--out", str(out)],
        "export": ["export", "--task", "roi", "--segmenter", str(path), "--data", str(synthetic_root), "--out", str(out)],
        "export-model": ["export-model", str(path), "--out", str(out)],
    }[command]
    assert main(argv) == 2
    assert REFUSED in _one_line_error(capsys, path)
    assert not marker.exists()
    assert not out.exists()


def test_a_site_and_the_he_decryption_refuse_a_payload_without_running(hostile, tmp_path):
    from cxrfl.fl.he_keys import CLIENT_CONTEXT, decrypt_checkpoint, write_he_contexts

    path, marker = hostile
    with pytest.raises(UnsafeFileError, match=REFUSED):
        LungSegmentation.from_checkpoint(path)  # what a site's client runs on --segmenter
    write_he_contexts(tmp_path / "keys")
    round_file = tmp_path / "global_final.pt"
    torch.save({"model": {"cxrfl.he.packed:0": b"x"}, "meta_props": {"x": Payload(marker)}}, round_file)
    with pytest.raises(UnsafeFileError, match=REFUSED):
        decrypt_checkpoint(round_file, tmp_path / "keys" / CLIENT_CONTEXT)
    assert not marker.exists()


def test_resume_refuses_a_payload_round_file_without_running(tmp_path, capsys):
    from cxrfl.fl.config import FLConfig
    from lightning_modules.data.atomic import write_json

    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    cfg = FLConfig(task="classify", model="cnn5", sites=["site-1", "site-2"], rounds=3, data_root=str(tmp_path))
    write_json(run / "config.json", cfg.as_dict())
    rounds = run / "models" / "rounds"
    rounds.mkdir(parents=True)
    torch.save({"model": {"w": torch.zeros(2)}, "round": 0, "meta": {}}, rounds / "global_round_000.pt")
    evil = rounds / "global_round_001.pt"
    torch.save({"model": {"w": Payload(marker)}, "round": 1, "meta": {}}, evil)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert main(["sim", "--resume", str(run)]) == 2
    assert REFUSED in _one_line_error(capsys, evil)
    assert not marker.exists()
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # nothing started, nothing added


def _random_file(tmp_path):
    path = tmp_path / "random.ckpt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return path


@pytest.mark.parametrize("kind,message", [
    ("random", "not a PyTorch model file"),
    ("lightning-classifier", "a classifier's checkpoint, not a segmenter"),
    ("exported-classifier", "an exported 'classify' model, not a segmenter"),
    ("nvflare-classifier", "weights do not fit a 'unet' segmentation network"),
    ("not-a-model", "holds no model weights"),
])
def test_a_segmenter_of_the_wrong_kind_stops_central_and_sim_before_a_run_folder(kind, message, synthetic_root,
                                                                                 tmp_path, capsys):
    path = tmp_path / f"{kind}.ckpt"
    if kind == "random":
        path = _random_file(tmp_path)
    elif kind == "lightning-classifier":
        torch.save(_lightning_classifier_checkpoint(), path)
    elif kind == "exported-classifier":
        torch.save(_classifier_bundle(), path)
    elif kind == "nvflare-classifier":
        torch.save({"model": _classifier_bundle()["state_dict"], "train_conf": {"train": {"model": "GlobalModel"}}},
                   path)
    else:
        torch.save({"weights": [1, 2, 3]}, path)
    out = tmp_path / "out"
    common = ["--segmenter", str(path), "--data", str(synthetic_root), "--image-size", "64", "--limit", "4",
              "--out", str(out)]
    assert main(["central", "--task", "classify", "--roi", "--epochs", "1"] + common) == 2
    assert message in _one_line_error(capsys, path)
    assert not out.exists()
    assert main(["sim", "--task", "roi", "--rounds", "1"] + common) == 2
    assert message in _one_line_error(capsys, path)
    assert not out.exists()


@pytest.mark.parametrize("bundle,message", [
    (lambda: {k: v for k, v in _classifier_bundle().items() if k != "classes"}, "without its class names"),
    (lambda: _classifier_bundle(classes="normal"), "without its class names"),
    (lambda: _classifier_bundle(image_size="64"), "without a valid 'image_size'"),
    (lambda: _classifier_bundle(model="resnet9000"), "unknown classifier"),
    (lambda: _classifier_bundle(roi="everything"), "unknown lung-ROI mode"),
    (lambda: _classifier_bundle(roi="mask", segmenter={"task": "segment"}), "segmenter's 'model'"),
    (lambda: {k: v for k, v in _classifier_bundle().items() if k != "task"}, "without a valid 'task'"),
    (_segmenter_bundle, "an exported 'segment' model, not a classifier"),
])
def test_predict_refuses_a_wrong_exported_classifier_in_one_line(bundle, message, images, tmp_path, capsys):
    path = tmp_path / "model.pt"
    torch.save(bundle(), path)
    out = tmp_path / "out"
    assert main(["predict", str(images), "--classifier", str(path), "--out", str(out)]) == 2
    assert message in _one_line_error(capsys, path)
    assert not out.exists()


def test_export_model_refuses_a_wrong_file_and_never_overwrites_another_kind(tmp_path, capsys):
    out = tmp_path / "exported.pt"
    random_file = _random_file(tmp_path)
    assert main(["export-model", str(random_file), "--out", str(out)]) == 2
    assert "not a PyTorch model file" in _one_line_error(capsys, random_file)
    assert not out.exists()
    source = tmp_path / "classifier.pt"
    torch.save(_classifier_bundle(), source)
    checkpoint = tmp_path / "best.ckpt"
    torch.save(_lightning_classifier_checkpoint(), checkpoint)
    before = checkpoint.read_bytes()
    assert main(["export-model", str(source), "--out", str(checkpoint)]) == 2
    assert "not overwritten" in _one_line_error(capsys, checkpoint)
    assert checkpoint.read_bytes() == before
    assert main(["export-model", str(source), "--out", str(out)]) == 0
    assert main(["export-model", str(source), "--out", str(out)]) == 0  # an earlier export is replaced
    assert load_checkpoint(out).info["classes"] == ["normal", "pneumonia"]


def test_every_format_cxrfl_writes_loads_safely(tmp_path):
    """NVFlare's persistor format with numpy arrays (DP jobs) and its train_conf, round files, exported
    files, and HE ciphertext checkpoints: read with weights_only=True, nothing refused."""
    import tenseal as ts
    from nvflare.app_opt.pt.model_persistence_format_manager import PTModelPersistenceFormatManager

    from app_custom.ckks_packing import pack_and_encrypt
    from app_custom.wire import SUM_WEIGHT
    from cxrfl.fl.he_keys import CLIENT_CONTEXT, decrypt_checkpoint, write_he_contexts
    from cxrfl.fl.results import last_complete_round, load_state

    seg = LungSegmentation(arch="unet").eval()
    arrays = {k: v.numpy() for k, v in seg.state_dict().items()}
    persisted = PTModelPersistenceFormatManager({"model": arrays, "meta_props": {"rounds": np.int64(3)}},
                                                default_train_conf={"train": {"model": "GlobalModel"}},
                                                allow_numpy_conversion=False).to_persistence_dict()
    dp_file = tmp_path / "global_best.pt"
    torch.save(persisted, dp_file)
    assert isinstance(safe_torch_load(dp_file)["model"]["net.model.0.conv.unit0.conv.weight"], np.ndarray)
    loaded = LungSegmentation.from_checkpoint(dp_file)
    for key, value in seg.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert set(load_state(dp_file)) == set(arrays)

    rounds = tmp_path / "rounds"
    rounds.mkdir()
    torch.save({"model": seg.state_dict(), "round": 2, "meta": {"fresh": ["site-1"]}}, rounds / "global_round_002.pt")
    (rounds / "global_round_003.pt").write_bytes(b"cut by a kill")  # unreadable: not a complete round
    number, saved = last_complete_round(rounds)
    assert number == 2 and saved["meta"] == {"fresh": ["site-1"]}

    torch.save(_segmenter_bundle(), tmp_path / "seg.pt")
    assert LungSegmentation.from_checkpoint(tmp_path / "seg.pt").hparams.arch == "unet"

    write_he_contexts(tmp_path / "keys")
    context = ts.context_from((tmp_path / "keys" / CLIENT_CONTEXT).read_bytes())
    params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "count": np.array(7)}
    packed, processed = pack_and_encrypt(params, context, weight=2.0, encrypt_layers="w", pack_size=100)
    he_file = tmp_path / "he_final.pt"
    torch.save({"model": packed, "meta_props": {SUM_WEIGHT: 2.0, "processed_keys": processed}}, he_file)
    plain = decrypt_checkpoint(he_file, tmp_path / "keys" / CLIENT_CONTEXT)
    np.testing.assert_allclose(plain["w"].numpy(), params["w"], atol=1e-4)
    assert int(plain["count"]) == 7


# ---- exported bundles (configs/metadata.json + models/*.pt) and the server's inputs -------------
def _roi_bundle(tmp_path, capsys):
    """A lung-ROI classifier bundle, converted by `export-model` from a single file of an earlier release."""
    legacy = tmp_path / "legacy.pt"
    torch.save(_classifier_bundle(roi="mask", segmenter=_segmenter_bundle()), legacy)
    bundle = tmp_path / "bundle"
    assert main(["export-model", str(legacy), "--out", str(bundle)]) == 0
    capsys.readouterr()
    assert sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()) == [
        "configs/metadata.json", "models/model.pt", "models/segmenter.pt"]
    return bundle


@pytest.mark.parametrize("part", ["models/model.pt", "models/segmenter.pt"])
def test_a_payload_inside_a_bundle_is_refused_by_predict_and_export_without_running(part, images, tmp_path, capsys):
    bundle = _roi_bundle(tmp_path, capsys)
    marker = tmp_path / "pwned"
    torch.save({"net.w": Payload(marker)}, bundle / part)
    out, again = tmp_path / "out", tmp_path / "again"
    assert main(["predict", str(images), "--classifier", str(bundle), "--out", str(out)]) == 2
    assert REFUSED in _one_line_error(capsys, bundle / part)
    assert main(["export-model", str(bundle), "--out", str(again)]) == 2
    assert REFUSED in _one_line_error(capsys, bundle / part)
    assert not marker.exists() and not out.exists() and not again.exists()


def _metadata(bundle):
    return json.loads((bundle / "configs" / "metadata.json").read_text())


@pytest.mark.parametrize("damage,message,named", [
    (lambda b: (b / "configs" / "metadata.json").write_text("{cut"), "not readable JSON", "configs/metadata.json"),
    (lambda b: (b / "configs" / "metadata.json").write_text(json.dumps({**_metadata(b), "cxrfl": {"task": "classify"}})),
     "not a bundle written by `cxrfl export-model`", "configs/metadata.json"),
    (lambda b: torch.save([torch.ones(2)], b / "models" / "model.pt"), "not a state_dict", "models/model.pt"),
    (lambda b: (b / "models" / "segmenter.pt").unlink(), "missing from the bundle", "models/segmenter.pt"),
    (lambda b: (b / "configs" / "metadata.json").write_text(json.dumps(
        {**_metadata(b), "cxrfl": {**_metadata(b)["cxrfl"], "classes": "normal"}})), "without its class names", ""),
])
def test_a_damaged_bundle_is_refused_by_predict_in_one_line(damage, message, named, images, tmp_path, capsys):
    bundle = _roi_bundle(tmp_path, capsys)
    damage(bundle)
    out = tmp_path / "out"
    assert main(["predict", str(images), "--classifier", str(bundle), "--out", str(out)]) == 2
    assert message in _one_line_error(capsys, bundle / named)
    assert not out.exists()


def test_a_bundle_round_trips_an_earlier_single_file_export(tmp_path, capsys):
    """Converted to a bundle, the classifier and its segmenter have the same weights, classes and
    settings; export-model replaces an earlier bundle, and a segmenter bundle serves as --segmenter."""
    from cxrfl.models import load_classifier, load_segmenter

    bundle = _roi_bundle(tmp_path, capsys)
    legacy, exported = load_classifier(tmp_path / "legacy.pt"), load_classifier(bundle)
    for a, b in [(legacy.module, exported.module), (legacy.segmenter.module, exported.segmenter.module)]:
        assert a.state_dict().keys() == b.state_dict().keys()
        assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert (exported.classes, exported.roi, exported.image_size) == (["normal", "pneumonia"], "mask", 64)
    with pytest.raises(ValueError, match="part of a model bundle; give the bundle's folder"):
        load_classifier(bundle / "models" / "model.pt")  # bare weights: the description is the folder's
    assert main(["export-model", str(tmp_path / "legacy.pt"), "--out", str(bundle)]) == 0  # replaces it
    seg_file = tmp_path / "seg.pt"
    torch.save(_segmenter_bundle(), seg_file)
    seg_bundle = tmp_path / "seg-bundle"
    assert main(["export-model", str(seg_file), "--out", str(seg_bundle)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["task"] == "segment"
    assert LungSegmentation.from_checkpoint(seg_bundle).hparams.arch == "unet"
    assert load_segmenter(seg_bundle).image_size == 64
    metadata = _metadata(seg_bundle)
    assert metadata["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "lung"}
    # the keys MONAI's bundle specification makes mandatory (docs.monai.io mb_specification)
    assert {"version", "monai_version", "pytorch_version", "numpy_version", "optional_packages_version", "task",
            "description", "authors", "copyright", "network_data_format"} <= set(metadata)
    for tensor in [*metadata["network_data_format"]["inputs"].values(),
                   *metadata["network_data_format"]["outputs"].values()]:
        assert {"type", "format", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data",
                "channel_def"} <= set(tensor)
    assert main(["export-model", str(seg_file), "--out", str(bundle / "models")]) == 2  # another folder
    assert "not overwritten" in _one_line_error(capsys, bundle / "models")


def test_a_sites_update_carrying_a_pickle_is_refused_by_the_server_without_running(tmp_path):
    """A site's update reaches the server as FOBS (msgpack; tensors as safetensors, arrays as .npy
    read with allow_pickle=False): a hostile site that packs a pickled object array is refused
    before anything in it is created."""
    import io

    from nvflare.apis.dxo import DXO, DataKind
    from nvflare.app_common.decomposers import common_decomposers
    from nvflare.app_common.decomposers.numpy_decomposers import NumpyArrayDecomposer
    from nvflare.fuel.utils import fobs

    marker = tmp_path / "pwned"
    payload = np.empty(1, dtype=object)
    payload[0] = Payload(marker)

    def pickling(self, target, manager=None):  # what the hostile site's NVFlare sends
        stream = io.BytesIO()
        np.save(stream, target, allow_pickle=True)
        return stream.getvalue()

    common_decomposers.register()
    honest = NumpyArrayDecomposer.native_decompose
    NumpyArrayDecomposer.native_decompose = pickling
    try:
        update = fobs.dumps(DXO(DataKind.WEIGHTS, {"w": payload}).to_shareable())
    finally:
        NumpyArrayDecomposer.native_decompose = honest
    with pytest.raises(ValueError, match="allow_pickle=False"):
        fobs.loads(update)
    assert not marker.exists()
    stream = io.BytesIO()
    np.save(stream, payload, allow_pickle=True)
    stream.seek(0)
    np.load(stream, allow_pickle=True)  # the payload is live: unpickled, it runs
    assert marker.exists()


def test_the_servers_persistor_refuses_a_payload_initial_model_without_running(synthetic_root, tmp_path):
    """A resumed job's initial model is one cxrfl wrote from a round file it read safely
    (cxrfl/fl/simulator.py prepare_resume); NVFlare's persistor reads it with weights_only=True too,
    and no job cxrfl builds turns that off."""
    from nvflare.apis.fl_context import FLContext
    from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor

    marker = tmp_path / "pwned"
    evil = tmp_path / "initial.pt"
    torch.save({"model": {"w": Payload(marker)}}, evil)
    persistor = PTFileModelPersistor(model={"w": torch.zeros(2)}, source_ckpt_file_full_name=str(evil))
    assert persistor.load_model(FLContext()) is None  # a system panic: the job stops
    assert not marker.exists()
    for number, extra in enumerate([[], ["--dp", "percentile"]]):  # an HE run is never resumed (resume.py)
        out = tmp_path / f"job{number}"
        assert main(["export", "--task", "classify", "--data", str(synthetic_root), "--out", str(out)] + extra) == 0
        servers = [json.loads(f.read_text()) for f in out.rglob("config_fed_server.json")]
        persistors = [c for cfg in servers for c in cfg["components"] if c["id"] == "persistor"]
        assert persistors and all(c.get("args", {}).get("load_weights_only", True) is True for c in persistors)
