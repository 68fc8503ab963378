"""The GPU path (lightning_modules/accelerate.py, lightning_modules/data/gpu_batches.py, `cxrfl sim --gpus`,
bench/gpu.py), checked on a machine without a GPU: what CPU runs see is unchanged, the CUDA decisions are
taken from monkeypatched CUDA facts, and the batched augmentation is compared with MONAI's on the CPU."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from monai.transforms import Affine, AdjustContrast, NormalizeIntensity

from cxrfl.cli import main
from cxrfl.fl.config import FLConfig
from lightning_modules import accelerate
from lightning_modules.accelerate import (ChannelsLast, check_gpu_ids, device_callbacks, parse_gpu_ids,
                                          resolve_precision, trainer_precision, training_data_device)
from lightning_modules.config import ConfigError, TrainConfig
from lightning_modules.data.datamodule import CXRDataModule
from lightning_modules.data.gpu_batches import (BatchAugment, DeviceBatches, adjust_contrast, affine_theta,
                                                standardise, warp)
from lightning_modules.factory import build_module

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA does")

DPSGD = {"dp": "dpsgd", "dp_noise_multiplier": 1.0}


def fake_cuda(monkeypatch, bf16: bool = True, count: int = 1, name: str = "Fake GPU") -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


# ---- precision -------------------------------------------------------------------------------------------
@cpu_only
def test_precision_on_this_cpu_machine_is_32():
    assert trainer_precision(TrainConfig()) == "32"
    assert resolve_precision("auto", "gpu") == "32"  # "gpu" with no CUDA here: Lightning itself refuses later
    assert trainer_precision(TrainConfig(precision="bf16-mixed")) == "bf16-mixed"  # Lightning runs it on CPU


@cpu_only
def test_sixteen_bit_mixed_is_refused_where_the_run_would_train_on_cpu():
    with pytest.raises(ConfigError, match="--precision 16-mixed needs a CUDA GPU"):
        trainer_precision(TrainConfig(precision="16-mixed"))


@pytest.mark.parametrize("bf16, expected", [(True, "bf16-mixed"), (False, "16-mixed")])
def test_auto_precision_on_a_cuda_gpu(monkeypatch, bf16, expected):
    fake_cuda(monkeypatch, bf16=bf16)
    assert trainer_precision(TrainConfig()) == expected
    assert trainer_precision(TrainConfig(accelerator="cpu")) == "32"
    assert trainer_precision(TrainConfig(**DPSGD)) == "32"  # DP-SGD clips full-precision gradients


def test_bf16_on_a_gpu_without_it_is_refused_naming_the_gpu(monkeypatch):
    fake_cuda(monkeypatch, bf16=False, name="Tesla V100")
    with pytest.raises(ConfigError, match=r"--precision bf16-mixed: this GPU \(Tesla V100\)"):
        trainer_precision(TrainConfig(precision="bf16-mixed"))
    assert trainer_precision(TrainConfig(precision="16-mixed")) == "16-mixed"


@pytest.mark.parametrize("settings, message", [
    ({"precision": "64"}, "--precision must be one of"),
    ({"precision": "16-mixed", "accelerator": "cpu"}, "--precision 16-mixed needs a CUDA GPU"),
    ({"precision": "bf16-mixed", **DPSGD}, "cannot be combined with --dp dpsgd"),
    ({"precision": "16-mixed", **DPSGD}, "cannot be combined with --dp dpsgd"),
    ({"gpu_data": True, "accelerator": "cpu"}, "--gpu-data needs a GPU"),
    ({"gpu_data": True, **DPSGD}, "--gpu-data cannot be combined with --dp dpsgd"),
    ({"gpu_data": True, "workers": 2}, "--workers 2 has no use with --gpu-data"),
])
def test_settings_that_cannot_work_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**settings)


def test_the_command_line_refuses_before_reading_data(tmp_path, capsys):
    argv = ["central", "--task", "classify", "--data", str(tmp_path), "--out", str(tmp_path / "run")]
    assert main([*argv, "--precision", "16-mixed", "--accelerator", "cpu"]) == 2
    assert "--precision 16-mixed" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@cpu_only
def test_gpu_data_without_a_gpu_names_the_option():
    with pytest.raises(ConfigError, match="--gpu-data needs a CUDA GPU"):
        training_data_device(TrainConfig(gpu_data=True))
    assert training_data_device(TrainConfig()) is None


# ---- channels-last -----------------------------------------------------------------------------------------
def _wide_conv(module) -> torch.nn.Conv2d:
    """A convolution with several input channels: its weight's layout shows the memory format."""
    return next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)


@pytest.mark.parametrize("device", [torch.device("cuda", 0), torch.device("cpu")], ids=["cuda", "cpu"])
def test_channels_last_converts_weights_and_images_and_restores_them(device):
    module = build_module("classify", "cnn5", lr=1e-3, classes=["a", "b"])
    conv = _wide_conv(module)
    callback = ChannelsLast()
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=device))
    callback.setup(trainer, module, "fit")
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    batch = {"image": torch.rand(2, 3, 8, 8), "label": torch.tensor([0, 1])}
    callback.on_train_batch_start(trainer, module, batch, 0)
    assert batch["image"].is_contiguous(memory_format=torch.channels_last) and not batch["image"].is_contiguous()
    callback.on_train_end(trainer, module)  # before NVFlare's FLCallback sends the weights
    assert conv.weight.is_contiguous()


def test_channels_last_changes_nothing_on_other_devices():
    module = build_module("classify", "cnn5", lr=1e-3, classes=["a", "b"])
    strides = {k: v.stride() for k, v in module.state_dict().items()}
    callback = ChannelsLast()
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("mps")))
    callback.setup(trainer, module, "fit")
    image = torch.rand(2, 3, 8, 8)
    batch = {"image": image}
    callback.on_validation_batch_start(trainer, module, batch, 0)
    assert batch["image"] is image
    assert {k: v.stride() for k, v in module.state_dict().items()} == strides
    assert device_callbacks(TrainConfig(**DPSGD)) == []  # Opacus's hooks: not measured with channels-last


@pytest.fixture(scope="module")
def small_site(synthetic_root):
    dm = CXRDataModule(synthetic_root, sites=["site-1"], image_size=32, batch_size=8, limit=16, seed=0)
    dm.setup("fit")
    return dm


@cpu_only
@pytest.mark.parametrize("images_on", [None, "cpu"], ids=["dataloader", "device-batches"])
def test_a_cpu_fit_with_the_helpers_trains_and_leaves_the_weights_as_they_were(small_site, images_on):
    cfg = TrainConfig(model="cnn5", image_size=32, batch_size=8)
    small_site.keep_training_images_on(images_on)
    try:
        module = build_module("classify", "cnn5", lr=1e-3, classes=small_site.classes)
        before = {k: v.clone() for k, v in module.state_dict().items()}
        trainer = pl.Trainer(max_steps=1, accelerator=cfg.accelerator, devices=1, precision=trainer_precision(cfg),
                             callbacks=device_callbacks(cfg), logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                             num_sanity_val_steps=0)
        trainer.fit(module, datamodule=small_site)
    finally:
        small_site.keep_training_images_on(None)
    assert trainer.precision == "32-true" and trainer.global_step == 1
    after = module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    assert all(after[k].stride() == before[k].stride() for k in before)  # in the usual memory order


def test_bf16_mixed_runs_on_cpu(small_site):
    module = build_module("classify", "cnn5", lr=1e-3, classes=small_site.classes)
    precision = trainer_precision(TrainConfig(precision="bf16-mixed", accelerator="cpu"))
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", devices=1, precision=precision, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=small_site)
    assert trainer.global_step == 1


# ---- the batched augmentation against MONAI's ------------------------------------------------------------------
@pytest.mark.parametrize("rotate, scale, shift", [(0.1, 1.07, (0.5, -1.5)), (-0.13, 0.93, (3.0, 2.0)),
                                                  (0.0, 1.0, (0.0, 0.0))])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_the_batched_affine_is_monais(rotate, scale, shift, mode):
    image = torch.rand(1, 1, 40, 56)  # not square: the axes must not be swapped
    expected = Affine(rotate_params=[rotate], scale_params=[scale], translate_params=list(shift), mode=mode,
                      padding_mode="zeros", image_only=True)(image[0])
    theta = affine_theta(torch.tensor([rotate]), torch.tensor([[scale, 1.0]]), torch.tensor([shift]), 40, 56)
    assert torch.allclose(warp(image, theta, mode)[0], torch.as_tensor(expected), atol=1e-4)


def test_contrast_and_standardisation_are_monais():
    images = torch.rand(3, 1, 24, 24)
    images[1, :, :8] = 0  # background, as a lung-ROI image has
    images[2] = 0.5  # flat: divides by 1
    gamma = torch.tensor([0.8, 1.0, 1.25])
    for image, g, out in zip(images, gamma, adjust_contrast(images, gamma)):
        assert torch.allclose(out, torch.as_tensor(AdjustContrast(float(g))(image.clone())), atol=1e-6)
    for lung_only in (False, True):
        for image, out in zip(images, standardise(images, lung_only)):
            expected = NormalizeIntensity(nonzero=lung_only)(image.clone())
            assert torch.allclose(out, torch.as_tensor(expected), atol=1e-5)


def test_batch_augmentation_is_seeded_and_keeps_masks_binary():
    images = torch.rand(32, 1, 32, 32)
    masks = (torch.rand(32, 1, 32, 32) > 0.5).float()
    first = BatchAugment(3, "cpu")(images, masks)
    again = BatchAugment(3, "cpu")(images, masks)
    other = BatchAugment(4, "cpu")(images, masks)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    assert set(first[1].unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(first[1], masks)  # most were warped
    means = first[0].flatten(1).mean(1)
    assert torch.allclose(means, torch.zeros_like(means), atol=1e-4)  # standardised per image


def test_device_batches_shuffle_per_pass_and_keep_labels_with_their_images():
    n = 20
    images = torch.arange(n, dtype=torch.float16).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    images = images + torch.rand(n, 1, 4, 4).half() * 0.01  # not flat
    labels = torch.arange(n) % 2
    batches = DeviceBatches(images, labels, None, [f"i{k}" for k in range(n)], 8,
                            BatchAugment(0, "cpu", augment=False), seed=1, drop_last=True)
    assert len(batches) == 2
    passes = [[i for b in batches for i in b["id"]] for _ in range(2)]
    assert all(len(p) == 16 and len(set(p)) == 16 for p in passes) and passes[0] != passes[1]
    for batch in batches:
        rows = [int(i[1:]) for i in batch["id"]]
        assert batch["label"].tolist() == [r % 2 for r in rows]
        assert torch.allclose(batch["image"], standardise(images[rows].float()), atol=1e-5)
        assert batch["image"].dtype == torch.float32


# ---- --gpus -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["a", "-1", "0,,1", "1.5", "0,0", ""])
def test_gpu_ids_must_be_distinct_non_negative_whole_numbers(text):
    with pytest.raises(ValueError, match="--gpus"):
        parse_gpu_ids(text)
    assert parse_gpu_ids(" 0, 1") == (0, 1)


@cpu_only
def test_gpu_ids_without_cuda_name_the_missing_device():
    with pytest.raises(ConfigError, match=r"^--gpus 0,1: no CUDA device 0 on this machine \(it offers no CUDA device\)$"):
        check_gpu_ids((0, 1))


def test_gpu_ids_against_the_devices_there_are(monkeypatch):
    fake_cuda(monkeypatch, count=2)
    check_gpu_ids((1, 0))
    with pytest.raises(ConfigError, match="no CUDA device 2 on this machine"):
        check_gpu_ids((0, 2))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # a site is given CUDA_VISIBLE_DEVICES=<id>: host numbering
    check_gpu_ids((3, 5))
    with pytest.raises(ConfigError, match=r"no CUDA device 0 .*it offers CUDA devices 3,5"):
        check_gpu_ids((0,))


@cpu_only
def test_sim_refuses_missing_gpus_in_one_line_before_a_run_folder(synthetic_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["sim", "--task", "classify", "--data", str(synthetic_root), "--model", "cnn5", "--image-size", "32",
                 "--gpus", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "cxrfl sim: --gpus 0: no CUDA device 0 on this machine (it offers no CUDA device)"
    assert not out.exists()
    with pytest.raises(SystemExit) as exc:
        main(["sim", "--task", "classify", "--gpus", "0,x"])
    assert exc.value.code == 2
    assert "argument --gpus: expected GPU ids" in capsys.readouterr().err


@pytest.mark.parametrize("settings, gpus, take_turns, message", [
    ({"accelerator": "cpu"}, (0,), False, "--gpus cannot be combined with --accelerator cpu"),
    ({}, (0, 1, 2), False, "3 GPUs for 2 sites"),
    ({}, (0, 1), True, "--take-turns runs one site at a time"),
])
def test_simulator_gpu_settings_that_cannot_work(monkeypatch, settings, gpus, take_turns, message):
    from cxrfl.fl.simulator import check_simulator_gpus

    fake_cuda(monkeypatch, count=4)
    cfg = FLConfig(task="classify", sites=("site-1", "site-2"), **settings)
    with pytest.raises(ConfigError, match=message):
        check_simulator_gpus(cfg, gpus, take_turns)


def test_the_simulator_is_given_the_gpus_and_the_run_records_them(synthetic_root, tmp_path, monkeypatch):
    from cxrfl.fl import simulator
    from cxrfl.options import ready
    from cxrfl.run_folder import RunFolder

    class Launched(Exception):
        pass

    def launch(command, log_path, env, cwd):
        raise Launched(command)

    monkeypatch.setattr(accelerate, "host_gpu_ids", lambda: [0, 1])
    monkeypatch.setattr(simulator, "_run_logged", launch)
    cfg = ready(FLConfig(task="classify", data_root=str(synthetic_root), sites=("site-1", "site-2"), rounds=1,
                         model="cnn5", image_size=32))
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(Launched) as launched:
        simulator.run_simulation(cfg, run, gpus=(0, 1))
    command = launched.value.args[0]
    assert command[command.index("-gpu") + 1] == "0,1"
    assert RunFolder.read(run).facts["gpus"] == [0, 1]


# ---- the bench case -----------------------------------------------------------------------------------------
@cpu_only
def test_the_gpu_bench_case_reports_no_gpu_at_once(tmp_path):
    from bench.cases import QUICK
    from bench.gpu import ROWS, gpu

    start = time.perf_counter()
    rows = gpu(QUICK, tmp_path)
    assert time.perf_counter() - start < 5
    assert [r["case"] for r in rows] == [name for name, _, _ in ROWS]
    assert all(r["measured"] is None and r["pass"] is None and r["detail"] == {"setup": "no GPU"} for r in rows)
    assert not any(tmp_path.iterdir())  # nothing generated, nothing trained


def test_the_gpu_bench_loop_rows_run_on_cpu(synthetic_root):
    from bench.gpu import PIPELINE, loop_rows

    sizes = {"model": "cnn5", "size": 32, "batch": 8, "limit": 16, "loop_epochs": 1, "cpu_loader_batches": 2}
    rows = loop_rows(Path(synthetic_root), sizes, 1, torch.device("cpu"), "32")
    assert len(rows) == 3
    loop, busy, pipeline = rows
    assert loop["measured"] > 0 and loop["detail"]["plain_img_s"] > 0
    assert busy["measured"] is None and busy["pass"] is None  # no GPU to sample
    assert pipeline["case"] == PIPELINE[0] and pipeline["detail"]["cpu_loader_img_s"] > 0
