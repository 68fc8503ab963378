"""The GPU case (`cxrfl bench --cases gpu`): does training keep a CUDA GPU busy?

Four rows, each measured side by side in one process run like the CPU cases:
- the Lightning loop (resolved precision + channels-last) against a plain PyTorch AMP loop on the same GPU;
- the share of time the GPU runs a kernel during that Lightning training (nvidia-smi's utilization.gpu);
- the training batches made on the GPU (--gpu-data) against what the model consumes;
- `cxrfl sim` against `cxrfl central` on the same images at 224 px, both on this GPU.
On a machine without CUDA it returns the same rows unmeasured (setup "no GPU") at once. The loop rows'
code also runs on the CPU (`loop_rows(..., torch.device("cpu"), "32")`), which is how tests check it.
"""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import subprocess
import threading
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch

from bench.common import timed_cxrfl, seeded_classifier, synthetic_sites, row
from lightning_modules.accelerate import ChannelsLast, resolve_precision
from lightning_modules.data.datamodule import CXRDataModule

# Sizes for an H200-class GPU: the federation row trains ~5 min in all, the others ~1 min.
GPU_SCALE = {"model": "densenet121", "size": 224, "batch": 64, "sites": 3, "train_per_site": 400, "test": 100,
             "loop_epochs": 8, "fed_rounds": 4, "fed_local_epochs": 5, "cpu_loader_batches": 8}
GPU_QUICK = {"model": "cnn5", "size": 64, "batch": 16, "sites": 3, "train_per_site": 16, "test": 8,
             "loop_epochs": 1, "fed_rounds": 2, "fed_local_epochs": 1, "cpu_loader_batches": 2}

LOOP = ("GPU loop cost: Lightning ÷ plain AMP loop (images/s)", "≥ 0.95", "")
BUSY = ("GPU busy: time a kernel runs during Lightning training", "≥ 90 %", "%")
PIPELINE = ("GPU data pipeline: batches made on the GPU ÷ model (images/s)", "≥ 3", "")
FEDERATION = ("GPU federation overhead: simulator ÷ centralized (wall)", "≤ 1.05", "")
ROWS = (LOOP, BUSY, PIPELINE, FEDERATION)
AMP_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def gpu(scale, work: Path) -> list[dict]:
    if not torch.cuda.is_available():
        return [row(name, None, target, None, unit, setup="no GPU") for name, target, unit in ROWS]
    sizes = GPU_QUICK if scale.quick else GPU_SCALE
    root = synthetic_sites(work / "gpu-data", sizes["sites"], sizes["train_per_site"], sizes["size"], sizes["test"])
    precision = resolve_precision("auto", "gpu")
    device = torch.device("cuda", torch.cuda.current_device())
    return loop_rows(root, sizes, scale.reps, device, precision) + _federation(root, sizes, work, precision)


def loop_rows(root: Path, sizes: dict, reps: int, device: torch.device, precision: str) -> list[dict]:
    """The loop, busy and pipeline rows: `reps` alternating repetitions on `device`."""
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    dm = CXRDataModule(root, task="classify", image_size=sizes["size"], batch_size=sizes["batch"], seed=0,
                       limit=sizes.get("limit"))
    dm.setup("fit")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    setup = (f"{sizes['model']}, {sizes['size']} px, {dm.num_train_samples} images, batch {sizes['batch']}, "
             f"{precision}, channels-last, {name}")
    dm.keep_training_images_on(device)
    _plain_amp(dm, sizes["model"], precision, 1)  # warm-up: CUDA context, cuDNN's kernel choice, the allocator
    busy = GpuBusy(device.index if device.type == "cuda" else None)
    busy.start()
    plain, lightning, windows, batches = [], [], [], []
    try:
        for _ in range(reps):  # alternate, so drift hits both sides
            plain.append(_plain_amp(dm, sizes["model"], precision, sizes["loop_epochs"]))
            rate, window = _lightning(dm, sizes["model"], precision, sizes["loop_epochs"])
            lightning.append(rate)
            windows.append(window)
            batches.append(_gpu_batch_rate(dm))
    finally:
        busy.stop()
    p, lt, gb = statistics.median(plain), statistics.median(lightning), statistics.median(batches)
    share = busy.mean(windows)
    host = _cpu_loader_rate(dm, device, sizes["cpu_loader_batches"])
    return [
        row(LOOP[0], lt / p, LOOP[1], lt / p >= 0.95, lightning_img_s=round(lt, 1), plain_img_s=round(p, 1),
            setup=setup + ", set-up included"),
        row(BUSY[0], share, BUSY[1], None if share is None else share >= 90, BUSY[2], samples=busy.count(windows),
            setup=setup + (f", sampled by {busy.source}" if busy.source else ", no nvidia-smi or pynvml to sample")),
        row(PIPELINE[0], gb / lt, PIPELINE[1], gb / lt >= 3, gpu_batches_img_s=round(gb, 1), model_img_s=round(lt, 1),
            cpu_loader_img_s=round(host, 1), setup=setup + "; cpu_loader: the default DataLoader (no workers, pinned)"),
    ]


# ---- the training loops ------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: a time is only true once they are done
        torch.cuda.synchronize(device)


def _images_per_epoch(loader, batch: int) -> int:
    return len(loader) * batch if loader.drop_last else len(loader.ids)


def _plain_amp(dm, model: str, precision: str, epochs: int) -> float:
    """The module's training step in a bare PyTorch loop: autocast, a GradScaler for fp16, channels-last; images/s
    (moving the module to the GPU included, as Lightning's set-up is)."""
    device = dm.images_device
    module = seeded_classifier(dm, model)
    loader = dm.train_dataloader()
    dtype = AMP_DTYPES.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    _sync(device)
    start = time.perf_counter()
    module = module.to(device).to(memory_format=torch.channels_last)
    optimizer = module.configure_optimizers()
    module.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer warns and does nothing
        for _ in range(epochs):
            for index, batch in enumerate(loader):
                batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    loss = module.training_step(batch, index)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            module.on_train_epoch_end()
    _sync(device)
    return epochs * _images_per_epoch(loader, dm.batch_size) / (time.perf_counter() - start)


class TrainWindow(pl.Callback):
    """When the training loop ran (monotonic seconds): the span GPU busy samples are averaged over."""

    def on_train_start(self, trainer, pl_module):
        self.start = time.monotonic()

    def on_train_end(self, trainer, pl_module):
        _sync(pl_module.device)
        self.end = time.monotonic()


def _lightning(dm, model: str, precision: str, epochs: int) -> tuple[float, tuple[float, float]]:
    """The same training under a Trainer as the project's trainers build it; images/s (set-up included) and the
    training loop's time window."""
    device = dm.images_device
    module = seeded_classifier(dm, model)
    window = TrainWindow()
    trainer = pl.Trainer(max_epochs=epochs, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                         precision=precision,
                         callbacks=[ChannelsLast(), window], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0)
    loader = dm.train_dataloader()
    _sync(device)
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    _sync(device)
    rate = epochs * _images_per_epoch(loader, dm.batch_size) / (time.perf_counter() - start)
    return rate, (window.start, window.end)


# ---- the data pipeline -------------------------------------------------------------------------------
def _gpu_batch_rate(dm) -> float:
    """One epoch of augmented, standardised batches cut on the GPU (--gpu-data); images/s."""
    loader = dm.train_dataloader()
    _sync(dm.images_device)
    start = time.perf_counter()
    seen = sum(len(batch["image"]) for batch in loader)
    _sync(dm.images_device)
    return seen / (time.perf_counter() - start)


def _cpu_loader_rate(dm, device: torch.device, batches: int) -> float:
    """The default path for comparison: MONAI's per-image transforms in a DataLoader, copied to the GPU."""
    dm.keep_training_images_on(None)
    try:
        seen = 0
        _sync(device)
        start = time.perf_counter()
        for index, batch in enumerate(dm.train_dataloader()):
            if index == batches:
                break
            seen += len(batch["image"].to(device, non_blocking=True))
        _sync(device)
        return seen / (time.perf_counter() - start)
    finally:
        dm.keep_training_images_on(device)


# ---- GPU utilization ------------------------------------------------------------------------------------
class GpuBusy(threading.Thread):
    """Samples a GPU's utilization (the share of the last sample period in which a kernel ran) every `every`
    seconds: through pynvml (torch.cuda.utilization) where installed, else nvidia-smi; index None: no GPU, no
    samples."""

    def __init__(self, index: int | None, every: float = 0.15):
        super().__init__(daemon=True)
        self.index, self.every, self._halt = index, every, threading.Event()
        self.samples: list[tuple[float, float]] = []
        self.source, self._read = self._reader()

    def _reader(self):
        if self.index is None:
            return None, None
        try:
            torch.cuda.utilization(self.index)
            return "pynvml", lambda: float(torch.cuda.utilization(self.index))
        except Exception:  # noqa: BLE001 - no pynvml (or no NVML): try nvidia-smi
            pass
        smi = shutil.which("nvidia-smi")
        if smi is None:
            return None, None
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        ident = visible[self.index] if self.index < len(visible) else str(self.index)  # nvidia-smi's numbering
        command = [smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", ident]
        return "nvidia-smi", lambda: float(subprocess.run(command, capture_output=True, text=True,
                                                           timeout=5).stdout.split()[0])

    def run(self) -> None:
        while self._read is not None and not self._halt.wait(self.every):
            try:
                value = self._read()
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                continue
            self.samples.append((time.monotonic(), value))

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def _within(self, windows) -> list[float]:
        return [v for t, v in self.samples if any(start <= t <= end for start, end in windows)]

    def count(self, windows) -> int:
        return len(self._within(windows))

    def mean(self, windows) -> float | None:
        values = self._within(windows)
        return statistics.fmean(values) if values else None


# ---- federation on the GPU ------------------------------------------------------------------------------
def _federation(root: Path, sizes: dict, work: Path, precision: str) -> list[dict]:
    """`cxrfl sim` (sites taking turns on this GPU) ÷ `cxrfl central` for the same sample-epochs, both whole
    commands with the training images on the GPU; test set included."""
    common = ["--task", "classify", "--data", str(root), "--image-size", str(sizes["size"]), "--batch-size",
              str(sizes["batch"]), "--model", sizes["model"], "--seed", "0", "--gpu-data"]
    epochs = sizes["fed_rounds"] * sizes["fed_local_epochs"]
    central_s = timed_cxrfl(["central", *common, "--epochs", str(epochs), "--out", str(work / "gpu-central")],
                       work / "gpu-central.log")
    sim_s = timed_cxrfl(["sim", *common, "--rounds", str(sizes["fed_rounds"]), "--local-epochs",
                    str(sizes["fed_local_epochs"]), "--no-cross-site-eval", "--take-turns", "--out",
                    str(work / "gpu-sim")], work / "gpu-sim.log")
    ratio = sim_s / central_s
    return [row(FEDERATION[0], ratio, FEDERATION[1], ratio <= 1.05, sim_s=round(sim_s, 1), central_s=round(central_s, 1),
                setup=f"{sizes['model']}, {sizes['size']} px, {sizes['sites']} sites × ~{sizes['train_per_site']} "
                      f"train images, {sizes['fed_rounds']} rounds × {sizes['fed_local_epochs']} epochs vs {epochs} "
                      f"epochs, {precision}, --gpu-data, sites take turns on one GPU, one run each")]
