"""Model files never run code, and a model file of the wrong kind is refused in one line before
anything is written: every command that takes a model file, tried with a pickle payload (a file a
hostile party could hand a user), with random bytes and with real model files of another kind;
and every kind of file cxrfl, Lightning and NVFlare write (numpy arrays under DP, ciphertext
bytes under HE included) still loads."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from cxrfl.cli import main
from lightning_modules.classification import CXRClassifier
from lightning_modules.segmentation import LungSegmentation
from lightning_modules.weights import EXPORT_FORMAT, UnsafeFileError, read_model_file, safe_torch_load

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
    from cxrfl.he_keys import CLIENT_CONTEXT, decrypt_checkpoint, write_he_contexts

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
    from cxrfl.fl_job import FLConfig
    from lightning_modules.data.manifest import write_json

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
    assert read_model_file(out).info["classes"] == ["normal", "pneumonia"]


def test_every_format_cxrfl_writes_loads_safely(tmp_path):
    """NVFlare's persistor format with numpy arrays (DP jobs) and its train_conf, round files, exported
    files, and HE ciphertext checkpoints: read with weights_only=True, nothing refused."""
    import tenseal as ts
    from nvflare.app_opt.pt.model_persistence_format_manager import PTModelPersistenceFormatManager

    from app_custom.he_packing import SUM_WEIGHT, pack_and_encrypt
    from cxrfl.he_keys import CLIENT_CONTEXT, decrypt_checkpoint, write_he_contexts
    from cxrfl.simulate import last_complete_round, load_state

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
